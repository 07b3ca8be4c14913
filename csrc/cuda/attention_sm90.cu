// Fused attention for Hopper (sm_90a): the FlashAttention-3 execution model, written with the
// PTX wrappers of sm90_ptx.h and the building blocks of sm90_config.cuh (read its header first:
// warpgroup roles, the pipeline table, fences and phases). docs/attention.md is the contract
// (math, dropout bits, empty rows); the portable kernels of attention.cu compute the same.
//
// Forward, per 128-row query tile (one persistent block runs many tiles, TileScheduler):
//   producer   TMA: Q (128 x D) once, then K and V blocks of 128 keys into kStages-deep rings;
//              key blocks run from the last to the first (the masked ones come first).
//   consumer c rows 64c .. 64c + 63. For key block n (s = scores, P = probabilities, 16-bit):
//                S_n = Q K_n^T                       wgmma m64n128k16, A and B from smem
//                m = max(m, rowmax S_n); P_n = exp2(S_n * scale * log2 e - m); l = l a + rowsum P_n
//                O = O a + P_n V_n                   wgmma m64nDk16, A = P_n from registers
//              with S_{n-1} issued before the softmax of S_n ... in the loop below the order is:
//                issue S_n; issue O += P_{n+1} V_{n+1}; wait S_n; softmax S_n; wait PV; rescale O.
//   epilogue   O / l (times the dropout scale) -> 16-bit -> shared memory (128-byte swizzle)
//              -> TMA store; lse = m ln 2 + log l (natural log; +inf for empty rows).
// Dropout: P is multiplied by the keep bits of docs/attention.md after the row sum is taken.
//
// Shared-memory tiles are 64-column slabs of 128-byte rows with the 128-byte swizzle: the 16-byte
// chunk c of row r of a slab sits at chunk c ^ (r & 7). TMA writes (and reads) them so, and the
// wgmma descriptors (make_desc) describe them: K-major Q and K (8-row groups 1024 bytes apart),
// MN-major V for P V (64 columns per slab, slabs kBlockN * 128 bytes apart).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "../attention.h"
#include "attention_sm90.h"
#include "common.cuh"
#include "sm90_config.cuh"
#include "sm90_ptx.h"

