// Fused scaled dot-product attention on CUDA: forward, and the FlashAttention-2 backward.
// docs/attention.md is the contract (math, masks, empty rows, dropout bits); this file follows it.
//
// Kernels (bf16 / f16 on tensor cores; float32 on a SIMT path, see the end of the file):
//   attn_fwd_mma     grid (b*Hq*chunks, query blocks of 64). 4 warps, each owning 16 query rows.
//                    Q stays in shared memory; K/V tiles of BN keys stream through a 2-stage
//                    cp.async ring. Per tile: S = Q K^T (mma), scale + mask, online softmax in
//                    registers (exp2f, base-2 logits), dropout on P, P re-packed in registers as
//                    the A operand of O += P V (mma, V through ldmatrix.trans). Causal and
//                    windows (the Band): key tiles outside the band of the block's rows are
//                    skipped, tiles crossing its edges are masked per element. Soft-capping
//                    (tanh of the scaled scores) is applied before the masks; the backward
//                    multiplies dS by its derivative, recomputed from the same scores.
//   attn_bwd_delta   D_i = sum_e dO_ie * O_ie (float32), one warp per row.
//   attn_bwd_dkdv    grid (b*Hk*chunks, key blocks of 64). 4 warps, each owning 16 keys; K and V
//                    stay in shared memory; (Q, dO) tiles stream through a 2-stage ring over all
//                    query heads of the GQA group and all query blocks (only those of the band).
//                    Per tile, in the transposed orientation (rows = keys):
//                      S^T = K Q^T,  P^T = exp2(S^T - lse),  dP^T = V dO^T,
//                      dV += (Z.P)^T dO,  dS^T = P^T (Z r dP^T - D),  dK += dS^T Q
//                    dV *= r and dK *= scale at the end. Each dK/dV element has one owner thread
//                    that sums in a fixed order: no atomics, deterministic.
//   attn_bwd_dq      grid (b*Hq*chunks, query blocks of 64). 4 warps x 16 query rows; Q and dO
//                    stay in shared memory; (K, V) tiles stream. S = Q K^T, dP = dO V^T,
//                    dS = P (Z r dP - D), dQ += dS K (K through ldmatrix.trans); dQ *= scale.
// Varlen (packed sequences): the same kernels; a block reads its sequence's base rows and
// lengths from the offsets (seq_of) and returns at once when its tile lies past the sequence's
// end. Output rows go through the layout strides of AttnParams (or_*, lr_*, kr_*).
// Tested without a GPU through the CUDA emulator (tests/cuda_emu, tests/test_cuda_emu_*.py).
// Head dims: E and Ev multiples of 8 up to 256. A kernel is compiled for the padded head dim
// D in {64, 128, 256} (D >= max(E, Ev)); loads zero-fill columns past E / Ev, the k-steps of the
// Q.K and dO.V products stop at E / Ev, and mma n-tiles past E / Ev are skipped. The output
// columns of a block are [c0, c0 + DC): the forward and dQ kernels hold all D columns (one
// chunk); the dK/dV kernel, which holds two accumulators, takes DC = 128 at D = 256 and a second
// grid slice (which recomputes S and dP) covers columns 128..255, so nothing spills.
//
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type" and "Warp-level matrix load instruction: ldmatrix"). lane = %laneid, g = lane >> 2
// (groupID), t = lane & 3 (threadID_in_group). Lower-indexed element in the low 16 bits.
//   A (16x16, .row): 4 x .b32 regs: a[0] = (row g,   cols 2t, 2t+1)   a[1] = (row g+8, cols 2t, 2t+1)
//                                   a[2] = (row g,   cols 2t+8, 2t+9) a[3] = (row g+8, cols 2t+8, 2t+9)
//   B (16x8, .col):  2 x .b32 regs: b[0] = (k rows 2t, 2t+1; col n = g)  b[1] = (k rows 2t+8, 2t+9; n = g)
//   C/D (16x8 f32):  c[0], c[1] = (row g, cols 2t, 2t+1); c[2], c[3] = (row g+8, cols 2t, 2t+1)
//   ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 give the 16-byte row addresses of matrix m (row = lane&7);
//     register m of every lane receives matrix m's (row g, cols 2t, 2t+1). With .trans, register m
//     receives (rows 2t, 2t+1; col g) of the stored matrix m.
// Derived access patterns (smem tiles are row-major, row stride SROW = D + 8 elements):
//   A from X[row][k] at (r0, k0):  lane addresses row r0 + (lane & 15), col k0 + 8 * (lane >> 4)
//     -> matrices (r0..+7, k0..+7), (r0+8.., k0..), (r0.., k0+8..), (r0+8.., k0+8..) = a[0..3].
//   B from Y[n][k] ("n-major", e.g. K[key][e] for Q K^T) for the two n-tiles n0, n0+8 at k0:
//     lane addresses row n0 + (lane & 7) + 8 * (lane >> 4), col k0 + 8 * ((lane >> 3) & 1)
//     -> r[0] = b[0] of n-tile n0, r[1] = b[1] of n0, r[2] = b[0] of n0+8, r[3] = b[1] of n0+8.
//   B from Z[k][n] ("k-major", e.g. V[key][e] for P V) with .trans, n-tiles n0, n0+8 at k0:
//     lane addresses row k0 + (lane & 15), col n0 + 8 * (lane >> 4)
//     -> matrices (k0.., n0), (k0+8.., n0), (k0.., n0+8), (k0+8.., n0+8) transposed = same r[0..3].
//   C -> A (scores reused as the A operand, k-step kk covers C n-tiles 2kk and 2kk+1):
//     a[0] = pack(c(2kk)[0], c(2kk)[1]), a[1] = pack(c(2kk)[2], c(2kk)[3]),
//     a[2] = pack(c(2kk+1)[0], c(2kk+1)[1]), a[3] = pack(c(2kk+1)[2], c(2kk+1)[3]).
// Bank conflicts: SROW * 2 bytes = 16 (mod 128), so the 8 row addresses of one 8x8 matrix fall in
// 8 distinct 16-byte bank groups (padding instead of a swizzle).
//
// Empty rows: the running max stays -inf; exp2 is then taken against 0 (never -inf - -inf), the
// row sum stays 0, out = 0 and lse = +inf. In the backward lse = +inf gives P = 0 and D = 0, hence
// zero gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../attention.h"
#include "attention_sm90.h"
#include "common.cuh"
#include "ptx.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps in every attention kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// The ops' names in messages (the same words as the CPU backend, csrc/cpu/attention.cpp).
const char* const kFwd = "fastlm.attention_fwd";
const char* const kBwd = "fastlm.attention_bwd";

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskF16 = 3, kMaskBF16 = 4 };

// Everything a kernel needs; passed by value as a __grid_constant__ parameter.
struct AttnParams {
  const void* q;  // (B, Hq, L, E), strides below (elements), last dim contiguous
  const void* k;  // (B, Hk, S, E)
  const void* v;  // (B, Hk, S, Ev)
  const void* dout;  // backward: (B, Hq, L, Ev)
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, do_sb, do_sh, do_sl;
  void* out;          // forward: (B, Hq, L, Ev) contiguous
  float* lse;         // forward output / backward input: (B, Hq, L) contiguous, natural log
  const float* delta; // backward: D_i, (B, Hq, L) contiguous
  void* dq;           // backward outputs, contiguous
  void* dk;
  void* dv;
  const void* mask;   // (B, Hq, L, S) with strides m_s*; kind in mask_kind
  int64_t m_sb, m_sh, m_sl, m_ss;
  int mask_kind;
  const int64_t* rng;  // (seed, offset) on the device; read only when thresh > 0
  int64_t rng_stride;
  uint32_t thresh;     // dropout threshold (docs/attention.md); 0 = no dropout
  float drop_scale;    // r = 65536 / (65536 - thresh), 1 without dropout
  int B, Hq, Hk, L, S, E, Ev;
  int nchunk;          // output-column chunks per (batch, head) in the grid's x dimension
  // Varlen (packed sequences, varlen_attention_*): cu_q / cu_k are the (B + 1) int32 offsets of
  // the sequences' rows in q (out, lse, dq) and in k, v (dk, dv), Tq / Tk the packed lengths;
  // null for the dense problem. L and S are then the longest lengths (the grid's); each block
  // reads its own sequence's (seq_of).
  const int32_t* cu_q;
  const int32_t* cu_k;
  int Tq, Tk;
  // Output indexing, in rows (times Ev or E for elements): (b, h, i) of out / dq is row
  // b * or_b + h * or_h + (q0 + i) * or_l; of lse / delta, b * lr_b + h * lr_h + q0 + i; (b, hk,
  // j) of dk / dv is row b * kr_b + hk * kr_h + (k0 + j) * kr_l (q0 = k0 = 0 when dense).
  int64_t or_b, or_h, or_l, lr_b, lr_h, kr_b, kr_h, kr_l;
  float scale;         // multiplies Q K^T
  float scale_log2;    // scale * log2(e): the scores are kept as base-2 logits
  // The diagonal options (docs/attention.md, "Causal, windows, soft-capping"), resolved on the
  // host: query i may attend key j iff -win_left <= j - i - off <= win_right (-1: that side
  // unbounded; is_causal is folded into win_right), off = S - L of the problem (with varlen, of
  // each sequence) when lower_right, else 0.
  int win_left, win_right;
  bool lower_right;
  float softcap;       // > 0: the scaled scores x become softcap * tanh(x / softcap)
  float cap_in;        // scale / softcap
  float cap_out2;      // softcap * log2(e)
};

// The PTX wrappers (cp.async, ldmatrix, mma.sync) are in ptx.h.

// Two floats -> one .b32 of two 16-bit values, `lo` in the low half (the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
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
// Shared helpers.

// Copies rows [0, ROWS) x columns [cbeg, cend) of a global tile (row r at g + r * ld) into a
// shared tile of row stride SROW, 16 bytes per cp.async; rows >= rows_valid and columns >=
// cvalid are zero-filled. cbeg, cend, cvalid are multiples of 8; g's row 0 column 0 is valid.
template <int ROWS, int SROW, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t ld, int rows_valid, int cbeg,
                                          int cend, int cvalid) {
  const int cpr = (cend - cbeg) >> 3;  // 16-byte chunks per row
  if (cpr <= 0) return;
  const int total = ROWS * cpr;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int r = idx / cpr;
    const int c = cbeg + ((idx - r * cpr) << 3);
    const bool ok = r < rows_valid && c < cvalid;
    cp_async16(smem_u32(s + r * SROW + c), ok ? g + r * ld + c : g, ok);
  }
}

