// The few device helpers every fastlm CUDA kernel shares: element conversions, 16-byte vector
// loads and stores, warp and row reductions, and the launch-side device facts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// ------------------------------------------------------------------------------------------
// Multi-tensor apply: one launch covers many tensors (of several parallel lists: params,
// grads, moments, ...). Every tensor is cut into chunks of kMtaChunk elements; a block owns
// one chunk. The kernel's only large argument is a TensorListMeta passed by value
// (__grid_constant__), so launches are CUDA-graph capturable and need no device copy.
//
// Invariants of a TensorListMeta filled by multi_tensor_apply (what kernels may rely on):
//   * blocks 0 .. gridDim.x-1 each have block_tensor[b] < (slots used) and
//     block_chunk[b] * kMtaChunk < numel[block_tensor[b]], i.e. every block has >= 1 element;
//     its chunk holds min(kMtaChunk, numel - block_chunk * kMtaChunk) elements.
//   * ptr[l][s] points at the slot's first element in list l. A tensor split across launches
//     gets a new slot in the next launch whose pointers are advanced (and numel reduced) by the
//     chunks already launched, so block_chunk restarts at 0 and fits in 16 bits. kMtaChunk
//     elements are a multiple of 16 bytes for any element size, so advancing keeps alignment.
//   * flags[s] bit 0: every ptr[l][s] is 16-byte aligned (vector path allowed); bits 1..7 are
//     the caller's (passed through from MtaTensor::flags).
//   * aux[s] is the tensor's per-tensor pointer passed through unchanged (not advanced).
//   * first_block: how many blocks the earlier launches of this apply had, so that
//     first_block + blockIdx.x numbers chunks globally in order (per-chunk partial results).
//   * zero-numel tensors take no slot and no block.
constexpr int64_t kMtaChunk = 65536;
constexpr int kMtaBlocks = 512;  // block slots per launch (<= 65536: block_chunk is 16-bit)
// Kernel parameter space is 4 KB; the meta gets this much, the kernel's other arguments the rest.
constexpr int kMtaMetaBytes = 4096 - 128;
constexpr int kMtaMaxLists = 6;

template <int LISTS>
constexpr int mta_tensors() {
  // ptr + aux + numel (8 bytes each) and a flag byte per tensor; 3 bytes per block; 8 header.
  return (kMtaMetaBytes - 8 - 3 * kMtaBlocks) / (8 * LISTS + 8 + 8 + 1);
}

template <int LISTS>
struct TensorListMeta {
  static constexpr int kLists = LISTS;
  static constexpr int kTensors = mta_tensors<LISTS>();
  static constexpr int kBlocks = kMtaBlocks;
  void* ptr[LISTS][kTensors];
  const void* aux[kTensors];
  int64_t numel[kTensors];
  int32_t first_block;
  uint16_t block_chunk[kBlocks];
  uint8_t block_tensor[kBlocks];
  uint8_t flags[kTensors];
};

// One tensor as the host describes it to multi_tensor_apply.
struct MtaTensor {
  void* ptr[kMtaMaxLists] = {};  // first element in each list
  int elsize[kMtaMaxLists] = {};  // bytes per element in each list
  const void* aux = nullptr;
  int64_t numel = 0;
  uint8_t flags = 0;  // the caller's bits (bit 0 is reserved for the alignment flag)
};

inline int64_t mta_chunks(int64_t numel) { return (numel + kMtaChunk - 1) / kMtaChunk; }

// Packs `ts` into as few metas as the slots allow and calls launch(meta, blocks) for each,
// in tensor order. A meta is launched as soon as its block or tensor slots are full.
template <typename Meta, typename Launch>
void multi_tensor_apply(const std::vector<MtaTensor>& ts, Launch&& launch) {
  static_assert(Meta::kTensors >= 1 && Meta::kTensors <= 256, "block_tensor is 8-bit");
  static_assert(Meta::kBlocks <= 65536, "block_chunk is 16-bit");
  static_assert(kMtaChunk % 16 == 0, "chunks must keep 16-byte alignment");
  Meta meta;
  std::memset(&meta, 0, sizeof(meta));
  int nt = 0, nb = 0;  // slots used in `meta`; both < their capacity whenever a slot opens
  int64_t launched = 0;
  for (const MtaTensor& t : ts) {
    const int64_t chunks = mta_chunks(t.numel);  // 0 for an empty tensor: no slot, no block
    for (int64_t c = 0; c < chunks;) {
      const int s = nt++;
      const int64_t e0 = c * kMtaChunk;  // first element of this slot within the tensor
      bool aligned = true;
      for (int l = 0; l < Meta::kLists; ++l) {
        meta.ptr[l][s] = static_cast<char*>(t.ptr[l]) + e0 * t.elsize[l];
        aligned = aligned && aligned16(meta.ptr[l][s]);
      }
      meta.aux[s] = t.aux;
      meta.numel[s] = t.numel - e0;  // > 0 since c < chunks
      meta.flags[s] = uint8_t((t.flags & ~1) | (aligned ? 1 : 0));
      const int64_t take = std::min<int64_t>(chunks - c, Meta::kBlocks - nb);  // >= 1
      for (int64_t k = 0; k < take; ++k) {
        meta.block_tensor[nb] = uint8_t(s);
        meta.block_chunk[nb] = uint16_t(k);
        ++nb;
      }
      c += take;
      if (nb == Meta::kBlocks || nt == Meta::kTensors) {
        meta.first_block = int32_t(launched);
        launch(static_cast<const Meta&>(meta), nb);
        launched += nb;
        nt = nb = 0;
      }
    }
  }
  if (nb > 0) {
    meta.first_block = int32_t(launched);
    launch(static_cast<const Meta&>(meta), nb);
  }
}

}  // namespace cuda
}  // namespace fastlm
