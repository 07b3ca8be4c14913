"""Drop-in fidelity (issue 14): code written for torch.nn / torch.optim behaves the same on
fastlm. One named regression test (or a few) per case the issue lists, and per difference the
differential harness (tests/test_fidelity_harness.py) found; docs/fidelity.md lists what
still differs, on purpose.

Tolerances: optimizer trajectories in float32 as tests/test_optim.py (rtol 1e-5, atol 1e-6
over a few steps: both sides evaluate the same float32 formula, in another order); float64
ones to 1e-12 (both compute in float64; torch's own implementations differ by ~1e-16 per
step); ops by the 2x rule of DESIGN.md against a float64 oracle.
"""

import copy
import io
import logging
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import FLOOR, assert_close_2x, compare_with_oracle, make_params, randn

RTOL, ATOL = 1e-5, 1e-6
CLASSES = {"Adam": (fastlm.optim.Adam, torch.optim.Adam),
           "AdamW": (fastlm.optim.AdamW, torch.optim.AdamW)}


def _twins(values):
    """Two lists of leaf params with the same values (any layout: views are rebuilt alike)."""
    return [[torch.nn.Parameter(v.detach().clone()) for v in values],
            [torch.nn.Parameter(v.detach().clone()) for v in values]]


def _run(opt_fl, opt_t, a, b, steps=4, seed=0, grad_of=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pa, pb in zip(a, b):
            gr = torch.randn(pa.shape, generator=g, dtype=_real_dtype(pa.dtype))
            if pa.is_complex():
                gr = torch.complex(gr, torch.randn(pa.shape, generator=g, dtype=gr.dtype))
            if grad_of is not None:
                gr = grad_of(gr)
            pa.grad, pb.grad = gr.clone(), gr.clone()
        opt_fl.step()
        opt_t.step()


def _real_dtype(dtype):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _assert_match(opt_fl, opt_t, a, b, rtol=RTOL, atol=ATOL):
    for i, (pa, pb) in enumerate(zip(a, b)):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"param {i}: {m}")
        sa, sb = opt_fl.state[pa], opt_t.state[pb]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in sa) == (key in sb), f"param {i}: {key} in one state only"
            if key in sb:
                assert sa[key].dtype == sb[key].dtype, f"param {i} {key}: dtype"
                torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol,
                                           msg=lambda m, i=i, k=key: f"param {i} {k}: {m}")
        assert float(sa["step"]) == float(sb["step"])


# ---------------------------------------------------------------------------------------------
# 1. Complex parameters: updated as their real views, as torch.
@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_parameters_as_torch(cls, amsgrad, dtype):
    g = torch.Generator().manual_seed(1)
    vals = [torch.randn(4, generator=g, dtype=dtype), torch.randn(3, 5, generator=g, dtype=dtype)]
    a, b = _twins(vals)
    kw = dict(lr=0.1, amsgrad=amsgrad, weight_decay=0.05)
    fl, t = CLASSES[cls][0](a, **kw), CLASSES[cls][1](b, foreach=False, **kw)
    _run(fl, t, a, b)
    tol = (1e-12, 1e-12) if dtype == torch.complex128 else (RTOL, ATOL)
    _assert_match(fl, t, a, b, *tol)
    # The imaginary parts moved (the issue: they stayed at their initial values).
    assert not torch.equal(a[0].imag, vals[0].imag)
    # torch's state format (complex moments): checkpoints load both ways.
    assert fl.state[a[0]]["exp_avg"].dtype == dtype
    t2 = CLASSES[cls][1](b, **kw)
    t2.load_state_dict(copy.deepcopy(fl.state_dict()))  # (else they share the moments)
    _run(fl, t2, a, b, steps=2, seed=5)
    _assert_match(fl, t2, a, b, *tol)


# (clip coefficients are float32 on fastlm, float64 on torch with float64 grads: 1e-6)
@pytest.mark.parametrize("dtype,tol", [(torch.complex64, (RTOL, ATOL)),
                                       (torch.float64, (1e-6, 1e-7))], ids=str)
