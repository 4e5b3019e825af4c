// Dynamic routing (Sabour et al. 2017, Procedure 1) with the votes u_hat = W u, fused, on the CPU.
//
// Why: u_hat ([B, 1152, 10, 16], 94 MB at batch 128 in fp32) is read about nine times by a routing
// written as whole-tensor operations, and that memory traffic costs more than all the other
// non-convolution work of a training step. Here each thread takes a range of images, makes their votes
// in cache (a few images at a time, so each W_i is read once per block) and runs every routing
// iteration on them while they are still there: one pass per iteration (agreement, softmax over the
// upper capsules, weighted sum). u_hat never reaches main memory and is not saved: the backward makes
// it again, runs the routing backward image by image, keeping each image's vote gradient factored, and
// then, with the lower capsules split between threads instead of the images, expands those gradients
// straight into the gradients of u and W (each tile's W and grad W stay in cache for the whole batch).
// Inference under bfloat16 autocast, where the CPU has AVX512-BF16, makes the votes from bfloat16 u and W
// with float32 sums (`make_votes_bf16`); everything else is float32 (or float64).
//
// Vectors run across lower capsules: the lower capsules are taken kTile at a time (a "tile", padded
// by the caller), and every per-image tensor stores the tile's capsules side by side in its last
// dimension, so each agreement, softmax and weighted sum is kTile independent lanes with no horizontal
// sums, whatever the capsule sizes. The Python side (`capsnet.routing.fused_cpu`) lays the inputs out,
// builds this file on first use, and `tests/test_routing_fused.py` checks it against the PyTorch
// implementation in float64.
//
// Layouts (contiguous; n = number of tiles, I = n * kTile, JD = J * D):
//   u [B, n, K, kTile]; W [n, K, JD, kTile]; bias [J, D]; v [B, J, D];
//   couplings c [R, B, J, I] (R = iters, or 1 with the last iteration's alone when nothing will take
//   the gradient: inference writes a third of them); s [R, B, J, D]; per image inside a thread:
//   u_hat [n, JD, kTile].
// The backward returns the gradients in u's and W's own layouts, [B, I, K] and [I, K, JD].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "capsule_squash.h"
#include "squash.h"

