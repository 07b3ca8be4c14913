"""Runs registered cases on one device: each implementation is checked against the oracle,
then timed; every result becomes a plain dict (the rows of the table and of the JSON).

Nothing an implementation does stops the run: an exception while it prepares, runs or is
timed (a compile backend that fails, out of memory, a kernel error) turns its row into a
"failed" entry of report["skipped"] with the reason, and the run goes on; the report's
"failures" count says whether anything failed (`fastlm bench` exits 1 then). Implementations
that are not available here (a peer not installed, a backend not built) are skipped too, but
they are not failures.
"""

import fnmatch
import gc
import time

import torch

from . import env, history, registry, timing


def max_abs_errors(outputs, expected, names):
    """{output name: max |out - expected|}, computed in the oracle's precision."""
    errors = {}
    for name, out, ref in zip(names, outputs, expected):
        errors[name] = (out.to(ref.dtype) - ref).abs().max().item() if ref.numel() else 0.0
    return errors


def _rates(case, shape, direction, ms, ceilings, device, budget=None):
    """Throughput columns: GB/s and % of the bandwidth ceiling and/or TFLOP/s and % of
    matmul. The bandwidth ceiling is measured on the case's own working-set size
    (timing.bandwidth_ceiling), so cache-resident cases are compared with a cache-resident
    ceiling and the percentage means "how close to the hardware"."""
    rates = {}
    if case.bytes:
        nbytes = case.bytes_of(shape, direction)
        ceiling = timing.bandwidth_ceiling(device, nbytes, ceilings, budget)
        rates.update(bytes=nbytes, gbps=nbytes / ms / 1e6, ceiling_gbps=ceiling["gbps"])
        rates["pct_copy"] = 100 * rates["gbps"] / ceiling["gbps"]
    if case.flops:
        flops = case.flops_of(shape, direction)
        rates.update(flops=flops, tflops=flops / ms / 1e9)
        rates["pct_matmul"] = 100 * rates["tflops"] / ceilings["matmul_tflops"]
    if case.tokens:
        rates["tokens_s"] = case.tokens(shape) / ms * 1e3
    return rates


class _Peak:
    """Memory a call adds at its peak, in MiB: CUDA's allocator statistics on a GPU; on the
    CPU the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs), an approximation: memory the allocator keeps from earlier calls
    is reused without showing."""

    def __init__(self, device, total):
        self.device, self.total = device, total

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0 if self.total else torch.cuda.memory_allocated(self.device)
        else:
            self.base = _cpu_rss("VmRSS")
            self.ok = self.base is not None and _reset_cpu_peak()
            if self.total and self.ok:
                self.base = 0
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            peak = _cpu_rss("VmHWM") if self.ok else None
            self.mib = None if peak is None else max(0, peak - self.base) / 2**20
        return False


def _cpu_rss(field):
    """VmRSS or VmHWM of this process in bytes (None where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(case, impl, inputs, shape, direction, expected, device, ceilings, budget):
    """One result row: validate `impl` against the oracle's `expected`, then time it."""
    fn = impl.prepare(inputs, direction)
    with _Peak(device, case.total_peak) as peak:
        outputs = fn()
    names = case.outputs_of(direction)
    if impl.error_na:
        errors = {n: None for n in names}
        max_err = None
    else:
        errors = max_abs_errors(outputs, expected, names)
        max_err = max(errors.values())
    del outputs
    samples = timing.time_fn(fn, device.type, budget_s=budget)
    ms = timing.median(samples)
    return {"op": case.op, "direction": direction, "shape": dict(shape), "backend": impl.name,
            "kind": impl.kind, "ms": ms, "samples_ms": samples,
            **_rates(case, shape, direction, ms, ceilings, device, budget),
            "max_err": max_err, "errors": errors, "error_na": impl.error_na,
            "peak_mib": peak.mib}


def _why(exc):
    """A one-line reason for a failed measurement."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(enabled):
    """A rich progress display on stderr (drawn only when `enabled`): the whole run and the
    current case, each with its bar."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


# The GPU check's headline rows time forward and backward apart (its time box is tight).
SKIP_DIRECTIONS = {"headline": ("forward+backward",)}


def directions(case, profile):
    """The directions of `case` that `profile` runs."""
    return [d for d in case.directions if d not in SKIP_DIRECTIONS.get(profile, ())]


def plan(ops, device_type, profile, skip_impls=()):
    """[(case, shapes, impls to time, directions)] and [{op, backend, reason}] skipped, for
    `ops` in `profile`."""
    if isinstance(profile, bool):
        profile = "quick" if profile else "full"
    planned, skipped = [], []
    for op in ops:
        case = registry.get(op)
        shapes = case.shape_list(device_type, profile)
        if not shapes:
            skipped.append({"op": op, "backend": "all", "reason":
                            f"no {profile} shapes on {device_type}"})
            continue
        impls, why_not = registry.split_available(case, device_type)
        skipped += [{"op": op, "backend": name, "reason": why} for name, why in why_not]
        excluded = [i for i in impls if any(fnmatch.fnmatchcase(i.name, g) for g in skip_impls)]
        skipped += [{"op": op, "backend": i.name, "reason": "excluded by --skip-impl"}
                    for i in excluded]
        impls = [i for i in impls if i not in excluded]
        if profile == "quick":
            skipped += [{"op": op, "backend": i.name, "reason": f"not in --quick on {device_type}"}
                        for i in impls if device_type not in i.quick_devices]
            impls = [i for i in impls if device_type in i.quick_devices]
        planned.append((case, shapes, impls, directions(case, profile)))
    return planned, skipped