// The additive mask m_ij of docs/attention.md (bool: 0 or -inf).
struct MaskView {
  const void* ptr;
  int kind;
  int64_t base, sl, ss;  // base = b * sb + h * sh
  __device__ __forceinline__ float at(int i, int j) const {
    const int64_t off = base + i * sl + j * ss;
    switch (kind) {
      case kMaskBool:
        return static_cast<const uint8_t*>(ptr)[off] ? 0.f : -INFINITY;
      case kMaskF32:
        return static_cast<const float*>(ptr)[off];
      case kMaskF16:
        return __half2float(static_cast<const __half*>(ptr)[off]);
      default:
        return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[off]);
    }
  }
};

__device__ __forceinline__ MaskView mask_view(const AttnParams& p, int b, int h) {
  return MaskView{p.mask, p.mask_kind, b * p.m_sb + h * p.m_sh, p.m_sl, p.m_ss};
}

// The problem of batch b: dense, the whole (L, S); varlen, sequence b's rows. The offsets are
// clamped into the packed lengths, so even inconsistent ones read and write in bounds.
struct Seq {
  int L, S;    // query and key counts
  int q0, k0;  // first packed row (0 when dense)
};
__device__ __forceinline__ Seq seq_of(const AttnParams& p, int b) {
  if (p.cu_q == nullptr) return Seq{p.L, p.S, 0, 0};
  const int q0 = min(max(p.cu_q[b], 0), p.Tq), q1 = min(max(p.cu_q[b + 1], q0), p.Tq);
  const int k0 = min(max(p.cu_k[b], 0), p.Tk), k1 = min(max(p.cu_k[b + 1], k0), p.Tk);
  return Seq{q1 - q0, k1 - k0, q0, k0};
}
// Row 0 of (b, h) in out / dq (next rows every or_l), in lse / delta, and of (b, hk) in dk / dv.
__device__ __forceinline__ int64_t out_row(const AttnParams& p, int b, int h, const Seq& sq) {
  return b * p.or_b + h * p.or_h + int64_t(sq.q0) * p.or_l;
}
__device__ __forceinline__ int64_t lse_row(const AttnParams& p, int b, int h, const Seq& sq) {
  return b * p.lr_b + h * p.lr_h + sq.q0;
}
__device__ __forceinline__ int64_t kv_row_of(const AttnParams& p, int b, int hk, const Seq& sq) {
  return b * p.kr_b + hk * p.kr_h + int64_t(sq.k0) * p.kr_l;
}

// The band of keys each query may attend (causal, windows; docs/attention.md): key j is allowed
// for query i iff lo <= j - i <= hi. The window's bounds are moved by the diagonal's offset and
// clamped into [-L, S], so an unbounded side is a bound no (i, j) in [0, L) x [0, S) reaches and
// nothing overflows; lo > hi allows nothing. The range helpers work in 64 bits (L + S may pass
// 2^31) and return values in [0, S] (keys) or [0, L] (queries).
struct Band {
  int lo, hi;
  __device__ __forceinline__ bool ok(int i, int j) const {
    const int d = j - i;  // |d| < 2^31: i < L, j < S, both below 2^31
    return d >= lo && d <= hi;
  }
  // Keys [key_begin(i0), key_end(i1, S)) hold every key rows i0 .. i1 - 1 may attend.
  __device__ __forceinline__ int key_begin(int i0) const {
    return int(max(int64_t(0), int64_t(i0) + lo));
  }
  __device__ __forceinline__ int key_end(int i1, int S) const {
    return int(max(int64_t(0), min(int64_t(S), int64_t(i1) + hi)));
  }
  // Queries [query_begin(j0), query_end(j1, L)) hold every query that attends a key of j0 .. j1-1.
  __device__ __forceinline__ int query_begin(int j0) const {
    return int(max(int64_t(0), int64_t(j0) - hi));
  }
  __device__ __forceinline__ int query_end(int j1, int L) const {
    return int(max(int64_t(0), min(int64_t(L), int64_t(j1) - lo)));
  }
  // Whether every (i, j) of rows [i0, i1) x keys [j0, j1) is in the band (a tile that needs no
  // per-element test for it).
  __device__ __forceinline__ bool covers(int i0, int i1, int j0, int j1) const {
    return int64_t(j0) - (i1 - 1) >= lo && int64_t(j1 - 1) - i0 <= hi;
  }
};
__device__ __forceinline__ Band band_of(const AttnParams& p, int L, int S) {
  const int64_t off = p.lower_right ? int64_t(S) - L : 0;
  const int64_t lo = p.win_left < 0 ? -int64_t(L) : off - p.win_left;
  const int64_t hi = p.win_right < 0 ? int64_t(S) : off + p.win_right;
  return Band{int(min(max(lo, -int64_t(L)), int64_t(S))), int(min(max(hi, -int64_t(L)),
                                                                  int64_t(S)))};
}

// tanh from exp2 (absolute error a few 1e-7; --use_fast_math turns tanhf into tanh.approx.f32,
// whose relative error of 2^-11 would show in the capped logits): 1 - 2 / (e^2x + 1), which
// gives exactly +-1 once e^2x overflows to inf or underflows to 0.
__device__ __forceinline__ float tanh_exp2(float x) {
  return 1.f - 2.f / (exp2f(x * (2.f * kLog2e)) + 1.f);
}

// Base-2 logit of element (i, j) given its raw dot product: cap(scale * qk) + mask, times
// log2(e); -inf outside [0, L) x [0, S), outside the band, or where the mask forbids it. `edge`
// is false only for tiles where none of that can happen (then it is a plain multiply, or the
// cap). dcap receives cap'(scale * qk) = 1 - tanh^2 (1 without soft-capping): the backward's dS
// carries it.
// In two steps, so the forward can branch on the soft-cap once per tile: cap2 (scale, cap,
// base 2) and mask2 (the rest).
__device__ __forceinline__ float cap2(const AttnParams& p, float qk, float& dcap) {
  const float th = tanh_exp2(qk * p.cap_in);
  dcap = 1.f - th * th;
  return th * p.cap_out2;
}
__device__ __forceinline__ float mask2(int L, int S, const Band& bd, const MaskView& mv,
                                       bool edge, float s, int i, int j) {
  if (edge) {
    if (i >= L || j >= S || !bd.ok(i, j)) {
      s = -INFINITY;
    } else if (mv.kind != kMaskNone) {
      s += kLog2e * mv.at(i, j);
    }
  }
  return s;
}
__device__ __forceinline__ float logit2(const AttnParams& p, int L, int S, const Band& bd,
                                        const MaskView& mv, bool edge, float qk, int i, int j,
                                        float& dcap) {
  float s;
  if (p.softcap > 0.f) {
    s = cap2(p, qk, dcap);
  } else {
    s = qk * p.scale_log2;
    dcap = 1.f;
  }
  return mask2(L, S, bd, mv, edge, s, i, j);
}

struct Dropout {
  uint64_t seed, offset;
  uint32_t thresh;
  float scale;  // r
  bool on;
};

__device__ __forceinline__ Dropout load_dropout(const AttnParams& p) {
  Dropout d{0, 0, p.thresh, p.drop_scale, p.thresh > 0};
  if (d.on) {  // read on the device: no host sync
    d.seed = static_cast<uint64_t>(p.rng[0]);
    d.offset = static_cast<uint64_t>(p.rng[p.rng_stride]);
  }
  return d;
}

// Keep bits of a warp's 16 x (8*NT) C-fragment tile whose rows are queries i0 + g (+8) and whose
// columns are keys n0 + 8*nt + 2t (+1) (forward and dQ). Each (row, 8-key group) needs one Philox
// call, shared by the 4 lanes of a quad: the quad's 2*NT calls are split NT/2 per lane, packed
// as bytes into one word, and exchanged with 4 shuffles.
template <int NT>
struct KeepRows {
  static constexpr int K = NT / 2;  // Philox calls per lane (NT is even)
  uint32_t w[4];                    // the words of quad lanes 0..3
  __device__ __forceinline__ void make(const Dropout& d, uint32_t bh, int i0, int n0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t mine = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pr = t * K + k;  // pair index = r * NT + nt
      const int r = pr / NT, nt = pr % NT;
      mine |= dropout_keep8(d.seed, d.offset, bh, uint32_t(i0 + g + 8 * r),
                            uint32_t((n0 >> 3) + nt), d.thresh)
              << (8 * k);
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) w[s] = __shfl_sync(0xffffffffu, mine, (lane & ~3) | s);
  }
  // Element e (0..3, C layout) of n-tile nt for this lane (t = lane & 3).
  __device__ __forceinline__ bool keep(int nt, int e, int t) const {
    const int pr = (e >> 1) * NT + nt;  // row half e >> 1; key j & 7 = 2t + (e & 1)
    return (w[pr / K] >> (8 * (pr % K) + 2 * t + (e & 1))) & 1u;
  }
};

// Keep bits of a warp's 16 x (8*NTQ) C-fragment tile whose rows are keys k0 + g (+8) and whose
// columns are queries m0 + 8*nt + 2t (+1) (the dK/dV kernel; k0 a multiple of 16). A (query,
// 8-key group) pair is needed by the 8 lanes sharing t; their 4*NTQ pairs are split NTQ/2 per
// lane and exchanged with 8 shuffles.
template <int NTQ>
struct KeepCols {
  static constexpr int K = NTQ / 2;
  uint32_t w[8];  // the words of lanes g' * 4 + t, g' = 0..7
  __device__ __forceinline__ void make(const Dropout& d, uint32_t bh, int m0, int k0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t mine = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pr = g * K + k;  // pair index = nt * 4 + c * 2 + grp
      const int nt = pr >> 2, c = (pr >> 1) & 1, grp = pr & 1;
      mine |= dropout_keep8(d.seed, d.offset, bh, uint32_t(m0 + 8 * nt + 2 * t + c),
                            uint32_t((k0 >> 3) + grp), d.thresh)
              << (8 * k);
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) w[s] = __shfl_sync(0xffffffffu, mine, s * 4 + t);
  }
  // Element e of n-tile nt for this lane (g = lane >> 2): key k0 + g + 8 * (e >> 1), whose bit
  // in its group is g; query m0 + 8 * nt + 2t + (e & 1).
  __device__ __forceinline__ bool keep(int nt, int e, int g) const {
    const int pr = nt * 4 + (e & 1) * 2 + (e >> 1);
    return (w[pr / K] >> (8 * (pr % K) + g)) & 1u;
  }
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Stores a warp's 16 x DC float accumulator (C layout) as T into a contiguous row-major matrix
// with `ld` columns: rows row0 + g (+8) below `rows`, columns c0 + 8*nt + 2t (+1) below `cols`
// (cols is a multiple of 8, so a column pair is in or out together).
template <typename T, int DC>
__device__ __forceinline__ void store_acc(T* dst, int64_t ld, const float (&acc)[DC / 8][4],
                                          int row0, int rows, int c0, int cols, float mul0,
                                          float mul1, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= rows) continue;
    const float mul = r ? mul1 : mul0;
    T* out = dst + row * ld;
