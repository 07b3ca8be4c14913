// fastlm's CUDA emulator: runs the CUDA C++ kernels of csrc/cuda on the CPU, one fiber per CUDA
// thread, so that their indexing, fragment layouts, pipelining, synchronization, launch
// configuration and memory accesses are tested on a machine without a GPU
// (tests/test_cuda_emu_*.py). tests/cuda_emu/build.py compiles the .cu files with g++ against
// these headers, which stand in for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and c10/cuda, after
// mechanical rewrites (launches, shared declarations, kernel entries, and every inline `asm`
// statement, which becomes a call into fastlm_emu_ptx.h's decoder of the same PTX text).
// tests/cuda_emu/README.md is the short manual.
//
// Model. A launch runs its blocks in a seeded random order, two at a time interleaved at random
// points (more when every live thread spin-waits: blocks become resident as a GPU with free SMs
// would make them). Inside a block every thread is a fiber; a fiber runs until it reaches a
// barrier: __syncthreads (all live threads of the block) or a warp collective (__shfl*_sync,
// ldmatrix, mma: all 32 lanes of the warp at the same kind of collective, else the launch fails
// with "divergent warp"). Warps run ahead of each other as far as the barriers allow, in an order
// redrawn (seeded: FASTLM_EMU_SEED, or emu_seed) at each __syncthreads and now and then at a warp
// collective, so a missing barrier shows up as a wrong result. Asynchronous operations (cp.async
// groups) complete at a random scheduling point before the wait that retires them.
// Checked on top:
//   * launches as the driver checks them: block and grid limits, `__launch_bounds__`, dynamic
//     shared memory above 48 KB only after cudaFuncSetAttribute opted in to at least that much,
//     static + dynamic shared memory within the per-block limit of every target arch
//     (emu_set_archs; the build's archs by default);
//   * memory (fastlm_emu_mem.h): global allocations, dynamic and static shared memory are guarded
//     mappings, so an out-of-bounds access fails the launch naming kernel, block, thread and
//     address; shared memory, static __shared__ arrays, fresh global allocations (0xFF: NaN) and
//     local variables (g++ -ftrivial-auto-var-init=pattern) start as poison in every block;
//   * PTX (fastlm_emu_ptx.h): the kernels' own asm strings are decoded; an unknown or misplaced
//     modifier, a wrong operand count or constraint fails; shared addresses must be aligned and
//     in bounds; a deadlock fails the launch with the threads' states.
// Not checked: the hardware memory model between barriers, timing, registers and spills (ptxas
// -v: FASTLM_PTXAS_VERBOSE=1 at the build), and what nvcc does to plain C++ arithmetic
// (--use_fast_math's approximations, FMA contraction; tests/test_cuda_emu_ptx.py checks that
// Adam's arithmetic is all explicitly rounded).
#pragma once

#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastlm_emu_half.h"
#include "fastlm_emu_mem.h"

// ---------------------------------------------------------------------------------------------
// CUDA keywords. build.py rewrites `__shared__` declarations and `__launch_bounds__` (into the
// ::emu::kernel_entry call it puts first in every kernel); leftovers fail to compile.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...) __launch_bounds___not_rewritten_by_cuda_emu_build_py
#define __shared__ __shared___declaration_not_rewritten_by_cuda_emu_build_py
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;

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

// kPoll: spin-waiting (poll_yield); runnable, but only picked when nothing else is.
enum class Wait : int { kRun = 0, kBlock = 1, kWarp = 2, kDone = 3, kPoll = 4 };

struct Block;
struct Fiber;

// One 16-byte (or 4/8-byte) cp.async copy: `bytes` read from src, the rest of `size` zero-filled.
struct Copy {
  unsigned char* dst;
  const void* src;
  int bytes, size;
};

