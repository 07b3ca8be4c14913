// fastlm's CUDA emulator: runs the CUDA C++ kernels of csrc/cuda on the CPU, one fiber per CUDA
// thread, so that their indexing, fragment layouts, pipelining and synchronization are tested on
// a machine without a GPU (tests/test_cuda_emu_*.py). tests/cuda_emu/build.py compiles the .cu
// files with g++ against these headers, which stand in for cuda_runtime.h, cuda_fp16.h,
// cuda_bf16.h and c10/cuda; the PTX the kernels use (cp.async, ldmatrix, mma.sync) is in
// fastlm_emu_ptx.h / fastlm_emu_ptx_impl.h, written from the PTX ISA's definitions, not from
// the kernels.
//
// Model. A launch runs its blocks one after another. Inside a block every thread is a fiber on
// the calling OS thread; a fiber runs until it reaches a barrier: __syncthreads (all live
// threads of the block) or a warp collective (__shfl*_sync, ldmatrix, mma: all 32 lanes of the
// warp at the same kind of collective, else the launch fails with "divergent warp"). The
// scheduler lets one warp run ahead of the others as far as the barriers allow, in a warp order
// redrawn (seeded: FASTLM_EMU_SEED, or emu_seed) at each __syncthreads and now and then at a
// warp collective, so a missing barrier shows up as a wrong result.
// Checked on top: dynamic shared memory starts as 0xFF bytes (NaN in every float type);
// cp.async copies land either at once when their group is committed or only when the issuing
// thread's cp.async.wait_group retires the group (random per group), so both a read before the
// wait and a refill of a stage another warp still reads show up; shared addresses given to
// cp.async and ldmatrix must be aligned and in bounds, cp.async sources 16-byte aligned; a
// deadlock (threads waiting at different barriers) fails the launch with the threads' states.
// Not checked: the hardware memory model between barriers, timing, register spills, and what
// nvcc does (--use_fast_math's approximations among it).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fastlm_emu_half.h"

// ---------------------------------------------------------------------------------------------
// CUDA keywords.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) alignas(n)
// Static shared arrays become function statics: blocks run one at a time, so one copy serves.
// (build.py rewrites `extern __shared__ T name[];` into a pointer to the block's arena.)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;

// Fiber switches. On x86-64, a plain register switch (fastlm_emu_switch, defined once, in the
// translation unit that defines FASTLM_EMU_DEFINE_SWITCH): swapcontext also saves the signal
// mask, a system call per switch, which made the emulator several times slower. Elsewhere (or
// with FASTLM_EMU_UCONTEXT), ucontext.
#if defined(__x86_64__) && !defined(FASTLM_EMU_UCONTEXT)
#define FASTLM_EMU_ASM_SWITCH 1
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save, switches to the stack `load` (saved the same way) and returns there.
extern "C" void fastlm_emu_switch(void** save, void* load);
#ifdef FASTLM_EMU_DEFINE_SWITCH
asm(R"(
  .text
  .globl fastlm_emu_switch
  .type fastlm_emu_switch, @function
fastlm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastlm_emu_switch, .-fastlm_emu_switch
)");
#endif
#endif

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Wait : int { kRun = 0, kBlock = 1, kWarp = 2, kDone = 3 };

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;  // bytes read from src; the rest of the 16 are zero-filled
};

struct Fiber {
#ifdef FASTLM_EMU_ASM_SWITCH
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  dim3 tid;
  int linear = 0, warp = 0, lane = 0;
  Wait state = Wait::kRun;
  const char* where = "";           // the collective it waits at
  std::vector<Copy> pending;        // cp.async issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed groups, oldest first
};

struct WarpState {
  int arrived = 0;
  int live = 0;
  const char* kind = nullptr;
  unsigned char slot[32][64];  // each lane's operands of the current collective
};

constexpr size_t kStack = size_t(1) << 20;

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
#ifdef FASTLM_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  Fiber* cur = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<unsigned char> smem;  // dynamic shared memory of the running block
  int n = 0;  // threads of the running block (fibers[0, n))
  int live = 0, block_arrived = 0;
  bool failed = false;
  std::string message;
  std::function<void()> body;
  std::mt19937_64 rng{0};
  bool seeded = false;
  std::vector<int> priority;  // per warp; the scheduler runs the lowest value first
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& self() { return *rt().cur; }

// From the running fiber to the scheduler, and from the scheduler into fiber f.
inline void to_scheduler(Fiber& f) {
#ifdef FASTLM_EMU_ASM_SWITCH
  fastlm_emu_switch(&f.sp, rt().sched_sp);
#else
  swapcontext(&f.ctx, &rt().sched);
#endif
}
inline void to_fiber(Fiber& f) {
#ifdef FASTLM_EMU_ASM_SWITCH
  fastlm_emu_switch(&rt().sched_sp, f.sp);
#else
  swapcontext(&rt().sched, &f.ctx);
#endif
}

