"""fastlm's benchmark suite: one registry of cases, used by `fastlm bench` and benchmarks/.

    from fastlm import bench
    report = bench.run(["layer_norm"], "cpu", quick=True)   # {"meta", "ceilings", "skipped", "results"}
    print(bench.report.render(report))

To benchmark a new op, add ``fastlm/bench/<op>.py`` that builds a :class:`Case` (shapes per
device, input maker, implementations, oracle, byte or FLOP formula) and passes it to
:func:`register`, then import that module below. Heavy imports (rich, matplotlib,
triton.testing, peers) happen only when a benchmark runs.
"""

from . import add_layer_norm, adamw, attention, gpt, layer_norm, report  # noqa: F401  (importing an op module registers its case)
from . import hf, linear_cross_entropy, rms_norm, rotary, swiglu  # noqa: F401  (issue 13's cases)
from .registry import CASES, Case, Impl, get, names, register, shape_label, split_available
from .runner import run

__all__ = ["CASES", "Case", "Impl", "get", "names", "register", "report", "run", "shape_label",
           "split_available"]