def test_clipping_as_clip_grad_norm(dtype, tol):
    # max_grad_norm clips as clip_grad_norm_ over every param; the norm of a complex grad is
    # that of its real view (torch.linalg.vector_norm); float64 beside float32 params.
    g = torch.Generator().manual_seed(2)
    a, b = _twins([torch.randn(6, generator=g, dtype=dtype), torch.randn(5, generator=g)])
    fl = fastlm.optim.AdamW(a, lr=0.1, max_grad_norm=0.5)
    t = torch.optim.AdamW(b, lr=0.1, foreach=False)
    for s in range(4):
        for pa, pb in zip(a, b):
            gr = torch.randn(pa.shape, generator=g, dtype=pa.dtype) * 3
            pa.grad, pb.grad = gr.clone(), gr.clone()
        norm = torch.nn.utils.get_total_norm([p.grad for p in b])
        fl.step()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        t.step()
        torch.testing.assert_close(fl.grad_norm, norm.float(), rtol=1e-6, atol=0)
    _assert_match(fl, t, a, b, *tol)


# ---------------------------------------------------------------------------------------------
# 2. Copies and pickles of an optimizer step, with fastlm's settings kept.
def _trained_opt(cls=fastlm.optim.AdamW, **kw):
    model = torch.nn.Linear(5, 3).to(torch.bfloat16)
    opt = cls(model.parameters(), lr=0.01, **kw)
    for s in range(2):
        torch.manual_seed(s)
        model(torch.randn(4, 5, dtype=torch.bfloat16)).float().square().sum().backward()
        opt.step()
    return model, opt


def _roundtrip(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copied_optimizer_steps_like_the_original(how):
    model, opt = _trained_opt(master_weights=True, max_grad_norm=0.5)
    model2, opt2 = _roundtrip((model, opt), how)  # together, as EMA / checkpoint code does
    assert opt2.max_grad_norm == 0.5
    assert opt2.defaults["master_weights"] is True and opt2._master_default is True
    assert torch.equal(opt2.grad_norm, opt.grad_norm)
    assert opt2._step_supports_amp_scaling
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()  # (a pickled Parameter loses its .grad)
        torch.manual_seed(7)
        m(torch.randn(4, 5, dtype=torch.bfloat16)).float().square().sum().backward()
        o.step()
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        for key, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p2][key]), key
    assert torch.equal(opt.grad_norm, opt2.grad_norm)


def test_copy_of_torch_pickle_without_fastlm_settings_takes_the_defaults():
    # A pickle made before fastlm kept its settings (only torch's three keys) still steps.
    _, opt = _trained_opt()
    state = torch.optim.Optimizer.__getstate__(opt)
    fresh = fastlm.optim.AdamW.__new__(fastlm.optim.AdamW)
    fresh.__setstate__(dict(state))
    assert fresh.max_grad_norm is None and fresh.grad_norm is None
    fresh.step()


def test_load_state_dict_keeps_fastlm_settings():
    # torch's load_state_dict calls __setstate__ with state and param_groups only.
    model, opt = _trained_opt(max_grad_norm=0.25)
    opt.load_state_dict(opt.state_dict())
    assert opt.max_grad_norm == 0.25 and opt.grad_norm is not None


