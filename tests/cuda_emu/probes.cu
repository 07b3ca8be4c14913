// Small CUDA kernels with deliberate faults, built into the emulator (build.py rewrites them like
// csrc/cuda) so tests/test_cuda_emu_checks.py can show that each check of the emulator fails the
// launch with the kernel, the thread and the address: out-of-bounds global and shared accesses,
// launch limits, poisoned shared memory and registers, block order, PTX decoding.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace probes {

constexpr int kThreads = 128;

// out[i] = i for i < n (one block of kThreads threads, grid-strided).
__global__ void __launch_bounds__(kThreads) probe_store(float* out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = float(i);
}

// out[i] = x[i] for i < n (out has x's size).
__global__ void __launch_bounds__(kThreads) probe_copy(const float* x, float* out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = x[i];
}

// Writes one float at `index` of the dynamic shared memory from thread 0, reads it back.
__global__ void probe_dyn_smem(float* out, int64_t index) {
  extern __shared__ __align__(16) float dyn[];
  if (threadIdx.x == 0) {
    dyn[index] = 1.f;
    out[0] = dyn[index];
  }
}

// Block 0 fills a static shared array; every block reads it back: the other blocks must see
// poison, not block 0's values.
__global__ void probe_static_smem(float* out) {
  __shared__ float s[kThreads];
  if (blockIdx.x == 0) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = s[threadIdx.x];
}

// Static shared write past the end of the array (index >= 16).
__global__ void probe_static_oob(float* out, int index) {
  __shared__ float s[16];
  if (threadIdx.x == 0) {
    s[index] = 2.f;
    out[0] = s[index];
  }
}

// Its own static array (used by one test only): the first launch of one block maps slot 0's
// copy, a launch of more blocks then maps slot 1's, and slot 0's must stay where the emulator's
// fault handler and canary checks look for it.
__global__ void probe_static_slots(float* out) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = float(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

// A local read before it is written: the register's poison pattern.
__global__ void probe_register(uint32_t* out) {
  uint32_t x[4];
  out[threadIdx.x] = x[threadIdx.x & 3];
}

// Thread 0 of each block appends blockIdx.x to `log` at *count, before and after a
// __syncthreads (the order blocks run and interleave in).
__global__ void probe_order(int32_t* log, int32_t* count) {
  if (threadIdx.x == 0) log[(*count)++] = int32_t(blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) log[(*count)++] = int32_t(blockIdx.x);
}

// A PTX string with a misspelled modifier.
__global__ void probe_bad_ptx(float* out) {
  float r;
  const float a = 1.f, b = 2.f;
  asm("mul.rnn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  out[threadIdx.x] = r;
}

// cp.async from one past the end of `x` (a 16-byte copy whose source is not readable).
__global__ void probe_cp_async_oob(const float* x, float* out, int n) {
  extern __shared__ __align__(16) float dyn[];
  if (threadIdx.x == 0) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(dyn));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(x + n),
                 "r"(16) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0) : "memory");
    out[0] = dyn[0];
  }
}

at::Tensor store(at::Tensor out, int64_t n, int64_t threads) {
  probe_store<<<1, unsigned(threads)>>>(out.mutable_data_ptr<float>(), int(n));
  return out;
}

at::Tensor copy(const at::Tensor& x, int64_t n) {
  at::Tensor out = at::empty({x.numel()}, x.options());
  probe_copy<<<1, kThreads>>>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), int(n));
  return out;
}

at::Tensor dyn_smem(const at::Tensor& out, int64_t smem, int64_t index, int64_t opt_in) {
  if (opt_in >= 0)  // -1: leave the kernel's attribute as it is
    TORCH_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(probe_dyn_smem),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(opt_in)) == cudaSuccess,
                "cudaFuncSetAttribute(", opt_in, ") failed");
  probe_dyn_smem<<<1, 32, size_t(smem)>>>(out.mutable_data_ptr<float>(), index);
  return out;
}

at::Tensor static_smem(int64_t blocks) {
  at::Tensor out = at::empty({blocks * kThreads}, at::TensorOptions().dtype(at::kFloat));
  probe_static_smem<<<unsigned(blocks), kThreads>>>(out.mutable_data_ptr<float>());
  return out;
}

at::Tensor static_slots(int64_t blocks) {
  at::Tensor out = at::empty({blocks * kThreads}, at::TensorOptions().dtype(at::kFloat));
  probe_static_slots<<<unsigned(blocks), kThreads>>>(out.mutable_data_ptr<float>());
  return out;
}

at::Tensor static_oob(int64_t index) {
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kFloat));
  probe_static_oob<<<1, 32>>>(out.mutable_data_ptr<float>(), int(index));
  return out;
}

at::Tensor registers() {
  at::Tensor out = at::empty({32}, at::TensorOptions().dtype(at::kInt));
  probe_register<<<1, 32>>>(reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>()));
  return out;
}

at::Tensor order(int64_t blocks) {
  at::Tensor log = at::empty({2 * blocks + 1}, at::TensorOptions().dtype(at::kInt));
  log.zero_();
  probe_order<<<unsigned(blocks), 64>>>(log.mutable_data_ptr<int32_t>() + 1,
                                        log.mutable_data_ptr<int32_t>());
  return log;
}

at::Tensor bad_ptx() {
  at::Tensor out = at::empty({32}, at::TensorOptions().dtype(at::kFloat));
  probe_bad_ptx<<<1, 32>>>(out.mutable_data_ptr<float>());
  return out;
}

at::Tensor cp_async_oob(const at::Tensor& x) {
  at::Tensor out = at::empty({1}, x.options());
  probe_cp_async_oob<<<1, 32, 16>>>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                   int(x.numel()));
  return out;
}

}  // namespace probes

TORCH_LIBRARY_FRAGMENT(fastlm_emu, m) {
  m.def("probe_store(Tensor(a!) out, int n, int threads) -> Tensor(a!)", probes::store);
  m.def("probe_copy(Tensor x, int n) -> Tensor", probes::copy);
  m.def("probe_dyn_smem(Tensor(a!) out, int smem, int index, int opt_in) -> Tensor(a!)",
        probes::dyn_smem);
  m.def("probe_static_smem(int blocks) -> Tensor", probes::static_smem);
  m.def("probe_static_slots(int blocks) -> Tensor", probes::static_slots);
  m.def("probe_static_oob(int index) -> Tensor", probes::static_oob);
  m.def("probe_registers() -> Tensor", probes::registers);
  m.def("probe_order(int blocks) -> Tensor", probes::order);
  m.def("probe_bad_ptx() -> Tensor", probes::bad_ptx);
  m.def("probe_cp_async_oob(Tensor x) -> Tensor", probes::cp_async_oob);
}
