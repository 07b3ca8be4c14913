// Fused Adam/AdamW step and sum of squares on CUDA, over lists of tensors (multi-tensor apply,
// common.cuh): each launch covers up to kMtaBlocks chunks of kMtaChunk elements from many
// tensors; a block of kThreads threads owns one chunk.
//
// Adam, per element, in float32 with IEEE-rounded operations and no contraction, so that the
// bits are those of the CPU kernel (csrc/cpu/adam.cpp, built with -ffp-contract=off):
//   g = grad * (clip_coef / grad_scale), negated if maximize
//   AdamW: p *= decay                  Adam: g += wd * p          (both only if wd != 0)
//   m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + ((1 - beta2) * g) * g
//   vmax = max(vmax, v) (amsgrad);     denom = sqrt(v or vmax) / sqrt(1 - beta2^step) + eps
//   p -= (lr / (1 - beta1^step)) * m / denom
// decay = 1 - lr * wd and 1 - beta are formed in double and rounded to float (as torch and the
// CPU kernel do); decay per block, since lr may come from lr_tensor.
// The moments and vmax are stored rounded to their type, but the update uses the float values.
// With master weights the float32 master is read and updated and the param is its rounding.
// Per block, thread 0 reads the tensor's step, lr (lr_tensor or the float), clip_coef and
// grad_scale from device memory and forms the bias corrections in double as the CPU does.
// A found_inf != 0 makes every block return before writing anything. Nothing is read on the
// host, so the op can be captured in a CUDA graph.
//
// Access: a chunk is walked in trips of kThreads * kElems elements; each thread loads kElems
// elements of every list (ILP vectors of VEC = 16 / sizeof(param) elements, 16-byte accesses;
// float32 moments of 16-bit params take two 16-byte accesses per vector) before computing and
// storing, so ~128 bytes per thread are in flight. Tensors with any pointer not 16-byte aligned
// take a one-element-per-thread path. The last chunk's n % VEC tail elements are done
// one per thread after the vector loop.
//
// Sum of squares: each block sums x*x over its chunk in float32 (fixed per-thread order, then a
// fixed warp/block tree) and writes one partial per chunk, numbered over all launches; a single
// block of a fixed size then adds the partials in double in a fixed order. Same bits every run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../adam.h"
#include "common.cuh"
#include "ptx.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // per block (a chunk is 65536 / (256 * 8) = 32 trips)
constexpr int kElems = 8;      // elements per thread per trip: VEC * ILP
constexpr int kFinalThreads = 1024;

// f_mul, f_add, f_sub, f_div, f_lt, f_sqrt: IEEE round-to-nearest float operations that nvcc
// cannot contract or approximate (ptx.h).

