// The Hopper attention kernels' building blocks (attention_sm90.cu): tile configurations with
// their budget checks, the shared-memory layout, pipeline states, named-barrier ids and the tile
// scheduler. The PTX they rest on is in sm90_ptx.h.
//
// Execution model of the forward (FlashAttention-3's): 3 warpgroups of 128 threads.
//   warpgroup 0  producer: setmaxnreg.dec to kProducerRegs; one elected thread of warp 0 issues
//                the TMA loads of Q, K and V into the shared-memory rings (the other 127 threads
//                have nothing to do and exit).
//   warpgroups 1, 2  consumers: setmaxnreg.inc to kConsumerRegs; consumer c owns query rows
//                64c .. 64c + 63 of the 128-row tile. Per key block: S = Q K^T (wgmma, both from
//                shared memory), online softmax in registers, O += P V (wgmma, P from registers).
//                The next block's Q K^T is issued before the current softmax (intra-warpgroup
//                overlap), and the two consumers take turns issuing their wgmmas (ping-pong on
//                named barriers), so one's softmax runs under the other's matmuls.
//   epilogue     each consumer writes its O rows (16-bit) into shared memory, fences, and one
//                thread stores them with a TMA store; lse goes straight to global memory.
//
// Pipelines (all mbarriers; "full" barriers count the producer's one arrive_expect_tx plus the
// TMA bytes, "empty" barriers count the consumer threads):
//   barrier      producer (waits / signals)             consumer (waits / signals)       count
//   q_full       arrive_expect_tx + TMA Q (complete_tx) wait                             1 + tx
//   q_empty      wait (before loading the next Q)       arrive after its last Q K^T      256
//   k_full[s]    arrive_expect_tx + TMA K               wait before Q K^T                1 + tx
//   k_empty[s]   wait before reloading stage s          arrive after Q K^T completed     256
//   v_full[s]    arrive_expect_tx + TMA V               wait before P V                  1 + tx
//   v_empty[s]   wait before reloading stage s          arrive after P V completed       256
// Fences: the TMA writes and the wgmma reads are both in the async proxy, and the mbarrier
// waits order them; the O tile is written by ordinary stores and read by the TMA store, so each
// writer runs fence.proxy.async before the named barrier that precedes the store. The stored
// tile's buffer is rewritten only after the storing thread's cp.async.bulk.wait_group.read.
// Phases: a consumer waits for "full" with its phase bit starting at 0; the producer waits for
// "empty" with its phase bit starting at 1, which a fresh barrier satisfies at once (its
// "previous" phase counts as complete), so the first kStages loads do not wait.
//
// The backward (one block per 128 keys; see BwdConfig) uses the same roles: the producer loads
// K and V once (kv_full) and the (Q, dO) tiles into a ring; each consumer computes, per tile,
// S^T, dP^T (wgmma from shared memory), P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q
// (A from registers), writes its dS^T rows to shared memory for dQ = dS K (both operands from
// shared memory, so fence.proxy.async before the kBarDsReady barrier), and adds its dQ columns to
// the float32 accumulator in key-block order (a semaphore per (batch, query head, query tile)).
//   barrier        producer                                   consumer                       count
//   kv_full        arrive_expect_tx + TMA K, V                wait once                      1 + tx
//   qdo_full[s]    arrive_expect_tx + TMA Q, dO               wait                           1 + tx
//   qdo_empty[s]   wait before reloading stage s              arrive after the tile's wgmmas 256
#pragma once

#include <cstddef>
#include <cstdint>

#include "sm90_ptx.h"

