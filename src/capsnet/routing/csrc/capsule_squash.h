// The squash of PrimaryCaps read from its convolution's channels (capsule_squash.cpp).
#pragma once

#include <torch/extension.h>

namespace capsnet {

torch::Tensor channel_squash_forward(torch::Tensor y, int64_t capsule_dim, int64_t kind);
torch::Tensor channel_squash_backward(torch::Tensor y, torch::Tensor grad_u, int64_t capsule_dim, int64_t kind);

}  // namespace capsnet
