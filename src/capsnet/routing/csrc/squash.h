// The squash non-linearities of capsnet.nn.squash, shared by the kernels in this folder.
#pragma once

#include <cmath>
#include <cstdint>

namespace capsnet {

enum SquashKind { kPaper = 0, kKeras = 1, kEfficient = 2 };  // capsnet.routing.fused_cpu.SQUASH_KINDS

// v = s g(|s|^2) for each squash of capsnet.nn.squash (EPS inside the square root, as there);
// `dg` is dg/d|s|^2, for the backward.
template <typename T>
inline void squash_scale(int kind, T n2, T& g, T& dg) {
  const T eps = T(1e-8);
  const T r = std::sqrt(n2 + eps);
  if (kind == kPaper) {  // g = n2 / ((1 + n2) r)
    g = n2 / ((T(1) + n2) * r);
    dg = (T(1) - n2 / (T(1) + n2) - n2 / (T(2) * (n2 + eps))) / ((T(1) + n2) * r);
  } else if (kind == kKeras) {  // g = r / (0.5 + n2)
    const T q = T(0.5) + n2;
    g = r / q;
    dg = T(1) / (T(2) * r * q) - r / (q * q);
  } else {  // g = (1 - exp(-r)) / r
    const T e = -std::expm1(-r);
    g = e / r;
    dg = (std::exp(-r) / r - e / (r * r)) / (T(2) * r);
  }
}

// g[p], dg[p] = squash_scale(kind, n2[p]) for p < P: the choice of squash made once, so that the loop
// vectorises (for the paper's and the Keras squash).
template <typename T>
inline void squash_scales(int kind, const T* n2, T* g, T* dg, int64_t P) {
  if (kind == kPaper) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) squash_scale(kPaper, n2[p], g[p], dg[p]);
  } else if (kind == kKeras) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) squash_scale(kKeras, n2[p], g[p], dg[p]);
  } else {
    for (int64_t p = 0; p < P; ++p) squash_scale(kEfficient, n2[p], g[p], dg[p]);
  }
}

}  // namespace capsnet