namespace fastlm {
namespace cuda {
namespace sm90 {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything the forward kernel reads, built on the host; a __grid_constant__ parameter (the
// tensor maps must stay in parameter space for the TMA to read them).
struct FwdParams {
  CUtensorMap tm_q;  // (B, Hq, L, E): boxes of 64 columns x kBlockM rows
  CUtensorMap tm_k;  // (B, Hk, S, E): 64 x kBlockN
  CUtensorMap tm_v;  // (B, Hk, S, Ev): 64 x kBlockN
  CUtensorMap tm_o;  // (B, Hq, L, Ev): 64 x 64 (one consumer's rows)
  float* lse;        // (B, Hq, L) contiguous
  const int64_t* rng;  // (seed, offset) on the device; read only when thresh > 0
  int64_t rng_stride;
  uint32_t thresh;   // dropout threshold (docs/attention.md); 0 = no dropout
  float drop_scale;  // 1 / (1 - rate), 1 without dropout
  int Hq, Hk, L, S;
  float scale_log2;  // scale * log2(e): scores are kept as base-2 logits
  bool causal;
  TileScheduler sched;
};

// Keys a query tile sees: all, or with causal those up to its last row; in key blocks.
__device__ __forceinline__ int key_blocks(const FwdParams& p, int m0, int block_m, int block_n) {
  const int n_end = p.causal ? min(p.S, min(p.L, m0 + block_m)) : p.S;
  return (n_end + block_n - 1) / block_n;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// ------------------------------------------------------------------------------------------
// Producer: one thread issues every TMA load of the block's tiles.
template <typename Cfg, typename T>
__device__ void fwd_producer(const FwdParams& p, FwdSharedStorage<Cfg, T>& ss) {
  constexpr int kSlabs = Cfg::kSlabs;
  PipeState<Cfg::kStages> kv = producer_start<Cfg::kStages>();
  uint32_t q_phase = 1;  // producer side of q_empty
  const uint32_t q_full = smem_u32(&ss.bar.q_full), q_empty = smem_u32(&ss.bar.q_empty);
  for (int t = blockIdx.x; t < p.sched.count(); t += gridDim.x) {
    const TileScheduler::Tile tile = p.sched.at(t);
    const int b = tile.bh / p.Hq, h = tile.bh - b * p.Hq, hk = h / (p.Hq / p.Hk);
    const int m0 = tile.m_block * Cfg::kBlockM;
    const int nb = key_blocks(p, m0, Cfg::kBlockM, Cfg::kBlockN);
    if (nb == 0) continue;  // the consumers write the empty tile without loading anything
    mbar_wait(q_empty, q_phase);  // the previous tile's Q is no longer read
    q_phase ^= 1u;
    mbar_arrive_expect_tx(q_full, Cfg::kQBytes);
#pragma unroll
    for (int sl = 0; sl < kSlabs; ++sl)
      tma_load_4d(smem_u32(ss.q + sl * Cfg::kBlockM * 64), &p.tm_q, q_full, sl * 64, m0, h, b);
    for (int n = nb - 1; n >= 0; --n) {
      const uint32_t kf = smem_u32(&ss.bar.k_full[kv.index]);
      const uint32_t vf = smem_u32(&ss.bar.v_full[kv.index]);
      mbar_wait(smem_u32(&ss.bar.k_empty[kv.index]), kv.phase);
      mbar_arrive_expect_tx(kf, Cfg::kKVBytes);
#pragma unroll
      for (int sl = 0; sl < kSlabs; ++sl)
        tma_load_4d(smem_u32(ss.k[kv.index] + sl * Cfg::kBlockN * 64), &p.tm_k, kf, sl * 64,
                    n * Cfg::kBlockN, hk, b);
      mbar_wait(smem_u32(&ss.bar.v_empty[kv.index]), kv.phase);
      mbar_arrive_expect_tx(vf, Cfg::kKVBytes);
#pragma unroll
      for (int sl = 0; sl < kSlabs; ++sl)
        tma_load_4d(smem_u32(ss.v[kv.index] + sl * Cfg::kBlockN * 64), &p.tm_v, vf, sl * 64,
                    n * Cfg::kBlockN, hk, b);
      kv.advance();
    }
  }
}

// ------------------------------------------------------------------------------------------
// Consumer pieces.

// S (64 x kBlockN) = Q_c K^T: q = this consumer's 64 rows (slab 0), k = the K stage.
template <typename Cfg, typename T>
__device__ __forceinline__ void issue_qk(float (&s)[Cfg::kBlockN / 2], uint32_t q, uint32_t k) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
    const uint32_t col = (kk & 3) * 32;  // 16 columns = 32 bytes into the 128-byte row
    const uint64_t da = make_desc(q + (kk >> 2) * Cfg::kBlockM * 128 + col, 16, 1024);
    const uint64_t db = make_desc(k + (kk >> 2) * Cfg::kBlockN * 128 + col, 16, 1024);
    Wgmma<Cfg::kBlockN, T>::template ss<0, 0>(s, da, db, kk > 0 ? 1 : 0);
  }
}

// O (64 x D) += P V: P as kBlockN / 16 register A fragments, v = the V stage (MN-major B).
template <typename Cfg, typename T>
__device__ __forceinline__ void issue_pv(float (&o)[Cfg::kHeadDim / 2],
                                         const uint32_t (&pr)[Cfg::kBlockN / 16][4], uint32_t v) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
    const uint64_t db = make_desc(v + kk * 16 * 128, Cfg::kBlockN * 128, 1024);
    Wgmma<Cfg::kHeadDim, T>::template rs<1>(o, pr[kk], db, 1);
  }
}

// Dropout keep bits of a warp's 16 x (8 NT) slice of P (rows i0 + g, i0 + g + 8; keys n0 + 8nt
// + 2t (+1)): the quad's 2 NT Philox calls, NT / 2 per lane, shared with 4 shuffles.
template <int NT>
struct KeepBits {
  static constexpr int K = NT / 2;  // Philox calls per lane, 8 keep bits each
  static_assert(K <= 8, "one 64-bit word of keep bits per lane");
  uint64_t w[4];
  __device__ __forceinline__ void make(const FwdParams& p, uint64_t seed, uint64_t offset,
                                       uint32_t bh, int i0, int n0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint64_t mine = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pr = t * K + k, r = pr / NT, nt = pr % NT;
      mine |= uint64_t(dropout_keep8(seed, offset, bh, uint32_t(i0 + g + 8 * r),
                                     uint32_t((n0 >> 3) + nt), p.thresh))
              << (8 * k);
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) w[s] = __shfl_sync(0xffffffffu, mine, (lane & ~3) | s);
  }
  __device__ __forceinline__ bool keep(int nt, int e, int t) const {
    const int pr = (e >> 1) * NT + nt;
    return (w[pr / K] >> (8 * (pr % K) + 2 * t + (e & 1))) & 1u;
  }
};

// One consumer thread's online-softmax state: rows g and g + 8 of its warp's 16.
struct RowState {
  float m[2];  // running max (base-2 logits), quad-uniform
  float l[2];  // this lane's part of the running sum
};

// Scales and masks S (raw Q.K^T of key block n0, rows i0 + g (+8)), takes the row max into st,
// and turns S into exp2(S - max) in place, adding it to the row sums. alpha: how much the old O
// and l shrink (exp2(old max - new max)). mask: the block crosses S or the causal diagonal.
template <int NT>
__device__ __forceinline__ void softmax_block(const FwdParams& p, float (&s)[NT * 4], RowState& st,
                                              float (&alpha)[2], int i0, int n0, bool mask,
                                              int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[4 * nt + e] * p.scale_log2;
      if (mask) {
        const int i = i0 + g + 8 * (e >> 1), j = n0 + 8 * nt + 2 * t + (e & 1);
        if (j >= p.S || (p.causal && j > i)) x = -INFINITY;
      }
      s[4 * nt + e] = x;
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = st.m[r];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
    mx = quad_max(mx);
    const float base = mx == -INFINITY ? 0.f : mx;  // all masked so far: exp2(-inf - 0) = 0
    alpha[r] = exp2f(st.m[r] - base);               // 0 when the old max is -inf
    st.m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        s[4 * nt + e] = exp2f(s[4 * nt + e] - base);
        sum += s[4 * nt + e];
      }
    st.l[r] = st.l[r] * alpha[r] + sum;  // the softmax sum is taken before dropout
  }
}

