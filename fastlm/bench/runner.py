"""Runs registered cases on one device: each implementation is checked against the oracle,
then timed; every result becomes a plain dict (the rows of the table and of the JSON)."""

import torch

from . import env, registry, timing


def max_abs_errors(outputs, expected, names):
    """{output name: max |out - expected|}, computed in the oracle's precision."""
    errors = {}
    for name, out, ref in zip(names, outputs, expected):
        errors[name] = (out.to(ref.dtype) - ref).abs().max().item() if ref.numel() else 0.0
    return errors


def _rates(case, shape, direction, ms, ceilings):
    """Throughput columns: GB/s and % of copy bandwidth and/or TFLOP/s and % of matmul."""
    rates = {}
    if case.bytes:
        nbytes = case.bytes(shape, direction)
        rates.update(bytes=nbytes, gbps=nbytes / ms / 1e6)
        rates["pct_copy"] = 100 * rates["gbps"] / ceilings["copy_gbps"]
    if case.flops:
        flops = case.flops(shape, direction)
        rates.update(flops=flops, tflops=flops / ms / 1e9)
        rates["pct_matmul"] = 100 * rates["tflops"] / ceilings["matmul_tflops"]
    if case.tokens:
        rates["tokens_s"] = case.tokens(shape) / ms * 1e3
    return rates


def _measure(case, impl, inputs, shape, direction, expected, device, ceilings):
    """One result row: validate `impl` against the oracle's `expected`, then time it."""
    fn = impl.prepare(inputs, direction)
    peak = None
    if device.type == "cuda":  # memory the timed call allocates beyond what exists before it
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = 0 if case.total_peak else torch.cuda.memory_allocated(device)
    outputs = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    errors = max_abs_errors(outputs, expected, case.outputs[direction])
    del outputs
    ms = timing.time_fn(fn, device.type)
    return {"op": case.op, "direction": direction, "shape": dict(shape), "backend": impl.name,
            "kind": impl.kind, "ms": ms, **_rates(case, shape, direction, ms, ceilings),
            "max_err": max(errors.values()), "errors": errors, "peak_mib": peak}


def _progress(total, enabled):
    """A rich progress bar on stderr (drawn only when `enabled`) and its task id."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   console=Console(stderr=True), transient=True, disable=not enabled)
    return bar, bar.add_task("bench", total=total)


def plan(ops, device_type, quick):
    """[(case, shapes, impls to time)] and [{op, backend, reason}] skipped, for `ops`."""
    planned, skipped = [], []
    for op in ops:
        case = registry.get(op)
        impls, why_not = registry.split_available(case, device_type)
        skipped += [{"op": op, "backend": name, "reason": why} for name, why in why_not]
        if quick:
            skipped += [{"op": op, "backend": i.name, "reason": f"not in --quick on {device_type}"}
                        for i in impls if device_type not in i.quick_devices]
            impls = [i for i in impls if device_type in i.quick_devices]
        planned.append((case, case.shape_list(device_type, quick), impls))
    return planned, skipped


def _run_point(case, impls, inputs, shape, direction, device, ceilings, tick):
    """All implementations at one shape and direction, with their speed ratio to torch."""
    expected = case.oracle(inputs, direction)
    point = []
    for impl in impls:
        tick(f"{case.op} {direction} {registry.shape_label(shape)} {impl.name}")
        point.append(_measure(case, impl, inputs, shape, direction, expected, device, ceilings))
    torch_ms = next((r["ms"] for r in point if r["kind"] == "torch"), None)
    for r in point:
        r["x_torch"] = torch_ms / r["ms"] if torch_ms else None
    return point


def run(ops, device, quick=False, progress=True):
    """Benchmark `ops` on `device`: the report {"meta", "ceilings", "skipped", "results"}."""
    device = torch.device(device)
    planned, skipped = plan(ops, device.type, quick)
    total = sum(len(shapes) * len(case.directions) * len(impls) for case, shapes, impls in planned)
    ceilings = timing.ceilings(device)
    results = []
    bar, task = _progress(total, progress)

    started = 0

    def tick(description):  # called as each measurement starts
        nonlocal started
        bar.update(task, description=description, completed=started)
        started += 1

    with bar:
        for case, shapes, impls in planned:
            for shape in shapes:
                inputs = case.make_inputs(shape, device)
                for direction in case.directions:
                    results += _run_point(case, impls, inputs, shape, direction, device,
                                          ceilings, tick)
    meta = {**env.metadata(device), "ops": list(ops), "quick": quick}
    return {"meta": meta, "ceilings": ceilings, "skipped": skipped, "results": results}