namespace {

constexpr int kTile = 16;  // lower capsules side by side: one AVX-512 register of floats
constexpr int kBlock = 4;  // images whose votes are made together, so that W is read once for them
constexpr int kGradBlock = 8;  // images whose gradients of u and W are taken together (W, grad W loaded once)

// kTile lanes as one value (GCC/Clang vector extensions): a loop-carried sum stays in a register, where
// an array in an `omp simd` loop went through the stack on every step.
template <typename T>
struct LanesOf {
  typedef T type __attribute__((vector_size(sizeof(T) * kTile)));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

template <typename T>
inline Lanes<T> load(const T* p) {
  Lanes<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, Lanes<T> v) {
  std::memcpy(p, &v, sizeof v);
}

using capsnet::squash_scale;

// v [J, D] = squash(s [J, D]), one capsule at a time
template <typename T>
void squash_rows(int kind, const T* s, T* v, int64_t J, int64_t D) {
  for (int64_t j = 0; j < J; ++j) {
    T n2 = 0;
    for (int64_t d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
    T g, dg;
    squash_scale(kind, n2, g, dg);
    for (int64_t d = 0; d < D; ++d) v[j * D + d] = s[j * D + d] * g;
  }
}

// gs = (dv/ds)^T gv for each capsule: gv g + s 2 g'(|s|^2) (s . gv)
template <typename T>
void squash_rows_backward(int kind, const T* s, const T* gv, T* gs, int64_t J, int64_t D) {
  for (int64_t j = 0; j < J; ++j) {
    T n2 = 0, dot = 0;
    for (int64_t d = 0; d < D; ++d) {
      n2 += s[j * D + d] * s[j * D + d];
      dot += s[j * D + d] * gv[j * D + d];
    }
    T g, dg;
    squash_scale(kind, n2, g, dg);
    const T k = T(2) * dg * dot;
    for (int64_t d = 0; d < D; ++d) gs[j * D + d] = gv[j * D + d] * g + s[j * D + d] * k;
  }
}

// exp(x) for the softmax's x = b - max(b) <= 0, in a form the compiler vectorizes (libm's expf is a
// call per element): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^7 (relative
// error below 2e-7, float32's rounding), times 2^n built from its exponent bits. float64 uses std::exp.
template <typename T>
inline T softmax_exp(T x) {
  if constexpr (std::is_same_v<T, float>) {
    x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: still a normal float
    const float n = std::nearbyint(x * 1.44269504f);
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
  } else {
    return std::exp(x);
  }
}

struct Sizes {
  int64_t B, n, K, J, D;  // images, tiles of lower capsules, input dim, upper capsules, output dim
  int64_t I() const { return n * kTile; }
  int64_t JD() const { return J * D; }
  int64_t tile_votes() const { return J * D * kTile; }  // one tile of one image's u_hat
  int64_t image_votes() const { return n * tile_votes(); }
};

// u_hat[bb, tile, e, :] = sum_k u[b0 + bb, tile, k, :] W[tile, k, e, :] for NB images b0 .. b0 + NB,
// into buf [NB, n, JD, kTile]: each vector of W is loaded once for the NB images.
template <typename T, int NB>
void make_votes(const Sizes& z, const T* u, const T* W, int64_t b0, T* buf) {
  const int64_t JD = z.JD(), K = z.K;
  for (int64_t tile = 0; tile < z.n; ++tile) {
    const T* Wt = W + tile * K * JD * kTile;
    const T* ut[NB];
    T* out[NB];
    for (int bb = 0; bb < NB; ++bb) {
      ut[bb] = u + ((b0 + bb) * z.n + tile) * K * kTile;
      out[bb] = buf + bb * z.image_votes() + tile * z.tile_votes();
    }
    for (int64_t e = 0; e < JD; ++e) {
      Lanes<T> acc[NB] = {};
      for (int64_t k = 0; k < K; ++k) {
        const Lanes<T> w = load(Wt + (k * JD + e) * kTile);
        for (int bb = 0; bb < NB; ++bb) acc[bb] += load(ut[bb] + k * kTile) * w;
      }
      for (int bb = 0; bb < NB; ++bb) store(out[bb] + e * kTile, acc[bb]);
    }
  }
}

// Two float32 lanes rounded to bfloat16 (to nearest, ties to even; NaN stays NaN) and packed into one
// 32-bit lane, x0's in the low half: the pair layout of vdpbf16ps
inline Lanes<uint32_t> bf16_pair(Lanes<float> x0, Lanes<float> x1) {
  auto round = [](Lanes<float> x) {
    Lanes<uint32_t> b;
    std::memcpy(&b, &x, sizeof b);
    const Lanes<uint32_t> r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    return x != x ? (b | 0x00400000u) & 0xFFFF0000u : r;
  };
  return (round(x0) >> 16) | round(x1);
}

// W [n, K, JD, kTile] -> W2 [n, K2, JD, kTile] of bfloat16 pairs along k (K2 = K / 2, an odd K's last
// pair padded with 0), tiles split between threads
inline void pair_weight(const Sizes& z, const float* W, uint32_t* W2) {
  const int64_t K2 = (z.K + 1) / 2, JD = z.JD();
  at::parallel_for(0, z.n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile)
      for (int64_t k2 = 0; k2 < K2; ++k2)
        for (int64_t e = 0; e < JD; ++e) {
          const float* w = W + ((tile * z.K + 2 * k2) * JD + e) * kTile;
          const Lanes<float> odd = 2 * k2 + 1 < z.K ? load(w + JD * kTile) : Lanes<float>{};
          store(W2 + ((tile * K2 + k2) * JD + e) * kTile, bf16_pair(load(w), odd));
        }
  });
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Votes = true;

// make_votes with u and W rounded to bfloat16, for inference under autocast (as autocast rounds a matrix
// product's inputs): W2 from pair_weight, u's tiles paired here (upairs: NB * K2 * kTile). vdpbf16ps adds
// both products of a pair to a float32 sum: twice the multiply-adds of a float32 FMA per instruction and
// half the bytes of W. Products of bfloat16 values are exact in float32; the sums are float32.
template <int NB>
void make_votes_bf16(const Sizes& z, const float* u, const uint32_t* W2, int64_t b0, float* buf, uint32_t* upairs) {
  const int64_t JD = z.JD(), K = z.K, K2 = (K + 1) / 2;
  for (int64_t tile = 0; tile < z.n; ++tile) {
    const uint32_t* Wt = W2 + tile * K2 * JD * kTile;
    const uint32_t* ut[NB];
    float* out[NB];
    for (int bb = 0; bb < NB; ++bb) {
      const float* src = u + ((b0 + bb) * z.n + tile) * K * kTile;
      uint32_t* dst = upairs + bb * K2 * kTile;
      for (int64_t k2 = 0; k2 < K2; ++k2)
        store(dst + k2 * kTile, bf16_pair(load(src + 2 * k2 * kTile),
                                          2 * k2 + 1 < K ? load(src + (2 * k2 + 1) * kTile) : Lanes<float>{}));
      ut[bb] = dst;
      out[bb] = buf + bb * z.image_votes() + tile * z.tile_votes();
    }
    if (K2 == 4) {  // the paper's 8-dimensional capsules: every image's pairs in registers for the tile
      __m512bh uk[NB][4];
      for (int bb = 0; bb < NB; ++bb)
        for (int k2 = 0; k2 < 4; ++k2) uk[bb][k2] = (__m512bh)_mm512_loadu_si512(ut[bb] + k2 * kTile);
      for (int64_t e = 0; e < JD; ++e) {
        __m512 acc[NB];
        for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm512_setzero_ps();
        for (int k2 = 0; k2 < 4; ++k2) {
          const __m512bh w = (__m512bh)_mm512_loadu_si512(Wt + (k2 * JD + e) * kTile);
          for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm512_dpbf16_ps(acc[bb], w, uk[bb][k2]);
        }
        for (int bb = 0; bb < NB; ++bb) _mm512_storeu_ps(out[bb] + e * kTile, acc[bb]);
      }
      continue;
    }
    for (int64_t e = 0; e < JD; ++e) {
      __m512 acc[NB];
      for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm512_setzero_ps();
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(Wt + (k2 * JD + e) * kTile);
        for (int bb = 0; bb < NB; ++bb)
          acc[bb] = _mm512_dpbf16_ps(acc[bb], w, (__m512bh)_mm512_loadu_si512(ut[bb] + k2 * kTile));
      }
      for (int bb = 0; bb < NB; ++bb) _mm512_storeu_ps(out[bb] + e * kTile, acc[bb]);
    }
  }
}
#else
constexpr bool kBf16Votes = false;  // no AVX512-BF16: inference under autocast keeps float32 votes
#endif

// The backward of u_hat = W u for NB images b0 .. b0 + NB and one tile of lower capsules, lane by lane:
// grad_u[b, tile * kTile + t, k] = sum_e W[tile, k, e, t] g[e, t] and
// gw[k, e, :] (+)= sum_b u[b, tile, k, :] g[e, :], where `expand(bb, out)` writes image bb's vote gradient
// g [JD, kTile] for the tile into `out` (gtile [NB, JD, kTile], in L1/L2), and gw [K, JD, kTile] is the
// tile's grad_W, summed over the blocks of images in cache.
template <typename T, int NB, typename Expand>
void votes_backward_tile(const Sizes& z, const T* u, const T* W, int64_t b0, int64_t tile, Expand&& expand, T* gtile,
                         T* grad_u, T* gw, bool accumulate) {
  const int64_t JD = z.JD(), K = z.K;
  const T* gt[NB];
  const T* ut[NB];
  for (int bb = 0; bb < NB; ++bb) {
    expand(bb, gtile + bb * z.tile_votes());
    gt[bb] = gtile + bb * z.tile_votes();
    ut[bb] = u + ((b0 + bb) * z.n + tile) * K * kTile;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* Wk = W + (tile * K + k) * JD * kTile;
    T* gWk = gw ? gw + k * JD * kTile : nullptr;
    Lanes<T> a[NB] = {};
    Lanes<T> uk[NB];
    for (int bb = 0; bb < NB; ++bb) uk[bb] = load(ut[bb] + k * kTile);
    for (int64_t e = 0; e < JD; ++e) {
      const Lanes<T> w = load(Wk + e * kTile);
      Lanes<T> g{};
      for (int bb = 0; bb < NB; ++bb) {
        const Lanes<T> ge = load(gt[bb] + e * kTile);
        a[bb] += w * ge;
        g += uk[bb] * ge;
      }
      if (gWk) store(gWk + e * kTile, accumulate ? load(gWk + e * kTile) + g : g);
    }
    if (grad_u)  // grad_u in u's own layout [B, I, K]
      for (int bb = 0; bb < NB; ++bb)
        for (int t = 0; t < kTile; ++t) grad_u[((b0 + bb) * z.I() + tile * kTile + t) * K + k] = a[bb][t];
  }
}

// f(std::integral_constant<int, nb>) for 1 <= nb <= Max: the block size as a compile-time constant
// (only the sizes a caller can reach are instantiated)
template <int Max, typename F>
void with_block(int64_t nb, F&& f) {
  if constexpr (Max > 1) {
    if (nb < Max) return with_block<Max - 1>(nb, std::forward<F>(f));
  }
  f(std::integral_constant<int, Max>{});
}

// c[j, :] = softmax over j of the logits b[j, :] (rows `stride` apart), kTile lower capsules at once;
// `leaky` adds a logit fixed at 0 (a sink) to the normalisation.
template <typename T>
inline void coupling_softmax(const T* b, T* c, int64_t J, int64_t stride, bool leaky) {
  T m[kTile], sum[kTile];
#pragma omp simd
  for (int t = 0; t < kTile; ++t) m[t] = leaky ? std::max(T(0), b[t]) : b[t];
  for (int64_t j = 1; j < J; ++j)
#pragma omp simd
    for (int t = 0; t < kTile; ++t) m[t] = std::max(m[t], b[j * stride + t]);
#pragma omp simd
  for (int t = 0; t < kTile; ++t) sum[t] = leaky ? softmax_exp(-m[t]) : T(0);
  for (int64_t j = 0; j < J; ++j)
#pragma omp simd
    for (int t = 0; t < kTile; ++t) {
      c[j * stride + t] = softmax_exp(b[j * stride + t] - m[t]);
      sum[t] += c[j * stride + t];
    }
#pragma omp simd
  for (int t = 0; t < kTile; ++t) sum[t] = T(1) / sum[t];
  for (int64_t j = 0; j < J; ++j)
#pragma omp simd
    for (int t = 0; t < kTile; ++t) c[j * stride + t] *= sum[t];
}

constexpr int kChunk = 4;  // upper capsules whose agreements are summed together (independent chains)
constexpr int kSumTiles = 4;  // tiles whose weighted sums are added to the accumulator together

// b[q] += sum_d v[q, d] x[q, d, :] for Q upper capsules (rows of b `stride` apart), Q independent sums
template <typename T, int Q>
inline void agree(const T* x, const T* v, T* b, int64_t stride, int64_t D) {
  Lanes<T> a[Q];
  for (int q = 0; q < Q; ++q) a[q] = load(b + q * stride);
  for (int64_t d = 0; d < D; ++d)
    for (int q = 0; q < Q; ++q) a[q] += v[q * D + d] * load(x + (q * D + d) * kTile);
  for (int q = 0; q < Q; ++q) store(b + q * stride, a[q]);
}

// acc [JD, kTile] += c[p, j, :] x[p, j, d, :] summed over P consecutive tiles (votes `step` apart)
template <typename T, int P>
inline void weighted_sum(const T* x, int64_t step, const T* c, int64_t I, int64_t J, int64_t D, T* acc) {
  for (int64_t j = 0; j < J; ++j) {
    Lanes<T> cj[P];
    for (int p = 0; p < P; ++p) cj[p] = load(c + j * I + p * kTile);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t e = (j * D + d) * kTile;
      Lanes<T> s = load(acc + e);
      for (int p = 0; p < P; ++p) s += cj[p] * load(x + p * step + e);
      store(acc + e, s);
    }
  }
}

