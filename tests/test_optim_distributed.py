"""fastlm.optim.AdamW under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2.

Each test starts two worker processes (this file run as a script), which rendezvous through a
file store in a temporary directory (no port to pick or race for), train a small model and save
their parameters and optimizer state; the test compares them with each other and with a
single-process torch.optim.AdamW(fused=True) run on the same global batch (clipped by
torch.nn.utils.clip_grad_norm_ where fastlm clips with max_grad_norm). Under FSDP2 every
parameter is a DTensor sharded on dim 0: fastlm steps the local shards and all-reduces the
clipping norm's sums of squares over the shards. Workers have a 60 s collective timeout and
the test kills them after WORKER_TIMEOUT seconds, so nothing can hang.

Tolerance against the single-process run: rtol=1e-5, atol=1e-6. DDP averages gradients with an
all-reduce, which sums the two half-batch gradients in another order than one backward over the
whole batch; the gradients differ by float32 rounding, and Adam's normalized update turns that
into parameter differences of a few float32 ulps per step (the same argument as in
test_optim.py). FSDP2 reduce-scatters the gradients (another summation order again) and the
global norm adds the two shards' sums of squares: the same float32 rounding, hence the same
tolerance; norms are compared with rtol=1e-5.
"""

import io
import os
import sys
from datetime import timedelta

import pytest
import torch
import trainutil

import fastlm

WORLD = 2
STEPS = 5
WORKER_TIMEOUT = 120  # generous: the two workers share the CPU cores with each other and more
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
    """torch.optim.AdamW(fused=True) on the whole global batch, clipped by
    torch.nn.utils.clip_grad_norm_ when max_grad_norm is set: (params, {param index: state},
    each step's gradient norm)."""
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, fused=True, **OPT_KW)
    norms = []
    for s in range(STEPS):
        x, y = batch(s)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if max_grad_norm is None:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        opt.step()
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params], norms)


def parse_mode(mode):
    """"ddp" or "fsdp2-BACKEND[-clip]" -> (kind, fastlm backend or None, max_grad_norm)."""
    kind, _, rest = mode.partition("-")
    backend, _, clip = rest.partition("-")
    return kind, backend or None, CLIP if clip == "clip" else None


def _placements(t):
    """A DTensor's placements as (class name, dim) pairs (str() differs between versions)."""
    return tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in t.placements)


def _describe_state(state, dtensor):
    """{key: (type, placements, dtype, shape)} of one param's optimizer state."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dtensor):
            out[k] = ("DTensor", _placements(v), v.dtype, tuple(v.shape))
        else:
            out[k] = (type(v).__name__, None, v.dtype, tuple(v.shape))
    return out


# ---------------------------------------------------------------------------------------------
# Worker (this file run as a script): python test_optim_distributed.py MODE RANK STORE OUT
def _worker(mode, rank, store, out):
    import torch.distributed as dist

    import fastlm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    kind, backend, clip = parse_mode(mode)
    result = {}
    try:
        if kind == "dtensor":
            result = _dtensor_cases(backend)
            raise StopIteration  # done: save the result
        model = make_model()
        if kind == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        params = list(model.parameters())
        opt = fastlm.optim.AdamW(params, max_grad_norm=clip, **OPT_KW)
        norms, torch_norms = [], []
        for s in range(STEPS):
            x, y = batch(s)
            lo, hi = rank * 4, rank * 4 + 4  # this rank's half of the global batch
            opt.zero_grad()
            loss_fn(model, x[lo:hi], y[lo:hi]).backward()
            # torch's own norm of these (sharded) gradients, as clip_grad_norm_ computes it
            n = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch_norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).clone())
            with fastlm.use_backend(backend):
                opt.step()
            if clip is not None:
                norms.append(opt.grad_norm)
        result["grad_norms"] = norms
        result["torch_norms"] = torch_norms

        def full(t):
            return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

        result["params"] = [full(p) for p in params]
        result["state"] = [{k: full(v) for k, v in opt.state[p].items()} for p in params]
        if kind == "fsdp2":
            from torch.distributed.tensor import DTensor

            result["placements"] = [_placements(p) for p in params]
            sd = opt.state_dict()["state"]
            result["state_dict"] = [_describe_state(sd[i], DTensor) for i in range(len(params))]
    except StopIteration:
        pass
    except Exception as e:  # reported to the test, which fails with it
        result["error"] = f"{type(e).__name__}: {e}"
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


DT_SIZES = ((6, 3), (5,), (1,))  # the (1,) tensor leaves rank 1 an empty Shard(0) shard
DT_STEPS = 3


def _dt_data(dtype):
    """Initial params and each step's grads (full tensors, rounded to dtype)."""
    g = torch.Generator().manual_seed(7)
    full = [torch.randn(s, generator=g).to(dtype) for s in DT_SIZES]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in DT_SIZES] for _ in range(DT_STEPS)]
    return full, grads


