"""The benchmark report: a plain-text table per op, shape and direction; the JSON file; the
PNG plot (matplotlib, imported only when a plot is asked for)."""

import json

from . import registry

# (result key, column header, format) in table order; a column shows when its key is present.
COLUMNS = (
    ("backend", "backend", "{}"),
    ("ms", "ms", "{:.4f}"),
    ("tokens_s", "tokens/s", "{:,.0f}"),
    ("gbps", "GB/s", "{:.1f}"),
    ("pct_copy", "% copy", "{:.1f}"),
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


def _cell(fmt, value):
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
    """The whole report as text: header, skipped implementations, one table per point."""
    meta = report["meta"]
    lines = [(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
              f"fastlm {meta['fastlm']}"),
             _ceiling_line(report["ceilings"], meta["device_type"])]
    for s in report["skipped"]:
        lines.append(f"skipped {s['op']} {s['backend']}: {s['reason']}")
    for (op, label, direction), rows in _groups(report["results"]).items():
        cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
        lines += ["", f"{op} {direction}  {label}",
                  format_table([c[1] for c in cols],
                               [[_cell(fmt, r.get(key)) for key, _, fmt in cols] for r in rows])]
    return "\n".join(lines)


def write_json(report, path):
    """Write the report (metadata, ceilings, skipped, every result) as JSON."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def write_plot(report, path):
    """GB/s (or TFLOP/s) against the case's x-axis parameter, one line per implementation,
    one row of subplots per op with a column per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    directions = list(dict.fromkeys(r["direction"] for r in report["results"]))
    fig, axes = plt.subplots(len(ops), len(directions), squeeze=False,
                             figsize=(6 * len(directions), 4 * len(ops)))
    for row, op in enumerate(ops):
        case = registry.get(op)
        key, unit = ("gbps", "GB/s") if case.bytes else ("tflops", "TFLOP/s")
        for col, direction in enumerate(directions):
            ax = axes[row][col]
            points = [r for r in report["results"] if r["op"] == op and r["direction"] == direction]
            if not points:  # this op has no such direction
                ax.axis("off")
                continue
            def series(r):  # one line per implementation and per value of case.series
                extra = ",".join(f"{k}={r['shape'][k]}" for k in case.series)
                return f"{r['backend']} {extra}".strip()

            for label in dict.fromkeys(series(r) for r in points):
                mine = sorted((r["shape"][case.x_axis], r[key]) for r in points
                              if series(r) == label)
                ax.plot(*zip(*mine), marker="o", label=label)
            if key == "gbps":
                ax.axhline(report["ceilings"]["copy_gbps"], color="gray", linestyle="--",
                           label="copy")
            xs = sorted({r["shape"][case.x_axis] for r in points})
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs], minor=False)
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            fixed = ", ".join(f"{k}={v}" for k, v in points[0]["shape"].items()
                              if k != case.x_axis and k not in case.series)
            ax.set(title=f"{op} {direction} ({fixed})", xlabel=case.x_axis, ylabel=unit)
            ax.legend()
            ax.grid(True, alpha=0.3)
    fig.suptitle(report["meta"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
