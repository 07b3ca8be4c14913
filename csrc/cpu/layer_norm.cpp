// LayerNorm on the CPU: rows split across threads (at::parallel_for, torch's OpenMP pool),
// each row handled in float32 with loops the compiler vectorizes. The row drivers are compiled
// for AVX-512, AVX2 and baseline x86-64 (target_clones) and picked at load time.
//
// Forward, per row:  mu = mean(x), var = mean((x - mu)^2)  (two passes over a row in cache),
//                    rstd = 1/sqrt(var + eps), y = (x - mu) * rstd * w + b.
// Backward, per row: xhat = (x - mu) * rstd, g = dy * w,
//                    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//                    dw += dy * xhat, db += dy  (into a per-chunk partial row).
// dw and db are deterministic: rows are split into a fixed number of chunks that does not
// depend on the thread count, and the chunk partials are summed in chunk order.
//
// RMSNorm (fastlm.rms_norm, add_rms_norm) runs on the same row code with mean == nullptr: no
// centring (mu = 0, so rstd = 1/sqrt(mean(x^2) + eps)), no bias, and in the backward no mean(g)
// term: dx = rstd * (g - xhat * mean(g * xhat)).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../attention.h"  // Philox4x32-10 and the dropout threshold/scale (shared with attention)
#include "../layer_norm.h"
#include "isa.h"  // FASTLM_CLONES, FASTLM_INLINE


namespace fastlm {
namespace {

constexpr int64_t kSumBlock = 512;

// Statistics and output of one row given as float32 values xf; mean == nullptr: RMSNorm.
template <typename T, typename W>
FASTLM_INLINE void norm_row(const float* __restrict xf, const W* __restrict w,
                            const W* __restrict b, T* __restrict y, float* mean, float* rstd,
                            int64_t N, float eps) {
  // Row sums: float SIMD lanes within blocks of kSumBlock elements, the block sums in double,
  // so the rounding error does not grow with the row length.
  double s = 0.0;
  for (int64_t j0 = 0; mean && j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = j0; j < j1; ++j) part += xf[j];
    s += part;
  }
  const float mu = float(s / double(N));
  double ss = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = j0; j < j1; ++j) {
      const float d = xf[j] - mu;
      part += d * d;
    }
    ss += part;
  }
  const float rs = 1.f / std::sqrt(float(ss / double(N)) + eps);
  if (mean) *mean = mu;
  *rstd = rs;
  if (w && b) {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) y[j] = from_f<T>((xf[j] - mu) * rs * to_f(w[j]) + to_f(b[j]));
  } else if (w) {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) y[j] = from_f<T>((xf[j] - mu) * rs * to_f(w[j]));
  } else if (b) {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) y[j] = from_f<T>((xf[j] - mu) * rs + to_f(b[j]));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) y[j] = from_f<T>((xf[j] - mu) * rs);
  }
}

template <typename T, typename W>
FASTLM_INLINE void fwd_row(const T* __restrict x, const W* __restrict w, const W* __restrict b,
                    T* __restrict y, float* mean, float* rstd, int64_t N, float eps,
                    float* __restrict buf) {
  // float32 rows are read in place; 16-bit rows are widened once into buf.
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) buf[j] = to_f(x[j]);
    xf = buf;
  }
  norm_row(xf, w, b, y, mean, rstd, N, eps);
}

template <typename T, typename W>
FASTLM_INLINE void fwd_rows(const T* x, const W* w, const W* b, T* y, float* mean, float* rstd,
                     int64_t r0, int64_t r1, int64_t N, float eps) {
  std::vector<float> buf(N);
  for (int64_t r = r0; r < r1; ++r)
    fwd_row(x + r * N, w, b, y + r * N, mean ? mean + r : nullptr, rstd + r, N, eps, buf.data());
}