// N consecutive elements of T <-> floats, in accesses of at most 16 bytes (N * sizeof(T) may
// be 32 bytes for float32 moments of 16-bit params; only 16-byte alignment is known).
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, float (&out)[N]) {
  constexpr int W = 16 / int(sizeof(T));
  constexpr int PIECE = N < W ? N : W;
#pragma unroll
  for (int k = 0; k < N; k += PIECE) {
    float piece[PIECE];
    load_f<T, PIECE>(p + k, piece);
#pragma unroll
    for (int t = 0; t < PIECE; ++t) out[k + t] = piece[t];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, const float (&in)[N]) {
  constexpr int W = 16 / int(sizeof(T));
  constexpr int PIECE = N < W ? N : W;
#pragma unroll
  for (int k = 0; k < N; k += PIECE) {
    float piece[PIECE];
#pragma unroll
    for (int t = 0; t < PIECE; ++t) piece[t] = in[k + t];
    store_f<T, PIECE>(p + k, piece);
  }
}

// ------------------------------------------------------------------------------------------
// Adam

// Scalar arguments of every launch of one step (the meta is the other argument).
struct AdamArgs {
  double beta1, beta2;        // for the bias corrections, in double like the CPU
  double weight_decay;        // for decay = 1 - lr * weight_decay, in double like the CPU
  const float* lr_tensor;     // replaces lr when not null
  const float* grad_scale;    // null: 1
  const float* found_inf;     // null: 0; != 0 skips the step
  const float* clip_coef;     // null: 1
  float lr, b1, omb1, b2, omb2, eps, wd;  // b1 = float(beta1), omb1 = float(1.0 - beta1), ...
  int wd_mode;                            // kNoDecay, kDecoupled or kL2 (decided on the host)
  int maximize;
};

// Weight decay: none (float(weight_decay) == 0), decoupled (AdamW) or added to the gradient.
enum WdMode : int { kNoDecay = 0, kDecoupled = 1, kL2 = 2 };

// Per-block constants of the update.
struct AdamConsts {
  float b1, omb1, b2, omb2, eps, wd, decay, step_size, bc2_sqrt, g_mul;
  int wd_mode;
};

// The update of N elements held in floats: p (the master when there is one), g, m, v, vmax.
// On return p, m, v, vmax hold the new values (float, not yet rounded to the storage types).
template <bool AMSGRAD, int N>
__device__ __forceinline__ void adam_math(float (&p)[N], const float (&g)[N], float (&m)[N],
                                          float (&v)[N], float (&vmax)[N], const AdamConsts& c) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float pv = p[k];
    float gv = f_mul(g[k], c.g_mul);
    if (c.wd_mode == kDecoupled) pv = f_mul(pv, c.decay);
    else if (c.wd_mode == kL2) gv = f_add(gv, f_mul(c.wd, pv));
    const float mv = f_add(f_mul(c.b1, m[k]), f_mul(c.omb1, gv));
    const float vv = f_add(f_mul(c.b2, v[k]), f_mul(f_mul(c.omb2, gv), gv));
    m[k] = mv;
    v[k] = vv;
    float vd = vv;
    if constexpr (AMSGRAD) {
      vd = f_lt(vmax[k], vv) ? vv : vmax[k];  // std::max(vmax, v) exactly: NaN, -0, denormals
      vmax[k] = vd;
    }
    const float denom = f_add(f_div(f_sqrt(vd), c.bc2_sqrt), c.eps);
    p[k] = f_sub(pv, f_div(f_mul(c.step_size, mv), denom));
  }
}

// Lists of the meta: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, then max_exp_avg_sqs when
// AMSGRAD, then masters when MASTER. aux is the tensor's step (a float32 device scalar).
template <bool AMSGRAD, bool MASTER>
using AdamMeta = TensorListMeta<4 + int(AMSGRAD) + int(MASTER)>;

// The chunk's pointers in every list; loads, updates and stores N elements at element j.
template <typename P, typename S, bool AMSGRAD, bool MASTER>
struct AdamIO {
  P* p;
  const P* g;
  S* m;
  S* v;
  S* vmax;        // AMSGRAD only
  float* master;  // MASTER only

  template <int N>
  __device__ __forceinline__ void load(int j, float (&pr)[N], float (&gr)[N], float (&mr)[N],
                                       float (&vr)[N], float (&xr)[N]) const {
    if constexpr (MASTER) load_n<float, N>(master + j, pr);
    else load_n<P, N>(p + j, pr);
    load_n<P, N>(g + j, gr);
    load_n<S, N>(m + j, mr);
    load_n<S, N>(v + j, vr);
    if constexpr (AMSGRAD) load_n<S, N>(vmax + j, xr);
  }
  template <int N>
  __device__ __forceinline__ void store(int j, const float (&pr)[N], const float (&mr)[N],
                                        const float (&vr)[N], const float (&xr)[N]) const {
    if constexpr (MASTER) store_n<float, N>(master + j, pr);
    store_n<P, N>(p + j, pr);
    store_n<S, N>(m + j, mr);
    store_n<S, N>(v + j, vr);
    if constexpr (AMSGRAD) store_n<S, N>(vmax + j, xr);
  }
  __device__ __forceinline__ void one(int j, const AdamConsts& c) const {
    float pr[1], gr[1], mr[1], vr[1], xr[1] = {0.f};
    load<1>(j, pr, gr, mr, vr, xr);
    adam_math<AMSGRAD, 1>(pr, gr, mr, vr, xr, c);
    store<1>(j, pr, mr, vr, xr);
  }
};