// sum over the lanes of acc [JD, kTile] into out [JD]
template <typename T>
inline void sum_lanes(const T* acc, T* out, int64_t JD) {
  for (int64_t e = 0; e < JD; ++e) {
    T total = 0;
    for (int t = 0; t < kTile; ++t) total += acc[e * kTile + t];
    out[e] = total;
  }
}

// Every routing iteration for one image whose votes uh [n, JD, kTile] are in cache; writes its c of
// every iteration (rows of c_out, iterations c_stride apart), s likewise, and v.
template <typename T>
void route_image(const Sizes& z, const T* uh, const T* bias, int iters, int kind, bool leaky, T* logits,
                 T* acc, T* c_out, int64_t c_stride, T* c_scratch, T* s_out, int64_t s_stride, T* v_out) {
  const int64_t I = z.I(), J = z.J, D = z.D, JD = z.JD();
  std::vector<T> s(JD), v(JD);
  for (int r = 0; r < iters; ++r) {
    // every iteration's couplings into c_out, or (c_scratch given) only the last one's, as c_out's row 0
    T* c = c_scratch == nullptr ? c_out + r * c_stride : r == iters - 1 ? c_out : c_scratch;
    std::fill(acc, acc + JD * kTile, T(0));
    if (r == 0) {  // b_0 = 0: every coupling is 1 / J (1 / (J + 1) with the leaky sink)
      const T c0 = T(1) / T(leaky ? J + 1 : J);
      std::fill(c, c + J * I, c0);
      std::fill(logits, logits + J * I, T(0));
      for (int64_t tile = 0; tile < z.n; ++tile) {
        const T* x = uh + tile * z.tile_votes();
#pragma omp simd
        for (int64_t e = 0; e < JD * kTile; ++e) acc[e] += x[e];
      }
      sum_lanes(acc, s.data(), JD);
      for (int64_t e = 0; e < JD; ++e) s[e] *= c0;
    } else {
      for (int64_t t0 = 0; t0 < z.n; t0 += kSumTiles) {
        const int64_t np = std::min<int64_t>(kSumTiles, z.n - t0);
        for (int64_t tile = t0; tile < t0 + np; ++tile) {
          const T* x = uh + tile * z.tile_votes();
          T* b = logits + tile * kTile;
          for (int64_t j0 = 0; j0 < J; j0 += kChunk)  // b += u_hat . v of the iteration before
            with_block<kChunk>(std::min<int64_t>(kChunk, J - j0), [&](auto Q) {
              agree<T, decltype(Q)::value>(x + j0 * D * kTile, v.data() + j0 * D, b + j0 * I, I, D);
            });
          coupling_softmax(b, c + tile * kTile, J, I, leaky);
        }
        with_block<kSumTiles>(np, [&](auto P) {  // s += c u_hat, lane by lane, kSumTiles tiles at once
          weighted_sum<T, decltype(P)::value>(uh + t0 * z.tile_votes(), z.tile_votes(), c + t0 * kTile, I, J, D,
                                              acc);
        });
      }
      sum_lanes(acc, s.data(), JD);
    }
    if (bias != nullptr)
      for (int64_t e = 0; e < JD; ++e) s[e] += bias[e];
    std::copy(s.begin(), s.end(), s_out + r * s_stride);
    squash_rows(kind, s.data(), v.data(), J, D);
  }
  std::copy(v.begin(), v.end(), v_out);
}