template <bool PARTIALS, bool HAS_W, typename T, typename W, typename D>
FASTLM_INLINE void bwd_row(const T* __restrict dy, const T* __restrict x, float mu, float rs,
                    const W* __restrict w, D* __restrict dx, float* __restrict dw,
                    float* __restrict db, int64_t N, bool rms) {
  // Pass 1: the two row sums. Pass 2 re-reads x and dy (from L1/L2) instead of storing
  // xhat and g, which measured faster than keeping them in a row buffer.
  double sa = 0.0, sc = 0.0;  // blocked as in fwd_row
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    float pa = 0.f, pc = 0.f;
#pragma omp simd reduction(+ : pa, pc)
    for (int64_t j = j0; j < j1; ++j) {
      const float g = HAS_W ? to_f(dy[j]) * to_f(w[j]) : to_f(dy[j]);
      pa += g * ((to_f(x[j]) - mu) * rs);
      pc += g;
    }
    sa += pa;
    sc += pc;
  }
  const float a = float(sa / double(N)), c = rms ? 0.f : float(sc / double(N));
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const float dyj = to_f(dy[j]);
    const float xh = (to_f(x[j]) - mu) * rs;
    const float g = HAS_W ? dyj * to_f(w[j]) : dyj;
    dx[j] = from_f<D>(rs * (g - c - xh * a));
    if constexpr (PARTIALS) {
      dw[j] += dyj * xh;
      db[j] += dyj;
    }
  }
}

template <bool PARTIALS, bool HAS_W, typename T, typename W, typename D>
FASTLM_INLINE void bwd_rows_as(const T* dy, const T* x, const float* mean, const float* rstd,
                               const W* w, D* dx, float* dw, float* db, int64_t r0, int64_t r1,
                               int64_t N) {
  for (int64_t r = r0; r < r1; ++r)
    bwd_row<PARTIALS, HAS_W>(dy + r * N, x + r * N, mean ? mean[r] : 0.f, rstd[r], w, dx + r * N,
                             dw, db, N, !mean);
}

// dw and db point at this chunk's partial rows (both or neither). The loop-invariant choices
// become template arguments, so each row loop has no branch inside.
template <typename T, typename W>
FASTLM_INLINE void bwd_rows(const T* dy, const T* x, const float* mean, const float* rstd,
                            const W* w, T* dx, float* dw, float* db, int64_t r0, int64_t r1,
                            int64_t N) {
  if (dw && w) bwd_rows_as<true, true>(dy, x, mean, rstd, w, dx, dw, db, r0, r1, N);
  else if (dw) bwd_rows_as<true, false>(dy, x, mean, rstd, w, dx, dw, db, r0, r1, N);
  else if (w) bwd_rows_as<false, true>(dy, x, mean, rstd, w, dx, dw, db, r0, r1, N);
  else bwd_rows_as<false, false>(dy, x, mean, rstd, w, dx, dw, db, r0, r1, N);
}

// ------------------------------------------------------------------------------------------
// Fused residual add + dropout + LayerNorm (fastlm.add_layer_norm, docs/layer_norm.md):
//   forward:  s = round(residual + input * m), m = keep ? scale : 0 (m = 1 without dropout);
//             then the LayerNorm row above on the rounded s (norm_row), s stored as `summed`.
//   backward: g = LN-backward(dy) on s (bwd_row, into a float row) + grad_summed;
//             grad_residual = g, grad_input = g * m (only with dropout; else it is g).
// The keep bits of row r are regenerated from rng in both passes (dropout_keep_row).
struct Dropout {
  uint64_t seed = 0, offset = 0;
  uint32_t thresh = 0;  // 0: no dropout
  float scale = 1.f;
};

// m[j] for j < N (m has room for N rounded up to 8): Philox4x32-10 with counter
// (j >> 3, r & 0xffffffff, r >> 32, offset) and key (seed lo, seed hi); 16 bits per column.
FASTLM_INLINE void dropout_keep_row(const Dropout& d, int64_t r, int64_t N, uint32_t* __restrict words,
                                    float* __restrict m) {
  const int64_t G = (N + 7) / 8;
  const uint32_t rlo = uint32_t(uint64_t(r)), rhi = uint32_t(uint64_t(r) >> 32);
  const uint32_t off = uint32_t(d.offset), k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
  // Independent Philox calls, one per 8 columns (words: 4 per group).
  for (int64_t g = 0; g < G; ++g) {
    const Philox4 x = philox4x32_10(uint32_t(g), rlo, rhi, off, k0, k1);
    for (int q = 0; q < 4; ++q) words[4 * g + q] = x.x[q];
  }
  const float sc = d.scale;
  const uint32_t th = d.thresh;
#pragma omp simd
  for (int64_t j = 0; j < G * 8; ++j) {
    const uint32_t bits = (words[j >> 1] >> (16 * (j & 1))) & 0xFFFFu;
    m[j] = bits >= th ? sc : 0.f;
  }
}

