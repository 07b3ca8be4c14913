"""Deliberate faults in csrc/cuda for the mutation suite (run.py): each is one text replacement,
found by its `old` text in whichever file of csrc/cuda holds it (the PTX wrappers moved from
attention.cu / adam.cu into ptx.h, so a fault applies to the tree before and after that move).

Classes (issue 16): barrier, cp.async wait, mma fragments, causal comparison, softmax rescale,
log2e, shuffle mask, Adam bias correction, off-by-one tail, PTX modifier, FMA contraction,
smem opt-in, launch bounds, out-of-bounds global, out-of-bounds shared, uninitialized shared,
inter-block race.
"""

from dataclasses import dataclass


# The files a fault may touch: what the emulator compiles.
FILES = ("attention.cu", "layer_norm.cu", "adam.cu", "common.cuh", "ptx.h")


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # the fault class
    area: str  # attention | layer_norm | adam: which emulator tests run
    old: str
    new: str


FAULTS = [
    # ---- attention -----------------------------------------------------------------------
    Fault("attn-fwd-no-refill-barrier", "barrier", "attention",
          "    __syncthreads();  // every warp is done with stage it % ST before it is refilled\n",
          "\n"),
    Fault("attn-fwd-no-landed-barrier", "barrier", "attention",
          "    __syncthreads();         // ... for every thread\n", "\n"),
    Fault("attn-fwd-no-cp-async-wait", "cp.async wait", "attention",
          "    cp_async_wait<ST - 1>(); // groups 0..it complete", "    // groups 0..it complete"),
    Fault("ptx-wait-group-count", "PTX modifier", "attention",
          '"cp.async.wait_group %0;\\n" ::"n"(N)', '"cp.async.wait_group %0;\\n" ::"n"(N + 1)'),
    Fault("ptx-ldmatrix-no-trans", "PTX modifier", "attention",
          '"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\\n"',
          '"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n"'),
    Fault("ptx-mma-bf16-as-f16", "PTX modifier", "attention",
          '"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32',
          '"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32'),
    Fault("attn-fwd-swapped-b-fragments", "mma fragments", "attention",
          "          mma16816<T>(acc[2 * np], a, bb[0], bb[1]);",
          "          mma16816<T>(acc[2 * np], a, bb[1], bb[0]);"),
    Fault("attn-causal-j-ge-i", "causal comparison", "attention",
          "    return d >= lo && d <= hi;", "    return d >= lo && d < hi;"),
    Fault("attn-fwd-no-sum-rescale", "softmax rescale", "attention",
          "      m_run[r] = mx[r];\n      l_run[r] *= alpha;\n", "      m_run[r] = mx[r];\n"),
    Fault("attn-mask-without-log2e", "log2e", "attention",
          "      s += kLog2e * mv.at(i, j);", "      s += mv.at(i, j);"),
    Fault("attn-quad-sum-partial-mask", "shuffle mask", "attention",
          "  v += __shfl_xor_sync(0xffffffffu, v, 1);\n  return v + __shfl_xor_sync",
          "  v += __shfl_xor_sync(0x0000ffffu, v, 1);\n  return v + __shfl_xor_sync"),
    Fault("attn-no-smem-opt-in", "smem opt-in", "attention",
          "  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),\n"
          "                                      cudaFuncAttributeMaxDynamicSharedMemorySize, "
          "int(bytes)));\n", "\n"),
    Fault("attn-fwd-launch-bounds-64", "launch bounds", "attention",
          "__global__ void __launch_bounds__(kThreads, Cfg<D>::FWD_MIN_BLOCKS) attn_fwd_mma(",
          "__global__ void __launch_bounds__(kThreads / 2, Cfg<D>::FWD_MIN_BLOCKS) attn_fwd_mma("),
    Fault("attn-store-no-row-bound", "out-of-bounds global", "attention",
          "    const int row = row0 + g + 8 * r;\n    if (row >= rows) continue;\n",
          "    const int row = row0 + g + 8 * r;\n"),
    Fault("attn-f32-fwd-smem-128-short", "out-of-bounds shared", "attention",
          "kFRows * p.E + kFTile * (p.E + 1) + kFTile * p.Ev);",
          "kFRows * p.E + kFTile * (p.E + 1) + kFTile * p.Ev - 32);"),
    # ---- LayerNorm -----------------------------------------------------------------------
    Fault("ln-row-sum-no-reuse-barrier", "barrier", "layer_norm",
          "  __syncthreads();  // the previous use of smem is finished\n", "\n"),
    Fault("ln-row-sum-no-write-barrier", "barrier", "layer_norm",
          "  __syncthreads();\n  a = 0.f;\n  b = 0.f;\n", "  a = 0.f;\n  b = 0.f;\n"),
    Fault("ln-warp-sum-partial-mask", "shuffle mask", "layer_norm",
          "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
          "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0x7fffffffu, v, o);"),
    Fault("ln-fwd-reg-store-off-by-one", "off-by-one tail", "layer_norm",
          "    if (j < N) {\n      float wv[VEC], bv[VEC], o[VEC];",
          "    if (j <= N) {\n      float wv[VEC], bv[VEC], o[VEC];"),
    Fault("ln-fwd-reg-launch-bounds-256", "launch bounds", "layer_norm",
          "__launch_bounds__(kFwdRegMaxThreads) ln_fwd_reg(",
          "__launch_bounds__(kFwdRegMaxThreads / 2) ln_fwd_reg("),
    Fault("ln-column-sum-no-barrier", "barrier", "layer_norm",
          "  s[threadIdx.y][threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);\n"
          "  __syncthreads();\n",
          "  s[threadIdx.y][threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);\n"),
    Fault("ln-bwd-loop-shared-partial-row", "inter-block race", "layer_norm",
          "  float* pw = part_w ? part_w + int64_t(blockIdx.x) * N : nullptr;",
          "  float* pw = part_w ? part_w + int64_t(blockIdx.x / 2) * N : nullptr;"),
    # ---- Adam ----------------------------------------------------------------------------
    Fault("adam-bias-correction-step-plus-1", "Adam bias correction", "adam",
          "const double bc1 = __dsub_rn(1.0, ::pow(a.beta1, step));",
          "const double bc1 = __dsub_rn(1.0, ::pow(a.beta1, step + 1.0));"),
    Fault("adam-f-mul-plain-multiply", "FMA contraction", "adam",
          '  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));\n  return r;',
          "  (void)r;\n  return a * b;"),
    Fault("ptx-sqrt-approx", "PTX modifier", "adam",
          '"sqrt.rn.f32 %0, %1;"', '"sqrt.approx.f32 %0, %1;"'),
    Fault("adam-no-constants-barrier", "barrier", "adam",
          "  __syncthreads();\n  AdamConsts c;", "  AdamConsts c;"),
    Fault("adam-tail-off-by-one", "off-by-one tail", "adam",
          "if (int(threadIdx.x) < tail) io.one(nvec * VEC + threadIdx.x, c);",
          "if (int(threadIdx.x) <= tail) io.one(nvec * VEC + threadIdx.x, c);"),
    Fault("adam-constants-only-in-block-0", "uninitialized shared", "adam",
          "  if (threadIdx.x == 0) {\n    const float lr = a.lr_tensor",
          "  if (threadIdx.x == 0 && blockIdx.x == 0) {\n    const float lr = a.lr_tensor"),
    Fault("sumsq-partials-of-block-0", "uninitialized shared", "adam",
          "  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;\n  __syncthreads();\n"
          "  if (threadIdx.x == 0) {\n    float total",
          "  if ((threadIdx.x & 31) == 0 && blockIdx.x == 0) warp_part[threadIdx.x >> 5] = acc;\n"
          "  __syncthreads();\n  if (threadIdx.x == 0) {\n    float total"),
]

# The emulator tests each area's faults must fail (pytest arguments; files missing in an older
# tree are left out).
TESTS = {
    "attention": ["tests/test_cuda_emu_attention.py", "-k",
                  "forward_backward_against_float64 and (d64 or odd-gqa or mqa-e128 or "
                  "d256-causal or float32-mask or bool-mask or dropout-causal)"],
    "layer_norm": ["tests/test_cuda_emu_layer_norm_adam.py", "-k",
                   "layer_norm_against or dropout_bits or layer_norm_empty or layer_norm_results"],
    "adam": ["tests/test_cuda_emu_layer_norm_adam.py", "-k", "adam_step or sum_of_squares"],
}
# Run first for every area when the tree has it (fast: nvcc on the PTX wrappers).
EXTRA = ["tests/test_cuda_emu_ptx.py"]
