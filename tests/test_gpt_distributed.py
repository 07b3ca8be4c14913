"""fastlm models trained under torch.distributed on CPU (gloo, 2 processes), equal to one process.

Model level: one launch of two worker processes (this file run as a script), shared by three
tests, which rendezvous through a file store in a temporary directory (no port to pick or race
for); in turn, for each of three setups, they train a small model with fastlm.optim.AdamW (max_grad_norm: the fused clipping, which every step triggers)
for STEPS steps on the halves of the same global batches as a single-process run, and save each
step's global loss (the all-reduced mean of the two halves' means), each step's gradient norm
and the final full parameters:
  - fastlm.models.GPT under DistributedDataParallel;
  - the same GPT under FSDP2 (fully_shard on every block, then on the whole model: the
    parameters are DTensors sharded on dim 0 and fastlm.optim.AdamW steps the local shards);
  - a model written against torch.nn (Embedding, fastlm.nn.TransformerEncoder of
    fastlm.nn.TransformerEncoderLayer, Linear) under DistributedDataParallel.
Workers have a 60 s collective timeout and the fixture kills them after WORKER_TIMEOUT s.

The runs are float32 on fastlm's C++ CPU kernels (use_backend("cpu"); float64 would run on the
pure-PyTorch reference instead). The distributed runs sum the same per-token gradient terms in
another order (two half-batch backwards and an all-reduce, or a reduce-scatter, instead of one
backward), so each gradient differs from the single process's by float32 rounding: a few ulps
(~1e-7 relative) of the terms summed, and after clipping to CLIP = 0.1 no gradient element
exceeds 0.1. Adam's update lr * m / (sqrt(v) + eps) moves by at most about lr / eps times a
gradient's perturbation (the derivative of g / (|g| + eps) is largest at g = 0), so the test
uses eps = EPS = 1e-3 (not 1e-8): the bound is then lr / eps * 0.1 * 1e-7 = 1e-7 a step, 4e-7
over STEPS = 4 steps, and the parameters are compared with atol=1e-6, rtol=1e-5 (observed: at
most 1.2e-7). With the default eps = 1e-8 the bound is lr / eps * 1e-8 = 1e-2 (lr itself, the
largest step there is): an element whose gradient is rounding noise may step either
way, and indeed the encoder's parameters then differ by 1.7e-4 (measured), so no tolerance
could be justified. The losses (means of 32 or 64 tokens' cross-entropies) and the gradient
norms are compared with rtol=1e-6 (observed: 1.1e-7, one ulp; the parameters' differences add
~1e-8 to a loss).

End to end: `python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastlm train`
(torchrun; --standalone rendezvous on a free port that it binds itself) on a tiny config, its
DIR/log.jsonl (every step's loss, the validation losses) against the single-process
`fastlm train` with the same arguments, under DDP and --fsdp. That run is float32 (the
command's precision on the CPU): its losses agree to rtol=2e-5. A loss is a mean of 64 tokens'
cross-entropies; the distributed gradients differ by float32 rounding (1e-7 relative), which
Adam can amplify to a full step (lr) only in elements whose gradient is itself at the rounding
level (~1e-8), whose effect on the loss is of the order lr * 1e-8 per element: the observed
relative differences are about 1e-7 after 6 steps, and 2e-5 leaves a margin of 100x. Resuming
is exact: a run stopped and resumed with the same world size ends with the same checkpoint, bit
for bit, and the same logged losses as the run straight through: under FSDP2 after
--stop-after, under DDP after a Ctrl-C sent to torchrun (with dropout on, so that every rank's
own random state must be saved and restored). Each torchrun launch costs ~10 s, mostly the
three processes importing torch, so there are seven of them and no more.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from trainutil import ROOT, assert_same_training_state, load_checkpoint, run_workers, worker_env

import fastlm
from fastlm import cli, train
from fastlm.models import GPT, GPTConfig

WORLD = 2
STEPS = 4
WORKER_TIMEOUT = 120  # generous: the two workers share the CPU cores with each other and more
TORCHRUN_TIMEOUT = 180
VOCAB, BLOCK, BATCH = 64, 16, 4  # BATCH: the global batch, BATCH // WORLD sequences a rank
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.1, 0.1  # CLIP: below every step's gradient norm (asserted)
EPS = 1e-3  # Adam's eps: bounds how much the update amplifies a gradient's rounding (below)


# ---------------------------------------------------------------------------------------------
# The models, batches and optimizers of the model-level tests.
def make_gpt():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16,
                       dropout=0.0)
    return GPT(config)


class EncoderLM(torch.nn.Module):
    """A model as a user writes it against torch.nn, with fastlm's Transformer modules:
    token embedding, a causal fastlm.nn.TransformerEncoder, a Linear head."""

    def __init__(self):
        super().__init__()
        layer = fastlm.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.encoder = fastlm.nn.TransformerEncoder(layer, num_layers=2)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, idx, targets):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(idx.shape[1],
                                                                    dtype=torch.float32)
        h = self.encoder(self.embed(idx), mask=mask, is_causal=True)
        logits = self.head(h)
        return logits, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_encoder():
    torch.manual_seed(0)
    return EncoderLM()


MODELS = {"gpt": make_gpt, "encoder": make_encoder}


def make_optimizer(kind, model):
    if kind == "gpt":  # decay on matmul weights and embeddings, as `fastlm train`
        return model.configure_optimizers(WEIGHT_DECAY, LR, (0.9, 0.95), max_grad_norm=CLIP,
                                         eps=EPS)
    return fastlm.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                              max_grad_norm=CLIP, eps=EPS)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(VOCAB, (BATCH, BLOCK), generator=g),
            torch.randint(VOCAB, (BATCH, BLOCK), generator=g))


def single_process_run(kind):
    """The whole global batch in one process: {"losses", "norms", "params" (by name)}."""
    model = MODELS[kind]()
    opt = make_optimizer(kind, model)
    losses, norms = [], []
    with fastlm.use_backend("cpu"):
        for s in range(STEPS):
            x, y = batch(s)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            norms.append(opt.grad_norm.item())
    return {"losses": losses, "norms": norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


# ---------------------------------------------------------------------------------------------
# Workers (this file run as a script): python test_gpt_distributed.py RANK STORE OUT. One launch
# runs every mode in turn (the processes' start, mostly importing torch, costs more than the
# training): {mode: result} in OUT/rank{RANK}.pt.
MODES = ("gpt-ddp", "gpt-fsdp2", "encoder-ddp")


def _train_mode(mode, rank):
    import torch.distributed as dist

    kind, wrap = mode.split("-")
    model = MODELS[kind]()
    if wrap == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        trained = fully_shard(model)
    opt = make_optimizer(kind, model)
    losses, norms = [], []
    with fastlm.use_backend("cpu"):
        for s in range(STEPS):
            x, y = batch(s)
            local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            _, loss = trained(x[local], y[local])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD)
            norms.append(opt.grad_norm.item())

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return {"losses": losses, "norms": norms,
            "params": {n: full(p) for n, p in model.named_parameters()},
            "types": sorted({type(p).__name__ for p in model.parameters()})}


def _worker(rank, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results = {}
    for mode in MODES:
        try:
            results[mode] = _train_mode(mode, rank)
        except Exception as e:  # noqa: BLE001 (reported to the test, which fails with it)
            results[mode] = {"error": f"{type(e).__name__}: {e}"}
            dist.barrier()  # (an error is the same on both ranks: go on together)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Both ranks' {mode: result}."""
    return run_workers(__file__, [], tmp_path_factory.mktemp("workers"), WORLD, WORKER_TIMEOUT,
                       "the model-level")


