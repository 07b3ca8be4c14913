// LayerNorm on CUDA: forward, backward, and the deterministic dweight/dbias reduce.
//
// Layout: a row of N elements is owned by TX threads (threadIdx.x, a multiple of 32); a block
// holds TY rows (threadIdx.y). Each thread moves VEC elements per 16-byte access.
//
// Register kernels (ITEMS vectors per thread, the whole row lives in registers):
//   forward:  read x once; mu = sum(x)/N; var = sum((x-mu)^2)/N from registers (two-pass,
//             exact for large means); y = (x-mu)*rstd*w + b; mean, rstd stored in float32.
//   backward: xhat = (x-mu)*rstd, g = dy*w;  a = sum(g*xhat)/N, c = sum(g)/N;
//             dx = rstd*(g - c - xhat*a);  dw += dy*xhat, db += dy, kept in registers across the
//             rows a block visits (grid-stride over row groups), then written once as one
//             partial row per (block, ty). No atomics.
// Loop kernels (rows too long for registers, or N not a multiple of VEC / unaligned data):
//   the same math, re-reading the row from global memory (L2-resident) for each pass; the
//   backward's partial rows are read-modify-written by the block that owns them.
// Reduce kernel: out[j] = sum over partial rows r of part[r, j], in r order (bit-reproducible).
//
// Fused residual add + dropout (fastlm.add_layer_norm, template flag ADD): the forward reads
// s = round(residual + x * m) (m = scale where kept, else 0; 1 without dropout) instead of x,
// stores it as `summed` and normalizes the rounded values; the backward (x = summed) adds
// grad_summed to dx (= grad_residual) and stores grad_input = dx * m. The keep bits
// (docs/layer_norm.md) are recomputed from rng in both passes: one Philox call per 8 columns.
//
// RMSNorm (fastlm.rms_norm, add_rms_norm) runs on the same kernels with mean == nullptr: no
// centring (mu = 0: the first reduction is skipped), no bias, and no mean(g) term (c = 0).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention.h"  // Philox4x32-10, the dropout threshold/scale (shared with attention)
#include "../layer_norm.h"
#include "common.cuh"

