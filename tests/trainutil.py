"""Helpers of the training tests (test_train_cli, test_optim_distributed, test_gpt_distributed):
worker processes, and `fastlm train` checkpoints.

A plain module, not conftest: the distributed test files also run as worker scripts, which
import this (from their own folder) but must not import conftest (it switches on Triton's
interpreter)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env():
    """The environment of a worker process: one OpenMP thread (the workers share the cores), no
    Triton interpreter, this checkout's fastlm first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_workers(script, args, tmp, world, timeout, what):
    """Runs `python script *args RANK STORE TMP` for each rank (STORE: a file-store path in
    tmp for the rendezvous), fails the test if one exits non-zero or they run past `timeout`
    seconds, and returns the ranks' results, TMP/rank{RANK}.pt."""
    store = tmp / "store"
    procs = [subprocess.Popen([sys.executable, script, *args, str(r), str(store), str(tmp)],
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"{what} workers did not finish in {timeout} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"{what} rank {r} exited with {p.returncode}:\n{logs[r]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def load_checkpoint(out_dir):
    """The checkpoint `fastlm train --out out_dir` saved."""
    from fastlm import train

    return torch.load(os.path.join(out_dir, train.CHECKPOINT), weights_only=False)


def assert_same_training_state(a, b):
    """Two checkpoints, bit for bit: step, model, optimizer state and the batch sampler's
    random state (the caller checks the per-process random states)."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert torch.equal(a["rng"]["batches"], b["rng"]["batches"])
