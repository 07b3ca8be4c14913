// Gated linear units (fastlm.swiglu, fastlm.geglu; docs/glu.md), shared by the CPU and CUDA
// kernels: the activations and their derivatives in float32 (host and device), and the host-side
// argument checks, so every backend rejects the same inputs with the same words.
//
//   out = act(gate) * up                    (rounded once to the input dtype)
//   grad_gate = grad_out * up * act'(gate),  grad_up = grad_out * act(gate)
#pragma once

#include <ATen/core/Tensor.h>

#include "attention.h"  // FASTLM_HD

namespace fastlm {

enum GluAct : int64_t { kSilu = 0, kGeluTanh = 1, kGeluErf = 2 };

inline const char* glu_who(int64_t act) {
  return act == kSilu ? "fastlm.swiglu" : "fastlm.geglu";
}

inline void glu_check(const at::Tensor& gate, const at::Tensor& up, int64_t act,
                      const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(act == kSilu || act == kGeluTanh || act == kGeluErf,
              "fastlm glu: activation must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf), got ", act);
  const char* who = glu_who(act);
  const auto t = gate.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, who,
              ": gate must be float32, float16 or bfloat16, got ", t);
  auto like = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.sizes() == gate.sizes() && x.scalar_type() == t && x.device() == gate.device(),
                who, ": ", name, " must match gate (shape ", gate.sizes(), ", ", t, ", ",
                gate.device(), "), got shape ", x.sizes(), ", ", x.scalar_type(), ", ",
                x.device());
  };
  like(up, "up");
  if (grad_out) like(*grad_out, "grad_out");
}

// Activation values and derivatives in float32. The CPU kernels pass an exp that the compiler
// vectorizes (Exp), the CUDA kernels the device's expf.
constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)

// tanh(u) = 1 - 2 / (1 + exp(2u)): exact at both saturations, no overflow to NaN.
template <typename Exp>
FASTLM_HD float tanh_via_exp(float u, Exp ex) {
  return 1.f - 2.f / (1.f + ex(2.f * u));
}

// erf(x) (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), for the CPU kernels.
template <typename Exp>
FASTLM_HD float erf_approx(float x, Exp ex) {
  const float ax = x < 0.f ? -x : x;
  const float t = 1.f / (1.f + 0.3275911f * ax);
  const float p =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                        t * 1.061405429f))));
  const float r = 1.f - p * ex(-ax * ax);
  return x < 0.f ? -r : r;
}

// act(g) and act'(g) for the activation ACT; ERF computes erf (device: erff).
template <int ACT, typename Exp, typename Erf>
FASTLM_HD void glu_act(float g, Exp ex, Erf erf_fn, float& a, float& da) {
  if constexpr (ACT == kSilu) {
    const float s = 1.f / (1.f + ex(-g));
    a = g * s;
    da = s * (1.f + g * (1.f - s));
  } else if constexpr (ACT == kGeluTanh) {
    const float g2 = g * g;
    const float t = tanh_via_exp(kSqrt2OverPi * g * (1.f + kGeluC * g2), ex);
    a = 0.5f * g * (1.f + t);
    da = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluC * g2);
  } else {
    const float e = erf_fn(g * kInvSqrt2);
    a = 0.5f * g * (1.f + e);
    da = 0.5f * (1.f + e) + g * kInvSqrt2Pi * ex(-0.5f * g * g);
  }
}

}  // namespace fastlm