namespace fastlm {
namespace cuda {
namespace {

// Extra arguments of the fused add (ADD); unused otherwise.
struct AddArgs {
  const void* res = nullptr;      // forward: residual (T)
  void* summed = nullptr;         // forward: summed output (T)
  const void* gs = nullptr;       // backward: grad_summed (T), or null
  void* din = nullptr;            // backward: grad_input (T), or null (no dropout)
  const int64_t* rng = nullptr;   // (seed, offset) on the device
  uint32_t thresh = 0;            // 0: no dropout
  float scale = 1.f;
};

// Keep bits (bit q: column j + q) of columns j .. j + VEC - 1 of `row` (VEC divides 8 and j is
// a multiple of VEC, so they come from one Philox call). The (seed, offset) key is read here,
// where it is used (an L1 hit after the first call), rather than held in registers across the
// kernel: that kept the ADD variants from fitting in the registers of the plain ones.
template <int VEC>
__device__ __forceinline__ uint32_t keep_bits(const AddArgs& a, int64_t row, int j) {
  const uint64_t seed = uint64_t(__ldg(a.rng)), offset = uint64_t(__ldg(a.rng + 1));
  const uint32_t keep = dropout_keep8(seed, offset, uint32_t(uint64_t(row) >> 32),
                                      uint32_t(uint64_t(row)), uint32_t(j >> 3), a.thresh);
  return (keep >> (j & 7)) & ((1u << VEC) - 1u);
}

// m[q] = scale where column j + q is kept, else 0.
template <int VEC>
__device__ __forceinline__ void drop_factors(const AddArgs& a, int64_t row, int j,
                                             float (&m)[VEC]) {
  const uint32_t bits = keep_bits<VEC>(a, row, j);
#pragma unroll
  for (int q = 0; q < VEC; ++q) m[q] = ((bits >> q) & 1u) ? a.scale : 0.f;
}

// v (x at columns j..) becomes the rounded s; s is stored to summed. `bits`: the keep bits of
// these columns (used only with dropout).
template <typename T, int VEC>
__device__ __forceinline__ void add_residual(const AddArgs& a, int64_t row, int N, int j,
                                             uint32_t bits, float (&v)[VEC]) {
  float rv[VEC];
  load_f<T, VEC>(static_cast<const T*>(a.res) + row * N + j, rv);
  if (a.thresh) {
#pragma unroll
    for (int q = 0; q < VEC; ++q) v[q] *= ((bits >> q) & 1u) ? a.scale : 0.f;
  }
#pragma unroll
  for (int q = 0; q < VEC; ++q) v[q] = rv[q] + v[q];
  store_f<T, VEC>(static_cast<T*>(a.summed) + row * N + j, v);
#pragma unroll
  for (int q = 0; q < VEC; ++q) v[q] = to_f(from_f<T>(v[q]));
}

// Stores dx (columns j..); with ADD, adds grad_summed first and also stores dx * m to din.
template <typename T, int VEC, bool ADD>
__device__ __forceinline__ void store_dx(T* __restrict dx, const AddArgs& a, int64_t row, int N,
                                         int j, float (&o)[VEC]) {
  if constexpr (ADD) {
    if (a.gs) {
      float g[VEC];
      load_f<T, VEC>(static_cast<const T*>(a.gs) + row * N + j, g);
#pragma unroll
      for (int q = 0; q < VEC; ++q) o[q] += g[q];
    }
  }
  store_f<T, VEC>(dx + row * N + j, o);
  if constexpr (ADD) {
    if (a.din) {
      float m[VEC];
      drop_factors<VEC>(a, row, j, m);
#pragma unroll
      for (int q = 0; q < VEC; ++q) o[q] *= m[q];
      store_f<T, VEC>(static_cast<T*>(a.din) + row * N + j, o);
    }
  }
}

// Thread caps of the register kernels, enforced with __launch_bounds__ so ptxas keeps the
// registers within what a block of that size may use (the planner never exceeds them).
constexpr int kFwdRegMaxThreads = 512;
constexpr int bwd_reg_max_threads(int items) { return items >= 4 ? 256 : 512; }

// ------------------------------------------------------------------------------------------
// Forward, whole row in registers.
template <typename T, int VEC, int ITEMS, bool ADD>
__global__ void __launch_bounds__(kFwdRegMaxThreads) ln_fwd_reg(const T* __restrict x, const void* __restrict w,
                           const void* __restrict b, bool param_f32, T* __restrict y,
                           float* __restrict mean, float* __restrict rstd, int64_t M, int N,
                           float eps, AddArgs a) {
  extern __shared__ float smem[];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < M;  // dead rows still join the block-wide reductions
  const T* xr = x + row * N;
  // Dropout: the keep bits of all ITEMS vectors first, one Philox call at a time (interleaved
  // with the row in registers, the unrolled calls would spill), into one word when they fit.
  using Bits = std::conditional_t<(ITEMS * VEC <= 32), uint32_t, uint64_t>;
  Bits kb = 0;
  if constexpr (ADD) {
    if (a.thresh && live) {
#pragma unroll 1
      for (int i = 0; i < ITEMS; ++i) {
        const int j = (threadIdx.x + i * blockDim.x) * VEC;
        if (j < N) kb |= Bits(keep_bits<VEC>(a, row, j)) << (i * VEC);
      }
    }
  }
  float v[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * VEC;
    if (live && j < N) {
      load_f<T, VEC>(xr + j, v[i]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
    }
  }
  // With ADD, the residual and dropout in a loop of their own: interleaved with the loads of x
  // above, they kept x's row offset live to the end and one register spilled (16-bit, ITEMS 4).
  float s = 0.f, unused = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if constexpr (ADD) {
      const int j = (threadIdx.x + i * blockDim.x) * VEC;
      if (live && j < N) add_residual<T, VEC>(a, row, N, j, uint32_t(kb >> (i * VEC)), v[i]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += v[i][k];
  }
  const bool rms = mean == nullptr;  // uniform across the block
  if (!rms) row_sum2(s, unused, smem);
  const float mu = rms ? 0.f : s / N;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * VEC;
    if (j < N) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[i][k] - mu;
        ss += d * d;
      }
    }
  }
  row_sum2(ss, unused, smem);
  if (!live) return;
  const float rs = rsqrtf(ss / N + eps);
  if (threadIdx.x == 0) {
    if (!rms) mean[row] = mu;
    rstd[row] = rs;
  }
  T* yr = y + row * N;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * VEC;
    if (j < N) {
      float wv[VEC], bv[VEC], o[VEC];
      load_param<T, VEC>(w, param_f32, j, 1.f, wv);
      load_param<T, VEC>(b, param_f32, j, 0.f, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = (v[i][k] - mu) * rs * wv[k] + bv[k];
      store_f<T, VEC>(yr + j, o);
    }
  }
}

// Forward, any row length: one row per block (TY == 1), three passes over the row.
template <typename T, int VEC, bool ADD>
__global__ void ln_fwd_loop(const T* __restrict x, const void* __restrict w,
                            const void* __restrict b, bool param_f32, T* __restrict y,
                            float* __restrict mean, float* __restrict rstd, int N, float eps,
                            AddArgs a) {
  extern __shared__ float smem[];
  const int64_t row = blockIdx.x;
  // With ADD the first pass makes and stores s; the later passes re-read it (each thread
  // reads back only what it wrote).
  const T* xr = ADD ? static_cast<const T*>(a.summed) + row * N : x + row * N;
  float s = 0.f, unused = 0.f;
  for (int j = threadIdx.x * VEC; j < N; j += blockDim.x * VEC) {
    float v[VEC];
    load_f<T, VEC>(x + row * N + j, v);
    if constexpr (ADD)
      add_residual<T, VEC>(a, row, N, j, a.thresh ? keep_bits<VEC>(a, row, j) : 0u, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += v[k];
  }
  const bool rms = mean == nullptr;  // uniform across the block
  if (!rms) row_sum2(s, unused, smem);
  const float mu = rms ? 0.f : s / N;
  float ss = 0.f;
  for (int j = threadIdx.x * VEC; j < N; j += blockDim.x * VEC) {
    float v[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) ss += (v[k] - mu) * (v[k] - mu);
  }
  row_sum2(ss, unused, smem);
  const float rs = rsqrtf(ss / N + eps);
  if (threadIdx.x == 0) {
    if (!rms) mean[row] = mu;
    rstd[row] = rs;
  }
  T* yr = y + row * N;
  for (int j = threadIdx.x * VEC; j < N; j += blockDim.x * VEC) {
    float v[VEC], wv[VEC], bv[VEC];
    load_f<T, VEC>(xr + j, v);
    load_param<T, VEC>(w, param_f32, j, 1.f, wv);
    load_param<T, VEC>(b, param_f32, j, 0.f, bv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mu) * rs * wv[k] + bv[k];
    store_f<T, VEC>(yr + j, v);
  }
}

// ------------------------------------------------------------------------------------------
// Backward, whole row in registers; grid-stride over groups of blockDim.y rows.
// part: [gridDim.x * blockDim.y, N] float32 partial dw, then the same for db (or null).
template <typename T, int VEC, int ITEMS, bool ADD>
__global__ void __launch_bounds__(bwd_reg_max_threads(ITEMS)) ln_bwd_reg(const T* __restrict dy, const T* __restrict x,
                           const float* __restrict mean, const float* __restrict rstd,
                           const void* __restrict w, bool param_f32, T* __restrict dx,
                           float* __restrict part_w, float* __restrict part_b, int64_t M,
                           int N, AddArgs add) {
  extern __shared__ float smem[];
  float dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = db[i][k] = 0.f;
  const int64_t groups = (M + blockDim.y - 1) / blockDim.y;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t row = g * blockDim.y + threadIdx.y;
    const bool live = row < M;
    const float mu = live && mean ? mean[row] : 0.f, rs = live ? rstd[row] : 0.f;
    float xh[ITEMS][VEC], gv[ITEMS][VEC];
    float a = 0.f, c = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = (threadIdx.x + i * blockDim.x) * VEC;
      float dv[VEC], wv[VEC];
      if (live && j < N) {
        load_f<T, VEC>(x + row * N + j, xh[i]);
        load_f<T, VEC>(dy + row * N + j, dv);
        load_param<T, VEC>(w, param_f32, j, 1.f, wv);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[i][k] = dv[k] = wv[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xh[i][k] = (xh[i][k] - mu) * rs;
        gv[i][k] = dv[k] * wv[k];
        a += gv[i][k] * xh[i][k];
        c += gv[i][k];
        dw[i][k] += dv[k] * xh[i][k];
        db[i][k] += dv[k];
      }
    }
    row_sum2(a, c, smem);
    if (live) {
      a /= N;
      c = mean ? c / N : 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int j = (threadIdx.x + i * blockDim.x) * VEC;
        if (j < N) {
          float o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] = rs * (gv[i][k] - c - xh[i][k] * a);
          store_dx<T, VEC, ADD>(dx, add, row, N, j, o);
        }
      }
    }
  }
  if (part_w == nullptr) return;
  const int64_t prow = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * VEC;
    if (j < N) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        part_w[prow * N + j + k] = dw[i][k];
        part_b[prow * N + j + k] = db[i][k];
      }
    }
  }
}

