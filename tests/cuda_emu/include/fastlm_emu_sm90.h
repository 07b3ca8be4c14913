// The CUDA emulator's Hopper (sm_90a) instructions: the PTX of csrc/cuda/sm90_ptx.h, decoded
// from the same strings (fastlm_emu_ptx.h's Decoder calls decode_sm90 first) and run from the
// PTX ISA's definitions (ISA 8.x: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate",
// "Tensor copy: cp.async.bulk.tensor", "mbarrier", "membar/fence", "bar", "setmaxnreg",
// "elect.sync"), written independently of the kernels.
//
// Model, per resident block (state reset whenever a new block takes the slot):
//   * mbarrier: a side table keyed by the barrier's shared address (init required first):
//     expected and pending arrivals, transaction count, phase. A phase completes when pending
//     arrivals and pending transaction bytes are both zero; try_wait.parity(P) is true once the
//     phase of parity P completed, and yields to the other threads when it is not.
//   * the async proxy: TMA and wgmma read shared memory through their own view, which ordinary
//     stores reach only at a fence.proxy.async (every writer's fence copies the block's shared
//     memory into the view; TMA loads write both). So a missing fence reads stale data.
//   * TMA loads and stores, wgmma: asynchronous operations that complete at a random scheduling
//     point after issue, at the latest at their wait (mbarrier phase, cp.async.bulk.wait_group,
//     wgmma.wait_group); half the TMA loads land only when a thread waits on their mbarrier,
//     so a read without that wait sees the old data. A load lands in shared memory (swizzled, out-of-bounds elements
//     zero-filled) and then signals complete_tx; a store reads shared memory when it completes.
//   * wgmma is a warpgroup instruction: each of the 128 threads deposits its operands (its A
//     fragment, its accumulator registers' addresses and values); once all have, the operation
//     can complete and writes every thread's accumulators. Its shared-memory operands are read
//     at completion. A thread's wgmmas complete in issue order, and a wgmma that accumulates
//     into the registers of one still in flight takes that one's result as its input. At
//     completion the accumulator registers must still hold the values they had at issue (else
//     the kernel wrote them while the wgmma owned them), and the shared-memory operands must
//     be what they were at issue (else their TMA load landed after the issue or the buffer was
//     refilled too early); a wgmma issued with no wgmma.fence since the thread's last
//     wait_group fails. A TMA store's tile must likewise be unchanged until the store reads it.
//   * named barriers 1..15 (bar.sync / bar.arrive with a thread count, a multiple of 32).
//   * setmaxnreg: all 128 threads of a warpgroup must execute the same ones; the block starts
//     with 65536 / threads registers per thread (rounded down to 8) and .inc waits until the
//     other warpgroups' .dec have freed enough (a request that can never fit fails).
//   * elect.sync: a random lane of the full warp (kernels must not assume lane 0).
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastlm_emu.h"
#include "fastlm_emu_half.h"
#include "fastlm_emu_sm90_host.h"