// P, S: CUDA element types of the params and of the moments (S == P or float).
// Min 4 blocks of 256 threads per SM: at most 64 registers (ptxas: 49..64, no spills), so a
// launch's 512 blocks are all resident at once on H100 (132 SMs x 4) and 1024 threads per SM,
// each with 64..128 bytes of loads in flight, far exceed the bandwidth-latency product.
template <typename P, typename S, bool AMSGRAD, bool MASTER>
__global__ void __launch_bounds__(kThreads, 4)
    adam_kernel(const __grid_constant__ AdamMeta<AMSGRAD, MASTER> meta, const AdamArgs a) {
  // Every thread reads the same found_inf, so the whole block (and grid) returns or none does.
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return;
  constexpr int VEC = 16 / int(sizeof(P));
  constexpr int ILP = kElems / VEC;
  static_assert(VEC * ILP == kElems, "kElems must be a multiple of the vector width");
  constexpr int kMaster = 4 + int(AMSGRAD);

  const int s = meta.block_tensor[blockIdx.x];
  const int64_t e0 = int64_t(meta.block_chunk[blockIdx.x]) * kMtaChunk;
  const int64_t left = meta.numel[s] - e0;  // >= 1 (meta invariant)
  const int n = left < kMtaChunk ? int(left) : int(kMtaChunk);

  __shared__ float sh[4];
  if (threadIdx.x == 0) {
    const float lr = a.lr_tensor != nullptr ? *a.lr_tensor : a.lr;
    const double step = double(*static_cast<const float*>(meta.aux[s]));
    // Double arithmetic through the _rn intrinsics: never contracted into an FMA (the CPU is
    // built with -ffp-contract=off), so these are the CPU's values up to pow's rounding.
    const double bc1 = __dsub_rn(1.0, ::pow(a.beta1, step));
    sh[0] = float(__ddiv_rn(double(lr), bc1));                        // step_size
    sh[1] = float(__dsqrt_rn(__dsub_rn(1.0, ::pow(a.beta2, step))));  // sqrt(bias correction 2)
    const float gm = f_div(a.clip_coef != nullptr ? *a.clip_coef : 1.f,
                           a.grad_scale != nullptr ? *a.grad_scale : 1.f);
    sh[2] = a.maximize ? -gm : gm;
    sh[3] = float(__dsub_rn(1.0, __dmul_rn(double(lr), a.weight_decay)));  // decay (AdamW)
  }
  __syncthreads();
  AdamConsts c;
  c.b1 = a.b1;
  c.omb1 = a.omb1;
  c.b2 = a.b2;
  c.omb2 = a.omb2;
  c.eps = a.eps;
  c.wd = a.wd;
  c.wd_mode = a.wd_mode;
  c.step_size = sh[0];
  c.bc2_sqrt = sh[1];
  c.g_mul = sh[2];
  c.decay = sh[3];

  AdamIO<P, S, AMSGRAD, MASTER> io;
  io.p = static_cast<P*>(meta.ptr[0][s]) + e0;
  io.g = static_cast<const P*>(meta.ptr[1][s]) + e0;
  io.m = static_cast<S*>(meta.ptr[2][s]) + e0;
  io.v = static_cast<S*>(meta.ptr[3][s]) + e0;
  io.vmax = nullptr;
  io.master = nullptr;
  if constexpr (AMSGRAD) io.vmax = static_cast<S*>(meta.ptr[4][s]) + e0;
  if constexpr (MASTER) io.master = static_cast<float*>(meta.ptr[kMaster][s]) + e0;

  if (meta.flags[s] & 1) {
    // Vector path: vectors 0 .. nvec-1 (elements [0, nvec*VEC)), then the n % VEC tail.
    const int nvec = n / VEC;
    for (int base = threadIdx.x; base < nvec; base += kThreads * ILP) {
      float pr[ILP][VEC], gr[ILP][VEC], mr[ILP][VEC], vr[ILP][VEC], xr[ILP][VEC];
#pragma unroll
      for (int i = 0; i < ILP; ++i) {
        const int jv = base + i * kThreads;  // this thread's i-th vector of the trip
#pragma unroll
        for (int k = 0; k < VEC; ++k) pr[i][k] = gr[i][k] = mr[i][k] = vr[i][k] = xr[i][k] = 0.f;
        if (jv < nvec) io.template load<VEC>(jv * VEC, pr[i], gr[i], mr[i], vr[i], xr[i]);
      }
#pragma unroll
      for (int i = 0; i < ILP; ++i) adam_math<AMSGRAD, VEC>(pr[i], gr[i], mr[i], vr[i], xr[i], c);
#pragma unroll
      for (int i = 0; i < ILP; ++i) {
        const int jv = base + i * kThreads;
        if (jv < nvec) io.template store<VEC>(jv * VEC, pr[i], mr[i], vr[i], xr[i]);
      }
    }
    const int tail = n - nvec * VEC;  // < VEC, non-zero only in a tensor's last chunk
    if (int(threadIdx.x) < tail) io.one(nvec * VEC + threadIdx.x, c);
  } else {
    // Some pointer of this tensor is not 16-byte aligned: one element per access.
    for (int j = threadIdx.x; j < n; j += kThreads) io.one(j, c);
  }
}

