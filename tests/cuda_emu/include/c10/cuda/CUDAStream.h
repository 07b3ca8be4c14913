// c10/cuda for the CUDA emulator (tests/cuda_emu): the one (null) stream.
#pragma once
#include "fastlm_emu.h"
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
