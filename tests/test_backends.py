"""fastlm.backends: what is available and why not, the default per device, and the overrides
(use_backend, FASTLM_BACKEND)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fastlm
from conftest import GPU
from fastlm import backends
from fastlm.backends import BackendUnavailable
from fastlm.ops.layer_norm import KERNEL_DTYPES, reference


def test_available_structure():
    avail = backends.available()
    assert set(avail) == set(backends.NAMES) == {"cuda", "triton", "cpu", "torch"}
    for name, per_device in avail.items():
        assert set(per_device) == {"cuda", "cpu"}, name
        for device, (ok, why) in per_device.items():
            assert isinstance(ok, bool), (name, device)
            assert isinstance(why, str), (name, device)
            assert ok == (why == ""), f"{name}/{device}: a reason exactly when unavailable"


def test_available_is_a_copy():
    backends.available()["cpu"]["cpu"] = (False, "changed by a caller")
    assert backends.available()["cpu"]["cpu"] == (True, "")


def test_available_on_this_machine():
    avail = backends.available()
    assert avail["torch"] == {"cuda": (True, ""), "cpu": (True, "")}
    assert avail["cpu"]["cpu"] == (True, "")
    assert avail["cpu"]["cuda"] == (False, "the cpu backend runs on CPU tensors only")
    assert avail["cuda"]["cpu"] == (False, "the cuda backend runs on CUDA tensors only")
    assert avail["cuda"]["cuda"][0] == GPU
    assert avail["triton"]["cuda"][0] == GPU
    if not GPU:
        assert "torch.cuda.is_available() is False" in avail["cuda"]["cuda"][1]
        assert avail["triton"]["cpu"] == (True, "")  # conftest set TRITON_INTERPRET=1


def test_triton_on_cpu_reason_names_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backends._probe()["triton"]["cpu"]
    assert not ok
    assert "TRITON_INTERPRET=1" in why


def test_cuda_reason_names_the_fix_when_built_without_cuda(monkeypatch):
    monkeypatch.setattr(fastlm._ext, "C", types.SimpleNamespace(with_cuda=0))
    ok, why = backends._probe()["cuda"]["cuda"]
    assert not ok
    assert "built without CUDA kernels" in why
    assert "rebuild with nvcc on PATH" in why


def test_default_for_each_device():
    assert fastlm._ext.C is not None
    assert backends.default_for("cpu") == "cpu"
    assert backends.default_for("cuda") == ("cuda" if GPU else "torch")
    assert backends.default_for("meta") == "torch"


def test_select_automatic():
    cpu = torch.device("cpu")
    assert backends.forced() is None
    for dtype in KERNEL_DTYPES:
        assert backends.select("op", cpu, dtype, KERNEL_DTYPES) == "cpu"
    assert backends.select("op", cpu, torch.float64, KERNEL_DTYPES) == "torch"


def test_use_backend_nesting_and_restore():
    assert backends.forced() is None
    with fastlm.use_backend("torch"):
        assert backends.forced() == "torch"
        with fastlm.use_backend("cpu"):
            assert backends.forced() == "cpu"
            with fastlm.use_backend(None):
                assert backends.forced() is None
            assert backends.forced() == "cpu"
        assert backends.forced() == "torch"
    assert backends.forced() is None


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with fastlm.use_backend("torch"):
            raise KeyError("boom")
    assert backends.forced() is None


def test_use_backend_picks_the_backend_that_runs(monkeypatch):
    calls = []
    real = fastlm.ops.layer_norm.reference

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastlm.ops.layer_norm, "reference", spy)
    x = torch.randn(3, 8)
    fastlm.layer_norm(x, (8,))
    assert calls == []  # default on the CPU: the cpu kernels
    with fastlm.use_backend("torch"):
        fastlm.layer_norm(x, (8,))
    assert calls == [x.shape]


def test_env_var_honored_after_reload(monkeypatch, restore_env):
    monkeypatch.setenv("FASTLM_BACKEND", " Torch ")
    backends.reload_env()
    assert backends.forced() == "torch"
    assert backends.select("op", torch.device("cpu"), torch.float32, KERNEL_DTYPES) == "torch"
    with fastlm.use_backend("cpu"):
        assert backends.forced() == "cpu"  # the context manager wins over the environment
    assert backends.forced() == "torch"
    monkeypatch.setenv("FASTLM_BACKEND", "")
    backends.reload_env()
    assert backends.forced() is None


def test_env_var_unavailable_backend_errors_at_use(monkeypatch, restore_env):
    if GPU:
        pytest.skip("the cuda backend is available on this machine")
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    backends.reload_env()
    with pytest.raises(BackendUnavailable, match="runs on CUDA tensors only"):
        fastlm.layer_norm(torch.randn(2, 4), (4,))


def test_env_var_read_at_import():
    code = "import fastlm; print(fastlm.backends.forced())"
    env = dict(os.environ, FASTLM_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "torch"


def test_bad_env_var_fails_import_with_a_clear_error():
    env = dict(os.environ, FASTLM_BACKEND="gpu")
    out = subprocess.run([sys.executable, "-c", "import fastlm"], env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "FASTLM_BACKEND: unknown fastlm backend 'gpu'" in out.stderr


def test_float64_runs_on_torch_reference():
    x = torch.randn(4, 6, dtype=torch.float64)
    assert backends.select("op", x.device, x.dtype, KERNEL_DTYPES) == "torch"
    assert torch.equal(fastlm.layer_norm(x, 6), reference(x, (6,)))


def test_missing_extension_leaves_torch_and_triton_usable(tmp_path):
    """A build directory without _C: import works, the reason is reported, ops run on torch."""
    code = (
        "import json, torch, fastlm\n"
        "a = fastlm.backends.available()\n"
        "y = fastlm.layer_norm(torch.randn(3, 5), 5)\n"
        "print(json.dumps({'err': fastlm._ext.ERROR, 'cpu': a['cpu']['cpu'],"
        " 'cuda': a['cuda']['cuda'], 'default': fastlm.backends.default_for('cpu'),"
        " 'shape': list(y.shape)}))\n")
    env = dict(os.environ, FASTLM_EXT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cpu"][0] is False and str(tmp_path) in got["cpu"][1]
    assert got["cuda"][0] is False
    assert got["default"] == "torch"
    assert got["shape"] == [3, 5]
    assert "holds no fastlm/_C" in got["err"]


def test_missing_extension_reason_does_not_blame_the_torch_version(tmp_path):
    code = "import fastlm; print(fastlm._ext.ERROR)"
    env = dict(os.environ, FASTLM_EXT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert "another torch" not in out.stdout
