"""fastlm.optim.Adam/AdamW and fastlm.ops.adam against torch.optim on every backend.

The reference is torch.optim.Adam/AdamW(fused=True): fastlm's step follows its formula in
float32, so trajectories agree to float32 rounding.

Tolerances (float32): rtol=1e-5, atol=1e-6 on params and moments after up to 30 steps. Both
sides evaluate the same float32 formula; they may differ only in evaluation order and FMA
contraction, a few float32 ulps (2^-24 relative) of each step's result. Over 30 steps that is at
most 30 x 4 x 6e-8 = 7e-6 relative; atol=1e-6 covers elements that pass near zero (an update of
size lr = 1e-3 rounded at 1e-3 magnitude carries 1e-10 of error, far below). A wrong bias
correction, beta, eps or decay term moves values by 1e-4 relative or more after one step.

Low precision (float16/bfloat16, moments in the param dtype): both sides compute in float32 and
round every stored value once, so one step from identical states differs by at most one ulp of
the stored dtype (a float32 difference of a few ulps can flip the final rounding by one ulp; the
Triton interpreter converts float32 to bfloat16 by truncation, which is also at most one ulp
from round-to-nearest). Over k steps a difference grows by at most one ulp per step (AdamW's
update does not depend on the param except through the decay factor, which shrinks
differences), hence the trajectory bound k ulps.
"""

import inspect
import io

import pytest
import torch

import fastlm
from conftest import GPU, PAIRS, interpreted
from fastlm.ops.adam import adam_step_, reference_adam_step_, sum_of_squares

RTOL, ATOL = 1e-5, 1e-6
STEPS = 30
SIZES = (1, 7, 129)  # small: the Triton interpreter runs one launch per tensor
CLASSES = {"Adam": (fastlm.optim.Adam, torch.optim.Adam),
           "AdamW": (fastlm.optim.AdamW, torch.optim.AdamW)}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# Helpers.
def tensors(sizes, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=g)).to(device=device, dtype=dtype) for s in sizes]


def leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().clone().to(p.dtype)


def step(opt, backend, closure=None):
    with fastlm.use_backend(backend):
        return opt.step(closure)


def assert_states_match(fl, ref, ps_fl, ps_ref, rtol=RTOL, atol=ATOL, keys=None):
    """Params and every per-param state tensor of fastlm's optimizer equal torch's."""
    for i, (a, b) in enumerate(zip(ps_fl, ps_ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"param {i}: {m}")
        sa, sb = fl.state[a], ref.state[b]
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != torch's {sorted(sb)}"
        for key in sb:
            if keys is not None and key not in keys and key != "step":
                continue
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"param {i}: step {sa[key]} != {sb[key]}"
                continue
            torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, key=key: f"param {i} {key}: {m}")


def train_twins(make_fl, make_ref, backend, device, sizes=SIZES, steps=STEPS, dtype=torch.float32,
                ref_backend=None):
    """Runs fastlm's optimizer (on `backend`) and torch's on twin params fed identical grads;
    `ref_backend` is the backend of a fastlm reference optimizer."""
    base = tensors(sizes, dtype, device)
    a, b = leaves(base), leaves(base)
    fl, ref = make_fl(a), make_ref(b)
    for s in range(steps):
        grads = tensors(sizes, dtype, device, seed=1000 + s)
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        step(ref, ref_backend)
    return a, b, fl, ref


