// Gated linear units on CUDA (fastlm.swiglu, fastlm.geglu; csrc/glu.h has the math): one
// grid-stride elementwise kernel per direction, 16-byte accesses when every pointer is aligned
// (the tail, and unaligned data, one element at a time). The backward recomputes act(gate).
// Memory-bound: forward reads gate and up and writes out (3 n elements), backward reads
// grad_out, gate and up and writes both gradients (5 n).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../glu.h"
#include "common.cuh"

namespace fastlm {
namespace cuda {
namespace {

struct DevExp {
  __device__ __forceinline__ float operator()(float x) const { return __expf(x); }
};
struct DevErf {
  __device__ __forceinline__ float operator()(float x) const { return erff(x); }
};

// Elements [i, i + VEC) of the forward (BWD false) or the backward (BWD true).
template <int ACT, bool BWD, typename T, int VEC>
__device__ __forceinline__ void glu_vec(const T* __restrict dy, const T* __restrict g,
                                        const T* __restrict u, T* __restrict o0,
                                        T* __restrict o1, int64_t i) {
  float gv[VEC], uv[VEC], dv[VEC], r0[VEC], r1[VEC];
  load_f<T, VEC>(g + i, gv);
  load_f<T, VEC>(u + i, uv);
  if constexpr (BWD) load_f<T, VEC>(dy + i, dv);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float a, da;
    glu_act<ACT>(gv[k], DevExp{}, DevErf{}, a, da);
    if constexpr (BWD) {
      r0[k] = dv[k] * uv[k] * da;
      r1[k] = dv[k] * a;
    } else {
      r0[k] = a * uv[k];
    }
  }
  store_f<T, VEC>(o0 + i, r0);
  if constexpr (BWD) store_f<T, VEC>(o1 + i, r1);
}

// forward: o0 = act(g) * u;  backward: o0 = dy * u * act'(g), o1 = dy * act(g).
template <int ACT, bool BWD, typename T, int VEC>
__global__ void glu_kernel(const T* __restrict dy, const T* __restrict g, const T* __restrict u,
                           T* __restrict o0, T* __restrict o1, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * VEC;
  const int64_t nv = n / VEC * VEC;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < nv; i += stride)
    glu_vec<ACT, BWD, T, VEC>(dy, g, u, o0, o1, i);
  if constexpr (VEC > 1) {  // the tail, one element per thread of the first block
    const int64_t i = nv + threadIdx.x;
    if (blockIdx.x == 0 && i < n) glu_vec<ACT, BWD, T, 1>(dy, g, u, o0, o1, i);
  }
}

template <typename F>
void dispatch_act(int64_t act, F&& f) {
  if (act == kSilu) f(std::integral_constant<int, kSilu>{});
  else if (act == kGeluTanh) f(std::integral_constant<int, kGeluTanh>{});
  else f(std::integral_constant<int, kGeluErf>{});
}

template <bool BWD>
void launch(const at::Tensor* dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& o0,
            at::Tensor* o1, int64_t act) {
  const int64_t n = g.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  bool aligned = aligned16(g.const_data_ptr()) && aligned16(u.const_data_ptr()) &&
                 aligned16(o0.const_data_ptr());
  if (BWD) aligned = aligned && aligned16(dy->const_data_ptr()) && aligned16(o1->const_data_ptr());
  auto go = [&](auto tag) {
    using T = typename Native<decltype(tag)>::type;
    constexpr int FULL = 16 / sizeof(T);
    const T* dyp = BWD ? static_cast<const T*>(dy->const_data_ptr()) : nullptr;
    const T* gp = static_cast<const T*>(g.const_data_ptr());
    const T* up = static_cast<const T*>(u.const_data_ptr());
    T* p0 = static_cast<T*>(o0.mutable_data_ptr());
    T* p1 = BWD ? static_cast<T*>(o1->mutable_data_ptr()) : nullptr;
    const int vec = aligned ? FULL : 1;
    const int64_t want = (n / vec + threads - 1) / threads;
    const int64_t blocks =
        std::max<int64_t>(1, std::min<int64_t>(want, sm_count(g.get_device()) * 32));
    dispatch_act(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      const unsigned grid = unsigned(blocks);
      if (aligned)
        glu_kernel<ACT, BWD, T, FULL><<<grid, threads, 0, stream>>>(dyp, gp, up, p0, p1, n);
      else
        glu_kernel<ACT, BWD, T, 1><<<grid, threads, 0, stream>>>(dyp, gp, up, p0, p1, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  switch (g.scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: go(c10::BFloat16{}); break;
  }
}

at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t act) {
  glu_check(gate, up, act);
  c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  launch<false>(nullptr, g, u, out, nullptr, act);
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                const at::Tensor& up, int64_t act) {
  glu_check(gate, up, act, &grad_out);
  c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor dy = grad_out.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  launch<true>(&dy, g, u, dg, &du, act);
  return {dg, du};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("glu_fwd", &cuda::glu_fwd_cuda);
  m.impl("glu_bwd", &cuda::glu_bwd_cuda);
}

}  // namespace fastlm