// An asynchronous operation in flight (a cp.async group, ...): it completes once (its copies
// land, then `fn` runs), at a random scheduling point after it was issued or at the latest when
// its owner waits for it.
struct AsyncOp {
  std::vector<Copy> copies;
  std::function<void()> fn;
  Fiber* owner = nullptr;
  bool done = false;
  int index = -1;  // position in Runtime::async while pending
};

struct Fiber {
#ifdef FASTLM_EMU_ASM_SWITCH
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  Block* blk = nullptr;
  dim3 tid;
  int linear = 0, warp = 0, lane = 0;
  Wait state = Wait::kRun;
  const char* where = "";  // the collective it waits at
  // cp.async: copies issued and not yet committed; committed groups, oldest first.
  std::vector<Copy> pending;
  std::vector<std::shared_ptr<AsyncOp>> groups;
};

struct WarpState {
  int arrived = 0;
  int live = 0;
  int runnable = 0;
  const char* kind = nullptr;
  unsigned char slot[32][64];  // each lane's operands of the current collective
};

constexpr size_t kStack = size_t(1) << 20;
constexpr size_t kStaticWindow = size_t(1) << 24;  // shared addresses of static arrays start here

struct StaticShared;

// One resident block: its threads, barriers, dynamic shared memory and static arrays.
struct Block {
  int slot = 0;
  bool active = false;
  dim3 idx;
  int n = 0, live = 0, arrived = 0, runnable = 0;
  uint64_t epoch = 0;  // unique per block run (static arrays re-poison on a new epoch)
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<int> order;  // warp ids, most favoured first
  Region smem;             // dynamic shared memory (mapped per launch, re-poisoned per block)
  std::vector<StaticShared*> statics;  // static arrays this block touched
  Block() = default;
  Block(const Block&) = delete;
  ~Block() {
    for (Fiber& f : fibers) delete[] f.stack;
    unmap_region(smem);
  }
};

