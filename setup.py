"""Build fastlm._C: the C++ CPU kernels always, the CUDA kernels whenever a CUDA toolkit and a
CUDA build of torch are present (a GPU is not needed).

Environment:
  FASTLM_CUDA_ARCHS     target GPUs, e.g. "8.0;9.0a" or "sm_80,sm_90" (else TORCH_CUDA_ARCH_LIST,
                        else the visible GPU, else 8.0 and 9.0)
  FASTLM_SKIP_CUDA=1    build the C++ CPU kernels only
  FASTLM_REQUIRE_CUDA=1 fail (instead of warning loudly) when the CUDA kernels cannot be built
  CUDA_HOME             the toolkit root (else nvcc on PATH with wrapper scripts resolved,
                        else /usr/local/cuda)
  MAX_JOBS              parallel compile jobs (default: what cores and RAM allow)
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastlm"))
import _buildcfg  # noqa: E402  (fastlm/_buildcfg.py: shared with `fastlm compile`, no torch import)

sys.path.pop(0)

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["fastlm", "fastlm.ops", "fastlm.nn", "fastlm.optim", "fastlm.models", "fastlm.bench",
            "fastlm.kernels"]


# Sources with Hopper-only kernels: compiled for sm_90a wherever the build targets sm_90, with
# FASTLM_SM90A defined (their host code then knows the sm_90a kernels exist).
HOPPER_SOURCES = ["csrc/cuda/attention_sm90.cu"]


def _loud(msg):
    bar = "!" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)


def _hopper_flags(archs):
    """torch's BuildExtension gives every .cu file the same nvcc flags. The HOPPER_SOURCES get
    their own: ninja allows a variable binding per build statement, so the build.ninja torch
    writes is amended with `cuda_post_cflags = ...` under those sources' statements (their
    gencode flags for _buildcfg.hopper_archs, plus -DFASTLM_SM90A). Where that cannot be done
    (no ninja, another torch), they compile like the rest and the Hopper kernels are left out."""
    import re

    import torch.utils.cpp_extension as ce

    hopper = _buildcfg.hopper_archs(archs)
    writer = getattr(ce, "_write_ninja_file", None)
    if hopper is None or writer is None:
        if hopper is not None:
            _loud("fastlm: cannot give the Hopper sources their sm_90a flags with this torch; "
                  "building without the sm_90a attention kernels.")
        return
    base = " ".join(_buildcfg.gencode_flags(archs))
    mine = " ".join(_buildcfg.gencode_flags(hopper) + ["-DFASTLM_SM90A"])

    def write(path, *args, **kwargs):
        writer(path, *args, **kwargs)
        with open(path) as f:
            text = f.read()
        m = re.search(r"^cuda_post_cflags = (.*)$", text, re.M)
        if m is None or base not in m.group(1):
            raise RuntimeError(f"fastlm: setup.py cannot find the gencode flags in {path}")
        flags = m.group(1).replace(base, mine)
        for src in HOPPER_SOURCES:
            stmt = re.search(rf"^build \S+: cuda_compile \S*/{re.escape(src)}$", text, re.M)
            if stmt is None:
                raise RuntimeError(f"fastlm: setup.py cannot find {src}'s build in {path}")
            text = text[:stmt.end()] + f"\n  cuda_post_cflags = {flags}" + text[stmt.end():]
        with open(path, "w") as f:
            f.write(text)

    ce._write_ninja_file = write


def extensions():
    skip_cuda = os.environ.get("FASTLM_SKIP_CUDA", "0") not in ("", "0")
    cuda_home = None if skip_cuda else _buildcfg.find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import: it must be right before that.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(_buildcfg.default_max_jobs()))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    reason = None
    if skip_cuda:
        reason = "FASTLM_SKIP_CUDA is set"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    with_cuda = reason is None
    if not with_cuda and not skip_cuda:
        msg = f"fastlm: building WITHOUT the CUDA kernels: {reason}."
        if os.environ.get("FASTLM_REQUIRE_CUDA", "0") not in ("", "0"):
            raise RuntimeError(msg + " FASTLM_REQUIRE_CUDA is set, so this is an error.")
        _loud(msg + "\nOnly the cpu, triton and torch backends will exist.")

    # -ffp-contract=off: no fused multiply-adds the source did not write. With them, the CPU
    # backward's g - mean(g) left a rounding residual (a non-zero dx for one-element rows).
    # -fno-math-errno: sqrt without the errno branch, which kept loops from vectorizing.
    # -fno-trapping-math: FP exceptions are never enabled, so comparisons and conversions may
    # run unconditionally; without it GCC keeps the clamps of the GLU kernels' exp as branches
    # and leaves the loop scalar (2.5x slower than torch). Results are unchanged.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off",
           "-fno-math-errno", "-fno-trapping-math"]
    sources = ["csrc/module.cpp", "csrc/fastlm.cpp", "csrc/cpu/layer_norm.cpp", "csrc/cpu/adam.cpp",
               "csrc/cpu/attention.cpp", "csrc/cpu/glu.cpp", "csrc/cpu/rotary.cpp"]
    kwargs = dict(extra_link_args=["-fopenmp"])
    archs = []
    if with_cuda:
        archs = _buildcfg.resolve_archs(os.environ)
        print(f"fastlm: CUDA toolkit {cuda_home}; building CUDA kernels for {','.join(archs)}",
              file=sys.stderr)
        sources += ["csrc/cuda/layer_norm.cu", "csrc/cuda/adam.cu", "csrc/cuda/attention.cu",
                    "csrc/cuda/glu.cu", "csrc/cuda/rotary.cu", *HOPPER_SOURCES]
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                "--expt-relaxed-constexpr", *_buildcfg.gencode_flags(archs)]
        if os.environ.get("FASTLM_PTXAS_VERBOSE"):
            nvcc += ["-Xptxas", "-v"]
        _hopper_flags(archs)
        cxx.append("-DFASTLM_WITH_CUDA")
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    # Read back by `fastlm info` (fastlm._C.cuda_archs); `cuobjdump --list-elf` confirms it.
    # (C++ flags only: nvcc would split a comma-separated -D value into several defines.)
    cxx += [f"-DFASTLM_CUDA_ARCHS={','.join(archs)}",
            f"-DFASTLM_TORCH_VERSION={torch.__version__.split('+')[0]}"]
    ext = ext_cls("fastlm._C", sources, **kwargs)
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_data={"fastlm.bench": ["durations.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