def _dtensor_cases(backend):
    """Hand-made DTensors on 1-D and 2-D meshes: {case: (full params, grad norms)}, the
    master_weights case's state description and the errors raised for bad placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fastlm

    def run(mesh, placements, grad_placements=None, dtype=torch.float32, master=False):
        full, grads = _dt_data(dtype)
        ps = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in full]
        opt = fastlm.optim.AdamW(ps, max_grad_norm=CLIP, master_weights=master, **OPT_KW)
        norms = []
        for step_grads in grads:
            for p, grad in zip(ps, step_grads):
                if grad_placements is None:
                    p.grad = distribute_tensor(grad, mesh, placements)
                else:  # a local value claimed to have other placements
                    p.grad = DTensor.from_local(grad, mesh, grad_placements, run_check=False)
            with fastlm.use_backend(backend):
                opt.step()
            norms.append(opt.grad_norm.clone())
        return ps, opt, norms

    def full_run(*args, **kw):
        ps, _, norms = run(*args, **kw)
        return [p.full_tensor() for p in ps], norms

    def error(*args):
        try:
            run(*args)
        except RuntimeError as e:
            return str(e)
        return None

    mesh = init_device_mesh("cpu", (WORLD,))
    result = {
        "shard": full_run(mesh, [Shard(0)]),
        "replicate": full_run(mesh, [Replicate()]),  # counted once in the norm
        # HSDP-like 2-D meshes: the sums are reduced over the Shard dimension only
        "hsdp": full_run(init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("r", "s")),
                         [Replicate(), Shard(0)]),
        "hsdp_replicated": full_run(init_device_mesh("cpu", (WORLD, 1),
                                                     mesh_dim_names=("r", "s")),
                                    [Replicate(), Shard(0)]),
        "partial": error(mesh, [Replicate()], [Partial()]),
        "mismatch": error(mesh, [Shard(0)], [Replicate()]),
    }
    # bfloat16 params with float32 masters, which a state_dict round trip keeps float32
    ps, opt, norms = run(mesh, [Shard(0)], dtype=torch.bfloat16, master=True)
    result["master"] = ([p.full_tensor() for p in ps], norms,
                        [opt.state[p]["master_param"].full_tensor() for p in ps])
    opt2 = fastlm.optim.AdamW(ps, master_weights=True, **OPT_KW)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    result["master_reloaded"] = [_describe_state(opt2.state[p], DTensor) for p in ps]
    result["master_reloaded_equal"] = all(
        torch.equal(opt2.state[p][k].full_tensor(), opt.state[p][k].full_tensor())
        for p in ps for k in ("master_param", "exp_avg", "exp_avg_sq"))
    return result


def dtensor_reference(dtype=torch.float32):
    """What _dtensor_cases computes, with torch.optim.AdamW(fused=True) in float32 on plain
    full tensors in one process (from the dtype-rounded data)."""
    full, grads = _dt_data(dtype)
    ps = [torch.nn.Parameter(t.float()) for t in full]
    opt = torch.optim.AdamW(ps, fused=True, **OPT_KW)
    norms = []
    for step_grads in grads:
        for p, grad in zip(ps, step_grads):
            p.grad = grad.float()
        norms.append(torch.nn.utils.clip_grad_norm_(ps, CLIP))
        opt.step()
    return [p.detach() for p in ps], norms


def run_workers(mode, tmp_path):
    return trainutil.run_workers(__file__, [mode], tmp_path, WORLD, WORKER_TIMEOUT, mode)


def check_against_single_process(results, clip):
    """Both ranks: the same full parameters, equal to the single-process torch run, and the
    same optimizer state (moments gathered); with clip, the fused norm equals torch's."""
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
    want, want_state, want_norms = single_process_run(clip)
    for r, res in enumerate(results):
        assert len(res["params"]) == len(want)
        for i, (p0, p1) in enumerate(zip(results[0]["params"], res["params"])):
            assert torch.equal(p0, p1), f"param {i} differs between ranks 0 and {r}"
        for i, (got, ref) in enumerate(zip(res["params"], want)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, i=i: f"rank {r} param {i}: {m}")
        for i, (got, ref) in enumerate(zip(res["state"], want_state)):
            assert set(got) == set(ref), f"param {i}: state keys {sorted(got)} != {sorted(ref)}"
            assert float(got["step"]) == float(ref["step"]) == STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, i=i, k=key: f"param {i} {k}: {m}")
        # torch's norm of the distributed gradients is the single-process one
        for norm, want_norm in zip(res["torch_norms"], want_norms):
            torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
        if clip is not None:  # the fused norm is the global one, on every rank
            assert len(res["grad_norms"]) == STEPS
            for norm, torch_norm, want_norm in zip(res["grad_norms"], res["torch_norms"],
                                                   want_norms):
                assert type(norm) is torch.Tensor and norm.shape == torch.Size([])
                assert want_norm > clip  # every step clips
                torch.testing.assert_close(norm, torch_norm, rtol=1e-5, atol=0)
                torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
    moved = any(not torch.equal(got, init.detach())
                for got, init in zip(results[0]["params"], make_model().parameters()))
    assert moved, "training did not change the parameters"


