"""The benchmark report: a plain-text table per op, shape and direction; the JSON file (and
the same results in pytest-benchmark's format, for `pytest-benchmark compare`); the PNG plot of
speed and peak memory (matplotlib, imported only when a plot is asked for)."""

import json
import platform
import statistics

from . import registry

# (result key, column header, format) in table order; a column shows when its key is present.
COLUMNS = (
    ("backend", "backend", "{}"),
    ("ms", "ms", "{:.4f}"),
    ("tokens_s", "tokens/s", "{:,.0f}"),
    ("gbps", "GB/s", "{:.1f}"),
    ("pct_copy", "% bw", "{:.1f}"),
    ("tflops", "TFLOP/s", "{:.2f}"),
    ("pct_matmul", "% matmul", "{:.1f}"),
    ("x_torch", "x torch", "{:.2f}"),
    ("max_err", "max err", "{:.2e}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
)


def format_table(headers, rows):
    """Rows of strings as aligned text columns: the first left-aligned, the others right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        first, *rest = (str(c) for c in cells)
        return "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])])

    return "\n".join([line(headers), line("-" * w for w in widths)] + [line(r) for r in rows])


def _cell(fmt, value, row=None, key=None):
    if value is None and key == "max_err" and row is not None and row.get("error_na"):
        return "n/a"
    return "-" if value is None else fmt.format(value)


def _groups(results):
    """Results grouped by (op, shape label, direction), in run order."""
    groups = {}
    for r in results:
        key = (r["op"], registry.shape_label(r["shape"]), r["direction"])
        groups.setdefault(key, []).append(r)
    return groups


def _ceiling_line(ceilings, device_type):
    mm = ceilings["matmul_tflops"]
    mm_text = f"{mm:.1f} TFLOP/s" if device_type == "cuda" else f"{mm * 1e3:.1f} GFLOP/s"
    return f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, {ceilings['matmul']} matmul {mm_text}"


def render(report):
    """The whole report as text: header, skipped implementations and failures, one table per
    point, the legend, and a summary line."""
    meta = report["meta"]
    lines = [(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
              f"fastlm {meta['fastlm']}; profile {meta.get('profile', 'full')}"),
             _ceiling_line(report["ceilings"], meta["device_type"])]
    failed = [s for s in report["skipped"] if s.get("failed")]
    for s in report["skipped"]:
        if not s.get("failed"):
            lines.append(f"skipped {s['op']} {s['backend']}: {s['reason']}")
    for s in failed:
        lines.append(f"FAILED {s['op']} {s['backend']}: {s['reason']}")
    for (op, label, direction), rows in _groups(report["results"]).items():
        cols = [c for c in COLUMNS if any(r.get(c[0]) is not None or
                                          (c[0] == "max_err" and r.get("error_na"))
                                          for r in rows)]
        lines += ["", f"{op} {direction}  {label}",
                  format_table([c[1] for c in cols],
                               [[_cell(fmt, r.get(key), r, key) for key, _, fmt in cols]
                                for r in rows])]
    lines += ["", *legend(report)]
    n = len(report["results"])
    seconds = meta.get("seconds")
    lines.append(f"{n} results, {len(report['skipped']) - len(failed)} skipped, "
                 f"{len(failed)} failed" + (f", in {seconds:.0f} s" if seconds else ""))
    return "\n".join(lines)


def legend(report):
    """What the columns mean, and why some errors read n/a."""
    out = ["legend: ms = median time of one call; x torch = torch's ms / this row's ms; "
           "max err = largest |output - oracle| over the compared outputs (the oracle in "
           "float64, or float32 on a GPU where float64 would not fit)"]
    if any(r.get("pct_copy") is not None for r in report["results"]):
        out.append("  % bw = GB/s (bytes the op must move: each input read once, each output "
                   "written once) over the best of copy and in-place add measured on the same "
                   "working-set size, cold caches (ceilings.bandwidth in the JSON)")
    if any(r.get("peak_mib") is not None for r in report["results"]):
        out.append("  peak MiB = memory the call adds at its peak (GPU: allocator statistics; "
                   "CPU: growth of the process's peak resident set, approximate)")
    for reason in dict.fromkeys(r["error_na"] for r in report["results"] if r.get("error_na")):
        out.append(f"  max err {reason}")
    return out


def write_json(report, path):
    """Write the report (metadata, ceilings, skipped, every result) as JSON."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def _stats(samples_s):
    """pytest-benchmark's statistics of a list of durations in seconds."""
    data = sorted(samples_s)
    n = len(data)
    mean = statistics.fmean(data)
    stddev = statistics.stdev(data) if n > 1 else 0.0
    if n > 1:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    iqr = q3 - q1
    lo = next(x for x in data if x >= q1 - 1.5 * iqr)
    hi = next(x for x in reversed(data) if x <= q3 + 1.5 * iqr)
    iqr_out = sum(1 for x in data if x < q1 - 1.5 * iqr or x > q3 + 1.5 * iqr)
    sd_out = sum(1 for x in data if abs(x - mean) > stddev) if stddev else 0
    return {"min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": n,
            "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
            "iqr_outliers": iqr_out, "stddev_outliers": sd_out,
            "outliers": f"{sd_out};{iqr_out}", "ld15iqr": lo, "hd15iqr": hi,
            "ops": 1.0 / mean if mean else 0.0, "total": sum(data), "data": data,
            "iterations": 1}


def to_pytest_benchmark(report):
    """The results in pytest-benchmark's JSON format (one benchmark per row, named
    op[direction-shape-backend], grouped by op, direction and shape), so its tools can read
    them: `pytest-benchmark compare a.json b.json`."""
    meta = report["meta"]
    benchmarks = []
    for r in report["results"]:
        label = registry.shape_label(r["shape"])
        param = f"{r['direction']}-{label.replace(': ', '-').replace(' ', '-')}-{r['backend']}"
        extra = {k: r.get(k) for k in ("gbps", "pct_copy", "tflops", "pct_matmul", "tokens_s",
                                       "x_torch", "max_err", "peak_mib") if r.get(k) is not None}
        benchmarks.append({
            "group": f"{r['op']} {r['direction']} {label}", "name": f"{r['op']}[{param}]",
            "fullname": f"fastlm-bench::{r['op']}[{param}]",
            "params": {"direction": r["direction"], "backend": r["backend"], **r["shape"]},
            "param": param, "extra_info": extra,
            "options": {"disable_gc": False, "timer": "cuda-events" if
                        meta["device_type"] == "cuda" else "perf_counter",
                        "min_rounds": 1, "max_time": 0.0, "min_time": 0.0, "warmup": True},
            "stats": _stats([t / 1e3 for t in r.get("samples_ms") or [r["ms"]]]),
        })
    uname = platform.uname()
    return {"machine_info": {"node": uname.node, "processor": meta["device"],
                             "machine": uname.machine, "python_compiler":
                             platform.python_compiler(), "python_implementation":
                             platform.python_implementation(),
                             "python_implementation_version": platform.python_version(),
                             "python_version": meta["python"], "python_build":
                             list(platform.python_build()), "release": uname.release,
                             "system": uname.system, "cpu": {"brand_raw": meta["device"]}},
            "commit_info": {"id": meta.get("git_commit") or "unversioned", "time": None,
                            "author_time": None, "dirty": False, "project": "fastlm",
                            "branch": "(unknown)"},
            "benchmarks": benchmarks, "datetime": meta["date"], "version": "5.2.3"}


def write_pytest_benchmark_json(report, path):
    with open(path, "w") as f:
        json.dump(to_pytest_benchmark(report), f, indent=2)
        f.write("\n")


def _series(case, r):
    """The plot line of a result: implementation, values of case.series, real model name."""
    extra = ",".join(f"{k}={r['shape'][k]}" for k in case.series)
    model = r["shape"].get("model") if case.x_axis != "model" else None
    return " ".join(x for x in (r["backend"], extra, model and f"[{model}]") if x)


def _panel(ax, case, points, key, unit, title, ceiling=None):
    """One subplot: `key` of every point against the case's x axis, a line per series."""
    xs = list(dict.fromkeys(r["shape"][case.x_axis] for r in points))
    numeric = all(isinstance(x, (int, float)) for x in xs)
    order = sorted(xs) if numeric else xs
    pos = {x: (x if numeric else i) for i, x in enumerate(order)}
    drawn = False
    for label in dict.fromkeys(_series(case, r) for r in points):
        mine = sorted((pos[r["shape"][case.x_axis]], r[key]) for r in points
                      if _series(case, r) == label and r.get(key) is not None)
        if mine:
            ax.plot(*zip(*mine), marker="o", label=label)
            drawn = True
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", linestyle="--", label="copy")
    if numeric and all(x > 0 for x in xs) and len(xs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks([pos[x] for x in order], [str(x) for x in order], minor=False)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set(title=title, xlabel=case.x_axis, ylabel=unit)
    if drawn:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)


def write_plot(report, path):
    """Per op (a row of subplots) and direction: GB/s or TFLOP/s (or tokens/s) against the
    case's x-axis parameter, a line per implementation, and beside it the peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    directions = list(dict.fromkeys(r["direction"] for r in report["results"]))
    ncols = 2 * max(1, len(directions))
    fig, axes = plt.subplots(max(1, len(ops)), ncols, squeeze=False,
                             figsize=(5.5 * ncols, 4 * max(1, len(ops))))
    for row, op in enumerate(ops):
        case = registry.get(op)
        key, unit = ("gbps", "GB/s") if case.bytes else ("tflops", "TFLOP/s")
        if case.tokens:
            key, unit = "tokens_s", "tokens/s"
        for col, direction in enumerate(directions):
            speed, memory = axes[row][2 * col], axes[row][2 * col + 1]
            points = [r for r in report["results"] if r["op"] == op and r["direction"] == direction]
            if not points:  # this op has no such direction
                speed.axis("off")
                memory.axis("off")
                continue
            fixed = ", ".join(f"{k}={v}" for k, v in points[0]["shape"].items()
                              if k not in (case.x_axis, "model") and k not in case.series)
            ceiling = report["ceilings"]["copy_gbps"] if key == "gbps" else None
            _panel(speed, case, points, key, unit, f"{op} {direction} ({fixed})", ceiling)
            if any(r.get("peak_mib") is not None for r in points):
                _panel(memory, case, points, "peak_mib", "peak MiB", f"{op} {direction}: memory")
            else:
                memory.axis("off")
    fig.suptitle(report["meta"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _md_cell(r):
    """"1.23 ms (0.98x, 20.6 GB/s)" for one result in a markdown table."""
    parts = [f"{r['x_torch']:.2f}x"] if r.get("x_torch") is not None else []
    if r.get("tokens_s") is not None:
        parts.append(f"{r['tokens_s']:,.0f} tok/s")
    elif r.get("gbps") is not None:
        parts.append(f"{r['gbps']:.1f} GB/s, {r['pct_copy']:.0f}% bw")
    elif r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.2f} TFLOP/s")
    if r.get("peak_mib") is not None and r["op"] == "gpt":
        parts.append(f"{r['peak_mib']:.0f} MiB")
    return f"{r['ms']:.3g} ms ({', '.join(parts)})" if parts else f"{r['ms']:.3g} ms"


def to_markdown(report, command):
    """The results as markdown tables (one per op and direction: a row per shape, a column per
    implementation), headed by the command and the machine: the README's results come from
    this, unedited."""
    meta = report["meta"]
    failed = [s for s in report["skipped"] if s.get("failed")]
    out = [f"Measured {meta['date'][:10]} with `{command}` on {meta['device']} "
           f"(torch {meta['torch']}, triton {meta['triton']}, fastlm {meta['fastlm']}, commit "
           f"{(meta.get('git_commit') or 'unknown')[:10]}); the run took "
           f"{meta.get('seconds', 0) / 60:.1f} min, {len(report['results'])} results, "
           f"{len(failed)} failed. {_ceiling_line(report['ceilings'], meta['device_type'])}. "
           f"Cells: median ms (speed ratio to torch, then GB/s and % of the bandwidth "
           f"ceiling, TFLOP/s, or tokens/s)."]
    by_op = {}
    for r in report["results"]:
        by_op.setdefault((r["op"], r["direction"]), []).append(r)
    for (op, direction), rows in by_op.items():
        impls = list(dict.fromkeys(r["backend"] for r in rows))
        shapes = list(dict.fromkeys(registry.shape_label(r["shape"]) for r in rows))
        cell = {(registry.shape_label(r["shape"]), r["backend"]): _md_cell(r) for r in rows}
        out += ["", f"**{op} {direction}**", "",
                "| shape | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        out += ["| " + s + " | " + " | ".join(cell.get((s, i), "-") for i in impls) + " |"
                for s in shapes]
    for s in failed:
        out.append(f"\nFailed: {s['op']} {s['backend']}: {s['reason']}")
    return "\n".join(out) + "\n"