template <bool DROP, typename T, typename W>
FASTLM_INLINE void add_fwd_row(const T* __restrict x, const T* __restrict res,
                               const W* __restrict w, const W* __restrict b, T* __restrict y,
                               T* __restrict s, float* mean, float* rstd, int64_t N, float eps,
                               const float* __restrict m, float* __restrict buf) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) s[j] = res[j] + (DROP ? x[j] * m[j] : x[j]);
    norm_row(s, w, b, y, mean, rstd, N, eps);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const T v = from_f<T>(to_f(res[j]) + (DROP ? to_f(x[j]) * m[j] : to_f(x[j])));
      s[j] = v;
      buf[j] = to_f(v);
    }
    norm_row(buf, w, b, y, mean, rstd, N, eps);
  }
}

template <typename T, typename W>
FASTLM_INLINE void add_fwd_rows(const T* x, const T* res, const W* w, const W* b, T* y, T* s,
                                float* mean, float* rstd, int64_t r0, int64_t r1, int64_t N,
                                float eps, const Dropout& d) {
  const int64_t n8 = (N + 7) / 8 * 8;
  std::vector<float> buf(N), m(d.thresh ? n8 : 0);
  std::vector<uint32_t> words(d.thresh ? n8 / 2 : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * N;
    if (d.thresh) {
      dropout_keep_row(d, r, N, words.data(), m.data());
      add_fwd_row<true>(x + o, res + o, w, b, y + o, s + o, mean ? mean + r : nullptr, rstd + r,
                        N, eps, m.data(), buf.data());
    } else {
      add_fwd_row<false>(x + o, res + o, w, b, y + o, s + o, mean ? mean + r : nullptr, rstd + r,
                         N, eps, nullptr, buf.data());
    }
  }
}

template <bool HAS_GS, bool DROP, typename T>
FASTLM_INLINE void add_bwd_epilogue(const float* __restrict g, const T* __restrict gs,
                                    const float* __restrict m, T* __restrict dres,
                                    T* __restrict din, int64_t N) {
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const float v = HAS_GS ? g[j] + to_f(gs[j]) : g[j];
    dres[j] = from_f<T>(v);
    if constexpr (DROP) din[j] = from_f<T>(v * m[j]);
  }
}

template <bool PARTIALS, bool HAS_W, typename T, typename W>
FASTLM_INLINE void add_bwd_rows_as(const T* dy, const T* gs, const T* s, const float* mean,
                                   const float* rstd, const W* w, T* dres, T* din, float* dw,
                                   float* db, int64_t r0, int64_t r1, int64_t N,
                                   const Dropout& d) {
  const int64_t n8 = (N + 7) / 8 * 8;
  std::vector<float> g(N), m(din ? n8 : 0);
  std::vector<uint32_t> words(din ? n8 / 2 : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * N;
    bwd_row<PARTIALS, HAS_W>(dy + o, s + o, mean ? mean[r] : 0.f, rstd[r], w, g.data(), dw, db, N,
                             !mean);
    if (din) dropout_keep_row(d, r, N, words.data(), m.data());
    if (gs && din) add_bwd_epilogue<true, true>(g.data(), gs + o, m.data(), dres + o, din + o, N);
    else if (gs) add_bwd_epilogue<true, false>(g.data(), gs + o, m.data(), dres + o, din, N);
    else if (din) add_bwd_epilogue<false, true>(g.data(), gs, m.data(), dres + o, din + o, N);
    else add_bwd_epilogue<false, false>(g.data(), gs, m.data(), dres + o, din, N);
  }
}

