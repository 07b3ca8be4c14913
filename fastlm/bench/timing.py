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
TINY_BUDGET_S = 0.02  # the "tiny" profile: the full path, checked rather than timed


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


def time_cpu(fn, budget_s=None):
    """Milliseconds of each timed call of `fn()` on the CPU, starting each call with a cold
    cache."""
    budget_s = CPU_BUDGET_S if budget_s is None else budget_s
    min_reps = CPU_MIN_REPS if budget_s >= CPU_BUDGET_S else 2
    times = []
    for _ in range(2):
        _flush_cpu_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    reps = min(CPU_MAX_REPS, max(min_reps, math.ceil(budget_s / max(min(times), 1e-9))))
    times = []
    for _ in range(reps):
        _flush_cpu_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return [t * 1e3 for t in times]


def time_cuda(fn, budget_s=None):
    """Milliseconds of each timed call of `fn()` on the current GPU (triton.testing.do_bench:
    CUDA events, L2 flushed before each call)."""
    from triton.testing import do_bench

    rep = 100 if budget_s is None else max(5, int(budget_s * 1e3))
    times = do_bench(fn, warmup=min(25, rep), rep=rep, return_mode="all")
    return [float(t) for t in times]


def time_fn(fn, device_type, budget_s=None):
    """Milliseconds of each timed call of `fn()` with the timer for `device_type`."""
    return time_cuda(fn, budget_s) if device_type == "cuda" else time_cpu(fn, budget_s)


def median(samples):
    return statistics.median(samples)


def _copy_gbps(device, numel, budget_s=None):
    """Bandwidth of copying `numel` float32 elements, counting bytes read and written."""
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median(time_fn(lambda: dst.copy_(src), device.type, budget_s))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _inplace_gbps(device, numel, budget_s=None):
    """Bandwidth of `a += b` on `numel` float32 elements, counting 3 accesses per element
    (read a and b, write a). On a CPU a copy into a fresh buffer also reads each destination
    line before writing it (write-allocate), traffic a byte count of 2 per element does not
    see; an in-place update has none, as the optimizer step and many backward kernels."""
    a = torch.ones(numel, device=device, dtype=torch.float32)
    b = torch.ones(numel, device=device, dtype=torch.float32)
    ms = median(time_fn(lambda: a.add_(b), device.type, budget_s))
    return 3 * numel * a.element_size() / ms / 1e6


def bandwidth_ceiling(device, nbytes, ceilings, budget_s=None):
    """The best of copy and in-place add, in counted bytes per second, measured with a
    working set of about `nbytes` (rounded up to a power of two) and the same timer as the
    cases (cold cache on the CPU, L2 flushed on a GPU); memoized in ceilings["bandwidth"]."""
    size = 1 << max(12, (max(int(nbytes), 1) - 1).bit_length())
    table = ceilings.setdefault("bandwidth", {})
    key = str(size)
    if key not in table:
        copy = _copy_gbps(device, max(1 << 9, size // 8), budget_s)
        inplace = _inplace_gbps(device, max(1 << 8, size // 12), budget_s)
        table[key] = {"bytes": size, "copy_gbps": copy, "inplace_gbps": inplace,
                      "gbps": max(copy, inplace)}
    return table[key]


def _matmul_tflops(device, n, dtype, budget_s=None):
    """Throughput of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median(time_fn(lambda: a @ b, device.type, budget_s)) / 1e9


def ceilings(device, budget_s=None):
    """Copy bandwidth (GB/s, bytes read + written) and matmul throughput (TFLOP/s) on
    `device`: bf16 8192³ on CUDA, fp32 1024³ on the CPU."""
    if device.type == "cuda":
        numel, n, dtype = 1 << 28, 8192, torch.bfloat16
    else:
        numel, n, dtype = 1 << 25, 1024, torch.float32
    return {"copy_gbps": _copy_gbps(device, numel, budget_s),
            "inplace_gbps": _inplace_gbps(device, numel, budget_s),
            "copy_bytes": 8 * numel,
            "matmul_tflops": _matmul_tflops(device, n, dtype, budget_s),
            "matmul": f"{str(dtype).removeprefix('torch.')} {n}x{n}x{n}"}
