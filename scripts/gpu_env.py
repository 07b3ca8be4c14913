"""Stage `env` of scripts/gpu_run.sh: what machine this is and what it can do.

Writes a JSON file with the versions (python, torch, triton, CUDA, driver), the device (name,
SMs, memory, clocks from nvidia-smi), the CPU, the tools the later stages use (nvcc,
compute-sanitizer, ncu, pytest-xdist, liger-kernel) and the ceilings measured now: device copy
bandwidth (GB/s, bytes read + written) and matmul throughput (bf16 8192^3 on a GPU), with the
timers of fastlm.bench. Runs before the build: it needs only torch and fastlm's Python files.

    python3 scripts/gpu_env.py --json OUT/env.json [--device cuda|cpu]
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=60):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"
    return (r.stdout + r.stderr).strip()


def nvidia_smi():
    """{field: value} of the first GPU from nvidia-smi, or {} without one."""
    if shutil.which("nvidia-smi") is None:
        return {}
    fields = ("name,driver_version,pci.bus_id,clocks.sm,clocks.max.sm,clocks.mem,"
              "clocks.max.mem,power.limit,temperature.gpu,memory.total,compute_mode")
    out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out else []
    return dict(zip(fields.split(","), values)) if len(values) == len(fields.split(",")) else {
        "raw": out}


def tools():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = {}
    for name in ("nvcc", "compute-sanitizer", "ncu", "cuobjdump"):
        path = shutil.which(name) or (os.path.join(cuda_home, "bin", name)
                                      if os.path.exists(os.path.join(cuda_home, "bin", name))
                                      else None)
        found[name] = path
    found["nvcc_version"] = _run([found["nvcc"], "--version"]).splitlines()[-1] \
        if found["nvcc"] else None
    for mod in ("xdist", "liger_kernel", "flash_attn"):
        found[mod] = importlib.util.find_spec(mod) is not None
    return found


def cpu():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration, ValueError):
        pass
    return {"model": model, "cores": os.cpu_count(), "ram_gib": mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the facts")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when a GPU is visible")
    a = p.parse_args(argv)
    t0 = time.time()
    sys.path.insert(0, ROOT)  # fastlm's Python files, before (or without) an install
    import torch

    from fastlm.bench import env, timing

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    facts = {"versions": env.versions(), "git_commit": env.git_commit(),
             "device": env.device_name(device), "device_type": device.type, "cpu": cpu(),
             "nvidia_smi": nvidia_smi(), "tools": tools(), "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        facts["gpu"] = {"name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                        "sms": prop.multi_processor_count,
                        "memory_gib": round(prop.total_memory / 2**30, 1)}
    print(json.dumps(facts, indent=1), flush=True)
    facts["ceilings"] = timing.ceilings(device)
    facts["seconds"] = round(time.time() - t0, 1)
    with open(a.json, "w") as f:
        json.dump(facts, f, indent=1)
    c = facts["ceilings"]
    print(f"ceilings on {facts['device']}: copy {c['copy_gbps']:.0f} GB/s, "
          f"matmul {c['matmul_tflops']:.3g} TFLOP/s ({c['matmul']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
