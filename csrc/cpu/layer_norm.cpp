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

#include "../layer_norm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLM_CLONES
#endif
// The row code must be inlined into each clone to be compiled for that clone's ISA.
#define FASTLM_INLINE inline __attribute__((always_inline))

namespace fastlm {
namespace {

FASTLM_INLINE float to_f(float v) { return v; }
FASTLM_INLINE float to_f(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
FASTLM_INLINE float to_f(c10::Half v) { return static_cast<float>(v); }

template <typename T>
FASTLM_INLINE T from_f(float v) {
  return static_cast<T>(v);  // round to nearest even, NaN kept (c10 conversions)
}

constexpr int64_t kSumBlock = 512;

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
  // Row sums: float SIMD lanes within blocks of kSumBlock elements, the block sums in double,
  // so the rounding error does not grow with the row length.
  double s = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
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
  *mean = mu;
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
FASTLM_INLINE void fwd_rows(const T* x, const W* w, const W* b, T* y, float* mean, float* rstd,
                     int64_t r0, int64_t r1, int64_t N, float eps) {
  std::vector<float> buf(N);
  for (int64_t r = r0; r < r1; ++r)
    fwd_row(x + r * N, w, b, y + r * N, mean + r, rstd + r, N, eps, buf.data());
}

template <bool PARTIALS, bool HAS_W, typename T, typename W>
FASTLM_INLINE void bwd_row(const T* __restrict dy, const T* __restrict x, float mu, float rs,
                    const W* __restrict w, T* __restrict dx, float* __restrict dw,
                    float* __restrict db, int64_t N) {
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
  const float a = float(sa / double(N)), c = float(sc / double(N));
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const float dyj = to_f(dy[j]);
    const float xh = (to_f(x[j]) - mu) * rs;
    const float g = HAS_W ? dyj * to_f(w[j]) : dyj;
    dx[j] = from_f<T>(rs * (g - c - xh * a));
    if constexpr (PARTIALS) {
      dw[j] += dyj * xh;
      db[j] += dyj;
    }
  }
}

template <bool PARTIALS, bool HAS_W, typename T, typename W>
FASTLM_INLINE void bwd_rows_as(const T* dy, const T* x, const float* mean, const float* rstd,
                               const W* w, T* dx, float* dw, float* db, int64_t r0, int64_t r1,
                               int64_t N) {
  for (int64_t r = r0; r < r1; ++r)
    bwd_row<PARTIALS, HAS_W>(dy + r * N, x + r * N, mean[r], rstd[r], w, dx + r * N, dw, db, N);
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

bool params_f32(const at::Tensor& x, const std::optional<at::Tensor>& w,
                const std::optional<at::Tensor>& b) {
  const at::Tensor* p = (w && w->defined()) ? &*w : ((b && b->defined()) ? &*b : nullptr);
  const bool f32 = p && p->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  if (w && w->defined() && b && b->defined())
    TORCH_CHECK(w->scalar_type() == b->scalar_type(),
                "fastlm.layer_norm: weight and bias must have the same dtype, got ",
                w->scalar_type(), " and ", b->scalar_type());
  return f32;
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& p) {
  if (p && p->defined()) return p->contiguous();
  return std::nullopt;
}

constexpr int64_t kGrainRows = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  ln_check_fwd(input, weight, bias);
  const bool pf32 = params_f32(input, weight, bias);
  const at::Tensor x = input.contiguous();
  const auto w = contig(weight), b = contig(bias);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  if (N == 0) {
    mean.fill_(std::nanf(""));
    rstd.fill_(std::nanf(""));
    return {y, mean, rstd};
  }
  const float feps = static_cast<float>(eps);
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, M, kGrainRows, [&](int64_t r0, int64_t r1) {                            \
    fwd_##tag(x.const_data_ptr<T>(), static_cast<const W*>(opt_ptr(w)),                       \
              static_cast<const W*>(opt_ptr(b)), y.mutable_data_ptr<T>(),                     \
              mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), r0, r1, N,     \
              feps);                                                                          \
  })
  FASTLM_LN_DISPATCH(x.scalar_type(), pf32, CALL)
#undef CALL
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool weight_grad, bool bias_grad) {
  ln_check_bwd(grad_out, input, mean, rstd, weight, bias, weight_grad, bias_grad);
  const bool pf32 = params_f32(input, weight, bias);
  const at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  const auto w = contig(weight);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dw = ln_param_grad(weight, weight_grad, x);
  at::Tensor db = ln_param_grad(bias, bias_grad, x);
  const bool partials = weight_grad || bias_grad;
  // Fixed chunking (independent of the thread count) keeps dw/db bit-reproducible.
  const int64_t chunks = partials ? std::max<int64_t>(1, std::min<int64_t>(M, 32)) : 1;
  at::Tensor part;
  if (partials) part = at::empty({2, chunks, N}, x.options().dtype(at::kFloat)).zero_();
  if (M > 0 && N > 0) {
    // Both partial rows are accumulated whenever either gradient is wanted.
    float* pw = partials ? part.mutable_data_ptr<float>() : nullptr;
    float* pb = partials ? part.mutable_data_ptr<float>() + chunks * N : nullptr;
#define CALL(T, W, tag)                                                                       \
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {                                \
    for (int64_t c = c0; c < c1; ++c) {                                                       \
      const int64_t r0 = c * M / chunks, r1 = (c + 1) * M / chunks;                           \
      bwd_##tag(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), mu.const_data_ptr<float>(),    \
                rs.const_data_ptr<float>(), static_cast<const W*>(opt_ptr(w)),                \
                dx.mutable_data_ptr<T>(), pw ? pw + c * N : nullptr,                          \
                pb ? pb + c * N : nullptr, r0, r1, N);                                        \
    }                                                                                         \
  })
    FASTLM_LN_DISPATCH(x.scalar_type(), pf32, CALL)
#undef CALL
  }
  // Sum the chunk partials column by column, in chunk order.
  auto reduce = [&](at::Tensor& out, const float* p) {
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
  };
  if (weight_grad) reduce(dw, part.const_data_ptr<float>());
  if (bias_grad) reduce(db, part.const_data_ptr<float>() + chunks * N);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastlm
