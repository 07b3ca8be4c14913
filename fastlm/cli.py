"""The `fastlm` command: `fastlm info`, `fastlm bench`, `fastlm compile`.

    fastlm info                                      versions, build, backends on this machine
    fastlm bench [OPS...] [--device cpu|cuda] [--quick] [--json PATH] [--plot PATH]
    fastlm compile --arch sm_90 [...]                see `fastlm compile --help`

Everything beyond argparse (torch, fastlm, rich, matplotlib) is imported by the subcommand
that needs it.
"""

import argparse
import sys


def info(args):
    """Print versions, the state of fastlm._C and its CUDA kernels, and the backend table."""
    import torch

    from fastlm import _ext, backends
    from fastlm.bench import env
    from fastlm.bench.report import format_table

    v = env.versions()
    print(f"fastlm  {v['fastlm']}")
    print(f"torch   {v['torch']} (built with CUDA {v['torch_cuda'] or 'none: a CPU build'})")
    print(f"triton  {v['triton'] or 'not installed'}")
    print(f"python  {v['python']}")
    if _ext.C is None:
        print(f"fastlm._C: not loaded: {_ext.ERROR}")
    else:
        print(f"fastlm._C: loaded from {_ext.C.__file__}")
        archs = _ext.cuda_archs()
        print(f"CUDA kernels: {'built for ' + ', '.join(archs) if archs else 'not built'}")
        if archs:
            found, why = env.cubin_archs(_ext.C.__file__)
            print(f"cuobjdump --list-elf: {', '.join(found) if found else why or 'no cubins'}")
    gpu = env.device_name(torch.device("cuda")) if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}")
    table = backends.available()
    devices = ("cuda", "cpu")
    rows = [[name] + ["yes" if table[name][d][0] else "no" for d in devices]
            for name in backends.NAMES]
    print("\nbackends, by the device of the tensors:")
    print(format_table(["backend", *devices], rows))
    for name in backends.NAMES:
        for d in devices:
            ok, why = table[name][d]
            if not ok:
                print(f"  {name} on {d}: {why}")
    print(f"default: cuda -> {backends.default_for('cuda')}, cpu -> {backends.default_for('cpu')}")
    return 0


def bench(args):
    """Run the benchmark cases; print the tables; write the JSON and the plot if asked."""
    import torch

    from fastlm import bench as fb

    unknown = [op for op in args.ops if op not in fb.CASES]
    if unknown:
        args.error(f"unknown op {', '.join(unknown)}: choose from {', '.join(fb.names())}")
    gpu = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu else "cpu")
    if device == "cuda" and not gpu:
        args.error("device cuda is not available here (torch.cuda.is_available() is False): "
                     "valid choice: cpu")
    report = fb.run(args.ops or fb.names(), device, quick=args.quick,
                    progress=not args.no_progress)
    print(fb.report.render(report))
    if args.json:
        fb.report.write_json(report, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        fb.report.write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def compile_(rest):
    """Hand `fastlm compile ...` to fastlm.compile.main."""
    from fastlm import compile as fc

    return fc.main(rest)


def build_parser():
    """The argparse parser of the `fastlm` command."""
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,compile}")
    p = sub.add_parser("info", help="versions, build and which backends work here")
    p.set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark ops against PyTorch and peers")
    p.add_argument("ops", nargs="*", metavar="OP",
                   help="ops to benchmark (default: all registered ones)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--quick", action="store_true", help="a few small shapes only")
    p.add_argument("--json", metavar="PATH", help="write every number and metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot of GB/s against N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=bench, error=p.error)
    sub.add_parser("compile", add_help=False,
                   help="build the kernels for chosen GPU archs (fastlm compile --help)")
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