// P (16-bit A fragments for P V) from the probabilities in s, dropping the dropped ones (the
// keep scale is applied once, in the epilogue).
template <typename T, int NT>
__device__ __forceinline__ void make_p(uint32_t (&pr)[NT / 2][4], float (&s)[NT * 4],
                                       const FwdParams& p, bool drop, uint64_t seed,
                                       uint64_t offset, uint32_t bh, int i0, int n0, int lane) {
  if (drop) {
    KeepBits<NT> kb;
    kb.make(p, seed, offset, bh, i0, n0, lane);
    const int t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!kb.keep(nt, e, t)) s[4 * nt + e] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    pr[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    pr[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    pr[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    pr[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Byte offset of element (row, col) in a tile of `rows`-row slabs with the 128-byte swizzle.
__device__ __forceinline__ uint32_t swizzled(int row, int col, int rows) {
  const uint32_t chunk = uint32_t((col & 63) >> 3) ^ uint32_t(row & 7);
  return uint32_t((col >> 6) * rows * 128 + row * 128) + chunk * 16 + uint32_t(col & 7) * 2;
}

// Writes the consumer's O rows (normalized, 16-bit) into the staging tile and stores them with
// one thread's TMA stores; writes lse. leader: the consumer's thread 0.
template <typename Cfg, typename T>
__device__ void fwd_epilogue(const FwdParams& p, FwdSharedStorage<Cfg, T>& ss,
                             float (&o)[Cfg::kHeadDim / 2], const RowState& st, int c, int tid,
                             int m0, int b, int h) {
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bar = kBarEpilogueFirst + c;
  float mul[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(st.l[r]);
    mul[r] = l > 0.f ? p.drop_scale / l : 0.f;
    const int i = m0 + 64 * c + 16 * warp + g + 8 * r;
    if (t == 0 && i < p.L)
      p.lse[(int64_t(b) * p.Hq + h) * p.L + i] = l > 0.f ? st.m[r] * kLn2 + logf(l) : INFINITY;
  }
  if (tid == 0) tma_store_wait_read();  // the previous tile's store has read the staging tile
  named_sync(bar, kWarpgroup);
  unsigned char* so = reinterpret_cast<unsigned char*>(ss.o);
#pragma unroll
  for (int j = 0; j < Cfg::kHeadDim / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 64 * c + 16 * warp + g + 8 * r, col = 8 * j + 2 * t;
      const uint32_t v = pack2<T>(o[4 * j + 2 * r] * mul[r], o[4 * j + 2 * r + 1] * mul[r]);
      *reinterpret_cast<uint32_t*>(so + swizzled(row, col, Cfg::kBlockM)) = v;
    }
  fence_proxy_async();  // the TMA store (async proxy) reads what these stores wrote
  named_sync(bar, kWarpgroup);
  if (tid == 0) {
#pragma unroll
    for (int sl = 0; sl < Cfg::kSlabs; ++sl)
      tma_store_4d(&p.tm_o, smem_u32(so + sl * Cfg::kBlockM * 128 + 64 * c * 128), sl * 64,
                   m0 + 64 * c, h, b);
    tma_store_commit();
  }
}

// Consumer c (0 or 1) of the forward; tid = its thread index in [0, 128).
template <typename Cfg, typename T>
__device__ void fwd_consumer(const FwdParams& p, FwdSharedStorage<Cfg, T>& ss, int c, int tid) {
  constexpr int D = Cfg::kHeadDim, BN = Cfg::kBlockN, NT = BN / 8;
  const int lane = tid & 31, warp = tid >> 5;
  const bool drop = p.thresh > 0;
  uint64_t seed = 0, offset = 0;
  if (drop) {  // read on the device: no host sync
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[p.rng_stride]);
  }
  const uint32_t q_full = smem_u32(&ss.bar.q_full), q_empty = smem_u32(&ss.bar.q_empty);
  const uint32_t q_rows = smem_u32(ss.q) + 64 * c * 128;  // this consumer's rows of slab 0
  // Ping-pong: consumer c issues its wgmmas after the other one's (turn_wait), then hands over.
  auto turn_wait = [&] { named_sync(kBarTurnFirst + c, 2 * kWarpgroup); };
  auto turn_pass = [&] { named_arrive(kBarTurnFirst + (c ^ 1), 2 * kWarpgroup); };
  if (c == 1) turn_pass();  // consumer 0 goes first

  PipeState<Cfg::kStages> kv;
  uint32_t q_phase = 0;
  for (int tt = blockIdx.x; tt < p.sched.count(); tt += gridDim.x) {
    const TileScheduler::Tile tile = p.sched.at(tt);
    const int b = tile.bh / p.Hq, h = tile.bh - b * p.Hq;
    const int m0 = tile.m_block * Cfg::kBlockM;
    const int i0 = m0 + 64 * c + 16 * warp;  // this warp's first query row
    const int nb = key_blocks(p, m0, Cfg::kBlockM, BN);
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    RowState st{{-INFINITY, -INFINITY}, {0.f, 0.f}};
    if (nb > 0) {
      float s[BN / 2];
      uint32_t pr[BN / 16][4];
      float alpha[2];
      auto needs_mask = [&](int n) {
        return (n + 1) * BN > p.S || (p.causal && (n + 1) * BN - 1 > m0);
      };
      mbar_wait(q_full, q_phase);
      q_phase ^= 1u;
      // The last key block: S only.
      int n = nb - 1;
      mbar_wait(smem_u32(&ss.bar.k_full[kv.index]), kv.phase);
      turn_wait();
      wgmma_fence();
      issue_qk<Cfg, T>(s, q_rows, smem_u32(ss.k[kv.index]));
      wgmma_commit();
      turn_pass();
      wgmma_wait<0>();
      fence_regs(s);
      mbar_arrive(smem_u32(&ss.bar.k_empty[kv.index]));
      softmax_block<NT>(p, s, st, alpha, i0, n * BN, needs_mask(n), lane);
      make_p<T, NT>(pr, s, p, drop, seed, offset, uint32_t(tile.bh), i0, n * BN, lane);
      // Blocks nb-2 .. 0: S_n and P_{n+1} V_{n+1} in flight together.
      for (n = nb - 2; n >= 0; --n) {
        const PipeState<Cfg::kStages> prev = kv;
        kv.advance();
        mbar_wait(smem_u32(&ss.bar.k_full[kv.index]), kv.phase);
        mbar_wait(smem_u32(&ss.bar.v_full[prev.index]), prev.phase);
        turn_wait();
        fence_regs(o);
        fence_regs(pr);
        wgmma_fence();
        issue_qk<Cfg, T>(s, q_rows, smem_u32(ss.k[kv.index]));
        wgmma_commit();
        issue_pv<Cfg, T>(o, pr, smem_u32(ss.v[prev.index]));
        wgmma_commit();
        turn_pass();
        wgmma_wait<1>();  // S_n has landed; P V is still running
        fence_regs(s);
        mbar_arrive(smem_u32(&ss.bar.k_empty[kv.index]));
        softmax_block<NT>(p, s, st, alpha, i0, n * BN, needs_mask(n), lane);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pr);
        mbar_arrive(smem_u32(&ss.bar.v_empty[prev.index]));
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[4 * j + 0] *= alpha[0];
          o[4 * j + 1] *= alpha[0];
          o[4 * j + 2] *= alpha[1];
          o[4 * j + 3] *= alpha[1];
        }
        make_p<T, NT>(pr, s, p, drop, seed, offset, uint32_t(tile.bh), i0, n * BN, lane);
      }
      // The first key block's P V.
      mbar_wait(smem_u32(&ss.bar.v_full[kv.index]), kv.phase);
      turn_wait();
      fence_regs(o);
      fence_regs(pr);
      wgmma_fence();
      issue_pv<Cfg, T>(o, pr, smem_u32(ss.v[kv.index]));
      wgmma_commit();
      turn_pass();
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pr);
      mbar_arrive(smem_u32(&ss.bar.v_empty[kv.index]));
      kv.advance();
      mbar_arrive(q_empty);
    }
    fwd_epilogue<Cfg, T>(p, ss, o, st, c, tid, m0, b, h);
  }
  if (tid == 0) tma_store_wait_all();  // the staging tile is read before the block exits
}

// ------------------------------------------------------------------------------------------
// The forward kernel: barrier setup, then the roles.
template <typename T, int D>
__global__ void __launch_bounds__(384, 1) attn_fwd_sm90(const __grid_constant__ FwdParams p) {
#if defined(FASTLM_SM90_DEVICE)
  using Cfg = FwdConfig<T, D>;
  using Storage = FwdSharedStorage<Cfg, T>;
  static_assert(Cfg::kThreads == 384, "launch bounds");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Storage& ss = shared_storage<Storage>(smem_raw);
  const int wg = threadIdx.x / kWarpgroup, tid = threadIdx.x % kWarpgroup;
  if (threadIdx.x == 0) {
    mbar_init(smem_u32(&ss.bar.q_full), 1);
    mbar_init(smem_u32(&ss.bar.q_empty), Cfg::kConsumers * kWarpgroup);
#pragma unroll
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(smem_u32(&ss.bar.k_full[s]), 1);
      mbar_init(smem_u32(&ss.bar.v_full[s]), 1);
      mbar_init(smem_u32(&ss.bar.k_empty[s]), Cfg::kConsumers * kWarpgroup);
      mbar_init(smem_u32(&ss.bar.v_empty[s]), Cfg::kConsumers * kWarpgroup);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid < 32 && elect_one()) fwd_producer<Cfg, T>(p, ss);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    fwd_consumer<Cfg, T>(p, ss, wg - 1, tid);
  }
#endif
}

