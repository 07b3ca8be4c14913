"""GPT training step (zero_grad, forward + loss, backward, AdamW step): fastlm.models.GPT eager
and compiled against the same GPT-2 in plain torch (eager, compiled, and as a stack of
nn.TransformerEncoderLayer); cases in fastlm/bench/gpt.py."""

OP = "gpt"


def test_gpt(bench_point, benchmark):
    bench_point.run(benchmark)
