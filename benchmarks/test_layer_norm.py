"""LayerNorm forward and backward: fastlm backends, torch and peers (cases in
fastlm/bench/layer_norm.py)."""

OP = "layer_norm"


def test_layer_norm(bench_point, benchmark):
    bench_point.run(benchmark)