// ------------------------------------------------------------------------------------------
// Backward. Math per key j of the block and query i of a tile (base-2 logits, lse2 = lse log2 e,
// D_i = rowsum(dO_i O_i), z the keep bit, r the keep scale; docs/attention.md):
//   p_ij = exp2(s_ij - lse2_i)          dv_j += z p_ij dO_i          (times r at the end)
//   dp_ij = z r <dO_i, v_j>             ds_ij = p_ij (dp_ij - D_i)
//   dk_j += ds_ij q_i  (times scale)    dq_i += ds_ij k_j            (times scale, by dq_convert)
// in the transposed orientation (rows = keys): S^T = K Q^T, dP^T = V dO^T, dV += (Z P)^T dO,
// dK += dS^T Q, dQ = dS K with dS from shared memory. Five matmuls per tile.
struct BwdParams {
  CUtensorMap tm_q;   // (B, Hq, L, E): boxes of 64 columns x kBlockM rows
  CUtensorMap tm_do;  // (B, Hq, L, Ev)
  CUtensorMap tm_k;   // (B, Hk, S, E): 64 x kBlockN
  CUtensorMap tm_v;   // (B, Hk, S, Ev)
  const float* lse;    // (B, Hq, L)
  const float* delta;  // (B, Hq, L)
  float* dq_accum;     // (B, Hq, Lpad, D) float32, zeroed; dq_convert scales and casts it
  int* sem;            // (B, Hq, L tiles) zeroed: dQ contributions added so far (2 per key block)
  void* dk;            // (B, Hk, S, D) contiguous
  void* dv;
  const int64_t* rng;
  int64_t rng_stride;
  uint32_t thresh;
  float drop_scale;
  int Hq, Hk, L, S, Lpad, m_tiles;
  float scale, scale_log2;
  bool causal;
};

// Query tiles key block n sees: all, or with causal those holding queries >= its first key.
__device__ __forceinline__ int bwd_m_begin(const BwdParams& p, int n, int block_n, int block_m) {
  return p.causal ? (n * block_n) / block_m : 0;
}