def mode_results(workers, mode):
    results = [w[mode] for w in workers]
    for r, res in enumerate(results):
        assert "error" not in res, f"{mode} rank {r}: {res['error']}"
    return results


def check_against_single_process(kind, results):
    want = single_process_run(kind)
    init = dict(MODELS[kind]().named_parameters())
    assert all(n > CLIP for n in want["norms"]), want["norms"]  # every step clips
    for r, res in enumerate(results):
        torch.testing.assert_close(res["losses"], want["losses"], rtol=1e-6, atol=0,
                                   msg=lambda m, r=r: f"rank {r} losses: {m}")
        torch.testing.assert_close(res["norms"], want["norms"], rtol=1e-6, atol=0,
                                   msg=lambda m, r=r: f"rank {r} gradient norms: {m}")
        assert res["params"].keys() == want["params"].keys()
        for name, ref in want["params"].items():
            got = res["params"][name]
            assert torch.equal(got, results[0]["params"][name]), f"{name}: ranks 0, {r} differ"
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
    assert all(not torch.equal(results[0]["params"][n], p) for n, p in init.items()), \
        "training left a parameter unchanged"


def test_gpt_ddp_matches_single_process(workers):
    results = mode_results(workers, "gpt-ddp")
    assert results[0]["types"] == ["Parameter"]
    check_against_single_process("gpt", results)


def _need_fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}")


