"""The `fastlm` command: `fastlm info`, `fastlm bench`, `fastlm compile`, `fastlm train`.

    fastlm --version
    fastlm info [--json]                             versions, build, backends on this machine
    fastlm bench [OPS...] [--device cpu|cuda] [--profile full|quick|headline|tiny] [--quick]
                 [--skip-impl GLOB] [--budget SECONDS] [--json PATH] [--pytest-json PATH] [--markdown PATH]
                 [--plot PATH]
    fastlm compile --arch sm_90 [...]                see `fastlm compile --help`
    fastlm train [--data PATH] [--steps N] [...]     a byte-level GPT; see `fastlm train --help`

Everything beyond argparse (torch, fastlm, rich, matplotlib) is imported by the subcommand
that needs it.
"""

import argparse
import sys


def info_dict():
    """Everything `fastlm info` reports, as a dict (for bug reports: `fastlm info --json`)."""
    import torch

    from fastlm import _ext, backends
    from fastlm.bench import env

    out = {"versions": env.versions(), "git_commit": env.git_commit(),
           "extension": {"loaded": _ext.C is not None,
                         "file": _ext.C.__file__ if _ext.C is not None else None,
                         "error": _ext.ERROR, "cuda_archs": _ext.cuda_archs()},
           "gpu": (env.device_name(torch.device("cuda")) if torch.cuda.is_available()
                   else None),
           "cpu": env.device_name(torch.device("cpu")),
           "backends": {name: {d: {"available": ok, "reason": why or None}
                               for d, (ok, why) in per.items()}
                        for name, per in backends.available().items()},
           "default": {d: backends.default_for(d) for d in ("cuda", "cpu")}}
    if out["extension"]["cuda_archs"]:
        found, why = env.cubin_archs(_ext.C.__file__)
        out["extension"]["cubins"] = found
        out["extension"]["cubins_error"] = why
    return out


def info(args):
    """Print versions, the state of fastlm._C and its CUDA kernels, and the backend table."""
    import json

    from fastlm import backends
    from fastlm.bench.report import format_table

    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    v = d["versions"]
    print(f"fastlm  {v['fastlm']}")
    print(f"torch   {v['torch']} (built with CUDA {v['torch_cuda'] or 'none: a CPU build'})")
    print(f"triton  {v['triton'] or 'not installed'}")
    print(f"python  {v['python']}")
    ext = d["extension"]
    if not ext["loaded"]:
        print(f"fastlm._C: not loaded: {ext['error']}")
    else:
        print(f"fastlm._C: loaded from {ext['file']}")
        archs = ext["cuda_archs"]
        print(f"CUDA kernels: {'built for ' + ', '.join(archs) if archs else 'not built'}")
        if archs:
            found = ext.get("cubins")
            print(f"cuobjdump --list-elf: "
                  f"{', '.join(found) if found else ext.get('cubins_error') or 'no cubins'}")
    print(f"GPU: {d['gpu'] or 'none visible'}")
    devices = ("cuda", "cpu")
    table = d["backends"]
    rows = [[name] + ["yes" if table[name][dv]["available"] else "no" for dv in devices]
            for name in backends.NAMES]
    print("\nbackends, by the device of the tensors:")
    print(format_table(["backend", *devices], rows))
    for name in backends.NAMES:
        for dv in devices:
            if not table[name][dv]["available"]:
                print(f"  {name} on {dv}: {table[name][dv]['reason']}")
    print(f"default: cuda -> {d['default']['cuda']}, cpu -> {d['default']['cpu']}")
    return 0


def bench(args):
    """Run the benchmark cases; print the tables; write the JSON and the plot if asked. Exit
    status 1 when any measurement failed (each failure is a line of the report)."""
    import torch

    from fastlm import bench as fb

    unknown = [op for op in args.ops if op not in fb.CASES]
    if unknown:
        args.error(f"unknown op {', '.join(unknown)}: choose from {', '.join(fb.names())}")
    if args.quick and args.profile not in (None, "quick"):
        args.error(f"--quick is --profile quick; it cannot be combined with --profile "
                   f"{args.profile}")
    profile = args.profile or ("quick" if args.quick else "full")
    gpu = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu else "cpu")
    if device == "cuda" and not gpu:
        args.error("device cuda is not available here (torch.cuda.is_available() is False): "
                     "valid choice: cpu")
    ops = args.ops or fb.names()
    print(f"fastlm bench: {', '.join(ops)} on {device}, profile {profile}", flush=True)
    save = (lambda partial: fb.report.write_json(partial, args.json)) if args.json else None
    report = fb.run(ops, device, profile=profile, progress=not args.no_progress,
                    announce=lambda text: print(f"plan: {text}", flush=True),
                    skip_impls=args.skip_impl, on_case=save, budget=args.budget)
    print(fb.report.render(report))
    if args.json:
        fb.report.write_json(report, args.json)
        print(f"\nwrote {args.json}")
    if args.pytest_json:
        fb.report.write_pytest_benchmark_json(report, args.pytest_json)
        print(f"wrote {args.pytest_json} (pytest-benchmark format)")
    if args.markdown:
        command = " ".join(["fastlm bench", *args.ops]
                           + (["--device", args.device] if args.device else [])
                           + (["--profile", profile] if profile != "full" else []))
        with open(args.markdown, "w") as f:
            f.write(fb.report.to_markdown(report, command))
        print(f"wrote {args.markdown} (markdown tables)")
    if args.plot:
        fb.report.write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 1 if report["failures"] else 0


