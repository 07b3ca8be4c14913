// Fused scaled-dot-product attention on the CPU (docs/attention.md is the contract).
//
// FlashAttention-style tiling: no L x S matrix ever exists. A block of query rows meets the keys
// one block at a time; each tile product is a small GEMM done by one register-blocked
// micro-kernel (below), so all extra memory is a few tiles per thread plus O(L) per head.
// Scores are kept in log2 units (q is pre-multiplied by scale * log2(e)), so every
// exponential is a vectorized 2^x.
//
// Forward, per query block, over the key blocks j (online softmax, per query row i):
//   s_ij  = log2(e) * (scale <q_i, k_j> + mask_ij)        (-inf where masked or j > i if causal)
//   m'_i  = max(m_i, max_j s_ij)       alpha_i = 2^(m_i - m'_i)       p_ij = 2^(s_ij - m'_i)
//   l'_i  = alpha_i l_i + sum_j p_ij   acc_i = alpha_i acc_i + sum_j p_ij z_ij r v_j
// and at the end out_i = acc_i / l_i, lse_i = ln(2) (m_i + log2 l_i); a row that met only -inf
// keeps m = -inf (0 stands in for it in the exponents, so p = alpha = 0): out 0, lse +inf.
// The score tile is held transposed (keys x queries) so that the per-row max and sum are plain
// vector operations across queries; the tile products are then
//   S^T = K (scale log2e Q)^T   and   acc = diag(alpha) acc + P V   (P read from S^T),
// and the first one also hands back the column maxima (unless causal or a mask edits the tile).
//
// Backward (FlashAttention-2): D_i = sum_e dout_ie out_ie first; then each work item owns a
// (batch, kv head, key chunk) and walks its key blocks; for each key block it visits every
// query block of every query head in the group, in a fixed order:
//   p_ij  = 2^(s_ij - log2(e) lse_i)                 (lse = +inf gives p = 0: empty rows)
//   dv_j += sum_i p_ij z_ij r dout_i        dp_ij = <dout_i, v_j> z_ij r
//   ds_ij = p_ij (dp_ij - D_i)
//   dk_j += scale sum_i ds_ij q_i           dq_i += scale sum_j ds_ij k_j
// dk/dv of a key block are finished in per-thread float32 tiles before the item moves on; dq
// rows are accumulated in float32 per key chunk, the chunk partials summed in chunk order last.
// The number of chunks depends only on the shapes, never on the thread count, and every sum
// runs in a fixed order, so the gradients are bit-identical for any number of threads.
//
// Causal masking and sliding windows are one rule (Window below): query i may attend key j iff
// d = j - i - off lies within [-left, right] (a bound of -1 is none; causal is right = 0; off =
// S - L for the lower-right diagonal, else 0); only the key (query) blocks that hold such pairs
// are visited and only tiles that cross a bound are edited. Soft-capping replaces the scaled
// scores s by softcap tanh(s / softcap) before any mask, and multiplies ds by 1 - tanh^2.
//
// Varlen (packed sequences of different lengths, fastlm.varlen_attention) runs the same two
// drivers: each (batch, head) item gets a base row and a length from the sequence offsets
// (Problem::seq), and work past a sequence's end is skipped; nothing is padded.
//
// Dropout bits come from the shared Philox helpers (attention.h), regenerated in the backward.
// The vector code is written with GCC vector extensions (8 floats) and compiled for
// x86-64-v4, x86-64-v3 (AVX2 + FMA) and baseline x86-64 (target_clones), picked at load time.

#if defined(__GNUC__) && !defined(__clang__)
// setup.py passes -ffp-contract=off for the LayerNorm backward; the tile products here are
// written as a * b + c on vectors and must become fused multiply-adds to run at full speed.
#pragma GCC optimize("fp-contract=fast")
// The 8-float vectors only pass between always_inline functions, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../attention.h"

#include "isa.h"  // FASTLM_CLONES, FASTLM_INLINE

namespace fastlm {
namespace {

// ---------------------------------------------------------------------------------------------
// Vectors of 8 floats.
constexpr int W = 8;
typedef float vf __attribute__((vector_size(4 * W)));
typedef float vfu __attribute__((vector_size(4 * W), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

FASTLM_INLINE vf vld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
FASTLM_INLINE void vst(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
FASTLM_INLINE vf vset(float x) { return vf{} + x; }
FASTLM_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.6931471805599453;
constexpr float kInf = std::numeric_limits<float>::infinity();

// 2^x, for the x <= ~0 of this file. x = n + f with n = round(x) and |f| <= 1/2; 2^f by a
// degree-6 polynomial fitted for relative error (1e-7 in float arithmetic), 2^n by adding n to
// the exponent field. x is first clamped to [-127, 126] with two integer mins on its bits
// (signed min caps positive floats; negative floats order by magnitude as unsigned ints), and
// at x = -127 the result is exactly +0: so 2^-inf = 0 (results below 2^-126 are not accurate,
// nor do they need to be: they are added to sums >= 1).
FASTLM_INLINE vf vexp2(vf x) {
  vi xi = reinterpret_cast<vi>(x);
  const vi hi = vi{} + 0x42FC0000;  // 126.f
  xi = xi < hi ? xi : hi;
  vu xu = reinterpret_cast<vu>(xi);
  const vu lo = vu{} + 0xC2FE0000u;  // -127.f
  xu = xu < lo ? xu : lo;
  const vf xc = reinterpret_cast<vf>(xu);
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: x + magic rounds x to an integer
  const vf t = xc + magic;
  const vf f = xc - (t - magic);
  vf p = vset(1.5370704932138324e-4f);
  p = p * f + 1.3399848248809576e-3f;
  p = p * f + 9.618373587727547e-3f;
  p = p * f + 5.550329014658928e-2f;
  p = p * f + 2.4022647738456726e-1f;
  p = p * f + 6.931471824645996e-1f;
  p = p * f + 1.f;
  const vi n = reinterpret_cast<vi>(t) - reinterpret_cast<vi>(magic);
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p) + (n << 23));
}

// ---------------------------------------------------------------------------------------------
// Tile product C (M x N) = C0 + A (M x K) B (K x N), everything float32.
//   A(r, k) = A[r * ars + k * aks]  (any strides: it is read one scalar at a time, broadcast)
//   B       row-major, row stride ldb, N a multiple of W (rows padded with zeros)
//   C0      0 (kSet), C (kAdd), or diag(rs) C (kScaleAdd, the online-softmax rescale)
//   cmax    optional: cmax[c] = max(cmax[c], max_r C[r][c]) (the forward's score maxima)
// The micro-kernel keeps a kMR x (kNR * W) block of C in 12 vector registers and streams
// k: per step kNR vector loads of B, kMR broadcasts of A, kMR * kNR fused multiply-adds.
enum GemmMode { kSet = 0, kAdd = 1, kScaleAdd = 2 };
constexpr int kMR = 6, kNR = 2;

template <int MR, int NR>
FASTLM_INLINE void micro(int64_t K, const float* __restrict A, int64_t ars, int64_t aks,
                         const float* __restrict B, int64_t ldb, float* __restrict C,
                         int64_t ldc, int mode, const float* __restrict rs,
                         float* __restrict cmax) {
  vf acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const float sr = mode == kScaleAdd ? rs[r] : 1.f;
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[r][n] = mode == kSet ? vf{} : vld(C + r * ldc + n * W) * sr;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* a = A + k * aks;
    const float* b = B + k * ldb;
    vf bv[NR];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) bv[n] = vld(b + n * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r * ars];
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[r][n] += bv[n] * ar;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) vst(C + r * ldc + n * W, acc[r][n]);
  if (cmax) {
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) {
      vf mx = vld(cmax + n * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) mx = vmax(mx, acc[r][n]);
      vst(cmax + n * W, mx);
    }
  }
}