namespace emu {
namespace sm90 {

using ptx::Arg;
using ptx::Ctx;
using ptx::Insn;
using ptx::Ty;

constexpr int kWarpgroup = 128;

struct MBar {
  uint32_t expected = 0, pending = 0;
  int64_t tx = 0;
  uint32_t phase = 0;  // completed phases
};

struct NamedBar {
  int count = 0, arrived = 0;
  uint64_t generation = 0;
};

struct WgmmaOp;

struct WarpgroupState {
  std::vector<std::shared_ptr<WgmmaOp>> ops;  // by issue sequence
  std::vector<std::pair<int, int>> setmaxnreg;  // (inc?, count) by ordinal
  int regs = 0;                                  // registers per thread now
  bool exited = false;
};

struct ThreadState {
  int wgmma_seq = 0;
  std::vector<int> open;                 // wgmmas since the last commit
  std::deque<std::vector<int>> groups;   // committed wgmma groups, oldest first
  bool need_fence = true;
  std::unordered_map<const void*, int> acc_last;  // accumulator address -> last wgmma writing it
  std::vector<std::shared_ptr<AsyncOp>> bulk_open;  // TMA stores since the last commit
  std::deque<std::vector<std::shared_ptr<AsyncOp>>> bulk_groups;
  int setmaxnreg_n = 0;
};

struct BlockState {
  uint64_t epoch = 0;
  Block* blk = nullptr;
  std::map<uint32_t, MBar> mbar;
  // TMA loads that land only when a thread waits on their mbarrier (the latest point the
  // hardware allows), by barrier address.
  std::map<uint32_t, std::vector<std::shared_ptr<AsyncOp>>> lazy;
  NamedBar named[16];
  std::vector<unsigned char> view;  // the async proxy's view of the dynamic shared memory
  std::vector<WarpgroupState> wg;
  int pool = 0;  // registers the block holds
  std::unordered_map<Fiber*, ThreadState> threads;
};

inline std::unordered_map<Block*, BlockState>& block_states() {
  static std::unordered_map<Block*, BlockState> m;
  return m;
}

inline BlockState& state_of(Block& b) {
  BlockState& s = block_states()[&b];
  if (s.epoch != b.epoch || s.blk != &b) {
    s = BlockState{};
    s.epoch = b.epoch;
    s.blk = &b;
    s.view.assign(rt().smem_bytes, kPoison);
    const int n = b.n;
    const int per = std::min(255, (65536 / std::max(n, 1)) / 8 * 8);
    s.wg.assign(size_t((n + kWarpgroup - 1) / kWarpgroup), WarpgroupState{});
    for (auto& w : s.wg) w.regs = per;
    s.pool = per * n;
  }
  return s;
}
inline BlockState& state() { return state_of(*self().blk); }
inline ThreadState& thread_state() { return state().threads[&self()]; }

// Whether the block that issued an asynchronous operation still runs (same slot, same epoch).
inline bool alive(Block* b, uint64_t epoch) { return b->active && b->epoch == epoch; }

[[noreturn]] inline void bad(const Ctx& c, const Insn& in, const std::string& what) {
  c.prog->bad(&in, what);
}

// ---------------------------------------------------------------------------------------------
// mbarrier.

inline MBar& mbar_at(const Ctx& c, const Insn& in, BlockState& s, uint64_t addr) {
  auto it = s.mbar.find(uint32_t(addr));
  if (it == s.mbar.end())
    bad(c, in, "mbarrier at shared address " + std::to_string(addr) + " used before mbarrier.init");
  return it->second;
}

inline void mbar_complete_if_done(MBar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
  }
}

// in.a: 0 init, 1 arrive, 2 arrive.expect_tx, 3 try_wait.parity, 4 test_wait.parity
inline void exec_mbarrier(const Insn& in, Ctx& c) {
  BlockState& s = state();
  switch (in.a) {
    case 0: {
      const uint64_t a = ptx::addr(c, in.args[0]);
      if (a % 8 != 0) bad(c, in, "mbarrier address not 8-byte aligned");
      shared_ptr(a, 8, "mbarrier.init");
      const uint32_t n = ptx::u32(c, in.args[1]);
      if (n == 0 || n > (1u << 20) - 1) bad(c, in, "arrival count outside [1, 2^20 - 1]");
      MBar m;
      m.expected = m.pending = n;
      s.mbar[uint32_t(a)] = m;
      return;
    }
    case 1:
    case 2: {
      MBar& m = mbar_at(c, in, s, ptx::addr(c, in.args[1]));
      if (in.a == 2) m.tx += int64_t(ptx::u32(c, in.args[2]));
      if (m.pending == 0) bad(c, in, "arrive on an mbarrier with no pending arrivals");
      c.reg[in.args[0].reg] = m.phase;  // the state token
      --m.pending;
      mbar_complete_if_done(m);
      return;
    }
    default: {
      auto lz = s.lazy.find(uint32_t(ptx::addr(c, in.args[1])));
      if (lz != s.lazy.end()) {  // the loads this wait is for land now
        auto ops = std::move(lz->second);
        s.lazy.erase(lz);
        for (auto& op : ops) async_finish(op);
      }
      MBar& m = mbar_at(c, in, s, ptx::addr(c, in.args[1]));
      const uint32_t parity = ptx::u32(c, in.args[2]) & 1u;
      bool done = (m.phase & 1u) != parity;
      if (!done && in.a == 3) {  // try_wait: the hardware suspends a while; others run
        poll_yield();
        done = (state().mbar[uint32_t(ptx::addr(c, in.args[1]))].phase & 1u) != parity;
      }
      c.reg[in.args[0].reg] = done;
      return;
    }
  }
}

// complete_tx from an asynchronous copy of block b.
inline void mbar_complete_tx(Block* b, uint64_t epoch, uint32_t addr, int64_t bytes,
                             const std::string& who) {
  if (!alive(b, epoch)) throw Error("cuda emulator: " + who + " completed after its block exited");
  BlockState& s = state_of(*b);
  auto it = s.mbar.find(addr);
  if (it == s.mbar.end()) throw Error("cuda emulator: " + who + ": no mbarrier at its address");
  MBar& m = it->second;
  m.tx -= bytes;
  if (m.tx < 0)
    throw Error("cuda emulator: " + who + ": complete_tx of more bytes than the mbarrier expects");
  mbar_complete_if_done(m);
}

// ---------------------------------------------------------------------------------------------
// Fences, named barriers, setmaxnreg, elect.sync.

// in.a: 0 fence.proxy.async (the async proxy's view catches up), 1 fence.mbarrier_init
inline void exec_fence(const Insn& in, Ctx&) {
  if (in.a == 0) {
    BlockState& s = state();
    if (!s.view.empty()) std::memcpy(s.view.data(), s.blk->smem.base, s.view.size());
  }
}

// in.a: 0 bar.sync, 1 bar.arrive
inline void exec_bar(const Insn& in, Ctx& c) {
  BlockState& s = state();
  const uint32_t id = ptx::u32(c, in.args[0]);
  const int n = self().blk->n;
  const int count = in.args.size() > 1 ? int(ptx::u32(c, in.args[1])) : n;
  if (id == 0) bad(c, in, "barrier 0 is __syncthreads here; named barriers are 1..15");
  if (id > 15) bad(c, in, "barrier id " + std::to_string(id) + " outside 0..15");
  if (count <= 0 || count % 32 != 0 || count > n)
    bad(c, in, "thread count " + std::to_string(count) + " is not a multiple of 32 in [32, " +
                   std::to_string(n) + "]");
  NamedBar& b = s.named[id];
  if (b.arrived == 0) b.count = count;
  else if (b.count != count)
    bad(c, in, "barrier " + std::to_string(id) + " used with thread counts " +
                   std::to_string(b.count) + " and " + std::to_string(count) + " at once");
  const uint64_t gen = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  if (in.a == 0)
    while (state().named[id].generation == gen) poll_yield();
}

// in.a: 1 inc, 0 dec; in.b: the count
inline void exec_setmaxnreg(const Insn& in, Ctx& c) {
  Fiber& f = self();
  BlockState& s = state();
  if (f.blk->n % kWarpgroup != 0) bad(c, in, "the block is not whole warpgroups");
  WarpgroupState& w = s.wg[size_t(f.linear / kWarpgroup)];
  ThreadState& t = s.threads[&f];
  const int k = t.setmaxnreg_n++;
  const std::pair<int, int> mine{in.a, in.b};
  if (int(w.setmaxnreg.size()) <= k) {
    w.setmaxnreg.push_back(mine);
    if (in.a == 1 && in.b < w.regs)
      bad(c, in, ".inc to " + std::to_string(in.b) + " below the " + std::to_string(w.regs) +
                     " registers the warpgroup has");
    if (in.a == 0 && in.b > w.regs)
      bad(c, in, ".dec to " + std::to_string(in.b) + " above the " + std::to_string(w.regs) +
                     " registers the warpgroup has");
    if (in.a == 1) {  // wait for the registers to be free
      for (int polls = 0;; ++polls) {
        int used = 0;
        for (const auto& o : state().wg) used += o.regs * kWarpgroup;
        if (used - w.regs * kWarpgroup + in.b * kWarpgroup <= s.pool) break;
        if (polls == 100000)
          bad(c, in, "waits forever: the warpgroups would hold " +
                         std::to_string(used - w.regs * kWarpgroup + in.b * kWarpgroup) +
                         " registers, the block has " + std::to_string(s.pool));
        poll_yield();
      }
    }
    w.regs = in.b;
  } else if (w.setmaxnreg[size_t(k)] != mine) {
    bad(c, in, "threads of one warpgroup execute different setmaxnreg instructions");
  }
}

struct ElectIn {
  uint32_t mask;
  uint32_t draw;
};

inline void exec_elect(const Insn& in, Ctx& c) {
  const uint32_t mask = ptx::u32(c, in.args[2]);
  if (mask != 0xffffffffu) bad(c, in, "only a full membermask is emulated");
  const int me = self().lane;
  int leader = 0;
  warp_collective("elect.sync", ElectIn{mask, uint32_t(rt().rng())},
                  [&](auto lane_in) { leader = int(lane_in(0).draw % 32u); });
  if (in.args[0].kind == Arg::kReg) c.reg[in.args[0].reg] = uint32_t(leader);
  c.reg[in.args[1].reg] = me == leader;
}

// setp.cmp.{b32,u32,s32} (wgmma's scale-d predicate): in.a = comparison, in.b = signed
inline void exec_setp_int(const Insn& in, Ctx& c) {
  const uint32_t x = ptx::u32(c, in.args[1]), y = ptx::u32(c, in.args[2]);
  const int64_t sx = in.b ? int64_t(int32_t(x)) : int64_t(x);
  const int64_t sy = in.b ? int64_t(int32_t(y)) : int64_t(y);
  bool r = false;
  switch (in.a) {
    case 0: r = sx == sy; break;
    case 1: r = sx != sy; break;
    case 2: r = sx < sy; break;
    case 3: r = sx <= sy; break;
    case 4: r = sx > sy; break;
    default: r = sx >= sy; break;
  }
  c.reg[in.args[0].reg] = r;
}

// ld.acquire.gpu.global.{s32,u32,b32} (a semaphore poll: every such load is a scheduling point,
// so a thread spinning on it lets the others run) and red.release.gpu.global.add.{s32,u32}.
inline void exec_ld_acquire(const Insn& in, Ctx& c) {
  poll_yield();
  uint32_t v;
  std::memcpy(&v, reinterpret_cast<const void*>(uintptr_t(ptx::addr(c, in.args[1]))), 4);
  c.reg[in.args[0].reg] = v;
}
inline void exec_red_add(const Insn& in, Ctx& c) {
  auto* p = reinterpret_cast<uint32_t*>(uintptr_t(ptx::addr(c, in.args[0])));
  *p += ptx::u32(c, in.args[1]);
}

// ---------------------------------------------------------------------------------------------
// TMA.

inline const TensorMap& tensor_map(const Ctx& c, const Insn& in, uint64_t generic) {
  if (generic % 64 != 0) bad(c, in, "tensor map address not 64-byte aligned");
  const auto* t = reinterpret_cast<const TensorMap*>(uintptr_t(generic));
  if (t->magic != kTensorMapMagic) bad(c, in, "not an encoded tensor map (cuTensorMapEncodeTiled)");
  return *t;
}

// Shared byte address of box element (i0..i4) of a box written at `base` (swizzled).
inline uint64_t box_offset(const TensorMap& t, const uint32_t (&i)[5], uint64_t base) {
  uint64_t lin = 0;
  for (int d = t.rank - 1; d >= 0; --d) lin = lin * t.box[d] + i[d];
  uint64_t a = base + lin * uint64_t(t.elem_bytes);
  if (t.swizzle == 128) a ^= ((a >> 7) & 7) << 4;
  else if (t.swizzle == 64) a ^= ((a >> 7) & 3) << 4;
  else if (t.swizzle == 32) a ^= ((a >> 7) & 1) << 4;
  return a;
}

// Calls f(shared offset, global address or 0 when out of bounds) for every element of the box
// at coordinates crd.
template <typename F>
inline void for_box(const TensorMap& t, const int32_t (&crd)[5], uint64_t base, F&& f) {
  uint32_t i[5] = {0, 0, 0, 0, 0};
  uint64_t total = 1;
  for (int d = 0; d < t.rank; ++d) total *= t.box[d];
  for (uint64_t e = 0; e < total; ++e) {
    uint64_t r = e;
    bool in = true;
    uint64_t g = t.addr;
    for (int d = 0; d < t.rank; ++d) {
      i[d] = uint32_t(r % t.box[d]);
      r /= t.box[d];
      const int64_t x = int64_t(crd[d]) + i[d];
      if (x < 0 || uint64_t(x) >= t.dims[d]) in = false;
      g += uint64_t(x) * (d == 0 ? uint64_t(t.elem_bytes) : t.strides[d - 1]);
    }
    f(box_offset(t, i, base), in ? g : 0);
  }
}

inline uint64_t box_bytes(const TensorMap& t) {
  uint64_t n = uint64_t(t.elem_bytes);
  for (int d = 0; d < t.rank; ++d) n *= t.box[d];
  return n;
}

inline void check_box_dst(const Ctx& c, const Insn& in, const TensorMap& t, uint64_t sh) {
  const uint64_t align = t.swizzle ? 1024 : 128;
  if (sh % align != 0)
    bad(c, in, "shared address " + std::to_string(sh) + " not " + std::to_string(align) +
                   "-byte aligned");
  if (sh + box_bytes(t) > rt().smem_bytes)
    bad(c, in, "the box (" + std::to_string(box_bytes(t)) + " bytes at shared address " +
                   std::to_string(sh) + ") is outside the dynamic shared memory");
}

inline void read_coords(const Ctx& c, const Insn& in, int32_t (&crd)[5]) {
  const Arg& v = in.args[1];
  for (int d = 0; d < 5; ++d) crd[d] = 0;
  for (int d = 0; d < v.vn; ++d) crd[d] = int32_t(uint32_t(c.reg[in.vregs[v.vbegin + d]]));
}

// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [map, {c}],
// [mbar]: args[0] dst address, args[1] coordinate vector, args[2] map register, args[3] mbar.
inline void exec_tma_load(const Insn& in, Ctx& c) {
  const TensorMap& t = tensor_map(c, in, ptx::u64(c, in.args[2]));
  if (t.rank != in.a) bad(c, in, "the tensor map has rank " + std::to_string(t.rank));
  const uint64_t dst = ptx::addr(c, in.args[0]);
  check_box_dst(c, in, t, dst);
  const uint32_t bar = uint32_t(ptx::addr(c, in.args[3]));
  BlockState& s = state();
  mbar_at(c, in, s, bar);
  int32_t crd[5];
  read_coords(c, in, crd);
  Block* b = s.blk;
  const uint64_t epoch = s.epoch;
  const TensorMap tm = t;
  auto op = std::make_shared<AsyncOp>();
  op->fn = [b, epoch, tm, crd, dst, bar]() {
    if (!alive(b, epoch)) throw Error("cuda emulator: a TMA load landed after its block exited");
    BlockState& st = state_of(*b);
    unsigned char* sm = reinterpret_cast<unsigned char*>(b->smem.base);
    const int es = tm.elem_bytes;
    for_box(tm, crd, dst, [&](uint64_t off, uint64_t g) {
      if (g) {
        std::memcpy(sm + off, reinterpret_cast<const void*>(uintptr_t(g)), size_t(es));
      } else if (tm.oob_nan) {
        std::memset(sm + off, 0xFF, size_t(es));
      } else {
        std::memset(sm + off, 0, size_t(es));
      }
      std::memcpy(st.view.data() + off, sm + off, size_t(es));
    });
    mbar_complete_tx(b, epoch, bar, int64_t(box_bytes(tm)), "a TMA load");
  };
  if (rt().rng() & 1) async_start(op);  // lands at a random scheduling point
  else s.lazy[bar].push_back(op);        // lands when a thread waits on its mbarrier
}

// cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group [map, {c}], [src]: args[0] src,
// args[1] coordinates, args[2] map register.
inline void exec_tma_store(const Insn& in, Ctx& c) {
  const TensorMap& t = tensor_map(c, in, ptx::u64(c, in.args[2]));
  if (t.rank != in.a) bad(c, in, "the tensor map has rank " + std::to_string(t.rank));
  const uint64_t src = ptx::addr(c, in.args[0]);
  check_box_dst(c, in, t, src);
  BlockState& s = state();
  int32_t crd[5];
  read_coords(c, in, crd);
  Block* b = s.blk;
  const uint64_t epoch = s.epoch;
  const TensorMap tm = t;
  // The staging tile as the async proxy sees it at issue; it must not change until the store
  // has read it (cp.async.bulk.wait_group.read).
  auto snap = std::make_shared<std::vector<unsigned char>>(
      s.view.begin() + int64_t(src), s.view.begin() + int64_t(src + box_bytes(t)));
  const std::string where = c.prog->where;
  auto op = std::make_shared<AsyncOp>();
  op->fn = [b, epoch, tm, crd, src, snap, where]() {
    if (!alive(b, epoch))
      throw Error("cuda emulator: " + where + ": a TMA store read shared memory after its block "
                  "exited (no cp.async.bulk.wait_group before the exit)");
    BlockState& st = state_of(*b);
    if (std::memcmp(snap->data(), st.view.data() + src, snap->size()) != 0)
      throw Error("cuda emulator: " + where + ": the shared memory of a TMA store changed before "
                  "the store read it (no cp.async.bulk.wait_group.read before reusing it)");
    const int es = tm.elem_bytes;
    for_box(tm, crd, src, [&](uint64_t off, uint64_t g) {
      if (g) std::memcpy(reinterpret_cast<void*>(uintptr_t(g)), st.view.data() + off, size_t(es));
    });
  };
  s.threads[&self()].bulk_open.push_back(async_start(op));
}

// in.a: 0 commit_group, 1 wait_group, 2 wait_group.read
inline void exec_bulk_group(const Insn& in, Ctx& c) {
  ThreadState& t = thread_state();
  if (in.a == 0) {
    t.bulk_groups.push_back(std::move(t.bulk_open));
    t.bulk_open.clear();
    return;
  }
  const size_t keep = size_t(ptx::u32(c, in.args[0]));
  while (t.bulk_groups.size() > keep) {
    for (auto& op : t.bulk_groups.front()) async_finish(op);
    t.bulk_groups.pop_front();
  }
}

// ---------------------------------------------------------------------------------------------
// wgmma.

struct WgmmaOp {
  int seq = 0, n = 0;
  bool f16 = false, a_regs = false;
  uint32_t tnsp_a = 0, tnsp_b = 0, scale_d = 0;
  uint64_t da = 0, db = 0;
  int arrived = 0;
  bool done = false;
  std::vector<float*> acc;       // [lane * n/2 + i]: the accumulator registers' addresses
  std::vector<uint32_t> in;      // their values at issue
  std::vector<int> chain;        // per lane: the wgmma whose result is the input, or -1
  std::vector<uint32_t> a;       // [lane * 4 + r]: register A fragments
  std::vector<uint32_t> result;  // [lane * n/2 + i]
  std::vector<uint16_t> operands;  // its shared-memory operands when issued (A if from smem, B)
  std::shared_ptr<AsyncOp> async;
  Block* blk = nullptr;
  uint64_t epoch = 0;
  int wg = 0;
  std::string where;
};

// Shared address of element (mn, k) of a wgmma operand described by `desc` (128-byte swizzle).
inline uint64_t desc_addr(uint64_t desc, bool mn_major, int mn, int k) {
  const uint64_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4,
                 sbo = ((desc >> 32) & 0x3FFF) << 4;
  uint64_t a;
  if (!mn_major) {  // ((8,m),(T,2k)) : ((8T,SBO),(1,T)), T = 8 elements
    a = start + uint64_t(mn % 8) * 128 + uint64_t(mn / 8) * sbo + uint64_t(k) * 2;
  } else {  // ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
    a = start + uint64_t(mn % 64) * 2 + uint64_t(mn / 64) * lbo + uint64_t(k % 8) * 128 +
        uint64_t(k / 8) * sbo;
  }
  return a ^ (((a >> 7) & 7) << 4);
}

inline std::string check_desc(uint64_t desc) {
  if ((desc >> 62) != 1) return "only the 128-byte swizzle (layout type 1) is emulated";
  if (((desc >> 49) & 7) != 0) return "a non-zero matrix base offset is not emulated";
  return "";
}

inline void wgmma_complete(WgmmaOp& op);

// The 16-bit shared-memory operands of a wgmma (A if from shared memory, then B), in element
// order; "" or the error.
inline std::string wgmma_operands(const WgmmaOp& op, const std::vector<unsigned char>& view,
                                  std::vector<uint16_t>& out) {
  out.clear();
  auto get = [&](uint64_t addr) {
    if (addr + 2 > view.size()) return false;
    uint16_t v;
    std::memcpy(&v, view.data() + addr, 2);
    out.push_back(v);
    return true;
  };
  bool ok = true;
  if (!op.a_regs)
    for (int m = 0; m < 64 && ok; ++m)
      for (int k = 0; k < 16 && ok; ++k) ok = get(desc_addr(op.da, op.tnsp_a != 0, m, k));
  for (int k = 0; k < 16 && ok; ++k)
    for (int j = 0; j < op.n && ok; ++j) ok = get(desc_addr(op.db, op.tnsp_b != 0, j, k));
  return ok ? "" : "a wgmma operand lies outside the dynamic shared memory";
}

// Completes the warpgroup's wgmmas up to and including `seq`, in order.
inline void wgmma_finish_upto(Block* b, uint64_t epoch, int wg, int seq) {
  if (!alive(b, epoch)) throw Error("cuda emulator: a wgmma completed after its block exited");
  WarpgroupState& w = state_of(*b).wg[size_t(wg)];
  for (int k = 0; k <= seq; ++k) {
    WgmmaOp& op = *w.ops[size_t(k)];
    if (!op.done) async_finish(op.async);
  }
}

inline void wgmma_complete(WgmmaOp& op) {
  if (op.done) return;
  if (op.seq > 0) wgmma_finish_upto(op.blk, op.epoch, op.wg, op.seq - 1);
  op.done = true;
  BlockState& s = state_of(*op.blk);
  WarpgroupState& w = s.wg[size_t(op.wg)];
  const int n = op.n, nh = n / 2;
  auto cvt = [&](uint16_t v) { return op.f16 ? half_bits_to_float(v) : bf16_bits_to_float(v); };
  auto smem16 = [&](uint64_t addr) -> float {
    if (addr + 2 > s.view.size())
      throw Error("cuda emulator: " + op.where + ": wgmma operand at shared address " +
                  std::to_string(addr) + " is outside the dynamic shared memory");
    uint16_t v;
    std::memcpy(&v, s.view.data() + addr, 2);
    return cvt(v);
  };
  // The operands must not have changed since the wgmma was issued (the hardware reads them at
  // some point in between): a change means a TMA load landed after the issue (no wait for its
  // mbarrier) or the buffer was refilled before the wgmma completed (released too early).
  std::vector<uint16_t> now;
  const std::string e = wgmma_operands(op, s.view, now);
  if (!e.empty()) throw Error("cuda emulator: " + op.where + ": " + e);
  if (now != op.operands)
    throw Error("cuda emulator: " + op.where + ": a shared-memory operand of a wgmma changed "
                "between its issue and its completion (its data landed late, or its buffer was "
                "refilled while the wgmma was in flight)");
  float A[64][16];
  std::vector<float> B(size_t(16) * n);
  if (op.a_regs) {
    for (int lane = 0; lane < kWarpgroup; ++lane) {
      const int w4 = lane / 32, l = lane % 32, g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const uint32_t v = op.a[size_t(lane) * 4 + r];
        const int row = 16 * w4 + g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = cvt(uint16_t(v & 0xFFFF));
        A[row][col + 1] = cvt(uint16_t(v >> 16));
      }
    }
  } else {
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = smem16(desc_addr(op.da, op.tnsp_a != 0, m, k));
  }
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < n; ++j)
      B[size_t(k) * n + j] = smem16(desc_addr(op.db, op.tnsp_b != 0, j, k));
  for (int lane = 0; lane < kWarpgroup; ++lane) {
    const int w4 = lane / 32, l = lane % 32, g = l / 4, t = l % 4;
    const int ch = op.chain[size_t(lane)];
    for (int i = 0; i < nh; ++i) {
      const size_t idx = size_t(lane) * nh + i;
      const uint32_t input = ch >= 0 ? w.ops[size_t(ch)]->result[idx] : op.in[idx];
      uint32_t now;
      std::memcpy(&now, op.acc[idx], 4);
      if (now != input)
        throw Error("cuda emulator: " + op.where + ": thread " + std::to_string(lane) +
                    " of the warpgroup wrote accumulator register " + std::to_string(i) +
                    " while its wgmma was in flight (read or write it only after "
                    "wgmma.wait_group)");
      const int row = 16 * w4 + g + 8 * ((i % 4) >> 1), col = 8 * (i / 4) + 2 * t + (i & 1);
      double acc = op.scale_d ? double(u2f(input)) : 0.0;
      for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[size_t(k) * n + col]);
      op.result[idx] = f2u(float(acc));
      std::memcpy(op.acc[idx], &op.result[idx], 4);
    }
  }
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16}: args[0] D vector, args[1]
// A (vector of 4 or descriptor), args[2] B descriptor, args[3] scale-d, args[4..] immediates.
// in.a = N, in.b = f16, in.c = A from registers.
inline void exec_wgmma(const Insn& in, Ctx& c) {
  Fiber& f = self();
  BlockState& s = state();
  if (f.blk->n % kWarpgroup != 0) bad(c, in, "the block is not whole warpgroups");
  ThreadState& t = s.threads[&f];
  if (t.need_fence)
    bad(c, in, "no wgmma.fence since this thread's start or its last wgmma.wait_group");
  const int n = in.a, nh = n / 2, lane = f.linear % kWarpgroup;
  const bool a_regs = in.c != 0;
  const uint64_t db = ptx::u64(c, in.args[2]);
  const uint64_t da = a_regs ? 0 : ptx::u64(c, in.args[1]);
  const Arg& sd = in.args[3];
  const uint32_t scale_d =
      sd.kind == Arg::kImm ? uint32_t(sd.imm != 0) : uint32_t(c.reg[sd.reg] != 0);
  for (int k = 4; k < int(in.args.size()); ++k) {
    const uint32_t v = ptx::u32(c, in.args[size_t(k)]);
    const bool scale = k < 6;
    if (scale ? v != 1 : v > 1)
      bad(c, in, scale ? "only imm-scale-a/b = 1 is emulated" : "imm-trans must be 0 or 1");
  }
  const uint32_t tnsp_b = ptx::u32(c, in.args.back());
  const uint32_t tnsp_a = a_regs ? 0 : ptx::u32(c, in.args[in.args.size() - 2]);
  for (uint64_t d : {da, db}) {
    if (d == 0 && a_regs) continue;
    const std::string e = check_desc(d);
    if (!e.empty()) bad(c, in, e);
  }
  WarpgroupState& w = s.wg[size_t(f.linear / kWarpgroup)];
  const int seq = t.wgmma_seq++;
  if (int(w.ops.size()) <= seq) {
    auto op = std::make_shared<WgmmaOp>();
    op->seq = seq;
    op->n = n;
    op->f16 = in.b != 0;
    op->a_regs = a_regs;
    op->tnsp_a = tnsp_a;
    op->tnsp_b = tnsp_b;
    op->scale_d = scale_d;
    op->da = da;
    op->db = db;
    op->acc.assign(size_t(kWarpgroup) * nh, nullptr);
    op->in.assign(size_t(kWarpgroup) * nh, 0);
    op->chain.assign(kWarpgroup, -1);
    op->a.assign(size_t(kWarpgroup) * 4, 0);
    op->result.assign(size_t(kWarpgroup) * nh, 0);
    op->blk = s.blk;
    op->epoch = s.epoch;
    op->wg = f.linear / kWarpgroup;
    op->where = c.prog->where;
    w.ops.push_back(op);
  }
  WgmmaOp& op = *w.ops[size_t(seq)];
  if (op.n != n || op.f16 != (in.b != 0) || op.a_regs != a_regs || op.tnsp_a != tnsp_a ||
      op.tnsp_b != tnsp_b || op.scale_d != scale_d || op.da != da || op.db != db)
    bad(c, in, "the threads of a warpgroup issue different wgmmas (shape, type, descriptors, "
               "scale-d or transposes differ) as their wgmma number " + std::to_string(seq));
  const Arg& D = in.args[0];
  for (int i = 0; i < nh; ++i) {
    const int r = in.vregs[size_t(D.vbegin + i)];
    if (r >= c.prog->nops) bad(c, in, "accumulators must be asm operands");
    op.acc[size_t(lane) * nh + i] = static_cast<float*>(c.ops[r].p);
    op.in[size_t(lane) * nh + i] = uint32_t(c.reg[r]);
  }
  const void* key = op.acc[size_t(lane) * nh];
  auto last = t.acc_last.find(key);
  if (last != t.acc_last.end() && !w.ops[size_t(last->second)]->done) {
    const WgmmaOp& prev = *w.ops[size_t(last->second)];
    if (prev.n != n ||
        !std::equal(op.acc.begin() + lane * nh, op.acc.begin() + (lane + 1) * nh,
                    prev.acc.begin() + lane * nh))
      bad(c, in, "accumulates into registers that only partly overlap a wgmma in flight");
    op.chain[size_t(lane)] = last->second;
  }
  t.acc_last[key] = seq;
  if (a_regs) {
    const Arg& A = in.args[1];
    for (int r = 0; r < 4; ++r)
      op.a[size_t(lane) * 4 + r] = uint32_t(c.reg[in.vregs[size_t(A.vbegin + r)]]);
  }
  t.open.push_back(seq);
  if (++op.arrived == kWarpgroup) {
    const std::string e = wgmma_operands(op, s.view, op.operands);
    if (!e.empty()) bad(c, in, e);
    auto a = std::make_shared<AsyncOp>();
    WgmmaOp* raw = &op;
    a->fn = [raw]() { wgmma_complete(*raw); };
    op.async = async_start(a);
  }
}