template <typename P, typename S, bool AMSGRAD, bool MASTER>
void adam_launch(const std::vector<MtaTensor>& ts, const AdamArgs& a, cudaStream_t stream) {
  using Meta = AdamMeta<AMSGRAD, MASTER>;
  static_assert(sizeof(Meta) + sizeof(AdamArgs) <= 4096, "kernel parameters exceed 4 KB");
  multi_tensor_apply<Meta>(ts, [&](const Meta& meta, int blocks) {
    adam_kernel<P, S, AMSGRAD, MASTER><<<blocks, kThreads, 0, stream>>>(meta, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename P, typename S>
void adam_dispatch_flags(bool amsgrad, bool master, const std::vector<MtaTensor>& ts,
                         const AdamArgs& a, cudaStream_t stream) {
  if (amsgrad) {
    if (master) adam_launch<P, S, true, true>(ts, a, stream);
    else adam_launch<P, S, true, false>(ts, a, stream);
  } else {
    if (master) adam_launch<P, S, false, true>(ts, a, stream);
    else adam_launch<P, S, false, false>(ts, a, stream);
  }
}

const float* opt_scalar(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<float>() : nullptr;
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList masters, at::TensorList steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double eps, double weight_decay, bool decoupled, bool amsgrad,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef) {
  const at::ScalarType st = adam_check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                       masters, steps, amsgrad);
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastlm.adam_step_: params must be CUDA tensors for the CUDA "
              "kernel, got ", dev);
  adam_check_scalar(lr_tensor, "lr_tensor", dev);
  adam_check_scalar(grad_scale, "grad_scale", dev);
  adam_check_scalar(found_inf, "found_inf", dev);
  adam_check_scalar(clip_coef, "clip_coef", dev);
  c10::cuda::CUDAGuard guard(dev);

  const at::ScalarType pt = params[0].scalar_type();
  const bool master = !masters.empty();
  const int psize = int(params[0].element_size());
  const int ssize = int(exp_avgs[0].element_size());
  std::vector<MtaTensor> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    MtaTensor& t = ts[i];
    t.numel = params[i].numel();
    t.aux = steps[i].const_data_ptr<float>();
    // const_cast: grads are only read; the list slots are untyped.
    t.ptr[0] = params[i].mutable_data_ptr();
    t.ptr[1] = const_cast<void*>(grads[i].const_data_ptr());
    t.ptr[2] = exp_avgs[i].mutable_data_ptr();
    t.ptr[3] = exp_avg_sqs[i].mutable_data_ptr();
    t.elsize[0] = t.elsize[1] = psize;
    t.elsize[2] = t.elsize[3] = ssize;
    int l = 4;
    if (amsgrad) {
      t.ptr[l] = max_exp_avg_sqs[i].mutable_data_ptr();
      t.elsize[l++] = ssize;
    }
    if (master) {
      t.ptr[l] = masters[i].mutable_data_ptr();
      t.elsize[l++] = int(sizeof(float));
    }
  }

  AdamArgs a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.weight_decay = weight_decay;
  a.lr_tensor = opt_scalar(lr_tensor);
  a.grad_scale = opt_scalar(grad_scale);
  a.found_inf = opt_scalar(found_inf);
  a.clip_coef = opt_scalar(clip_coef);
  a.lr = float(lr);
  a.b1 = float(beta1);
  a.omb1 = float(1.0 - beta1);
  a.b2 = float(beta2);
  a.omb2 = float(1.0 - beta2);
  a.eps = float(eps);
  a.wd = float(weight_decay);
  a.wd_mode = a.wd == 0.f ? kNoDecay : (decoupled ? kDecoupled : kL2);
  a.maximize = maximize ? 1 : 0;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool s32 = st == at::kFloat;
  switch (pt) {
    case at::kFloat:
      adam_dispatch_flags<float, float>(amsgrad, master, ts, a, stream);
      break;
    case at::kHalf:
      if (s32) adam_dispatch_flags<__half, float>(amsgrad, master, ts, a, stream);
      else adam_dispatch_flags<__half, __half>(amsgrad, master, ts, a, stream);
      break;
    default:  // kBFloat16 (adam_check allows nothing else)
      if (s32) adam_dispatch_flags<__nv_bfloat16, float>(amsgrad, master, ts, a, stream);
      else adam_dispatch_flags<__nv_bfloat16, __nv_bfloat16>(amsgrad, master, ts, a, stream);
      break;
  }
}

// ------------------------------------------------------------------------------------------
// Sum of squares

using SumsqMeta = TensorListMeta<1>;
static_assert(sizeof(SumsqMeta) + sizeof(float*) <= 4096, "kernel parameters exceed 4 KB");
// flags bits 1..2: the tensor's dtype.
enum : uint8_t { kSqF32 = 0, kSqF16 = 1, kSqBF16 = 2 };

// This thread's share of x[0, n) squared, summed in float in a fixed order.
template <typename T>
__device__ __forceinline__ float sumsq_chunk(const T* x, int n, bool vec) {
  float acc = 0.f;
  if (vec) {
    constexpr int VEC = 16 / int(sizeof(T));
    constexpr int ILP = (kElems / VEC) > 0 ? kElems / VEC : 1;
    const int nvec = n / VEC;
    for (int base = threadIdx.x; base < nvec; base += kThreads * ILP) {
      float r[ILP][VEC];
#pragma unroll
      for (int i = 0; i < ILP; ++i) {
        const int jv = base + i * kThreads;
#pragma unroll
        for (int k = 0; k < VEC; ++k) r[i][k] = 0.f;
        if (jv < nvec) load_f<T, VEC>(x + jv * VEC, r[i]);
      }
#pragma unroll
      for (int i = 0; i < ILP; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc += r[i][k] * r[i][k];
    }
    const int tail = n - nvec * VEC;
    if (int(threadIdx.x) < tail) {
      const float t = to_f(x[nvec * VEC + threadIdx.x]);
      acc += t * t;
    }
  } else {
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const float t = to_f(x[j]);
      acc += t * t;
    }
  }
  return acc;
}

// One partial sum per chunk: partial[meta.first_block + blockIdx.x].
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const __grid_constant__ SumsqMeta meta,
                                                         float* __restrict partial) {
  __shared__ float warp_part[kThreads / 32];
  const int s = meta.block_tensor[blockIdx.x];
  const int64_t e0 = int64_t(meta.block_chunk[blockIdx.x]) * kMtaChunk;
  const int64_t left = meta.numel[s] - e0;  // >= 1 (meta invariant)
  const int n = left < kMtaChunk ? int(left) : int(kMtaChunk);
  const bool vec = meta.flags[s] & 1;
  const char* base = static_cast<const char*>(meta.ptr[0][s]);
  float acc;
  switch (meta.flags[s] >> 1) {
    case kSqF32: acc = sumsq_chunk(reinterpret_cast<const float*>(base) + e0, n, vec); break;
    case kSqF16: acc = sumsq_chunk(reinterpret_cast<const __half*>(base) + e0, n, vec); break;
    default:
      acc = sumsq_chunk(reinterpret_cast<const __nv_bfloat16*>(base) + e0, n, vec);
      break;
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_part[w];
    partial[meta.first_block + blockIdx.x] = total;
  }
}