FASTLM_CLONES void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars,
                        int64_t aks, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int mode, const float* rs, float* cmax) {
  // Column panels outermost: the K x 16 panel of B stays in L1 while the row blocks pass.
  for (int64_t n0 = 0; n0 < N; n0 += kNR * W) {
    const bool two = N - n0 >= 2 * W;
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = int(std::min<int64_t>(kMR, M - m0));
      const float* a = A + m0 * ars;
      const float* b = B + n0;
      float* c = C + m0 * ldc + n0;
      const float* s = rs ? rs + m0 : nullptr;
      float* x = cmax ? cmax + n0 : nullptr;
#define FASTLM_MK(R)                                                    \
  case R:                                                               \
    if (two) micro<R, 2>(K, a, ars, aks, b, ldb, c, ldc, mode, s, x);   \
    else micro<R, 1>(K, a, ars, aks, b, ldb, c, ldc, mode, s, x);       \
    break;
      switch (mr) {
        FASTLM_MK(1) FASTLM_MK(2) FASTLM_MK(3) FASTLM_MK(4) FASTLM_MK(5) FASTLM_MK(6)
      }
#undef FASTLM_MK
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Softmax pieces (float32 tiles, no dtype).

// One key block of the forward's online softmax on the transposed score tile St: nk rows (keys)
// of nv vectors (queries), row stride ld, log2 units; m, l, alpha hold nv vectors. tmax holds
// the tile's column maxima when the tile product already found them, else null. St becomes
// p (times the dropout factor zr, same layout, when given); l counts p before dropout.
template <bool kZ>
FASTLM_INLINE void softmax_cols(float* St, int64_t nk, int64_t nv, int64_t ld, float* m,
                                float* l, float* alpha, const float* zr, const float* tmax) {
  for (int64_t c = 0; c < nv * W; c += W) {
    vf mx;
    if (tmax) {
      mx = vld(tmax + c);
    } else {
      mx = vset(-kInf);
      for (int64_t j = 0; j < nk; ++j) mx = vmax(mx, vld(St + j * ld + c));
    }
    const vf m_old = vld(m + c);
    const vf m_new = vmax(m_old, mx);
    // A column that has seen only -inf so far: subtract 0 instead of -inf (p = alpha = 0).
    const vf m_use = m_new == vset(-kInf) ? vf{} : m_new;
    const vf a = vexp2(m_old - m_use);
    vf sum0 = vf{}, sum1 = vf{};
    int64_t j = 0;
    for (; j + 1 < nk; j += 2) {
      float* s0 = St + j * ld + c;
      float* s1 = s0 + ld;
      const vf p0 = vexp2(vld(s0) - m_use);
      const vf p1 = vexp2(vld(s1) - m_use);
      sum0 += p0;
      sum1 += p1;
      vst(s0, kZ ? p0 * vld(zr + j * ld + c) : p0);
      vst(s1, kZ ? p1 * vld(zr + (j + 1) * ld + c) : p1);
    }
    if (j < nk) {
      float* s0 = St + j * ld + c;
      const vf p0 = vexp2(vld(s0) - m_use);
      sum0 += p0;
      vst(s0, kZ ? p0 * vld(zr + j * ld + c) : p0);
    }
    vst(l + c, vld(l + c) * a + (sum0 + sum1));
    vst(m + c, m_new);
    vst(alpha + c, a);
  }
}

FASTLM_CLONES void softmax_tile(float* St, int64_t nk, int64_t nv, int64_t ld, float* m,
                                float* l, float* alpha, const float* zr, const float* tmax) {
  if (zr) softmax_cols<true>(St, nk, nv, ld, m, l, alpha, zr, tmax);
  else softmax_cols<false>(St, nk, nv, ld, m, l, alpha, zr, tmax);
}

// The backward's probabilities and score gradients on a tile (ni rows = queries, nv vectors of
// keys, row stride ld): S (log2 units) becomes p z r (what dv needs), dP becomes
// ds = p (dp z r - D). zr (same layout) is the dropout factor z r, or null.
FASTLM_CLONES void bwd_tile(float* S, float* dP, int64_t ni, int64_t nv, int64_t ld,
                            const float* lse, const float* D, const float* zr) {
  for (int64_t i = 0; i < ni; ++i) {
    const float l2 = lse[i] * kLog2e;  // +inf for an empty row: p = 0
    const float d = D[i];
    float* s = S + i * ld;
    float* dp = dP + i * ld;
    const float* z = zr ? zr + i * ld : nullptr;
    for (int64_t c = 0; c < nv * W; c += W) {
      const vf p = vexp2(vld(s + c) - l2);
      if (z) {
        const vf zc = vld(z + c);
        vst(dp + c, p * (vld(dp + c) * zc - d));
        vst(s + c, p * zc);
      } else {
        vst(dp + c, p * (vld(dp + c) - d));
        vst(s + c, p);
      }
    }
  }
}

// zr[ii * si + jj * sj] = r if key j0 + jj is kept for query i0 + ii, else 0 (the contract's
// bits: one Philox call per query and group of 8 keys; j0 is a multiple of 8). Either si or
// sj is 1; the factors go out as vectors along that dimension. Along queries (si = 1) the
// store covers round_up(ni, W) queries; along keys (sj = 1), round_up(nk, W) keys.
FASTLM_CLONES void dropout_tile(float* zr, int64_t si, int64_t sj, int64_t ni, int64_t nk,
                                int64_t i0, int64_t j0, uint32_t bh, uint64_t seed,
                                uint64_t offset, uint32_t thresh, float r) {
  const vf rv = vset(r), zero = vf{};
  vi lane;
  for (int t = 0; t < W; ++t) lane[t] = t;
  for (int64_t jj0 = 0; jj0 < nk; jj0 += 8) {
    const uint32_t group = uint32_t((j0 + jj0) >> 3);
    if (sj == 1) {
      // One query at a time: its 8 keep bits become 8 consecutive factors.
      for (int64_t ii = 0; ii < ni; ++ii) {
        const vi keep = vi{} + int32_t(dropout_keep8(seed, offset, bh, uint32_t(i0 + ii), group,
                                                     thresh));
        vst(zr + ii * si + jj0, ((keep >> lane) & 1) != 0 ? rv : zero);
      }
    } else {
      // Eight queries at a time: for each key of the group, a vector of their bits.
      const int64_t kend = std::min<int64_t>(8, nk - jj0);
      for (int64_t ii0 = 0; ii0 < ni; ii0 += W) {
        vi keep;
        for (int t = 0; t < W; ++t)
          keep[t] = int32_t(dropout_keep8(seed, offset, bh, uint32_t(i0 + ii0 + t), group, thresh));
        for (int64_t kk = 0; kk < kend; ++kk)
          vst(zr + (jj0 + kk) * sj + ii0, ((keep >> int32_t(kk)) & 1) != 0 ? rv : zero);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Moving tiles between the inputs' dtypes and float32.
FASTLM_INLINE float to_f(float v) { return v; }
FASTLM_INLINE float to_f(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#if defined(__FLT16_MAX__)
// Through the compiler's _Float16: one F16C instruction in the x86-64-v3/v4 clones (c10's
// portable bit manipulation costs more than the tile products for half inputs).
FASTLM_INLINE float to_f(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return float(h);
}
FASTLM_INLINE c10::Half half_from_f(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even, as c10
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return c10::Half(bits, c10::Half::from_bits());
}
#else
FASTLM_INLINE float to_f(c10::Half v) { return static_cast<float>(v); }
FASTLM_INLINE c10::Half half_from_f(float f) { return c10::Half(f); }
#endif

template <typename T>
FASTLM_INLINE T from_f(float f) {
  if constexpr (std::is_same_v<T, c10::Half>) return half_from_f(f);
  else return static_cast<T>(f);  // float, or c10's round-to-nearest-even bfloat16
}

FASTLM_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[r * ldd + c] = mul * src[r * lds + c] for c < cols, then zeros up to a multiple of W.
template <typename T>
FASTLM_INLINE void load_rows(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                             int64_t ldd, float mul) {
  const int64_t cp = round_up(cols, W);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * lds;
    float* d = dst + r * ldd;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = mul * to_f(s[c]);
    for (int64_t c = cols; c < cp; ++c) d[c] = 0.f;
  }
}

// dst[c * ldd + r] = mul * src[r * lds + c] (transposed) for r < rows, then zeros up to a
// multiple of W along r.
template <typename T>
FASTLM_INLINE void load_cols(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                             int64_t ldd, float mul) {
  const int64_t rp = round_up(rows, W);
  for (int64_t r0 = 0; r0 < rp; r0 += W) {
    const int64_t nr = std::min<int64_t>(W, rows - r0);
    for (int64_t c = 0; c < cols; ++c) {
      float* d = dst + c * ldd + r0;
      for (int64_t r = 0; r < W; ++r) d[r] = r < nr ? mul * to_f(src[(r0 + r) * lds + c]) : 0.f;
    }
  }
}

// dst[r * ldd + c] = src[r * lds + c] * mul * rowmul[r] (rowmul optional), rounded to T.
template <typename T>
FASTLM_INLINE void store_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, T* dst,
                              int64_t ldd, float mul, const float* rowmul) {
  for (int64_t r = 0; r < rows; ++r) {
    const float f = rowmul ? mul * rowmul[r] : mul;
    const float* s = src + r * lds;
    T* d = dst + r * ldd;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = from_f<T>(s[c] * f);
  }
}

// D[r] = sum_c a[r * lda + c] * b[r * ldb + c] in float32.
template <typename T>
FASTLM_INLINE void dot_rows(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows,
                            int64_t cols, float* D) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = a + r * lda;
    const T* y = b + r * ldb;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) s += to_f(x[c]) * to_f(y[c]);
    D[r] = s;
  }
}

// One cloned copy of the dtype-dependent helpers per input dtype, gathered as Cvt<T>.
template <typename T>
struct Cvt;
#define FASTLM_ATTN_CONVERT(T, tag)                                                             \
  FASTLM_CLONES void load_rows_##tag(const T* src, int64_t lds, int64_t rows, int64_t cols,    \
                                     float* dst, int64_t ldd, float mul) {                     \
    load_rows(src, lds, rows, cols, dst, ldd, mul);                                             \
  }                                                                                             \
  FASTLM_CLONES void load_cols_##tag(const T* src, int64_t lds, int64_t rows, int64_t cols,    \
                                     float* dst, int64_t ldd, float mul) {                     \
    load_cols(src, lds, rows, cols, dst, ldd, mul);                                             \
  }                                                                                             \
  FASTLM_CLONES void store_rows_##tag(const float* src, int64_t lds, int64_t rows, int64_t cols, \
                                      T* dst, int64_t ldd, float mul, const float* rowmul) {   \
    store_rows(src, lds, rows, cols, dst, ldd, mul, rowmul);                                    \
  }                                                                                             \
  FASTLM_CLONES void dot_rows_##tag(const T* a, int64_t lda, const T* b, int64_t ldb,          \
                                    int64_t rows, int64_t cols, float* D) {                    \
    dot_rows(a, lda, b, ldb, rows, cols, D);                                                    \
  }                                                                                             \
  template <>                                                                                   \
  struct Cvt<T> {                                                                               \
    static void load_rows(const T* s, int64_t lds, int64_t r, int64_t c, float* d, int64_t ldd, \
                          float mul) {                                                          \
      load_rows_##tag(s, lds, r, c, d, ldd, mul);                                               \
    }                                                                                           \
    static void load_cols(const T* s, int64_t lds, int64_t r, int64_t c, float* d, int64_t ldd, \
                          float mul) {                                                          \
      load_cols_##tag(s, lds, r, c, d, ldd, mul);                                               \
    }                                                                                           \
    static void store_rows(const float* s, int64_t lds, int64_t r, int64_t c, T* d,             \
                           int64_t ldd, float mul, const float* rowmul) {                       \
      store_rows_##tag(s, lds, r, c, d, ldd, mul, rowmul);                                      \
    }                                                                                           \
    static void dot_rows(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t r,           \
                         int64_t c, float* D) {                                                 \
      dot_rows_##tag(a, lda, b, ldb, r, c, D);                                                  \
    }                                                                                           \
  };