def ulp(mag, dtype):
    """Spacing of `dtype` at each magnitude in `mag` (the normal spacing below tiny)."""
    info = torch.finfo(dtype)
    mag = mag.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_within_ulps(a, b, k, what, scale=None):
    """|a - b| <= k ulps of the dtype at max(|a|, |b|, scale), elementwise (`scale`: the
    largest magnitude the value had along a trajectory, whose rounding errors persist)."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    big = torch.maximum(a.detach().double().abs(), b.detach().double().abs())
    if scale is not None:
        big = torch.maximum(big, scale.double())
    ulps = (a.detach().double() - b.detach().double()).abs() / ulp(big, a.dtype)
    assert not (ulps > k).any(), (f"{what}: {int((ulps > k).sum())} elements beyond {k} ulp(s), "
                                  f"worst {ulps.max().item():.2f} ulps at index "
                                  f"{int(ulps.argmax())}")


def bf16_truncate(x):
    """float32 -> bfloat16 by truncation (what Triton's CPU interpreter does)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def lr_tensor(value, device):
    return torch.tensor(value, dtype=torch.float32, device=device)


# Options: name -> function(device) -> kwargs (a fresh lr tensor per optimizer).
OPTIONS = {
    "defaults": lambda d: {},
    "lr": lambda d: {"lr": 1e-2},
    "lr_tensor": lambda d: {"lr": lr_tensor(1e-2, d)},
    "betas": lambda d: {"betas": (0.8, 0.95)},
    "eps": lambda d: {"eps": 1e-3},
    "wd0": lambda d: {"weight_decay": 0.0},
    "wd": lambda d: {"weight_decay": 0.1, "lr": 1e-2},
    "amsgrad": lambda d: {"amsgrad": True},
    "maximize": lambda d: {"maximize": True},
    "all": lambda d: {"lr": lr_tensor(5e-3, d), "betas": (0.85, 0.99), "eps": 1e-6,
                      "weight_decay": 0.05, "amsgrad": True, "maximize": True},
}


# ---------------------------------------------------------------------------------------------
# 1. Trajectories against torch.optim.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch_fused(backend, device, cls, option):
    fl_cls, ref_cls = CLASSES[cls]
    a, b, fl, ref = train_twins(lambda ps: fl_cls(ps, **OPTIONS[option](device)),
                                lambda ps: ref_cls(ps, fused=True, **OPTIONS[option](device)),
                                backend, device)
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
def test_close_to_torch_foreach_and_default(backend, device, cls, impl):
    # torch's other implementations compute the same math with a different operation order
    # (denominator and step size formed separately): the same float32-rounding argument and
    # tolerance apply.
    fl_cls, ref_cls = CLASSES[cls]
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    a, b, fl, ref = train_twins(lambda ps: fl_cls(ps, **kw),
                                lambda ps: ref_cls(ps, foreach=impl == "foreach", **kw),
                                backend, device)
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_adam_decoupled_equals_adamw(backend, device):
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    a, b, fl, ref = train_twins(
        lambda ps: fastlm.optim.Adam(ps, decoupled_weight_decay=True, **kw),
        lambda ps: fastlm.optim.AdamW(ps, **kw), backend, device, ref_backend=backend)
    assert_states_match(fl, ref, a, b, rtol=0, atol=0)
    a2, b2, fl2, ref2 = train_twins(
        lambda ps: fastlm.optim.Adam(ps, decoupled_weight_decay=True, **kw),
        lambda ps: torch.optim.Adam(ps, decoupled_weight_decay=True, fused=True, **kw),
        backend, device)
    assert_states_match(fl2, ref2, a2, b2)


def _groups(ps, device):
    return [{"params": ps[:1], "lr": 1e-2, "betas": (0.8, 0.9)},
            {"params": ps[1:2], "weight_decay": 0.3, "amsgrad": True},
            {"params": ps[2:], "lr": lr_tensor(3e-3, device), "eps": 1e-4, "maximize": True}]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_param_groups(backend, device, cls):
    fl_cls, ref_cls = CLASSES[cls]
    a, b, fl, ref = train_twins(lambda ps: fl_cls(_groups(ps, device), weight_decay=0.01),
                                lambda ps: ref_cls(_groups(ps, device), weight_decay=0.01,
                                                   fused=True),
                                backend, device, sizes=(5, 9, 17, 3))
    assert_states_match(fl, ref, a, b)
    assert [g["lr"] for g in fl.param_groups] == [g["lr"] for g in ref.param_groups]


@pytest.mark.parametrize("backend,device", PAIRS)
def test_add_param_group_mid_training(backend, device):
    base = tensors((6, 11), device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a[:1], lr=1e-2)
    ref = torch.optim.AdamW(b[:1], lr=1e-2, fused=True)
    for s in range(12):
        if s == 5:
            fl.add_param_group({"params": a[1:], "lr": 3e-2, "amsgrad": True})
            ref.add_param_group({"params": b[1:], "lr": 3e-2, "amsgrad": True})
        grads = tensors((6, 11), device=device, seed=50 + s)
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        ref.step()
    assert_states_match(fl, ref, a, b)
    assert float(fl.state[a[1]]["step"]) == 7.0


@pytest.mark.parametrize("backend,device", PAIRS)
def test_grad_none_is_skipped(backend, device):
    base = tensors((4, 5, 6), device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2)
    ref = torch.optim.AdamW(b, lr=1e-2, fused=True)
    for s in range(6):
        grads = tensors((4, 5, 6), device=device, seed=70 + s)
        grads[1] = None  # never has a grad
        if s % 2:
            grads[2] = None  # has a grad every other step
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        ref.step()
    assert a[1] not in fl.state or len(fl.state[a[1]]) == 0
    assert torch.equal(a[1].detach(), base[1])
    assert float(fl.state[a[2]]["step"]) == 3.0
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_step_closure_returns_loss(backend, device):
    base = tensors((8,), device=device)
    x = tensors((8,), device=device, seed=5)[0]
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2)
    ref = torch.optim.AdamW(b, lr=1e-2, fused=True)

    def closure_for(opt, ps):
        def closure():
            opt.zero_grad()
            loss = ((ps[0] - x) ** 2).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(5):
        loss_fl = step(fl, backend, closure_for(fl, a))
        loss_ref = ref.step(closure_for(ref, b))
        assert isinstance(loss_fl, torch.Tensor)
        torch.testing.assert_close(loss_fl, loss_ref, rtol=RTOL, atol=ATOL)
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    a, b = leaves(tensors((3, 4))), leaves(tensors((3, 4)))
    fl, ref = fastlm.optim.AdamW(a), torch.optim.AdamW(b, fused=True)
    grads = tensors((3, 4), seed=9)
    set_grads(a, grads)
    set_grads(b, grads)
    fl.zero_grad(set_to_none=set_to_none)
    ref.zero_grad(set_to_none=set_to_none)
    for p, q in zip(a, b):
        if set_to_none:
            assert p.grad is None and q.grad is None
        else:
            assert torch.equal(p.grad, q.grad) and not p.grad.any()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_step_hooks(backend, device):
    def run(make, ps, do_step):
        seen = []
        opt = make(ps)
        opt.register_step_pre_hook(
            lambda o, args, kwargs: seen.append(("pre", ps[0].detach().clone())))
        opt.register_step_post_hook(
            lambda o, args, kwargs: seen.append(("post", ps[0].detach().clone())))
        for s in range(3):
            set_grads(ps, tensors((5,), device=device, seed=s))
            do_step(opt)
        return seen

    base = tensors((5,), device=device)
    seen_fl = run(lambda ps: fastlm.optim.AdamW(ps, lr=1e-2), leaves(base),
                  lambda o: step(o, backend))
    seen_ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), leaves(base),
                   lambda o: o.step())
    assert [k for k, _ in seen_fl] == [k for k, _ in seen_ref] == ["pre", "post"] * 3
    assert torch.equal(seen_fl[0][1], base[0])  # the pre hook runs before the update
    for (_, x), (_, y) in zip(seen_fl, seen_ref):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=13),
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr_float", "lr_tensor"])
def test_lr_scheduler(backend, device, sched, tensor_lr):
    base = tensors((5, 13), device=device)
    a, b = leaves(base), leaves(base)
    lr = lr_tensor(1e-2, device) if tensor_lr else 1e-2
    lr2 = lr_tensor(1e-2, device) if tensor_lr else 1e-2
    fl = fastlm.optim.AdamW(a, lr=lr, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=lr2, weight_decay=0.1, fused=True)
    s_fl, s_ref = SCHEDULERS[sched](fl), SCHEDULERS[sched](ref)
    for s in range(12):
        grads = tensors((5, 13), device=device, seed=300 + s)
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        ref.step()
        s_fl.step()
        s_ref.step()
        assert float(fl.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
    assert_states_match(fl, ref, a, b)


# ---------------------------------------------------------------------------------------------
# 2. Constructor, defaults and argument checks.
@pytest.mark.parametrize("cls", list(CLASSES))
def test_signature_has_torchs_parameters(cls):
    fl_cls, ref_cls = CLASSES[cls]
    ours = inspect.signature(fl_cls.__init__).parameters
    theirs = inspect.signature(ref_cls.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, f"{cls}: missing torch parameter {name!r}"
        assert ours[name].default == p.default, (
            f"{cls}.{name}: default {ours[name].default!r} != torch's {p.default!r}")
        assert ours[name].kind == p.kind, f"{cls}.{name}: kind {ours[name].kind} != {p.kind}"
    assert ours["master_weights"].default is False
    assert ours["max_grad_norm"].default is None
    fl = fl_cls([torch.zeros(2, requires_grad=True)])
    ref = ref_cls([torch.zeros(2, requires_grad=True)])
    for key, value in ref.defaults.items():
        assert fl.defaults[key] == value, f"{cls}.defaults[{key!r}]"


BAD_ARGS = {
    "lr": {"lr": -1e-3},
    "beta1": {"betas": (1.0, 0.999)},
    "beta2": {"betas": (0.9, -0.1)},
    "eps": {"eps": -1e-8},
    "weight_decay": {"weight_decay": -0.1},
}


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("bad", list(BAD_ARGS))
def test_invalid_arguments_as_torch(cls, bad):
    fl_cls, ref_cls = CLASSES[cls]
    with pytest.raises(ValueError) as theirs:
        ref_cls([torch.zeros(2, requires_grad=True)], **BAD_ARGS[bad])
    with pytest.raises(ValueError) as ours:
        fl_cls([torch.zeros(2, requires_grad=True)], **BAD_ARGS[bad])
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith(("Invalid learning rate", "Invalid beta parameter",
                                       "Invalid epsilon value", "Invalid weight_decay value"))


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_invalid_max_grad_norm(cls, value):
    with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
        CLASSES[cls][0]([torch.zeros(2, requires_grad=True)], max_grad_norm=value)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_sparse_gradient_rejected(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = CLASSES[cls][0](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_non_contiguous_grad(backend, device):
    # A grad with other strides than its param (a transposed view) is used by value. The
    # reference is torch's single-tensor AdamW: torch's fused CPU AdamW reads such a grad in
    # memory order, ignoring its strides (a torch 2.14 bug: 0.05 off after 3 steps here).
    base = tensors(((4, 6),), device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2)
    ref = torch.optim.AdamW(b, lr=1e-2, foreach=False)
    for s in range(3):
        g = tensors(((6, 4),), device=device, seed=s)[0].t()
        a[0].grad, b[0].grad = g, g.clone()
        assert not a[0].grad.is_contiguous()
        step(fl, backend)
        ref.step()
    assert_states_match(fl, ref, a, b)


# ---------------------------------------------------------------------------------------------
# 3. state_dict in torch's format, in both directions.
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_format(amsgrad):
    base = tensors((3, 4))
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, amsgrad=amsgrad)
    ref = torch.optim.AdamW(b, amsgrad=amsgrad, fused=True)
    for s in range(2):
        grads = tensors((3, 4), seed=s)
        set_grads(a, grads)
        set_grads(b, grads)
        fl.step()
        ref.step()
    sd, sd_ref = fl.state_dict(), ref.state_dict()
    assert sorted(sd["state"]) == sorted(sd_ref["state"]) == [0, 1]
    want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for i in (0, 1):
        assert set(sd["state"][i]) == set(sd_ref["state"][i]) == want
        assert sd["state"][i]["step"].dtype == sd_ref["state"][i]["step"].dtype
        assert sd["state"][i]["step"].shape == torch.Size([])
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in
                                                         sd_ref["param_groups"]]
    for key, value in sd_ref["param_groups"][0].items():
        if key not in ("fused",):
            assert sd["param_groups"][0][key] == value, key


def _saved(sd):
    """A state_dict written to and read back from a file, as a real checkpoint (load_state_dict
    keeps the saved tensors when dtype and device already match: without the round trip both
    optimizers would share their state tensors)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def _continue(opt, ps, backend, steps, device, seed):
    for s in range(steps):
        set_grads(ps, tensors((5, 9), device=device, seed=seed + s))
        step(opt, backend)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_checkpoint_from_torch(backend, device, amsgrad):
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad}
    src = leaves(tensors((5, 9), device=device))
    torch_opt = torch.optim.AdamW(src, fused=True, **kw)
    _continue(torch_opt, src, "torch", 4, device, 0)
    sd = _saved(torch_opt.state_dict())
    a = leaves([p.detach() for p in src])
    fl = fastlm.optim.AdamW(a, **kw)
    fl.load_state_dict(sd)
    _continue(fl, a, backend, 6, device, 100)
    _continue(torch_opt, src, "torch", 6, device, 100)
    assert_states_match(fl, torch_opt, a, src)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_checkpoint_to_torch(backend, device, amsgrad):
    # fused=True is accepted by fastlm and saved in the param groups, so the torch optimizer
    # that loads the checkpoint keeps running its fused implementation.
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad, "fused": True}
    src = leaves(tensors((5, 9), device=device))
    fl = fastlm.optim.AdamW(src, **kw)
    _continue(fl, src, backend, 4, device, 0)
    b = leaves([p.detach() for p in src])
    torch_opt = torch.optim.AdamW(b, **kw)
    torch_opt.load_state_dict(_saved(fl.state_dict()))
    _continue(fl, src, backend, 6, device, 100)
    _continue(torch_opt, b, "torch", 6, device, 100)
    assert_states_match(fl, torch_opt, src, b)


# ---------------------------------------------------------------------------------------------
# 4. Low precision and master weights.
LOWP = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_low_precision_one_step_within_one_ulp(backend, device, dtype, cls):
    """From identical states, each step's params and moments are within one ulp of torch's."""
    fl_cls, ref_cls = CLASSES[cls]
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    base = tensors(SIZES, dtype, device)
    a, b = leaves(base), leaves(base)
    fl, ref = fl_cls(a, **kw), ref_cls(b, fused=True, **kw)
    for s in range(8):
        grads = tensors(SIZES, dtype, device, seed=500 + s)
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        ref.step()
        for i, (p, q) in enumerate(zip(a, b)):
            assert fl.state[p]["exp_avg"].dtype == dtype
            assert_within_ulps(p, q, 1, f"step {s} param {i}")
            for key in MOMENTS:
                assert_within_ulps(fl.state[p][key], ref.state[q][key], 1,
                                   f"step {s} param {i} {key}")
            with torch.no_grad():  # resynchronize on torch's state
                p.copy_(q)
                for key in MOMENTS:
                    fl.state[p][key].copy_(ref.state[q][key])


def lowp_trajectory(backend, device, base, steps, seed):
    """fastlm vs torch fused AdamW on `base` params (mixed dtypes allowed); returns params,
    optimizers and the running max magnitude of torch's params and moments."""
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    peak = {}
    for s in range(steps):
        grads = [tensors((p.shape,), p.dtype, device, seed=seed + 31 * s + i)[0]
                 for i, p in enumerate(base)]
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        ref.step()
        for i, q in enumerate(b):
            for key, t in [("param", q.detach())] + [(k, ref.state[q][k]) for k in MOMENTS[:2]]:
                old = peak.get((i, key), torch.zeros_like(t))
                peak[(i, key)] = torch.maximum(old, t.abs())
    return a, b, fl, ref, peak


def assert_lowp_trajectory(a, b, fl, ref, peak, steps):
    for i, (p, q) in enumerate(zip(a, b)):
        if p.dtype == torch.float32:
            continue
        assert fl.state[p]["exp_avg"].dtype == p.dtype
        assert_within_ulps(p, q, steps, f"param {i}", peak[(i, "param")])
        for key in MOMENTS[:2]:
            assert_within_ulps(fl.state[p][key], ref.state[q][key], steps, f"param {i} {key}",
                               peak[(i, key)])


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_low_precision_trajectory(backend, device, dtype):
    steps = 10
    base = tensors(SIZES, dtype, device)
    a, b, fl, ref, peak = lowp_trajectory(backend, device, base, steps, seed=600)
    assert all(p.dtype == dtype for p in a)
    assert_lowp_trajectory(a, b, fl, ref, peak, steps)


def _assert_param_is_rounded_master(p, master, backend):
    want = master.to(p.dtype)
    if interpreted(backend, p.device.type) and p.dtype == torch.bfloat16:
        ok = (p == want) | (p == bf16_truncate(master))  # the interpreter truncates
        assert ok.all(), "param is neither the rounding nor the truncation of master_param"
    else:
        assert torch.equal(p.detach(), want), "param != master_param rounded to its dtype"


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_master_weights(backend, device, dtype, amsgrad):
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad}
    base = tensors(SIZES, dtype, device)
    a = leaves(base)
    b = leaves([t.float() for t in base])
    fl = fastlm.optim.AdamW(a, master_weights=True, **kw)
    ref = torch.optim.AdamW(b, fused=True, **kw)
    for s in range(STEPS):
        grads = tensors(SIZES, dtype, device, seed=700 + s)
        set_grads(a, grads)
        set_grads(b, [g.float() for g in grads])
        step(fl, backend)
        ref.step()
    for i, (p, q) in enumerate(zip(a, b)):
        st = fl.state[p]
        assert set(st) == set(ref.state[q]) | {"master_param"}
        assert st["master_param"].dtype == torch.float32
        for key in MOMENTS[:2 + amsgrad]:
            assert st[key].dtype == torch.float32
            torch.testing.assert_close(st[key], ref.state[q][key], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(st["master_param"], q.detach(), rtol=RTOL, atol=ATOL)
        assert p.dtype == dtype
        _assert_param_is_rounded_master(p, st["master_param"], backend)


def _master_run(device):
    a = leaves(tensors(SIZES, torch.bfloat16, device))
    fl = fastlm.optim.AdamW(a, lr=1e-2, master_weights=True)
    for s in range(3):
        set_grads(a, tensors(SIZES, torch.bfloat16, device, seed=s))
        fl.step()
    return a, fl


def test_master_weights_saved_in_state_dict():
    a, fl = _master_run("cpu")
    sd = fl.state_dict()
    for i, p in enumerate(a):
        assert sd["state"][i]["master_param"].dtype == torch.float32
        assert torch.equal(sd["state"][i]["master_param"], fl.state[p]["master_param"])
        assert sd["state"][i]["exp_avg"].dtype == torch.float32
    assert all(g["master_weights"] for g in sd["param_groups"])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_master_weights_restored_by_load_state_dict(amsgrad):
    """master_param and the float32 moments come back float32 and bit-identical (torch's
    load_state_dict would cast them to bfloat16), and training continues identically."""
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad, "master_weights": True}
    a = leaves(tensors(SIZES, torch.bfloat16))
    fl = fastlm.optim.AdamW(a, **kw)
    _continue_sizes(fl, a, None, 3, 0)
    b = leaves([p.detach() for p in a])
    fl2 = fastlm.optim.AdamW(b, **kw)
    fl2.load_state_dict(_saved(fl.state_dict()))
    keys = ("master_param",) + MOMENTS[:2 + amsgrad]
    for p, q in zip(a, b):
        assert set(fl2.state[q]) == set(fl.state[p])
        for key in keys:
            assert fl2.state[q][key].dtype == torch.float32, key
            assert torch.equal(fl2.state[q][key], fl.state[p][key]), key
    _continue_sizes(fl, a, None, 4, 99)
    _continue_sizes(fl2, b, None, 4, 99)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in keys + ("step",):
            assert torch.equal(fl2.state[q][key], fl.state[p][key]), key


def _continue_sizes(opt, ps, backend, steps, seed):
    for s in range(steps):
        set_grads(ps, tensors(SIZES, ps[0].dtype, ps[0].device, seed=seed + s))
        step(opt, backend)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_master_weights_checkpoint_from_torch(backend, device):
    """A torch.optim checkpoint of bfloat16 params (bfloat16 moments, no master) loads into
    master_weights=True: the moments are widened to float32, the master is the param, and the
    run continues as torch's float32 AdamW from the same (widened) state."""
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    src = leaves(tensors(SIZES, torch.bfloat16, device))
    torch_opt = torch.optim.AdamW(src, fused=True, **kw)
    _continue_sizes(torch_opt, src, None, 3, 0)
    sd = torch_opt.state_dict()
    a = leaves([p.detach() for p in src])
    fl = fastlm.optim.AdamW(a, master_weights=True, **kw)
    fl.load_state_dict(_saved(sd))
    ref_ps = leaves([p.detach().float() for p in src])
    ref = torch.optim.AdamW(ref_ps, fused=True, **kw)
    ref.load_state_dict(_saved(sd))  # casts the moments to float32, exactly
    for s in range(5):
        grads = tensors(SIZES, torch.bfloat16, device, seed=300 + s)
        set_grads(a, grads)
        set_grads(ref_ps, [g.float() for g in grads])
        step(fl, backend)
        ref.step()
    for p, q in zip(a, ref_ps):
        st = fl.state[p]
        assert set(st) == set(ref.state[q]) | {"master_param"}
        assert float(st["step"]) == float(ref.state[q]["step"]) == 8
        for key in MOMENTS:
            assert st[key].dtype == torch.float32, key
            torch.testing.assert_close(st[key], ref.state[q][key], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(st["master_param"], q.detach(), rtol=RTOL, atol=ATOL)
        _assert_param_is_rounded_master(p, st["master_param"], backend)


# ---------------------------------------------------------------------------------------------
# 5. Fused gradient clipping and sum_of_squares.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "no_clip"])
def test_max_grad_norm_equals_clip_grad_norm(backend, device, max_norm):
    sizes = (3, 50, 1, 17)
    base = tensors(sizes, device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for s in range(8):
        grads = tensors(sizes, device=device, seed=800 + s)
        set_grads(a, grads)
        set_grads(b, grads)
        step(fl, backend)
        norm = torch.nn.utils.clip_grad_norm_(b, max_norm)
        ref.step()
        assert isinstance(fl.grad_norm, torch.Tensor) and fl.grad_norm.device.type == device
        torch.testing.assert_close(fl.grad_norm, norm, rtol=RTOL, atol=0)
        assert (norm > max_norm) == (max_norm == 0.5)
        # the fused clip does not modify the grads (clip_grad_norm_ does)
        assert torch.equal(a[0].grad, grads[0])
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_max_grad_norm_mixed_dtypes_and_groups(backend, device):
    # The norm is global: over every group and dtype.
    f32 = leaves(tensors((5, 8), device=device))
    bf = leaves(tensors((6,), torch.bfloat16, device))
    fl = fastlm.optim.AdamW([{"params": f32}, {"params": bf, "lr": 1e-2}], max_grad_norm=0.3)
    grads = tensors((5, 8), device=device, seed=3) + tensors((6,), torch.bfloat16, device, seed=4)
    set_grads(f32 + bf, grads)
    step(fl, backend)
    want = torch.nn.utils.get_total_norm([g.float() for g in grads])
    torch.testing.assert_close(fl.grad_norm, want, rtol=RTOL, atol=0)


def _exact_tensors(device):
    """Integer-valued tensors: every square and partial sum is exact in float32 (the total is
    below 2^24), so any summation order gives the float64 result exactly."""
    g = torch.Generator().manual_seed(0)
    spec = [(0, torch.float32), (3, torch.bfloat16), (4097, torch.float32), (0, torch.float16),
            (1, torch.float16), (65537 + 5, torch.bfloat16), (33000, torch.float32)]
    return [torch.randint(-4, 5, (n,), generator=g).to(device=device, dtype=dt) for n, dt in spec]


def _f64_sum(ts):
    return sum(t.double().square().sum().item() for t in ts)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sum_of_squares_exact(backend, device):
    ts = _exact_tensors(device)
    with fastlm.use_backend(backend):
        out = sum_of_squares(ts)
    assert out.dtype == torch.float32 and out.shape == torch.Size([])
    assert out.device.type == device
    assert out.item() == _f64_sum(ts)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sum_of_squares_random(backend, device):
    # Random float data: float32 accumulation in blocks of at most 32768 elements (4096 on
    # Triton), partial sums added in order; all terms are positive, so the relative error is
    # about sqrt(block) x 2^-24 (random rounding) < 1e-5.
    sizes = (5, 4097, 0, 70001) if not interpreted(backend, device) else (5, 4097, 0, 9000)
    ts = tensors(sizes, device=device) + tensors((129, 0, 7), torch.bfloat16, device, seed=2)
    with fastlm.use_backend(backend):
        out = sum_of_squares(ts)
    want = torch.tensor(_f64_sum(ts), dtype=torch.float64)
    torch.testing.assert_close(out.double().cpu(), want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sum_of_squares_many_tensors(backend, device):
    n = 200 if not interpreted(backend, device) else 40
    g = torch.Generator().manual_seed(1)
    ts = [torch.randint(-3, 4, (int(k),), generator=g).float().to(device)
          for k in torch.randint(0, 40, (n,), generator=g)]
    with fastlm.use_backend(backend):
        assert sum_of_squares(ts).item() == _f64_sum(ts)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sum_of_squares_bit_reproducible(backend, device):
    ts = tensors((70001, 3, 4097) if not interpreted(backend, device) else (9000, 3),
                 device=device, seed=4)
    with fastlm.use_backend(backend):
        first = sum_of_squares(ts)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = sum_of_squares(ts)
        finally:
            torch.set_num_threads(threads)
        again = sum_of_squares(ts)
    assert torch.equal(first, again) and torch.equal(first, single)


def test_sum_of_squares_empty_list():
    with pytest.raises(ValueError, match="must not be empty"):
        sum_of_squares([])


# ---------------------------------------------------------------------------------------------
# 6. GradScaler and the grad_scale / found_inf protocol.
def _cpu_scaler():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') cannot be constructed here: {e!r}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("torch.amp.GradScaler('cpu') is disabled in this torch build")
    return scaler


def _scaler_for(device):
    return _cpu_scaler() if device == "cpu" else torch.amp.GradScaler("cuda",
                                                                      init_scale=2.0 ** 10)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no_clip", "clip"])
def test_grad_scaler(backend, device, max_norm):
    sizes = (4, 9)
    base = tensors(sizes, device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    assert fl._step_supports_amp_scaling
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    scaler = _scaler_for(device)
    bad_step = 3
    for s in range(7):
        w = tensors(sizes, device=device, seed=900 + s)
        if s == bad_step:
            w[1][2] = float("inf") if s % 2 else float("nan")
        fl.zero_grad()
        loss = sum((p * x).sum() for p, x in zip(a, w))
        scaler.scale(loss).backward()
        assert torch.equal(a[0].grad, w[0] * scaler.get_scale())
        snapshot = [p.detach().clone() for p in a]
        states = [{k: v.clone() for k, v in fl.state[p].items()} for p in a] if s else None
        scale = scaler.get_scale()
        with fastlm.use_backend(backend):
            scaler.step(fl)
        scaler.update()
        assert not hasattr(fl, "grad_scale") and not hasattr(fl, "found_inf")
        if s == bad_step:  # skipped entirely; the scale backs off
            assert scaler.get_scale() == scale * 0.5
            for p, before, st in zip(a, snapshot, states):
                assert torch.equal(p.detach(), before)
                for k, v in st.items():
                    assert torch.equal(fl.state[p][k], v), k
            continue
        assert scaler.get_scale() == scale
        set_grads(b, w)  # the unscaled step of torch
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(b, max_norm)
            torch.testing.assert_close(fl.grad_norm, norm, rtol=RTOL, atol=0)
        ref.step()
        assert_states_match(fl, ref, a, b)
    assert float(fl.state[a[0]]["step"]) == 6.0


@pytest.mark.parametrize("backend,device", PAIRS)
def test_grad_scaler_after_unscale(backend, device):
    # The usual clipping recipe: scaler.unscale_(opt) first, then scaler.step(opt).
    base = tensors((6,), device=device)
    a, b = leaves(base), leaves(base)
    fl = fastlm.optim.AdamW(a, lr=1e-2)
    ref = torch.optim.AdamW(b, lr=1e-2, fused=True)
    scaler = _scaler_for(device)
    for s in range(4):
        w = tensors((6,), device=device, seed=40 + s)
        fl.zero_grad()
        scaler.scale((a[0] * w[0]).sum()).backward()
        scaler.unscale_(fl)
        assert torch.equal(a[0].grad, w[0])
        with fastlm.use_backend(backend):
            scaler.step(fl)
        scaler.update()
        set_grads(b, w)
        ref.step()
    assert_states_match(fl, ref, a, b)


def _op_lists(dtype, device, amsgrad, seed=0, master=False, sizes=(1, 3, 0, 37)):
    ps = tensors(sizes, dtype, device, seed=seed)
    gs = tensors(sizes, dtype, device, seed=seed + 1)
    mdt = torch.float32 if master else dtype
    ms = [t.abs().to(mdt) * 0.1 for t in tensors(sizes, dtype, device, seed=seed + 2)]
    vs = [t.square().to(mdt) * 0.01 for t in tensors(sizes, dtype, device, seed=seed + 3)]
    vmax = [v * 1.5 for v in vs] if amsgrad else []
    masters = [p.float() for p in ps] if master else []
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    return [ps, gs, ms, vs, vmax, masters, steps]


def _clone_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


OP_KW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
         "decoupled": True, "maximize": False}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_step_op_found_inf_skips(backend, device, amsgrad):
    lists = _op_lists(torch.float32, device, amsgrad)
    before = _clone_lists(lists)
    with fastlm.use_backend(backend):
        adam_step_(*lists, amsgrad=amsgrad, grad_scale=torch.tensor(4.0, device=device),
                   found_inf=torch.tensor(1.0, device=device), **OP_KW)
    for lst, old in zip(lists, before):
        for t, u in zip(lst, old):
            assert torch.equal(t, u)
    with fastlm.use_backend(backend):  # found_inf = 0: the step runs
        adam_step_(*lists, amsgrad=amsgrad, found_inf=torch.tensor(0.0, device=device), **OP_KW)
    assert not torch.equal(lists[0][3], before[0][3])


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_step_op_grad_scale_and_clip(backend, device, dtype, amsgrad):
    # Powers of two: dividing by grad_scale and multiplying by clip_coef are exact, so the
    # scaled call must give exactly the call on pre-scaled grads.
    scaled = _op_lists(dtype, device, amsgrad, master=dtype != torch.float32)
    plain = _clone_lists(scaled)
    scaled[1] = [g * 64 for g in scaled[1]]
    plain[1] = [g * 0.25 for g in plain[1]]
    with fastlm.use_backend(backend):
        adam_step_(*scaled, amsgrad=amsgrad, grad_scale=torch.tensor(256.0, device=device),
                   clip_coef=torch.tensor(1.0, device=device),
                   found_inf=torch.tensor(0.0, device=device), **OP_KW)
        adam_step_(*plain, amsgrad=amsgrad, **OP_KW)
    for j in (0, 2, 3, 4, 5):  # every list but the grads (not modified)
        for t, u in zip(scaled[j], plain[j]):
            assert torch.equal(t, u)
    # and against the reference on the plain grads
    ref = _op_lists(dtype, device, amsgrad, master=dtype != torch.float32)
    ref[1] = [g * 0.25 for g in ref[1]]
    reference_adam_step_(*ref, OP_KW["lr"], None, OP_KW["beta1"], OP_KW["beta2"], OP_KW["eps"],
                         OP_KW["weight_decay"], True, amsgrad, False, None, None, None)
    for lst, other in zip(plain[:4] + plain[5:6], ref[:4] + ref[5:6]):
        for t, u in zip(lst, other):
            if dtype == torch.float32:
                torch.testing.assert_close(t, u, rtol=RTOL, atol=ATOL)
            else:
                assert_within_ulps(t, u, 1, "low-precision op result")


# ---------------------------------------------------------------------------------------------
# 7. Tensor counts, sizes and dtypes.
@pytest.mark.parametrize("backend,device", PAIRS)
def test_odd_and_empty_sizes(backend, device):
    sizes = (1, 0, 3, 4097, 0, 65537 + 5, (0, 4), (3, 5, 7))
    a, b, fl, ref = train_twins(lambda ps: fastlm.optim.AdamW(ps, lr=1e-2, amsgrad=True),
                                lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True,
                                                             fused=True),
                                backend, device, sizes=sizes,
                                steps=2 if interpreted(backend, device) else 5)
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_many_tensors(backend, device):
    n = 200 if not interpreted(backend, device) else 60
    g = torch.Generator().manual_seed(3)
    sizes = [int(k) for k in torch.randint(0, 50, (n,), generator=g)]
    a, b, fl, ref = train_twins(lambda ps: fastlm.optim.AdamW(ps, lr=1e-2),
                                lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
                                backend, device, sizes=sizes, steps=3)
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_single_tensor(backend, device):
    a, b, fl, ref = train_twins(lambda ps: fastlm.optim.Adam(ps, lr=1e-2),
                                lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
                                backend, device, sizes=(1,))
    assert_states_match(fl, ref, a, b)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_mixed_dtypes_in_one_group(backend, device):
    steps = 6
    base = tensors((5, 33), device=device) + tensors((7, 2), torch.bfloat16, device, seed=1)
    a, b, fl, ref, peak = lowp_trajectory(backend, device, base, steps, seed=40)
    assert [p.dtype for p in a] == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert_states_match(fl, ref, a[:2], b[:2])
    assert_lowp_trajectory(a, b, fl, ref, peak, steps)


# ---------------------------------------------------------------------------------------------
# 8. opcheck.
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("master", [False, True])
def test_opcheck_adam_step(amsgrad, master):
    dtype = torch.bfloat16 if master else torch.float32
    lists = _op_lists(dtype, "cpu", amsgrad, master=master, sizes=(3, 5))
    args = (*lists, 1e-2, None, 0.9, 0.999, 1e-8, 0.1, True, amsgrad, False,
            torch.tensor(2.0), torch.tensor(0.0), torch.tensor(0.5))
    torch.library.opcheck(torch.ops.fastlm.adam_step_.default, args)
    lists = _op_lists(dtype, "cpu", amsgrad, master=master, sizes=(3, 5))
    args = (*lists, 0.0, torch.tensor(1e-2), 0.9, 0.999, 1e-8, 0.0, False, amsgrad, True,
            None, None, None)
    torch.library.opcheck(torch.ops.fastlm.adam_step_.default, args)


def test_opcheck_sum_of_squares():
    ts = tensors((3, 0, 4097), seed=1) + tensors((5,), torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.fastlm.sum_of_squares.default, (ts,))
    torch.library.opcheck(torch.ops.fastlm.sum_of_squares.default, ([torch.randn(7)],))


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_opcheck_cuda():
    lists = _op_lists(torch.float32, "cuda", True, sizes=(3, 5))
    torch.library.opcheck(torch.ops.fastlm.adam_step_.default,
                          (*lists, 1e-2, None, 0.9, 0.999, 1e-8, 0.1, True, True, False,
                           None, torch.zeros((), device="cuda"), None))
    torch.library.opcheck(torch.ops.fastlm.sum_of_squares.default,
                          ([torch.randn(5, device="cuda")],))



@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_step_captured_in_cuda_graph(backend, clip):
    """The step (steps and lr as device tensors, the clip norm on the device) replays from a
    CUDA graph with the same results as eager steps: no host synchronization inside."""
    def make():
        torch.manual_seed(0)
        ps = [torch.randn(s, device="cuda", requires_grad=True) for s in ((33, 7), (5,), (4099,))]
        return ps, fastlm.optim.AdamW(ps, lr=torch.tensor(1e-2, device="cuda"),
                                      weight_decay=0.1, max_grad_norm=clip)

    grads = [[torch.randn_like(p) for p in make()[0]] for _ in range(5)]
    with fastlm.use_backend(backend):
        eager, opt_e = make()
        for gs in grads:
            for p, g in zip(eager, gs):
                p.grad = g.clone()
            opt_e.step()
        graphed, opt_g = make()
        for p, g in zip(graphed, grads[0]):
            p.grad = g.clone()
        opt_g.step()  # the first step allocates the state: outside the graph, as torch asks
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for p, g in zip(graphed, grads[1]):
                p.grad.copy_(g)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt_g.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()  # the capture itself does not run the step
        for gs in grads[2:]:
            for p, g in zip(graphed, gs):
                p.grad.copy_(g)
            graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
