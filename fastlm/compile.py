"""`fastlm compile`: build fastlm's kernels for chosen GPUs, with or without such a GPU here.

Two parts:
  1. the extension fastlm._C with its CUDA kernels for the chosen archs (nvcc; needs the fastlm
     source tree), in place by default or into OUT/ext (load it with FASTLM_EXT_DIR=OUT/ext);
  2. the Triton kernels, compiled ahead of time for each arch into a Triton cache (Triton's own
     cache by default, or OUT/triton: use it with TRITON_CACHE_DIR=OUT/triton). A later run
     on such a GPU, with the same triton version, finds them there and does not compile.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import time

from . import _buildcfg

DTYPES = ("float32", "float16", "bfloat16")
# Row lengths whose Triton variants are compiled by default: one per block-size class
# (16 ... 16384, then the chunked path), all multiples of 16 as model widths are.
DEFAULT_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _source_root():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def build_extension(archs, out_dir, cuda_home, log):
    """Run setup.py build_ext for `archs`: into out_dir/ext, or in place when out_dir is None."""
    root = _source_root()
    if root is None:
        raise SystemExit("fastlm compile: building the extension needs the fastlm source tree "
                         "(setup.py, csrc/); install fastlm with `pip install "
                         "--no-build-isolation -e .` from a checkout, or pass --no-extension")
    env = dict(os.environ, FASTLM_CUDA_ARCHS=",".join(archs), FASTLM_REQUIRE_CUDA="1",
               CUDA_HOME=cuda_home)
    env.pop("FASTLM_SKIP_CUDA", None)
    cmd = [sys.executable, "setup.py", "-q", "build_ext"]
    if out_dir is None:
        cmd.append("--inplace")
    else:
        cmd += ["--build-lib", os.path.join(out_dir, "ext"),
                "--build-temp", os.path.join(out_dir, "build")]
    log(f"building fastlm._C for {','.join(archs)} ...")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"fastlm compile: the extension build failed (exit {proc.returncode})")


class _TargetDriver:
    """Stands in for Triton's active driver while compiling for `target` without its GPU:
    it answers the current target; the device key is private to this target so the JIT's
    per-device caches of a real GPU in this process are not touched."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"fastlm-aot-{self.target.backend}-{self.target.arch}"

    def get_current_stream(self, device=None):
        return None


@contextlib.contextmanager
def _compiling_for(target, cache_dir):
    from triton.runtime import driver

    saved_env = os.environ.get("TRITON_CACHE_DIR")
    saved = getattr(driver, "_active", None)
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    driver.set_active(_TargetDriver(target))
    try:
        yield
    finally:
        driver.set_active(saved)
        if cache_dir is not None:
            if saved_env is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_env


def triton_specs(dtypes, sizes, cc=90):
    """Every (kernel, args, meta) to compile for compute capability `cc` (e.g. 90): each op's
    kernels module lists its own (attention picks its tiles per arch)."""
    import torch

    from .kernels import adam, attention, layer_norm

    tdt = [getattr(torch, d) for d in dtypes]
    return (layer_norm.aot_specs(tdt, sizes) + adam.aot_specs(tdt, sizes)
            + attention.aot_specs(tdt, sizes, cc))


def compile_triton(archs, cache_dir, dtypes, sizes, log):
    """Compile the Triton kernels for each arch into cache_dir (None: Triton's own cache).
    Returns the number of kernels compiled (or found already compiled)."""
    from triton.backends.compiler import GPUTarget

    done = 0
    for arch in archs:
        cc = int(arch[3:].rstrip("af"))
        target = GPUTarget("cuda", cc, 32)
        specs = triton_specs(dtypes, sizes, cc)
        t0 = time.perf_counter()
        with _compiling_for(target, cache_dir):
            for kernel, args, meta in specs:
                kernel.warmup(*args, grid=(1,), **meta)
                done += 1
        log(f"triton: {len(specs)} kernels for {arch} in {time.perf_counter() - t0:.1f} s")
    return done


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="fastlm compile",
        description="Build fastlm's CUDA extension and Triton kernels for the given GPU archs; "
                    "works without a GPU.")
    p.add_argument("--arch", required=True,
                   help="comma-separated targets, e.g. sm_80,sm_90 (or 8.0;9.0a)")
    p.add_argument("--out", default=None,
                   help="output folder: OUT/ext (the extension, load with FASTLM_EXT_DIR) and "
                        "OUT/triton (a Triton cache, use with TRITON_CACHE_DIR); default: the "
                        "extension in place and Triton's own cache")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help=f"Triton input dtypes to compile for (default {','.join(DTYPES)})")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="row lengths whose Triton variants to compile (default: one per "
                        "block-size class, multiples of 16)")
    p.add_argument("--no-extension", action="store_true", help="skip the CUDA extension")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    a = p.parse_args(argv)
    # Under the interpreter @triton.jit makes interpreted functions that compile nothing.
    os.environ.pop("TRITON_INTERPRET", None)

    def fail(msg):
        print(f"fastlm compile: {msg}", file=sys.stderr)
        return 2

    try:
        archs = _buildcfg.parse_archs(a.arch)
    except ValueError as e:
        return fail(str(e))
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        return fail(f"unknown dtype(s) {bad}: expected some of {', '.join(DTYPES)}")
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        return fail(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    if not sizes or min(sizes) < 1:
        return fail(f"--sizes must be positive integers, got {a.sizes!r}")
    out = os.path.abspath(a.out) if a.out else None

    def log(msg):
        print(f"fastlm compile: {msg}", file=sys.stderr, flush=True)

    if not a.no_extension:
        cuda_home = _buildcfg.find_cuda_home()
        if cuda_home is None:
            return fail("no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH "
                        "(or pass --no-extension to compile only the Triton kernels)")
        build_extension(archs, out, cuda_home, log)
    if not a.no_triton:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return fail(f"triton cannot be imported ({e}); pass --no-triton")
        cache = os.path.join(out, "triton") if out else None
        compile_triton(archs, cache, dtypes, sizes, log)
    if out:
        print("done. Use it with:\n"
              f"  export FASTLM_EXT_DIR={out}/ext TRITON_CACHE_DIR={out}/triton")
    else:
        print("done: fastlm._C rebuilt in place; Triton kernels are in Triton's cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
