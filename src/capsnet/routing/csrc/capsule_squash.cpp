// PrimaryCaps' squash (Sabour et al. 2017, Eq. 1), read straight from its convolution's channels, in one pass.
//
// Why: y [B, C * K, H, W] holds C capsule types of K dimensions at each of the P = H * W positions, and
// capsule i = c * P + p of an image is u[b, i, :] = squash(y[b, c * K : (c + 1) * K, p]). As PyTorch
// operations that is a permuting copy and about seven elementwise passes over the whole tensor (4 ms at
// batch 256 on a 2-core CPU, more than the routing's last iteration); here each image's type, K x P
// values, is read once while in cache and u written once, and the backward likewise.
//
// Half-precision inputs are squashed in float32 and give float32 capsules, as capsnet.nn.squash does
// under autocast; the gradient comes back in y's own dtype. `tests/test_channel_squash.py` checks both
// directions against capsnet.nn.squash through autograd.

#include "capsule_squash.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "squash.h"

namespace capsnet {
namespace {

constexpr int64_t kGrain = 16;  // (image, type) blocks per parallel task

void check_input(const torch::Tensor& y, int64_t K) {
  TORCH_CHECK(y.dim() == 4 && K > 0 && y.size(1) % K == 0,
              "channel squash: y must be [B, types * capsule_dim, H, W], got ", y.sizes(), " with capsule_dim ", K);
}

at::ScalarType capsule_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// One (image, type) block of y, [K, P], into x in the squash's precision, and each capsule's squared length
template <typename scalar_t, typename acc_t>
inline void read_block(const scalar_t* yq, int64_t K, int64_t P, acc_t* x, acc_t* n2) {
  std::fill(n2, n2 + P, acc_t(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < P; ++p) {
      x[k * P + p] = acc_t(yq[k * P + p]);
      n2[p] += x[k * P + p] * x[k * P + p];
    }
}

}  // namespace

torch::Tensor channel_squash_forward(torch::Tensor y, int64_t K, int64_t kind) {
  check_input(y, K);
  y = y.contiguous();
  const int64_t B = y.size(0), C = y.size(1) / K, P = y.size(2) * y.size(3);
  auto u = torch::empty({B, C * P, K}, y.options().dtype(capsule_dtype(y.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "capsnet_channel_squash", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = y.data_ptr<scalar_t>();
    acc_t* dst = u.data_ptr<acc_t>();
    at::parallel_for(0, B * C, kGrain, [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> x(K * P), n2(P), g(P), dg(P);
      for (int64_t q = q0; q < q1; ++q) {  // q = b * C + c: y's block [K, P], u's rows q * P .. q * P + P
        read_block(src + q * K * P, K, P, x.data(), n2.data());
        squash_scales(static_cast<int>(kind), n2.data(), g.data(), dg.data(), P);
        acc_t* uq = dst + q * P * K;
        for (int64_t p = 0; p < P; ++p)
          for (int64_t k = 0; k < K; ++k) uq[p * K + k] = x[k * P + p] * g[p];
      }
    });
  });
  return u;
}

torch::Tensor channel_squash_backward(torch::Tensor y, torch::Tensor grad_u, int64_t K, int64_t kind) {
  check_input(y, K);
  y = y.contiguous();
  const int64_t B = y.size(0), C = y.size(1) / K, P = y.size(2) * y.size(3);
  grad_u = grad_u.to(capsule_dtype(y.scalar_type())).contiguous();
  TORCH_CHECK(grad_u.numel() == B * C * P * K, "channel squash: grad_u must be [B, types * H * W, capsule_dim]");
  auto grad_y = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "capsnet_channel_squash_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = y.data_ptr<scalar_t>();
    const acc_t* gsrc = grad_u.data_ptr<acc_t>();
    scalar_t* gdst = grad_y.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, kGrain, [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> x(K * P), n2(P), dot(P), g(P), dg(P);
      for (int64_t q = q0; q < q1; ++q) {
        const acc_t* gq = gsrc + q * P * K;
        read_block(src + q * K * P, K, P, x.data(), n2.data());
        std::fill(dot.begin(), dot.end(), acc_t(0));
        for (int64_t p = 0; p < P; ++p)
          for (int64_t k = 0; k < K; ++k) dot[p] += x[k * P + p] * gq[p * K + k];
        squash_scales(static_cast<int>(kind), n2.data(), g.data(), dg.data(), P);
        for (int64_t p = 0; p < P; ++p) dg[p] *= acc_t(2) * dot[p];  // dy = g du + y 2 g'(|y|^2) (y . du)
        scalar_t* gy = gdst + q * K * P;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t p = 0; p < P; ++p) gy[k * P + p] = scalar_t(gq[p * K + k] * g[p] + x[k * P + p] * dg[p]);
      }
    });
  });
  return grad_y;
}

}  // namespace capsnet