FASTLM_ATTN_CONVERT(float, f32)
FASTLM_ATTN_CONVERT(c10::Half, f16)
FASTLM_ATTN_CONVERT(c10::BFloat16, bf16)
#undef FASTLM_ATTN_CONVERT

// ---------------------------------------------------------------------------------------------
// Masks. A tile of the score matrix lives in a float buffer at S[ii * si + jj * sj] (query ii,
// key jj) with si or sj equal to 1; the mask tile at m[ii * smi + jj * smj], any strides (0 on
// broadcast dims).
enum MaskKind { kMaskSkip = 0, kMaskNoop = 1, kMaskApply = 2 };
enum MaskType { kNoMask, kMaskBool, kMaskF32, kMaskF16, kMaskBF16 };

// Mask values as (may attend, additive value): bool as stored (0/1 bytes), others as floats.
FASTLM_INLINE int mask_open(bool v) { return v; }
FASTLM_INLINE int mask_change(bool v) { return !v; }
template <typename M>
FASTLM_INLINE int mask_open(M v) {
  return to_f(v) != -kInf;
}
template <typename M>
FASTLM_INLINE int mask_change(M v) {
  return to_f(v) != 0.f;
}
// What the mask does on a tile: nothing may be attended (skip the tile: it adds exactly zero
// everywhere), nothing changes (bool all True, additive all 0), or it must be applied.
template <typename M>
FASTLM_INLINE int mask_kind_t(const M* m, int64_t smi, int64_t smj, int64_t ni, int64_t nk) {
  int open = 0, change = 0;
  const int64_t n = smj == 0 ? 1 : nk;  // a key-broadcast row holds one value
  for (int64_t ii = 0; ii < ni; ++ii) {
    const M* row = m + ii * smi;
    if (smj <= 1) {
#pragma omp simd reduction(| : open, change)
      for (int64_t jj = 0; jj < n; ++jj) {
        open |= mask_open(row[jj]);
        change |= mask_change(row[jj]);
      }
    } else {
      for (int64_t jj = 0; jj < n; ++jj) {
        open |= mask_open(row[jj * smj]);
        change |= mask_change(row[jj * smj]);
      }
    }
    if (open && change) return kMaskApply;
  }
  return !open ? kMaskSkip : (change ? kMaskApply : kMaskNoop);
}

// The mask as an additive score bias in log2 units: bool -> 0 (True) or -inf (False), which
// is exact (s + 0 = s, s + -inf = -inf); additive -> log2(e) * mask. bias8 reads the values
// p[t * stride] of lanes t < cnt (lane 0's value beyond), with vector loads when they are
// contiguous.
template <typename M>
FASTLM_INLINE vf bias8(const M* p, int64_t stride, int64_t cnt) {
  const bool contiguous = stride == 1 && cnt >= W;
  if constexpr (std::is_same_v<M, bool>) {
    vi v;
    if (contiguous) {
      typedef uint8_t v8u8 __attribute__((vector_size(W)));
      v8u8 b;
      std::memcpy(&b, p, W);
      v = __builtin_convertvector(b, vi);
    } else {
      for (int t = 0; t < W; ++t) v[t] = p[t < cnt ? t * stride : 0];
    }
    return v != 0 ? vf{} : vset(-kInf);
  } else if constexpr (std::is_same_v<M, float>) {
    if (contiguous) return vld(p) * kLog2e;
    vf v;
    for (int t = 0; t < W; ++t) v[t] = p[t < cnt ? t * stride : 0];
    return v * kLog2e;
  } else if constexpr (std::is_same_v<M, c10::BFloat16>) {
    vu v;
    if (contiguous) {
      typedef uint16_t v8u16 __attribute__((vector_size(2 * W)));
      v8u16 b;
      std::memcpy(&b, p, 2 * W);
      v = __builtin_convertvector(b, vu);
    } else {
      for (int t = 0; t < W; ++t) v[t] = p[t < cnt ? t * stride : 0].x;
    }
    return reinterpret_cast<vf>(v << 16) * kLog2e;
  } else {
    vf v;
    for (int t = 0; t < W; ++t) v[t] = to_f(p[t < cnt ? t * stride : 0]);
    return v * kLog2e;
  }
}

