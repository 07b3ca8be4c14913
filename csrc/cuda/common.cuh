// The few device helpers every fastlm CUDA kernel shares: element conversions, 16-byte vector
// loads and stores, warp and row reductions, and the launch-side device facts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

namespace fastlm {
namespace cuda {

// at::ScalarType -> the CUDA element type.
template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* __restrict p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_f(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* __restrict p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_f<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// A parameter vector (weight or bias) of the input's type T or of float32; null means `dflt`.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const void* p, bool f32, int64_t j, float dflt,
                                           float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = dflt;
  } else if (f32) {
    // float32 parameters with a 16-bit input: VEC floats may be 32 bytes, but only 16-byte
    // alignment is checked, so load them in 16-byte (or smaller) pieces.
    constexpr int PIECE = VEC < 4 ? VEC : 4;
    const float* q = static_cast<const float*>(p) + j;
#pragma unroll
    for (int k = 0; k < VEC; k += PIECE) {
      float piece[PIECE];
      load_f<float, PIECE>(q + k, piece);
#pragma unroll
      for (int t = 0; t < PIECE; ++t) out[k + t] = piece[t];
    }
  } else {
    load_f<T, VEC>(static_cast<const T*>(p) + j, out);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums (a, b) over the blockDim.x threads that share threadIdx.y (one row), in a fixed order.
// `smem` holds 2 * blockDim.y * (blockDim.x / 32) floats. Every thread of the block must call.
__device__ __forceinline__ void row_sum2(float& a, float& b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warps = blockDim.x >> 5;
  if (warps == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* s = smem + threadIdx.y * warps * 2;
  __syncthreads();  // the previous use of smem is finished
  if (lane == 0) {
    s[2 * warp] = a;
    s[2 * warp + 1] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int w = 0; w < warps; ++w) {
    a += s[2 * w];
    b += s[2 * w + 1];
  }
}

inline int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cached[device];
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace cuda
}  // namespace fastlm