namespace fastlm {
namespace cuda {
namespace sm90 {

constexpr int kWarpgroup = 128;  // threads per warpgroup
constexpr int kRegFile = 65536;  // 32-bit registers per SM

// Tile configuration of the forward per padded head dim D (64 or 128) and element type T.
template <typename T, int D>
struct FwdConfig {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = 128;  // query rows per tile: 64 per consumer warpgroup
  static constexpr int kBlockN = 128;  // keys per K/V stage (the wgmma N of Q K^T)
  static constexpr int kStages = D <= 64 ? 4 : 2;
  static constexpr int kConsumers = 2;  // consumer warpgroups
  static constexpr int kThreads = kWarpgroup * (kConsumers + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Shared-memory tiles hold 64-column slabs of 128-byte rows (the TMA box and the 128-byte
  // swizzle atom): a tile of R rows and D columns is D / 64 slabs of R * 128 bytes.
  static constexpr int kSlab = 64;
  static constexpr int kSlabs = D / kSlab;
  static constexpr int kRowsPerConsumer = kBlockM / kConsumers;  // = 64, the wgmma M
  static constexpr uint32_t kQBytes = kBlockM * D * sizeof(T);
  static constexpr uint32_t kKVBytes = kBlockN * D * sizeof(T);

  static_assert(sizeof(T) == 2, "the wgmma paths here are for 16-bit inputs");
  static_assert(D % kSlab == 0 && D <= 128, "head dims 64 and 128");
  static_assert(kRowsPerConsumer == 64, "one wgmma M (64 rows) per consumer warpgroup");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N of Q K^T");
  // The launch gives each of kThreads threads floor(65536 / kThreads / 8) * 8 registers; after
  // setmaxnreg the warpgroups must fit in what the block holds, or the kernel hangs.
  static constexpr int kLaunchRegs = (kRegFile / kThreads) / 8 * 8;
  static_assert(kProducerRegs * kWarpgroup + kConsumerRegs * kWarpgroup * kConsumers <=
                    kLaunchRegs * kThreads,
                "setmaxnreg counts exceed the block's register file");
  static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0 && kProducerRegs >= 24 &&
                    kConsumerRegs <= 256,
                "setmaxnreg takes multiples of 8 in [24, 256]");
};

// Every buffer of the forward's shared memory. Each tile is 1024-byte aligned (the 128-byte
// swizzle repeats every 8 rows of 128 bytes, and the TMA and wgmma address it from there).
template <typename Cfg, typename T>
struct alignas(1024) FwdSharedStorage {
  static constexpr int D = Cfg::kHeadDim;
  alignas(1024) T q[Cfg::kBlockM * D];
  alignas(1024) T k[Cfg::kStages][Cfg::kBlockN * D];
  alignas(1024) T v[Cfg::kStages][Cfg::kBlockN * D];
  alignas(1024) T o[Cfg::kBlockM * D];  // the epilogue's staging tile for the TMA store
  struct Barriers {
    uint64_t q_full, q_empty;
    uint64_t k_full[Cfg::kStages], k_empty[Cfg::kStages];
    uint64_t v_full[Cfg::kStages], v_empty[Cfg::kStages];
  };
  alignas(8) Barriers bar;
};

// Shared memory the forward requests: the storage plus slack to align its start to 1024 bytes.
template <typename Cfg, typename T>
constexpr size_t fwd_smem_bytes() {
  return sizeof(FwdSharedStorage<Cfg, T>) + 1024;
}

// Shared memory per block on sm_90 (227 KB opt-in).
constexpr size_t kSmemPerBlock = 227 * 1024;

// The 1024-byte aligned storage inside the dynamic shared memory.
template <typename S>
__device__ __forceinline__ S& shared_storage(unsigned char* smem) {
  const uint32_t a = smem_u32(smem);
  return *reinterpret_cast<S*>(smem + (((a + 1023u) & ~1023u) - a));
}

// Stage index and phase bit of one side of a ring of kStages barrier pairs.
template <int kStages>
struct PipeState {
  int index = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++index == kStages) {
      index = 0;
      phase ^= 1u;
    }
  }
};
// A producer's state: it waits for "empty" barriers starting at phase 1 (see the table above).
template <int kStages>
__device__ __forceinline__ PipeState<kStages> producer_start() {
  PipeState<kStages> s;
  s.phase = 1;
  return s;
}

// Tile configuration of the backward: one block per 128 keys of one (batch, key head); consumer
// c owns keys 64c .. 64c + 63 (the wgmma M of the transposed products S^T = K Q^T and
// dP^T = V dO^T), and the (Q, dO) tiles of 64 queries of every query head of the GQA group
// stream through a kStages ring. dQ of a query tile is computed in the same pass (consumer c
// takes columns c D / 2 .. (c + 1) D / 2) and added to a float32 accumulator in a fixed order.
template <typename T, int D>
struct BwdConfig {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockN = 128;  // keys per block: 64 per consumer warpgroup
  static constexpr int kBlockM = 64;   // queries per (Q, dO) tile: the wgmma N of S^T and dP^T
  static constexpr int kStages = 2;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = kWarpgroup * (kConsumers + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kSlabs = D / 64;
  static constexpr uint32_t kKVBytes = kBlockN * D * sizeof(T);
  static constexpr uint32_t kQBytes = kBlockM * D * sizeof(T);
  static constexpr int kLaunchRegs = (kRegFile / kThreads) / 8 * 8;
  static_assert(sizeof(T) == 2 && D % 64 == 0 && D <= 128, "16-bit inputs, head dims 64, 128");
  static_assert(kBlockN / kConsumers == 64, "one wgmma M (64 keys) per consumer warpgroup");
  static_assert(kBlockM * sizeof(T) == 128, "the dS^T tile is one 128-byte-swizzled slab");
  static_assert(kProducerRegs * kWarpgroup + kConsumerRegs * kWarpgroup * kConsumers <=
                    kLaunchRegs * kThreads,
                "setmaxnreg counts exceed the block's register file");
};

template <typename Cfg, typename T>
struct alignas(1024) BwdSharedStorage {
  static constexpr int D = Cfg::kHeadDim;
  alignas(1024) T k[Cfg::kBlockN * D];
  alignas(1024) T v[Cfg::kBlockN * D];
  alignas(1024) T q[Cfg::kStages][Cfg::kBlockM * D];
  alignas(1024) T dout[Cfg::kStages][Cfg::kBlockM * D];
  alignas(1024) T ds[Cfg::kBlockN * Cfg::kBlockM];  // dS^T (keys x queries), the A of dQ = dS K
  struct Barriers {
    uint64_t kv_full;
    uint64_t qdo_full[Cfg::kStages], qdo_empty[Cfg::kStages];
  };
  alignas(8) Barriers bar;
};

template <typename Cfg, typename T>
constexpr size_t bwd_smem_bytes() {
  return sizeof(BwdSharedStorage<Cfg, T>) + 1024;
}

// Named barrier ids (hardware has 16; 0 is __syncthreads). Each id has one purpose, so no two
// groups of threads can ever collide on one.
enum NamedBarrier : int {
  kBarTurnFirst = 1,      // + c: forward, consumer c's turn to issue wgmmas (kConsumers ids)
  kBarEpilogueFirst = 3,  // + c: forward, consumer c's epilogue (kConsumers ids)
  kBarDsReady = 5,        // backward: both consumers wrote their dS^T rows (256 threads)
  kBarDsFree = 6,         // backward: both consumers' dQ wgmmas read dS^T (256 threads)
  kBarDqFirst = 7         // + c: backward, consumer c's ordered dQ accumulation (128 threads)
};
static_assert(kBarDqFirst + 2 <= 16, "named barrier ids");

// Persistent static tile scheduler: block b runs tiles b, b + grid, b + 2 grid, ... of a fixed
// order. Causal: longest first (the last query blocks see the most keys, so they start first
// and the short ones fill in at the end). Otherwise one head's query blocks are consecutive, so
// its K and V stay in L2 while the blocks running at the same time read them.
struct TileScheduler {
  int num_m;   // query blocks per (batch, head)
  int num_bh;  // batch * query heads
  bool causal;
  struct Tile {
    int m_block, bh;
  };
  __host__ __device__ int count() const { return num_m * num_bh; }
  __device__ __forceinline__ Tile at(int t) const {
    if (causal) return Tile{num_m - 1 - t / num_bh, t % num_bh};
    return Tile{t % num_m, t / num_m};
  }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace fastlm