template <typename Cfg, typename T>
__device__ void bwd_producer(const BwdParams& p, BwdSharedStorage<Cfg, T>& ss, int n, int hk,
                             int b) {
  constexpr int kSlabs = Cfg::kSlabs, BN = Cfg::kBlockN, BM = Cfg::kBlockM;
  const uint32_t kv = smem_u32(&ss.bar.kv_full);
  mbar_arrive_expect_tx(kv, 2 * Cfg::kKVBytes);
#pragma unroll
  for (int sl = 0; sl < kSlabs; ++sl) {
    tma_load_4d(smem_u32(ss.k + sl * BN * 64), &p.tm_k, kv, sl * 64, n * BN, hk, b);
    tma_load_4d(smem_u32(ss.v + sl * BN * 64), &p.tm_v, kv, sl * 64, n * BN, hk, b);
  }
  PipeState<Cfg::kStages> st = producer_start<Cfg::kStages>();
  const int G = p.Hq / p.Hk;
  for (int hh = 0; hh < G; ++hh)
    for (int m = bwd_m_begin(p, n, BN, BM); m < p.m_tiles; ++m) {
      const int h = hk * G + hh;
      const uint32_t full = smem_u32(&ss.bar.qdo_full[st.index]);
      mbar_wait(smem_u32(&ss.bar.qdo_empty[st.index]), st.phase);
      mbar_arrive_expect_tx(full, 2 * Cfg::kQBytes);
#pragma unroll
      for (int sl = 0; sl < kSlabs; ++sl) {
        tma_load_4d(smem_u32(ss.q[st.index] + sl * BM * 64), &p.tm_q, full, sl * 64, m * BM, h, b);
        tma_load_4d(smem_u32(ss.dout[st.index] + sl * BM * 64), &p.tm_do, full, sl * 64, m * BM,
                    h, b);
      }
      st.advance();
    }
}

// Dropout keep bits of a warp's 16 x (8 NTQ) slice of the transposed scores (rows = keys k0 + g
// (+8), k0 a multiple of 16; columns = queries m0 + 8 nt + 2t (+1)): the 8 lanes sharing t need
// the same (query, key group) pairs, 4 NTQ of them, NTQ / 2 per lane, shared with 8 shuffles.
template <int NTQ>
struct KeepBitsT {
  static constexpr int K = NTQ / 2;
  static_assert(K <= 4, "one 32-bit word of keep bits per lane");
  uint32_t w[8];
  __device__ __forceinline__ void make(uint64_t seed, uint64_t offset, uint32_t thresh,
                                       uint32_t bh, int m0, int k0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t mine = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pr = g * K + k;  // pair = nt * 4 + col * 2 + group
      const int nt = pr >> 2, col = (pr >> 1) & 1, grp = pr & 1;
      mine |= dropout_keep8(seed, offset, bh, uint32_t(m0 + 8 * nt + 2 * t + col),
                            uint32_t((k0 >> 3) + grp), thresh)
              << (8 * k);
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) w[s] = __shfl_sync(0xffffffffu, mine, s * 4 + t);
  }
  // Element e of n-tile nt: key k0 + g + 8 (e >> 1) (bit g of its group), query m0 + 8 nt + 2t +
  // (e & 1).
  __device__ __forceinline__ bool keep(int nt, int e, int g) const {
    const int pr = nt * 4 + (e & 1) * 2 + (e >> 1);
    return (w[pr / K] >> (8 * (pr % K) + g)) & 1u;
  }
};

