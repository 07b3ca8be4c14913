// The CUDA emulator's driver-API stand-ins for the Hopper kernels' host code: tensor maps
// (cuTensorMapEncodeTiled, reached through cudaGetDriverEntryPointByVersion as on a real
// system), the compute capability of the emulated device, and the layout of an encoded tensor
// map, which the TMA instructions of fastlm_emu_sm90.h read back.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastlm_emu.h"

typedef uint32_t cuuint32_t;
typedef uint64_t cuuint64_t;
typedef int CUresult;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;

struct alignas(64) CUtensorMap {
  uint64_t opaque[16];
};
enum CUtensorMapDataType {
  CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT32 = 7,
  CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9,
};
enum CUtensorMapInterleave { CU_TENSOR_MAP_INTERLEAVE_NONE = 0 };
enum CUtensorMapSwizzle {
  CU_TENSOR_MAP_SWIZZLE_NONE = 0,
  CU_TENSOR_MAP_SWIZZLE_32B = 1,
  CU_TENSOR_MAP_SWIZZLE_64B = 2,
  CU_TENSOR_MAP_SWIZZLE_128B = 3,
};
enum CUtensorMapL2promotion {
  CU_TENSOR_MAP_L2_PROMOTION_NONE = 0,
  CU_TENSOR_MAP_L2_PROMOTION_L2_64B = 1,
  CU_TENSOR_MAP_L2_PROMOTION_L2_128B = 2,
  CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3,
};
enum CUtensorMapFloatOOBfill {
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0,
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA = 1,
};

enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
constexpr unsigned long long cudaEnableDefault = 0;

// The compute capability queries (the values of the CUDA runtime's cudaDeviceAttr).
enum cudaDeviceAttrCapability {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

namespace emu {
namespace sm90 {

// The emulated device's compute capability (major * 10 + minor): 80 unless a test sets it
// (torch.ops.fastlm_emu.emu_set_device_arch), so the kernels chosen per arch can all be run.
inline int& device_arch() {
  static int arch = 80;
  return arch;
}

// An encoded tensor map as the emulator lays it out in CUtensorMap's 128 bytes.
constexpr uint32_t kTensorMapMagic = 0x50414D54u;  // "TMAP"
struct TensorMap {
  uint32_t magic;
  int32_t rank;
  int32_t elem_bytes;
  int32_t swizzle;   // bytes: 0, 32, 64 or 128
  int32_t oob_nan;   // out-of-bounds loads fill NaN instead of zero
  uint64_t addr;     // global address
  uint64_t dims[5];  // elements, innermost first
  uint64_t strides[4];  // bytes of dims 1.. (dim 0 is contiguous)
  uint32_t box[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "tensor map layout");

inline int dtype_bytes(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16: case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: return 4;
  }
  return 0;
}

// cuTensorMapEncodeTiled with the driver's documented checks (CUDA Driver API, "Tensor Map
// Object Management"); interleave none, element strides 1.
inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                             void* addr, const cuuint64_t* dims, const cuuint64_t* strides,
                             const cuuint32_t* box, const cuuint32_t* estr,
                             CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill fill) {
  const int es = dtype_bytes(type);
  if (map == nullptr || es == 0 || rank < 1 || rank > 5 || interleave != 0) return 1;
  if ((reinterpret_cast<uintptr_t>(addr) & 15) != 0) return 1;  // 16-byte aligned address
  TensorMap t;
  std::memset(&t, 0, sizeof(t));
  t.magic = kTensorMapMagic;
  t.rank = int(rank);
  t.elem_bytes = es;
  t.swizzle = swizzle == CU_TENSOR_MAP_SWIZZLE_NONE ? 0 : 16 << int(swizzle);
  t.oob_nan = fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA;
  t.addr = uint64_t(reinterpret_cast<uintptr_t>(addr));
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return 1;
    if (box[i] == 0 || box[i] > 256 || estr[i] != 1) return 1;
    t.dims[i] = dims[i];
    t.box[i] = box[i];
    if (i > 0) {  // multiples of 16 below 2^40
      if (strides[i - 1] % 16 != 0 || strides[i - 1] >= (uint64_t(1) << 40)) return 1;
      t.strides[i - 1] = strides[i - 1];
    }
  }
  if ((uint64_t(box[0]) * es) % 16 != 0) return 1;  // the inner box is whole 16-byte units
  if (t.swizzle && uint64_t(box[0]) * es > uint64_t(t.swizzle)) return 1;  // within the span
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &t, sizeof(t));
  return CUDA_SUCCESS;
}

}  // namespace sm90
}  // namespace emu

inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                                    unsigned long long,
                                                    cudaDriverEntryPointQueryResult* status) {
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {
    *fn = reinterpret_cast<void*>(&emu::sm90::encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  *fn = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttrCapability a, int) {
  *v = a == cudaDevAttrComputeCapabilityMajor ? emu::sm90::device_arch() / 10
                                              : emu::sm90::device_arch() % 10;
  return cudaSuccess;
}
