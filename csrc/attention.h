// Shared by the CPU and CUDA attention kernels: the dropout bits of docs/attention.md
// (Philox4x32-10, host and device), and the host-side argument checks, so every backend
// rejects the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#define FASTLM_UNROLL _Pragma("unroll")
#else
#define FASTLM_HD inline __attribute__((always_inline))
#define FASTLM_UNROLL _Pragma("GCC unroll 10")
#endif

namespace fastlm {

// ---------------------------------------------------------------------------------------------
// Dropout bits. One Philox call gives 128 bits: 16 bits for each of 8 consecutive keys.
struct Philox4 {
  uint32_t x[4];
};

FASTLM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
FASTLM_UNROLL
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The 16 random bits of key j within the Philox output for keys (j & ~7) .. (j | 7).
FASTLM_HD uint32_t dropout_bits16(const Philox4& r, int lane) {
  return (r.x[lane >> 1] >> (16 * (lane & 1))) & 0xFFFFu;
}

// All 8 keep bits of one Philox call (bit `lane` set = keep), for the group of keys j0 = 8*g.
FASTLM_HD uint32_t dropout_keep8(uint64_t seed, uint64_t offset, uint32_t bh, uint32_t i,
                                 uint32_t group, uint32_t thresh) {
  const Philox4 r = philox4x32_10(group, i, bh, uint32_t(offset), uint32_t(seed),
                                  uint32_t(seed >> 32));
  uint32_t keep = 0;
FASTLM_UNROLL
  for (int lane = 0; lane < 8; ++lane) keep |= uint32_t(dropout_bits16(r, lane) >= thresh) << lane;
  return keep;
}

// ---------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kAttentionMaxHeadDim = 256;

// floor(p * 65536 + 0.5) clamped to 65536, computed in double: the same on every backend.
inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 65536.0 + 0.5);
  return t >= 65536.0 ? 65536u : (t <= 0.0 ? 0u : uint32_t(t));
}
// 1 / (1 - rate), with rate = thresh / 65536 exactly; 0 when everything is dropped.
inline float dropout_scale(uint32_t thresh) {
  return thresh >= 65536u ? 0.f : float(65536.0 / double(65536u - thresh));
}

inline bool attn_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks of attention_fwd's arguments (docs/attention.md). `who` names the op in messages.
inline void attn_check_fwd(const char* who, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const std::optional<at::Tensor>& mask,
                           const std::optional<at::Tensor>& rng, double dropout_p,
                           bool is_causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who,
              ": query, key and value must be 4-D (batch, heads, length, head dim), got ",
              q.dim(), "-D, ", k.dim(), "-D and ", v.dim(), "-D");
  TORCH_CHECK(attn_supported_dtype(q.scalar_type()), who,
              ": query must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), who,
              ": key and value must have query's dtype (", q.scalar_type(), "), got ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), who,
              ": query, key and value must be on one device, got ", q.device(), ", ",
              k.device(), " and ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), who,
              ": query, key and value must have the same batch size, got ", q.size(0), ", ",
              k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, who,
              ": the query heads (", q.size(1), ") must be a multiple of the key/value heads (",
              k.size(1), " and ", v.size(1), ")");
  TORCH_CHECK(k.size(2) == v.size(2), who, ": key and value must have the same length, got ",
              k.size(2), " and ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), who, ": key's head dim (", k.size(3),
              ") must equal query's (", q.size(3), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kAttentionMaxHeadDim && v.size(3) >= 1 &&
                  v.size(3) <= kAttentionMaxHeadDim,
              who, ": head dims must be between 1 and ", kAttentionMaxHeadDim, ", got query/key ",
              q.size(3), " and value ", v.size(3));
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, who,
              ": query, key and value must have stride 1 in the last dimension");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(!is_causal, who, ": pass either attn_mask or is_causal=True, not both");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(1) &&
                    m.size(2) == q.size(2) && m.size(3) == k.size(2),
                who, ": mask must have shape (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                ", ", k.size(2), ") (expand it), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() ||
                    m.scalar_type() == at::kFloat,
                who, ": mask must be bool, float32 or query's dtype, got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), who, ": mask is on ", m.device(),
                " but query is on ", q.device());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, who,
              ": dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng.has_value() && rng->defined() && rng->numel() == 2 &&
                    rng->scalar_type() == at::kLong && rng->device() == q.device(),
                who, ": dropout needs rng, an int64 tensor (seed, offset) on ", q.device());
  }
}