// 8 x 8 transpose: c[k] = (r[0][k], ..., r[7][k]).
FASTLM_INLINE void transpose8(vf* r) {
  const vi lo2 = {0, 8, 1, 9, 4, 12, 5, 13}, hi2 = {2, 10, 3, 11, 6, 14, 7, 15};
  const vi lo4 = {0, 1, 8, 9, 4, 5, 12, 13}, hi4 = {2, 3, 10, 11, 6, 7, 14, 15};
  const vi lo8 = {0, 1, 2, 3, 8, 9, 10, 11}, hi8 = {4, 5, 6, 7, 12, 13, 14, 15};
  vf t[8], u[8];
  for (int a = 0; a < 8; a += 2) {
    t[a] = __builtin_shuffle(r[a], r[a + 1], lo2);
    t[a + 1] = __builtin_shuffle(r[a], r[a + 1], hi2);
  }
  for (int a = 0; a < 8; a += 4) {
    u[a] = __builtin_shuffle(t[a], t[a + 2], lo4);
    u[a + 1] = __builtin_shuffle(t[a], t[a + 2], hi4);
    u[a + 2] = __builtin_shuffle(t[a + 1], t[a + 3], lo4);
    u[a + 3] = __builtin_shuffle(t[a + 1], t[a + 3], hi4);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], lo8);
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], hi8);
  }
}

// Adds the mask bias to the score tile, eight scores at a time along the tile's contiguous
// dimension (keys in the backward; queries in the transposed forward tile, where 8 x 8 blocks
// read along the mask's rows are transposed in registers). The padding up to a multiple of W
// along that dimension is written too.
template <typename M>
FASTLM_INLINE void mask_apply_t(float* S, int64_t si, int64_t sj, const M* m, int64_t smi,
                                int64_t smj, int64_t ni, int64_t nk) {
  if (sj == 1) {
    for (int64_t ii = 0; ii < ni; ++ii)
      for (int64_t jj = 0; jj < nk; jj += W) {
        float* s = S + ii * si + jj;
        vst(s, vld(s) + bias8(m + ii * smi + jj * smj, smj, nk - jj));
      }
  } else {
    for (int64_t ii = 0; ii < ni; ii += W)
      for (int64_t jj = 0; jj < nk; jj += W) {
        vf r[W];
        for (int t = 0; t < W; ++t) {
          const int64_t row = ii + t < ni ? ii + t : ii;
          r[t] = bias8(m + row * smi + jj * smj, smj, nk - jj);
        }
        transpose8(r);
        const int64_t kend = std::min<int64_t>(W, nk - jj);
        for (int64_t k = 0; k < kend; ++k) {
          float* s = S + (jj + k) * sj + ii;
          vst(s, vld(s) + r[k]);
        }
      }
  }
}

#define FASTLM_ATTN_MASK(M, tag)                                                              \
  FASTLM_CLONES int mask_kind_##tag(const void* m, int64_t smi, int64_t smj, int64_t ni,       \
                                    int64_t nk) {                                             \
    return mask_kind_t(static_cast<const M*>(m), smi, smj, ni, nk);                           \
  }                                                                                           \
  FASTLM_CLONES void mask_apply_##tag(float* S, int64_t si, int64_t sj, const void* m,         \
                                      int64_t smi, int64_t smj, int64_t ni, int64_t nk) {     \
    mask_apply_t(S, si, sj, static_cast<const M*>(m), smi, smj, ni, nk);                      \
  }
FASTLM_ATTN_MASK(bool, b8)
FASTLM_ATTN_MASK(float, f32)
FASTLM_ATTN_MASK(c10::Half, f16)
FASTLM_ATTN_MASK(c10::BFloat16, bf16)
#undef FASTLM_ATTN_MASK

struct MaskView {
  const void* ptr = nullptr;
  MaskType type = kNoMask;
  int64_t s[4] = {0, 0, 0, 0};
  int64_t elem_size() const { return type == kMaskBool ? 1 : (type == kMaskF32 ? 4 : 2); }
  // The tile of (b, h) at rows i0.., keys j0.. (element pointer, typed by `type`).
  const char* at(int64_t b, int64_t h, int64_t i0, int64_t j0) const {
    return static_cast<const char*>(ptr) +
           (b * s[0] + h * s[1] + i0 * s[2] + j0 * s[3]) * elem_size();
  }
  // Asks for a tile's mask rows ahead of use (into L2); rows with a key stride are left alone.
  void prefetch(int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t ni, int64_t nk) const {
    if (type == kNoMask || s[3] != 1 || ni <= 0) return;
    const char* p = at(b, h, i0, j0);
    const int64_t row = s[2] * elem_size(), bytes = nk * elem_size();
    for (int64_t ii = 0; ii < ni; ++ii)
      for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + ii * row + c, 0, 2);
  }
  int kind(const char* p, int64_t ni, int64_t nk) const {
    switch (type) {
      case kMaskBool: return mask_kind_b8(p, s[2], s[3], ni, nk);
      case kMaskF32: return mask_kind_f32(p, s[2], s[3], ni, nk);
      case kMaskF16: return mask_kind_f16(p, s[2], s[3], ni, nk);
      case kMaskBF16: return mask_kind_bf16(p, s[2], s[3], ni, nk);
      default: return kMaskNoop;
    }
  }
  void apply(float* S, int64_t si, int64_t sj, const char* p, int64_t ni, int64_t nk) const {
    switch (type) {
      case kMaskBool: mask_apply_b8(S, si, sj, p, s[2], s[3], ni, nk); break;
      case kMaskF32: mask_apply_f32(S, si, sj, p, s[2], s[3], ni, nk); break;
      case kMaskF16: mask_apply_f16(S, si, sj, p, s[2], s[3], ni, nk); break;
      case kMaskBF16: mask_apply_bf16(S, si, sj, p, s[2], s[3], ni, nk); break;
      default: break;
    }
  }
};

// Causal and sliding windows (docs/attention.md): query i may attend key j iff d = j - i - off
// has d <= right (unless right < 0) and d >= -left (unless left < 0); off = S - L of the
// (sequence's) lengths for the lower-right diagonal, else 0. Top-left causal is
// {left -1, right 0}.
struct Window {
  int64_t left = -1, right = -1;
  bool lower_right = false;
  bool on() const { return left >= 0 || right >= 0; }
  int64_t off(int64_t L, int64_t S) const { return lower_right ? S - L : 0; }
  // Keys [lo, hi) that some query of [i0, i0 + ni) may attend, of S (hi <= lo: none).
  void keys(int64_t i0, int64_t ni, int64_t S, int64_t off, int64_t& lo, int64_t& hi) const {
    lo = left >= 0 ? std::max<int64_t>(0, i0 + off - left) : 0;
    hi = right >= 0 ? std::min<int64_t>(S, i0 + ni + off + right) : S;
  }
  // Queries [lo, hi) that may attend some key of [j0, j0 + nk), of L.
  void queries(int64_t j0, int64_t nk, int64_t L, int64_t off, int64_t& lo,
               int64_t& hi) const {
    lo = right >= 0 ? std::max<int64_t>(0, j0 - off - right) : 0;
    hi = left >= 0 ? std::min<int64_t>(L, j0 + nk - off + left) : L;
  }
  // Whether every (query, key) of the tile may attend (no edit needed).
  bool full(int64_t i0, int64_t ni, int64_t j0, int64_t nk, int64_t off) const {
    return (right < 0 || j0 + nk - 1 - i0 - off <= right) &&
           (left < 0 || i0 + ni - 1 - j0 + off <= left);
  }
  // -inf on the tile S[ii * si + jj * sj] (query i0 + ii, key j0 + jj) where not allowed.
  void apply(float* S, int64_t si, int64_t sj, int64_t ni, int64_t nk, int64_t i0, int64_t j0,
             int64_t off) const {
    for (int64_t ii = 0; ii < ni; ++ii) {
      const int64_t d0 = j0 - (i0 + ii) - off;  // d of key jj = 0
      const int64_t jlo = left >= 0 ? std::max<int64_t>(0, -left - d0) : 0;
      const int64_t jhi = right >= 0 ? std::min<int64_t>(nk, right - d0 + 1) : nk;
      for (int64_t jj = 0; jj < nk; ++jj)
        if (jj < jlo || jj >= jhi) S[ii * si + jj * sj] = -kInf;
    }
  }
};

