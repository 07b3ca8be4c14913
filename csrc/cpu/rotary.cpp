// Rotary embeddings on the CPU (fastlm.apply_rotary_emb; csrc/rotary.h has the formula): the
// rows of q and then of k split across threads, each row's pairs in float32 in a loop the
// compiler vectorizes. The row drivers are compiled per ISA (target_clones, csrc/cpu/isa.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../rotary.h"
#include "isa.h"  // FASTLM_CLONES, FASTLM_INLINE, to_f, from_f

namespace fastlm {
namespace {

// Strided 4-D operand: element (b, h, s, j) at b * sb + h * sh + s * ss + j.
struct View4 {
  int64_t H, sb, sh, ss;
};

View4 view4(const at::Tensor& t) { return {t.size(1), t.stride(0), t.stride(1), t.stride(2)}; }

template <bool INTERLEAVED, typename T, typename C>
FASTLM_INLINE void rotate_rows(const T* __restrict x, View4 xv, T* __restrict o, View4 ov,
                               const C* __restrict cs, const C* __restrict sn, bool c_batched,
                               int64_t S, int64_t D, bool bwd, int64_t r0, int64_t r1) {
  const int64_t h2 = D / 2;
  // Pair j: (p, q) = (j, j + D/2) or (2j, 2j + 1).
  const int64_t ps = INTERLEAVED ? 2 : 1, qo = INTERLEAVED ? 1 : h2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r % S, h = (r / S) % xv.H, b = r / (S * xv.H);
    const T* xr = x + b * xv.sb + h * xv.sh + s * xv.ss;
    T* orow = o + b * ov.sb + h * ov.sh + s * ov.ss;
    const int64_t co = ((c_batched ? b : 0) * S + s) * D;
    const C* cr = cs + co;
    const C* sr = sn + co;
    const float sign = bwd ? -1.f : 1.f;
#pragma omp simd
    for (int64_t j = 0; j < h2; ++j) {
      const int64_t p = j * ps, q = p + qo;
      const float xp = to_f(xr[p]), xq = to_f(xr[q]);
      // Backward: the forward's formula with (s_p, s_q) -> (-s_q, -s_p).
      const float sp = bwd ? sign * to_f(sr[q]) : to_f(sr[p]);
      const float sq = bwd ? sign * to_f(sr[p]) : to_f(sr[q]);
      orow[p] = from_f<T>(xp * to_f(cr[p]) - xq * sp);
      orow[q] = from_f<T>(xq * to_f(cr[q]) + xp * sq);
    }
  }
}

#define FASTLM_ROT_DRIVER(T, C, tag)                                                           \
  FASTLM_CLONES void rot_##tag(const T* x, View4 xv, T* o, View4 ov, const C* cs, const C* sn, \
                               bool cb, int64_t S, int64_t D, bool bwd, bool il, int64_t r0,   \
                               int64_t r1) {                                                   \
    if (il) rotate_rows<true>(x, xv, o, ov, cs, sn, cb, S, D, bwd, r0, r1);                    \
    else rotate_rows<false>(x, xv, o, ov, cs, sn, cb, S, D, bwd, r0, r1);                      \
  }
FASTLM_ROT_DRIVER(float, float, f32)
FASTLM_ROT_DRIVER(c10::Half, c10::Half, f16)
FASTLM_ROT_DRIVER(c10::Half, float, f16_f32)
FASTLM_ROT_DRIVER(c10::BFloat16, c10::BFloat16, bf16)
FASTLM_ROT_DRIVER(c10::BFloat16, float, bf16_f32)
#undef FASTLM_ROT_DRIVER

void rotate(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin,
            bool interleaved, bool bwd) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  const int64_t rows = B * H * S;
  if (rows == 0 || D == 0) return;
  const View4 xv = view4(x), ov = view4(out);
  const bool cb = cos.size(0) > 1;
  const bool cf32 = cos.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  const int64_t grain = std::max<int64_t>(1, 32768 / D);  // torch's grain, in elements
#define CALL(T, C, tag)                                                                       \
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {                              \
    rot_##tag(x.const_data_ptr<T>(), xv, out.mutable_data_ptr<T>(), ov,                       \
              cos.const_data_ptr<C>(), sin.const_data_ptr<C>(), cb, S, D, bwd, interleaved,   \
              r0, r1);                                                                        \
  })
  switch (x.scalar_type()) {
    case at::kFloat: CALL(float, float, f32); break;
    case at::kHalf:
      if (cf32) { CALL(c10::Half, float, f16_f32); }
      else { CALL(c10::Half, c10::Half, f16); }
      break;
    default:
      if (cf32) { CALL(c10::BFloat16, float, bf16_f32); }
      else { CALL(c10::BFloat16, c10::BFloat16, bf16); }
  }
#undef CALL
}

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              bool interleaved, bool bwd) {
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  RotaryIO qo = rotary_io(q), ko = rotary_io(k);
  rotate(qo.x, qo.out, c, s, interleaved, bwd);
  rotate(ko.x, ko.out, c, s, interleaved, bwd);
  return {qo.out, ko.out};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& cos, const at::Tensor& sin,
                                                  bool interleaved) {
  rotary_check(q, k, cos, sin);
  return rotary_cpu(q, k, cos, sin, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> rotary_bwd_cpu(const at::Tensor& grad_q,
                                                  const at::Tensor& grad_k, const at::Tensor& cos,
                                                  const at::Tensor& sin, bool interleaved) {
  rotary_check(grad_q, grad_k, cos, sin, "grad_q", "grad_k");
  return rotary_cpu(grad_q, grad_k, cos, sin, interleaved, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("rotary_fwd", &rotary_fwd_cpu);
  m.impl("rotary_bwd", &rotary_bwd_cpu);
}

}  // namespace fastlm
