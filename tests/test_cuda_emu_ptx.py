"""The GPU path and the emulated path of every PTX wrapper cannot drift: nvcc compiles the real
wrappers of csrc/cuda/ptx.h (the strings the emulator decodes, tests/cuda_emu/build.py) for
sm_80 and sm_90, and
  * the PTX of each probe kernel holds the wrapper's instructions, opcode and modifiers as written;
  * the SASS holds the machine instruction the emulator's decoding implies (ldmatrix .x4 .trans
    -> LDSM.16.MT88.4, mma .bf16 -> HMMA.16816.F32.BF16, cp.async.cg 16 -> LDGSTS.E.BYPASS.128,
    wait_group 1 -> DEPBAR.LE SB0, 0x1, ...), so a modifier the emulator read wrongly fails here;
  * f_add(f_mul(a, b), c) stays FMUL + FADD (no FFMA), while a * b + c becomes an FFMA (the
    check can see a contraction);
  * every Adam kernel of adam.cu has only explicitly rounded f32 arithmetic in its PTX (no fma,
    no add/sub/mul without .rn), so ptxas cannot contract it and the bits match the CPU kernel.
Needs nvcc and cuobjdump (the toolkit or triton's copy); skipped without them.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
from cuda_emu.build import load

from fastlm import _buildcfg

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
ARCHS = ("sm_80", "sm_90")

# One probe kernel per wrapper (several wrappers where one needs the others).
PROBE = r"""
#include "ptx.h"
using namespace fastlm::cuda;

__device__ float sink[1024];
__device__ uint32_t usink[1024];

extern "C" __global__ void k_cp_async(const float4* g, int valid) {
  __shared__ __align__(16) float4 s[64];
  cp_async16(smem_u32(&s[threadIdx.x]), g + threadIdx.x, valid != 0);
  cp_async_commit();
  cp_async16(smem_u32(&s[32 + threadIdx.x]), g + 32 + threadIdx.x, valid != 0);
  cp_async_commit();
  cp_async_wait<1>();
  cp_async_wait<0>();
  __syncthreads();
  sink[threadIdx.x] = s[threadIdx.x ^ 1].x + s[32 + (threadIdx.x ^ 3)].y;
}

template <bool TRANS>
__device__ void ldsm_probe(int off) {
  __shared__ __align__(16) uint16_t s[32 * 8];
  s[threadIdx.x] = uint16_t(threadIdx.x);
  __syncthreads();
  uint32_t r[4];
  const uint32_t addr = smem_u32(s + 8 * ((threadIdx.x + off) & 31));
  if (TRANS) ldsm_x4_t(r, addr);
  else ldsm_x4(r, addr);
  usink[threadIdx.x] = r[0] ^ r[1] ^ r[2] ^ r[3];
}
extern "C" __global__ void k_ldsm_x4(int off) { ldsm_probe<false>(off); }
extern "C" __global__ void k_ldsm_x4_t(int off) { ldsm_probe<true>(off); }

template <typename T>
__device__ void mma_probe(const uint32_t* in) {
  float d[4] = {0.f, 1.f, 2.f, 3.f};
  const uint32_t a[4] = {in[threadIdx.x], in[threadIdx.x + 32], in[threadIdx.x + 64],
                         in[threadIdx.x + 96]};
  mma16816<T>(d, a, in[threadIdx.x + 128], in[threadIdx.x + 160]);
  sink[threadIdx.x] = d[0] + d[1] + d[2] + d[3];
}
extern "C" __global__ void k_mma16816_bf16(const uint32_t* in) { mma_probe<__nv_bfloat16>(in); }
extern "C" __global__ void k_mma16816_f16(const uint32_t* in) { mma_probe<__half>(in); }