# ---------------------------------------------------------------------------------------------
# 3. torch.nn.attention.bias masks (CausalBias objects).
@pytest.mark.parametrize("L,S", [(4, 6), (5, 5), (6, 4), (1, 7)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_causal_bias_masks_as_torch(L, S, variant, backend):
    from torch.nn.attention import bias as B

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about lower-right with L > S
        mask = getattr(B, f"causal_{variant}")(L, S)
    q = randn((2, 4, L, 16), torch.float32, "cpu", seed=1).requires_grad_()
    k = randn((2, 2, S, 16), torch.float32, "cpu", seed=2).requires_grad_()
    v = randn((2, 2, S, 8), torch.float32, "cpu", seed=3).requires_grad_()
    with fastlm.use_backend(backend):
        out = fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # The same function as the explicit bool mask torch materializes for it.
    dense = mask._materialize()
    oracle = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)),
                                            attn_mask=dense, enable_gqa=True)
    empty = ~dense.any(-1)  # rows that attend to nothing: zeros on fastlm, NaN on torch
    keep = ~empty.view(1, 1, L, 1)
    assert torch.equal(out.detach()[..., empty, :], torch.zeros_like(out[..., empty, :]))
    assert_close_2x(torch.where(keep, out, 0).detach(), torch.where(keep, oracle, 0),
                    torch.where(keep, ref, 0).detach(), FLOOR[torch.float32])
    dy = randn(out.shape, torch.float32, "cpu", seed=4)
    g = torch.autograd.grad(out, (q, k, v), dy)
    if not empty.any():  # (torch's gradients are NaN through empty rows)
        go = torch.autograd.grad(oracle, (q, k, v), dy.double())
        gt = torch.autograd.grad(ref, (q, k, v), dy)
        for a, o, t in zip(g, go, gt):
            assert_close_2x(a, o, t, FLOOR[torch.float32])
    else:
        assert all(torch.isfinite(t).all() for t in g)


def test_causal_bias_with_is_causal_raises_as_torch():
    from torch.nn.attention.bias import causal_upper_left

    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 3), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        fastlm.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 3),
                                            is_causal=True)


# ---------------------------------------------------------------------------------------------
# 4. Error classes and messages as torch's.
def _torch_and_fastlm_raise(torch_call, fastlm_call):
    with pytest.raises(Exception) as t_err:
        torch_call()
    with pytest.raises(Exception) as f_err:
        fastlm_call()
    assert isinstance(f_err.value, type(t_err.value)), (
        f"torch raises {type(t_err.value).__name__}, fastlm {type(f_err.value).__mro__}")
    return str(t_err.value), str(f_err.value)


@pytest.mark.parametrize("case", ["mismatch", "empty", "too-long-ns", "weight-shape",
                                  "bias-shape", "weight-device", "int-input", "not-a-tensor"])
def test_layer_norm_errors_are_torchs_classes(case):
    x = torch.randn(2, 5)
    args = {"mismatch": (x, (4,)), "empty": (x, ()), "too-long-ns": (x, (1, 2, 5)),
            "weight-shape": (x, (5,), torch.ones(3)), "bias-shape": (x, (5,), None, torch.ones(3)),
            "weight-device": (x, (5,), torch.ones(5, device="meta")),
            "int-input": (torch.ones(2, 5, dtype=torch.int64), (5,)),
            "not-a-tensor": ([1.0], (1,))}[case]
    t_msg, f_msg = _torch_and_fastlm_raise(lambda: F.layer_norm(*args),
                                           lambda: fastlm.layer_norm(*args))
    if case in ("mismatch", "empty", "too-long-ns", "weight-shape", "bias-shape"):
        assert f_msg == "fastlm.layer_norm: " + t_msg.splitlines()[0]  # torch's words
    # the module, as torch's module
    if case in ("mismatch", "too-long-ns"):
        _torch_and_fastlm_raise(lambda: torch.nn.LayerNorm(args[1])(x),
                                lambda: fastlm.nn.LayerNorm(args[1])(x))


def test_attn_mask_with_is_causal_message_as_torch():
    q = torch.randn(1, 1, 4, 8)
    m = torch.ones(4, 4, dtype=torch.bool)
    t_msg, f_msg = _torch_and_fastlm_raise(
        lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=m, is_causal=True),
        lambda: fastlm.scaled_dot_product_attention(q, q, q, attn_mask=m, is_causal=True))
    assert "Explicit attn_mask should not be set when is_causal=True" in t_msg
    assert "Explicit attn_mask should not be set when is_causal=True" in f_msg