def test_ddp_matches_single_process(tmp_path):
    check_against_single_process(run_workers("ddp", tmp_path), None)


def _need_fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_fsdp2_matches_single_process(tmp_path, backend, clip):
    """FSDP2 shards every parameter into DTensors (Shard(0)): the fused step runs on the local
    shards (the C++ kernel on `cpu`, plain torch ops on `torch`), the state is DTensors as
    torch.optim makes them, and the clipping norm is all-reduced over the shards."""
    _need_fsdp2()
    ok, why = fastlm.backends.available()[backend]["cpu"]
    if not ok:
        pytest.skip(f"fastlm backend {backend!r} on CPU: {why}")
    mode = f"fsdp2-{backend}" + ("-clip" if clip else "")
    results = run_workers(mode, tmp_path)
    check_against_single_process(results, CLIP if clip else None)
    # state_dict in torch's FSDP2 format: moments are DTensors placed like their params,
    # step a plain float32 scalar tensor
    for res in results:
        for placements, desc in zip(res["placements"], res["state_dict"]):
            assert placements == (("Shard", 0),)
            assert set(desc) == {"step", "exp_avg", "exp_avg_sq"}
            assert desc["step"][:2] == ("Tensor", None)
            assert desc["step"][2:] == (torch.float32, ())
            for key in ("exp_avg", "exp_avg_sq"):
                assert desc[key][:3] == ("DTensor", placements, torch.float32), key


def _assert_run(params, norms, want, want_norms, what):
    for i, (got, ref) in enumerate(zip(params, want)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, i=i: f"{what} param {i}: {m}")
    assert len(norms) == len(want_norms) == DT_STEPS
    for norm, want_norm in zip(norms, want_norms):
        assert type(norm) is torch.Tensor and norm.shape == torch.Size([])
        assert want_norm > CLIP  # every step clips
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0,
                                   msg=lambda m: f"{what} grad_norm: {m}")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dtensor_placements(tmp_path, backend):
    """Shard(0) (with an empty shard), Replicate (not counted twice in the norm) and 2-D
    (Replicate, Shard(0)) meshes step like torch on the full tensors, with the global norm;
    bfloat16 params keep float32 DTensor masters, also through a state_dict round trip; a
    Partial gradient and a grad placed unlike its param raise."""
    _need_fsdp2()
    ok, why = fastlm.backends.available()[backend]["cpu"]
    if not ok:
        pytest.skip(f"fastlm backend {backend!r} on CPU: {why}")
    results = run_workers(f"dtensor-{backend}", tmp_path)
    want, want_norms = dtensor_reference()
    want_lowp, want_lowp_norms = dtensor_reference(torch.bfloat16)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
        for case in ("shard", "replicate", "hsdp", "hsdp_replicated"):
            _assert_run(*res[case], want, want_norms, f"rank {r} {case}")
        params, norms, masters = res["master"]
        _assert_run(masters, norms, want_lowp, want_lowp_norms, f"rank {r} master_param")
        for p, m in zip(params, masters):
            assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
            assert torch.equal(p, m.to(torch.bfloat16)), "param != master_param rounded"
        for desc in res["master_reloaded"]:
            for key in ("master_param", "exp_avg", "exp_avg_sq"):
                assert desc[key][:3] == ("DTensor", (("Shard", 0),), torch.float32), key
        assert res["master_reloaded_equal"], "load_state_dict changed the DTensor state"
        assert res["partial"] is not None and "Partial" in res["partial"], res["partial"]
        assert "is not supported (only Shard and Replicate)" in res["partial"]
        assert res["mismatch"] is not None, "a grad placed unlike its param was accepted"
        assert "must have its param's mesh and placements" in res["mismatch"]


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