// A new random order of the warps (a permutation of 0 .. warps-1).
inline void reprioritize() {
  Runtime& r = rt();
  for (size_t i = 0; i < r.priority.size(); ++i) r.priority[i] = int(i);
  std::shuffle(r.priority.begin(), r.priority.end(), r.rng);
}

[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (!r.failed) {
    std::ostringstream os;
    os << "cuda emulator: block (" << r.block_idx.x << "," << r.block_idx.y << ","
       << r.block_idx.z << ") thread (" << r.cur->tid.x << "," << r.cur->tid.y << ","
       << r.cur->tid.z << "): " << what;
    r.message = os.str();
  }
  r.failed = true;
  r.cur->state = Wait::kDone;
  to_scheduler(*r.cur);
  std::abort();  // never resumed
}

inline void yield() { to_scheduler(*rt().cur); }

// __syncthreads: every live thread of the block. A thread that has returned counts as arrived.
inline void release_block() {
  Runtime& r = rt();
  r.block_arrived = 0;
  for (int i = 0; i < r.n; ++i)
    if (r.fibers[i].state == Wait::kBlock) r.fibers[i].state = Wait::kRun;
  reprioritize();
}

inline void syncthreads() {
  Runtime& r = rt();
  if (++r.block_arrived == r.live) {
    release_block();
    return;
  }
  r.cur->state = Wait::kBlock;
  r.cur->where = "__syncthreads";
  yield();
}

// One barrier among the 32 lanes of the caller's warp, all at the same kind of collective.
inline void warp_barrier(const char* kind) {
  Runtime& r = rt();
  Fiber& me = *r.cur;
  WarpState& w = r.warps[me.warp];
  if (w.live != 32) fail(std::string(kind) + " in a warp with " + std::to_string(w.live) +
                         " live lanes (warp collectives need all 32 here)");
  if (w.arrived == 0) w.kind = kind;
  else if (std::strcmp(w.kind, kind) != 0)
    fail(std::string("divergent warp: this lane is at ") + kind + " while another is at " + w.kind);
  if (++w.arrived == 32) {
    w.arrived = 0;
    for (int i = 32 * me.warp; i < std::min(r.n, 32 * me.warp + 32); ++i)
      if (r.fibers[i].state == Wait::kWarp) r.fibers[i].state = Wait::kRun;
    if (r.rng() % 16 == 0) reprioritize();  // now and then another warp gets ahead
    return;
  }
  me.state = Wait::kWarp;
  me.where = kind;
  yield();
}

// The collective pattern: put this lane's operands in its slot, wait for the warp, compute
// from every lane's slot, wait again (so no slot is overwritten while another lane reads it).
template <typename In, typename F>
inline void warp_collective(const char* kind, const In& mine, F&& compute) {
  static_assert(sizeof(In) <= 64, "slot too small");
  Runtime& r = rt();
  WarpState& w = r.warps[r.cur->warp];
  std::memcpy(w.slot[r.cur->lane], &mine, sizeof(In));
  warp_barrier(kind);
  compute([&](int lane) {
    In v;
    std::memcpy(&v, w.slot[lane & 31], sizeof(In));
    return v;
  });
  warp_barrier(kind);
}

inline void fiber_main() {
  Runtime& r = rt();
  r.body();
  Fiber& me = *r.cur;
  me.state = Wait::kDone;
  --r.live;
  --r.warps[me.warp].live;
  // The threads still at __syncthreads may now all have arrived.
  if (r.live > 0 && r.block_arrived == r.live) release_block();
  to_scheduler(me);
  std::abort();  // never resumed
}

#ifdef FASTLM_EMU_ASM_SWITCH
[[noreturn]] inline void fiber_entry() {
  fiber_main();
  std::abort();
}

// A fresh fiber's stack, as fastlm_emu_switch leaves a switched-out one: control words, six
// zeroed callee-saved registers, then fiber_entry as the return address (with a zero above it,
// so fiber_entry starts with the stack aligned as after a call).
inline void* fresh_stack(char* stack) {
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(stack) + kStack) & ~uintptr_t(15));
  uint64_t* sp = top - 9;  // 72 bytes
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 9 * sizeof(uint64_t));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  sp[7] = reinterpret_cast<uint64_t>(&fiber_entry);  // top - 16: the return address
  return sp;
}
#endif

inline std::string states() {
  std::ostringstream os;
  Runtime& r = rt();
  int shown = 0;
  for (int i = 0; i < r.n; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == Wait::kDone) continue;
    if (shown++ == 8) {
      os << " ...";
      break;
    }
    os << " thread " << f.linear << " at " << f.where << ";";
  }
  return os.str();
}