struct Runtime {
  std::vector<std::unique_ptr<Block>> blocks;  // the resident slots
#ifdef FASTLM_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  Fiber* cur = nullptr;
  dim3 grid_dim, block_dim;
  size_t smem_bytes = 0;
  std::function<void()> body;
  std::mt19937_64 rng{0};
  bool seeded = false;
  bool failed = false;
  std::string message;
  // The running launch: its kernel (named by the first thread's kernel_entry).
  const char* kernel = nullptr;
  bool entry_checked = false;
  bool probing = false;  // a launch error: one thread runs to kernel_entry to name the kernel
  uint64_t epochs = 0;
  std::vector<std::shared_ptr<AsyncOp>> async;  // pending asynchronous operations
  // Device model.
  std::vector<int> archs{80, 90};  // target archs (emu_set_archs): every limit holds on each
  std::vector<std::pair<const void*, int>> max_dyn_smem;  // cudaFuncSetAttribute opt-ins
  int concurrent = 2;  // blocks in flight
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& self() { return *rt().cur; }

// Largest shared memory per block (dynamic opt-in + static) of a compute capability, in bytes.
inline int smem_per_block_optin(int arch) {
  switch (arch) {
    case 70: case 72: return 96 * 1024;
    case 75: return 64 * 1024;
    case 80: case 87: return 163 * 1024;
    case 90: case 100: case 101: case 103: return 227 * 1024;
    default: return 99 * 1024;  // 86, 89, 120, 121
  }
}
inline int min_smem_optin() {
  int v = 1 << 30;
  for (int a : rt().archs) v = std::min(v, smem_per_block_optin(a));
  return v;
}
inline std::string archs_str() {
  std::string s;
  for (int a : rt().archs) s += (s.empty() ? "sm_" : ", sm_") + std::to_string(a);
  return s;
}

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

inline void set_state(Fiber& f, Wait s) {
  const bool was = f.state == Wait::kRun, now = s == Wait::kRun;
  f.state = s;
  if (was != now) {
    const int d = now ? 1 : -1;
    f.blk->warps[f.warp].runnable += d;
    f.blk->runnable += d;
  }
}

// A new random order of the block's warps.
inline void reprioritize(Block& b) {
  std::shuffle(b.order.begin(), b.order.end(), rt().rng);
}

inline std::string where_str() {
  Runtime& r = rt();
  std::ostringstream os;
  os << "cuda emulator: " << (r.kernel ? r.kernel : "kernel");
  if (r.cur != nullptr) {
    const Block& b = *r.cur->blk;
    os << ": block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << ") thread ("
       << r.cur->tid.x << "," << r.cur->tid.y << "," << r.cur->tid.z << ")";
  }
  return os.str();
}

// Fails the launch from the running thread (the message names kernel, block and thread).
[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (r.cur == nullptr) throw Error(where_str() + ": " + what);
  if (!r.failed) r.message = where_str() + ": " + what;
  r.failed = true;
  set_state(*r.cur, Wait::kDone);
  to_scheduler(*r.cur);
  std::abort();  // never resumed
}

inline void yield() { to_scheduler(*rt().cur); }

// A spin-wait step (a flag or semaphore poll): lets every other thread run first.
inline void poll_yield() {
  set_state(*rt().cur, Wait::kPoll);
  yield();
}

// ---------------------------------------------------------------------------------------------
// Asynchronous operations.
inline void async_finish(const std::shared_ptr<AsyncOp>& op) {
  if (op->done) return;
  Runtime& r = rt();
  op->done = true;
  if (op->index >= 0) {  // swap-remove from the pending list
    auto& v = r.async;
    const int i = op->index;
    v[i] = v.back();
    v[i]->index = i;
    v.pop_back();
    op->index = -1;
  }
  for (const Copy& c : op->copies) {
    std::memset(c.dst, 0, size_t(c.size));
    if (c.bytes) std::memcpy(c.dst, c.src, size_t(c.bytes));
  }
  if (op->fn) op->fn();
}
// Issues `op` (its copies and fn filled in) from the running thread.
inline std::shared_ptr<AsyncOp> async_start(std::shared_ptr<AsyncOp> op) {
  op->owner = rt().cur;
  op->index = int(rt().async.size());
  rt().async.push_back(op);
  return op;
}
// At a scheduling point: now and then one pending operation completes.
inline void async_tick() {
  Runtime& r = rt();
  if (!r.async.empty() && (r.rng() & 7) == 0) {
    auto op = r.async[r.rng() % r.async.size()];
    async_finish(op);
  }
}
// Everything the fiber issued completes (at its exit: a block retires after its copies land).
inline void async_drain(Fiber& f) {
  if (!f.pending.empty()) {
    auto op = std::make_shared<AsyncOp>();
    op->copies.swap(f.pending);
    async_finish(async_start(op));
  }
  for (auto& g : f.groups) async_finish(g);
  f.groups.clear();
}

// ---------------------------------------------------------------------------------------------
// Barriers.
inline void release_block(Block& b) {
  b.arrived = 0;
  for (Fiber& f : b.fibers)
    if (f.state == Wait::kBlock) set_state(f, Wait::kRun);
  reprioritize(b);
}

// __syncthreads: every live thread of the block. A thread that has returned counts as arrived.
inline void syncthreads() {
  Fiber& me = self();
  Block& b = *me.blk;
  if (++b.arrived == b.live) {
    release_block(b);
    return;
  }
  set_state(me, Wait::kBlock);
  me.where = "__syncthreads";
  yield();
}

// One barrier among the 32 lanes of the caller's warp, all at the same kind of collective.
inline void warp_barrier(const char* kind) {
  Runtime& r = rt();
  Fiber& me = *r.cur;
  Block& b = *me.blk;
  WarpState& w = b.warps[me.warp];
  if (w.live != 32) fail(std::string(kind) + " in a warp with " + std::to_string(w.live) +
                         " live lanes (warp collectives need all 32 here)");
  if (w.arrived == 0) w.kind = kind;
  else if (std::strcmp(w.kind, kind) != 0)
    fail(std::string("divergent warp: this lane is at ") + kind + " while another is at " + w.kind);
  if (++w.arrived == 32) {
    w.arrived = 0;
    for (int i = 32 * me.warp; i < std::min(b.n, 32 * me.warp + 32); ++i)
      if (b.fibers[i].state == Wait::kWarp) set_state(b.fibers[i], Wait::kRun);
    if (r.rng() % 16 == 0) reprioritize(b);  // now and then another warp gets ahead
    return;
  }
  set_state(me, Wait::kWarp);
  me.where = kind;
  yield();
}

// The collective pattern: put this lane's operands in its slot, wait for the warp, compute
// from every lane's slot, wait again (so no slot is overwritten while another lane reads it).
template <typename In, typename F>
inline void warp_collective(const char* kind, const In& mine, F&& compute) {
  static_assert(sizeof(In) <= 64, "slot too small");
  Fiber& me = self();
  WarpState& w = me.blk->warps[me.warp];
  std::memcpy(w.slot[me.lane], &mine, sizeof(In));
  warp_barrier(kind);
  compute([&](int lane) {
    In v;
    std::memcpy(&v, w.slot[lane & 31], sizeof(In));
    return v;
  });
  warp_barrier(kind);
}

// ---------------------------------------------------------------------------------------------
// Shared memory. Dynamic: the block's guarded mapping, shared addresses [0, size). Static
// arrays: one guarded mapping per declaration and resident slot, shared addresses from
// kStaticWindow on; poison again whenever a new block first reaches the declaration.
struct StaticShared {
  size_t bytes = 0, window = 0;
  // A deque: growing it keeps the earlier slots' Regions where regions() points at them (a
  // vector moved them, and the fault handler and the canary checks read freed memory).
  std::deque<Region> per_slot;
  std::vector<uint64_t> epoch;
  const char* name = "";
  void* get() {
    Runtime& r = rt();
    Block& b = *r.cur->blk;
    if (per_slot.size() <= size_t(b.slot)) {
      per_slot.resize(b.slot + 1);
      epoch.resize(b.slot + 1, 0);
    }
    Region& reg = per_slot[b.slot];
    if (reg.map == nullptr && !map_region(reg, bytes, 64 << 10, 64 << 10, "static __shared__ array"))
      fail("cannot map a static shared array");
    if (epoch[b.slot] != b.epoch) {
      // The fault handler and the canary checks find this Region through regions().
      auto it = regions().find(reg.map);
      if (it == regions().end() || it->second != &reg)
        fail("cuda emulator bug: a static shared array's Region moved after it was mapped");
      epoch[b.slot] = b.epoch;
      std::memset(reg.base, kPoison, bytes);
      b.statics.push_back(this);
    }
    return reg.base;
  }
};

inline size_t& static_window_next() {
  static size_t next = kStaticWindow;
  return next;
}

// `__shared__ T name;` (build.py: `auto& name = ::emu::static_shared<T, site>();`).
template <typename T, int Site>
inline T& static_shared() {
  static StaticShared s = [] {
    StaticShared v;
    v.bytes = sizeof(T);
    v.window = static_window_next();
    static_window_next() += (sizeof(T) + 127) & ~size_t(127);
    return v;
  }();
  return *static_cast<T*>(s.get());
}

inline unsigned char* dyn_smem() {
  return reinterpret_cast<unsigned char*>(self().blk->smem.base);
}
inline size_t dyn_smem_size() { return rt().smem_bytes; }

// A shared-space address of `bytes` bytes -> host pointer; fails naming `what` if it is not
// inside the dynamic shared memory or one static array of the running block.
inline unsigned char* shared_ptr(uint64_t addr, size_t bytes, const char* what) {
  Block& b = *self().blk;
  if (addr + bytes <= rt().smem_bytes) return reinterpret_cast<unsigned char*>(b.smem.base) + addr;
  for (StaticShared* s : b.statics)
    if (addr >= s->window && addr + bytes <= s->window + s->bytes)
      return reinterpret_cast<unsigned char*>(s->per_slot[b.slot].base) + (addr - s->window);
  std::ostringstream os;
  os << what << ": shared address " << addr << " (" << bytes << " bytes) is outside the "
     << rt().smem_bytes << " bytes of dynamic shared memory and every static shared array";
  fail(os.str());
}

inline uint64_t generic_to_shared(const void* p) {
  Block& b = *self().blk;
  const char* c = static_cast<const char*>(p);
  if (c >= b.smem.base && c <= b.smem.base + rt().smem_bytes) return uint64_t(c - b.smem.base);
  for (StaticShared* s : b.statics) {
    const char* base = s->per_slot[b.slot].base;
    if (c >= base && c <= base + s->bytes) return s->window + uint64_t(c - base);
  }
  fail("__cvta_generic_to_shared of " + describe_address(p) +
       ": not in this block's shared memory");
}

// ---------------------------------------------------------------------------------------------
// Kernel entry (build.py puts `::emu::kernel_entry(__PRETTY_FUNCTION__, <launch bounds>);` first
// in every __global__ function): names the kernel and checks the block against
// __launch_bounds__(max_threads).
inline void kernel_entry(const char* name, int max_threads = 0, int = 0) {
  Runtime& r = rt();
  if (r.probing) {
    r.kernel = name;
    set_state(*r.cur, Wait::kDone);
    to_scheduler(*r.cur);
    std::abort();  // never resumed
  }
  if (r.entry_checked) return;
  r.entry_checked = true;
  r.kernel = name;
  const int n = int(r.block_dim.x * r.block_dim.y * r.block_dim.z);
  if (max_threads > 0 && n > max_threads)
    fail("launch failed (too many resources requested): a block of " + std::to_string(n) +
         " threads exceeds the kernel's __launch_bounds__(" + std::to_string(max_threads) + ")");
}

// ---------------------------------------------------------------------------------------------
// The scheduler.
inline void fiber_main() {
  Runtime& r = rt();
  r.body();
  Fiber& me = *r.cur;
  Block& b = *me.blk;
  async_drain(me);
  set_state(me, Wait::kDone);
  --b.live;
  --b.warps[me.warp].live;
  // The threads still at __syncthreads may now all have arrived.
  if (b.live > 0 && b.arrived == b.live) release_block(b);
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

inline std::string states(const Block& b) {
  std::ostringstream os;
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == Wait::kDone) continue;
    if (shown++ == 8) {
      os << " ...";
      break;
    }
    os << " thread " << f.linear << " at " << f.where << ";";
  }
  return os.str();
}