extern "C" __global__ void k_f_mul(const float* a) { sink[threadIdx.x] = f_mul(a[0], a[1]); }
extern "C" __global__ void k_f_add(const float* a) { sink[threadIdx.x] = f_add(a[0], a[1]); }
extern "C" __global__ void k_f_sub(const float* a) { sink[threadIdx.x] = f_sub(a[0], a[1]); }
extern "C" __global__ void k_f_div(const float* a) { sink[threadIdx.x] = f_div(a[0], a[1]); }
extern "C" __global__ void k_f_sqrt(const float* a) { sink[threadIdx.x] = f_sqrt(a[0]); }
extern "C" __global__ void k_f_lt(const float* a) { usink[threadIdx.x] = f_lt(a[0], a[1]); }
extern "C" __global__ void k_f_mul_add(const float* a) {
  sink[threadIdx.x] = f_add(f_mul(a[0], a[1]), a[2]);
}
extern "C" __global__ void k_plain_mul_add(const float* a) {
  sink[threadIdx.x] = a[0] * a[1] + a[2];
}
"""

# wrapper (as ptx.h names it) -> probe kernel.
KERNEL = {"cp_async16": "k_cp_async", "cp_async_commit": "k_cp_async",
          "cp_async_wait": "k_cp_async", "ldsm_x4": "k_ldsm_x4", "ldsm_x4_t": "k_ldsm_x4_t",
          "mma16816<__nv_bfloat16>": "k_mma16816_bf16", "mma16816<__half>": "k_mma16816_f16",
          "f_mul": "k_f_mul", "f_add": "k_f_add", "f_sub": "k_f_sub", "f_div": "k_f_div",
          "f_sqrt": "k_f_sqrt", "f_lt": "k_f_lt"}


def _sass_pattern(decoded: str) -> str:
    """The SASS an instruction must compile to, from the emulator's decoding ("kind a b c d")."""
    kind, a, b, _, _ = decoded.split()
    a, b = int(a), int(b)
    if kind == "ldmatrix":
        return rf"LDSM\.16\.{'MT88' if b else 'M88'}\.{a}\b"
    if kind == "mma.m16n8k16":
        return r"HMMA\.16816\.F32 " if a == 1 else r"HMMA\.16816\.F32\.BF16 "
    if kind == "cp.async":
        return r"LDGSTS\.E\.BYPASS\.[\w.]*128" if b else r"LDGSTS\.E\.[\w.]*"
    if kind == "cp.async.commit_group":
        return r"LDGDEPBAR"
    if kind == "cp.async.wait_group":
        return r"DEPBAR\.LE SB0, 0x1"  # k_cp_async waits for all but 1 group first
    if kind in ("add", "sub"):
        return r"FADD "
    if kind == "mul":
        return r"FMUL "
    if kind == "div":
        return r"MUFU\.RCP"
    if kind == "sqrt":
        return r"MUFU\.RSQ"
    if kind == "setp":
        return r"FSETP\."
    if kind == "selp":
        return r"SEL|FSETP"  # may fold into the predicate's use
    raise AssertionError(f"no SASS pattern for {decoded!r}")


def _wrappers():
    """ptx.h's wrappers: name -> the PTX text of its asm statement."""
    text = (CUDA / "ptx.h").read_text()
    out = {}
    for m in re.finditer(r"__device__ __forceinline__ [\w:]+ (\w+(?:<[\w:]+>)?)\(", text):
        brace, decl = text.find("{", m.end()), text.find(");", m.end())
        if decl != -1 and decl < brace:
            continue  # a declaration
        body = text[brace:text.index("\n}", brace)]
        asm = re.search(r'\basm\s*(?:volatile\s*)?\(((?:\s*"(?:[^"\\]|\\.)*")+)', body)
        if asm:
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', asm.group(1))
            out[m.group(1)] = bytes("".join(parts), "utf-8").decode("unicode_escape")
    return out


def _functions(dump: str, header: str) -> dict[str, str]:
    """Splits a PTX (header '.entry') or SASS ('Function : ') dump by kernel name."""
    out = {}
    if header == "sass":
        for part in re.split(r"\n\s*Function : ", dump)[1:]:
            name, _, body = part.partition("\n")
            out[name.strip()] = body
    else:
        for part in re.split(r"\n(?=\.(?:visible |weak )*\.?entry )", dump)[1:]:
            m = re.match(r"\.(?:visible |weak )*\.?entry (\w+)\(", part)
            if m:
                out[m.group(1)] = part
    return out