def measurements(planned):
    """[(op, impl name)] of every measurement the plan makes, in order."""
    return [(case.op, impl.name) for case, shapes, impls, dirs in planned
            for _ in shapes for _ in dirs for impl in impls]


def _run_point(case, impls, inputs, shape, direction, device, ceilings, budget, tick, failed):
    """All implementations at one shape and direction, with their speed ratio to torch."""
    label = f"{case.op} {direction} {registry.shape_label(shape)}"
    try:
        expected = case.expected(inputs, direction)
    except Exception as e:  # the oracle itself could not run: no row can be checked
        _free(device)
        for impl in impls:
            tick(case.op, impl.name, 0.0)
            failed.append({"op": case.op, "backend": impl.name, "reason":
                           f"{direction} {registry.shape_label(shape)}: the oracle failed "
                           f"({_why(e)})", "failed": True})
        return []
    point = []
    for impl in impls:
        t0 = time.perf_counter()
        try:
            point.append(_measure(case, impl, inputs, shape, direction, expected, device,
                                  ceilings, budget))
        except Exception as e:  # noqa: BLE001  (any failure becomes a line, the run goes on)
            _free(device)
            failed.append({"op": case.op, "backend": impl.name, "reason":
                           f"{direction} {registry.shape_label(shape)}: {_why(e)}",
                           "failed": True})
        tick(case.op, impl.name, time.perf_counter() - t0, label)
    del expected
    torch_ms = next((r["ms"] for r in point if r["kind"] == "torch"), None)
    for r in point:
        r["x_torch"] = torch_ms / r["ms"] if torch_ms else None
    return point


def no_donated_buffers():
    """A compiled backward with donated buffers refuses retain_graph=True, which timing a
    backward repeatedly needs; its backward graph may compile at its first call (a new shape),
    so the setting holds for the whole run."""
    import contextlib

    import torch._functorch.config as fconfig

    if hasattr(fconfig, "donated_buffer"):
        return fconfig.patch(donated_buffer=False)
    return contextlib.nullcontext()


def run(ops, device, quick=False, progress=True, profile=None, announce=None, skip_impls=(),
        on_case=None, budget=None):
    """Benchmark `ops` on `device`: the report {"meta", "ceilings", "skipped", "results",
    "failures"}. `profile` is a registry.PROFILES name (default: "quick" if `quick` else
    "full"); `skip_impls`: glob patterns of implementation names left out; `announce(text)`,
    when given, receives the plan and its estimated duration before anything runs;
    `on_case(report)` receives the report so far after each case (to save partial results);
    `budget`: timed seconds per measurement (default: timing's, or a short one for "tiny")."""
    device = torch.device(device)
    profile = profile or ("quick" if quick else "full")
    planned, skipped = plan(ops, device.type, profile, skip_impls)
    todo = measurements(planned)
    estimate, source = history.estimate(todo, device.type, profile)
    if announce:
        announce(f"{len(todo)} measurements in {len(planned)} cases; estimated "
                 f"{history.format_seconds(estimate)} ({source})")
    if budget is None and profile == "tiny":
        budget = timing.TINY_BUDGET_S
    ceilings = timing.ceilings(device, budget)
    results, failed, durations = [], [], {}
    t_start = time.perf_counter()
    bar = _progress(progress)
    whole = bar.add_task("fastlm bench", total=len(todo))
    current = {}

    def tick(op, impl_name, seconds, label=None):  # called as each measurement ends
        durations.setdefault(f"{op}/{impl_name}", []).append(seconds)
        bar.advance(whole)
        bar.advance(current[op])
        if label:
            bar.update(current[op], description=f"  {label} {impl_name}")

    with bar, no_donated_buffers():
        for case, shapes, impls, dirs in planned:
            current[case.op] = bar.add_task(f"  {case.op}",
                                            total=len(shapes) * len(dirs) * len(impls))
            for shape in shapes:
                try:
                    inputs = case.make_inputs(shape, device)
                except Exception as e:  # noqa: BLE001
                    _free(device)
                    for impl in impls:
                        for _ in dirs:
                            tick(case.op, impl.name, 0.0)
                        failed.append({"op": case.op, "backend": impl.name, "reason":
                                       f"{registry.shape_label(shape)}: making the inputs "
                                       f"failed ({_why(e)})", "failed": True})
                    continue
                for direction in dirs:
                    results += _run_point(case, impls, inputs, shape, direction, device,
                                          ceilings, budget, tick, failed)
                del inputs
                _free(device)
            bar.remove_task(current[case.op])
            if on_case:
                on_case(_report(device, ops, profile, t_start, ceilings, skipped, failed,
                                results, partial=True))
    history.record(durations, device.type, profile)
    return _report(device, ops, profile, t_start, ceilings, skipped, failed, results)


def _report(device, ops, profile, t_start, ceilings, skipped, failed, results, partial=False):
    meta = {**env.metadata(device), "ops": list(ops), "quick": profile == "quick",
            "profile": profile, "seconds": round(time.perf_counter() - t_start, 1)}
    if partial:
        meta["partial"] = True
    return {"meta": meta, "ceilings": ceilings, "skipped": skipped + failed,
            "results": list(results), "failures": len(failed)}