template <typename T, typename W>
FASTLM_INLINE void add_bwd_rows(const T* dy, const T* gs, const T* s, const float* mean,
                                const float* rstd, const W* w, T* dres, T* din, float* dw,
                                float* db, int64_t r0, int64_t r1, int64_t N, const Dropout& d) {
  if (dw && w) add_bwd_rows_as<true, true>(dy, gs, s, mean, rstd, w, dres, din, dw, db, r0, r1, N, d);
  else if (dw) add_bwd_rows_as<true, false>(dy, gs, s, mean, rstd, w, dres, din, dw, db, r0, r1, N, d);
  else if (w) add_bwd_rows_as<false, true>(dy, gs, s, mean, rstd, w, dres, din, dw, db, r0, r1, N, d);
  else add_bwd_rows_as<false, false>(dy, gs, s, mean, rstd, w, dres, din, dw, db, r0, r1, N, d);
}

// One non-template driver per (input, parameter) dtype pair, cloned per ISA.
#define FASTLM_LN_DRIVERS(T, W, tag)                                                          \
  FASTLM_CLONES void fwd_##tag(const T* x, const W* w, const W* b, T* y, float* mean,         \
                               float* rstd, int64_t r0, int64_t r1, int64_t N, float eps) {   \
    fwd_rows<T, W>(x, w, b, y, mean, rstd, r0, r1, N, eps);                                   \
  }                                                                                           \
  FASTLM_CLONES void bwd_##tag(const T* dy, const T* x, const float* mean, const float* rstd, \
                               const W* w, T* dx, float* dw, float* db, int64_t r0,           \
                               int64_t r1, int64_t N) {                                       \
    bwd_rows<T, W>(dy, x, mean, rstd, w, dx, dw, db, r0, r1, N);                              \
  }                                                                                           \
  FASTLM_CLONES void add_fwd_##tag(const T* x, const T* res, const W* w, const W* b, T* y,    \
                                   T* s, float* mean, float* rstd, int64_t r0, int64_t r1,    \
                                   int64_t N, float eps, const Dropout& d) {                  \
    add_fwd_rows<T, W>(x, res, w, b, y, s, mean, rstd, r0, r1, N, eps, d);                    \
  }                                                                                           \
  FASTLM_CLONES void add_bwd_##tag(const T* dy, const T* gs, const T* s, const float* mean,   \
                                   const float* rstd, const W* w, T* dres, T* din, float* dw, \
                                   float* db, int64_t r0, int64_t r1, int64_t N,              \
                                   const Dropout& d) {                                        \
    add_bwd_rows<T, W>(dy, gs, s, mean, rstd, w, dres, din, dw, db, r0, r1, N, d);            \
  }
FASTLM_LN_DRIVERS(float, float, f32)
FASTLM_LN_DRIVERS(c10::Half, c10::Half, f16)
FASTLM_LN_DRIVERS(c10::Half, float, f16_f32)
FASTLM_LN_DRIVERS(c10::BFloat16, c10::BFloat16, bf16)
FASTLM_LN_DRIVERS(c10::BFloat16, float, bf16_f32)
#undef FASTLM_LN_DRIVERS

// Calls f(tag-driver-pair) for the input dtype and whether the parameters are float32.
#define FASTLM_LN_DISPATCH(xtype, param_f32, CALL)                                    \
  switch (xtype) {                                                                    \
    case at::kFloat: CALL(float, float, f32); break;                                 \
    case at::kHalf:                                                                   \
      if (param_f32) { CALL(c10::Half, float, f16_f32); }                            \
      else { CALL(c10::Half, c10::Half, f16); }                                      \
      break;                                                                          \
    case at::kBFloat16:                                                               \
      if (param_f32) { CALL(c10::BFloat16, float, bf16_f32); }                       \
      else { CALL(c10::BFloat16, c10::BFloat16, bf16); }                             \
      break;                                                                          \
    default: TORCH_CHECK(false, "fastlm.layer_norm: unsupported dtype ", xtype);      \
  }