def test_gpt_fsdp2_matches_single_process(workers):
    _need_fsdp2()
    results = mode_results(workers, "gpt-fsdp2")
    assert results[0]["types"] == ["DTensor"]  # every parameter sharded (the tied one too)
    check_against_single_process("gpt", results)


def test_torch_nn_model_with_fastlm_encoder_ddp_matches_single_process(workers):
    model = make_encoder()
    assert isinstance(model.encoder.layers[0].self_attn, fastlm.nn.MultiheadAttention)
    assert isinstance(model.encoder.layers[0].norm1, fastlm.nn.LayerNorm)
    check_against_single_process("encoder", mode_results(workers, "encoder-ddp"))


# ---------------------------------------------------------------------------------------------
# `fastlm train` under torchrun.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-every", "3", "--eval-iters", "2", "--sample-tokens", "16",
        "--no-progress", "--device", "cpu"]
CLI_STEPS = 6


def torchrun(*args, interrupt_at=None, nproc=WORLD):
    """`fastlm train ARGS` under torchrun: (exit status, output). With interrupt_at=(log path,
    step), SIGINT (Ctrl-C) goes to torchrun once the log has reached that step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "fastlm", "train", *args]
    proc = subprocess.Popen(cmd, env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if interrupt_at is not None:
            path, step = interrupt_at
            deadline = time.monotonic() + TORCHRUN_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _log_steps(path) >= step:
                    proc.send_signal(signal.SIGINT)
                    break
                time.sleep(0.02)
        out, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (SIGTERM, then SIGKILL after 30 s)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"torchrun fastlm train {' '.join(args)} did not finish in "
                    f"{TORCHRUN_TIMEOUT} s")
    return proc.returncode, out.decode(errors="replace")


def _log_steps(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except OSError:
        return 0


def read_log(out_dir):
    with open(os.path.join(out_dir, train.LOG)) as f:
        return [json.loads(line) for line in f]


def assert_same_checkpoint(a, b):
    """Bit for bit: model, optimizer, step and every random state."""
    assert_same_training_state(a, b)
    assert len(a["rng"]["ranks"]) == len(b["rng"]["ranks"]) == WORLD
    for ra, rb in zip(a["rng"]["ranks"], b["rng"]["ranks"]):
        assert torch.equal(ra["torch"], rb["torch"])


def assert_same_losses(log, want, rtol):
    assert [r["step"] for r in log] == [r["step"] for r in want]
    for key in ("loss", "val_loss", "lr"):
        got = [r.get(key) for r in log]
        ref = [r.get(key) for r in want]
        assert [g is None for g in got] == [r is None for r in ref], key
        torch.testing.assert_close([g for g in got if g is not None],
                                   [r for r in ref if r is not None], rtol=rtol, atol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_file):
    """The single-process `fastlm train` run: its log.jsonl and checkpoint."""
    out_dir = str(tmp_path_factory.mktemp("single"))
    args = cli.build_parser().parse_args(["train", "--data", data_file, "--steps",
                                          str(CLI_STEPS), "--out", out_dir, *TINY])
    with fastlm.use_backend("cpu"):
        assert train.run(args) == 0
    log = read_log(out_dir)
    assert [r["step"] for r in log] == list(range(1, CLI_STEPS + 1))
    assert [r["step"] for r in log if "val_loss" in r] == [3, 6]
    return log, load_checkpoint(out_dir)


def check_straight_run(out, out_dir, single, what):
    """A straight torchrun run of CLI_STEPS steps: rank 0 alone prints; the logged losses are
    the single-process run's; the checkpoint has the single-process format. Its log."""
    assert f"{WORLD} processes ({what}, gloo), cpu, float32; 64 tokens per step" in out, out
    assert len(re.findall(r"^fastlm step 6/6: train loss", out, re.MULTILINE)) == 1
    assert out.count("--- sample (16 bytes) ---") == 1
    log = read_log(out_dir)
    assert_same_losses(log, single[0], rtol=2e-5)
    ckpt = load_checkpoint(out_dir)
    assert ckpt["world_size"] == WORLD and ckpt["step"] == CLI_STEPS
    # full tensors, the optimizer state by index: the single-process format
    assert ckpt["model"].keys() == single[1]["model"].keys()
    assert ckpt["optimizer"]["param_groups"] == single[1]["optimizer"]["param_groups"]
    assert ckpt["optimizer"]["state"].keys() == single[1]["optimizer"]["state"].keys()
    for k, v in ckpt["model"].items():
        assert type(v) is torch.Tensor and v.shape == single[1]["model"][k].shape, k
    for i, st in ckpt["optimizer"]["state"].items():
        for k, v in st.items():
            assert type(v) is torch.Tensor, (i, k)
            assert v.shape == single[1]["optimizer"]["state"][i][k].shape, (i, k)
    assert torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["transformer.wte.weight"])
    return log