// tanh in float32 (Cephes tanhf): an odd polynomial below |x| = 0.625 (relative error ~1e-7),
// 1 - 2 / (e^(2|x|) + 1) above (vexp2 saturates at 2^126, where the result is 1).
FASTLM_INLINE vf vtanh(vf x) {
  const vf zero = vf{};
  const vf a = x < zero ? -x : x;
  const vf z = x * x;
  vf p = vset(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf small = p * z * x + x;
  vf big = 1.f - 2.f / (vexp2(a * 2.8853900817779268f) + 1.f);
  big = x < zero ? -big : big;
  return a < vset(0.625f) ? small : big;
}

// Soft-capping of n rows of nc scores (nc a multiple of W; row stride ld; log2 units):
// s = c tanh(s / c) with c = softcap * log2(e); t (same layout, or null) gets tanh(s / c) for
// the backward.
FASTLM_CLONES void softcap_tile(float* S, int64_t n, int64_t nc, int64_t ld, float c,
                                float* t) {
  const vf inv = vset(1.f / c), cv = vset(c);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < nc; j += W) {
      const vf th = vtanh(vld(S + r * ld + j) * inv);
      vst(S + r * ld + j, cv * th);
      if (t) vst(t + r * ld + j, th);
    }
}

// ds by the uncapped scores: ds *= 1 - t^2 on n rows of nc (a multiple of W), row stride ld.
FASTLM_CLONES void softcap_grad(float* dS, const float* t, int64_t n, int64_t nc, int64_t ld) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < nc; j += W) {
      const vf th = vld(t + r * ld + j);
      vst(dS + r * ld + j, vld(dS + r * ld + j) * (1.f - th * th));
    }
}

// ---------------------------------------------------------------------------------------------
// The problem, as the drivers see it: element strides of dims 0..2 (dim 3 has stride 1).
//
// Dense: batch b is its own (Hq, L, E) problem. Varlen (packed sequences, cu_q non-null): the
// operands are the views (1, H, total, dim) of the packed (total, H, dim) tensors, with stride
// 0 on dim 0, and "batch" b is sequence b: rows q0 = cu_q[b] .. cu_q[b + 1] of q (and of out
// and lse), rows k0 = cu_k[b] .. cu_k[b + 1] of k and v; B is the number of sequences and L, S
// the longest lengths. Positions i, j within the sequence (causal, dropout) and bh = b Hq + h
// are those of the padded dense problem. Both run the same loops: per (b, h) a base row and a
// length (seq(b)), and strides for the outputs.
struct Problem {
  int64_t B, Hq, Hk, G, L, S, E, Ev;
  const void *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];
  MaskView mask;
  Window win;  // causal and sliding windows
  float softcap;  // 0: off
  float scale;
  bool dropout;
  uint64_t seed, offset;
  uint32_t thresh;
  float r;
  const int32_t *cu_q = nullptr, *cu_k = nullptr;  // varlen: the (B + 1) offsets
  // Row strides (batch, head, row), in rows of E (Ev) elements: of out and grad_q (orow), of
  // grad_k and grad_v (krow); element strides (batch, head) of lse and D, whose rows are
  // contiguous. Dense: the contiguous (B, H, len, dim) layouts; varlen: (total, H, dim) and
  // lse (Hq, total_q).
  int64_t orow[3], krow[3], sl[2];
  // Physical query rows per head (L, or total_q) and heads (B Hq, or Hq) of lse and D.
  int64_t PL, PB;
  struct Seq {
    int64_t q0, L, k0, S;
  };
  Seq seq(int64_t b) const {
    if (!cu_q) return {0, L, 0, S};
    return {cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]};
  }
};

// Tile sizes. Forward: 96 = 16 row blocks of the micro-kernel = 6 column panels; a larger query
// block streams K and V less often (96 x 96 with head-major work order measured about 25%
// faster than 64 x 64). Backward: 64 x 64, its ten tiles (160 KB at head dim 64) stay in L2.
constexpr int64_t kFq = 96;  // query rows per tile (forward)
constexpr int64_t kFk = 96;  // keys per tile (forward)
constexpr int64_t kBq = 64;  // query rows per tile (backward)
constexpr int64_t kBk = 64;  // keys per tile (backward)

// Runs body() on up to `units` threads of torch's pool; body pulls work items itself, so the
// thread count changes only who computes an item, never what it computes.
template <typename F>
void run_threads(int64_t units, const F& body) {
  if (units <= 0) return;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { body(); });
}

// Prefetch `rows` rows of `bytes` bytes each, row stride `ld` elements, into L2.
template <typename T>
FASTLM_INLINE void prefetch_rows(const T* p, int64_t ld, int64_t rows, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
}

// The blocks [first, end) of size bk that hold the rows [lo, hi) (none when hi <= lo).
FASTLM_INLINE void block_span(int64_t lo, int64_t hi, int64_t bk, int64_t& first,
                              int64_t& end) {
  first = lo / bk;
  end = hi > lo ? (hi + bk - 1) / bk : first;
}