def compile_(rest):
    """Hand `fastlm compile ...` to fastlm.compile.main."""
    from fastlm import compile as fc

    return fc.main(rest)


def train(args):
    """Train a byte-level GPT (fastlm/train.py)."""
    from fastlm import train as ft

    return ft.run(args)


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_train_arguments(p):
    """The options of `fastlm train` (their meaning: fastlm/train.py)."""
    p.add_argument("--data", metavar="PATH",
                   help="a text file, read as bytes (default: the Python standard library's own "
                        "source, up to 4 MiB)")
    p.add_argument("--steps", type=_positive, default=500,
                   help="optimizer steps; the learning-rate schedule spans them (default 500)")
    p.add_argument("--stop-after", type=_positive, metavar="N",
                   help="stop after N steps of this run, saving a checkpoint; --resume continues")
    p.add_argument("--batch-size", type=_positive, default=16, help="sequences per step (16)")
    p.add_argument("--block-size", type=_positive, help="tokens per sequence (128)")
    p.add_argument("--n-layer", type=_positive, help="transformer blocks (4)")
    p.add_argument("--n-head", type=_positive, help="attention heads (4)")
    p.add_argument("--n-embd", type=_positive, help="model width (128)")
    p.add_argument("--dropout", type=float, help="dropout probability (0.0)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    p.add_argument("--warmup", type=int, metavar="STEPS",
                   help="linear warm-up steps (default: a tenth of --steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on matmul weights and embeddings (0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (1.0; 0: no clipping)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is visible)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "fp32", "bf16"),
                   help="bfloat16: bf16 autocast, float32 master weights (default: bfloat16 on "
                        "cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-every", type=int, default=100, metavar="STEPS",
                   help="evaluate on the held-out 10%% (and checkpoint) every this many steps "
                        "(100; 0: only at the end)")
    p.add_argument("--eval-iters", type=_positive, default=10,
                   help="batches per evaluation (10)")
    p.add_argument("--out", metavar="DIR",
                   help="write checkpoints to DIR/ckpt.pt (at each evaluation, the end, Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/ckpt.pt (--out)")
    p.add_argument("--sample-tokens", type=int, default=200, metavar="N",
                   help="bytes to sample from the model at the end (200; 0: none)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (1337)")
    p.add_argument("--compare", choices=("torch",),
                   help="also train the same model built from torch.nn modules with "
                        "torch.optim.AdamW, from the same init, and print both")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (fully_shard per block and "
                        "on the whole model) instead of DistributedDataParallel")


def _version():
    """fastlm's version without importing it (and torch): the installed distribution's."""
    import importlib.metadata

    try:
        return importlib.metadata.version("fastlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser():
    """The argparse parser of the `fastlm` command."""
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{info,bench,compile,train}")
    p = sub.add_parser("info", help="versions, build and which backends work here")
    p.add_argument("--json", action="store_true", help="print it as JSON (for bug reports)")
    p.set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark ops against PyTorch and peers")
    p.add_argument("ops", nargs="*", metavar="OP",
                   help="ops to benchmark (default: all registered ones)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--profile", choices=("full", "quick", "headline", "tiny"),
                   help="which shapes: full (default: the sweeps and real models' layers), "
                        "quick (a few small shapes), headline (the GPU check's rows; tiny "
                        "shapes on the CPU), tiny (every implementation at tiny sizes)")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--skip-impl", action="append", default=[], metavar="GLOB",
                   help="leave out the implementations whose name matches (repeatable), "
                        "e.g. --skip-impl '*compile*'")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timed seconds per measurement (default 0.4 on the CPU, 0.1 on a GPU; "
                        "0.02 in the tiny profile): small values check a path, not its speed")
    p.add_argument("--json", metavar="PATH",
                   help="write every number and metadata as JSON (rewritten after each case, "
                        "so a run cut short keeps what it measured: meta.partial)")
    p.add_argument("--pytest-json", metavar="PATH",
                   help="also write the results in pytest-benchmark's JSON format "
                        "(for `pytest-benchmark compare`)")
    p.add_argument("--markdown", metavar="PATH",
                   help="write the results as markdown tables headed by the command and the "
                        "machine (the README's results tables)")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG plot: speed against the shape, and peak memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=bench, error=p.error)
    sub.add_parser("compile", add_help=False,
                   help="build the kernels for chosen GPU archs (fastlm compile --help)")
    p = sub.add_parser("train", help="train a byte-level GPT on a text file (no download)",
                       description="Train fastlm.models.GPT on a text file read as bytes.")
    _add_train_arguments(p)
    p.set_defaults(func=train)
    return parser


def main(argv=None):
    """Entry point of the `fastlm` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compile"]:
        return compile_(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