def _tools():
    home = _buildcfg.find_cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    cuobjdump = _buildcfg.find_cuobjdump()
    if not nvcc or not os.access(nvcc, os.X_OK) or not cuobjdump:
        pytest.skip("needs nvcc and cuobjdump")
    return nvcc, cuobjdump


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> (PTX by kernel, SASS by kernel) of the probe file."""
    nvcc, cuobjdump = _tools()
    tmp = tmp_path_factory.mktemp("ptx")
    src = tmp / "probe.cu"
    src.write_text(PROBE)
    out = {}
    for arch in ARCHS:
        num = arch[3:]
        flags = ["-O3", "-std=c++17", "--use_fast_math", f"-I{CUDA}"]
        ptx, cubin = tmp / f"{arch}.ptx", tmp / f"{arch}.cubin"
        subprocess.run([nvcc, *flags, "-ptx", f"-arch=compute_{num}", "-o", ptx, src],
                       check=True, capture_output=True, text=True)
        subprocess.run([nvcc, *flags, "-cubin", f"-arch=sm_{num}", "-o", cubin, src],
                       check=True, capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True,
                              text=True).stdout
        out[arch] = (_functions(ptx.read_text(), "ptx"), _functions(sass, "sass"))
    return out


@pytest.fixture(scope="module")
def emu():
    return load()


def test_every_wrapper_has_a_probe():
    assert set(_wrappers()) == set(KERNEL), "add the new wrapper to PROBE and KERNEL"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("wrapper", sorted(KERNEL))
def test_wrapper_compiles_to_what_the_emulator_decodes(compiled, emu, wrapper, arch):
    text = _wrappers()[wrapper]
    ptx, sass = compiled[arch]
    kernel = KERNEL[wrapper]
    decoded = emu.emu_ptx_decode(text)
    assert decoded and not decoded[0].startswith("error"), decoded
    # The PTX holds every instruction of the string, opcode and modifiers as written.
    opcodes = re.findall(r"(?:^|[;{])\s*(?:@!?\w+\s+)?([a-z][\w.:]*)", text)
    assert len(opcodes) == len(decoded), (opcodes, decoded)
    for op in opcodes:
        assert re.search(rf"\b{re.escape(op)}[\s;]", ptx[kernel]), (op, kernel)
    # The SASS holds the machine instruction the decoding implies.
    for d in decoded:
        pattern = _sass_pattern(d)
        assert re.search(pattern, sass[kernel]), f"{wrapper}: {d} -> no {pattern} in {kernel}"


@pytest.mark.parametrize("arch", ARCHS)
def test_rounded_float_ops_are_not_contracted(compiled, arch):
    _, sass = compiled[arch]
    assert "FFMA" not in sass["k_f_mul_add"]
    assert re.search(r"FMUL ", sass["k_f_mul_add"]) and re.search(r"FADD ", sass["k_f_mul_add"])
    assert "FFMA" in sass["k_plain_mul_add"], "the control: a * b + c contracts"


def _adam_ptx(tmp_path):
    """adam.cu's PTX: from the extension's object when it is newer than the sources, else
    compiled (one arch: NVVM's contraction decisions do not depend on it)."""
    nvcc, cuobjdump = _tools()
    obj = next(iter(sorted((ROOT / "build").glob("temp.*/csrc/cuda/adam.o"))), None)
    newest = max(p.stat().st_mtime for p in [CUDA / "adam.cu", CUDA / "ptx.h", CUDA / "common.cuh",
                                              ROOT / "csrc" / "adam.h"])
    if obj is not None and obj.stat().st_mtime > newest:
        return subprocess.run([cuobjdump, "-ptx", obj], check=True, capture_output=True,
                              text=True).stdout
    import torch
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out = tmp_path / "adam.ptx"
    subprocess.run([nvcc, "-ptx", "-arch=compute_90", "-O3", "-std=c++20", "--use_fast_math",
                    "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc,
                    "-o", out, CUDA / "adam.cu"], check=True, capture_output=True, text=True)
    return out.read_text()


def test_adam_kernels_have_only_rounded_float_arithmetic(tmp_path):
    kernels = {k: v for k, v in _functions(_adam_ptx(tmp_path), "ptx").items()
               if "adam_kernel" in k}
    assert len(kernels) >= 16
    for name, body in kernels.items():
        ops = re.findall(r"^\s+((?:add|sub|mul|fma|div|sqrt)\S*\.f32)\s", body, re.M)
        assert len(ops) > 50, name
        bad = sorted({o for o in ops if o.startswith("fma") or ".rn" not in o})
        assert not bad, f"{name}: {bad} (contractible or unrounded f32 arithmetic)"