// ---------------------------------------------------------------------------------------------
// Forward driver. Work item = (batch, head, query block), numbered head by head so that one
// thread's consecutive items reuse the head's K and V from its caches (GQA: the group's heads
// are adjacent too); within a head the expensive (late, under causal) query blocks go first.
template <typename T>
void attn_fwd(const Problem& P, T* out, float* lse) {
  using C = Cvt<T>;
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t BH = P.B * P.Hq, nqb = (P.L + kFq - 1) / kFq;
  const int64_t E = P.E, Ev = P.Ev, Evp = round_up(Ev, W);
  const bool v_direct = kF32 && Ev % W == 0;  // V rows read in place as the B operand
  const float c2 = float(double(P.scale) * 1.4426950408889634);
  const T* q = static_cast<const T*>(P.q);
  const T* k = static_cast<const T*>(P.k);
  const T* v = static_cast<const T*>(P.v);
  const int64_t units = BH * nqb;
  std::atomic<int64_t> next{0};
  run_threads(units, [&] {
    // Workspace: Q^T (E x kFq), K and V tiles, the score tile, the dropout factors, the output
    // accumulator (kFq x Evp) and the row statistics.
    const int64_t nQt = E * kFq, nK = kF32 ? 0 : kFk * E, nV = v_direct ? 0 : kFk * Evp;
    const int64_t nSt = kFk * kFq, nZ = P.dropout ? kFk * kFq : 0, nO = kFq * Evp;
    std::unique_ptr<float[]> ws(new float[nQt + nK + nV + nSt + nZ + nO + 4 * kFq]);
    float* Qt = ws.get();
    float* Kc = Qt + nQt;
    float* Vc = Kc + nK;
    float* St = Vc + nV;
    float* Zr = St + nSt;
    float* O = Zr + nZ;
    float* m = O + nO;
    float* l = m + kFq;
    float* alpha = l + kFq;
    float* tmax = alpha + kFq;
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      const int64_t qb = nqb - 1 - u % nqb, bh = u / nqb, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t g = h / P.G;
      const Problem::Seq sg = P.seq(b);
      const int64_t Lq = sg.L, Sk = sg.S, nkb = (Sk + kFk - 1) / kFk;
      const int64_t i0 = qb * kFq;
      if (i0 >= Lq) continue;  // varlen: this block lies past the end of a shorter sequence
      const int64_t ni = std::min(kFq, Lq - i0), nip = round_up(ni, W);
      const T* qp = q + b * P.sq[0] + h * P.sq[1] + (sg.q0 + i0) * P.sq[2];
      const T* kp = k + b * P.sk[0] + g * P.sk[1] + sg.k0 * P.sk[2];
      const T* vp = v + b * P.sv[0] + g * P.sv[1] + sg.k0 * P.sv[2];
      C::load_cols(qp, P.sq[2], ni, E, Qt, kFq, c2);
      std::fill(m, m + kFq, -kInf);
      std::fill(l, l + kFq, 0.f);
      std::fill(O, O + ni * Evp, 0.f);
      const int64_t off = P.win.off(Lq, Sk);
      int64_t jlo = 0, jhi = Sk, kb_begin = 0, kb_end = nkb;
      if (P.win.on()) {
        P.win.keys(i0, ni, Sk, off, jlo, jhi);
        block_span(jlo, jhi, kFk, kb_begin, kb_end);
      }
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kFk, nk = std::min(kFk, Sk - j0);
        // Ask for the next key block's K and V rows now (into L2): they arrive while this
        // block is computed instead of stalling its tile products.
        if (kb + 1 < kb_end) {
          const int64_t nn = std::min(kFk, Sk - j0 - kFk);
          prefetch_rows(kp + (j0 + kFk) * P.sk[2], P.sk[2], nn, E * int64_t(sizeof(T)));
          prefetch_rows(vp + (j0 + kFk) * P.sv[2], P.sv[2], nn, Ev * int64_t(sizeof(T)));
          P.mask.prefetch(b, h, i0, j0 + kFk, ni, nn);
        }
        int mk = kMaskNoop;
        const char* mp = nullptr;
        if (P.mask.type != kNoMask) {
          mp = P.mask.at(b, h, i0, j0);
          mk = P.mask.kind(mp, ni, nk);
          if (mk == kMaskSkip) continue;
        }
        // S^T (keys x queries) = K (c2 Q)^T.
        const float* A = nullptr;
        int64_t lda = E;
        if constexpr (kF32) {
          A = reinterpret_cast<const float*>(kp) + j0 * P.sk[2];
          lda = P.sk[2];
        } else {
          C::load_rows(kp + j0 * P.sk[2], P.sk[2], nk, E, Kc, E, 1.f);
          A = Kc;
        }
        // Column maxima come with the product unless soft-capping, a window bound or the mask
        // changes the scores.
        const bool edit = P.win.on() && !P.win.full(i0, ni, j0, nk, off);
        const bool raw = !edit && mk != kMaskApply && P.softcap == 0.f;
        if (raw) std::fill(tmax, tmax + nip, -kInf);
        gemm(nk, nip, E, A, lda, 1, Qt, kFq, St, kFq, kSet, nullptr, raw ? tmax : nullptr);
        if (P.softcap > 0.f) softcap_tile(St, nk, nip, kFq, P.softcap * kLog2e, nullptr);
        if (edit) P.win.apply(St, 1, kFq, ni, nk, i0, j0, off);
        if (mk == kMaskApply) P.mask.apply(St, 1, kFq, mp, ni, nk);
        if (P.dropout)
          dropout_tile(Zr, 1, kFq, ni, nk, i0, j0, uint32_t(bh), P.seed, P.offset, P.thresh,
                       P.r);
        softmax_tile(St, nk, nip / W, kFq, m, l, alpha, P.dropout ? Zr : nullptr,
                     raw ? tmax : nullptr);
        // acc = diag(alpha) acc + P V, with P(i, j) = St[j * kFq + i].
        const float* Bv;
        int64_t ldv = Evp;
        if (v_direct) {
          Bv = reinterpret_cast<const float*>(vp) + j0 * P.sv[2];
          ldv = P.sv[2];
        } else {
          C::load_rows(vp + j0 * P.sv[2], P.sv[2], nk, Ev, Vc, Evp, 1.f);
          Bv = Vc;
        }
        gemm(ni, Evp, nk, St, 1, kFq, Bv, ldv, O, Evp, kScaleAdd, alpha, nullptr);
      }
      // out = acc / l; lse = ln 2 (m + log2 l), +inf (and out 0) for a row that saw nothing.
      float* lrow = lse + b * P.sl[0] + h * P.sl[1] + sg.q0 + i0;
      for (int64_t ii = 0; ii < ni; ++ii) {
        const bool empty = !(l[ii] > 0.f);
        lrow[ii] = empty ? kInf : float((double(m[ii]) + std::log2(double(l[ii]))) * kLn2);
        l[ii] = empty ? 0.f : 1.f / l[ii];
      }
      const int64_t orow = b * P.orow[0] + h * P.orow[1] + (sg.q0 + i0) * P.orow[2];
      C::store_rows(O, Evp, ni, Ev, out + orow * Ev, P.orow[2] * Ev, 1.f, l);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward driver.
template <typename T>
void attn_bwd(const Problem& P, const T* dout, const int64_t* sdo, const T* o, const int64_t* so,
              const float* lse, T* dq, T* dk, T* dv) {
  using C = Cvt<T>;
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t B = P.B, Hq = P.Hq, Hk = P.Hk, G = P.G, L = P.L, S = P.S, E = P.E, Ev = P.Ev;
  const int64_t BH = B * Hq, nkb = (S + kBk - 1) / kBk;
  const int64_t PB = P.PB, PL = P.PL;  // lse's heads and rows: B Hq and L, or Hq and total_q
  const int64_t Ep = round_up(E, W), Evp = round_up(Ev, W);
  const float c2 = float(double(P.scale) * 1.4426950408889634);
  const T* q = static_cast<const T*>(P.q);
  const T* k = static_cast<const T*>(P.k);
  const T* v = static_cast<const T*>(P.v);

  // D_i = sum_e dout_ie out_ie, float32, one per query row (lse's layout).
  std::unique_ptr<float[]> Dbuf(new float[std::max<int64_t>(1, PB * PL)]);
  float* Dv = Dbuf.get();
  const int64_t head_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * Ev));
  at::parallel_for(0, BH, head_grain, [&](int64_t r0, int64_t r1) {
    for (int64_t bh = r0; bh < r1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const Problem::Seq sg = P.seq(b);
      C::dot_rows(dout + b * sdo[0] + h * sdo[1] + sg.q0 * sdo[2], sdo[2],
                  o + b * so[0] + h * so[1] + sg.q0 * so[2], so[2], sg.L, Ev,
                  Dv + b * P.sl[0] + h * P.sl[1] + sg.q0);
    }
  });

  // Key chunks: at least 32 work items when the batch has few kv heads (each chunk costs a
  // float32 dq partial), at most 8 chunks. A function of the shapes only, never of the threads.
  const int64_t BG = B * Hk;
  const int64_t NC = std::max<int64_t>(1, std::min<int64_t>({nkb, 8, (32 + BG - 1) / BG}));
  // dq partials (float32, unscaled, rows in lse's layout): chunk c at dqacc[c] (PB x PL x Ep).
  // Chunk 0 accumulates into grad_q itself when it is float32 with E a multiple of W (dense:
  // grad_q's rows are laid out as lse's).
  const bool dq_direct = kF32 && E == Ep && !P.cu_q;
  const int64_t part = PB * PL * Ep;
  const int64_t nbuf = dq_direct ? NC - 1 : NC;
  std::unique_ptr<float[]> dqbuf(new float[std::max<int64_t>(1, nbuf * part)]);
  auto dq_part = [&](int64_t c) -> float* {
    if (dq_direct) return c == 0 ? reinterpret_cast<float*>(dq) : dqbuf.get() + (c - 1) * part;
    return dqbuf.get() + c * part;
  };
  at::parallel_for(0, NC * PB, head_grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* p = dq_part(r / PB) + (r % PB) * PL * Ep;
      std::fill(p, p + PL * Ep, 0.f);
    }
  });

  const bool q_direct = kF32 && E % W == 0;    // Q and K rows read in place
  const bool do_direct = kF32 && Ev % W == 0;  // dout rows read in place
  const int64_t units = BG * NC;
  std::atomic<int64_t> next{0};
  run_threads(units, [&] {
    const int64_t nKt = E * kBk, nVt = Ev * kBk, nKr = q_direct ? 0 : kBk * Ep;
    const int64_t ndK = kBk * Ep, ndV = kBk * Evp;
    const int64_t nQ = q_direct ? 0 : kBq * Ep, ndO = do_direct ? 0 : kBq * Evp;
    const int64_t nT = kBq * kBk, nZ = P.dropout ? nT : 0, nC = P.softcap > 0.f ? nT : 0;
    std::unique_ptr<float[]> ws(
        new float[nKt + nVt + nKr + ndK + ndV + nQ + ndO + 2 * nT + nZ + nC]);
    float* Kt = ws.get();
    float* Vt = Kt + nKt;
    float* Kr = Vt + nVt;
    float* dKa = Kr + nKr;
    float* dVa = dKa + ndK;
    float* Qc = dVa + ndV;
    float* dOc = Qc + nQ;
    float* Sb = dOc + ndO;
    float* dPb = Sb + nT;
    float* Zr = dPb + nT;
    float* Th = Zr + nZ;  // soft-capping: tanh of the scores
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      // Under causal the first chunks (early keys) carry the most work: hand them out first.
      const int64_t c = u / BG, bg = u % BG, b = bg / Hk, g = bg % Hk;
      const Problem::Seq sg = P.seq(b);
      const int64_t Lq = sg.L, Sk = sg.S;
      const int64_t nqb = (Lq + kBq - 1) / kBq, nkb_b = (Sk + kBk - 1) / kBk;
      const int64_t off = P.win.off(Lq, Sk);
      const int64_t kb0 = c * nkb_b / NC, kb1 = (c + 1) * nkb_b / NC;
      float* dqa = dq_part(c);
      const T* kp = k + b * P.sk[0] + g * P.sk[1] + sg.k0 * P.sk[2];
      const T* vp = v + b * P.sv[0] + g * P.sv[1] + sg.k0 * P.sv[2];
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * kBk, nk = std::min(kBk, Sk - j0), nkp = round_up(nk, W);
        // This key block as B operands: (c2 K)^T and V^T (E x keys), and K rows for dq.
        C::load_cols(kp + j0 * P.sk[2], P.sk[2], nk, E, Kt, kBk, c2);
        C::load_cols(vp + j0 * P.sv[2], P.sv[2], nk, Ev, Vt, kBk, 1.f);
        const float* Kb;
        int64_t ldk = Ep;
        if (q_direct) {
          Kb = reinterpret_cast<const float*>(kp) + j0 * P.sk[2];
          ldk = P.sk[2];
        } else {
          C::load_rows(kp + j0 * P.sk[2], P.sk[2], nk, E, Kr, Ep, 1.f);
          Kb = Kr;
        }
        std::fill(dKa, dKa + nk * Ep, 0.f);
        std::fill(dVa, dVa + nk * Evp, 0.f);
        int64_t qb0 = 0, qb1 = nqb;
        if (P.win.on()) {
          int64_t ilo, ihi;
          P.win.queries(j0, nk, Lq, off, ilo, ihi);
          block_span(ilo, ihi, kBq, qb0, qb1);
        }
        for (int64_t t = 0; t < G; ++t) {
          const int64_t h = g * G + t, bh = b * Hq + h;
          for (int64_t qb = qb0; qb < qb1; ++qb) {
            const int64_t i0 = qb * kBq, ni = std::min(kBq, Lq - i0);
            if (qb + 1 < qb1) P.mask.prefetch(b, h, i0 + kBq, j0, std::min(kBq, Lq - i0 - kBq), nk);
            int mk = kMaskNoop;
            const char* mp = nullptr;
            if (P.mask.type != kNoMask) {
              mp = P.mask.at(b, h, i0, j0);
              mk = P.mask.kind(mp, ni, nk);
              if (mk == kMaskSkip) continue;
            }
            const T* qp = q + b * P.sq[0] + h * P.sq[1] + (sg.q0 + i0) * P.sq[2];
            const T* dop = dout + b * sdo[0] + h * sdo[1] + (sg.q0 + i0) * sdo[2];
            const int64_t lr = b * P.sl[0] + h * P.sl[1] + sg.q0 + i0;  // lse, D, dq partial
            const float *Qa, *dOa;
            int64_t ldq = Ep, lddo = Evp;
            if (q_direct) {
              Qa = reinterpret_cast<const float*>(qp);
              ldq = P.sq[2];
            } else {
              C::load_rows(qp, P.sq[2], ni, E, Qc, Ep, 1.f);
              Qa = Qc;
            }
            if (do_direct) {
              dOa = reinterpret_cast<const float*>(dop);
              lddo = sdo[2];
            } else {
              C::load_rows(dop, sdo[2], ni, Ev, dOc, Evp, 1.f);
              dOa = dOc;
            }
            // Scores (log2 units) and dp, queries x keys.
            gemm(ni, nkp, E, Qa, ldq, 1, Kt, kBk, Sb, kBk, kSet, nullptr, nullptr);
            if (P.softcap > 0.f) softcap_tile(Sb, ni, nkp, kBk, P.softcap * kLog2e, Th);
            if (P.win.on() && !P.win.full(i0, ni, j0, nk, off))
              P.win.apply(Sb, kBk, 1, ni, nk, i0, j0, off);
            if (mk == kMaskApply) P.mask.apply(Sb, kBk, 1, mp, ni, nk);
            gemm(ni, nkp, Ev, dOa, lddo, 1, Vt, kBk, dPb, kBk, kSet, nullptr, nullptr);
            if (P.dropout)
              dropout_tile(Zr, kBk, 1, ni, nk, i0, j0, uint32_t(bh), P.seed, P.offset, P.thresh,
                           P.r);
            bwd_tile(Sb, dPb, ni, nkp / W, kBk, lse + lr, Dv + lr, P.dropout ? Zr : nullptr);
            if (P.softcap > 0.f) softcap_grad(dPb, Th, ni, nkp, kBk);
            // dv += (p z r)^T dout;  dk += ds^T q;  dq += ds k  (scale applied at the end).
            gemm(nk, Evp, ni, Sb, 1, kBk, dOa, lddo, dVa, Evp, kAdd, nullptr, nullptr);
            gemm(nk, Ep, ni, dPb, 1, kBk, Qa, ldq, dKa, Ep, kAdd, nullptr, nullptr);
            gemm(ni, Ep, nk, dPb, kBk, 1, Kb, ldk, dqa + lr * Ep, Ep, kAdd, nullptr, nullptr);
          }
        }
        const int64_t row = b * P.krow[0] + g * P.krow[1] + (sg.k0 + j0) * P.krow[2];
        C::store_rows(dKa, Ep, nk, E, dk + row * E, P.krow[2] * E, P.scale, nullptr);
        C::store_rows(dVa, Evp, nk, Ev, dv + row * Ev, P.krow[2] * Ev, 1.f, nullptr);
      }
    }
  });

  // dq = scale * (partial_0 + partial_1 + ...), the chunks in order.
  const int64_t rows = PB * PL;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> acc(NC > 1 ? new float[Ep] : nullptr);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = dq_part(0) + r * Ep;
      if (NC > 1) {
        std::memcpy(acc.get(), src, Ep * sizeof(float));
        for (int64_t c = 1; c < NC; ++c) {
          const float* p = dq_part(c) + r * Ep;
          for (int64_t e = 0; e < Ep; ++e) acc[e] += p[e];
        }
        src = acc.get();
      }
      const int64_t dr = P.cu_q ? (r / PL) * P.orow[1] + (r % PL) * P.orow[2] : r;
      C::store_rows(src, Ep, 1, E, dq + dr * E, E, P.scale, nullptr);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.
