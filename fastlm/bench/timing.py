"""Timers and the ceilings every result is measured against.

GPU: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each run), median.
CPU: a few warm-up calls, then the median of as many timed calls as fit in a small budget,
each after a write of twice the last-level cache, so that, as on the GPU, every call starts with
its inputs in memory and bandwidths compare with the copy ceiling.
"""

import math
import statistics
import time

import torch

CPU_BUDGET_S = 0.4  # timed seconds per CPU measurement
CPU_MIN_REPS, CPU_MAX_REPS = 5, 500


def _cpu_cache_bytes():
    """Size of the CPU's last-level cache (64 MiB when the system does not say)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return 64 << 20
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text.rstrip("KMG")) * units.get(text[-1], 1)


_flush_buffer = None


def _flush_cpu_cache():
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(2 * _cpu_cache_bytes(), dtype=torch.uint8)
    _flush_buffer.zero_()


def time_cpu(fn, budget_s=CPU_BUDGET_S):
    """Median milliseconds of `fn()` on the CPU, starting each call with a cold cache."""
    times = []
    for _ in range(2):
        _flush_cpu_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    reps = min(CPU_MAX_REPS, max(CPU_MIN_REPS, math.ceil(budget_s / max(min(times), 1e-9))))
    times = []
    for _ in range(reps):
        _flush_cpu_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cuda(fn):
    """Median milliseconds of `fn()` on the current GPU (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_fn(fn, device_type):
    """Median milliseconds of `fn()` with the timer for `device_type`."""
    return time_cuda(fn) if device_type == "cuda" else time_cpu(fn)


def _copy_gbps(device, numel):
    """Bandwidth of copying `numel` float32 elements, counting bytes read and written."""
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device.type)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_tflops(device, n, dtype):
    """Throughput of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / time_fn(lambda: a @ b, device.type) / 1e9


def ceilings(device):
    """Copy bandwidth (GB/s, bytes read + written) and matmul throughput (TFLOP/s) on
    `device`: bf16 8192³ on CUDA, fp32 1024³ on the CPU."""
    if device.type == "cuda":
        numel, n, dtype = 1 << 28, 8192, torch.bfloat16
    else:
        numel, n, dtype = 1 << 25, 1024, torch.float32
    return {"copy_gbps": _copy_gbps(device, numel),
            "copy_bytes": 8 * numel,
            "matmul_tflops": _matmul_tflops(device, n, dtype),
            "matmul": f"{str(dtype).removeprefix('torch.')} {n}x{n}x{n}"}