// Consumer c of the backward: keys n * kBlockN + 64c .. + 63; tid in [0, 128).
template <typename Cfg, typename T>
__device__ void bwd_consumer(const BwdParams& p, BwdSharedStorage<Cfg, T>& ss, int c, int tid,
                             int n, int hk, int b) {
  constexpr int D = Cfg::kHeadDim, BN = Cfg::kBlockN, BM = Cfg::kBlockM, NTQ = BM / 8;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int kb0 = n * BN + 64 * c + 16 * warp;  // this warp's first key
  const bool drop = p.thresh > 0;
  uint64_t seed = 0, offset = 0;
  if (drop) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[p.rng_stride]);
  }
  const uint32_t k_rows = smem_u32(ss.k) + 64 * c * 128;  // this consumer's keys, slab 0
  const uint32_t v_rows = smem_u32(ss.v) + 64 * c * 128;
  const uint32_t ds_tile = smem_u32(ss.ds);
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  mbar_wait(smem_u32(&ss.bar.kv_full), 0);
  PipeState<Cfg::kStages> st;
  const int G = p.Hq / p.Hk;
  for (int hh = 0; hh < G; ++hh)
    for (int m = bwd_m_begin(p, n, BN, BM); m < p.m_tiles; ++m) {
      const int h = hk * G + hh, bh = b * p.Hq + h, m0 = m * BM;
      const uint32_t q_t = smem_u32(ss.q[st.index]), do_t = smem_u32(ss.dout[st.index]);
      mbar_wait(smem_u32(&ss.bar.qdo_full[st.index]), st.phase);
      // S^T = K_c Q^T and dP^T = V_c dO^T (64 keys x 64 queries each).
      float s[BM / 2], dp[BM / 2];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t col = (kk & 3) * 32;
        const uint64_t dq_ = make_desc(q_t + (kk >> 2) * BM * 128 + col, 16, 1024);
        Wgmma<BM, T>::template ss<0, 0>(
            s, make_desc(k_rows + (kk >> 2) * BN * 128 + col, 16, 1024), dq_, kk > 0 ? 1 : 0);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t col = (kk & 3) * 32;
        const uint64_t dd = make_desc(do_t + (kk >> 2) * BM * 128 + col, 16, 1024);
        Wgmma<BM, T>::template ss<0, 0>(
            dp, make_desc(v_rows + (kk >> 2) * BN * 128 + col, 16, 1024), dd, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      fence_regs(dp);
      // P^T (kept, unscaled) and dS^T, packed 16-bit as the A fragments of dV and dK, one k-step
      // (16 queries: n-tiles 2kk, 2kk + 1) at a time. Columns: queries m0 + 8 nt + 2t + (e & 1).
      KeepBitsT<NTQ> kb;
      if (drop) kb.make(seed, offset, p.thresh, uint32_t(bh), m0, kb0, lane);
      uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
      for (int nt = 0; nt < NTQ; ++nt) {
        float pv[4], dv_[4];
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const int i = m0 + 8 * nt + 2 * t + col;
          const bool in = i < p.L;
          const float lse2 = in ? p.lse[int64_t(bh) * p.L + i] * kLog2e : INFINITY;
          const float dlt = in ? p.delta[int64_t(bh) * p.L + i] : 0.f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int e = 2 * r + col, j = kb0 + g + 8 * r;
            const bool ok = in && j < p.S && !(p.causal && j > i);
            const float pr = ok ? exp2f(s[4 * nt + e] * p.scale_log2 - lse2) : 0.f;
            const bool keep = !drop || kb.keep(nt, e, g);
            const float d = keep ? (drop ? dp[4 * nt + e] * p.drop_scale : dp[4 * nt + e]) : 0.f;
            pv[e] = keep ? pr : 0.f;
            dv_[e] = pr * (d - dlt);
          }
        }
        // n-tile nt is registers 2 (nt & 1), 2 (nt & 1) + 1 of k-step nt / 2 (C -> A layout)
        pa[nt >> 1][2 * (nt & 1)] = pack2<T>(pv[0], pv[1]);
        pa[nt >> 1][2 * (nt & 1) + 1] = pack2<T>(pv[2], pv[3]);
        da[nt >> 1][2 * (nt & 1)] = pack2<T>(dv_[0], dv_[1]);
        da[nt >> 1][2 * (nt & 1) + 1] = pack2<T>(dv_[2], dv_[3]);
      }
      // dV += (Z P)^T dO and dK += dS^T Q (B: MN-major, 16 queries per k-step).
      fence_regs(dv);
      fence_regs(dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        Wgmma<D, T>::template rs<1>(dv, pa[kk], make_desc(do_t + kk * 16 * 128, BM * 128, 1024), 1);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        Wgmma<D, T>::template rs<1>(dk, da[kk], make_desc(q_t + kk * 16 * 128, BM * 128, 1024), 1);
      wgmma_commit();
      // dS^T rows of this consumer into the shared tile (keys x 64 queries, one swizzled slab).
      unsigned char* dst = reinterpret_cast<unsigned char*>(ss.ds);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int row = 64 * c + 16 * warp + g + 8 * (x & 1);
          const int col = 16 * kk + 8 * (x >> 1) + 2 * t;
          *reinterpret_cast<uint32_t*>(dst + swizzled(row, col, BN)) = da[kk][x];
        }
      wgmma_wait<0>();  // dV and dK done: P^T and dS^T registers are free before dQ's accumulator
      fence_regs(dv);
      fence_regs(dk);
      fence_regs(pa);
      fence_regs(da);
      fence_proxy_async();  // the dQ wgmma (async proxy) reads these stores
      named_sync(kBarDsReady, 2 * kWarpgroup);
      // dQ[:, c D/2 .. (c+1) D/2) = dS K: A = dS (queries x keys, MN-major), B = K (MN-major).
      float dq[D / 4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t kcol = c * (D / 2);
        const uint64_t da_ = make_desc(ds_tile + kk * 16 * 128, BN * 128, 1024);
        const uint64_t db_ = make_desc(smem_u32(ss.k) + (kcol >> 6) * BN * 128 + (kcol & 63) * 2 +
                                           kk * 16 * 128,
                                       BN * 128, 1024);
        Wgmma<D / 2, T>::template ss<1, 1>(dq, da_, db_, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      mbar_arrive(smem_u32(&ss.bar.qdo_empty[st.index]));
      st.advance();
      named_sync(kBarDsFree, 2 * kWarpgroup);  // both dQ wgmmas have read dS^T
      // Add dQ to the accumulator after key blocks 0 .. n-1 (2 halves each), in that order.
      int* sem = p.sem + int64_t(bh) * p.m_tiles + m;
      if (tid == 0)
        while (ld_acquire(sem) < 2 * n) {
        }
      named_sync(kBarDqFirst + c, kWarpgroup);
      float* acc = p.dq_accum + (int64_t(bh) * p.Lpad + m0) * D + c * (D / 2);
#pragma unroll
      for (int j = 0; j < D / 16; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* a = acc + (16 * warp + g + 8 * r) * D + 8 * j + 2 * t;
          a[0] += dq[4 * j + 2 * r];
          a[1] += dq[4 * j + 2 * r + 1];
        }
      named_sync(kBarDqFirst + c, kWarpgroup);
      if (tid == 0) red_release_add(sem, 1);
    }
  // dK (times scale) and dV (times r) of this warp's keys.
  T* dkg = static_cast<T*>(p.dk) + (int64_t(b) * p.Hk + hk) * p.S * D;
  T* dvg = static_cast<T*>(p.dv) + (int64_t(b) * p.Hk + hk) * p.S * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = kb0 + g + 8 * r;
    if (j >= p.S) continue;
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
      const int col = 8 * jj + 2 * t;
      *reinterpret_cast<uint32_t*>(dkg + int64_t(j) * D + col) =
          pack2<T>(dk[4 * jj + 2 * r] * p.scale, dk[4 * jj + 2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + int64_t(j) * D + col) =
          pack2<T>(dv[4 * jj + 2 * r] * p.drop_scale, dv[4 * jj + 2 * r + 1] * p.drop_scale);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(384, 1) attn_bwd_sm90(const __grid_constant__ BwdParams p) {
#if defined(FASTLM_SM90_DEVICE)
  using Cfg = BwdConfig<T, D>;
  using Storage = BwdSharedStorage<Cfg, T>;
  static_assert(Cfg::kThreads == 384, "launch bounds");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Storage& ss = shared_storage<Storage>(smem_raw);
  const int wg = threadIdx.x / kWarpgroup, tid = threadIdx.x % kWarpgroup;
  const int n = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  if (threadIdx.x == 0) {
    mbar_init(smem_u32(&ss.bar.kv_full), 1);
#pragma unroll
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(smem_u32(&ss.bar.qdo_full[s]), 1);
      mbar_init(smem_u32(&ss.bar.qdo_empty[s]), Cfg::kConsumers * kWarpgroup);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid < 32 && elect_one()) bwd_producer<Cfg, T>(p, ss, n, hk, b);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    bwd_consumer<Cfg, T>(p, ss, wg - 1, tid, n, hk, b);
  }
#endif
}

// dq = T(dq_accum * scale) for the L rows of each (batch, head); 2 columns per thread step.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_dq_convert(const float* __restrict acc,
                                                           T* __restrict dq, int64_t rows, int L,
                                                           int Lpad, int D, float scale) {
  const int64_t pairs = rows * D / 2;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < pairs;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * x, row = e / D, bh = row / L, i = row - bh * L, col = e - row * D;
    const float* a = acc + (bh * Lpad + i) * D + col;
    *reinterpret_cast<uint32_t*>(dq + e) = pack2<T>(a[0] * scale, a[1] * scale);
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                    cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && f != nullptr,
                "fastlm: the CUDA driver has no cuTensorMapEncodeTiled (driver too old for the "
                "Hopper attention kernels; set FASTLM_CUDA_SM90=0 to use the portable ones)");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A 4-D tensor map over t (B, H, R, C), last dim contiguous, boxes of 64 columns x box_rows
