// Host-side argument checks and output allocation shared by the CPU and CUDA LayerNorm kernels,
// so that every backend rejects the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <limits>

namespace fastlm {

// Rows longer than this are rejected (the kernels index a row with 32-bit offsets and the
// Triton kernels loop over at most this many elements); every backend uses the same limit.
constexpr int64_t kLayerNormMaxN = int64_t(1) << 20;

inline bool ln_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void ln_check_param(const std::optional<at::Tensor>& p, const char* name,
                           const at::Tensor& x, const char* who = "fastlm.layer_norm") {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), who, ": ", name,
              " must be 1-D with ", x.size(1), " elements (the normalized size), got shape ",
              p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat,
              who, ": ", name, " must have the input's dtype (", x.scalar_type(),
              ") or float32, got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), who, ": ", name, " is on ", p->device(),
              " but input is on ", x.device(), "; expected both on the same device");
}

inline void ln_check_input(const at::Tensor& x, const char* name,
                           const char* who = "fastlm.layer_norm") {
  TORCH_CHECK(x.dim() == 2, who, ": ", name,
              " must be 2-D (rows, normalized size), got ", x.dim(), "-D");
  TORCH_CHECK(ln_supported_dtype(x.scalar_type()), who, ": ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= kLayerNormMaxN, who, ": the normalized size is ",
              x.size(1), " elements but at most ", kLayerNormMaxN, " are supported");
}

inline void ln_check_fwd(const at::Tensor& x, const std::optional<at::Tensor>& w,
                         const std::optional<at::Tensor>& b,
                         const char* who = "fastlm.layer_norm") {
  ln_check_input(x, "input", who);
  ln_check_param(w, "weight", x, who);
  ln_check_param(b, "bias", x, who);
}

// RMSNorm (who = "fastlm.rms_norm") has no mean: it passes rstd for both.
inline void ln_check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const std::optional<at::Tensor>& w,
                         const std::optional<at::Tensor>& b, bool weight_grad, bool bias_grad,
                         const char* who = "fastlm.layer_norm") {
  ln_check_fwd(x, w, b, who);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              who, " backward: grad_out must match input (shape ", x.sizes(), ", ",
              x.scalar_type(), ", ", x.device(), "), got shape ", dy.sizes(), ", ",
              dy.scalar_type(), ", ", dy.device());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0) && s->scalar_type() == at::kFloat &&
                    s->device() == x.device(),
                who, " backward: the saved statistics (mean, rstd) must be float32 of shape (",
                x.size(0), ",) on ", x.device(), ", got ", s->sizes(), " ", s->scalar_type());
  }
  TORCH_CHECK(!weight_grad || (w.has_value() && w->defined()),
              who, " backward: weight_grad=True needs a weight");
  TORCH_CHECK(!bias_grad || (b.has_value() && b->defined()),
              who, " backward: bias_grad=True needs a bias");
}

// ------------------------------------------------------------------------------------------
// Fused residual add + dropout + LayerNorm (fastlm.add_layer_norm, docs/layer_norm.md).
constexpr const char* kAddLN = "fastlm.add_layer_norm";

// `t` (named `name`) must have the shape, dtype and device of `like` (named `like_name`).
inline void aln_check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                           const char* like_name, const char* who = kAddLN) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              who, ": ", name, " must match ", like_name, " (shape ", like.sizes(), ", ",
              like.scalar_type(), ", ", like.device(), "), got shape ", t.sizes(), ", ",
              t.scalar_type(), ", ", t.device());
}

// Dropout is on when dropout_p > 0; it then needs rng, an int64 (seed, offset) on x's device.
inline bool aln_check_dropout(const std::optional<at::Tensor>& rng, double dropout_p,
                              const at::Tensor& x, const char* who = kAddLN) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, who, ": dropout_p must be in [0, 1], got ",
              dropout_p);
  if (dropout_p == 0.0) return false;
  TORCH_CHECK(rng.has_value() && rng->defined() && rng->scalar_type() == at::kLong &&
                  rng->numel() == 2 && rng->device() == x.device(),
              who, ": dropout needs rng, an int64 tensor (seed, offset) on ", x.device());
  return true;
}

inline bool aln_check_fwd(const at::Tensor& input, const at::Tensor& residual,
                          const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& rng, double dropout_p,
                          const char* who = kAddLN) {
  ln_check_fwd(input, w, b, who);
  aln_check_like(residual, "residual", input, "input", who);
  return aln_check_dropout(rng, dropout_p, input, who);
}

// Returns whether the backward computes grad_input (dropout on and input_grad set).
inline bool aln_check_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& grad_summed,
                          const at::Tensor& summed, const at::Tensor& mean,
                          const at::Tensor& rstd, const std::optional<at::Tensor>& w,
                          const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& rng, double dropout_p,
                          bool input_grad, bool weight_grad, bool bias_grad,
                          const char* who = kAddLN) {
  ln_check_fwd(summed, w, b, who);
  aln_check_like(dy, "grad_out", summed, "summed", who);
  if (grad_summed.has_value() && grad_summed->defined())
    aln_check_like(*grad_summed, "grad_summed", summed, "summed", who);
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == summed.size(0) && s->scalar_type() == at::kFloat &&
                    s->device() == summed.device(),
                who, " backward: the saved statistics (mean, rstd) must be float32 of shape (",
                summed.size(0), ",) on ", summed.device(), ", got ", s->sizes(), " ",
                s->scalar_type());
  }
  TORCH_CHECK(!weight_grad || (w.has_value() && w->defined()),
              who, " backward: weight_grad=True needs a weight");
  TORCH_CHECK(!bias_grad || (b.has_value() && b->defined()),
              who, " backward: bias_grad=True needs a bias");
  const bool drop = aln_check_dropout(rng, dropout_p, summed, who);
  return drop && input_grad;
}