// The gradient of one image's votes, kept factored as `_route_backward` in dynamic.py returns it:
// g[j, i, :] = kappa[j, :] + sum_t left_t[j, i] right_t[j, :], one term per use of u_hat (kappa: the first
// iteration's uniform couplings). Expanded a tile at a time where it is used, it is never stored whole.
template <typename T>
struct VoteGradient {
  std::vector<const T*> left;  // [terms] -> couplings [J, I], or a logits' gradient in saved_b
  std::vector<int64_t> row_step, tile_step;  // how far apart left[t]'s rows j and its tiles lie
  std::vector<T> right;        // [terms, JD]
  std::vector<T> kappa;        // [JD]
  // [iters - 1, n, J, kTile]: the logits' gradient of each iteration r > 0, tile-major (a tile's J rows
  // together: the gradients of u and W read them a tile at a time, and rows I apart each cost a page)
  T* saved_b;                  // not owned
  int terms = 0;

  VoteGradient(const Sizes& z, int iters, T* saved)
      : left(2 * iters), row_step(2 * iters), tile_step(2 * iters), right(2 * iters * z.JD()), kappa(z.JD()),
        saved_b(saved) {}

  // a term left[j, i] right[j, :]; left is couplings [J, I] or, `tiled`, a row of saved_b [n, J, kTile]
  void add(const T* l, const T* r, const Sizes& z, bool tiled) {
    const int64_t JD = z.JD();
    row_step[terms] = tiled ? kTile : z.I();
    tile_step[terms] = tiled ? z.J * kTile : kTile;
    left[terms] = l;
    std::copy(r, r + JD, right.begin() + terms * JD);
    ++terms;
  }

