"""The benchmark case registry: what an op's benchmark is made of, and the dict holding them.

A :class:`Case` describes one op: the shapes to run per device, how to make inputs, the
implementations to compare (fastlm backends, the PyTorch reference, optional peers), a
high-precision oracle for the error column, and the byte (or FLOP) formula. Each op lives in
its own module (``fastlm/bench/<op>.py``) that builds a Case and calls :func:`register`.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import backends

DIRECTIONS = ("forward", "backward", "forward+backward")
# Shape profiles: "full" (the default of `fastlm bench`), "quick" (a few small shapes; the
# implementations of Impl.quick_devices), "headline" (the GPU check's rows: scripts/gpu_run.sh;
# tiny shapes on the CPU so its dry run takes the same path) and "tiny" (every implementation,
# as in "full", at tiny sizes and a short timing budget: the full path checked in CI).
PROFILES = ("full", "quick", "headline", "tiny")


@dataclass(frozen=True)
class Impl:
    """One way to run an op, one row of the results table.

    ``prepare(inputs, direction)`` does the untimed setup (a forward whose saved statistics a
    backward needs, say) and returns a zero-argument callable: the timed work, which returns
    the outputs compared with the oracle, in the order of ``Case.outputs[direction]``.
    """

    name: str  # row label: "fastlm-cuda", "torch", "liger"
    kind: str  # "fastlm", "torch" or "peer"
    prepare: Callable[[dict, str], Callable[[], tuple]]
    backend: str | None = None  # kind "fastlm": the fastlm backend it times (None: fastlm's
    # automatic choice for each op, as for a whole model)
    module: str | None = None  # kind "peer": the module it needs installed
    install: str | None = None  # kind "peer": the pip package providing `module`
    devices: tuple = ("cpu", "cuda")  # device types the implementation runs on
    cpp_op: str | None = None  # kind "fastlm", cuda/cpu: the C++ op whose kernel it needs
    quick_devices: tuple = ("cpu", "cuda")  # device types where --quick runs it too
    error_na: str | None = None  # why its outputs cannot be compared with the oracle (for
    # example its own random dropout mask): the error column shows "n/a" and the legend this


@dataclass(frozen=True)
class Case:
    """An op's benchmark. Shapes are dicts of the formula's parameters plus ``dtype`` (a torch
    dtype name) and optionally ``model`` (the real model whose layer it is, e.g. "llama3-8B");
    ``shapes[device_type]`` holds a list per profile (PROFILES; "full", "quick" and "tiny" are
    required, "headline" where the GPU check times the op).

    Directions: "forward", "backward" (the backward alone, after an untimed forward) and
    "forward+backward" (both, timed together); its outputs are the forward's then the
    backward's, its bytes or FLOPs the sum of the two, so the runner derives them."""

    op: str
    shapes: dict
    make_inputs: Callable[[dict, object], dict]  # (shape, torch.device) -> inputs
    impls: tuple
    oracle: Callable[[dict, str], tuple]  # (inputs, direction) -> high-precision outputs
    outputs: dict  # direction -> names of the compared outputs
    bytes: Callable[[dict, str], int] | None = None  # (shape, direction) -> bytes moved
    flops: Callable[[dict, str], int] | None = None  # (shape, direction) -> FLOPs done
    x_axis: str = "N"  # the shape parameter on the plot's x axis
    series: tuple = ()  # shape parameters that split a backend's points into several lines
    directions: tuple = DIRECTIONS
    notes: dict = field(default_factory=dict)  # free text carried into the JSON
    tokens: Callable[[dict], int] | None = None  # shape -> tokens per call (a tokens/s column)
    total_peak: bool = False  # CUDA peak memory: all allocated (True) or added by the call

    def shape_list(self, device_type, profile):
        """The shapes of `profile` (a PROFILES name; True/False mean "quick"/"full") to run on
        `device_type`; empty when the op has none for it."""
        if isinstance(profile, bool):
            profile = "quick" if profile else "full"
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: choose from {', '.join(PROFILES)}")
        return list(self.shapes.get(device_type, {}).get(profile, []))

    def outputs_of(self, direction):
        """Names of the outputs compared with the oracle in `direction`."""
        if direction == "forward+backward":
            return tuple(self.outputs["forward"]) + tuple(self.outputs["backward"])
        return tuple(self.outputs[direction])

    def expected(self, inputs, direction):
        """The oracle's outputs for `direction`."""
        if direction == "forward+backward":
            return tuple(self.oracle(inputs, "forward")) + tuple(self.oracle(inputs, "backward"))
        return tuple(self.oracle(inputs, direction))

    def bytes_of(self, shape, direction):
        if direction == "forward+backward":
            return self.bytes(shape, "forward") + self.bytes(shape, "backward")
        return self.bytes(shape, direction)

    def flops_of(self, shape, direction):
        if direction == "forward+backward":
            return self.flops(shape, "forward") + self.flops(shape, "backward")
        return self.flops(shape, direction)


CASES: dict = {}


def register(case):
    """Add `case` to the registry under its op name and return it."""
    if not (case.bytes or case.flops):
        raise ValueError(f"bench case {case.op!r} needs a bytes or a flops formula")
    if case.op in CASES:
        raise ValueError(f"bench case {case.op!r} is already registered")
    CASES[case.op] = case
    return case


def names():
    """The registered op names, in registration order."""
    return list(CASES)


def get(op):
    """The case for `op`; KeyError naming the valid choices when there is none."""
    try:
        return CASES[op]
    except KeyError:
        raise KeyError(f"no benchmark for op {op!r}; choose from {', '.join(CASES)}") from None


def shape_label(shape):
    """A short name for a shape: "M=4096 N=1024 float32", "gpt2-124M: M=8192 N=768 float32"."""
    text = " ".join(f"{k}={v}" for k, v in shape.items() if k not in ("dtype", "model"))
    text += f" {shape['dtype']}"
    return f"{shape['model']}: {text}" if "model" in shape else text


def availability(impl, device_type):
    """(ok, reason) for timing `impl` on `device_type` here."""
    if device_type not in impl.devices:
        return False, f"runs on {' and '.join(impl.devices)} only"
    if impl.kind == "fastlm" and impl.backend is None:
        return True, ""
    if impl.kind == "fastlm":
        if impl.backend == "triton" and device_type == "cpu":
            return False, "Triton on CPU is its interpreter, not a performance path"
        ok, why = backends.available()[impl.backend].get(device_type, (False, "no kernels"))
        if ok and impl.cpp_op and impl.backend in ("cuda", "cpu"):
            key = "CUDA" if device_type == "cuda" else "CPU"
            if not (hasattr(torch.ops.fastlm, impl.cpp_op.split("::")[-1])
                    and torch._C._dispatch_has_kernel_for_dispatch_key(impl.cpp_op, key)):
                return False, f"this build of fastlm._C has no {key} kernel for {impl.cpp_op}"
        return ok, why
    if impl.kind == "peer" and importlib.util.find_spec(impl.module) is None:
        return False, f"not installed (pip install {impl.install})"
    return True, ""


def split_available(case, device_type):
    """(impls to time, [(impl name, reason it is skipped)]) for `case` on `device_type`."""
    run, skipped = [], []
    for impl in case.impls:
        ok, why = availability(impl, device_type)
        if ok:
            run.append(impl)
        else:
            skipped.append((impl.name, why))
    return run, skipped