// The options after scale (docs/attention.md): window bounds (causal caps the right one at 0),
// the diagonal, soft-capping.
struct Opts {
  int64_t window_left = -1, window_right = -1;
  bool lower_right = false;
  double softcap = 0.0;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
                     double dropout_p, bool is_causal, double scale, const Opts& o) {
  Problem P;
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Hk = k.size(1);
  P.G = P.Hq / P.Hk;
  P.L = q.size(2);
  P.S = k.size(2);
  P.E = q.size(3);
  P.Ev = v.size(3);
  P.q = q.data_ptr();
  P.k = k.data_ptr();
  P.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    P.sq[d] = q.stride(d);
    P.sk[d] = k.stride(d);
    P.sv[d] = v.stride(d);
  }
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    P.mask.ptr = m.data_ptr();
    switch (m.scalar_type()) {
      case at::kBool: P.mask.type = kMaskBool; break;
      case at::kFloat: P.mask.type = kMaskF32; break;
      case at::kHalf: P.mask.type = kMaskF16; break;
      case at::kBFloat16: P.mask.type = kMaskBF16; break;
      default: TORCH_CHECK(false, "fastlm.attention: unsupported mask dtype ", m.scalar_type());
    }
    for (int d = 0; d < 4; ++d) P.mask.s[d] = m.stride(d);
  }
  P.win.left = o.window_left;
  P.win.right = is_causal ? (o.window_right < 0 ? 0 : std::min<int64_t>(o.window_right, 0))
                          : o.window_right;
  P.win.lower_right = o.lower_right;
  P.softcap = float(o.softcap);
  P.scale = float(scale);
  P.thresh = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0u;
  P.dropout = P.thresh > 0u;  // thresh 0 keeps every key with r = 1: nothing to do
  P.r = dropout_scale(P.thresh);
  P.seed = P.offset = 0;
  if (P.dropout) {
    const at::Tensor st = rng->contiguous();  // on the host: read it directly
    const int64_t* s = st.const_data_ptr<int64_t>();
    P.seed = uint64_t(s[0]);
    P.offset = uint64_t(s[1]);
  }
  // Outputs: out, grad_q (B, Hq, L, *) and grad_k, grad_v (B, Hk, S, *) contiguous; lse
  // (B, Hq, L).
  P.orow[0] = P.Hq * P.L;
  P.orow[1] = P.L;
  P.orow[2] = 1;
  P.krow[0] = P.Hk * P.S;
  P.krow[1] = P.S;
  P.krow[2] = 1;
  P.sl[0] = P.Hq * P.L;
  P.sl[1] = P.L;
  P.PB = P.B * P.Hq;
  P.PL = P.L;
  return P;
}