def test_torchrun_ddp_matches_single_process(tmp_path, data_file, single):
    out_dir = str(tmp_path / "ddp")
    code, out = torchrun("--data", data_file, "--steps", str(CLI_STEPS), "--out", out_dir, *TINY)
    assert code == 0, out
    check_straight_run(out, out_dir, single, "DDP")


def test_torchrun_fsdp2_matches_single_process_and_resumes_exactly(tmp_path, data_file, single):
    """FSDP2 checkpoints hold gathered full tensors; resuming shards them again (the model
    before fully_shard, the optimizer's moments with distribute_tensor)."""
    _need_fsdp2()
    straight = str(tmp_path / "straight")
    args = ["--data", data_file, "--steps", str(CLI_STEPS), *TINY, "--fsdp"]
    code, out = torchrun(*args, "--out", straight)
    assert code == 0, out
    log = check_straight_run(out, straight, single, "FSDP2")
    resumed = str(tmp_path / "resumed")
    code, out = torchrun(*args, "--stop-after", "4", "--out", resumed)
    assert code == 0 and "stopped at step 4/6 (--stop-after 4)" in out, out
    assert load_checkpoint(resumed)["step"] == 4 and len(read_log(resumed)) == 4
    code, out = torchrun(*args, "--out", resumed, "--resume")
    assert code == 0 and "at step 4" in out and "start afresh" not in out, out
    assert_same_checkpoint(load_checkpoint(resumed), load_checkpoint(straight))
    assert_same_losses(read_log(resumed), log, rtol=0)


CTRL_C_STEPS = 150  # long enough (a few seconds) for the Ctrl-C to land mid-run


def test_torchrun_ctrl_c_saves_and_resumes_exactly(tmp_path, data_file):
    """DDP with dropout on, so that each rank's own random stream must be saved and restored.
    SIGINT to torchrun reaches every worker; they agree on a step, save, and exit 130; the
    resumed run ends as the run straight through, bit for bit."""
    args = ["--data", data_file, "--steps", str(CTRL_C_STEPS), *TINY, "--dropout", "0.1",
            "--eval-every", "0", "--sample-tokens", "0"]
    straight = str(tmp_path / "straight")
    code, out = torchrun(*args, "--out", straight)
    assert code == 0, out
    stopped = str(tmp_path / "stopped")
    code, out = torchrun(*args, "--out", stopped,
                         interrupt_at=(os.path.join(stopped, train.LOG), 3))
    assert code != 0, out  # torchrun itself ends with the signal
    m = re.search(rf"stopped at step (\d+)/{CTRL_C_STEPS}: checkpoint saved to", out)
    assert m, out
    step = int(m.group(1))
    assert 3 <= step < CTRL_C_STEPS, "the run ended before the Ctrl-C reached it"
    assert "exited with" not in out and "Traceback" not in out.split("stopped at step")[0]
    assert load_checkpoint(stopped)["step"] == step and len(read_log(stopped)) == step
    code, out = torchrun(*args, "--out", stopped, "--resume")
    assert code == 0 and f"at step {step}" in out and "start afresh" not in out, out
    ckpt = load_checkpoint(stopped)
    assert_same_checkpoint(ckpt, load_checkpoint(straight))
    assert not torch.equal(ckpt["rng"]["ranks"][0]["torch"], ckpt["rng"]["ranks"][1]["torch"])
    assert_same_losses(read_log(stopped), read_log(straight), rtol=0)


def test_distributed_argument_errors(data_file, monkeypatch, capsys):
    """Checked before the process group starts (so in this process, as a torchrun worker)."""
    def run(*args):
        train.run(cli.build_parser().parse_args(["train", "--data", data_file, "--steps", "2",
                                                 *TINY, *args]))

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit, match="--fsdp shards the model over processes: launch "
                                         "with torchrun"):
        run("--fsdp")
    assert not train.launched_by_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.launched_by_torchrun()
    with pytest.raises(SystemExit, match=r"--batch-size 3 must be a multiple of the number of "
                                         r"processes \(2\)"):
        run("--batch-size", "3")
    with pytest.raises(SystemExit, match="--compare runs in one process: launch it without "
                                         "torchrun"):
        run("--compare", "torch")
    with pytest.raises(SystemExit, match="each process uses cuda:LOCAL_RANK; pass --device cuda"):
        run("--device", "cuda:1")
    assert capsys.readouterr().out == ""


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