  // ask for the cache lines expand(z, tile, ...) will read: the couplings' rows lie I apart, too far for
  // the hardware prefetcher, and waiting for them was a third of the time of the gradients of u and W
  void prefetch(const Sizes& z, int64_t tile) const {
    for (int t = 0; t < terms; ++t)
      for (int64_t j = 0; j < z.J; ++j) __builtin_prefetch(left[t] + j * row_step[t] + tile * tile_step[t]);
  }

  // g of lower-capsule tile `tile`, [JD, kTile], into out
  void expand(const Sizes& z, int64_t tile, T* out) const {
    switch (terms) {  // the left factors of a row in registers when there are few (up to 5 iterations)
      case 0: expand_n<0>(z, tile, out); break;
      case 1: expand_n<1>(z, tile, out); break;
      case 2: expand_n<2>(z, tile, out); break;
      case 3: expand_n<3>(z, tile, out); break;
      case 4: expand_n<4>(z, tile, out); break;
      case 5: expand_n<5>(z, tile, out); break;
      case 6: expand_n<6>(z, tile, out); break;
      case 7: expand_n<7>(z, tile, out); break;
      case 8: expand_n<8>(z, tile, out); break;
      default: expand_n<-1>(z, tile, out); break;
    }
  }

  template <int N>  // N terms, or -1: `terms`, read at run time
  void expand_n(const Sizes& z, int64_t tile, T* out) const {
    const int64_t I = z.I(), J = z.J, D = z.D, JD = z.JD();
    for (int64_t j = 0; j < J; ++j) {
      if constexpr (N >= 0) {
        Lanes<T> L[N > 0 ? N : 1];
        for (int t = 0; t < N; ++t) L[t] = load(left[t] + j * row_step[t] + tile * tile_step[t]);
        for (int64_t d = 0; d < D; ++d) {
          Lanes<T> g = Lanes<T>{} + kappa[j * D + d];
          for (int t = 0; t < N; ++t) g += L[t] * right[t * JD + j * D + d];
          store(out + (j * D + d) * kTile, g);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          Lanes<T> g = Lanes<T>{} + kappa[j * D + d];
          for (int t = 0; t < terms; ++t)
            g += load(left[t] + j * row_step[t] + tile * tile_step[t]) * right[t * JD + j * D + d];
          store(out + (j * D + d) * kTile, g);
        }
      }
    }
  }
};

