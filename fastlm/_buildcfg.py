"""Build configuration shared by setup.py and `fastlm compile`.

Deliberately free of torch and of the rest of fastlm: setup.py imports it before torch, so
that CUDA_HOME is right when torch.utils.cpp_extension reads it.
"""

import os
import re
import shutil

# Targets this toolkit generation (CUDA 12.x/13.x) compiles for; CUDA 13 dropped sm_70 and older.
KNOWN_ARCHS = ("75", "80", "86", "87", "88", "89", "90", "90a", "100", "100a", "101", "101a",
               "103", "103a", "110", "110a", "120", "120a", "121", "121a")
DEFAULT_ARCHS = ("sm_80", "sm_90")


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _resolve_wrapper(nvcc):
    """nvcc on PATH may be a shell script that execs the real one: follow it."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(root):
        return root
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for m in re.finditer(rb"(/[^\s\"']*/bin/nvcc)\b", head):
        cand = os.path.dirname(os.path.dirname(os.path.realpath(m.group(1).decode())))
        if _is_toolkit(cand):
            return cand
    return None


def find_cuda_home():
    """CUDA_HOME (or CUDA_PATH), else nvcc on PATH with wrappers resolved, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            return root if _is_toolkit(root) else None
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _resolve_wrapper(nvcc)
        if root:
            return root
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def find_cuobjdump():
    """cuobjdump from the toolkit (find_cuda_home), PATH or /usr/local/cuda/bin, else the copy
    the triton package ships (triton/backends/nvidia/bin), else None."""
    import importlib.util

    home = find_cuda_home()
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates += [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def parse_archs(spec):
    """'8.0;9.0a', '8.0 9.0+PTX', 'sm_80,sm_90a', '90' -> ['sm_80', 'sm_90a'] (order kept,
    duplicates dropped). Raises ValueError naming an unknown arch and the known ones."""
    out = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        t = tok.lower().replace("+ptx", "")
        t = t.removeprefix("sm_").removeprefix("compute_")
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)", t)
        if m:
            t = m.group(1) + m.group(2) + m.group(3)
        if t not in KNOWN_ARCHS:
            raise ValueError(
                f"unknown CUDA arch {tok!r}: expected one of "
                + ", ".join("sm_" + a for a in KNOWN_ARCHS) + " (or the 8.0/9.0a spelling)")
        if "sm_" + t not in out:
            out.append("sm_" + t)
    if not out:
        raise ValueError(f"no CUDA arch in {spec!r}: expected e.g. 'sm_80,sm_90' or '8.0;9.0'")
    return out


def resolve_archs(env, visible_capability=None):
    """FASTLM_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the visible GPU, else 8.0 and 9.0."""
    for var in ("FASTLM_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if env.get(var):
            return parse_archs(env[var])
    if visible_capability is None:
        visible_capability = _visible_capability()
    if visible_capability is not None:
        major, minor = visible_capability
        # Hopper: the arch-specific target so wgmma/TMA kernels can be built.
        return [f"sm_{major}{minor}a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"]
    return list(DEFAULT_ARCHS)


def _visible_capability():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability(0)
    except Exception:  # noqa: BLE001  (no driver, no GPU: fall back to the defaults)
        pass
    return None


def gencode_flags(archs):
    """SASS for every arch, plus PTX of the newest portable arch so newer GPUs can JIT it."""
    flags = []
    for a in archs:
        num = a[3:]
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    portable = [a for a in archs if a[-1].isdigit()]
    if portable:
        num = max(portable, key=lambda a: int(a[3:]))[3:]
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def hopper_archs(archs):
    """The targets of a source with Hopper-only code (wgmma, TMA and setmaxnreg need the
    arch-specific sm_90a): `archs` with sm_90 replaced by sm_90a; None when the build does not
    target Hopper (the file then compiles to stubs that are never launched)."""
    if "sm_90a" in archs:
        return list(archs)
    if "sm_90" not in archs:
        return None
    return ["sm_90a" if a == "sm_90" else a for a in archs]


def default_max_jobs():
    """One job per core, but at most one per 3 GiB of RAM (nvcc on torch headers is hungry)."""
    cores = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(ram // (3 << 30))))
