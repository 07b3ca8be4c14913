"""fastlm.optim.AdamW under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2.

Each test starts two worker processes (this file run as a script), which rendezvous through a
file store in a temporary directory (no port to pick or race for), train a small model and save
their parameters; the test compares them with each other and with a single-process run on the
same global batch. Workers have a 30 s collective timeout and the test kills them after
WORKER_TIMEOUT seconds, so nothing can hang.

Tolerance against the single-process run: rtol=1e-5, atol=1e-6. DDP averages gradients with an
all-reduce, which sums the two half-batch gradients in another order than one backward over the
whole batch; the gradients differ by float32 rounding, and Adam's normalized update turns that
into parameter differences of a few float32 ulps per step (the same argument as in
test_optim.py).
"""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

WORLD = 2
STEPS = 5
WORKER_TIMEOUT = 50
OPT_KW = {"lr": 1e-2, "weight_decay": 0.1}
CLIP = 0.5  # below every step's gradient norm in this run (asserted), so every step clips


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)  # global batch of 8


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def single_process_run(max_grad_norm=None):
    """Params after STEPS steps on the whole global batch, and each step's gradient norm."""
    import fastlm

    model = make_model()
    opt = fastlm.optim.AdamW(model.parameters(), max_grad_norm=max_grad_norm, **OPT_KW)
    norms = []
    for s in range(STEPS):
        x, y = batch(s)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], norms


# ---------------------------------------------------------------------------------------------
# Worker (this file run as a script): python test_optim_distributed.py MODE RANK STORE OUT
def _worker(mode, rank, store, out):
    import torch.distributed as dist

    import fastlm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    result = {}
    # "fsdp2-torch": the step on fastlm's torch backend (plain torch ops, which DTensor
    # supports) with fused clipping, whose norm must be global over the shards.
    backend = "torch" if mode == "fsdp2-torch" else None
    clip = CLIP if mode == "fsdp2-torch" else None
    try:
        model = make_model()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        opt = fastlm.optim.AdamW(model.parameters(), max_grad_norm=clip, **OPT_KW)
        norms = []
        for s in range(STEPS):
            x, y = batch(s)
            lo, hi = rank * 4, rank * 4 + 4  # this rank's half of the global batch
            opt.zero_grad()
            loss_fn(model, x[lo:hi], y[lo:hi]).backward()
            with fastlm.use_backend(backend):
                opt.step()
            if clip is not None:
                n = opt.grad_norm
                norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).clone())
        result["grad_norms"] = norms
        params = []
        for p in model.parameters():
            if hasattr(p, "full_tensor"):  # FSDP2: a sharded DTensor
                p = p.full_tensor()
            params.append(p.detach().clone())
        result["params"] = params
    except Exception as e:  # reported to the test, which skips or fails with it
        result["error"] = f"{type(e).__name__}: {e}"
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_workers(mode, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(r), str(store), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=WORKER_TIMEOUT)
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"{mode} workers did not finish in {WORKER_TIMEOUT} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"{mode} rank {r} exited with {p.returncode}:\n{logs[r]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_matches_single_process(tmp_path):
    results = run_workers("ddp", tmp_path)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
    ranks = [res["params"] for res in results]
    for p0, p1 in zip(*ranks):
        assert torch.equal(p0, p1), "parameters differ across DDP ranks"
    want, _ = single_process_run()
    assert len(want) == len(ranks[0])
    moved = False
    for got, ref, init in zip(ranks[0], want, make_model().parameters()):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        moved |= not torch.equal(got, init.detach())
    assert moved, "training did not change the parameters"


def _need_fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}")


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-torch"])
def test_fsdp2_matches_single_process(tmp_path, mode):
    """FSDP2 shards every parameter into DTensors. On the default (cpu) backend the step calls
    torch.ops.fastlm.adam_step_ on them, which DTensor cannot dispatch (no sharding strategy is
    registered for fastlm's ops): skipped with the error. On the torch backend it runs."""
    _need_fsdp2()
    results = run_workers(mode, tmp_path)
    errors = {res.get("error") for res in results} - {None}
    if errors and mode == "fsdp2":
        pytest.skip("fastlm.optim.AdamW on FSDP2 (DTensor) params, default backend, CPU/gloo: "
                    + " | ".join(sorted(errors)))
    assert not errors, errors
    ranks = [res["params"] for res in results]
    for p0, p1 in zip(*ranks):
        assert torch.equal(p0, p1), "gathered FSDP2 parameters differ across ranks"
    clip = CLIP if mode == "fsdp2-torch" else None
    want, want_norms = single_process_run(clip)
    for got, ref in zip(ranks[0], want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if clip is not None:  # the fused norm is the global one, not a shard's
        assert len(results[0]["grad_norms"]) == STEPS
        for norm, want_norm in zip(results[0]["grad_norms"], want_norms):
            assert want_norm > CLIP
            torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
