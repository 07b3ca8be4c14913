"""Which backends exist here, which one runs, and the switches that override the choice.

Backends: ``cuda`` (CUDA C++ kernels in fastlm._C), ``triton`` (fastlm/kernels/), ``cpu`` (C++ CPU
kernels in fastlm._C) and ``torch`` (the pure-PyTorch reference). The default for a tensor is
the fastest available backend for its device: per op on a GPU (CUDA_ORDER, else cuda > triton >
torch), cpu > torch on the CPU. Override with ``with fastlm.use_backend("triton"): ...`` or the
environment variable ``FASTLM_BACKEND`` (read at import and by :func:`reload_env`); the context
manager wins.
"""

import contextlib
import os

import torch

from . import _ext

NAMES = ("cuda", "triton", "cpu", "torch")
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# The default backend per op on CUDA tensors, in one place (ops not listed: _DEFAULT_ORDER).
# NOT YET MEASURED: no GPU has run fastlm's kernels. Triton comes first where its kernels were
# verified against the reference (in the interpreter) while the CUDA C++ kernels had run only in
# the emulator. scripts/gpu_run.sh + scripts/gpu_report.py print the order a GPU run implies (a
# backend that failed its tests is never a default; then the fastest at the headline shapes):
# copy it here with those numbers (README, benchmarks/NOTES.md).
CUDA_ORDER = {
    "fastlm.layer_norm": ("cuda", "triton", "torch"),
    "fastlm.add_layer_norm": ("triton", "cuda", "torch"),
    "fastlm.scaled_dot_product_attention": ("triton", "cuda", "torch"),
    "fastlm.varlen_attention": ("triton", "cuda", "torch"),
    "fastlm.adam_step_": ("cuda", "triton", "torch"),
    "fastlm.sum_of_squares": ("cuda", "triton", "torch"),
    "fastlm.rms_norm": ("triton", "cuda", "torch"),
    "fastlm.add_rms_norm": ("triton", "cuda", "torch"),
    "fastlm.swiglu": ("triton", "cuda", "torch"),
    "fastlm.geglu": ("triton", "cuda", "torch"),
    "fastlm.apply_rotary_emb": ("triton", "cuda", "torch"),
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message names the fix."""


def _triton_installed():
    """Whether the triton package is installed; it is imported only when first used."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: pip install triton"
    return True, ""


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe():
    """name -> {device type: (ok, reason)}; computed once, at import."""
    gpu = torch.cuda.is_available()
    no_gpu = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    c_ok = _ext.C is not None
    c_why = _ext.ERROR or ""
    if not c_ok:
        cuda = (False, c_why)
    elif not _ext.C.with_cuda:
        cuda = (False, "fastlm was built without CUDA kernels: rebuild with nvcc on PATH (or "
                       "CUDA_HOME set) and a CUDA build of torch, without FASTLM_SKIP_CUDA")
    elif not gpu:
        cuda = (False, no_gpu)
    else:
        cuda = (True, "")
    t_ok, t_why = _triton_installed()
    triton_gpu = (t_ok and gpu, t_why or ("" if gpu else no_gpu))
    triton_cpu = (t_ok and _interpret(), t_why or (
        "" if _interpret() else "Triton runs on CPU tensors only in its interpreter: "
        "set TRITON_INTERPRET=1 before importing fastlm (slow; for tests)"))
    not_cuda = (False, "the cuda backend runs on CUDA tensors only")
    not_cpu = (False, "the cpu backend runs on CPU tensors only")
    return {
        "cuda": {"cuda": cuda, "cpu": not_cuda},
        "triton": {"cuda": triton_gpu, "cpu": triton_cpu},
        "cpu": {"cuda": not_cpu, "cpu": (c_ok, c_why)},
        "torch": {"cuda": (True, ""), "cpu": (True, "")},
    }


_AVAIL = _probe()
_forced = []  # stack of names pushed by use_backend()
_env = None


def _check_name(name, source):
    if name not in NAMES:
        raise ValueError(f"{source}: unknown fastlm backend {name!r}; expected one of {NAMES}")
    return name


def reload_env():
    """Re-read FASTLM_BACKEND (empty or unset: automatic choice)."""
    global _env
    name = os.environ.get("FASTLM_BACKEND", "").strip().lower() or None
    _env = _check_name(name, "FASTLM_BACKEND") if name else None


reload_env()


def available():
    """{backend: {device type: (ok, reason)}} for this machine and build."""
    return {k: dict(v) for k, v in _AVAIL.items()}


def default_for(device_type):
    """The backend an op on a tensor of this device type uses when nothing is forced."""
    for name in _DEFAULT_ORDER.get(device_type, ("torch",)):
        if _AVAIL[name].get(device_type, (False, ""))[0]:
            return name
    return "torch"


def forced():
    """The backend forced by use_backend() or FASTLM_BACKEND, else None."""
    return _forced[-1] if _forced else _env


def _usable(name, dev, has_kernel):
    ok, why = _AVAIL[name].get(dev, (False, f"fastlm has no {name} kernels for {dev}"))
    if ok and name in ("cuda", "cpu") and has_kernel is not None and not has_kernel(dev):
        return False, ("this build of fastlm._C has no such kernel for this op: rebuild fastlm "
                       "(pip install --no-build-isolation -e .)")
    return ok, why


def select(op, device, dtype, kernel_dtypes, has_kernel=None, order=None):
    """The backend that runs `op` for a tensor of `dtype` on `device`.

    Kernel backends take the dtypes in `kernel_dtypes`; for any other (float64, say) the
    automatic choice is the torch reference, and a forced kernel backend is an error.
    `has_kernel(device_type)` says whether fastlm._C holds this op's C++ kernel; `order`
    overrides the preference order for the device (default: CUDA_ORDER[op] on CUDA tensors,
    else _DEFAULT_ORDER).
    """
    name = forced()
    dev = device.type
    if name is None:
        if dtype not in kernel_dtypes:
            _fell_back(op, f"{str(dtype).removeprefix('torch.')} input (the kernels take "
                       f"{', '.join(str(d).removeprefix('torch.') for d in kernel_dtypes)})",
                       "torch")
            return "torch"
        order = order or (CUDA_ORDER.get(op) if dev == "cuda" else None)
        order = order or _DEFAULT_ORDER.get(dev, ("torch",))
        for cand in order:
            ok, why = (True, "") if cand == "torch" else _usable(cand, dev, has_kernel)
            if ok:
                return cand
            _fell_back(op, f"the {cand} backend is unavailable for {dev} tensors ({why})",
                       order[order.index(cand) + 1] if cand != order[-1] else "torch")
        return "torch"
    if name != "torch":
        if dtype not in kernel_dtypes:
            raise TypeError(f"{op}: backend {name!r} supports "
                            f"{', '.join(str(d).removeprefix('torch.') for d in kernel_dtypes)}"
                            f", got {dtype}; use the 'torch' backend for it")
        ok, why = _usable(name, dev, has_kernel)
        if not ok:
            raise BackendUnavailable(f"fastlm backend {name!r} is not available for {dev} "
                                     f"tensors: {why}")
    return name


def _fell_back(op, reason, to):
    """Say once per op and reason (logger "fastlm", INFO) that a call left its preferred
    backend; not while torch.compile traces (the eager calls say it)."""
    if torch.compiler.is_compiling():
        return
    from ._log import log_once

    log_once(("fallback", op, reason), f"{op}: {reason}; running on the {to} backend")


@contextlib.contextmanager
def use_backend(name):
    """Run fastlm ops inside the block on backend `name` (one of NAMES), or automatically
    when `name` is None."""
    if name is not None:
        _check_name(name, "use_backend")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
