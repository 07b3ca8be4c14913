"""The build: fastlm._C is loaded and holds the CUDA targets asked for; fastlm._buildcfg parses
arch lists, emits gencode flags and finds the toolkit; importing fastlm stays cheap."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import _buildcfg, _ext


def test_extension_loaded():
    assert _ext.C is not None, _ext.ERROR
    assert _ext.ERROR is None
    assert _ext.C.torch_version == torch.__version__.split("+")[0]
    assert hasattr(torch.ops.fastlm, "layer_norm_fwd")
    assert hasattr(torch.ops.fastlm, "layer_norm_bwd")


def _toolkit_at_build():
    """Whether this build had a CUDA toolkit (what setup.py decides from)."""
    return _buildcfg.find_cuda_home() is not None and torch.version.cuda is not None


def test_cuda_archs_of_the_build():
    archs = _ext.cuda_archs()
    if not _ext.C.with_cuda:
        assert archs == []
        return
    # What setup.py asks nvcc for, from the same environment.
    assert archs == _buildcfg.resolve_archs(os.environ)
    overridden = os.environ.get("FASTLM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not overridden and not torch.cuda.is_available():
        assert archs == ["sm_80", "sm_90"]


def test_built_with_cuda_when_a_toolkit_exists():
    """No GPU is needed to compile the CUDA kernels (DESIGN: never decide from is_available)."""
    if not _toolkit_at_build():
        pytest.skip("no CUDA toolkit or a CPU-only torch here")
    assert _ext.C.with_cuda == 1


def _cuobjdump():
    cands = []
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cands.append(os.path.join(root, "bin", "cuobjdump"))
    cands.append(shutil.which("cuobjdump"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def test_cubins_for_every_arch():
    if not _ext.C.with_cuda:
        pytest.skip("built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")
    out = subprocess.run([tool, "--list-elf", _ext.C.__file__], capture_output=True, text=True,
                         check=True).stdout
    for arch in _ext.cuda_archs():
        assert f".{arch}." in out, f"no {arch} cubin in {_ext.C.__file__}:\n{out}"


# ---------------------------------------------------------------------------------------------
# fastlm._buildcfg
@pytest.mark.parametrize("spec,want", [
    ("8.0;9.0a", ["sm_80", "sm_90a"]),
    ("sm_80,sm_90", ["sm_80", "sm_90"]),
    ("9.0+PTX", ["sm_90"]),
    ("8.0 9.0+PTX", ["sm_80", "sm_90"]),
    ("90", ["sm_90"]),
    ("compute_86", ["sm_86"]),
    (" sm_80 ; sm_80, 8.0 ", ["sm_80"]),
    ("10.0a;12.0", ["sm_100a", "sm_120"]),
])
def test_parse_archs(spec, want):
    assert _buildcfg.parse_archs(spec) == want


@pytest.mark.parametrize("spec", ["sm_99", "7.0", "hopper", "9.0b"])
def test_parse_archs_unknown(spec):
    with pytest.raises(ValueError, match=r"unknown CUDA arch .*expected one of sm_75, sm_80"):
        _buildcfg.parse_archs(spec)


@pytest.mark.parametrize("spec", ["", " ; ,"])
def test_parse_archs_empty(spec):
    with pytest.raises(ValueError, match="no CUDA arch in"):
        _buildcfg.parse_archs(spec)


def test_resolve_archs_precedence():
    assert _buildcfg.resolve_archs({"FASTLM_CUDA_ARCHS": "8.0", "TORCH_CUDA_ARCH_LIST": "9.0"},
                                   (8, 6)) == ["sm_80"]
    assert _buildcfg.resolve_archs({"TORCH_CUDA_ARCH_LIST": "9.0"}, (8, 6)) == ["sm_90"]
    assert _buildcfg.resolve_archs({}, (8, 6)) == ["sm_86"]
    assert _buildcfg.resolve_archs({}, (9, 0)) == ["sm_90a"]


def test_resolve_archs_default_without_gpu(monkeypatch):
    monkeypatch.setattr(_buildcfg, "_visible_capability", lambda: None)
    assert _buildcfg.resolve_archs({}) == ["sm_80", "sm_90"]


def test_gencode_flags():
    assert _buildcfg.gencode_flags(["sm_80", "sm_90"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    # Arch-specific targets get SASS only; the PTX is of the newest portable arch.
    assert _buildcfg.gencode_flags(["sm_80", "sm_90a"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    assert _buildcfg.gencode_flags(["sm_90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]


REAL_NVCC = "/usr/local/cuda/bin/nvcc"


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return monkeypatch


def _toolkit_root():
    return os.path.dirname(os.path.dirname(os.path.realpath(REAL_NVCC)))


@pytest.mark.skipif(not os.path.isfile(REAL_NVCC), reason="no toolkit at /usr/local/cuda")
def test_find_cuda_home_resolves_a_wrapper_script(tmp_path, no_cuda_env):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {os.path.realpath(REAL_NVCC)} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    no_cuda_env.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert shutil.which("nvcc") == str(wrapper)
    found = _buildcfg.find_cuda_home()
    assert found in ("/usr/local/cuda-13.0", _toolkit_root())
    assert os.path.realpath(found) == _toolkit_root()


@pytest.mark.skipif(not os.path.isfile(REAL_NVCC), reason="no toolkit at /usr/local/cuda")
def test_find_cuda_home_follows_a_symlinked_nvcc(tmp_path, no_cuda_env):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(REAL_NVCC)
    no_cuda_env.setenv("PATH", str(bindir))
    assert os.path.realpath(_buildcfg.find_cuda_home()) == _toolkit_root()


def test_find_cuda_home_from_env(tmp_path, no_cuda_env):
    no_cuda_env.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit
    assert _buildcfg.find_cuda_home() is None
    if os.path.isfile(REAL_NVCC):
        no_cuda_env.setenv("CUDA_HOME", "/usr/local/cuda")
        assert _buildcfg.find_cuda_home() == "/usr/local/cuda"


def test_default_max_jobs():
    jobs = _buildcfg.default_max_jobs()
    assert isinstance(jobs, int)
    assert 1 <= jobs <= (os.cpu_count() or 1)


def test_buildcfg_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _buildcfg; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(_buildcfg.__file__)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Importing fastlm stays cheap: torch.compile's machinery and Triton load on first use only.
_IMPORT_PROBE = (
    "import sys, json, torch\n"
    "before = set(sys.modules)\n"
    "import fastlm\n"
    "new = set(sys.modules) - before\n"
    "print(json.dumps(sorted(m for m in new if m.split('.')[0] == 'triton'"
    " or m.startswith(('torch._dynamo', 'torch._inductor')))))\n")


def _modules_imported_by_fastlm():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_load_dynamo_or_inductor():
    new = _modules_imported_by_fastlm()
    assert not [m for m in new if m.startswith(("torch._dynamo", "torch._inductor"))], new


def test_import_does_not_load_triton():
    new = _modules_imported_by_fastlm()
    assert not [m for m in new if m.split(".")[0] == "triton"], new[:5]


def test_version():
    assert fastlm.__version__ == "0.1.0"
    assert set(fastlm.__all__) >= {"layer_norm", "use_backend", "backends", "nn"}


def test_repository_root_shadows_no_other_package():
    """Run from the repository root (`python -m fastlm bench`, `python -m pytest`), the root is
    on sys.path: a top-level package folder there shadows any installed package of that name.
    The Triton kernels lived in kernels/ and shadowed Hugging Face's `kernels`, which
    transformers 5.2x imports while building a model (the hf benchmark case failed with
    "cannot import name 'CUDAProperties' from 'kernels'"); they are fastlm/kernels/ now."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packages = sorted(d for d in os.listdir(root)
                      if os.path.isfile(os.path.join(root, d, "__init__.py")))
    assert packages == ["fastlm"], packages
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u, sys; s = u.find_spec('kernels'); "
         "print(s.origin if s else None)"], cwd=root, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    origin = probe.stdout.strip()
    assert origin == "None" or not origin.startswith(root + os.sep), origin