// rows of one (b, h), 128-byte swizzle, out-of-bounds elements zero-filled on loads.
CUtensorMap make_map(const char* who, const at::Tensor& t, int box_rows) {
  const int64_t el = t.element_size();
  cuuint64_t dims[4] = {cuuint64_t(t.size(3)), cuuint64_t(t.size(2)), cuuint64_t(t.size(1)),
                        cuuint64_t(t.size(0))};
  cuuint64_t strides[3];
  int64_t natural = t.size(3) * el;
  for (int d = 0; d < 3; ++d) {  // dims 2, 1, 0 of t; an extent-1 dim gets a natural stride
    const int td = 2 - d;
    const int64_t s = t.size(td) > 1 ? t.stride(td) * el : natural;
    strides[d] = cuuint64_t(s);
    natural = s * t.size(td);
  }
  cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  CUtensorMap m;
  std::memset(&m, 0, sizeof(m));
  const CUtensorMapDataType ty = t.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode_tiled()(&m, ty, 4, const_cast<void*>(t.const_data_ptr()), dims, strides,
                                    box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, who, ": cuTensorMapEncodeTiled failed (error ", int(r),
              ") for a tensor of sizes ", t.sizes(), " and strides ", t.strides());
  return m;
}

// Compute capability major * 10 + minor of `device` (a cheap driver query: not cached, so an
// emulated device can change it between calls).
int capability(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
}

// FASTLM_CUDA_SM90=0 turns the Hopper kernels off (the portable ones run instead).
bool sm90_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTLM_CUDA_SM90");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

// Whether this build holds the sm_90a code of these kernels (setup.py compiles this file for
// sm_90a, defining FASTLM_SM90A, whenever it targets sm_90).
constexpr bool kBuiltForSm90a =
#if defined(FASTLM_SM90A) || defined(FASTLM_CUDA_EMU)
    true;
#else
    false;
#endif

bool aligned_for_tma(const at::Tensor& t) {
  const int64_t el = t.element_size();
  if (t.stride(3) != 1 || (reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15) != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && (t.stride(d) <= 0 || (t.stride(d) * el) % 16 != 0)) return false;
  return true;
}

// The dispatch table: which problems the Hopper forward runs (the rest: attention.cu's kernels).
//   device        compute capability 9.0, this build has sm_90a code, FASTLM_CUDA_SM90 != 0
//   dtype         float16, bfloat16
//   head dims     E == Ev, 64 or 128 (FwdConfig<T, 64>, FwdConfig<T, 128>)
//   mask          none (causal or not); dropout any
//   layout        TMA-readable: 16-byte aligned base and strides (mma_ready's layouts are)
bool fwd_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask) {
  if (!kBuiltForSm90a || !sm90_enabled()) return false;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (mask.has_value() && mask->defined()) return false;
  const int64_t E = q.size(3), Ev = v.size(3);
  if (E != Ev || (E != 64 && E != 128)) return false;
  if (!aligned_for_tma(q) || !aligned_for_tma(k) || !aligned_for_tma(v)) return false;
  return capability(q.get_device()) == 90;
}