// Backward, any row length: block b handles rows b, b + gridDim.x, ... (TY == 1) and owns
// partial row b, which it read-modify-writes (zeroed by its first row).
template <typename T, int VEC, bool ADD>
__global__ void ln_bwd_loop(const T* __restrict dy, const T* __restrict x,
                            const float* __restrict mean, const float* __restrict rstd,
                            const void* __restrict w, bool param_f32, T* __restrict dx,
                            float* __restrict part_w, float* __restrict part_b, int64_t M,
                            int N, AddArgs add) {
  extern __shared__ float smem[];
  float* pw = part_w ? part_w + int64_t(blockIdx.x) * N : nullptr;
  float* pb = part_b ? part_b + int64_t(blockIdx.x) * N : nullptr;
  bool first = true;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const float mu = mean ? mean[row] : 0.f, rs = rstd[row];
    const T* xr = x + row * N;
    const T* dyr = dy + row * N;
    float a = 0.f, c = 0.f;
    for (int j = threadIdx.x * VEC; j < N; j += blockDim.x * VEC) {
      float xv[VEC], dv[VEC], wv[VEC];
      load_f<T, VEC>(xr + j, xv);
      load_f<T, VEC>(dyr + j, dv);
      load_param<T, VEC>(w, param_f32, j, 1.f, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = dv[k] * wv[k];
        a += g * (xv[k] - mu) * rs;
        c += g;
      }
    }
    row_sum2(a, c, smem);
    a /= N;
    c = mean ? c / N : 0.f;
    for (int j = threadIdx.x * VEC; j < N; j += blockDim.x * VEC) {
      float xv[VEC], dv[VEC], wv[VEC], o[VEC];
      load_f<T, VEC>(xr + j, xv);
      load_f<T, VEC>(dyr + j, dv);
      load_param<T, VEC>(w, param_f32, j, 1.f, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xh = (xv[k] - mu) * rs;
        o[k] = rs * (dv[k] * wv[k] - c - xh * a);
        if (pw) {
          pw[j + k] = (first ? 0.f : pw[j + k]) + dv[k] * xh;
          pb[j + k] = (first ? 0.f : pb[j + k]) + dv[k];
        }
      }
      store_dx<T, VEC, ADD>(dx, add, row, N, j, o);
    }
    first = false;
  }
  if (pw && first) {  // this block had no row: its partial row is zero
    for (int j = threadIdx.x; j < N; j += blockDim.x) pw[j] = pb[j] = 0.f;
  }
}