// out = sum of partial[0, n), in double, in a fixed order (one block of kFinalThreads).
__global__ void __launch_bounds__(kFinalThreads) sumsq_final(const float* __restrict partial,
                                                             int n, float* __restrict out) {
  __shared__ double warp_part[kFinalThreads / 32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kFinalThreads) acc += double(partial[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kFinalThreads / 32; ++w) total += warp_part[w];
    *out = float(total);
  }
}

at::Tensor sum_of_squares_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "fastlm.sum_of_squares: tensors must not be empty");
  const at::Device dev = tensors[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastlm.sum_of_squares: tensors[0] must be a CUDA tensor, got ",
              dev);
  std::vector<MtaTensor> ts(tensors.size());
  int64_t chunks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& x = tensors[i];
    TORCH_CHECK(x.device() == dev, "fastlm.sum_of_squares: tensors[", i, "] is on ", x.device(),
                " but tensors[0] is on ", dev);
    TORCH_CHECK(x.is_contiguous() && !x.is_sparse(), "fastlm.sum_of_squares: tensors[", i,
                "] must be a contiguous dense tensor");
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "fastlm.sum_of_squares: tensors[", i, "] must be float32, float16 or bfloat16, "
                "got ", dt);
    MtaTensor& t = ts[i];
    t.numel = x.numel();
    t.ptr[0] = const_cast<void*>(x.const_data_ptr());
    t.elsize[0] = int(x.element_size());
    t.flags = uint8_t((dt == at::kFloat ? kSqF32 : dt == at::kHalf ? kSqF16 : kSqBF16) << 1);
    chunks += mta_chunks(t.numel);
  }
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "fastlm.sum_of_squares: ",
              chunks, " chunks of ", kMtaChunk, " elements; at most 2^31 - 1 per call");
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = tensors[0].options().dtype(at::kFloat);
  at::Tensor partial = at::empty({std::max<int64_t>(chunks, 1)}, opts);
  at::Tensor out = at::empty({}, opts);
  float* pp = partial.mutable_data_ptr<float>();
  multi_tensor_apply<SumsqMeta>(ts, [&](const SumsqMeta& meta, int blocks) {
    sumsq_kernel<<<blocks, kThreads, 0, stream>>>(meta, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // With no elements at all (chunks == 0) this writes 0.
  sumsq_final<<<1, kFinalThreads, 0, stream>>>(pp, int(chunks), out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("adam_step_", &cuda::adam_step_cuda);
  m.impl("sum_of_squares", &cuda::sum_of_squares_cuda);
}

}  // namespace fastlm