# ---------------------------------------------------------------------------------------------
# 5. Non-contiguous parameters.
def _layouts():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    img = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    gapped = torch.randn(6, 10, generator=g)[:, ::2]
    return {"transposed": base.t(), "channels_last": img, "gapped": gapped,
            "sliced": torch.randn(5, 7, generator=g)[1:4, 2:]}


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_non_contiguous_parameters_as_torch(cls, layout, amsgrad):
    val = _layouts()[layout]
    assert not val.is_contiguous()
    a = [torch.nn.Parameter(val.clone(memory_format=torch.preserve_format))]
    b = [torch.nn.Parameter(val.clone(memory_format=torch.preserve_format))]
    if layout in ("gapped", "sliced"):  # keep the views: the params are views
        a = [torch.nn.Parameter(_layouts()[layout])]
        b = [torch.nn.Parameter(_layouts()[layout])]
    assert not a[0].is_contiguous()
    kw = dict(lr=0.05, amsgrad=amsgrad, weight_decay=0.1)
    fl, t = CLASSES[cls][0](a, **kw), CLASSES[cls][1](b, foreach=False, **kw)
    _run(fl, t, a, b)
    _assert_match(fl, t, a, b)
    assert a[0].stride() == b[0].stride()  # updated in place, layout kept
    # the state is laid out as torch's (zeros_like: the param's strides when dense)
    assert fl.state[a[0]]["exp_avg"].stride() == t.state[b[0]]["exp_avg"].stride()


def test_non_contiguous_low_precision_parameter_with_master_weights():
    val = torch.randn(8, 6).t().to(torch.bfloat16)
    p = torch.nn.Parameter(val.clone(memory_format=torch.preserve_format))
    q = torch.nn.Parameter(val.contiguous())
    fl = fastlm.optim.AdamW([p], lr=0.05, master_weights=True)
    ref = fastlm.optim.AdamW([q], lr=0.05, master_weights=True)
    for s in range(3):
        g = torch.randn(6, 8, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16)
        p.grad, q.grad = g.clone(), g.clone()
        fl.step()
        ref.step()
    assert torch.equal(p.detach(), q.detach())  # the same kernel on the same values
    assert torch.equal(fl.state[p]["master_param"], ref.state[q]["master_param"])


def test_loaded_contiguous_state_is_realigned_once():
    # A checkpoint's moments may be contiguous for a transposed param: loaded, they are laid
    # out like the param once, and the trajectory is torch's.
    val = torch.randn(5, 7).t()
    a, b = _twins([val])
    a = [torch.nn.Parameter(val.clone(memory_format=torch.preserve_format))]
    t0 = torch.optim.Adam(b, lr=0.05, foreach=False)
    _run(torch.optim.Adam(a, lr=0.05, foreach=False), t0, a, b, steps=2)
    sd = copy.deepcopy(t0.state_dict())
    for st in sd["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            st[key] = st[key].contiguous()
    fl = fastlm.optim.Adam(a, lr=0.05)
    fl.load_state_dict(sd)
    _run(fl, t0, a, b, steps=3, seed=9)
    _assert_match(fl, t0, a, b)
    assert fl.state[a[0]]["exp_avg"].stride() == a[0].stride()


# ---------------------------------------------------------------------------------------------
# 6. float64 parameters in float64 arithmetic.
@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "maximize": True},
                                     {"weight_decay": 0.1, "lr": 0.01},
                                     {"lr": "tensor"}], ids=str)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_float64_parameters_as_torch(cls, options, backend):
    options = dict(options)
    if options.get("lr") == "tensor":
        options["lr"] = torch.tensor(0.02)
    g = torch.Generator().manual_seed(4)
    a, b = _twins([torch.randn(1000, generator=g, dtype=torch.float64),
                   torch.randn(3, 7, generator=g, dtype=torch.float64)])
    fl = CLASSES[cls][0](a, **options)
    # A tensor lr: torch's step size is then computed in the lr tensor's dtype (float32), a
    # 1e-7 relative difference per step (docs/fidelity.md); fastlm keeps float64, which is
    # torch's float64 computation with that lr as a number (compared here).
    t = CLASSES[cls][1](b, foreach=False, **{k: (v.item() if isinstance(v, torch.Tensor) else v)
                                            for k, v in options.items()})
    with fastlm.use_backend(backend):
        _run(fl, t, a, b, steps=10)
    _assert_match(fl, t, a, b, rtol=1e-12, atol=1e-12)