// Calls f(T{}) for the kernels' element type T of dtype t.
template <typename F>
void dispatch_dtype(const char* who, at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, who, ": unsupported dtype ", t);
  }
}

// (batch, head, row) element strides of a (B, H, len, dim) tensor, or of a packed varlen
// (total, H, dim) one seen as (1, H, total, dim) with batch stride 0 (Problem).
void row_strides(const at::Tensor& t, bool packed, int64_t s[3]) {
  s[0] = packed ? 0 : t.stride(0);
  s[1] = t.stride(1);
  s[2] = t.stride(packed ? 0 : 2);
}

// The forward on P into out (q's dtype) and lse, dense or varlen (P's output strides).
std::tuple<at::Tensor, at::Tensor> run_fwd(const char* who, const Problem& P, at::Tensor out,
                                           at::Tensor lse) {
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  dispatch_dtype(who, out.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    attn_fwd<T>(P, out.mutable_data_ptr<T>(), lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// The backward on P: (grad_q, grad_k, grad_v) shaped as q, k, v, dense (4-D operands) or
// varlen (packed 3-D operands).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(
    const char* who, const Problem& P, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor dO = grad_out.stride(-1) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor O = out.stride(-1) == 1 ? out : out.contiguous();
  const at::Tensor ls = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  int64_t sdo[3], so[3];
  row_strides(dO, P.cu_q != nullptr, sdo);
  row_strides(O, P.cu_q != nullptr, so);
  dispatch_dtype(who, q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    attn_bwd<T>(P, dO.const_data_ptr<T>(), sdo, O.const_data_ptr<T>(), so,
                ls.const_data_ptr<float>(), dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>(),
                dv.mutable_data_ptr<T>());
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
    double dropout_p, bool is_causal, double scale, int64_t window_left, int64_t window_right,
    bool lower_right, double softcap) {
  const char* who = "fastlm.attention_fwd";
  attn_check_fwd(who, q, k, v, mask, rng, dropout_p, is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  const Problem P = make_problem(q, k, v, mask, rng, dropout_p, is_causal, scale,
                                 {window_left, window_right, lower_right, softcap});
  return run_fwd(who, P, at::empty({P.B, P.Hq, P.L, P.Ev}, q.options()),
                 at::empty({P.B, P.Hq, P.L}, q.options().dtype(at::kFloat)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& rng, double dropout_p, bool is_causal, double scale,
    int64_t window_left, int64_t window_right, bool lower_right, double softcap) {
  const char* who = "fastlm.attention_bwd";
  attn_check_bwd(who, grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  const Problem P = make_problem(q, k, v, mask, rng, dropout_p, is_causal, scale,
                                 {window_left, window_right, lower_right, softcap});
  return run_bwd(who, P, grad_out, q, k, v, out, lse);
}

// ---------------------------------------------------------------------------------------------
// Varlen entry points: the packed q (total_q, Hq, E), k (total_k, Hk, E), v (total_k, Hk, Ev)
// run as the dense problem's views (1, H, total, dim) with per-sequence rows (Problem).
// as_4d and varlen_check are in attention.h (shared with the CUDA backend).

// Checks the offsets (start at 0, non-decreasing, end at the packed length, no sequence
// longer than its max_seqlen) on the host and returns them as int32 with the longest lengths.
std::pair<at::Tensor, int64_t> varlen_offsets(const char* who, const char* name,
                                              const at::Tensor& cu, int64_t total, int64_t mx) {
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(), who, ": ", name,
              ": packed lengths must fit in int32, got ", total);
  const at::Tensor c64 = cu.to(at::kLong).contiguous();
  const int64_t* c = c64.const_data_ptr<int64_t>();
  const int64_t n = c64.numel() - 1;
  int64_t longest = 0;
  bool ok = c[0] == 0 && c[n] == total;
  for (int64_t b = 0; b < n && ok; ++b) {
    ok = c[b + 1] >= c[b];
    longest = std::max(longest, c[b + 1] - c[b]);
  }
  TORCH_CHECK(ok, who, ": ", name, " must start at 0, be non-decreasing and end at ", total,
              " (the packed length)");
  TORCH_CHECK(longest <= mx, who, ": a sequence is longer than max_seqlen (", mx,
              ") given for ", name);
  return {cu.to(at::kInt).contiguous(), longest};
}

struct Varlen {
  at::Tensor cu_q, cu_k;  // int32, kept alive while the Problem points into them
  Problem P;
};

Varlen make_varlen(const char* who, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                   int64_t max_q, int64_t max_k, const std::optional<at::Tensor>& rng,
                   double dropout_p, bool is_causal, double scale, const Opts& o) {
  attn_check_opts(who, o.window_left, o.window_right, o.softcap);
  Varlen V;
  int64_t Lmax, Smax;
  std::tie(V.cu_q, Lmax) = varlen_offsets(who, "cu_seqlens_q", cu_q, q.size(0), max_q);
  std::tie(V.cu_k, Smax) = varlen_offsets(who, "cu_seqlens_k", cu_k, k.size(0), max_k);
  Problem& P = V.P;
  P = make_problem(as_4d(q), as_4d(k), as_4d(v), std::nullopt, rng, dropout_p, is_causal, scale,
                   o);
  const int64_t Tq = q.size(0);
  P.B = cu_q.numel() - 1;
  P.L = Lmax;  // the longest sequences (block counts): read from the offsets, not max_seqlen
  P.S = Smax;
  P.sq[0] = P.sk[0] = P.sv[0] = 0;
  P.cu_q = V.cu_q.const_data_ptr<int32_t>();
  P.cu_k = V.cu_k.const_data_ptr<int32_t>();
  // out, grad_q (total_q, Hq, *), grad_k, grad_v (total_k, Hk, *) contiguous; lse (Hq, total_q).
  P.orow[0] = 0;
  P.orow[1] = 1;
  P.orow[2] = P.Hq;
  P.krow[0] = 0;
  P.krow[1] = 1;
  P.krow[2] = P.Hk;
  P.sl[0] = 0;
  P.sl[1] = Tq;
  P.PB = P.Hq;
  P.PL = Tq;
  return V;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const std::optional<at::Tensor>& rng,
    double dropout_p, bool is_causal, double scale, int64_t window_left, int64_t window_right,
    bool lower_right, double softcap) {
  const char* who = "fastlm.varlen_attention_fwd";
  varlen_check(who, q, k, v, cu_q, cu_k, rng, dropout_p, is_causal);
  const Varlen V = make_varlen(who, q, k, v, cu_q, cu_k, max_q, max_k, rng, dropout_p,
                               is_causal, scale,
                               {window_left, window_right, lower_right, softcap});
  const Problem& P = V.P;
  return run_fwd(who, P, at::empty({q.size(0), P.Hq, P.Ev}, q.options()),
                 at::empty({P.Hq, q.size(0)}, q.options().dtype(at::kFloat)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const std::optional<at::Tensor>& rng,
    double dropout_p, bool is_causal, double scale, int64_t window_left, int64_t window_right,
    bool lower_right, double softcap) {
  const char* who = "fastlm.varlen_attention_bwd";
  varlen_check_bwd(who, grad_out, q, k, v, out, lse, cu_q, cu_k, rng, dropout_p, is_causal);
  const Varlen V = make_varlen(who, q, k, v, cu_q, cu_k, max_q, max_k, rng, dropout_p,
                               is_causal, scale,
                               {window_left, window_right, lower_right, softcap});
  return run_bwd(who, V.P, grad_out, q, k, v, out, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace fastlm