constexpr int64_t kGrainRows = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  ln_check_fwd(input, weight, bias);
  const LnFwd f = ln_fwd_prepare(input, nullptr, weight, bias);
  if (f.done) return {f.y, f.mean, f.rstd};
  const float feps = static_cast<float>(eps);
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, f.M, kGrainRows, [&](int64_t r0, int64_t r1) {                          \
    fwd_##tag(f.x.const_data_ptr<T>(), static_cast<const W*>(opt_ptr(f.w)),                   \
              static_cast<const W*>(opt_ptr(f.b)), f.y.mutable_data_ptr<T>(),                 \
              f.mean.mutable_data_ptr<float>(), f.rstd.mutable_data_ptr<float>(), r0, r1,     \
              f.N, feps);                                                                     \
  })
  FASTLM_LN_DISPATCH(f.x.scalar_type(), f.pf32, CALL)
#undef CALL
  return {f.y, f.mean, f.rstd};
}

// out[j] = sum over chunks c of p[c * N + j], column by column in chunk order (deterministic).
void reduce_partials(at::Tensor& out, const float* p, int64_t chunks, int64_t N) {
  if (!out.numel()) return;
  std::vector<float> acc(N, 0.f);
  at::parallel_for(0, N, 2048, [&](int64_t j0, int64_t j1) {
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = j0; j < j1; ++j) acc[j] += p[c * N + j];
  });
  switch (out.scalar_type()) {
    case at::kFloat: std::memcpy(out.mutable_data_ptr<float>(), acc.data(), N * 4); break;
    case at::kHalf: {
      auto* o = out.mutable_data_ptr<c10::Half>();
      for (int64_t j = 0; j < N; ++j) o[j] = c10::Half(acc[j]);
    } break;
    case at::kBFloat16: {
      auto* o = out.mutable_data_ptr<c10::BFloat16>();
      for (int64_t j = 0; j < N; ++j) o[j] = c10::BFloat16(acc[j]);
    } break;
    default: TORCH_CHECK(false, "fastlm.layer_norm: unsupported parameter dtype");
  }
}

// The backward's rows in a fixed number of chunks (independent of the thread count), run in
// parallel, each accumulating dw and db into its own partial rows (both whenever either is
// wanted); the partials are then summed in chunk order, so dw and db are bit-reproducible.
class Chunks {
 public:
  explicit Chunks(const LnBwd& g) : g_(g), n_(std::max<int64_t>(1, std::min<int64_t>(g.M, 32))) {
    if (g.dw.numel() || g.db.numel())
      part_ = at::empty({2, n_, g.N}, g.x.options().dtype(at::kFloat)).zero_();
  }

  // Runs body(r0, r1, pw, pb) for every chunk: its rows r0..r1-1 and partial rows (or null).
  template <typename F>
  void run(const F& body) {
    float* p = part_.defined() ? part_.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, n_, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        body(c * g_.M / n_, (c + 1) * g_.M / n_, p ? p + c * g_.N : nullptr,
             p ? p + (n_ + c) * g_.N : nullptr);
    });
  }

  // dw and db (those wanted) from the partial rows.
  void reduce(at::Tensor& dw, at::Tensor& db) const {
    if (!part_.defined()) return;
    reduce_partials(dw, part_.const_data_ptr<float>(), n_, g_.N);
    reduce_partials(db, part_.const_data_ptr<float>() + n_ * g_.N, n_, g_.N);
  }

 private:
  const LnBwd& g_;
  int64_t n_;
  at::Tensor part_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool weight_grad, bool bias_grad) {
  ln_check_bwd(grad_out, input, mean, rstd, weight, bias, weight_grad, bias_grad);
  LnBwd g = ln_bwd_prepare(grad_out, std::nullopt, input, mean, rstd, weight, bias, false, false,
                           weight_grad, bias_grad);
  if (g.done) return {g.dx, g.dw, g.db};
  Chunks chunks(g);
#define CALL(T, W, tag)                                                                       \
  chunks.run([&](int64_t r0, int64_t r1, float* pw, float* pb) {                              \
    bwd_##tag(g.dy.const_data_ptr<T>(), g.x.const_data_ptr<T>(), g.mu.const_data_ptr<float>(), \
              g.rs.const_data_ptr<float>(), static_cast<const W*>(opt_ptr(g.w)),              \
              g.dx.mutable_data_ptr<T>(), pw, pb, r0, r1, g.N);                               \
  })
  FASTLM_LN_DISPATCH(g.x.scalar_type(), g.pf32, CALL)