// out[j] = sum_r part[r, j] in a fixed order (bit-reproducible). blockIdx.y picks the partial
// set (0: dweight into out0, 1: dbias into out1; a null out skips it). Block (32, 16): thread
// (tx, ty) keeps 4 independent running sums over rows ty + 16k (k mod 4), then the block adds
// the 64 subtotals of a column in a fixed order. out_kind: 0 float32, 1 float16, 2 bfloat16.
__global__ void column_sum(const float* __restrict part, int64_t R, int N, void* __restrict out0,
                           void* __restrict out1, int out_kind) {
  __shared__ float s[16][33];
  void* out = blockIdx.y == 0 ? out0 : out1;
  if (out == nullptr) return;  // uniform across the block
  const float* p = part + int64_t(blockIdx.y) * R * N;
  const int j = blockIdx.x * 32 + threadIdx.x;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (j < N) {
    int64_t r = threadIdx.y;
    for (; r + 48 < R; r += 64) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += p[(r + 16 * k) * N + j];
    }
    for (int k = 0; r < R; r += 16, ++k) acc[k & 3] += p[r * N + j];
  }
  s[threadIdx.y][threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  __syncthreads();
  if (threadIdx.y != 0 || j >= N) return;
  float t = 0.f;
#pragma unroll
  for (int q = 0; q < 16; ++q) t += s[q][threadIdx.x];
  if (out_kind == 0) static_cast<float*>(out)[j] = t;
  else if (out_kind == 1) static_cast<__half*>(out)[j] = __float2half_rn(t);
  else static_cast<__nv_bfloat16*>(out)[j] = __float2bfloat16_rn(t);
}

