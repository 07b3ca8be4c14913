"""Attention forward and backward: fastlm backends, torch SDPA (its default and each of its
backends), flash-attn when installed (cases in fastlm/bench/attention.py)."""

OP = "attention"


def test_attention(bench_point, benchmark):
    bench_point.run(benchmark)