#pragma unroll
    for (int nt = 0; nt < DC / 8; ++nt) {
      const int col = c0 + 8 * nt + 2 * t;
      if (col < cols) {
        const uint32_t v = pack2<T>(acc[nt][2 * r] * mul, acc[nt][2 * r + 1] * mul);
        *reinterpret_cast<uint32_t*>(out + col) = v;  // 4-byte aligned: col even, ld even
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Tile sizes per padded head dim D. *DC: output columns per block (accumulator width).
template <int D>
struct Cfg {
  static constexpr int SROW = D + 8;                   // smem row stride (elements)
  static constexpr int DC = D < 128 ? D : 128;         // dK/dV output columns per block
  static constexpr int FWD_DC = D;                     // forward output columns per block
  static constexpr int DQ_DC = D;                      // dQ output columns per block
  static_assert(DC % 16 == 0 && FWD_DC % 16 == 0 && DQ_DC % 16 == 0, "whole ldmatrix x4 pairs");
  static constexpr int FWD_BM = 64;                    // query rows per forward block
  static constexpr int FWD_BN = D <= 64 ? 64 : 32;     // keys per forward tile
  static constexpr int KV_BN = 64;                     // keys per dK/dV block
  static constexpr int KV_BM = D <= 64 ? 64 : 32;      // queries per dK/dV tile
  static constexpr int DQ_BM = 64;                     // query rows per dQ block
  static constexpr int DQ_BN = D <= 64 ? 64 : 32;      // keys per dQ tile
  static constexpr int STAGES = 2;                     // cp.async ring depth
  // Forward blocks per SM the registers must allow (launch bounds): 4 (<= 128 registers) up
  // to D = 128, where ptxas otherwise takes 158 (3 blocks) for the band and soft-cap code;
  // with the bound it needs 118 and spills nothing (sm_80, CUDA 13.0). D = 256 needs ~240.
  static constexpr int FWD_MIN_BLOCKS = D <= 128 ? 4 : 1;
  static constexpr size_t fwd_smem(size_t el) {
    return size_t(FWD_BM + STAGES * 2 * FWD_BN) * SROW * el;
  }
  static constexpr size_t dkdv_smem(size_t el) {
    return size_t(2 * KV_BN + STAGES * 2 * KV_BM) * SROW * el;
  }
  static constexpr size_t dq_smem(size_t el) {
    return size_t(2 * DQ_BM + STAGES * 2 * DQ_BN) * SROW * el;
  }
};

// ------------------------------------------------------------------------------------------
// Forward (tensor cores).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Cfg<D>::FWD_MIN_BLOCKS) attn_fwd_mma(const __grid_constant__ AttnParams p) {
  using C = Cfg<D>;
  constexpr int BM = C::FWD_BM, BN = C::FWD_BN, DC = C::FWD_DC, SROW = C::SROW, ST = C::STAGES;
  constexpr int NT = BN / 8;  // key n-tiles per tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM rows
  T* sKV = sQ + BM * SROW;                 // stage s: K at sKV + s*2*BN*SROW, V BN rows later

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % p.nchunk, bh = blockIdx.x / p.nchunk;
  const int b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hk);
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // heaviest (causal) blocks first
  if (m0 >= L) return;  // varlen: past the end of this (shorter) sequence
  const int c0 = chunk * DC;                          // first output column of this block
  const int E16 = (p.E + 15) & ~15, Ev16 = (p.Ev + 15) & ~15;
  const int vend = min(c0 + DC, Ev16);
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sq.q0 * p.q_sl;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sl;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sl;
  // Key tiles the block's rows [m0, i_end) can see: those of the band's keys (all without
  // causal or a window); none when no row may attend a key (then out = 0, lse = +inf).
  const Band bd = band_of(p, L, S);
  const int i_end = min(L, m0 + BM);
  const int tile0 = bd.key_begin(m0) / BN;
  const int ntiles = max(0, (bd.key_end(i_end, S) + BN - 1) / BN - tile0);

  auto load_kv = [&](int it) {  // the it-th tile of the block, into stage it % ST
    T* sK = sKV + (it % ST) * 2 * BN * SROW;
    T* sV = sK + BN * SROW;
    const int n0 = (tile0 + it) * BN;  // < key_end <= S: row 0 of the tile is valid
    load_tile<BN, SROW>(sK, kg + n0 * p.k_sl, p.k_sl, S - n0, 0, E16, p.E);
    load_tile<BN, SROW>(sV, vg + n0 * p.v_sl, p.v_sl, S - n0, c0, vend, p.Ev);
  };

  // Prologue: Q and tiles 0 .. ST-2, one commit group each (Q rides with tile 0).
  load_tile<BM, SROW>(sQ, qg + m0 * p.q_sl, p.q_sl, L - m0, 0, E16, p.E);
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_kv(s);
    cp_async_commit();
  }

  const int offA = (lane & 15) * SROW + 8 * (lane >> 4);                        // A / B.trans
  const int offB = ((lane & 7) + 8 * (lane >> 4)) * SROW + 8 * ((lane >> 3) & 1);  // B non-trans
  const uint32_t aQ = smem_u32(sQ + warp * 16 * SROW + offA);
  const MaskView mv = mask_view(p, b, h);
  const Dropout drop = load_dropout(p);
  const int row0 = m0 + warp * 16;  // this warp's rows: row0 + g, row0 + g + 8

  float acc[DC / 8][4];
#pragma unroll
  for (int nt = 0; nt < DC / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (base-2 logits), quad-uniform
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running sum

  for (int it = 0; it < ntiles; ++it) {
    // Keep ST-1 tiles in flight: issue tile it+ST-1 into the stage freed at the end of it-1.
    if (it + ST - 1 < ntiles) load_kv(it + ST - 1);
    cp_async_commit();       // (possibly empty) group it+ST-1
    cp_async_wait<ST - 1>(); // groups 0..it complete: Q and tile it have landed (this thread)
    __syncthreads();         // ... for every thread

    const T* sK = sKV + (it % ST) * 2 * BN * SROW;
    const T* sV = sK + BN * SROW;
    const uint32_t bK = smem_u32(sK + offB);
    const uint32_t bV = smem_u32(sV + offA);
    const int n0 = (tile0 + it) * BN;

    // S = Q K^T over the first E16 columns (zero-filled past E).
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < p.E) {
        uint32_t a[4];
        ldsm_x4(a, aQ + kk * 32);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, bK + (np * 16 * SROW + kk * 16) * 2);
          mma16816<T>(s[2 * np], a, bb[0], bb[1]);
          mma16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

    // Scale (cap), mask, online softmax. The tile needs per-element masking when it has keys
    // >= S, crosses an edge of the band (causal diagonal, window), or a mask is given.
    const bool edge = p.mask_kind != kMaskNone || n0 + BN > S || !bd.covers(m0, i_end, n0, n0 + BN);
    if (p.softcap > 0.f) {
      float unused;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = cap2(p, s[nt][e], unused);
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale_log2;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = mask2(L, S, bd, mv, edge, s[nt][e],
            row0 + g + 8 * (e >> 1), n0 + 8 * nt + 2 * t + (e & 1));

    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // all masked so far: exp2(-inf - 0) = 0
      const float alpha = exp2f(m_run[r] - base[r]);  // 0 when m_run = -inf
      m_run[r] = mx[r];
      l_run[r] *= alpha;
#pragma unroll
      for (int nt = 0; nt < DC / 8; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        l_run[e >> 1] += s[nt][e];  // the softmax sum is taken before dropout
      }
    if (drop.on) {
      KeepRows<NT> kb;
      kb.make(drop, uint32_t(bh), row0, n0, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!kb.keep(nt, e, t)) s[nt][e] = 0.f;  // r is applied once at the end
    }

    // O += P V: P from registers (C -> A), V through ldmatrix.trans, columns [c0, c0 + DC).
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < DC / 16; ++np) {
        if (c0 + np * 16 < p.Ev) {
          uint32_t bb[4];
          ldsm_x4_t(bb, bV + (kk * 16 * SROW + c0 + np * 16) * 2);
          mma16816<T>(acc[2 * np], a, bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with stage it % ST before it is refilled
  }
  cp_async_wait<0>();

  float mul[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    mul[r] = l > 0.f ? drop.scale / l : 0.f;
    const int row = row0 + g + 8 * r;
    if (chunk == 0 && t == 0 && row < L)
      p.lse[lse_row(p, b, h, sq) + row] = l > 0.f ? m_run[r] * kLn2 + logf(l) : INFINITY;
  }
  T* og = static_cast<T*>(p.out) + out_row(p, b, h, sq) * p.Ev;
  store_acc<T, DC>(og, p.or_l * p.Ev, acc, row0, L, c0, p.Ev, mul[0], mul[1], lane);
}

// ------------------------------------------------------------------------------------------
// Backward preprocess: D_i = sum_e dO_ie * O_ie in float32 (out contiguous). One warp per row.
// Dense: row = (b * Hq + h) * L + i of out (B, Hq, L, Ev) and delta (B, Hq, L). Packed (varlen,
// L = total_q): row = h * L + i of delta (Hq, total_q); out is (total_q, Hq, Ev).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_delta(const T* __restrict dout, int64_t sb, int64_t sh, int64_t sl,
                   const T* __restrict out, float* __restrict delta, int Hq, int L, int Ev,
                   int64_t rows, bool packed) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t bh = row / L;
  const int i = int(row - bh * L);
  const int64_t b = packed ? 0 : bh / Hq, h = bh - b * Hq;
  const T* d = dout + b * sb + h * sh + i * sl;
  const T* o = out + (packed ? int64_t(i) * Hq + h : row) * Ev;
  float acc = 0.f;
  for (int e = lane; e < Ev; e += 32) acc += to_f(d[e]) * to_f(o[e]);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

// ------------------------------------------------------------------------------------------
// Backward dK, dV (tensor cores). Math (per key j of the block, summed over the query heads h of
// its group and all queries i, with s in base-2 logits and lse2 = lse * log2(e)):
//   p_ij  = exp2(s_ij - lse2_i)                    (0 for empty rows: lse = +inf)
//   dv_j += z_ij p_ij dout_i                       (times r at the end)
//   dp_ij = z_ij r <dout_i, v_j>
//   ds_ij = p_ij (dp_ij - D_i)
//   dk_j += ds_ij q_i                              (times scale at the end)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_mma(const __grid_constant__ AttnParams p) {
  using C = Cfg<D>;
  constexpr int BN = C::KV_BN, BM = C::KV_BM, DC = C::DC, SROW = C::SROW, ST = C::STAGES;
  constexpr int NTQ = BM / 8;  // query n-tiles per tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // BN rows
  T* sV = sK + BN * SROW;                  // BN rows
  T* sQdO = sV + BN * SROW;                // stage s: Q at sQdO + s*2*BM*SROW, dO BM rows later

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % p.nchunk, bhk = blockIdx.x / p.nchunk;
  const int b = bhk / p.Hk, hk = bhk - b * p.Hk;
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int G = p.Hq / p.Hk;  // query heads per key/value head
  const int n0 = blockIdx.y * BN;  // heaviest (causal) blocks first
  if (n0 >= S) return;  // varlen: past the end of this (shorter) sequence
  const int c0 = chunk * DC;
  const int E16 = (p.E + 15) & ~15, Ev16 = (p.Ev + 15) & ~15;
  // Query tiles: those holding the queries that attend a key of the block (all without causal
  // or a window; causal: from the tile holding query n0 (top left)).
  const Band bd = band_of(p, L, S);
  const int j_end = min(S, n0 + BN);
  const int mt_begin = bd.query_begin(n0) / BM;
  const int mt_end = (bd.query_end(j_end, L) + BM - 1) / BM;
  const int nmt = max(0, mt_end - mt_begin);
  const int niter = G * nmt;  // iteration it: head hk*G + it / nmt, query tile mt_begin + it % nmt

  const T* kg =
      static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + int64_t(sq.k0 + n0) * p.k_sl;
  const T* vg =
      static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + int64_t(sq.k0 + n0) * p.v_sl;
  load_tile<BN, SROW>(sK, kg, p.k_sl, S - n0, 0, E16, p.E);
  load_tile<BN, SROW>(sV, vg, p.v_sl, S - n0, 0, Ev16, p.Ev);

  auto load_qdo = [&](int it) {
    const int hh = it / nmt, mt = mt_begin + (it - hh * nmt);
    const int h = hk * G + hh, m0 = mt * BM;  // m0 < L: row 0 of the tile is valid
    T* sQ = sQdO + (it % ST) * 2 * BM * SROW;
    T* sdO = sQ + BM * SROW;
    const T* qg =
        static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(sq.q0 + m0) * p.q_sl;
    const T* dg =
        static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(sq.q0 + m0) * p.do_sl;
    load_tile<BM, SROW>(sQ, qg, p.q_sl, L - m0, 0, E16, p.E);
    load_tile<BM, SROW>(sdO, dg, p.do_sl, L - m0, 0, Ev16, p.Ev);
  };
  // Prologue: K, V and (Q, dO) tiles 0 .. ST-2, one commit group each (K, V ride with tile 0).
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < niter) load_qdo(s);
    cp_async_commit();
  }

  const int offA = (lane & 15) * SROW + 8 * (lane >> 4);
  const int offB = ((lane & 7) + 8 * (lane >> 4)) * SROW + 8 * ((lane >> 3) & 1);
  const uint32_t aK = smem_u32(sK + warp * 16 * SROW + offA);
  const uint32_t aV = smem_u32(sV + warp * 16 * SROW + offA);
  const Dropout drop = load_dropout(p);
  const int k0 = n0 + warp * 16;  // this warp's keys: k0 + g, k0 + g + 8

  float dk[DC / 8][4], dv[DC / 8][4];