inline void run_block(const dim3& bid) {
  Runtime& r = rt();
  r.block_idx = bid;
  const int n = int(r.block_dim.x * r.block_dim.y * r.block_dim.z);
  std::fill(r.smem.begin(), r.smem.end(), 0xFF);
  r.warps.assign((n + 31) / 32, WarpState{});
  r.n = n;
  r.live = n;
  r.block_arrived = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.tid = dim3(i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y,
                 i / (r.block_dim.x * r.block_dim.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = Wait::kRun;
    f.where = "start";
    f.pending.clear();
    f.groups.clear();
    r.warps[f.warp].live++;
#ifdef FASTLM_EMU_ASM_SWITCH
    f.sp = fresh_stack(f.stack);
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
  }
  r.priority.resize(r.warps.size());
  reprioritize();
  for (;;) {
    // Run one thread of the most favoured warp that has a runnable one: warps run ahead of each
    // other as far as the barriers allow, in an order redrawn at every barrier release.
    Fiber* next = nullptr;
    int best = 1 << 30, ties = 0;
    bool all_done = true;
    for (int i = 0; i < n; ++i) {
      Fiber& f = r.fibers[i];
      if (f.state != Wait::kDone) all_done = false;
      if (f.state != Wait::kRun) continue;
      const int pr = r.priority[f.warp];
      if (pr < best) {
        best = pr;
        next = &f;
        ties = 1;
      } else if (pr == best && r.rng() % uint64_t(++ties) == 0) {
        next = &f;  // a uniform pick among the favoured warp's runnable lanes
      }
    }
    if (all_done) break;
    if (next == nullptr) {
      std::ostringstream os;
      os << "cuda emulator: deadlock in block (" << bid.x << "," << bid.y << "," << bid.z
         << "): threads wait at different barriers:" << states();
      throw Error(os.str());
    }
    r.cur = next;
    to_fiber(*next);
    r.cur = nullptr;
    if (r.failed) throw Error(r.message);
  }
}

// Runs kernel(args...) over the grid; returns after every block has finished.
template <typename F>
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& body) {
  Runtime& r = rt();
  if (!r.seeded) {
    const char* s = std::getenv("FASTLM_EMU_SEED");
    r.rng.seed(s ? std::strtoull(s, nullptr, 10) : 0x5eedULL);
    r.seeded = true;
  }
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw Error("cuda emulator: block of " + std::to_string(n) + " threads");
  if (smem_bytes > 227 * 1024)
    throw Error("cuda emulator: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
  if (grid.y > 65535 || grid.z > 65535) throw Error("cuda emulator: grid y/z above 65535");
  if (r.fibers.size() < size_t(n)) {
    const size_t old = r.fibers.size();
    r.fibers.resize(n);
    for (size_t i = old; i < size_t(n); ++i) r.fibers[i].stack = new char[kStack];
  }
  r.grid_dim = grid;
  r.block_dim = block;
  r.smem.assign(smem_bytes, 0xFF);
  r.body = std::forward<F>(body);
  r.failed = false;
  r.message.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(dim3(x, y, z));
  r.body = nullptr;
}

template <typename K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    K k = kernel;
    auto tup = std::make_tuple(args...);  // kernel parameters are copied, as on the device
    launch(grid, block, smem, [k, tup]() { std::apply(k, tup); });
  }
};

template <typename K, typename G, typename B>
inline Launch<K> make_launch(K kernel, G grid, B block, size_t smem = 0,
                             cudaStream_t = nullptr) {
  return Launch<K>{kernel, dim3(grid), dim3(block), smem};
}

inline unsigned char* dyn_smem() { return rt().smem.data(); }

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Built-in variables and device functions.
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::rt().block_idx)
#define blockDim (::emu::rt().block_dim)
#define gridDim (::emu::rt().grid_dim)

inline void __syncthreads() { emu::syncthreads(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (mask != 0xffffffffu || width != 32) emu::fail("__shfl_sync: only a full mask and width 32");
  T out{};
  emu::warp_collective("__shfl_sync", v, [&](auto lane_value) { out = lane_value(src & 31); });
  return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32)
    emu::fail("__shfl_xor_sync: only a full mask and width 32");
  T out{};
  const int me = emu::self().lane;
  emu::warp_collective("__shfl_xor_sync", v,
                       [&](auto lane_value) { out = lane_value(me ^ (lane_mask & 31)); });
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) { return emu::f2u(f); }
inline float __uint_as_float(unsigned u) { return emu::u2f(u); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

// CUDA's min / max overloads (device code calls them unqualified).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline size_t __cvta_generic_to_shared(const void* p) {
  auto& s = emu::rt().smem;
  const auto* c = static_cast<const unsigned char*>(p);
  if (s.empty() || c < s.data() || c > s.data() + s.size())
    emu::fail("__cvta_generic_to_shared of a pointer outside the dynamic shared memory");
  return size_t(c - s.data());
}

// ---------------------------------------------------------------------------------------------
// Host API.
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// The emulated device is an H100 SXM: 132 SMs, 227 KiB of opt-in shared memory per block.
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 132 : 227 * 1024;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t) {
  *n = std::max(1, 2048 / std::max(threads, 1));
  return cudaSuccess;
}