template <typename T, int D>
void launch_fwd(const char* who, FwdParams& p, int64_t B, int device, cudaStream_t stream) {
  using Cfg = FwdConfig<T, D>;
  constexpr size_t smem = fwd_smem_bytes<Cfg, T>();
  static_assert(smem <= kSmemPerBlock, "shared memory budget of sm_90");
  auto kernel = attn_fwd_sm90<T, D>;
  static std::mutex mu;
  static bool opted[64] = {false};
  {
    std::lock_guard<std::mutex> lock(mu);
    const int d = device >= 0 && device < 64 ? device : 0;
    if (!opted[d]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      opted[d] = true;
    }
  }
  p.sched.num_m = (p.L + Cfg::kBlockM - 1) / Cfg::kBlockM;
  p.sched.num_bh = int(B * p.Hq);
  p.sched.causal = p.causal;
  const int tiles = p.sched.count();
  const int grid = std::max(1, std::min(tiles, sm_count(device)));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_bwd(BwdParams& p, int64_t B, int device, cudaStream_t stream, at::Tensor& dq) {
  using Cfg = BwdConfig<T, D>;
  constexpr size_t smem = bwd_smem_bytes<Cfg, T>();
  static_assert(smem <= kSmemPerBlock, "shared memory budget of sm_90");
  auto kernel = attn_bwd_sm90<T, D>;
  static std::mutex mu;
  static bool opted[64] = {false};
  {
    std::lock_guard<std::mutex> lock(mu);
    const int d = device >= 0 && device < 64 ? device : 0;
    if (!opted[d]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      opted[d] = true;
    }
  }
  const dim3 grid(unsigned((p.S + Cfg::kBlockN - 1) / Cfg::kBlockN), unsigned(p.Hk), unsigned(B));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t rows = B * p.Hq * p.L;
  const int64_t blocks =
      std::min<int64_t>((rows * D / 2 + 255) / 256, int64_t(sm_count(device)) * 8);
  attn_bwd_dq_convert<T><<<unsigned(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(
      p.dq_accum, static_cast<T*>(dq.mutable_data_ptr()), rows, p.L, p.Lpad, D, p.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sm90

bool attention_fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
                        double dropout_p, bool is_causal, double scale, at::Tensor& out,
                        at::Tensor& lse) {
  using namespace sm90;
  if (!fwd_applies(q, k, v, mask)) return false;
  const char* who = "fastlm.attention_fwd";
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
  TORCH_CHECK(B * Hq * ((L + 127) / 128) < (int64_t(1) << 31), who,
              ": too many query tiles for one launch");
  FwdParams p;
  std::memset(&p, 0, sizeof(p));
  p.tm_q = make_map(who, q, 128);
  p.tm_k = make_map(who, k, 128);
  p.tm_v = make_map(who, v, 128);
  p.tm_o = make_map(who, out, 64);
  p.lse = lse.mutable_data_ptr<float>();
  p.thresh = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0u;
  p.drop_scale = dropout_scale(p.thresh);
  if (p.thresh > 0) {
    p.rng = rng->const_data_ptr<int64_t>();
    p.rng_stride = rng->stride(0);
  }
  p.Hq = int(Hq);
  p.Hk = int(k.size(1));
  p.L = int(L);
  p.S = int(k.size(2));
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.causal = is_causal;
  const int device = q.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  if (q.size(3) == 64) {
    if (half) launch_fwd<__half, 64>(who, p, B, device, stream);
    else launch_fwd<__nv_bfloat16, 64>(who, p, B, device, stream);
  } else {
    if (half) launch_fwd<__half, 128>(who, p, B, device, stream);
    else launch_fwd<__nv_bfloat16, 128>(who, p, B, device, stream);
  }
  return true;
}

bool attention_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
                        double dropout_p, bool is_causal, double scale, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv) {
  using namespace sm90;
  if (!fwd_applies(q, k, v, mask) || !aligned_for_tma(dout)) return false;
  const char* who = "fastlm.attention_bwd";
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t m_tiles = (L + 63) / 64;
  TORCH_CHECK(B * k.size(1) < 65536 * 65536LL && k.size(1) < 65536 && B < 65536, who,
              ": too many heads or batches for one launch");
  at::Tensor dq_accum = at::zeros({B, Hq, m_tiles * 64, D}, q.options().dtype(at::kFloat));
  at::Tensor sem = at::zeros({B, Hq, m_tiles}, q.options().dtype(at::kInt));
  BwdParams p;
  std::memset(&p, 0, sizeof(p));
  p.tm_q = make_map(who, q, 64);
  p.tm_do = make_map(who, dout, 64);
  p.tm_k = make_map(who, k, 128);
  p.tm_v = make_map(who, v, 128);
  p.lse = lse.const_data_ptr<float>();
  p.delta = delta.const_data_ptr<float>();
  p.dq_accum = dq_accum.mutable_data_ptr<float>();
  p.sem = sem.mutable_data_ptr<int>();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.thresh = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0u;
  p.drop_scale = dropout_scale(p.thresh);
  if (p.thresh > 0) {
    p.rng = rng->const_data_ptr<int64_t>();
    p.rng_stride = rng->stride(0);
  }
  p.Hq = int(Hq);
  p.Hk = int(k.size(1));
  p.L = int(L);
  p.S = int(k.size(2));
  p.Lpad = int(m_tiles * 64);
  p.m_tiles = int(m_tiles);
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.causal = is_causal;
  const int device = q.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  if (D == 64) {
    if (half) launch_bwd<__half, 64>(p, B, device, stream, dq);
    else launch_bwd<__nv_bfloat16, 64>(p, B, device, stream, dq);
  } else {
    if (half) launch_bwd<__half, 128>(p, B, device, stream, dq);
    else launch_bwd<__nv_bfloat16, 128>(p, B, device, stream, dq);
  }
  return true;
}

}  // namespace cuda
}  // namespace fastlm
