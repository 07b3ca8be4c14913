// Rotary position embeddings (fastlm.apply_rotary_emb; docs/rotary.md): the host-side argument
// checks shared by the CPU and CUDA kernels, so every backend rejects the same inputs with the
// same words, and the per-pair formula (host and device).
//
// A row is D elements of q or k at one (batch, head, position); its pairs (p, q) are (j, j + D/2)
// for the rotate-half layout and (2j, 2j + 1) for the interleaved (GPT-J) one, j < D/2. With
// c = cos, s = sin of the row's (batch, position):
//   forward:   o_p = x_p c_p - x_q s_p,   o_q = x_q c_q + x_p s_q
//   backward:  o_p = x_p c_p + x_q s_q,   o_q = x_q c_q - x_p s_p   (the transposed rotation)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "attention.h"  // FASTLM_HD

namespace fastlm {

constexpr const char* kRotary = "fastlm.apply_rotary_emb";

FASTLM_HD void rotary_pair(float xp, float xq, float cp, float cq, float sp, float sq, bool bwd,
                           float& op, float& oq) {
  if (bwd) {
    op = xp * cp + xq * sq;
    oq = xq * cq - xp * sp;
  } else {
    op = xp * cp - xq * sp;
    oq = xq * cq + xp * sq;
  }
}

// q (B,Hq,S,D) and k (B,Hk,S,D) of one float dtype and device, D even; cos and sin (1 or B, S, D)
// of q's dtype or float32. `qn`/`kn` name them in messages (grad_q, grad_k in the backward).
inline void rotary_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, const char* qn = "q", const char* kn = "k") {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, kRotary, ": ", qn,
              " must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, kRotary, ": ", qn, " and ", kn,
              " must be 4-D (batch, heads, seq, head_dim), got ", q.dim(), "-D and ", k.dim(),
              "-D");
  TORCH_CHECK(k.scalar_type() == t && k.device() == q.device(), kRotary, ": ", kn,
              " must have ", qn, "'s dtype and device (", t, ", ", q.device(), "), got ",
              k.scalar_type(), ", ", k.device());
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == S && k.size(3) == D, kRotary, ": ", kn,
              " must have ", qn, "'s batch, seq and head_dim (", B, ", *, ", S, ", ", D,
              "), got shape ", k.sizes());
  TORCH_CHECK(D % 2 == 0, kRotary, ": head_dim must be even, got ", D);
  for (const at::Tensor* c : {&cos, &sin}) {
    TORCH_CHECK(c->dim() == 3 && (c->size(0) == 1 || c->size(0) == B) && c->size(1) == S &&
                    c->size(2) == D,
                kRotary, ": cos and sin must be (1 or ", B, ", ", S, ", ", D,
                ") (batch, seq, head_dim), got shape ", c->sizes());
    TORCH_CHECK((c->scalar_type() == t || c->scalar_type() == at::kFloat) &&
                    c->device() == q.device(),
                kRotary, ": cos and sin must be ", t, " or float32 on ", q.device(), ", got ",
                c->scalar_type(), " on ", c->device());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(), kRotary,
              ": cos and sin must have one shape and dtype, got ", cos.sizes(), " ",
              cos.scalar_type(), " and ", sin.sizes(), " ", sin.scalar_type());
}

// The operand with a unit last stride (a copy otherwise) and its output: empty_like keeps the
// layout of a dense input (HF's q is a (B,S,H,D) buffer seen as (B,H,S,D)).
struct RotaryIO {
  at::Tensor x, out;
};

inline RotaryIO rotary_io(const at::Tensor& x) {
  RotaryIO r;
  r.x = x.stride(3) == 1 ? x : x.contiguous();
  r.out = at::empty_like(r.x);
  return r;
}

}  // namespace fastlm
