// Host-side argument checks and output allocation shared by the CPU and CUDA LayerNorm kernels,
// so that every backend rejects the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

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

inline void ln_check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const std::optional<at::Tensor>& w,
                         const std::optional<at::Tensor>& b, bool weight_grad, bool bias_grad) {
  ln_check_fwd(x, w, b);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              "fastlm.layer_norm backward: grad_out must match input (shape ", x.sizes(), ", ",
              x.scalar_type(), ", ", x.device(), "), got shape ", dy.sizes(), ", ",
              dy.scalar_type(), ", ", dy.device());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0) && s->scalar_type() == at::kFloat &&
                    s->device() == x.device(),
                "fastlm.layer_norm backward: mean and rstd must be float32 of shape (",
                x.size(0), ",) on ", x.device(), ", got ", s->sizes(), " ", s->scalar_type());
  }
  TORCH_CHECK(!weight_grad || (w.has_value() && w->defined()),
              "fastlm.layer_norm backward: weight_grad=True needs a weight");
  TORCH_CHECK(!bias_grad || (b.has_value() && b->defined()),
              "fastlm.layer_norm backward: bias_grad=True needs a bias");
}

// ------------------------------------------------------------------------------------------
// Fused residual add + dropout + LayerNorm (fastlm.add_layer_norm, docs/layer_norm.md).
constexpr const char* kAddLN = "fastlm.add_layer_norm";

// `t` (named `name`) must have the shape, dtype and device of `like` (named `like_name`).
inline void aln_check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                           const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              kAddLN, ": ", name, " must match ", like_name, " (shape ", like.sizes(), ", ",
              like.scalar_type(), ", ", like.device(), "), got shape ", t.sizes(), ", ",
              t.scalar_type(), ", ", t.device());
}

// Dropout is on when dropout_p > 0; it then needs rng, an int64 (seed, offset) on x's device.
inline bool aln_check_dropout(const std::optional<at::Tensor>& rng, double dropout_p,
                              const at::Tensor& x) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kAddLN, ": dropout_p must be in [0, 1], got ",
              dropout_p);
  if (dropout_p == 0.0) return false;
  TORCH_CHECK(rng.has_value() && rng->defined() && rng->scalar_type() == at::kLong &&
                  rng->numel() == 2 && rng->device() == x.device(),
              kAddLN, ": dropout needs rng, an int64 tensor (seed, offset) on ", x.device());
  return true;
}

inline bool aln_check_fwd(const at::Tensor& input, const at::Tensor& residual,
                          const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& rng, double dropout_p) {
  ln_check_fwd(input, w, b, kAddLN);
  aln_check_like(residual, "residual", input, "input");
  return aln_check_dropout(rng, dropout_p, input);
}

// Returns whether the backward computes grad_input (dropout on and input_grad set).
inline bool aln_check_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& grad_summed,
                          const at::Tensor& summed, const at::Tensor& mean,
                          const at::Tensor& rstd, const std::optional<at::Tensor>& w,
                          const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& rng, double dropout_p,
                          bool input_grad, bool weight_grad, bool bias_grad) {
  ln_check_fwd(summed, w, b, kAddLN);
  aln_check_like(dy, "grad_out", summed, "summed");
  if (grad_summed.has_value() && grad_summed->defined())
    aln_check_like(*grad_summed, "grad_summed", summed, "summed");
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == summed.size(0) && s->scalar_type() == at::kFloat &&
                    s->device() == summed.device(),
                kAddLN, " backward: mean and rstd must be float32 of shape (", summed.size(0),
                ",) on ", summed.device(), ", got ", s->sizes(), " ", s->scalar_type());
  }
  TORCH_CHECK(!weight_grad || (w.has_value() && w->defined()),
              kAddLN, " backward: weight_grad=True needs a weight");
  TORCH_CHECK(!bias_grad || (b.has_value() && b->defined()),
              kAddLN, " backward: bias_grad=True needs a bias");
  const bool drop = aln_check_dropout(rng, dropout_p, summed);
  return drop && input_grad;
}

// grad_weight / grad_bias: the parameter's shape and dtype when requested, else empty float32.
inline at::Tensor ln_param_grad(const std::optional<at::Tensor>& p, bool wanted,
                                const at::Tensor& x) {
  if (wanted) return at::empty({x.size(1)}, p->options());
  return at::empty({0}, x.options().dtype(at::kFloat));
}

inline const void* opt_ptr(const std::optional<at::Tensor>& p) {
  return (p.has_value() && p->defined()) ? p->data_ptr() : nullptr;
}

}  // namespace fastlm