// ------------------------------------------------------------------------------------------
// Launch planning.
struct Plan {
  int vec;    // elements per access (1 when N or the pointers do not allow 16 bytes)
  int items;  // vectors per thread held in registers; 0 = loop kernel
  int tx, ty; // threads per row, rows per block
};

// A register plan: the smallest ITEMS whose row fits in at most 256 threads, else the
// smallest that fits under the kernel's thread cap (cap(items)), else the loop kernel.
template <typename Cap>
Plan plan_rows(int64_t N, int elem_size, bool aligned, int max_items, Cap cap) {
  const int full = 16 / elem_size;
  Plan p{(aligned && N % full == 0) ? full : 1, 0, 0, 1};
  if (p.vec == full) {
    const int64_t nv = N / p.vec;
    for (int pass = 0; pass < 2 && p.items == 0; ++pass) {
      for (int items = 1; items <= max_items; items *= 2) {
        const int64_t tx = ((nv + items - 1) / items + 31) / 32 * 32;
        if (tx <= (pass == 0 ? std::min(256, cap(items)) : cap(items))) {
          p.items = items;
          p.tx = int(tx);
          p.ty = std::max(1, std::min(256, cap(items)) / p.tx);
          break;
        }
      }
    }
    if (p.items > 0) return p;
  }
  p.tx = int(std::min<int64_t>(1024, std::max<int64_t>(32, (N / p.vec + 31) / 32 * 32)));
  return p;  // loop kernel, one row per block
}

// Calls F with the CUDA element type for x's dtype.
template <typename F>
void dispatch_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fastlm.layer_norm: unsupported dtype ", t);
  }
}