#undef CALL
  chunks.reduce(g.dw, g.db);
  return {g.dx, g.dw, g.db};
}

// ------------------------------------------------------------------------------------------
// fastlm.add_layer_norm (csrc/fastlm.cpp has the schemas).
Dropout make_dropout(const std::optional<at::Tensor>& rng, double dropout_p, bool on) {
  Dropout d;
  if (!on) return d;
  const int64_t* r = rng->contiguous().const_data_ptr<int64_t>();
  d.seed = uint64_t(r[0]);
  d.offset = uint64_t(r[1]);
  d.thresh = dropout_threshold(dropout_p);
  d.scale = dropout_scale(d.thresh);
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rng, double dropout_p,
    double eps) {
  const bool drop = aln_check_fwd(input, residual, weight, bias, rng, dropout_p);
  const LnFwd f = ln_fwd_prepare(input, &residual, weight, bias);
  if (f.done) return {f.y, f.summed, f.mean, f.rstd};
  const Dropout d = make_dropout(rng, dropout_p, drop);
  const float feps = static_cast<float>(eps);
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, f.M, kGrainRows, [&](int64_t r0, int64_t r1) {                          \
    add_fwd_##tag(f.x.const_data_ptr<T>(), f.res.const_data_ptr<T>(),                         \
                  static_cast<const W*>(opt_ptr(f.w)), static_cast<const W*>(opt_ptr(f.b)),  \
                  f.y.mutable_data_ptr<T>(), f.summed.mutable_data_ptr<T>(),                  \
                  f.mean.mutable_data_ptr<float>(), f.rstd.mutable_data_ptr<float>(), r0, r1, \
                  f.N, feps, d);                                                              \
  })
  FASTLM_LN_DISPATCH(f.x.scalar_type(), f.pf32, CALL)
#undef CALL
  return {f.y, f.summed, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& summed, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& rng, double dropout_p, bool input_grad, bool weight_grad,
    bool bias_grad) {
  const bool want_din = aln_check_bwd(grad_out, grad_summed, summed, mean, rstd, weight, bias,
                                      rng, dropout_p, input_grad, weight_grad, bias_grad);
  LnBwd g = ln_bwd_prepare(grad_out, grad_summed, summed, mean, rstd, weight, bias, true,
                           want_din, weight_grad, bias_grad);
  if (g.done) return {g.dx, g.din, g.dw, g.db};
  const Dropout d = make_dropout(rng, dropout_p, want_din);
  Chunks chunks(g);
#define CALL(T, W, tag)                                                                       \
  chunks.run([&](int64_t r0, int64_t r1, float* pw, float* pb) {                              \
    add_bwd_##tag(g.dy.const_data_ptr<T>(), g.gs.defined() ? g.gs.const_data_ptr<T>() : nullptr, \
                  g.x.const_data_ptr<T>(), g.mu.const_data_ptr<float>(),                      \
                  g.rs.const_data_ptr<float>(), static_cast<const W*>(opt_ptr(g.w)),          \
                  g.dx.mutable_data_ptr<T>(), want_din ? g.din.mutable_data_ptr<T>() : nullptr, \
                  pw, pb, r0, r1, g.N, d);                                                    \
  })
  FASTLM_LN_DISPATCH(g.x.scalar_type(), g.pf32, CALL)
#undef CALL
  chunks.reduce(g.dw, g.db);
  return {g.dx, g.din, g.dw, g.db};
}

// ------------------------------------------------------------------------------------------
// fastlm.rms_norm and fastlm.add_rms_norm: the drivers above with mean == nullptr, no bias.
constexpr const char* kRms = "fastlm.rms_norm";
constexpr const char* kAddRms = "fastlm.add_rms_norm";

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& input,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps) {
  ln_check_fwd(input, weight, std::nullopt, kRms);
  const LnFwd f = ln_fwd_prepare(input, nullptr, weight, std::nullopt, true);
  if (f.done) return {f.y, f.rstd};
  const float feps = static_cast<float>(eps);
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, f.M, kGrainRows, [&](int64_t r0, int64_t r1) {                          \
    fwd_##tag(f.x.const_data_ptr<T>(), static_cast<const W*>(opt_ptr(f.w)), nullptr,          \
              f.y.mutable_data_ptr<T>(), nullptr, f.rstd.mutable_data_ptr<float>(), r0, r1,   \
              f.N, feps);                                                                     \
  })
  FASTLM_LN_DISPATCH(f.x.scalar_type(), f.pf32, CALL)
