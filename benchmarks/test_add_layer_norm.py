"""Fused residual add + dropout + LayerNorm forward and backward: fastlm backends, torch eager
and torch.compile (cases in fastlm/bench/add_layer_norm.py)."""

OP = "add_layer_norm"


def test_add_layer_norm(bench_point, benchmark):
    bench_point.run(benchmark)
