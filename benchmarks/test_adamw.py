"""AdamW step (and step with clipping) on a GPT-2 parameter set: fastlm backends, torch fused
and foreach (cases in fastlm/bench/adamw.py)."""

OP = "adamw"


def test_adamw(bench_point, benchmark):
    bench_point.run(benchmark)
