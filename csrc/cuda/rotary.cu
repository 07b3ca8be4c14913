// Rotary embeddings on CUDA (fastlm.apply_rotary_emb; csrc/rotary.h has the formula): one launch
// covers the rows of q and of k. A thread handles one pair (p, q) of one row per grid-stride
// step, so a warp reads 32 consecutive elements of each half (rotate-half) or 64 consecutive
// elements (interleaved); cos and sin rows are shared by the heads and hit in L1/L2.
// Memory-bound: reads q, k (and cos/sin, small) once, writes q_out, k_out once.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rotary.h"
#include "common.cuh"

namespace fastlm {
namespace cuda {
namespace {

// One operand: element (b, h, s, j) of x at b * sb + h * sh + s * ss + j, of out likewise.
struct Operand {
  const void* x;
  void* out;
  int64_t H, sb, sh, ss, osb, osh, oss;
  int64_t pairs;  // B * H * S * D / 2
};

struct Args {
  Operand op[2];  // q, k
  const void* cos;
  const void* sin;
  int64_t S, D;
  bool c_batched, interleaved, bwd;
};

template <typename T, typename C>
__device__ __forceinline__ void rotate_pair(const Operand& o, const Args& a, int64_t i) {
  const int64_t h2 = a.D / 2;
  const int64_t j = i % h2, r = i / h2;
  const int64_t s = r % a.S, h = (r / a.S) % o.H, b = r / (a.S * o.H);
  const int64_t p = a.interleaved ? 2 * j : j, q = a.interleaved ? p + 1 : j + h2;
  const T* x = static_cast<const T*>(o.x) + b * o.sb + h * o.sh + s * o.ss;
  T* out = static_cast<T*>(o.out) + b * o.osb + h * o.osh + s * o.oss;
  const int64_t co = ((a.c_batched ? b : 0) * a.S + s) * a.D;
  const C* cs = static_cast<const C*>(a.cos) + co;
  const C* sn = static_cast<const C*>(a.sin) + co;
  float op, oq;
  rotary_pair(to_f(x[p]), to_f(x[q]), to_f(cs[p]), to_f(cs[q]), to_f(sn[p]), to_f(sn[q]), a.bwd,
              op, oq);
  out[p] = from_f<T>(op);
  out[q] = from_f<T>(oq);
}

template <typename T, typename C>
__global__ void rotary_kernel(Args a) {
  const int64_t total = a.op[0].pairs + a.op[1].pairs;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < a.op[0].pairs) rotate_pair<T, C>(a.op[0], a, i);
    else rotate_pair<T, C>(a.op[1], a, i - a.op[0].pairs);
  }
}

Operand operand(const RotaryIO& io) {
  const at::Tensor& x = io.x;
  return {x.const_data_ptr(), io.out.mutable_data_ptr(), x.size(1), x.stride(0), x.stride(1),
          x.stride(2), io.out.stride(0), io.out.stride(1), io.out.stride(2),
          x.numel() / 2};
}

std::tuple<at::Tensor, at::Tensor> rotary_cuda(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& cos, const at::Tensor& sin,
                                               bool interleaved, bool bwd) {
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  RotaryIO qo = rotary_io(q), ko = rotary_io(k);
  Args a{{operand(qo), operand(ko)}, c.const_data_ptr(), s.const_data_ptr(), q.size(2), q.size(3),
         c.size(0) > 1, interleaved, bwd};
  const int64_t total = a.op[0].pairs + a.op[1].pairs;
  if (total == 0) return {qo.out, ko.out};
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((total + threads - 1) / threads, sm_count(q.get_device()) * 32));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool cf32 = c.scalar_type() == at::kFloat;
  auto go = [&](auto tag) {
    using T = typename Native<decltype(tag)>::type;
    if (cf32) rotary_kernel<T, float><<<unsigned(blocks), threads, 0, stream>>>(a);
    else rotary_kernel<T, T><<<unsigned(blocks), threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (q.scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: go(c10::BFloat16{}); break;
  }
  return {qo.out, ko.out};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   bool interleaved) {
  rotary_check(q, k, cos, sin);
  return rotary_cuda(q, k, cos, sin, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> rotary_bwd_cuda(const at::Tensor& grad_q,
                                                   const at::Tensor& grad_k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   bool interleaved) {
  rotary_check(grad_q, grad_k, cos, sin, "grad_q", "grad_k");
  return rotary_cuda(grad_q, grad_k, cos, sin, interleaved, true);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("rotary_fwd", &cuda::rotary_fwd_cuda);
  m.impl("rotary_bwd", &cuda::rotary_bwd_cuda);
}

}  // namespace fastlm