// Procedure 1 run backwards for one image whose votes uh [n, JD, kTile] are in cache: the gradient of its
// votes into `grad` (factored), the gradient of the bias on s added to grad_bias [J, D]. Mirrors
// `_route_backward` in dynamic.py. The gradient of the logits b_r (summed over the later iterations) goes
// straight into grad.saved_b's row r - 1. One pass over the votes per iteration after the first.
template <typename T>
void route_image_backward(const Sizes& z, const T* uh, const T* cs, int64_t c_stride, const T* ss,
                          int64_t s_stride, const T* grad_v, const T* grad_c, int iters, int kind, bool detach,
                          VoteGradient<T>& grad, T* grad_bias, T* acc) {
  const int64_t I = z.I(), J = z.J, D = z.D, JD = z.JD();
  std::vector<T> gv(JD), gs(JD), v_prev(JD), gc(J * kTile);
  if (grad_v != nullptr) std::copy(grad_v, grad_v + JD, gv.begin());
  std::fill(grad.kappa.begin(), grad.kappa.end(), T(0));
  grad.terms = 0;
  for (int r = iters - 1; r >= 0; --r) {
    const T* c = cs + r * c_stride;
    squash_rows_backward(kind, ss + r * s_stride, gv.data(), gs.data(), J, D);
    if (grad_bias != nullptr)
      for (int64_t e = 0; e < JD; ++e) grad_bias[e] += gs[e];
    const bool last = r == iters - 1;
    const bool through_c = last || !detach;   // u_hat's gradient through s_r = sum_i c_r u_hat
    const bool through_b = r > 0 && !detach;  // ... and through b_r = b_{r-1} + u_hat . v_{r-1}
    if (r == 0) {  // b_0 = 0 is a constant: c_0 = 1 / J for every lower capsule, nothing flows further
      if (through_c)
        for (int64_t e = 0; e < JD; ++e) grad.kappa[e] = c[0] * gs[e];
      break;
    }
    squash_rows(kind, ss + (r - 1) * s_stride, v_prev.data(), J, D);
    std::fill(acc, acc + JD * kTile, T(0));  // lanes of the gradient of v_{r-1}
    T* saved = grad.saved_b + (r - 1) * J * I;       // the gradient of b_r: b_{r+1}'s (`later`) + its own
    const T* later = last ? nullptr : saved + J * I;
    for (int64_t tile = 0; tile < z.n; ++tile) {
      const T* x = uh + tile * z.tile_votes();
      const T* ct = c + tile * kTile;
      const T* lt = later ? later + tile * J * kTile : nullptr;
      T* bt = saved + tile * J * kTile;
      T sc[kTile] = {};  // softmax backward: the gradient of b_r
      for (int64_t j = 0; j < J; ++j) {
        Lanes<T> a = (last && grad_c != nullptr) ? load(grad_c + j * I + tile * kTile) : Lanes<T>{};
        for (int64_t d = 0; d < D; ++d) a += gs[j * D + d] * load(x + (j * D + d) * kTile);
        store(gc.data() + j * kTile, a);
#pragma omp simd
        for (int t = 0; t < kTile; ++t) sc[t] += ct[j * I + t] * gc[j * kTile + t];
      }
      for (int64_t j = 0; j < J; ++j) {
        const Lanes<T> cj = load(ct + j * I);
        const Lanes<T> bj = (lt ? load(lt + j * kTile) : Lanes<T>{}) + cj * (load(gc.data() + j * kTile) - load(sc));
        store(bt + j * kTile, bj);
        for (int64_t d = 0; d < D; ++d) {  // the gradient of v_{r-1} through b_r's agreement
          const int64_t e = (j * D + d) * kTile;
          store(acc + e, load(acc + e) + bj * load(x + e));
        }
      }
    }
    sum_lanes(acc, gv.data(), JD);
    if (through_c) grad.add(c, gs.data(), z, false);
    if (through_b) grad.add(saved, v_prev.data(), z, true);
  }
}

// Images [b_begin, b_end) of one thread, kBlock at a time; make_votes(b0, nb, buf) makes the votes of
// images b0 .. b0 + nb.
template <typename T, typename MakeVotes>
void forward_range(const Sizes& z, MakeVotes&& make_votes, const T* bias, int iters, int kind, bool leaky,
                   bool keep_all, int64_t b_begin, int64_t b_end, T* v, T* cs, T* ss) {
  std::vector<T> buf(kBlock * z.image_votes()), logits(z.J * z.I()), acc(z.JD() * kTile);
  std::vector<T> c_scratch(keep_all ? 0 : z.J * z.I());
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, b_end - b0);
    make_votes(b0, nb, buf.data());
    for (int64_t bb = 0; bb < nb; ++bb) {
      const int64_t b = b0 + bb;
      route_image(z, buf.data() + bb * z.image_votes(), bias, iters, kind, leaky, logits.data(), acc.data(),
                  cs + b * z.J * z.I(), z.B * z.J * z.I(), keep_all ? nullptr : c_scratch.data(), ss + b * z.JD(),
                  z.B * z.JD(), v + b * z.JD());
    }
  }
}

