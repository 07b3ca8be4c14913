"""Facts about this machine and build, for `fastlm info` and the benchmark JSON: versions,
git commit, device name, and the CUDA archs the compiled extension holds."""

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

import fastlm
from fastlm import _buildcfg, _ext


def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions():
    """{package: version} for fastlm, torch, triton, python, and the CUDA toolkit torch was
    built with (None where absent)."""
    return {"fastlm": fastlm.__version__, "torch": torch.__version__,
            "triton": _dist_version("triton"), "python": platform.python_version(),
            "torch_cuda": torch.version.cuda}


def git_commit():
    """HEAD of the git checkout fastlm runs from, or None (an installed wheel, no git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlm.__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device):
    """The GPU's name (with its sm_XX), or the CPU's model and thread count."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def cubin_archs(library):
    """(archs, None) from `cuobjdump --list-elf library`, or (None, why not)."""
    tool = _buildcfg.find_cuobjdump()
    if tool is None:
        return None, "cuobjdump not found (CUDA toolkit, PATH, or the triton package)"
    try:
        out = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{tool} failed: {e}"
    if out.returncode != 0:
        return None, f"{tool} --list-elf failed: {out.stderr.strip()[:200]}"
    return sorted(set(re.findall(r"\bsm_\d+[af]?\b", out.stdout))), None


def metadata(device):
    """Everything a benchmark JSON records about where and what it ran."""
    return {"device": device_name(device), "device_type": device.type, **versions(),
            "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cuda_archs": _ext.cuda_archs(), "extension_loaded": _ext.C is not None,
            "torch_threads": torch.get_num_threads()}
