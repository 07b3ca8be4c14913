// Host-side argument checks shared by the CPU and CUDA Adam kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastlm {

inline void adam_check_list(at::TensorList ts, at::TensorList params, const char* name,
                            bool same_dtype_as_params, bool float32) {
  TORCH_CHECK(ts.size() == params.size(), "fastlm.adam_step_: ", name, " has ", ts.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.device() == p.device(), "fastlm.adam_step_: ", name, "[", i, "] is on ",
                t.device(), " but params[", i, "] is on ", p.device());
    TORCH_CHECK(t.sizes() == p.sizes(), "fastlm.adam_step_: ", name, "[", i, "] has shape ",
                t.sizes(), " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(t.is_contiguous(), "fastlm.adam_step_: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(!t.is_sparse(), "fastlm.adam_step_: ", name, "[", i,
                "] is sparse; fastlm's Adam does not support sparse tensors");
    if (same_dtype_as_params)
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fastlm.adam_step_: ", name, "[", i,
                  "] is ", t.scalar_type(), " but params[", i, "] is ", p.scalar_type());
    if (float32)
      TORCH_CHECK(t.scalar_type() == at::kFloat, "fastlm.adam_step_: ", name, "[", i,
                  "] must be float32, got ", t.scalar_type());
  }
}

// Checks every list against params; returns the moments' dtype (params' dtype or float32).
inline at::ScalarType adam_check(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList max_exp_avg_sqs, at::TensorList masters,
                                 at::TensorList steps, bool amsgrad) {
  if (params.empty()) return at::kFloat;
  const at::ScalarType pt = params[0].scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kHalf || pt == at::kBFloat16,
              "fastlm.adam_step_: params must be float32, float16 or bfloat16, got ", pt);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == pt && params[i].device() == params[0].device(),
                "fastlm.adam_step_: every param must have params[0]'s dtype and device (",
                pt, ", ", params[0].device(), "), params[", i, "] is ",
                params[i].scalar_type(), " on ", params[i].device());
    TORCH_CHECK(params[i].is_contiguous(), "fastlm.adam_step_: params[", i,
                "] must be contiguous");
  }
  adam_check_list(grads, params, "grads", true, false);
  adam_check_list(exp_avgs, params, "exp_avgs", false, false);
  adam_check_list(exp_avg_sqs, params, "exp_avg_sqs", false, false);
  const at::ScalarType st = exp_avgs[0].scalar_type();
  TORCH_CHECK(st == pt || st == at::kFloat, "fastlm.adam_step_: exp_avgs must have the params' ",
              "dtype or float32, got ", st);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(exp_avgs[i].scalar_type() == st && exp_avg_sqs[i].scalar_type() == st,
                "fastlm.adam_step_: every exp_avg and exp_avg_sq must be ", st);
  if (amsgrad) {
    adam_check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", false, false);
    for (const auto& t : max_exp_avg_sqs)
      TORCH_CHECK(t.scalar_type() == st, "fastlm.adam_step_: max_exp_avg_sqs must be ", st);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "fastlm.adam_step_: max_exp_avg_sqs must be empty "
                "unless amsgrad");
  }
  if (!masters.empty()) adam_check_list(masters, params, "masters", false, true);
  TORCH_CHECK(steps.size() == params.size(), "fastlm.adam_step_: steps has ", steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device() == params[i].device(),
                "fastlm.adam_step_: steps[", i, "] must be a float32 scalar on ",
                params[i].device());
  return st;
}

inline void adam_check_scalar(const std::optional<at::Tensor>& t, const char* name,
                              const at::Device& device) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device,
              "fastlm.adam_step_: ", name, " must be a float32 scalar on ", device, ", got ",
              t->scalar_type(), " with ", t->numel(), " elements on ", t->device());
}

}  // namespace fastlm