#pragma unroll
  for (int nt = 0; nt < DC / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;

  for (int it = 0; it < niter; ++it) {
    if (it + ST - 1 < niter) load_qdo(it + ST - 1);
    cp_async_commit();
    cp_async_wait<ST - 1>();  // K, V and tile it have landed
    __syncthreads();

    const int hh = it / nmt, mt = mt_begin + (it - hh * nmt);
    const int h = hk * G + hh, m0 = mt * BM;
    const int bh = b * p.Hq + h;  // the QUERY head: lse, D and the dropout counters use it
    const T* sQ = sQdO + (it % ST) * 2 * BM * SROW;
    const T* sdO = sQ + BM * SROW;
    const uint32_t bQ = smem_u32(sQ + offB), bdO = smem_u32(sdO + offB);
    const uint32_t tQ = smem_u32(sQ + offA), tdO = smem_u32(sdO + offA);

    // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x BM queries each.
    float st[NTQ][4], dpt[NTQ][4];
#pragma unroll
    for (int nt = 0; nt < NTQ; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < p.E) {
        uint32_t a[4];
        ldsm_x4(a, aK + kk * 32);
#pragma unroll
        for (int np = 0; np < NTQ / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, bQ + (np * 16 * SROW + kk * 16) * 2);
          mma16816<T>(st[2 * np], a, bb[0], bb[1]);
          mma16816<T>(st[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < p.Ev) {
        uint32_t a[4];
        ldsm_x4(a, aV + kk * 32);
#pragma unroll
        for (int np = 0; np < NTQ / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, bdO + (np * 16 * SROW + kk * 16) * 2);
          mma16816<T>(dpt[2 * np], a, bb[0], bb[1]);
          mma16816<T>(dpt[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

    // Element (nt, e): key j = k0 + g + 8 * (e >> 1), query i = m0 + 8 * nt + 2t + (e & 1).
    const MaskView mv = mask_view(p, b, h);
    const bool edge = p.mask_kind != kMaskNone || n0 + BN > S ||
                      !bd.covers(m0, m0 + BM, n0, j_end) || m0 + BM > L;
    KeepCols<NTQ> kb;
    if (drop.on) kb.make(drop, uint32_t(bh), m0, k0, lane);
#pragma unroll
    for (int nt = 0; nt < NTQ; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = m0 + 8 * nt + 2 * t + c;
        const bool in = i < L;
        const float lse2 = in ? p.lse[lse_row(p, b, h, sq) + i] * kLog2e : INFINITY;
        const float dlt = in ? p.delta[lse_row(p, b, h, sq) + i] : 0.f;
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int e = 2 * rh + c;
          const int j = k0 + g + 8 * rh;
          float dcap;
          const float pr = exp2f(logit2(p, L, S, bd, mv, edge, st[nt][e], i, j, dcap) - lse2);
          float dp = dpt[nt][e];
          float pz = pr;
          if (drop.on) {
            const bool keep = kb.keep(nt, e, g);
            pz = keep ? pr : 0.f;
            dp = keep ? dp * drop.scale : 0.f;
          }
          st[nt][e] = pz;                        // Z.P for dV (r applied at the end)
          dpt[nt][e] = pr * (dp - dlt) * dcap;   // dS
        }
      }
    }

    // dV += (Z.P)^T dO and dK += dS^T Q over this block's output columns [c0, c0 + DC):
    // A = the 16 x BM register tiles (C -> A), B = dO / Q rows through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < NTQ / 2; ++kk) {
      uint32_t ap[4], as[4];
      ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < DC / 16; ++np) {
        const int col = c0 + np * 16;
        if (col < p.Ev) {
          uint32_t bb[4];
          ldsm_x4_t(bb, tdO + (kk * 16 * SROW + col) * 2);
          mma16816<T>(dv[2 * np], ap, bb[0], bb[1]);
          mma16816<T>(dv[2 * np + 1], ap, bb[2], bb[3]);
        }
        if (col < p.E) {
          uint32_t bb[4];
          ldsm_x4_t(bb, tQ + (kk * 16 * SROW + col) * 2);
          mma16816<T>(dk[2 * np], as, bb[0], bb[1]);
          mma16816<T>(dk[2 * np + 1], as, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // stage it % ST is free for the load issued in the next iteration
  }
  cp_async_wait<0>();  // niter == 0 still issued K and V

  const int64_t kv_row = kv_row_of(p, b, hk, sq);  // row 0 of (b, hk) in dK / dV
  store_acc<T, DC>(static_cast<T*>(p.dv) + kv_row * p.Ev, p.kr_l * p.Ev, dv, k0, S, c0, p.Ev,
                   drop.scale, drop.scale, lane);
  store_acc<T, DC>(static_cast<T*>(p.dk) + kv_row * p.E, p.kr_l * p.E, dk, k0, S, c0, p.E, p.scale,
                   p.scale, lane);
}

// ------------------------------------------------------------------------------------------
// Backward dQ (tensor cores): dq_i = scale * sum_j ds_ij k_j, ds as in the dK/dV kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_mma(const __grid_constant__ AttnParams p) {
  using C = Cfg<D>;
  constexpr int BM = C::DQ_BM, BN = C::DQ_BN, DC = C::DQ_DC, SROW = C::SROW, ST = C::STAGES;
  constexpr int NT = BN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM rows
  T* sdO = sQ + BM * SROW;                 // BM rows
  T* sKV = sdO + BM * SROW;                // stage s: K at sKV + s*2*BN*SROW, V BN rows later

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int chunk = blockIdx.x % p.nchunk, bh = blockIdx.x / p.nchunk;
  const int b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hk);
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  if (m0 >= L) return;  // varlen: past the end of this (shorter) sequence
  const int c0 = chunk * DC;
  const int E16 = (p.E + 15) & ~15, Ev16 = (p.Ev + 15) & ~15;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sl;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sl;
  const Band bd = band_of(p, L, S);  // key tiles as in the forward
  const int i_end = min(L, m0 + BM);
  const int tile0 = bd.key_begin(m0) / BN;
  const int ntiles = max(0, (bd.key_end(i_end, S) + BN - 1) / BN - tile0);

  auto load_kv = [&](int it) {
    T* sK = sKV + (it % ST) * 2 * BN * SROW;
    T* sV = sK + BN * SROW;
    const int n0 = (tile0 + it) * BN;
    load_tile<BN, SROW>(sK, kg + n0 * p.k_sl, p.k_sl, S - n0, 0, E16, p.E);
    load_tile<BN, SROW>(sV, vg + n0 * p.v_sl, p.v_sl, S - n0, 0, Ev16, p.Ev);
  };
  {
    const T* qg =
        static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(sq.q0 + m0) * p.q_sl;
    const T* dg =
        static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(sq.q0 + m0) * p.do_sl;
    load_tile<BM, SROW>(sQ, qg, p.q_sl, L - m0, 0, E16, p.E);
    load_tile<BM, SROW>(sdO, dg, p.do_sl, L - m0, 0, Ev16, p.Ev);
  }
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_kv(s);
    cp_async_commit();
  }

  const int offA = (lane & 15) * SROW + 8 * (lane >> 4);
  const int offB = ((lane & 7) + 8 * (lane >> 4)) * SROW + 8 * ((lane >> 3) & 1);
  const uint32_t aQ = smem_u32(sQ + warp * 16 * SROW + offA);
  const uint32_t adO = smem_u32(sdO + warp * 16 * SROW + offA);
  const MaskView mv = mask_view(p, b, h);
  const Dropout drop = load_dropout(p);
  const int row0 = m0 + warp * 16;
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + g + 8 * r;
    const bool in = i < L;
    lse2[r] = in ? p.lse[lse_row(p, b, h, sq) + i] * kLog2e : INFINITY;
    dlt[r] = in ? p.delta[lse_row(p, b, h, sq) + i] : 0.f;
  }

  float dq[DC / 8][4];
#pragma unroll
  for (int nt = 0; nt < DC / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    if (it + ST - 1 < ntiles) load_kv(it + ST - 1);
    cp_async_commit();
    cp_async_wait<ST - 1>();  // Q, dO and tile it have landed
    __syncthreads();

    const T* sK = sKV + (it % ST) * 2 * BN * SROW;
    const T* sV = sK + BN * SROW;
    const uint32_t bK = smem_u32(sK + offB), bV = smem_u32(sV + offB);
    const uint32_t tK = smem_u32(sK + offA);
    const int n0 = (tile0 + it) * BN;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < p.E) {
        uint32_t a[4];
        ldsm_x4(a, aQ + kk * 32);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, bK + (np * 16 * SROW + kk * 16) * 2);
          mma16816<T>(s[2 * np], a, bb[0], bb[1]);
          mma16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < p.Ev) {
        uint32_t a[4];
        ldsm_x4(a, adO + kk * 32);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, bV + (np * 16 * SROW + kk * 16) * 2);
          mma16816<T>(dp[2 * np], a, bb[0], bb[1]);
          mma16816<T>(dp[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

    const bool edge = p.mask_kind != kMaskNone || n0 + BN > S || !bd.covers(m0, i_end, n0, n0 + BN);
    KeepRows<NT> kb;
    if (drop.on) kb.make(drop, uint32_t(bh), row0, n0, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row0 + g + 8 * (e >> 1), j = n0 + 8 * nt + 2 * t + (e & 1);
        float dcap;
        const float pr =
            exp2f(logit2(p, L, S, bd, mv, edge, s[nt][e], i, j, dcap) - lse2[e >> 1]);
        float d = dp[nt][e];
        if (drop.on) d = kb.keep(nt, e, t) ? d * drop.scale : 0.f;
        s[nt][e] = pr * (d - dlt[e >> 1]) * dcap;  // dS
      }

    // dQ += dS K over columns [c0, c0 + DC): K rows through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < DC / 16; ++np) {
        if (c0 + np * 16 < p.E) {
          uint32_t bb[4];
          ldsm_x4_t(bb, tK + (kk * 16 * SROW + c0 + np * 16) * 2);
          mma16816<T>(dq[2 * np], a, bb[0], bb[1]);
          mma16816<T>(dq[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dst = static_cast<T*>(p.dq) + out_row(p, b, h, sq) * p.E;
  store_acc<T, DC>(dst, p.or_l * p.E, dq, row0, L, c0, p.E, p.scale, p.scale, lane);
}

// ------------------------------------------------------------------------------------------
// float32: SIMT FMA kernels (exact float32 products, no tensor cores). A block is 4 warps; a
// warp owns R = 4 rows (queries, or keys in dK/dV) and streams tiles of 32 rows of the other
// side, one per lane: lane = key (query) while computing scores, lane = output column (strided
// by 32) while accumulating. Shared rows read by one lane each use an odd stride (E + 1) to
// avoid bank conflicts; rows read by the whole warp at once are broadcasts.
constexpr int kFR = 4;      // rows per warp
constexpr int kFRows = 16;  // rows per block
constexpr int kFTile = 32;  // streamed rows per tile
constexpr int kFCols = 8;   // accumulator columns per lane (8 * 32 = 256)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Dropout keep bit of (query i0 + r, key n0 + lane) for the forward / dQ SIMT kernels: lanes
// l and l + 16 both compute (row (l >> 2) & 3, 8-key group l & 3); each lane then fetches the byte
// of its (row, group).
__device__ __forceinline__ void f32_keep_rows(const Dropout& d, uint32_t bh, int i0, int n0,
                                              int lane, bool (&keep)[kFR]) {
  const uint32_t mine = dropout_keep8(d.seed, d.offset, bh, uint32_t(i0 + ((lane >> 2) & 3)),
                                      uint32_t((n0 >> 3) + (lane & 3)), d.thresh);
#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    const uint32_t byte = __shfl_sync(0xffffffffu, mine, r * 4 + (lane >> 3));
    keep[r] = (byte >> (lane & 7)) & 1u;
  }
}

__global__ void __launch_bounds__(kThreads) attn_fwd_f32(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = p.E, Ev = p.Ev, KS = E + 1;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][E]
  float* sK = sQ + kFRows * E;                     // [32][E + 1]
  float* sV = sK + kFTile * KS;                    // [32][Ev]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.x, b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hk);
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kFRows;
  if (m0 >= L) return;  // varlen: past the end of this (shorter) sequence
  const int i0 = m0 + warp * kFR;  // this warp's rows i0 .. i0 + 3
  const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + sq.q0 * p.q_sl;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sl;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sl;
  for (int idx = threadIdx.x; idx < kFRows * E; idx += kThreads) {
    const int r = idx / E, e = idx - r * E, i = m0 + r;
    sQ[idx] = i < L ? qg[i * p.q_sl + e] : 0.f;
  }
  const Band bd = band_of(p, L, S);  // the key tiles of rows [m0, min(L, m0 + kFRows))
  const int tile0 = bd.key_begin(m0) / kFTile;
  const int ntiles = max(0, (bd.key_end(min(L, m0 + kFRows), S) + kFTile - 1) / kFTile - tile0);
  const MaskView mv = mask_view(p, b, h);
  const Dropout drop = load_dropout(p);

  float acc[kFR][kFCols];
#pragma unroll
  for (int r = 0; r < kFR; ++r)
#pragma unroll
    for (int c = 0; c < kFCols; ++c) acc[r][c] = 0.f;
  float m_run[kFR], l_run[kFR];
#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }

  for (int it = 0; it < ntiles; ++it) {
    const int n0 = (tile0 + it) * kFTile;
    __syncthreads();  // the previous tile is consumed (and sQ is written, first time)
    for (int idx = threadIdx.x; idx < kFTile * E; idx += kThreads) {
      const int r = idx / E, e = idx - r * E, j = n0 + r;
      sK[r * KS + e] = j < S ? kg[j * p.k_sl + e] : 0.f;
    }
    for (int idx = threadIdx.x; idx < kFTile * Ev; idx += kThreads) {
      const int r = idx / Ev, e = idx - r * Ev, j = n0 + r;
      sV[idx] = j < S ? vg[j * p.v_sl + e] : 0.f;
    }
    __syncthreads();

    float s[kFR] = {0.f, 0.f, 0.f, 0.f};
    const float* kr = sK + lane * KS;
    const float* qr = sQ + warp * kFR * E;
    for (int e = 0; e < E; ++e) {
      const float kv = kr[e];
#pragma unroll
      for (int r = 0; r < kFR; ++r) s[r] = fmaf(qr[r * E + e], kv, s[r]);
    }
    const int j = n0 + lane;
    const bool edge = p.mask_kind != kMaskNone || n0 + kFTile > S ||
                      !bd.covers(i0, i0 + kFR, n0, n0 + kFTile);
    bool keep[kFR] = {true, true, true, true};
    if (drop.on) f32_keep_rows(drop, uint32_t(bh), i0, n0, lane, keep);
    float pr[kFR];
    if (p.softcap > 0.f) {
      float unused;
#pragma unroll
      for (int r = 0; r < kFR; ++r) s[r] = cap2(p, s[r], unused);
    } else {
#pragma unroll
      for (int r = 0; r < kFR; ++r) s[r] *= p.scale_log2;
    }
#pragma unroll
    for (int r = 0; r < kFR; ++r) {
      const float s2 = mask2(L, S, bd, mv, edge, s[r], i0 + r, j);
      const float mx = fmaxf(warp_max(s2), m_run[r]);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m_run[r] - base);
      m_run[r] = mx;
      l_run[r] *= alpha;
#pragma unroll
      for (int c = 0; c < kFCols; ++c) acc[r][c] *= alpha;
      const float e2 = exp2f(s2 - base);
      l_run[r] += e2;
      pr[r] = keep[r] ? e2 : 0.f;
    }
    for (int jj = 0; jj < kFTile; ++jj) {
      float pj[kFR];
#pragma unroll
      for (int r = 0; r < kFR; ++r) pj[r] = __shfl_sync(0xffffffffu, pr[r], jj);
      const float* vr = sV + jj * Ev;
#pragma unroll
      for (int c = 0; c < kFCols; ++c) {
        const int e = lane + 32 * c;
        if (e < Ev) {
          const float vv = vr[e];
#pragma unroll
          for (int r = 0; r < kFR; ++r) acc[r][c] = fmaf(pj[r], vv, acc[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    const int i = i0 + r;
    const float l = warp_sum(l_run[r]);
    if (i >= L) continue;
    const float mul = l > 0.f ? drop.scale / l : 0.f;
    float* o = static_cast<float*>(p.out) + (out_row(p, b, h, sq) + i * p.or_l) * Ev;
#pragma unroll
    for (int c = 0; c < kFCols; ++c) {
      const int e = lane + 32 * c;
      if (e < Ev) o[e] = acc[r][c] * mul;
    }
    if (lane == 0)
      p.lse[lse_row(p, b, h, sq) + i] = l > 0.f ? m_run[r] * kLn2 + logf(l) : INFINITY;
  }
}

__global__ void __launch_bounds__(kThreads) attn_bwd_dq_f32(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = p.E, Ev = p.Ev, KS = E + 1, VS = Ev + 1;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][E]
  float* sdO = sQ + kFRows * E;                    // [16][Ev]
  float* sK = sdO + kFRows * Ev;                   // [32][E + 1]
  float* sV = sK + kFTile * KS;                    // [32][Ev + 1]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.x, b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hk);
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kFRows;
  if (m0 >= L) return;  // varlen: past the end of this (shorter) sequence
  const int i0 = m0 + warp * kFR;
  const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + sq.q0 * p.q_sl;
  const float* dg = static_cast<const float*>(p.dout) + b * p.do_sb + h * p.do_sh + sq.q0 * p.do_sl;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sl;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sl;
  for (int idx = threadIdx.x; idx < kFRows * E; idx += kThreads) {
    const int r = idx / E, e = idx - r * E, i = m0 + r;
    sQ[idx] = i < L ? qg[i * p.q_sl + e] : 0.f;
  }
  for (int idx = threadIdx.x; idx < kFRows * Ev; idx += kThreads) {
    const int r = idx / Ev, e = idx - r * Ev, i = m0 + r;
    sdO[idx] = i < L ? dg[i * p.do_sl + e] : 0.f;
  }
  const Band bd = band_of(p, L, S);  // the key tiles of rows [m0, min(L, m0 + kFRows))
  const int tile0 = bd.key_begin(m0) / kFTile;
  const int ntiles = max(0, (bd.key_end(min(L, m0 + kFRows), S) + kFTile - 1) / kFTile - tile0);
  const MaskView mv = mask_view(p, b, h);
  const Dropout drop = load_dropout(p);
  float lse2[kFR], dlt[kFR];
#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    const int i = i0 + r;
    const bool in = i < L;
    lse2[r] = in ? p.lse[lse_row(p, b, h, sq) + i] * kLog2e : INFINITY;
    dlt[r] = in ? p.delta[lse_row(p, b, h, sq) + i] : 0.f;
  }
  float dq[kFR][kFCols];
#pragma unroll
  for (int r = 0; r < kFR; ++r)
#pragma unroll
    for (int c = 0; c < kFCols; ++c) dq[r][c] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    const int n0 = (tile0 + it) * kFTile;
    __syncthreads();
    for (int idx = threadIdx.x; idx < kFTile * E; idx += kThreads) {
      const int r = idx / E, e = idx - r * E, j = n0 + r;
      sK[r * KS + e] = j < S ? kg[j * p.k_sl + e] : 0.f;
    }
    for (int idx = threadIdx.x; idx < kFTile * Ev; idx += kThreads) {
      const int r = idx / Ev, e = idx - r * Ev, j = n0 + r;
      sV[r * VS + e] = j < S ? vg[j * p.v_sl + e] : 0.f;
    }
    __syncthreads();

    float s[kFR] = {0.f, 0.f, 0.f, 0.f}, dp[kFR] = {0.f, 0.f, 0.f, 0.f};
    {
      const float* kr = sK + lane * KS;
      const float* qr = sQ + warp * kFR * E;
      for (int e = 0; e < E; ++e) {
        const float kv = kr[e];
#pragma unroll
        for (int r = 0; r < kFR; ++r) s[r] = fmaf(qr[r * E + e], kv, s[r]);
      }
      const float* vr = sV + lane * VS;
      const float* dr = sdO + warp * kFR * Ev;
      for (int e = 0; e < Ev; ++e) {
        const float vv = vr[e];
#pragma unroll
        for (int r = 0; r < kFR; ++r) dp[r] = fmaf(dr[r * Ev + e], vv, dp[r]);
      }
    }
    const int j = n0 + lane;
    const bool edge = p.mask_kind != kMaskNone || n0 + kFTile > S ||
                      !bd.covers(i0, i0 + kFR, n0, n0 + kFTile);
    bool keep[kFR] = {true, true, true, true};
    if (drop.on) f32_keep_rows(drop, uint32_t(bh), i0, n0, lane, keep);
    float ds[kFR];
#pragma unroll
    for (int r = 0; r < kFR; ++r) {
      float dcap;
      const float pr = exp2f(logit2(p, L, S, bd, mv, edge, s[r], i0 + r, j, dcap) - lse2[r]);
      const float d = drop.on ? (keep[r] ? dp[r] * drop.scale : 0.f) : dp[r];
      ds[r] = pr * (d - dlt[r]) * dcap;
    }
    for (int jj = 0; jj < kFTile; ++jj) {
      float dsj[kFR];
#pragma unroll
      for (int r = 0; r < kFR; ++r) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
      const float* kr = sK + jj * KS;
#pragma unroll
      for (int c = 0; c < kFCols; ++c) {
        const int e = lane + 32 * c;
        if (e < E) {
          const float kv = kr[e];
#pragma unroll
          for (int r = 0; r < kFR; ++r) dq[r][c] = fmaf(dsj[r], kv, dq[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    const int i = i0 + r;
    if (i >= L) continue;
    float* o = static_cast<float*>(p.dq) + (out_row(p, b, h, sq) + i * p.or_l) * E;
#pragma unroll
    for (int c = 0; c < kFCols; ++c) {
      const int e = lane + 32 * c;
      if (e < E) o[e] = dq[r][c] * p.scale;
    }
  }
}

__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_f32(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = p.E, Ev = p.Ev, QS = E + 1, OS = Ev + 1;
  float* sK = reinterpret_cast<float*>(smem_raw);  // [16][E]
  float* sV = sK + kFRows * E;                     // [16][Ev]
  float* sQ = sV + kFRows * Ev;                    // [32][E + 1]
  float* sdO = sQ + kFTile * QS;                   // [32][Ev + 1]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bhk = blockIdx.x, b = bhk / p.Hk, hk = bhk - b * p.Hk;
  const Seq sq = seq_of(p, b);
  const int L = sq.L, S = sq.S;
  const int G = p.Hq / p.Hk;
  const int kb0 = blockIdx.y * kFRows;
  if (kb0 >= S) return;  // varlen: past the end of this (shorter) sequence
  const int kw0 = kb0 + warp * kFR;  // this warp's keys kw0 .. kw0 + 3 (one 8-key group)
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sl;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sl;
  for (int idx = threadIdx.x; idx < kFRows * E; idx += kThreads) {
    const int r = idx / E, e = idx - r * E, j = kb0 + r;
    sK[idx] = j < S ? kg[j * p.k_sl + e] : 0.f;
  }
  for (int idx = threadIdx.x; idx < kFRows * Ev; idx += kThreads) {
    const int r = idx / Ev, e = idx - r * Ev, j = kb0 + r;
    sV[idx] = j < S ? vg[j * p.v_sl + e] : 0.f;
  }
  const Band bd = band_of(p, L, S);  // the query tiles attending keys [kb0, kb_end)
  const int kb_end = min(S, kb0 + kFRows);
  const int mt_begin = bd.query_begin(kb0) / kFTile;
  const int mt_end = (bd.query_end(kb_end, L) + kFTile - 1) / kFTile;
  const Dropout drop = load_dropout(p);

  float dk[kFR][kFCols], dv[kFR][kFCols];
#pragma unroll
  for (int r = 0; r < kFR; ++r)
#pragma unroll
    for (int c = 0; c < kFCols; ++c) dk[r][c] = dv[r][c] = 0.f;

  for (int hh = 0; hh < G; ++hh) {
    const int h = hk * G + hh;
    const int bh = b * p.Hq + h;  // the query head
    const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + sq.q0 * p.q_sl;
    const float* dg =
        static_cast<const float*>(p.dout) + b * p.do_sb + h * p.do_sh + sq.q0 * p.do_sl;
    const MaskView mv = mask_view(p, b, h);
    for (int mt = mt_begin; mt < mt_end; ++mt) {
      const int m0 = mt * kFTile;
      __syncthreads();  // the previous tile is consumed (and sK, sV are written, first time)
      for (int idx = threadIdx.x; idx < kFTile * E; idx += kThreads) {
        const int r = idx / E, e = idx - r * E, i = m0 + r;
        sQ[r * QS + e] = i < L ? qg[i * p.q_sl + e] : 0.f;
      }
      for (int idx = threadIdx.x; idx < kFTile * Ev; idx += kThreads) {
        const int r = idx / Ev, e = idx - r * Ev, i = m0 + r;
        sdO[r * OS + e] = i < L ? dg[i * p.do_sl + e] : 0.f;
      }
      __syncthreads();

      const int i = m0 + lane;  // this lane's query
      const bool in = i < L;
      const float lse2 = in ? p.lse[lse_row(p, b, h, sq) + i] * kLog2e : INFINITY;
      const float dlt = in ? p.delta[lse_row(p, b, h, sq) + i] : 0.f;
      float s[kFR] = {0.f, 0.f, 0.f, 0.f}, dp[kFR] = {0.f, 0.f, 0.f, 0.f};
      {
        const float* qr = sQ + lane * QS;
        const float* kr = sK + warp * kFR * E;
        for (int e = 0; e < E; ++e) {
          const float qv = qr[e];
#pragma unroll
          for (int r = 0; r < kFR; ++r) s[r] = fmaf(qv, kr[r * E + e], s[r]);
        }
        const float* dr = sdO + lane * OS;
        const float* vr = sV + warp * kFR * Ev;
        for (int e = 0; e < Ev; ++e) {
          const float dv_ = dr[e];
#pragma unroll
          for (int r = 0; r < kFR; ++r) dp[r] = fmaf(dv_, vr[r * Ev + e], dp[r]);
        }
      }
      const bool edge = p.mask_kind != kMaskNone || kb0 + kFRows > S ||
                        !bd.covers(m0, m0 + kFTile, kb0, kb_end) || m0 + kFTile > L;
      // Keys kw0 .. kw0 + 3 share the 8-key group kw0 >> 3 (kw0 is a multiple of 4).
      const uint32_t kbits =
          drop.on ? dropout_keep8(drop.seed, drop.offset, uint32_t(bh), uint32_t(i),
                                  uint32_t(kw0 >> 3), drop.thresh)
                  : 0xffu;
      float pz[kFR], ds[kFR];
#pragma unroll
      for (int r = 0; r < kFR; ++r) {
        float dcap;
        const float pr = exp2f(logit2(p, L, S, bd, mv, edge, s[r], i, kw0 + r, dcap) - lse2);
        const bool keep = (kbits >> ((kw0 & 7) + r)) & 1u;
        const float d = drop.on ? (keep ? dp[r] * drop.scale : 0.f) : dp[r];
        pz[r] = drop.on && !keep ? 0.f : pr;
        ds[r] = pr * (d - dlt) * dcap;
      }
      for (int ii = 0; ii < kFTile; ++ii) {
        float pi[kFR], si[kFR];
#pragma unroll
        for (int r = 0; r < kFR; ++r) {
          pi[r] = __shfl_sync(0xffffffffu, pz[r], ii);
          si[r] = __shfl_sync(0xffffffffu, ds[r], ii);
        }
        const float* qr = sQ + ii * QS;
        const float* dr = sdO + ii * OS;
#pragma unroll
        for (int c = 0; c < kFCols; ++c) {
          const int e = lane + 32 * c;
          if (e < Ev) {
            const float x = dr[e];
#pragma unroll
            for (int r = 0; r < kFR; ++r) dv[r][c] = fmaf(pi[r], x, dv[r][c]);
          }
          if (e < E) {
            const float x = qr[e];
#pragma unroll
            for (int r = 0; r < kFR; ++r) dk[r][c] = fmaf(si[r], x, dk[r][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kFR; ++r) {
    const int j = kw0 + r;
    if (j >= S) continue;
    float* ok = static_cast<float*>(p.dk) + (kv_row_of(p, b, hk, sq) + j * p.kr_l) * E;
    float* ov = static_cast<float*>(p.dv) + (kv_row_of(p, b, hk, sq) + j * p.kr_l) * Ev;
#pragma unroll
    for (int c = 0; c < kFCols; ++c) {
      const int e = lane + 32 * c;
      if (e < E) ok[e] = dk[r][c] * p.scale;
      if (e < Ev) ov[e] = dv[r][c] * drop.scale;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

// Lets `kernel` use `bytes` of dynamic shared memory on `device` (once per kernel and device).
template <typename K>
void allow_smem(const char* who, K* kernel, size_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> done;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto it = done.find(key);
  if (it != done.end() && it->second >= bytes) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= size_t(optin), who, ": these head dims need ", bytes,
              " bytes of shared memory per block, but this GPU allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done[key] = bytes;
}

int padded_dim(int64_t e) { return e <= 64 ? 64 : (e <= 128 ? 128 : 256); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}, std::integral_constant<int, D>{}) for the 16-bit dtype and padded dim D.
template <typename F>
void dispatch_mma(at::ScalarType st, int D, F&& f) {
  auto by_dim = [&](auto tag) {
    if (D == 64) f(tag, std::integral_constant<int, 64>{});
    else if (D == 128) f(tag, std::integral_constant<int, 128>{});
    else f(tag, std::integral_constant<int, 256>{});
  };
  if (st == at::kHalf) by_dim(Tag<__half>{});
  else by_dim(Tag<__nv_bfloat16>{});
}

// A view of `t` the 16-byte copies can read: base and the strides of dims 0-2 (of extent > 1)
// multiples of 16 bytes, last dim contiguous; otherwise a contiguous copy (fresh, so aligned).
at::Tensor mma_ready(const at::Tensor& t) {
  const int64_t el = t.element_size();
  bool ok = t.stride(3) == 1 && aligned16(t.const_data_ptr());
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || (t.stride(d) * el) % 16 == 0);
  if (ok) return t;
  return t.is_contiguous() ? t.clone(at::MemoryFormat::Contiguous) : t.contiguous();
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(3) == 1 ? t : t.contiguous();
}

// The CUDA kernels' one extra rule (the Python face checks it first, in the same words).
void check_head_dims(const char* who, int64_t E, int64_t Ev) {
  TORCH_CHECK(E % 8 == 0 && Ev % 8 == 0, who,
              ": the cuda backend supports head dims that are multiples of 8 up to ",
              kAttentionMaxHeadDim, ", got query/key ", E, " and value ", Ev);
}

// Fills the fields shared by forward and backward.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask,
                       const std::optional<at::Tensor>& rng, double dropout_p, bool is_causal,
                       double scale) {
  AttnParams p;
  std::memset(&p, 0, sizeof(p));
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.B = int(q.size(0));
  p.Hq = int(q.size(1));
  p.Hk = int(k.size(1));
  p.L = int(q.size(2));
  p.S = int(k.size(2));
  p.E = int(q.size(3));
  p.Ev = int(v.size(3));
  // Dense output layouts: out / dq (B, Hq, L, *), lse / delta (B, Hq, L), dk / dv (B, Hk, S, *).
  p.or_b = int64_t(p.Hq) * p.L, p.or_h = p.L, p.or_l = 1;
  p.lr_b = int64_t(p.Hq) * p.L, p.lr_h = p.L;
  p.kr_b = int64_t(p.Hk) * p.S, p.kr_h = p.S, p.kr_l = 1;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.win_left = -1;  // the plain op; set_options below for the rest
  p.win_right = is_causal ? 0 : -1;
  p.mask_kind = kMaskNone;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    p.mask = m.const_data_ptr();
    p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sl = m.stride(2), p.m_ss = m.stride(3);
    switch (m.scalar_type()) {
      case at::kBool: p.mask_kind = kMaskBool; break;
      case at::kFloat: p.mask_kind = kMaskF32; break;
      case at::kHalf: p.mask_kind = kMaskF16; break;
      default: p.mask_kind = kMaskBF16; break;
    }
  }
  p.thresh = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0u;
  p.drop_scale = dropout_scale(p.thresh);  // 1 when thresh == 0
  if (p.thresh > 0) {
    p.rng = rng->const_data_ptr<int64_t>();
    p.rng_stride = rng->stride(0);
  }
  return p;
}

void check_sizes(const char* who, const at::Tensor& q, const at::Tensor& k) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(q.size(2) < kMax && k.size(2) < kMax, who,
              ": query and key lengths must be below 2^31, got ", q.size(2), " and ", k.size(2));
  TORCH_CHECK(q.size(0) * q.size(1) < kMax, who,
              ": batch * heads must be below 2^31, got ", q.size(0) * q.size(1));
}

dim3 grid_of(const char* who, int64_t xblocks, int64_t yblocks) {
  TORCH_CHECK(xblocks <= std::numeric_limits<int32_t>::max() && yblocks <= 65535, who,
              ": the problem is too large for one launch (", xblocks, " x ", yblocks,
              " blocks; at most 2^31-1 x 65535)");
  return dim3(unsigned(xblocks), unsigned(yblocks));
}

// One launch of an attention kernel on p: a gx x gy grid of kThreads-thread blocks with `smem`
// bytes of dynamic shared memory.
template <typename K>
void launch(const char* who, K* kernel, int64_t gx, int64_t gy, size_t smem, int device,
            cudaStream_t stream, const AttnParams& p) {
  allow_smem(who, kernel, smem, device);
  kernel<<<grid_of(who, gx, gy), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the forward kernels on p (inputs, out, lse and their layouts filled in): B (batches
// or sequences) x Hq x p.L query rows.
void launch_fwd(const char* who, AttnParams& p, at::ScalarType st, int64_t B, int device,
                cudaStream_t stream) {
  const int64_t Hq = p.Hq;
  if (st == at::kFloat) {
    p.nchunk = 1;
    const size_t smem = sizeof(float) * size_t(kFRows * p.E + kFTile * (p.E + 1) + kFTile * p.Ev);
    launch(who, attn_fwd_f32, B * Hq, (p.L + kFRows - 1) / kFRows, smem, device, stream, p);
    return;
  }
  dispatch_mma(st, padded_dim(std::max(p.E, p.Ev)), [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    using C = Cfg<D>;
    p.nchunk = (p.Ev + C::FWD_DC - 1) / C::FWD_DC;
    launch(who, attn_fwd_mma<T, D>, B * Hq * p.nchunk, (p.L + C::FWD_BM - 1) / C::FWD_BM,
           C::fwd_smem(sizeof(T)), device, stream, p);
  });
}

// D = rowsum(dO * O) into delta (lse's layout): dense (B, Hq, L) with out (B, Hq, L, Ev), or
// packed (Hq, total_q) with dO, out (total_q, Hq, Ev).
void launch_delta(const char* who, const at::Tensor& dO, const at::Tensor& o, at::Tensor& delta,
                  bool packed, cudaStream_t stream) {
  const int64_t Hq = dO.size(1);  // (B, Hq, L, Ev) or packed (total_q, Hq, Ev)
  const int64_t L = packed ? dO.size(0) : dO.size(2), Ev = o.size(-1);
  const int64_t rows = delta.numel();
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), who, ": too many rows (", rows, ")");
  const int64_t sb = packed ? 0 : dO.stride(0), sh = dO.stride(1);
  const int64_t sl = packed ? dO.stride(0) : dO.stride(2);
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    attn_bwd_delta<T><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(dO.const_data_ptr()), sb, sh, sl,
        static_cast<const T*>(o.const_data_ptr()), delta.mutable_data_ptr<float>(), int(Hq),
        int(L), int(Ev), rows, packed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dO.scalar_type() == at::kFloat) run(Tag<float>{});
  else if (dO.scalar_type() == at::kHalf) run(Tag<__half>{});
  else run(Tag<__nv_bfloat16>{});
}

// Launches the dK/dV and dQ kernels on p (everything filled in, delta computed): B x Hk key
// heads of p.S keys and B x Hq query heads of p.L queries.
void launch_bwd(const char* who, AttnParams& p, at::ScalarType st, int64_t B, int device,
                cudaStream_t stream) {
  const int64_t Hq = p.Hq, Hk = p.Hk;
  if (st == at::kFloat) {
    p.nchunk = 1;
    const size_t smem = sizeof(float) * size_t(kFRows * (p.E + p.Ev) +
                                               kFTile * (p.E + 1 + p.Ev + 1));
    launch(who, attn_bwd_dkdv_f32, B * Hk, (p.S + kFRows - 1) / kFRows, smem, device, stream, p);
    launch(who, attn_bwd_dq_f32, B * Hq, (p.L + kFRows - 1) / kFRows, smem, device, stream, p);
    return;
  }
  dispatch_mma(st, padded_dim(std::max(p.E, p.Ev)), [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    using C = Cfg<D>;
    p.nchunk = (std::max(p.E, p.Ev) + C::DC - 1) / C::DC;
    launch(who, attn_bwd_dkdv_mma<T, D>, B * Hk * p.nchunk, (p.S + C::KV_BN - 1) / C::KV_BN,
           C::dkdv_smem(sizeof(T)), device, stream, p);
    p.nchunk = (p.E + C::DQ_DC - 1) / C::DQ_DC;
    launch(who, attn_bwd_dq_mma<T, D>, B * Hq * p.nchunk, (p.L + C::DQ_BM - 1) / C::DQ_BM,
           C::dq_smem(sizeof(T)), device, stream, p);
  });
}

// The options after scale (docs/attention.md, "Causal, windows, soft-capping"), checked and
// resolved into p: causal folded into the window's right bound, bounds past 2^31 - 1 (beyond
// any length) clamped, the soft-cap's constants.
struct Options {
  int64_t window_left, window_right;
  bool lower_right;
  double softcap;
};

void set_options(const char* who, AttnParams& p, bool is_causal, const Options& o) {
  attn_check_opts(who, o.window_left, o.window_right, o.softcap);
  constexpr int64_t kBig = std::numeric_limits<int32_t>::max();
  int64_t right = o.window_right;
  if (is_causal) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
  p.win_left = int(std::min(o.window_left, kBig));
  p.win_right = int(std::min(right, kBig));
  p.lower_right = o.lower_right;
  p.softcap = float(o.softcap);
  if (o.softcap > 0.0) {
    p.cap_in = float(double(p.scale) / o.softcap);
    p.cap_out2 = float(o.softcap * 1.4426950408889634);
  }
}

// Whether p is what the sm_90a kernels compute (their table has no window, lower-right
// diagonal or soft-cap yet): no bound, or causal with the top-left diagonal (the diagonals
// coincide when L == S); then *causal says which.
bool sm90_plain(const AttnParams& p, bool* causal) {
  if (p.softcap > 0.f || p.win_left >= 0) return false;
  if (p.win_right < 0) return *causal = false, true;
  if (p.win_right == 0 && (!p.lower_right || p.L == p.S)) return *causal = true, true;
  return false;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& query,
                                                      const at::Tensor& key,
                                                      const at::Tensor& value,
                                                      const std::optional<at::Tensor>& mask,
                                                      const std::optional<at::Tensor>& rng,
                                                      double dropout_p, bool is_causal,
                                                      double scale, int64_t window_left,
                                                      int64_t window_right, bool lower_right,
                                                      double softcap) {
  const char* who = kFwd;
  attn_check_fwd(who, query, key, value, mask, rng, dropout_p, is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  check_head_dims(who, query.size(3), value.size(3));
  check_sizes(who, query, key);
  c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), S = key.size(2);
  const int64_t Ev = value.size(3);
  at::Tensor out = at::empty({B, Hq, L, Ev}, query.options());
  at::Tensor lse = at::empty({B, Hq, L}, query.options().dtype(at::kFloat));
  if (B * Hq * L == 0) return {out, lse};
  if (S == 0) {  // every row is empty
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }
  const bool f32 = query.scalar_type() == at::kFloat;
  const at::Tensor q = f32 ? query : mma_ready(query);
  const at::Tensor k = f32 ? key : mma_ready(key);
  const at::Tensor v = f32 ? value : mma_ready(value);
  AttnParams p = make_params(q, k, v, mask, rng, dropout_p, is_causal, scale);
  set_options(who, p, is_causal, {window_left, window_right, lower_right, softcap});
  // Hopper: the sm_90a kernels where their table (attention_sm90.cu) admits the problem.
  bool causal90 = false;
  if (!f32 && sm90_plain(p, &causal90) &&
      attention_fwd_sm90(q, k, v, mask, rng, dropout_p, causal90, scale, out, lse))
    return {out, lse};
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  launch_fwd(who, p, q.scalar_type(), B, q.get_device(), c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng,
    double dropout_p, bool is_causal, double scale, int64_t window_left, int64_t window_right,
    bool lower_right, double softcap) {
  const char* who = kBwd;
  attn_check_bwd(who, grad_out, query, key, value, out, lse, mask, rng, dropout_p, is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  check_head_dims(who, query.size(3), value.size(3));
  check_sizes(who, query, key);
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), S = key.size(2);
  const int64_t E = query.size(3), Ev = value.size(3);
  c10::cuda::CUDAGuard guard(query.device());
  at::Tensor dq = at::empty({B, Hq, L, E}, query.options());
  at::Tensor dk = at::empty({B, key.size(1), S, E}, key.options());
  at::Tensor dv = at::empty({B, key.size(1), S, Ev}, value.options());
  if (B * Hq * L == 0 || S == 0) {  // no scores: every gradient is 0 (or empty)
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const bool f32 = query.scalar_type() == at::kFloat;
  const at::Tensor q = f32 ? query : mma_ready(query);
  const at::Tensor k = f32 ? key : mma_ready(key);
  const at::Tensor v = f32 ? value : mma_ready(value);
  const at::Tensor dO = f32 ? last_dim_contiguous(grad_out) : mma_ready(grad_out);
  const at::Tensor o = out.contiguous();
  const at::Tensor ls = lse.contiguous();
  at::Tensor delta = at::empty({B, Hq, L}, query.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_delta(who, dO, o, delta, /*packed=*/false, stream);
  AttnParams p = make_params(q, k, v, mask, rng, dropout_p, is_causal, scale);
  set_options(who, p, is_causal, {window_left, window_right, lower_right, softcap});
  // Hopper: the sm_90a kernels where their table (attention_sm90.cu) admits the problem.
  bool causal90 = false;
  if (!f32 && sm90_plain(p, &causal90) &&
      attention_bwd_sm90(dO, q, k, v, ls, delta, mask, rng, dropout_p, causal90, scale, dq, dk,
                         dv))
    return {dq, dk, dv};

  p.dout = dO.const_data_ptr();
  p.do_sb = dO.stride(0), p.do_sh = dO.stride(1), p.do_sl = dO.stride(2);
  p.lse = const_cast<float*>(ls.const_data_ptr<float>());  // read only in the backward
  p.delta = delta.const_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  launch_bwd(who, p, q.scalar_type(), B, q.get_device(), stream);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------
// Varlen: the packed q (total_q, Hq, E), k, v (total_k, Hk, *) as the dense views (1, H, total,
// *), B = the number of sequences, L / S = max_seqlen_q / _k (the grid), each block reading its
// sequence's rows from the offsets on the device. The offsets are not read on the host (no
// sync): the Python face checks them, and the kernels clamp them into [0, total], so
// inconsistent offsets cannot reach outside the tensors (rows past a too-small max_seqlen are
// left uncomputed, as docs/attention.md says).
struct VarlenParams {
  at::Tensor cu_q, cu_k;  // int32 contiguous, alive while p points into them
  AttnParams p;
};

VarlenParams make_varlen(const char* who, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         int64_t max_q, int64_t max_k, const std::optional<at::Tensor>& rng,
                         double dropout_p, bool is_causal, double scale) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q < kMax && max_k < kMax, who,
              ": max_seqlen_q and max_seqlen_k must be in [0, 2^31), got ", max_q, " and ",
              max_k);
  TORCH_CHECK(q.size(0) < kMax && k.size(0) < kMax, who,
              ": packed lengths must fit in int32, got ", q.size(0), " and ", k.size(0));
  TORCH_CHECK(cu_q.numel() * q.size(1) < kMax, who, ": sequences * heads must be below 2^31");
  VarlenParams V;
  V.cu_q = cu_q.to(at::kInt).contiguous();
  V.cu_k = cu_k.to(at::kInt).contiguous();
  AttnParams& p = V.p;
  p = make_params(as_4d(q), as_4d(k), as_4d(v), std::nullopt, rng, dropout_p, is_causal, scale);
  const int64_t Tq = q.size(0), Tk = k.size(0), Hq = q.size(1), Hk = k.size(1);
  p.B = int(cu_q.numel() - 1);
  p.L = int(max_q);
  p.S = int(max_k);
  p.Tq = int(Tq);
  p.Tk = int(Tk);
  p.cu_q = V.cu_q.const_data_ptr<int32_t>();
  p.cu_k = V.cu_k.const_data_ptr<int32_t>();
  p.q_sb = p.k_sb = p.v_sb = 0;
  // out, dq (total_q, Hq, *); lse, delta (Hq, total_q); dk, dv (total_k, Hk, *).
  p.or_b = 0, p.or_h = 1, p.or_l = Hq;
  p.lr_b = 0, p.lr_h = Tq;
  p.kr_b = 0, p.kr_h = 1, p.kr_l = Hk;
  return V;
}

// A packed operand the kernels can read, kept 3-D: float32 with a unit last stride; 16-bit
// ready for the 16-byte copies (see mma_ready).
at::Tensor varlen_ready(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t.stride(2) == 1 ? t : t.contiguous();
  return mma_ready(as_4d(t)).squeeze(0).transpose(0, 1);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
    const std::optional<at::Tensor>& rng, double dropout_p, bool is_causal, double scale,
    int64_t window_left, int64_t window_right, bool lower_right, double softcap) {
  const char* who = "fastlm.varlen_attention_fwd";
  varlen_check(who, query, key, value, cu_q, cu_k, rng, dropout_p, is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  check_head_dims(who, query.size(2), value.size(2));
  c10::cuda::CUDAGuard guard(query.device());
  const int64_t Tq = query.size(0), Hq = query.size(1), Ev = value.size(2);
  at::Tensor out = at::empty({Tq, Hq, Ev}, query.options());
  at::Tensor lse = at::empty({Hq, Tq}, query.options().dtype(at::kFloat));
  if (Tq * Hq == 0) return {out, lse};
  const at::Tensor q = varlen_ready(query), k = varlen_ready(key), v = varlen_ready(value);
  VarlenParams V = make_varlen(who, q, k, v, cu_q, cu_k, max_q, max_k, rng, dropout_p,
                               is_causal, scale);
  if (max_k == 0 || max_q == 0) {  // no keys anywhere (or no query rows the grid could cover)
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }
  AttnParams& p = V.p;
  set_options(who, p, is_causal, {window_left, window_right, lower_right, softcap});
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  launch_fwd(who, p, q.scalar_type(), p.B, q.get_device(), c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
    const std::optional<at::Tensor>& rng, double dropout_p, bool is_causal, double scale,
    int64_t window_left, int64_t window_right, bool lower_right, double softcap) {
  const char* who = "fastlm.varlen_attention_bwd";
  varlen_check_bwd(who, grad_out, query, key, value, out, lse, cu_q, cu_k, rng, dropout_p,
                   is_causal);
  attn_check_opts(who, window_left, window_right, softcap);
  check_head_dims(who, query.size(2), value.size(2));
  c10::cuda::CUDAGuard guard(query.device());
  at::Tensor dq = at::empty(query.sizes(), query.options());
  at::Tensor dk = at::empty(key.sizes(), key.options());
  at::Tensor dv = at::empty(value.sizes(), value.options());
  const int64_t Tq = query.size(0), Hq = query.size(1);
  if (Tq * Hq == 0 || key.size(0) == 0 || max_q == 0 || max_k == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const bool f32 = query.scalar_type() == at::kFloat;
  const at::Tensor q = varlen_ready(query), k = varlen_ready(key), v = varlen_ready(value);
  const at::Tensor dO = varlen_ready(grad_out);
  const at::Tensor o = out.contiguous();
  const at::Tensor ls = lse.contiguous();
  at::Tensor delta = at::empty({Hq, Tq}, query.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_delta(who, dO, o, delta, /*packed=*/true, stream);

  VarlenParams V = make_varlen(who, q, k, v, cu_q, cu_k, max_q, max_k, rng, dropout_p,
                               is_causal, scale);
  AttnParams& p = V.p;
  set_options(who, p, is_causal, {window_left, window_right, lower_right, softcap});
  p.dout = dO.const_data_ptr();
  p.do_sb = 0, p.do_sh = dO.stride(1), p.do_sl = dO.stride(0);
  p.lse = const_cast<float*>(ls.const_data_ptr<float>());  // read only in the backward
  p.delta = delta.const_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  launch_bwd(who, p, q.scalar_type(), p.B, q.get_device(), stream);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd", &cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &cuda::attention_bwd_cuda);
  m.impl("varlen_attention_fwd", &cuda::varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &cuda::varlen_attention_bwd_cuda);
}

}  // namespace fastlm
