"""What the Hopper attention kernels (csrc/cuda/attention_sm90.cu) promise, checked in the built
library's sm_90a code without a GPU: the instructions of the FlashAttention-3 design (wgmma as
HGMMA with N >= 128 for Q K^T, TMA loads and stores, mbarriers, register reallocation) and no
spills. The resources asserted here are the ones recorded in benchmarks/NOTES.md."""

import re
import subprocess

import pytest

from fastlm import _buildcfg, _ext

COMMON = [r"UTMALDG\.4D", r"SYNCS\.ARRIVE\.TRANS64", r"SYNCS\.PHASECHK\.TRANS64", r"USETMAXREG",
          r"BAR\.SYNC", r"ELECT", r"FENCE\.VIEW\.ASYNC\.S"]
KERNELS = {
    # kernel name -> instructions its SASS must contain (regular expressions): the forward's
    # Q K^T with N = 128 keys, its TMA store; the backward's 64 x 64 S^T / dP^T, its 64 x D
    # dK / dV, and the dQ semaphore (acquire load, release add at GPU scope)
    "attn_fwd_sm90": COMMON + [r"HGMMA\.64x(128|192|256)x16\.F32", r"UTMASTG\.4D", r"BAR\.ARV"],
    "attn_bwd_sm90": COMMON + [r"HGMMA\.64x64x16\.F32",
                               r"HGMMA\.64x(64|128)x16\.F32[.A-Z0-9]* R\d+, R",
                               r"REDG\.E\.ADD\.S32\.STRONG\.GPU", r"LDG\.E\.STRONG\.GPU"],
}
MAX_REGS = 168  # __launch_bounds__(384, 1): the compiler's cap before setmaxnreg


def _library_targets_hopper():
    return any(a in ("sm_90", "sm_90a") for a in _ext.cuda_archs())


pytestmark = pytest.mark.skipif(not _library_targets_hopper(),
                                reason="fastlm._C has no CUDA kernels for sm_90")


@pytest.fixture(scope="module")
def cuobjdump():
    tool = _buildcfg.find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH, triton)")
    return tool


def _run(tool, *args):
    return subprocess.run([tool, *args, _ext.C.__file__], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def sass(cuobjdump):
    """Function name -> its sm_90a SASS text."""
    assert ".sm_90a." in _run(cuobjdump, "--list-elf"), (
        f"{_ext.C.__file__} targets sm_90 but has no sm_90a code (setup.py HOPPER_SOURCES)")
    out = _run(cuobjdump, "-sass", "-arch", "sm_90a")
    funcs = {}
    for part in re.split(r"\n\s*Function : ", out)[1:]:
        name, _, body = part.partition("\n")
        funcs[name.strip()] = body
    return funcs


@pytest.fixture(scope="module")
def resources(cuobjdump):
    """Function name -> {REG: .., STACK: .., LOCAL: .., SHARED: ..} of the sm_90a code."""
    out = _run(cuobjdump, "-res-usage", "-arch", "sm_90a")
    res = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*(REG:.*)", out):
        res[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(2))}
    return res


def _named(funcs, kernel):
    found = {n: v for n, v in funcs.items() if kernel in n}
    assert found, f"no {kernel} in the sm_90a code of {_ext.C.__file__}"
    return found


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_sm90_kernel_instructions(sass, kernel):
    found = _named(sass, kernel)
    # one instantiation per (dtype, head dim): bf16 and f16 at 64 and 128
    assert len(found) >= 4, sorted(found)
    for name, body in found.items():
        for pattern in KERNELS[kernel]:
            assert re.search(pattern, body), f"{name}: no {pattern} in its SASS"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name}: local memory (spills) in its SASS"


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_sm90_kernel_resources(resources, kernel):
    for name, r in _named(resources, kernel).items():
        assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{name} spills: {r}"
        assert r["REG"] <= MAX_REGS, f"{name}: {r['REG']} registers"