// The routing backward of images [b_begin, b_end) of one thread, kBlock images' votes at a time: each image's
// vote gradient, factored, into grads[b].
template <typename T>
void route_backward_range(const Sizes& z, const T* u, const T* W, const T* cs, const T* ss, const T* grad_v,
                          const T* grad_c, int iters, int kind, bool detach, int64_t b_begin, int64_t b_end,
                          std::vector<VoteGradient<T>>& grads, T* grad_bias) {
  const int64_t JD = z.JD(), per_image = z.image_votes();
  std::vector<T> buf(kBlock * per_image), acc(JD * kTile);
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, b_end - b0);
    with_block<kBlock>(nb, [&](auto NB) { make_votes<T, decltype(NB)::value>(z, u, W, b0, buf.data()); });
    for (int64_t bb = 0; bb < nb; ++bb) {
      const int64_t b = b0 + bb;
      route_image_backward(z, buf.data() + bb * per_image, cs + b * z.J * z.I(), z.B * z.J * z.I(), ss + b * JD,
                           z.B * JD, grad_v ? grad_v + b * JD : nullptr, grad_c ? grad_c + b * z.J * z.I() : nullptr,
                           iters, kind, detach, grads[b], grad_bias, acc.data());
    }
  }
}

// The gradients of u and W of tiles [t_begin, t_end) of one thread, from every image's factored vote gradient:
// kGradBlock images at a time, the tile's W and grad_W staying in cache for all of them; grad_W written once,
// in W's own layout [I, K, JD].
template <typename T>
void votes_backward_range(const Sizes& z, const T* u, const T* W, const std::vector<VoteGradient<T>>& grads,
                          int64_t t_begin, int64_t t_end, T* grad_u, T* grad_w) {
  const int64_t KJD = z.K * z.JD();
  std::vector<T> gtile(kGradBlock * z.tile_votes()), gw(grad_w ? KJD * kTile : 0);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    for (int64_t g0 = 0; g0 < z.B; g0 += kGradBlock) {
      // the next block's factors and u (the next tile's first block after the last one) arrive while this
      // block is computed
      const bool more = g0 + kGradBlock < z.B;
      const int64_t next_tile = more ? tile : tile + 1, next_g0 = more ? g0 + kGradBlock : 0;
      if (next_tile < t_end)
        for (int64_t b = next_g0; b < std::min<int64_t>(next_g0 + kGradBlock, z.B); ++b) {
          grads[b].prefetch(z, next_tile);
          const T* ub = u + (b * z.n + next_tile) * z.K * kTile;
          for (int64_t l = 0; l < z.K * kTile; l += 64 / sizeof(T)) __builtin_prefetch(ub + l);
        }
      auto expand = [&](int bb, T* out) { grads[g0 + bb].expand(z, tile, out); };
      with_block<kGradBlock>(std::min<int64_t>(kGradBlock, z.B - g0), [&](auto NB) {
        votes_backward_tile<T, decltype(NB)::value>(z, u, W, g0, tile, expand, gtile.data(), grad_u,
                                                    grad_w ? gw.data() : nullptr, g0 > 0);
      });
    }
    if (grad_w)
      for (int64_t ke = 0; ke < KJD; ++ke)
        for (int t = 0; t < kTile; ++t) grad_w[(tile * kTile + t) * KJD + ke] = gw[ke * kTile + t];
  }
}

Sizes sizes_of(const torch::Tensor& u, const torch::Tensor& W, int64_t n_out) {
  TORCH_CHECK(u.dim() == 4 && u.size(3) == kTile && W.dim() == 4 && W.size(3) == kTile && W.size(0) == u.size(1) &&
                  W.size(1) == u.size(2),
              "fused routing: u must be [B, tiles, K, 16] and W [tiles, K, J*D, 16]");
  TORCH_CHECK(n_out > 0 && W.size(2) % n_out == 0, "fused routing: W's J*D must be a multiple of n_out");
  return Sizes{u.size(0), u.size(1), u.size(2), n_out, W.size(2) / n_out};
}

// body(part, first image, end image) for even ranges of images, one per thread of ATen's pool
template <typename F>
void for_thread_ranges(int64_t B, int64_t parts, F&& body) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) body(p, B * p / parts, B * (p + 1) / parts);
  });
}

int64_t thread_parts(int64_t B) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)); }