// ------------------------------------------------------------------------------------------
// Operands and outputs, shared by the CPU and CUDA ops: called after the checks above (on CUDA
// under a guard for the input's device), so that every backend returns the same outputs for
// the empty cases.

inline bool has(const std::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

inline const void* opt_ptr(const std::optional<at::Tensor>& p) {
  return has(p) ? p->data_ptr() : nullptr;
}

inline std::optional<at::Tensor> contig(const std::optional<at::Tensor>& p) {
  if (has(p)) return p->contiguous();
  return std::nullopt;
}

// Whether the kernels read float32 parameters with a 16-bit input; weight and bias must then
// have one dtype.
inline bool params_f32(const at::Tensor& x, const std::optional<at::Tensor>& w,
                       const std::optional<at::Tensor>& b) {
  if (has(w) && has(b))
    TORCH_CHECK(w->scalar_type() == b->scalar_type(),
                "fastlm.layer_norm: weight and bias must have the same dtype, got ",
                w->scalar_type(), " and ", b->scalar_type());
  const at::Tensor* p = has(w) ? &*w : (has(b) ? &*b : nullptr);
  return p && p->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
}

// grad_weight / grad_bias: the parameter's shape and dtype when requested, else empty float32.
inline at::Tensor ln_param_grad(const std::optional<at::Tensor>& p, bool wanted,
                                const at::Tensor& x) {
  if (wanted) return at::empty({x.size(1)}, p->options());
  return at::empty({0}, x.options().dtype(at::kFloat));
}

// A forward's contiguous operands and its outputs: layer_norm's (y, mean, rstd), or with a
// residual add_layer_norm's (y, summed, mean, rstd). `done`: M or N is 0 and the outputs are
// final (mean and rstd NaN for N == 0, as torch's). rms: RMSNorm, whose mean is empty.
struct LnFwd {
  at::Tensor x, res;
  std::optional<at::Tensor> w, b;
  bool pf32 = false;
  int64_t M = 0, N = 0;
  at::Tensor y, summed, mean, rstd;
  bool done = false;
};

inline LnFwd ln_fwd_prepare(const at::Tensor& input, const at::Tensor* residual,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool rms = false) {
  LnFwd f;
  f.pf32 = params_f32(input, weight, bias);
  f.x = input.contiguous();
  if (residual) f.res = residual->contiguous();
  f.w = contig(weight);
  f.b = contig(bias);
  f.M = f.x.size(0);
  f.N = f.x.size(1);
  f.y = at::empty({f.M, f.N}, f.x.options());
  if (residual) f.summed = at::empty({f.M, f.N}, f.x.options());
  f.mean = at::empty({rms ? 0 : f.M}, f.x.options().dtype(at::kFloat));
  f.rstd = at::empty({f.M}, f.x.options().dtype(at::kFloat));
  f.done = f.M == 0 || f.N == 0;
  if (f.M > 0 && f.N == 0) {
    f.mean.fill_(std::numeric_limits<float>::quiet_NaN());
    f.rstd.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return f;
}

// A backward's contiguous operands and its outputs: layer_norm's (dx, dw, db), or with `add`
// add_layer_norm's (grad_residual in dx, grad_input in din: (M, N) when want_din, else empty;
// dw, db). `done`: M or N is 0 and the outputs are final (dw and db zero for M == 0).
struct LnBwd {
  at::Tensor dy, gs, x, mu, rs;
  std::optional<at::Tensor> w;
  bool pf32 = false;
  int64_t M = 0, N = 0;
  at::Tensor dx, din, dw, db;
  bool done = false;
};

inline LnBwd ln_bwd_prepare(const at::Tensor& grad_out,
                            const std::optional<at::Tensor>& grad_summed, const at::Tensor& input,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool add, bool want_din,
                            bool weight_grad, bool bias_grad) {
  LnBwd g;
  g.pf32 = params_f32(input, weight, bias);
  g.x = input.contiguous();
  g.dy = grad_out.contiguous();
  if (has(grad_summed)) g.gs = grad_summed->contiguous();
  g.mu = mean.contiguous();
  g.rs = rstd.contiguous();
  g.w = contig(weight);
  g.M = g.x.size(0);
  g.N = g.x.size(1);
  g.dx = at::empty({g.M, g.N}, g.x.options());
  if (add) g.din = want_din ? at::empty({g.M, g.N}, g.x.options()) : at::empty({0}, g.x.options());
  g.dw = ln_param_grad(weight, weight_grad, g.x);
  g.db = ln_param_grad(bias, bias_grad, g.x);
  g.done = g.M == 0 || g.N == 0;
  if (g.M == 0) {
    if (g.dw.numel()) g.dw.zero_();
    if (g.db.numel()) g.db.zero_();
  }
  return g;
}

}  // namespace fastlm