#undef CALL
  return {f.y, f.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& weight,
                                                    bool weight_grad) {
  ln_check_bwd(grad_out, input, rstd, rstd, weight, std::nullopt, weight_grad, false, kRms);
  LnBwd g = ln_bwd_prepare(grad_out, std::nullopt, input, rstd, rstd, weight, std::nullopt, false,
                           false, weight_grad, false);
  if (g.done) return {g.dx, g.dw};
  Chunks chunks(g);
#define CALL(T, W, tag)                                                                       \
  chunks.run([&](int64_t r0, int64_t r1, float* pw, float* pb) {                              \
    bwd_##tag(g.dy.const_data_ptr<T>(), g.x.const_data_ptr<T>(), nullptr,                     \
              g.rs.const_data_ptr<float>(), static_cast<const W*>(opt_ptr(g.w)),              \
              g.dx.mutable_data_ptr<T>(), pw, pb, r0, r1, g.N);                               \
  })
  FASTLM_LN_DISPATCH(g.x.scalar_type(), g.pf32, CALL)
#undef CALL
  chunks.reduce(g.dw, g.db);
  return {g.dx, g.dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& rng, double dropout_p, double eps) {
  const bool drop = aln_check_fwd(input, residual, weight, std::nullopt, rng, dropout_p, kAddRms);
  const LnFwd f = ln_fwd_prepare(input, &residual, weight, std::nullopt, true);
  if (f.done) return {f.y, f.summed, f.rstd};
  const Dropout d = make_dropout(rng, dropout_p, drop);
  const float feps = static_cast<float>(eps);
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, f.M, kGrainRows, [&](int64_t r0, int64_t r1) {                          \
    add_fwd_##tag(f.x.const_data_ptr<T>(), f.res.const_data_ptr<T>(),                         \
                  static_cast<const W*>(opt_ptr(f.w)), nullptr, f.y.mutable_data_ptr<T>(),    \
                  f.summed.mutable_data_ptr<T>(), nullptr, f.rstd.mutable_data_ptr<float>(),  \
                  r0, r1, f.N, feps, d);                                                      \
  })
  FASTLM_LN_DISPATCH(f.x.scalar_type(), f.pf32, CALL)
#undef CALL
  return {f.y, f.summed, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& summed, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& rng, double dropout_p, bool input_grad, bool weight_grad) {
  const bool want_din = aln_check_bwd(grad_out, grad_summed, summed, rstd, rstd, weight,
                                      std::nullopt, rng, dropout_p, input_grad, weight_grad, false,
                                      kAddRms);
  LnBwd g = ln_bwd_prepare(grad_out, grad_summed, summed, rstd, rstd, weight, std::nullopt, true,
                           want_din, weight_grad, false);
  if (g.done) return {g.dx, g.din, g.dw};
  const Dropout d = make_dropout(rng, dropout_p, want_din);
  Chunks chunks(g);
#define CALL(T, W, tag)                                                                       \
  chunks.run([&](int64_t r0, int64_t r1, float* pw, float* pb) {                              \
    add_bwd_##tag(g.dy.const_data_ptr<T>(), g.gs.defined() ? g.gs.const_data_ptr<T>() : nullptr, \
                  g.x.const_data_ptr<T>(), nullptr, g.rs.const_data_ptr<float>(),             \
                  static_cast<const W*>(opt_ptr(g.w)), g.dx.mutable_data_ptr<T>(),            \
                  want_din ? g.din.mutable_data_ptr<T>() : nullptr, pw, pb, r0, r1, g.N, d);  \
  })
  FASTLM_LN_DISPATCH(g.x.scalar_type(), g.pf32, CALL)
#undef CALL
  chunks.reduce(g.dw, g.db);
  return {g.dx, g.din, g.dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cpu);
  m.impl("add_rms_norm_bwd", &add_rms_norm_bwd_cpu);
}

}  // namespace fastlm
