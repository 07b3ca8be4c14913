// The Hopper (sm_90a) attention kernels' entry points (attention_sm90.cu), called by the CUDA
// attention ops of attention.cu before their portable kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastlm {
namespace cuda {

// Runs the attention forward on the Hopper kernels and returns true when the dispatch table of
// attention_sm90.cu admits the problem on this device (q, k, v already in the layouts the
// portable kernels read; out and lse allocated); returns false, having done nothing, otherwise.
bool attention_fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
                        double dropout_p, bool is_causal, double scale, at::Tensor& out,
                        at::Tensor& lse);

// The backward on the Hopper kernels (same table as the forward; dout TMA-readable too), given
// lse and delta = rowsum(dout * out) (both (B, Hq, L) float32 contiguous); dq, dk, dv allocated
// contiguous. Returns false, having done nothing, when the table does not admit the problem.
bool attention_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
                        double dropout_p, bool is_causal, double scale, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv);

}  // namespace cuda
}  // namespace fastlm
