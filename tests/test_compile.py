"""`fastlm compile`: builds the extension and the Triton kernels for sm_80 and sm_90 here,
where there is no GPU, and a second run finds the Triton kernels in the cache."""

import glob
import json
import os
import subprocess
import sys

import pytest

from fastlm import _buildcfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, timeout=900):
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for in-process Triton tests
    return subprocess.run([sys.executable, "-m", "fastlm.compile", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def _triton_cubin_archs(cache):
    archs = []
    for meta in glob.glob(os.path.join(cache, "*", "*.json")):
        with open(meta) as f:
            data = json.load(f)
        if "target" in data:
            archs.append(data["target"]["arch"])
    return sorted(archs)


@pytest.mark.slow
@pytest.mark.skipif(_buildcfg.find_cuda_home() is None, reason="no CUDA toolkit here")
def test_compile_sm80_sm90_without_gpu(tmp_path):
    out = tmp_path / "kernels"
    r = _run(["--arch", "sm_80,sm_90", "--out", str(out), "--dtypes", "bfloat16",
              "--sizes", "1024,32768"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FASTLM_EXT_DIR" in r.stdout

    so = glob.glob(str(out / "ext" / "fastlm" / "_C*.so"))
    assert len(so) == 1
    tool = _buildcfg.find_cuobjdump()
    if tool:
        elf = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True).stdout
        assert ".sm_80." in elf and ".sm_90." in elf, elf

    # Triton, for each arch: LayerNorm forward and backward per size, the same with the fused
    # residual add + dropout (add_layer_norm) per size, and one column sum (9);
    # AdamW plain, clipped, scaled, scaled and clipped, and the sum of squares (5); attention
    # forward, dk/dv and dq, causal and not, for head dims 64 and 128 (12), and the
    # D = rowsum(dO * O) pass per head dim (2); for sm_90 also the TMA attention kernels the
    # table runs there (fastlm/kernels/attention_sm90.py): forward, dk/dv and dq, causal and not, per
    # head dim, and the fused backward at head dim 64 (13).
    cache = str(out / "triton")
    archs = _triton_cubin_archs(cache)
    assert archs.count(80) == 28 and archs.count(90) == 41, archs
    assert len(glob.glob(os.path.join(cache, "*", "*.cubin"))) == 69

    # The extension loads from there (FASTLM_EXT_DIR) and reports its archs.
    env = dict(os.environ, FASTLM_EXT_DIR=str(out / "ext"))
    probe = subprocess.run(
        [sys.executable, "-c", "import fastlm; print(fastlm._ext.C.__file__); "
         "print(fastlm._ext.cuda_archs())"], capture_output=True, text=True, env=env)
    assert probe.returncode == 0, probe.stderr
    assert str(out / "ext") in probe.stdout and "'sm_80', 'sm_90'" in probe.stdout

    # A second run (a fresh process, as a later run on the GPU is) compiles nothing new.
    before = sorted(os.listdir(cache))
    r2 = _run(["--arch", "sm_80,sm_90", "--out", str(out), "--dtypes", "bfloat16",
               "--sizes", "1024,32768", "--no-extension"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert sorted(os.listdir(cache)) == before


def test_compile_unknown_arch():
    r = _run(["--arch", "sm_42", "--no-extension", "--no-triton"])
    assert r.returncode == 2
    assert "unknown CUDA arch 'sm_42'" in r.stderr and "sm_90" in r.stderr


def test_compile_without_toolkit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["CUDA_HOME"] = str(tmp_path / "no-such-toolkit")
    r = _run(["--arch", "sm_90", "--no-triton"], env=env)
    assert r.returncode == 2
    assert "no CUDA toolkit found" in r.stderr


def test_compile_bad_dtype_and_sizes():
    r = _run(["--arch", "sm_90", "--no-extension", "--dtypes", "int8"])
    assert r.returncode == 2 and "unknown dtype" in r.stderr
    r = _run(["--arch", "sm_90", "--no-extension", "--sizes", "abc"])
    assert r.returncode == 2 and "--sizes" in r.stderr


ALT_PYTHON = os.environ.get("FASTLM_ALT_TRITON_PYTHON", "")


@pytest.mark.ondemand
@pytest.mark.skipif(not ALT_PYTHON, reason="set FASTLM_ALT_TRITON_PYTHON to a python whose triton "
                                           "is another release (the GPU machine's 3.6)")
def test_compile_sm90_with_another_triton(tmp_path):
    """The supported triton range is 3.6 to 3.8 and CI has only one of them: a kernel that 3.8
    compiles can fail under 3.6 (tuple default arguments in @triton.jit helpers did). With
    FASTLM_ALT_TRITON_PYTHON set (for example a venv with --system-site-packages and
    `pip install triton==3.6.0`), every kernel `fastlm compile` builds for sm_90 compiles there
    too."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    ver = subprocess.run([ALT_PYTHON, "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True, env=env)
    assert ver.returncode == 0, ver.stderr
    r = subprocess.run([ALT_PYTHON, "-m", "fastlm.compile", "--arch", "sm_90", "--no-extension",
                        "--dtypes", "bfloat16,float16", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, f"triton {ver.stdout.strip()}: {r.stderr[-3000:]}"
    assert "kernels for sm_90" in r.stderr