std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor W, c10::optional<torch::Tensor> bias,
                                   int64_t n_out, int64_t iters, int64_t kind, bool leaky,
                                   bool keep_all, bool bf16_votes) {
  TORCH_CHECK(iters >= 1, "fused routing: iters must be >= 1");
  TORCH_CHECK(!bf16_votes || (kBf16Votes && u.scalar_type() == at::kFloat),
              "fused routing: bfloat16 votes need AVX512-BF16 and float32 inputs");
  u = u.contiguous();
  W = W.contiguous();
  const Sizes z = sizes_of(u, W, n_out);
  torch::Tensor bias_c = bias.has_value() ? bias->contiguous() : torch::Tensor();
  auto v = torch::empty({z.B, z.J, z.D}, u.options());
  auto cs = torch::empty({keep_all ? iters : 1, z.B, z.J, z.I()}, u.options());
  auto ss = torch::empty({iters, z.B, z.J, z.D}, u.options());
  const int64_t K2 = (z.K + 1) / 2;
  std::vector<uint32_t> W2(bf16_votes ? z.n * K2 * z.JD() * kTile : 0);
  if (bf16_votes) pair_weight(z, W.data_ptr<float>(), W2.data());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_forward", [&] {
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* bp = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    for_thread_ranges(z.B, thread_parts(z.B), [&](int64_t, int64_t b0, int64_t b1) {
      std::vector<uint32_t> upairs(bf16_votes ? kBlock * K2 * kTile : 0);
      auto votes = [&](int64_t first, int64_t nb, scalar_t* buf) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (bf16_votes)
            return with_block<kBlock>(nb, [&](auto NB) {
              make_votes_bf16<decltype(NB)::value>(z, up, W2.data(), first, buf, upairs.data());
            });
        }
#endif
        with_block<kBlock>(nb, [&](auto NB) { make_votes<scalar_t, decltype(NB)::value>(z, up, wp, first, buf); });
      };
      forward_range<scalar_t>(z, votes, bp, iters, kind, leaky, keep_all, b0, b1, v.data_ptr<scalar_t>(),
                              cs.data_ptr<scalar_t>(), ss.data_ptr<scalar_t>());
    });
  });
  return {v, cs, ss};
}

std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor W, torch::Tensor cs, torch::Tensor ss,
                                    c10::optional<torch::Tensor> grad_v, c10::optional<torch::Tensor> grad_c,
                                    int64_t n_out, int64_t kind, bool detach, bool need_u, bool need_w,
                                    bool need_bias) {
  u = u.contiguous();
  W = W.contiguous();
  cs = cs.contiguous();
  ss = ss.contiguous();
  const Sizes z = sizes_of(u, W, n_out);
  const int64_t iters = cs.size(0), parts = thread_parts(z.B);
  torch::Tensor gv = grad_v.has_value() ? grad_v->contiguous() : torch::Tensor();
  torch::Tensor gc = grad_c.has_value() ? grad_c->contiguous() : torch::Tensor();
  auto grad_u = need_u ? torch::empty({z.B, z.I(), z.K}, u.options()) : torch::Tensor();
  auto grad_w = need_w ? torch::empty({z.I(), z.K, z.JD()}, u.options()) : torch::Tensor();
  auto grad_bias_parts = torch::zeros({parts, z.J, z.D}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_backward", [&] {
    const scalar_t* gvp = gv.defined() ? gv.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gcp = gc.defined() ? gc.data_ptr<scalar_t>() : nullptr;
    // 1. the routing backward, images split between threads: every image's vote gradient, factored (the
    // logits' gradients left uninitialised: the routing backward writes them all)
    auto saved_b = torch::empty({z.B, std::max<int64_t>(iters - 1, 1), z.n, z.J, kTile}, u.options());
    std::vector<VoteGradient<scalar_t>> grads;
    grads.reserve(z.B);
    for (int64_t b = 0; b < z.B; ++b)
      grads.emplace_back(z, iters, saved_b.data_ptr<scalar_t>() + b * saved_b.stride(0));
    for_thread_ranges(z.B, parts, [&](int64_t p, int64_t b0, int64_t b1) {
      route_backward_range<scalar_t>(z, u.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                                     ss.data_ptr<scalar_t>(), gvp, gcp, iters, kind, detach, b0, b1, grads,
                                     grad_bias_parts.data_ptr<scalar_t>() + p * z.JD());
    });
    // 2. the gradients of u and W, tiles of lower capsules split between threads
    if (need_u || need_w)
      at::parallel_for(0, z.n, 1, [&](int64_t t0, int64_t t1) {
        votes_backward_range<scalar_t>(z, u.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), grads, t0, t1,
                                       need_u ? grad_u.data_ptr<scalar_t>() : nullptr,
                                       need_w ? grad_w.data_ptr<scalar_t>() : nullptr);
      });
  });
  auto grad_bias = need_bias ? grad_bias_parts.sum(0) : torch::Tensor();
  return {grad_u, grad_w, grad_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "votes and dynamic routing, fused: (v, c of every iteration or the last, every s)");
  m.def("backward", &backward, "gradients of u, W and the bias on s of the fused routing");
  m.def("has_bf16_votes", [] { return kBf16Votes; }, "whether forward can make bfloat16 votes (AVX512-BF16)");
  m.def("channel_squash_forward", &capsnet::channel_squash_forward,
        "PrimaryCaps' squash from its convolution's channels: y [B, C*K, H, W] -> u [B, C*H*W, K]");
  m.def("channel_squash_backward", &capsnet::channel_squash_backward, "the gradient of y of channel_squash_forward");
}