def test_float64_step_logs_once(caplog):
    fastlm._log._said.discard("optim-torch-fused-torch.float64")
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = fastlm.optim.Adam([p])
    with caplog.at_level(logging.INFO, logger="fastlm"):
        for _ in range(3):
            p.grad = torch.randn(4, dtype=torch.float64)
            opt.step()
    said = [r for r in caplog.records if "torch's fused Adam kernel" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "fastlm"


# ---------------------------------------------------------------------------------------------
# 7. LayerNorm over more than 2**20 elements.
def test_layer_norm_vision_shape_as_torch():
    # The shape: LayerNorm([256, 256, 144]) (9.4M elements per row).
    ns = (256, 256, 144)
    ln = fastlm.nn.LayerNorm(ns)
    ref = torch.nn.LayerNorm(ns)
    with torch.no_grad():
        for m in (ln, ref):
            m.weight.copy_(make_params(ns, torch.float32, "cpu")[0])
            m.bias.copy_(make_params(ns, torch.float32, "cpu")[1])
    x = randn((1, *ns), torch.float32, "cpu").requires_grad_()
    y = ln(x)
    y_t = ref(x)
    assert torch.equal(y, y_t)  # torch's own kernel runs it
    dy = randn(y.shape, torch.float32, "cpu", seed=2)
    assert all(torch.equal(a, b) for a, b in zip(
        torch.autograd.grad(y, (x, ln.weight, ln.bias), dy),
        torch.autograd.grad(y_t, (x, ref.weight, ref.bias), dy)))


@pytest.mark.parametrize("dtype,pdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)], ids=str)
def test_layer_norm_long_rows_against_the_oracle(dtype, pdtype):
    ns = (1024, 1025)  # 2**20 + 1024 elements
    x = randn((2, *ns), dtype, "cpu")
    w, b = make_params(ns, pdtype, "cpu")
    compare_with_oracle("cpu", x, ns, w, b)


def test_add_layer_norm_long_rows_equal_the_composition():
    ns = (1 << 20) + 3
    x, r = randn((2, ns), torch.float32, "cpu", seed=1), randn((2, ns), torch.float32, "cpu")
    w, b = make_params((ns,), torch.float32, "cpu")
    out, summed = fastlm.add_layer_norm(x, r, ns, w, b)
    assert torch.equal(summed, x + r)
    with fastlm.use_backend("torch"):
        ref = fastlm.layer_norm(x + r, ns, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_long_rows_log_once(caplog):
    fastlm._log._said.discard("layer_norm-long-rows")
    x = torch.randn(1, (1 << 20) + 1)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        fastlm.layer_norm(x, x.shape[1:])
        fastlm.layer_norm(x, x.shape[1:])
    assert sum("rows of more than" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------
# 8. TorchScript: the modules torch scripts script, save and load, and compute torch's result.
def _modules(nn):
    return {
        "LayerNorm": (lambda: nn.LayerNorm([4, 8]), ("x48",)),
        "MultiheadAttention-kdim-vdim": (lambda: nn.MultiheadAttention(128, 8, kdim=256,
                                                                        vdim=256),
                                         ("q128", "kv256", "kv256")),
        "MultiheadAttention-batch-first-bias-kv": (
            lambda: nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True,
                                          add_zero_attn=True), ("b16", "b16", "b16")),
        "TransformerEncoderLayer": (lambda: nn.TransformerEncoderLayer(16, 2, 32),
                                    ("s16",)),
        "TransformerEncoderLayer-norm-first-gelu": (
            lambda: nn.TransformerEncoderLayer(16, 2, 32, activation="gelu", norm_first=True,
                                               batch_first=True), ("b16",)),
        "TransformerDecoderLayer": (lambda: nn.TransformerDecoderLayer(16, 2, 32),
                                    ("s16", "m16")),
        "TransformerEncoder": (lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32), 2, norm=nn.LayerNorm(16)), ("s16",)),
        "TransformerDecoder": (lambda: nn.TransformerDecoder(
            nn.TransformerDecoderLayer(16, 2, 32), 2), ("s16", "m16")),
        "Transformer": (lambda: nn.Transformer(16, 2, 1, 1, 32), ("m16", "s16")),
    }


def _jit_inputs():
    g = torch.Generator().manual_seed(0)
    return {"x48": torch.randn(3, 4, 8, generator=g), "q128": torch.randn(5, 2, 128, generator=g),
            "kv256": torch.randn(7, 2, 256, generator=g), "b16": torch.randn(2, 5, 16, generator=g),
            "s16": torch.randn(5, 2, 16, generator=g), "m16": torch.randn(7, 2, 16, generator=g)}


@pytest.mark.parametrize("name", list(_modules(torch.nn)))
def test_torchscript_as_torch(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation, nested-tensor notes
        torch.manual_seed(0)
        fl = _modules(fastlm.nn)[name][0]().eval()
        torch.manual_seed(0)
        ref = _modules(torch.nn)[name][0]().eval()
        scripted = torch.jit.script(fl)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        torch.jit.script(ref)  # torch scripts its twin
    inputs = [_jit_inputs()[k] for k in _modules(torch.nn)[name][1]]

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    y_ref = first(ref(*inputs))
    for m in (scripted, loaded):
        assert torch.equal(first(m(*inputs)), y_ref)  # torch's computation, compiled
    # and fastlm's eager module is within the 2x rule of torch
    y = first(fl(*inputs))
    y_o = first(_double(ref)(*[t.double() for t in inputs]))
    assert_close_2x(y.detach(), y_o.detach(), y_ref.detach(), 2e-5)
    assert type(fl).__module__.startswith("fastlm.nn")  # scripting left the module fastlm's


def _double(m):
    return copy.deepcopy(m).double()


def test_torchscript_of_a_model_holding_fastlm_modules_leaves_it_fastlm():
    model = torch.nn.Sequential(fastlm.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model)
    assert type(model[0]) is fastlm.nn.LayerNorm


# ---------------------------------------------------------------------------------------------
# 9. differentiable=True: torch's differentiable step (hypergradients through it).
@pytest.mark.parametrize("cls", list(CLASSES))
def test_differentiable_as_torch(cls):
    results = []
    for opt_cls in CLASSES[cls]:
        w0 = torch.randn(5, generator=torch.Generator().manual_seed(0), requires_grad=True)
        lr = torch.tensor(0.1, requires_grad=True)
        w = w0.clone()  # a non-leaf param: the step is recorded by autograd
        opt = opt_cls([w], lr=lr, differentiable=True)
        for s in range(2):
            x = torch.randn(5, generator=torch.Generator().manual_seed(10 + s))
            (g,) = torch.autograd.grad((w * x).sin().sum(), w, create_graph=True)
            w.grad = g
            opt.step()
        meta = w.square().sum()
        results.append((w.detach(), *torch.autograd.grad(meta, (w0, lr))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_differentiable_rejects_fastlm_only_options():
    for kw in ({"master_weights": True}, {"max_grad_norm": 1.0}):
        with pytest.raises(ValueError, match="differentiable=True runs torch.optim's step"):
            fastlm.optim.AdamW([torch.zeros(2, requires_grad=True)], differentiable=True, **kw)


def test_differentiable_runs_hooks_once():
    p = torch.zeros(3, requires_grad=True)
    w = p.clone()
    opt = fastlm.optim.Adam([w], differentiable=True)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # hooks torch's Adam.step too
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    w.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"]


# ---------------------------------------------------------------------------------------------
# What the harness found (tests/test_fidelity_harness.py): regression tests.
def test_head_dims_over_256_run_as_torch():
    # Found in review: the kernels take head dims up to 256 and fastlm raised beyond (torch
    # runs any); now the reference runs them unless a kernel backend is forced.
    q, k = randn((1, 2, 3, 300), torch.float32, "cpu", seed=1), randn((1, 2, 5, 300),
                                                                     torch.float32, "cpu", seed=2)
    v = randn((1, 2, 5, 264), torch.float32, "cpu", seed=3)
    out = fastlm.scaled_dot_product_attention(q, k, v)
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close_2x(out, oracle, F.scaled_dot_product_attention(q, k, v), FLOOR[torch.float32])
    cu = torch.tensor([0, 3], dtype=torch.int32)
    out = fastlm.varlen_attention(q[0].transpose(0, 1), k[0, :, :3].transpose(0, 1),
                                  v[0, :, :3].transpose(0, 1), cu, cu, 3, 3)
    oracle = F.scaled_dot_product_attention(q.double(), k[:, :, :3].double(),
                                            v[:, :, :3].double())[0].transpose(0, 1)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)


def test_attention_head_dim_one_with_stride_zero():
    # Harness finding (sdpa): a head dim of size 1 with stride 0 (an expanded value) reached the
    # kernels, which require stride 1 there: "must have stride 1 in the last dimension".
    q, k = randn((2, 1, 1), torch.float32, "cpu", seed=1), randn((2, 2, 1), torch.float32, "cpu")
    v = randn((2, 2, 1), torch.float32, "cpu", seed=2)
    v = v.as_strided(v.shape, (2, 1, 0))
    out = fastlm.scaled_dot_product_attention(q, k, v)
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close_2x(out, oracle, F.scaled_dot_product_attention(q, k, v), FLOOR[torch.float32])


def test_attention_float_mask_dtypes_as_torch():
    # Harness finding (sdpa): torch takes a float mask of float32 or the query's dtype only;
    # fastlm took any floating dtype. Now the same rule, class and words.
    q = torch.randn(1, 2, 4, 8)
    for mdt in (torch.float16, torch.bfloat16, torch.float64):
        m = torch.zeros(4, 4, dtype=mdt)
        t_msg, f_msg = _torch_and_fastlm_raise(
            lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=m),
            lambda: fastlm.scaled_dot_product_attention(q, q, q, attn_mask=m))
        assert "Expected attn_mask dtype to be bool or float or to match query dtype" in f_msg
    qb = q.bfloat16()
    for mdt in (torch.float32, torch.bfloat16):  # allowed, as torch
        m = torch.randn(4, 4).to(mdt)
        out = fastlm.scaled_dot_product_attention(qb, qb, qb, attn_mask=m)
        oracle = F.scaled_dot_product_attention(*(qb.double(),) * 3, attn_mask=m.double())
        assert_close_2x(out, oracle, F.scaled_dot_product_attention(qb, qb, qb, attn_mask=m),
                        FLOOR[torch.bfloat16])


def test_attention_head_dim_zero_as_torch():
    # Harness finding (sdpa): E = 0 raised ZeroDivisionError (1/sqrt(E)); torch's scores are 0
    # (uniform weights), the result the mean of the values.
    q, k = torch.randn(1, 2, 4, 0), torch.randn(1, 2, 5, 0)
    v = torch.randn(1, 2, 5, 6)
    out = fastlm.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(1, 2, 4, 6))


def test_lower_right_causal_bias_argument_errors_as_torch():
    # Harness finding (sdpa): torch validates the lower-right CausalBias path in Python and
    # raises ValueError (plain sdpa: RuntimeError); fastlm raised a TypeError subclass there.
    from torch.nn.attention.bias import causal_lower_right

    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8)
    _torch_and_fastlm_raise(
        lambda: F.scaled_dot_product_attention(q, k.half(), k, attn_mask=causal_lower_right(2, 3)),
        lambda: fastlm.scaled_dot_product_attention(q, k.half(), k,
                                                    attn_mask=causal_lower_right(2, 3)))
