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
                           const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "fastlm.layer_norm: ", name,
              " must be 1-D with ", x.size(1), " elements (the normalized size), got shape ",
              p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat,
              "fastlm.layer_norm: ", name, " must have the input's dtype (", x.scalar_type(),
              ") or float32, got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), "fastlm.layer_norm: ", name, " is on ", p->device(),
              " but input is on ", x.device(), "; expected both on the same device");
}

inline void ln_check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "fastlm.layer_norm: ", name,
              " must be 2-D (rows, normalized size), got ", x.dim(), "-D");
  TORCH_CHECK(ln_supported_dtype(x.scalar_type()), "fastlm.layer_norm: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= kLayerNormMaxN, "fastlm.layer_norm: the normalized size is ",
              x.size(1), " elements but at most ", kLayerNormMaxN, " are supported");
}

inline void ln_check_fwd(const at::Tensor& x, const std::optional<at::Tensor>& w,
                         const std::optional<at::Tensor>& b) {
  ln_check_input(x, "input");
  ln_check_param(w, "weight", x);
  ln_check_param(b, "bias", x);
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