// Calls f(std::integral_constant<int, ITEMS>) for ITEMS in {1, 2, 4, 8}.
template <typename F>
void dispatch_items(int items, F&& f) {
  switch (items) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

size_t reduce_smem(const Plan& p) { return sizeof(float) * 2 * p.ty * (p.tx / 32); }

// Launches the forward on allocated outputs (M, N > 0); ADD when a.res is set; RMSNorm when
// mean is empty.
void launch_fwd(const at::Tensor& x, const std::optional<at::Tensor>& w,
                const std::optional<at::Tensor>& b, bool pf32, at::Tensor& y, at::Tensor& mean,
                at::Tensor& rstd, double eps, const AddArgs& a) {
  const int64_t M = x.size(0), N = x.size(1);
  const bool add = a.res != nullptr;
  const bool aligned = aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr()) &&
                       (!w || aligned16(w->const_data_ptr())) &&
                       (!b || aligned16(b->const_data_ptr())) &&
                       (!add || (aligned16(a.res) && aligned16(a.summed)));
  const Plan p = plan_rows(N, x.element_size(), aligned, 8, [](int) { return kFwdRegMaxThreads; });
  const int64_t groups = (M + p.ty - 1) / p.ty;
  TORCH_CHECK(groups <= std::numeric_limits<int32_t>::max(), "fastlm.layer_norm: input has ", M,
              " rows; at most ", std::numeric_limits<int32_t>::max(), " row blocks per call");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(p.tx, p.ty);
  const size_t smem = reduce_smem(p);
  float* mean_p = mean.numel() ? mean.mutable_data_ptr<float>() : nullptr;
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int FULL = 16 / sizeof(T);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* yp = static_cast<T*>(y.mutable_data_ptr());
    auto go = [&](auto add_c) {
      constexpr bool ADD = decltype(add_c)::value;
      if (p.items > 0) {
        dispatch_items(p.items, [&](auto items) {
          ln_fwd_reg<T, FULL, decltype(items)::value, ADD>
              <<<unsigned(groups), block, smem, stream>>>(
                  xp, opt_ptr(w), opt_ptr(b), pf32, yp, mean_p,
                  rstd.mutable_data_ptr<float>(), M, int(N), float(eps), a);
        });
      } else if (p.vec == FULL) {
        ln_fwd_loop<T, FULL, ADD><<<unsigned(M), block, smem, stream>>>(
            xp, opt_ptr(w), opt_ptr(b), pf32, yp, mean_p,
            rstd.mutable_data_ptr<float>(), int(N), float(eps), a);
      } else {
        ln_fwd_loop<T, 1, ADD><<<unsigned(M), block, smem, stream>>>(
            xp, opt_ptr(w), opt_ptr(b), pf32, yp, mean_p,
            rstd.mutable_data_ptr<float>(), int(N), float(eps), a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (add) go(std::true_type{});
    else go(std::false_type{});
  });
}

// The dropout fields of `a` (rng: the contiguous (seed, offset), kept alive by the caller).
void set_dropout(AddArgs& a, const at::Tensor& rng, double dropout_p) {
  a.rng = rng.const_data_ptr<int64_t>();
  a.thresh = dropout_threshold(dropout_p);
  a.scale = dropout_scale(a.thresh);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  ln_check_fwd(input, weight, bias);
  c10::cuda::CUDAGuard guard(input.device());
  LnFwd f = ln_fwd_prepare(input, nullptr, weight, bias);
  if (!f.done) launch_fwd(f.x, f.w, f.b, f.pf32, f.y, f.mean, f.rstd, eps, AddArgs{});
  return {f.y, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cuda(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rng, double dropout_p,
    double eps) {
  const bool drop = aln_check_fwd(input, residual, weight, bias, rng, dropout_p);
  c10::cuda::CUDAGuard guard(input.device());
  LnFwd f = ln_fwd_prepare(input, &residual, weight, bias);
  if (f.done) return {f.y, f.summed, f.mean, f.rstd};
  const at::Tensor r = drop ? rng->contiguous() : at::Tensor();
  AddArgs a;
  a.res = f.res.const_data_ptr();
  a.summed = f.summed.mutable_data_ptr();
  if (drop) set_dropout(a, r, dropout_p);
  launch_fwd(f.x, f.w, f.b, f.pf32, f.y, f.mean, f.rstd, eps, a);
  return {f.y, f.summed, f.mean, f.rstd};
}

// dw (dbias) from the partial sets part[0] (part[1]); an undefined/empty output is skipped.
void launch_column_sum(const float* part, int64_t R, int64_t N, at::Tensor& dw, at::Tensor& db,
                       cudaStream_t stream) {
  const at::Tensor& ref = dw.numel() ? dw : db;
  const int kind = ref.scalar_type() == at::kFloat ? 0 : (ref.scalar_type() == at::kHalf ? 1 : 2);
  column_sum<<<dim3(unsigned((N + 31) / 32), 2), dim3(32, 16), 0, stream>>>(
      part, R, int(N), dw.numel() ? dw.mutable_data_ptr() : nullptr,
      db.numel() ? db.mutable_data_ptr() : nullptr, kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Resident blocks per SM of `kernel` at this block size (registers, shared memory and threads
// all counted); cached, as it only depends on the kernel, the block and the device.
template <typename K>
int blocks_per_sm(K kernel, int threads, size_t smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem, device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  TORCH_CHECK(n > 0, "fastlm.layer_norm: a backward kernel cannot run with ", threads,
              " threads per block on this GPU");
  cache.emplace(key, n);
  return n;
}

// Launches the backward (M, N > 0) into dx and, when partials, dw/db; ADD when `add`; RMSNorm
// when mu is empty.
void launch_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mu,
                const at::Tensor& rs, const std::optional<at::Tensor>& w, bool pf32,
                at::Tensor& dx, at::Tensor& dw, at::Tensor& db, bool partials, bool add,
                const AddArgs& a) {
  const int64_t M = x.size(0), N = x.size(1);
  const bool aligned = aligned16(x.const_data_ptr()) && aligned16(dy.const_data_ptr()) &&
                       aligned16(dx.const_data_ptr()) && (!w || aligned16(w->const_data_ptr())) &&
                       (!a.gs || aligned16(a.gs)) && (!a.din || aligned16(a.din));
  const Plan p = plan_rows(N, x.element_size(), aligned, 4, bwd_reg_max_threads);
  TORCH_CHECK(p.items <= 4, "fastlm.layer_norm: internal error: backward plan ITEMS ", p.items);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  const dim3 block(p.tx, p.ty);
  const size_t smem = reduce_smem(p);
  const int64_t groups = (M + p.ty - 1) / p.ty;
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int FULL = 16 / sizeof(T);
    const T* dyp = static_cast<const T*>(dy.const_data_ptr());
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* dxp = static_cast<T*>(dx.mutable_data_ptr());
    auto run = [&](auto kernel) {
      // Persistent grid: as many blocks as are resident at once. That is a constant of the
      // device and build, so the partial-row layout, and hence the bits of dw/db, repeat.
      const int64_t per_sm = blocks_per_sm(kernel, p.tx * p.ty, smem, device);
      const int64_t grid = std::min<int64_t>(groups, sm_count(device) * per_sm);
      const int64_t prows = grid * p.ty;
      at::Tensor part;
      float* pw = nullptr;
      if (partials) {
        part = at::empty({2, prows, N}, x.options().dtype(at::kFloat));
        pw = part.mutable_data_ptr<float>();
      }
      kernel<<<unsigned(grid), block, smem, stream>>>(
          dyp, xp, mu.defined() && mu.numel() ? mu.const_data_ptr<float>() : nullptr,
          rs.const_data_ptr<float>(),
          opt_ptr(w), pf32, dxp,
          pw, pw ? pw + prows * N : nullptr, M, int(N), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (partials) launch_column_sum(pw, prows, N, dw, db, stream);
    };
    auto go = [&](auto add_c) {
      constexpr bool ADD = decltype(add_c)::value;
      if (p.items == 1) run(ln_bwd_reg<T, FULL, 1, ADD>);
      else if (p.items == 2) run(ln_bwd_reg<T, FULL, 2, ADD>);
      else if (p.items == 4) run(ln_bwd_reg<T, FULL, 4, ADD>);
      else if (p.vec == FULL) run(ln_bwd_loop<T, FULL, ADD>);
      else run(ln_bwd_loop<T, 1, ADD>);
    };
    if (add) go(std::true_type{});
    else go(std::false_type{});
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool weight_grad, bool bias_grad) {
  ln_check_bwd(grad_out, input, mean, rstd, weight, bias, weight_grad, bias_grad);
  c10::cuda::CUDAGuard guard(input.device());
  LnBwd g = ln_bwd_prepare(grad_out, std::nullopt, input, mean, rstd, weight, bias, false, false,
                           weight_grad, bias_grad);
  if (!g.done)
    launch_bwd(g.dy, g.x, g.mu, g.rs, g.w, g.pf32, g.dx, g.dw, g.db, weight_grad || bias_grad,
               false, AddArgs{});
  return {g.dx, g.dw, g.db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& summed, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& rng, double dropout_p, bool input_grad, bool weight_grad,
    bool bias_grad) {
  const bool want_din = aln_check_bwd(grad_out, grad_summed, summed, mean, rstd, weight, bias,
                                      rng, dropout_p, input_grad, weight_grad, bias_grad);
  c10::cuda::CUDAGuard guard(summed.device());
  LnBwd g = ln_bwd_prepare(grad_out, grad_summed, summed, mean, rstd, weight, bias, true,
                           want_din, weight_grad, bias_grad);
  if (g.done) return {g.dx, g.din, g.dw, g.db};
  const at::Tensor r = want_din ? rng->contiguous() : at::Tensor();
  AddArgs a;
  a.gs = g.gs.defined() ? g.gs.const_data_ptr() : nullptr;
  if (want_din) {
    a.din = g.din.mutable_data_ptr();
    set_dropout(a, r, dropout_p);
  }
  launch_bwd(g.dy, g.x, g.mu, g.rs, g.w, g.pf32, g.dx, g.dw, g.db, weight_grad || bias_grad, true,
             a);
  return {g.dx, g.din, g.dw, g.db};
}

// ------------------------------------------------------------------------------------------
// fastlm.rms_norm and fastlm.add_rms_norm: the launches above with an empty mean, no bias.
constexpr const char* kRms = "fastlm.rms_norm";
constexpr const char* kAddRms = "fastlm.add_rms_norm";

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& input,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps) {
  ln_check_fwd(input, weight, std::nullopt, kRms);
  c10::cuda::CUDAGuard guard(input.device());
  LnFwd f = ln_fwd_prepare(input, nullptr, weight, std::nullopt, true);
  if (!f.done) launch_fwd(f.x, f.w, f.b, f.pf32, f.y, f.mean, f.rstd, eps, AddArgs{});
  return {f.y, f.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& input,
                                                     const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& weight,
                                                     bool weight_grad) {
  ln_check_bwd(grad_out, input, rstd, rstd, weight, std::nullopt, weight_grad, false, kRms);
  c10::cuda::CUDAGuard guard(input.device());
  LnBwd g = ln_bwd_prepare(grad_out, std::nullopt, input, rstd, rstd, weight, std::nullopt, false,
                           false, weight_grad, false);
  if (!g.done)
    launch_bwd(g.dy, g.x, at::Tensor(), g.rs, g.w, g.pf32, g.dx, g.dw, g.db, weight_grad, false,
               AddArgs{});
  return {g.dx, g.dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cuda(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& rng, double dropout_p, double eps) {
  const bool drop = aln_check_fwd(input, residual, weight, std::nullopt, rng, dropout_p, kAddRms);
  c10::cuda::CUDAGuard guard(input.device());
  LnFwd f = ln_fwd_prepare(input, &residual, weight, std::nullopt, true);
  if (f.done) return {f.y, f.summed, f.rstd};
  const at::Tensor r = drop ? rng->contiguous() : at::Tensor();
  AddArgs a;
  a.res = f.res.const_data_ptr();
  a.summed = f.summed.mutable_data_ptr();
  if (drop) set_dropout(a, r, dropout_p);
  launch_fwd(f.x, f.w, f.b, f.pf32, f.y, f.mean, f.rstd, eps, a);
  return {f.y, f.summed, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& summed, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& rng, double dropout_p, bool input_grad, bool weight_grad) {
  const bool want_din = aln_check_bwd(grad_out, grad_summed, summed, rstd, rstd, weight,
                                      std::nullopt, rng, dropout_p, input_grad, weight_grad, false,
                                      kAddRms);
  c10::cuda::CUDAGuard guard(summed.device());
  LnBwd g = ln_bwd_prepare(grad_out, grad_summed, summed, rstd, rstd, weight, std::nullopt, true,
                           want_din, weight_grad, false);
  if (g.done) return {g.dx, g.din, g.dw};
  const at::Tensor r = want_din ? rng->contiguous() : at::Tensor();
  AddArgs a;
  a.gs = g.gs.defined() ? g.gs.const_data_ptr() : nullptr;
  if (want_din) {
    a.din = g.din.mutable_data_ptr();
    set_dropout(a, r, dropout_p);
  }
  launch_bwd(g.dy, g.x, at::Tensor(), g.rs, g.w, g.pf32, g.dx, g.dw, g.db, weight_grad, true, a);
  return {g.dx, g.din, g.dw};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("layer_norm_fwd", &cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &cuda::layer_norm_bwd_cuda);
  m.impl("add_layer_norm_fwd", &cuda::add_layer_norm_fwd_cuda);
  m.impl("add_layer_norm_bwd", &cuda::add_layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd", &cuda::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &cuda::rms_norm_bwd_cuda);
  m.impl("add_rms_norm_fwd", &cuda::add_rms_norm_fwd_cuda);
  m.impl("add_rms_norm_bwd", &cuda::add_rms_norm_bwd_cuda);
}

}  // namespace fastlm
