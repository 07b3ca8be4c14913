// Fused Adam/AdamW step on the CPU: every tensor of the list in one call, each split into
// chunks across threads; per element, in float32 (the formula of torch's fused Adam):
//   g = grad / grad_scale * clip_coef, negated if maximize
//   AdamW: p *= 1 - lr * wd          Adam: g += wd * p
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
//   vmax = max(vmax, v) (amsgrad);    denom = sqrt(v or vmax) / sqrt(1 - beta2^step) + eps
//   p -= lr / (1 - beta1^step) * m / denom
// With master weights the float32 master is updated and the param is its rounding.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../adam.h"
#include "isa.h"  // FASTLM_CLONES, FASTLM_INLINE


namespace fastlm {
namespace {

// Per-tensor constants of one step.
struct AdamScalars {
  float lr, beta1, beta2, eps, wd;
  float one_m_b1, one_m_b2;  // 1 - beta in double, then rounded (as torch does)
  float decay;               // AdamW: 1 - lr * wd in double, then rounded (as torch does)
  float step_size;      // lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float g_mul;          // 1 / grad_scale * clip_coef, negated if maximize
  bool decoupled;
};

// Weight decay: none, decoupled (AdamW) or added to the gradient (Adam). A template argument,
// like AMSGRAD and MASTER, so the element loop has no branch and vectorizes.
enum WdMode { kNoDecay = 0, kDecoupled = 1, kL2 = 2 };

template <int WD, bool AMSGRAD, bool MASTER, typename P, typename S>
FASTLM_INLINE void adam_span(P* __restrict p, const P* __restrict g, S* __restrict m,
                             S* __restrict v, S* __restrict vmax, float* __restrict master,
                             int64_t n, const AdamScalars& k) {
  const float one_m_b1 = k.one_m_b1, one_m_b2 = k.one_m_b2;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pv = MASTER ? master[i] : to_f(p[i]);
    float gv = to_f(g[i]) * k.g_mul;
    if constexpr (WD == kDecoupled) pv *= k.decay;
    if constexpr (WD == kL2) gv += k.wd * pv;
    const float mv = k.beta1 * to_f(m[i]) + one_m_b1 * gv;
    const float vv = k.beta2 * to_f(v[i]) + one_m_b2 * gv * gv;
    m[i] = from_f<S>(mv);
    v[i] = from_f<S>(vv);
    float vd = vv;
    if constexpr (AMSGRAD) {
      vd = std::max(to_f(vmax[i]), vv);
      vmax[i] = from_f<S>(vd);
    }
    const float denom = std::sqrt(vd) / k.bc2_sqrt + k.eps;
    pv -= k.step_size * mv / denom;
    if constexpr (MASTER) master[i] = pv;
    p[i] = from_f<P>(pv);
  }
}

template <int WD, typename P, typename S>
FASTLM_INLINE void adam_wd(P* p, const P* g, S* m, S* v, S* vmax, float* master, int64_t n,
                           const AdamScalars& k) {
  if (vmax && master) adam_span<WD, true, true>(p, g, m, v, vmax, master, n, k);
  else if (vmax) adam_span<WD, true, false>(p, g, m, v, vmax, master, n, k);
  else if (master) adam_span<WD, false, true>(p, g, m, v, vmax, master, n, k);
  else adam_span<WD, false, false>(p, g, m, v, vmax, master, n, k);
}

#define FASTLM_ADAM_DRIVER(P, S, tag)                                                       \
  FASTLM_CLONES void adam_##tag(P* p, const P* g, S* m, S* v, S* vmax, float* master,       \
                                int64_t n, const AdamScalars& k) {                          \
    if (k.wd == 0.f) adam_wd<kNoDecay>(p, g, m, v, vmax, master, n, k);                     \
    else if (k.decoupled) adam_wd<kDecoupled>(p, g, m, v, vmax, master, n, k);              \
    else adam_wd<kL2>(p, g, m, v, vmax, master, n, k);                                      \
  }
FASTLM_ADAM_DRIVER(float, float, f32)
FASTLM_ADAM_DRIVER(c10::Half, c10::Half, f16)
FASTLM_ADAM_DRIVER(c10::Half, float, f16_f32)
FASTLM_ADAM_DRIVER(c10::BFloat16, c10::BFloat16, bf16)
FASTLM_ADAM_DRIVER(c10::BFloat16, float, bf16_f32)
#undef FASTLM_ADAM_DRIVER

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

