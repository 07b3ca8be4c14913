"""Triton warm-up of scripts/gpu_run.sh: runs while nvcc builds the extension, so that no later
stage waits on JIT compilation.

The GPU machine runs another Triton (3.6) than the development machines, and Triton's cache key
holds its own version and source hash, so kernels compiled ahead of time elsewhere (`fastlm
compile`) would not be found there. Instead this script runs, on the GPU itself and before
fastlm._C exists, the very calls the later stages make, and Triton's JIT fills its on-disk cache
(~/.triton/cache, or TRITON_CACHE_DIR) with exactly the keys those stages will look up:

  1. headline: every Triton implementation of every benchmark case at its `--profile headline`
     shapes, each direction the headline times, called once (the same prepare() as the bench);
  2. compile: the `torch-compile` rows of the benchmark cases (torch.compile of the pure-torch
     ops and GPT step), which fill inductor's FX-graph and Triton caches; the fastlm rows are
     left to the bench, since without fastlm._C their graphs differ from the ones it traces;
  3. smoke: the Triton tests of the smoke subset (`pytest -m "smoke and triton"`, in parallel
     with pytest-xdist), whose results are discarded here -- the smoke stage runs them again.
     It starts first, in a subprocess beside parts 1 and 2 (nvcc leaves cores idle, most of the
     build waits on one or two translation units), and is waited for at the end.
The headline part comes first because `fastlm bench` compiles serially in one process, while
the smoke stage compiles on all its xdist workers.

Each part is timed and its failures recorded, never raised: a warm-up that fails costs only
compile time later. Without fastlm installed, run it with the repository root on PYTHONPATH
(as gpu_run.sh does).

    python3 scripts/gpu_warm.py --json OUT/warm.json [--device cpu] [--parts headline,compile,smoke]

--device cpu (the dry run) runs part 1 through Triton's interpreter at the CPU's tiny headline
shapes; parts 2 and 3 are for a GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("headline", "compile", "smoke")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _why(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _calls(device, names, ops=None):
    """(case, shape, direction, impl) the headline stage times with the implementations
    `names` picks (a function of the impl), for `ops` (None: every case)."""
    from fastlm import bench
    from fastlm.bench import runner

    skip = getattr(runner, "SKIP_DIRECTIONS", {}).get("headline", ())
    for op in ops or bench.names():
        case = bench.get(op)
        impls = [i for i in case.impls if names(i) and device.type in i.devices]
        for shape in case.shape_list(device.type, "headline") if impls else ():
            for direction in case.directions:
                if direction in skip:
                    continue
                for impl in impls:
                    yield case, shape, direction, impl


def warm_calls(device, names, rows, part, ops=None):
    """Run each call once; one row per call with its seconds or its error."""
    last = None
    inputs = None
    for case, shape, direction, impl in _calls(device, names, ops):
        t0 = time.perf_counter()
        row = {"part": part, "op": case.op, "shape": shape, "direction": direction,
               "impl": impl.name}
        try:
            if last != (case.op, repr(shape)):
                inputs, last = None, None
                inputs = case.make_inputs(shape, device)
                last = (case.op, repr(shape))
            fn = impl.prepare(inputs, direction)
            fn()
            _sync(device)
            row["ok"] = True
        except Exception as e:  # recorded, never raised: the stage itself will fail loudly
            row.update(ok=False, error=_why(e))
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"warm {part}: {case.op} {direction} {shape} {impl.name}: "
              f"{'ok' if row['ok'] else row['error']} ({row['seconds']} s)", flush=True)


def start_smoke(workers):
    """The smoke subset's Triton tests, in parallel, as a subprocess (its output goes to ours)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import smoke  # tests/smoke.py: only the files its rules name are collected

    files = sorted({"tests/" + key.split("::")[0] for key in smoke.RULES})
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "smoke and triton", "-p",
           "no:cacheprovider", "--tb=line", *files]
    if workers > 1:
        cmd[3:3] = ["-n", str(workers)]
    return subprocess.Popen(cmd, cwd=ROOT)


def wait_smoke(proc, t0, timeout):
    """(exit status, seconds) of the smoke subprocess; stopped after `timeout` seconds."""
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = 124
    return rc, round(time.time() - t0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write what was warmed")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)}")
    p.add_argument("--workers", type=int, default=4,
                   help="pytest-xdist workers for the smoke part (default 4: nvcc and parts 1-2 "
                        "hold the other cores)")
    p.add_argument("--smoke-timeout", type=int, default=600)
    p.add_argument("--ops", default=None,
                   help="comma-separated benchmark cases for the headline part (default: all)")
    a = p.parse_args(argv)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}: choose from {', '.join(PARTS)}")
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or fastlm is imported
    sys.path.insert(0, ROOT)
    import torch

    import fastlm

    device = torch.device(a.device)
    report = {"device": a.device, "extension_loaded": fastlm._ext.C is not None, "rows": [],
              "parts": {}}
    t_all = time.time()
    smoke_proc = None
    if "smoke" in parts and a.device == "cuda":
        import importlib.util

        workers = a.workers if importlib.util.find_spec("xdist") else 1
        smoke_proc = start_smoke(workers)
    if "headline" in parts:
        t0 = time.time()
        ops = [o.strip() for o in a.ops.split(",") if o.strip()] if a.ops else None
        warm_calls(device, lambda i: i.kind == "fastlm" and i.backend == "triton",
                   report["rows"], "headline", ops)
        report["parts"]["headline"] = {"seconds": round(time.time() - t0, 1)}
    if "compile" in parts and a.device == "cuda":
        t0 = time.time()
        warm_calls(device, lambda i: i.name == "torch-compile", report["rows"], "compile")
        report["parts"]["compile"] = {"seconds": round(time.time() - t0, 1)}
    if smoke_proc is not None:
        rc, sec = wait_smoke(smoke_proc, t_all, a.smoke_timeout)
        report["parts"]["smoke"] = {"seconds": sec, "exit": rc, "workers": workers}
    report["seconds"] = round(time.time() - t_all, 1)
    report["failed"] = sum(not r["ok"] for r in report["rows"])
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"warm-up: {len(report['rows'])} calls ({report['failed']} failed), "
          f"{report['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