inline void start_fiber(Fiber& f) {
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

// Makes slot b resident with block `bid` (n threads).
inline void start_block(Block& b, const dim3& bid, int n) {
  Runtime& r = rt();
  b.active = true;
  b.idx = bid;
  b.epoch = ++r.epochs;
  b.n = n;
  b.live = n;
  b.arrived = 0;
  b.runnable = 0;
  b.statics.clear();
  std::memset(b.smem.base, kPoison, r.smem_bytes);
  b.warps.assign((n + 31) / 32, WarpState{});
  b.order.resize(b.warps.size());
  for (size_t i = 0; i < b.order.size(); ++i) b.order[i] = int(i);
  reprioritize(b);
  if (b.fibers.size() < size_t(n)) {
    const size_t old = b.fibers.size();
    b.fibers.resize(n);
    for (size_t i = old; i < size_t(n); ++i) b.fibers[i].stack = new char[kStack];
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.blk = &b;
    f.linear = i;
    f.tid = dim3(i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y,
                 i / (r.block_dim.x * r.block_dim.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = Wait::kDone;
    set_state(f, Wait::kRun);
    f.where = "start";
    f.pending.clear();
    f.groups.clear();
    b.warps[f.warp].live++;
    start_fiber(f);
  }
}

// After a block retired: its shared memory's slack is untouched and it fits the limits.
inline void finish_block(Block& b) {
  Runtime& r = rt();
  b.active = false;
  auto where = [&] {
    std::ostringstream os;
    os << "cuda emulator: " << (r.kernel ? r.kernel : "kernel") << ": block (" << b.idx.x << ","
       << b.idx.y << "," << b.idx.z << ")";
    return os.str();
  };
  if (const char* p = canary_broken(b.smem)) {
    const std::string msg = describe_address(p);
    fill_canary(b.smem);  // reported once
    throw Error(where() + " wrote outside its dynamic shared memory: " + msg);
  }
  for (StaticShared* s : b.statics)
    if (const char* p = canary_broken(s->per_slot[b.slot])) {
      const std::string msg = describe_address(p);
      fill_canary(s->per_slot[b.slot]);
      throw Error(where() + " wrote outside a static shared array: " + msg);
    }
  size_t static_bytes = 0;
  for (StaticShared* s : b.statics) static_bytes += s->bytes;
  if (static_bytes > 48 * 1024)
    throw Error(where() + ": " + std::to_string(static_bytes) +
                " bytes of static shared memory (at most 49152)");
  if (static_bytes + r.smem_bytes > size_t(min_smem_optin()))
    throw Error(where() + ": " + std::to_string(static_bytes) + " bytes of static and " +
                std::to_string(r.smem_bytes) + " of dynamic shared memory exceed the " +
                std::to_string(min_smem_optin()) + " bytes per block of " + archs_str());
}

// Picks the next thread to run: in a block chosen at random now and then (interleaving), the
// most favoured warp with a runnable thread, a uniform runnable lane of it. Spin-waiting threads
// only when nothing else can run.
inline Fiber* pick(Block*& cur, std::vector<Block*>& active) {
  Runtime& r = rt();
  if (cur == nullptr || cur->runnable == 0 || (active.size() > 1 && (r.rng() & 7) == 0)) {
    cur = nullptr;
    int any = 0;
    for (Block* b : active)
      if (b->runnable > 0 && r.rng() % uint64_t(++any) == 0) cur = b;
    if (cur == nullptr) return nullptr;
  }
  for (int w : cur->order) {
    WarpState& ws = cur->warps[w];
    if (ws.runnable == 0) continue;
    int k = int(r.rng() % uint64_t(ws.runnable));
    for (int i = 32 * w; i < std::min(cur->n, 32 * w + 32); ++i)
      if (cur->fibers[i].state == Wait::kRun && k-- == 0) return &cur->fibers[i];
  }
  std::abort();  // runnable counts out of sync
}

// Runs every block of the launch (in `order`), `concurrent` at a time.
inline void run_blocks(const std::vector<dim3>& order, int n) {
  Runtime& r = rt();
  size_t next = 0;
  std::vector<Block*> active;
  const int slots = std::max(1, std::min<int>(r.concurrent, int(order.size())));
  auto admit = [&](Block& b) {
    start_block(b, order[next++], n);
    active.push_back(&b);
  };
  for (int s = 0; s < slots && next < order.size(); ++s) admit(*r.blocks[s]);
  Block* cur = nullptr;
  int idle_polls = 0;
  while (!active.empty()) {
    async_tick();
    Fiber* f = pick(cur, active);
    if (f == nullptr) {
      // Nothing runnable: spin-waiting threads get another turn (and, if only they are left,
      // another block becomes resident), else the block is deadlocked.
      bool polling = false;
      for (Block* b : active)
        for (int i = 0; i < b->n; ++i)
          if (b->fibers[i].state == Wait::kPoll) {
            set_state(b->fibers[i], Wait::kRun);
            polling = true;
          }
      if (polling) {
        if (++idle_polls == 64 && next < order.size()) {
          idle_polls = 0;
          auto blk = std::make_unique<Block>();
          blk->slot = int(r.blocks.size());
          if (!map_region(blk->smem, r.smem_bytes, 64 << 10, 256 << 10, "dynamic shared memory"))
            throw Error("cuda emulator: cannot map shared memory");
          r.blocks.push_back(std::move(blk));
          admit(*r.blocks.back());
        } else if (idle_polls > 1000000) {
          throw Error(where_str() + ": deadlock: every live thread spin-waits");
        }
        continue;
      }
      for (Block* b : active)
        if (b->live > 0) {
          std::ostringstream os;
          os << where_str() << ": deadlock in block (" << b->idx.x << "," << b->idx.y << ","
             << b->idx.z << "): threads wait at different barriers:" << states(*b);
          throw Error(os.str());
        }
    } else {
      r.cur = f;
      to_fiber(*f);
      r.cur = nullptr;
      if (r.failed) throw Error(r.message);
      if (f->state != Wait::kPoll) idle_polls = 0;  // it got past its spin-wait: progress
    }
    for (size_t i = 0; i < active.size();) {
      Block* b = active[i];
      if (b->live == 0) {
        finish_block(*b);
        if (cur == b) cur = nullptr;
        if (next < order.size()) {
          start_block(*b, order[next++], n);
          ++i;
        } else {
          active.erase(active.begin() + i);
        }
      } else {
        ++i;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Global memory faults: while a kernel runs, SIGSEGV in a thread fails the launch.
inline struct sigaction& old_segv() {
  static struct sigaction a;
  return a;
}

inline void on_segv(int sig, siginfo_t* si, void* uc) {
  Runtime& r = rt();
  if (r.cur == nullptr) {  // not in a kernel: the previous handler's business
    sigaction(SIGSEGV, &old_segv(), nullptr);
    return;
  }
  (void)sig;
  bool write = false;
#if defined(__x86_64__)
  write = (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  (void)uc;
#endif
  fail(std::string("invalid ") + (write ? "write" : "read") + " at " +
       describe_address(si->si_addr));
}

struct SegvScope {
  SegvScope() {
    struct sigaction a;
    std::memset(&a, 0, sizeof(a));
    a.sa_sigaction = on_segv;
    a.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&a.sa_mask);
    sigaction(SIGSEGV, &a, &old_segv());
  }
  ~SegvScope() { sigaction(SIGSEGV, &old_segv(), nullptr); }
};

// After a launch: no global allocation's slack was written.
inline void check_global_canaries() {
  for (auto& kv : regions()) {
    const Region& g = *kv.second;
    if (std::strcmp(g.kind, "global allocation") != 0) continue;
    if (const char* p = canary_broken(g)) {
      const std::string msg = describe_address(p);
      fill_canary(g);  // reported once
      throw Error(std::string("cuda emulator: ") + (rt().kernel ? rt().kernel : "kernel") +
                  " wrote outside a global allocation: " + msg);
    }
  }
}

inline int opted_in(const void* kernel) {
  for (auto& kv : rt().max_dyn_smem)
    if (kv.first == kernel) return kv.second;
  return 0;
}

// The driver's launch checks; "" when the launch is valid.
inline std::string launch_error(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  std::ostringstream os;
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || n > 1024)
    os << "invalid configuration: block (" << block.x << "," << block.y << "," << block.z
       << ") (at most 1024 threads, x and y <= 1024, z <= 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u ||
           grid.y > 65535 || grid.z > 65535)
    os << "invalid configuration: grid (" << grid.x << "," << grid.y << "," << grid.z
       << ") (x in [1, 2^31-1], y and z in [1, 65535])";
  else if (smem > size_t(min_smem_optin()))
    os << smem << " bytes of dynamic shared memory exceed the " << min_smem_optin()
       << " bytes per block of " << archs_str();
  else if (smem > 48 * 1024 && size_t(opted_in(kernel)) < smem)
    os << "too many resources requested: " << smem << " bytes of dynamic shared memory need "
       << "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= " << smem
       << ") first (the kernel's opt-in is " << opted_in(kernel) << ")";
  return os.str();
}

// Runs kernel(args...) over the grid; returns after every block has finished.
template <typename F>
inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, F&& body) {
  Runtime& r = rt();
  if (!r.seeded) {
    const char* s = std::getenv("FASTLM_EMU_SEED");
    r.rng.seed(s ? std::strtoull(s, nullptr, 10) : 0x5eedULL);
    r.seeded = true;
  }
  r.body = std::forward<F>(body);
  r.failed = false;
  r.message.clear();
  r.kernel = nullptr;
  r.entry_checked = false;
  r.grid_dim = grid;
  r.block_dim = block;
  const int n = int(uint64_t(block.x) * block.y * block.z);
  const std::string bad = launch_error(kernel, grid, block, smem_bytes);
  struct Reset {
    ~Reset() {
      Runtime& r = rt();
      r.body = nullptr;
      r.probing = false;
      r.cur = nullptr;
      r.async.clear();
      for (auto& b : r.blocks) unmap_region(b->smem);
      r.blocks.resize(std::min<size_t>(r.blocks.size(), 2));
    }
  } reset;
  const int slots = std::max(1, std::min<int>(r.concurrent, int(uint64_t(grid.x) * grid.y *
                                                                 grid.z)));
  while (r.blocks.size() < size_t(slots)) {
    r.blocks.push_back(std::make_unique<Block>());
    r.blocks.back()->slot = int(r.blocks.size()) - 1;
  }
  r.smem_bytes = bad.empty() ? smem_bytes : 0;
  for (auto& b : r.blocks)
    if (!map_region(b->smem, r.smem_bytes, 64 << 10, 256 << 10, "dynamic shared memory"))
      throw Error("cuda emulator: cannot map shared memory");
  if (!bad.empty()) {
    // Name the kernel: one thread runs up to kernel_entry.
    r.probing = true;
    r.block_dim = dim3(1, 1, 1);
    start_block(*r.blocks[0], dim3(0, 0, 0), 1);
    r.cur = &r.blocks[0]->fibers[0];
    to_fiber(*r.cur);
    r.cur = nullptr;
    throw Error(std::string("cuda emulator: launch of ") + (r.kernel ? r.kernel : "a kernel") +
                " with grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                std::to_string(grid.z) + "), block (" + std::to_string(block.x) + "," +
                std::to_string(block.y) + "," + std::to_string(block.z) + ") failed: " + bad);
  }
  std::vector<dim3> order;
  order.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  std::shuffle(order.begin(), order.end(), r.rng);
  {
    SegvScope segv;
    run_blocks(order, n);
  }
  check_global_canaries();
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
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [k, tup]() { std::apply(k, tup); });
  }
};

template <typename K, typename G, typename B>
inline Launch<K> make_launch(K kernel, G grid, B block, size_t smem = 0,
                             cudaStream_t = nullptr) {
  return Launch<K>{kernel, dim3(grid), dim3(block), smem};
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Built-in variables and device functions.
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::self().blk->idx)
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

inline size_t __cvta_generic_to_shared(const void* p) { return emu::generic_to_shared(p); }

// ---------------------------------------------------------------------------------------------
// Host API.
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// The emulated device has 132 SMs (an H100 SXM) and, per block, the shared memory of the
// smallest target arch (every target must be able to run the launch).
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 132 : emu::min_smem_optin();
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > emu::min_smem_optin())
    return cudaErrorInvalidValue;
  for (auto& kv : emu::rt().max_dyn_smem)
    if (kv.first == kernel) {
      kv.second = value;
      return cudaSuccess;
    }
  emu::rt().max_dyn_smem.emplace_back(kernel, value);
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t) {
  *n = std::max(1, 2048 / std::max(threads, 1));
  return cudaSuccess;
}