// in.a: 0 fence, 1 commit_group, 2 wait_group
inline void exec_wgmma_sync(const Insn& in, Ctx& c) {
  Fiber& f = self();
  BlockState& s = state();
  ThreadState& t = s.threads[&f];
  if (in.a == 0) {
    t.need_fence = false;
    return;
  }
  if (in.a == 1) {
    t.groups.push_back(std::move(t.open));
    t.open.clear();
    return;
  }
  const size_t keep = size_t(ptx::u32(c, in.args[0]));
  const int wg = f.linear / kWarpgroup;
  while (t.groups.size() > keep) {
    for (int seq : t.groups.front()) {
      while (state().wg[size_t(wg)].ops[size_t(seq)]->arrived < kWarpgroup) poll_yield();
      wgmma_finish_upto(s.blk, s.epoch, wg, seq);
    }
    t.groups.pop_front();
  }
  t.need_fence = true;
}

// ---------------------------------------------------------------------------------------------
// The decoder (called first by fastlm_emu_ptx.h's Decoder::decode; false: not an sm_90 opcode).

template <typename Dec, typename ModsT>
inline bool decode(Dec& d, const std::string& base, ModsT& m,
                        const std::vector<std::string>& args, Insn& in) {
  const auto& t = m.t;
  auto tok = [&](size_t i) { return i < t.size() ? t[i] : std::string(); };
  std::string& err = d.err;
  if (base == "setp" && !t.empty() &&
      (t.back() == "b32" || t.back() == "u32" || t.back() == "s32")) {
    in.a = m.need_one({"eq", "ne", "lt", "le", "gt", "ge"}, "an integer comparison");
    in.b = m.take("s32");
    if (!in.b && !m.take("u32")) m.need("b32");
    if (in.b == 0 && t.back() == "b32" && in.a >= 2)
      err = "an ordered comparison needs .u32 or .s32";
    m.end();
    if (!err.empty() || !d.nargs(args, 3, 3)) return true;
    in.args.resize(3);
    d.reg(args[0], in.args[0], "", Ty::kPred);
    if (err.empty()) d.value(args[1], in.args[1], "r", Ty::kB32);
    if (err.empty()) d.value(args[2], in.args[2], "r", Ty::kB32);
    in.exec = exec_setp_int;
    return true;
  }
  if (base == "ld" && tok(0) == "acquire") {
    m.take("acquire");
    m.need("gpu");
    m.need("global");
    m.need_one({"s32", "u32", "b32"}, "a 32-bit type");
    m.end();
    if (!err.empty() || !d.nargs(args, 2, 2)) return true;
    in.args.resize(2);
    d.reg(args[0], in.args[0], "r", Ty::kB32);
    if (err.empty()) d.address(args[1], in.args[1], "l");
    in.exec = exec_ld_acquire;
    return true;
  }
  if (base == "red" && tok(0) == "release") {
    m.take("release");
    m.need("gpu");
    m.need("global");
    m.need("add");
    m.need_one({"s32", "u32"}, ".s32 or .u32");
    m.end();
    if (!err.empty() || !d.nargs(args, 2, 2)) return true;
    in.args.resize(2);
    d.address(args[0], in.args[0], "l");
    if (err.empty()) d.value(args[1], in.args[1], "r", Ty::kB32);
    in.exec = exec_red_add;
    return true;
  }
  if (base == "mbarrier") {
    if (m.take("init")) {
      in.a = 0;
    } else if (m.take("arrive")) {
      in.a = m.take("expect_tx") ? 2 : 1;
    } else if (m.take("try_wait")) {
      in.a = 3;
      m.need("parity");
    } else if (m.take("test_wait")) {
      in.a = 4;
      m.need("parity");
    } else {
      err = "mbarrier form not emulated (init, arrive, arrive.expect_tx, try_wait.parity)";
      return true;
    }
    if (!m.take("shared::cta")) m.need("shared");
    m.need("b64");
    m.end();
    if (!err.empty()) return true;
    if (in.a == 0) {
      if (!d.nargs(args, 2, 2)) return true;
      in.args.resize(2);
      d.address(args[0], in.args[0], "r");
      if (err.empty()) d.value(args[1], in.args[1], "r", Ty::kB32);
    } else if (in.a <= 2) {
      if (!d.nargs(args, in.a == 2 ? 3 : 2, in.a == 2 ? 3 : 2)) return true;
      in.args.resize(args.size());
      d.reg(args[0], in.args[0], "l", Ty::kB64);
      if (err.empty()) d.address(args[1], in.args[1], "r");
      if (err.empty() && in.a == 2) d.value(args[2], in.args[2], "r", Ty::kB32);
    } else {
      if (!d.nargs(args, 3, 3)) return true;
      in.args.resize(3);
      d.reg(args[0], in.args[0], "", Ty::kPred);
      if (err.empty()) d.address(args[1], in.args[1], "r");
      if (err.empty()) d.value(args[2], in.args[2], "r", Ty::kB32);
    }
    in.exec = exec_mbarrier;
    return true;
  }
  if (base == "fence") {
    if (m.take("proxy")) {
      m.need("async");
      m.one_of({"shared::cta", "shared::cluster", "global"});
      in.a = 0;
    } else if (m.take("mbarrier_init")) {
      m.need("release");
      m.need("cluster");
      in.a = 1;
    } else {
      return false;
    }
    m.end();
    if (err.empty() && d.nargs(args, 0, 0)) in.exec = exec_fence;
    return true;
  }
  if (base == "bar") {
    in.a = m.need_one({"sync", "arrive"}, ".sync or .arrive");
    m.end();
    if (!err.empty() || !d.nargs(args, in.a == 0 ? 1 : 2, 2)) return true;
    in.args.resize(args.size());
    d.value(args[0], in.args[0], "rn", Ty::kB32);
    if (err.empty() && args.size() > 1) d.value(args[1], in.args[1], "rn", Ty::kB32);
    in.exec = exec_bar;
    return true;
  }
  if (base == "setmaxnreg") {
    in.a = m.need_one({"dec", "inc"}, ".inc or .dec");
    m.need("sync");
    m.need("aligned");
    m.need("u32");
    m.end();
    if (!err.empty() || !d.nargs(args, 1, 1)) return true;
    Arg a;
    d.value(args[0], a, "n", Ty::kImm);
    if (!err.empty()) return true;
    if (a.kind != Arg::kImm && d.p.wants.size() > size_t(a.reg) &&
        d.p.wants[size_t(a.reg)] != "n") {
      err = "the register count must be an immediate";
      return true;
    }
    in.args.push_back(a);
    in.exec = [](const Insn& i, Ctx& c) {
      Insn j = i;
      j.b = int(ptx::u32(c, i.args[0]));
      if (j.b < 24 || j.b > 256 || j.b % 8 != 0)
        bad(c, i, "register count " + std::to_string(j.b) + " is not a multiple of 8 in [24, 256]");
      exec_setmaxnreg(j, c);
    };
    return true;
  }
  if (base == "elect") {
    m.need("sync");
    m.end();
    if (!err.empty() || !d.nargs(args, 2, 2)) return true;
    const size_t bar = args[0].find('|');
    if (bar == std::string::npos) {
      err = "expected d|p as the destination";
      return true;
    }
    in.args.resize(3);
    const std::string dst = ptx::detail::trim(args[0].substr(0, bar));
    if (dst == "_") in.args[0].kind = Arg::kSink;
    else d.reg(dst, in.args[0], "r", Ty::kB32);
    if (err.empty()) d.reg(ptx::detail::trim(args[0].substr(bar + 1)), in.args[1], "", Ty::kPred);
    if (err.empty()) d.value(args[1], in.args[2], "rn", Ty::kB32);
    in.exec = exec_elect;
    return true;
  }
  if (base == "cp" && tok(0) == "async" && tok(1) == "bulk") {
    m.take("async");
    m.take("bulk");
    if (m.take("commit_group")) {
      in.a = 0;
      m.end();
      if (err.empty() && d.nargs(args, 0, 0)) in.exec = exec_bulk_group;
      return true;
    }
    if (m.take("wait_group")) {
      in.a = m.take("read") ? 2 : 1;
      m.end();
      if (!err.empty() || !d.nargs(args, 1, 1)) return true;
      in.args.resize(1);
      d.value(args[0], in.args[0], "n", Ty::kImm);
      in.exec = exec_bulk_group;
      return true;
    }
    m.need("tensor");
    const int dim = m.need_one({"1d", "2d", "3d", "4d", "5d"}, "a dimension .1d-.5d");
    in.a = dim + 1;
    const bool load = m.take("shared::cluster");
    if (load) {
      m.need("global");
      m.take("tile");
      m.need("mbarrier::complete_tx::bytes");
    } else {
      m.need("global");
      m.need("shared::cta");
      m.take("tile");
      m.need("bulk_group");
    }
    m.end();
    if (!err.empty() || !d.nargs(args, load ? 3 : 2, load ? 3 : 2)) return true;
    // [map, {c0, ...}]
    const std::string& ms = args[load ? 1 : 0];
    if (ms.size() < 2 || ms.front() != '[' || ms.back() != ']') {
      err = "expected [tensor map, {coordinates}]";
      return true;
    }
    const auto parts = ptx::detail::split_args(ms.substr(1, ms.size() - 2));
    if (parts.size() != 2) {
      err = "expected [tensor map, {coordinates}]";
      return true;
    }
    in.args.resize(4);
    d.address(args[load ? 0 : 1], in.args[0], "r");
    if (err.empty()) d.vec(parts[1], in.args[1], in, in.a, "r", Ty::kB32);
    if (err.empty()) d.reg(parts[0], in.args[2], "l", Ty::kB64);
    if (err.empty() && load) d.address(args[2], in.args[3], "r");
    if (!load) in.args.resize(3);
    in.exec = load ? exec_tma_load : exec_tma_store;
    return true;
  }
  if (base == "wgmma") {
    if (m.take("fence")) {
      in.a = 0;
    } else if (m.take("commit_group")) {
      in.a = 1;
    } else if (m.take("wait_group")) {
      in.a = 2;
    } else if (m.take("mma_async")) {
      in.a = -1;
    } else {
      err = "wgmma form not emulated";
      return true;
    }
    m.need("sync");
    m.need("aligned");
    if (in.a >= 0) {
      m.end();
      if (!err.empty() || !d.nargs(args, in.a == 2 ? 1 : 0, in.a == 2 ? 1 : 0)) return true;
      if (in.a == 2) {
        in.args.resize(1);
        d.value(args[0], in.args[0], "n", Ty::kImm);
      }
      in.exec = exec_wgmma_sync;
      return true;
    }
    const std::string shape = tok(m.i);
    int n = 0;
    if (shape.size() > 7 && shape.compare(0, 4, "m64n") == 0 &&
        shape.compare(shape.size() - 3, 3, "k16") == 0)
      n = std::atoi(shape.c_str() + 4);
    if (n < 8 || n > 256 || n % 8 != 0 || shape != "m64n" + std::to_string(n) + "k16") {
      err = "shape ." + shape + " not emulated (m64nNk16, N a multiple of 8 up to 256)";
      return true;
    }
    ++m.i;
    m.need("f32");
    const int at = m.need_one({"bf16", "f16"}, ".bf16 or .f16");
    const int bt = m.need_one({"bf16", "f16"}, ".bf16 or .f16");
    m.end();
    if (err.empty() && at != bt) err = "A and B types differ";
    if (!err.empty()) return true;
    in.a = n;
    in.b = at;
    const bool regs_a = args.size() >= 2 && !args[1].empty() && args[1][0] == '{';
    in.c = regs_a;
    // D, A, B, scale-d, imm-scale-a, imm-scale-b, [imm-trans-a,] imm-trans-b
    if (!d.nargs(args, regs_a ? 7 : 8, regs_a ? 7 : 8)) return true;
    in.args.resize(args.size());
    d.vec(args[0], in.args[0], in, n / 2, "f", Ty::kF32);
    if (err.empty()) {
      if (regs_a) d.vec(args[1], in.args[1], in, 4, "r", Ty::kB32);
      else d.reg(args[1], in.args[1], "l", Ty::kB64);
    }
    if (err.empty()) d.reg(args[2], in.args[2], "l", Ty::kB64);
    if (err.empty()) {
      if (!args[3].empty() && (std::isdigit(static_cast<unsigned char>(args[3][0])) != 0))
        d.value(args[3], in.args[3], "n", Ty::kImm);
      else
        d.reg(args[3], in.args[3], "", Ty::kPred);
    }
    for (size_t k = 4; k < args.size() && err.empty(); ++k)
      d.value(args[k], in.args[k], "n", Ty::kImm);
    in.exec = exec_wgmma;
    return true;
  }
  return false;
}

}  // namespace sm90

namespace ptx {
template <typename Dec, typename ModsT>
bool decode_sm90(Dec& d, const std::string& base, ModsT& m, const std::vector<std::string>& args,
                 Insn& in) {
  return sm90::decode(d, base, m, args, in);
}
}  // namespace ptx
}  // namespace emu

// torch.ops.fastlm_emu.emu_set_device_arch(arch): the compute capability the emulated device
// reports (80 by default; 90 runs the Hopper kernels where attention_sm90.cu's table admits
// the problem), and emu_last_kernel(). Registered once, in the translation unit that defines
// the fiber switch.
#if defined(FASTLM_EMU_DEFINE_SWITCH)
#include <torch/library.h>
TORCH_LIBRARY_FRAGMENT(fastlm_emu, m) {
  m.def("emu_set_device_arch(int arch) -> ()", [](int64_t arch) {
    TORCH_CHECK(arch >= 70 && arch < 200, "emu_set_device_arch: arch must be e.g. 80 or 90");
    ::emu::sm90::device_arch() = int(arch);
  });
  // The name of the kernel the last launch ran (which kernel a dispatch table chose).
  m.def("emu_last_kernel() -> str",
        []() { return std::string(::emu::rt().kernel ? ::emu::rt().kernel : ""); });
}
#endif