// Checks of the options after scale (docs/attention.md, "Causal, windows, soft-capping").
inline void attn_check_opts(const char* who, int64_t window_left, int64_t window_right,
                            double softcap) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, who,
              ": window_left and window_right must be >= -1 (-1: unbounded), got ", window_left,
              " and ", window_right);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), who,
              ": softcap must be finite and >= 0 (0: off), got ", softcap);
}

// Checks of attention_bwd's arguments: attention_fwd's, then grad_out, out and lse.
inline void attn_check_bwd(const char* who, const at::Tensor& grad_out, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                           const std::optional<at::Tensor>& rng, double dropout_p,
                           bool is_causal) {
  attn_check_fwd(who, q, k, v, mask, rng, dropout_p, is_causal);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), Ev = v.size(3);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == Hq &&
                  grad_out.size(2) == L && grad_out.size(3) == Ev,
              who, ": grad_out must have shape (", B, ", ", Hq, ", ", L, ", ", Ev, "), got ",
              grad_out.sizes());
  TORCH_CHECK(out.dim() == 4 && out.sizes() == grad_out.sizes(), who,
              ": out must have shape (", B, ", ", Hq, ", ", L, ", ", Ev, "), got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              who, ": grad_out and out must have query's dtype (", q.scalar_type(), "), got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == L &&
                  lse.scalar_type() == at::kFloat,
              who, ": lse must be float32 of shape (", B, ", ", Hq, ", ", L, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              who, ": grad_out, out and lse must be on query's device (", q.device(), ")");
}

// ---------------------------------------------------------------------------------------------
// Varlen (packed sequences): q (total_q, Hq, E), k (total_k, Hk, E), v (total_k, Hk, Ev) run as
// the dense problem's views (1, H, total, dim), with per-sequence rows from the offsets.
inline at::Tensor as_4d(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }

inline void varlen_check(const char* who, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         const std::optional<at::Tensor>& rng, double dropout_p,
                         bool is_causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, who,
              ": q, k and v must be 3-D (total, heads, head dim), got ", q.dim(), "-D, ", k.dim(),
              "-D and ", v.dim(), "-D");
  for (const at::Tensor* cu : {&cu_q, &cu_k}) {
    const char* name = cu == &cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TORCH_CHECK(cu->dim() == 1 && cu->numel() >= 1 &&
                    (cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong),
                who, ": ", name, " must be a 1-D int32/int64 tensor of n + 1 offsets, got ",
                cu->scalar_type(), " of shape ", cu->sizes());
    TORCH_CHECK(cu->device() == q.device(), who, ": ", name, " is on ", cu->device(),
                " but q is on ", q.device());
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), who,
              ": cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_q.numel(),
              " and ", cu_k.numel());
  attn_check_fwd(who, as_4d(q), as_4d(k), as_4d(v), std::nullopt, rng, dropout_p, is_causal);
}

// varlen_check plus the backward's own tensors: grad_out, out (total_q, Hq, Ev), lse (Hq, total_q).
inline void varlen_check_bwd(const char* who, const at::Tensor& grad_out, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const at::Tensor& cu_q,
                             const at::Tensor& cu_k, const std::optional<at::Tensor>& rng,
                             double dropout_p, bool is_causal) {
  varlen_check(who, q, k, v, cu_q, cu_k, rng, dropout_p, is_causal);
  const int64_t Tq = q.size(0), Hq = q.size(1), Ev = v.size(2);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == Tq && grad_out.size(1) == Hq &&
                  grad_out.size(2) == Ev && out.dim() == 3 && out.sizes() == grad_out.sizes(),
              who, ": grad_out and out must have shape (", Tq, ", ", Hq, ", ", Ev, "), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == Hq && lse.size(1) == Tq, who,
              ": lse must have shape (", Hq, ", ", Tq, "), got ", lse.sizes());
  attn_check_bwd(who, as_4d(grad_out), as_4d(q), as_4d(k), as_4d(v), as_4d(out),
                 lse.unsqueeze(0), std::nullopt, rng, dropout_p, is_causal);
}

}  // namespace fastlm