float scalar_or(const std::optional<at::Tensor>& t, float dflt) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<float>()[0] : dflt;
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList masters, at::TensorList steps, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& clip_coef) {
  const at::ScalarType st = adam_check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                       masters, steps, amsgrad);
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  for (auto* t : {&lr_tensor, &grad_scale, &found_inf, &clip_coef})
    adam_check_scalar(*t, "lr_tensor, grad_scale, found_inf and clip_coef", dev);
  if (scalar_or(found_inf, 0.f) != 0.f) return;  // an inf/NaN gradient: skip the step
  const float lr_v = static_cast<float>((lr_tensor && lr_tensor->defined())
                                            ? double(lr_tensor->const_data_ptr<float>()[0])
                                            : lr);
  float g_mul = scalar_or(clip_coef, 1.f) / scalar_or(grad_scale, 1.f);
  if (maximize) g_mul = -g_mul;
  const at::ScalarType pt = params[0].scalar_type();
  const bool s32 = st == at::kFloat && pt != at::kFloat;
  // Per-tensor scalars, then one parallel loop over fixed kGrain-element pieces of all the
  // tensors (one fork/join for the whole step instead of one per tensor).
  std::vector<AdamScalars> ks(params.size());
  std::vector<std::pair<uint32_t, int64_t>> tasks;  // (tensor, first element)
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    const double step = steps[t].const_data_ptr<float>()[0];
    AdamScalars& k = ks[t];
    k.lr = lr_v;
    k.beta1 = float(beta1);
    k.beta2 = float(beta2);
    k.eps = float(eps);
    k.wd = float(weight_decay);
    k.one_m_b1 = float(1.0 - beta1);
    k.decay = float(1.0 - double(lr_v) * weight_decay);
    k.one_m_b2 = float(1.0 - beta2);
    k.decoupled = decoupled;
    k.step_size = float(lr_v / (1.0 - std::pow(beta1, step)));
    k.bc2_sqrt = float(std::sqrt(1.0 - std::pow(beta2, step)));
    k.g_mul = g_mul;
    for (int64_t i = 0; i < n; i += kGrain) tasks.emplace_back(uint32_t(t), i);
  }
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const size_t t = tasks[task].first;
      const int64_t i0 = tasks[task].second;
      const int64_t n = std::min(kGrain, params[t].numel() - i0);
      const AdamScalars& k = ks[t];
      float* master = masters.empty() ? nullptr : masters[t].mutable_data_ptr<float>();
      void* vmax = amsgrad ? max_exp_avg_sqs[t].mutable_data_ptr() : nullptr;
#define CALL(P, S, tag)                                                                    \
  adam_##tag(static_cast<P*>(params[t].mutable_data_ptr()) + i0,                            \
             static_cast<const P*>(grads[t].const_data_ptr()) + i0,                         \
             static_cast<S*>(exp_avgs[t].mutable_data_ptr()) + i0,                          \
             static_cast<S*>(exp_avg_sqs[t].mutable_data_ptr()) + i0,                       \
             vmax ? static_cast<S*>(vmax) + i0 : nullptr, master ? master + i0 : nullptr, n, k)
      switch (pt) {
        case at::kFloat: CALL(float, float, f32); break;
        case at::kHalf:
          if (s32) { CALL(c10::Half, float, f16_f32); }
          else { CALL(c10::Half, c10::Half, f16); }
          break;
        default:
          if (s32) { CALL(c10::BFloat16, float, bf16_f32); }
          else { CALL(c10::BFloat16, c10::BFloat16, bf16); }
          break;
      }
#undef CALL
    }
  });
}

template <typename T>
FASTLM_INLINE float sumsq_span(const T* __restrict x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += to_f(x[i]) * to_f(x[i]);
  return s;
}
FASTLM_CLONES float sumsq_f32(const float* x, int64_t n) { return sumsq_span(x, n); }
FASTLM_CLONES float sumsq_f16(const c10::Half* x, int64_t n) { return sumsq_span(x, n); }
FASTLM_CLONES float sumsq_bf16(const c10::BFloat16* x, int64_t n) { return sumsq_span(x, n); }

at::Tensor sum_of_squares_cpu(at::TensorList tensors) {
  // Fixed chunks of kGrain elements per tensor, each summed in float, the chunk sums added in
  // double in order: the same bits for any thread count.
  std::vector<std::pair<size_t, int64_t>> chunks;  // (tensor, first element)
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && !x.is_sparse(),
                "fastlm.sum_of_squares: tensors[", t, "] must be a contiguous dense CPU tensor");
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "fastlm.sum_of_squares: tensors[", t, "] must be float32, float16 or bfloat16, "
                "got ", dt);
    for (int64_t i = 0; i < x.numel(); i += kGrain) chunks.emplace_back(t, i);
  }
  std::vector<float> part(chunks.size(), 0.f);
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const at::Tensor& x = tensors[chunks[c].first];
      const int64_t i0 = chunks[c].second, n = std::min(kGrain, x.numel() - i0);
      switch (x.scalar_type()) {
        case at::kFloat: part[c] = sumsq_f32(x.const_data_ptr<float>() + i0, n); break;
        case at::kHalf: part[c] = sumsq_f16(x.const_data_ptr<c10::Half>() + i0, n); break;
        default: part[c] = sumsq_bf16(x.const_data_ptr<c10::BFloat16>() + i0, n); break;
      }
    }
  });
  double total = 0.0;
  for (float v : part) total += v;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  out.mutable_data_ptr<float>()[0] = float(total);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("sum_of_squares", &sum_of_squares_cpu);
}

}  // namespace fastlm
