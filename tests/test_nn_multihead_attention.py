"""fastlm.nn.MultiheadAttention is a drop-in torch.nn.MultiheadAttention: same constructor,
parameters and state_dict; outputs, attention weights and every gradient (inputs, parameters,
float masks) within the tolerance rule of torch's module, for every layout, mask and option;
dropout only in training; torch.compile(fullgraph=True); torch's errors on bad input.

The comparisons run fastlm and torch in float32 on the same weights and inputs, with torch's
module in float64 as the oracle (DESIGN.md's 2x rule), so they hold on every backend that
fastlm.scaled_dot_product_attention may pick."""

import copy
import inspect
import warnings

import pytest
import torch

import fastlm
import fastlm.nn.multihead_attention as mha_module
from conftest import FLOOR, assert_close_2x, param_floor

F32, F64 = torch.float32, torch.float64

# name -> module options and inputs. qkv: "self" (query is key is value), "kv" (key is value),
# "distinct". kpm / am: the key_padding_mask and attn_mask kinds (see _masks).
CASES = {
    "self": dict(),
    "self-batch-first": dict(batch_first=True),
    "self-noncontiguous": dict(noncontiguous=True, kpm="bool"),
    "cross-noncontiguous": dict(qkv="distinct", S=7, batch_first=True, noncontiguous=True),
    "unbatched": dict(batched=False),
    "unbatched-batch-first": dict(batched=False, batch_first=True),
    "cross-key-is-value": dict(qkv="kv", S=7),
    "cross-distinct": dict(qkv="distinct", S=7, batch_first=True),
    "kdim-vdim": dict(mod=dict(kdim=5, vdim=7), qkv="distinct", S=7),
    "kdim-vdim-batch-first-masks": dict(mod=dict(kdim=5, vdim=7), qkv="distinct", S=7,
                                        batch_first=True, kpm="bool", am="2bool"),
    "kdim-vdim-unbatched": dict(mod=dict(kdim=5, vdim=7), qkv="distinct", S=7, batched=False),
    "no-bias": dict(mod=dict(bias=False), qkv="kv", S=7),
    "add-bias-kv": dict(mod=dict(add_bias_kv=True), kpm="bool", am="2bool"),
    "add-zero-attn": dict(mod=dict(add_zero_attn=True), kpm="float", am="3float"),
    "bias-kv-zero-attn": dict(mod=dict(add_bias_kv=True, add_zero_attn=True), qkv="kv", S=7,
                              batch_first=True, am="3bool"),
    "kpm-bool": dict(kpm="bool"),
    "kpm-float": dict(kpm="float", batch_first=True),
    "mask-2d-bool": dict(am="2bool", qkv="kv", S=7),
    "mask-2d-float": dict(am="2float"),
    "mask-3d-bool": dict(am="3bool", batch_first=True),
    "mask-3d-float": dict(am="3float", qkv="distinct", S=7),
    "masks-both-bool": dict(kpm="bool", am="3bool", qkv="kv", S=7),
    "masks-both-float": dict(kpm="float", am="2float", batch_first=True),
    "unbatched-masks": dict(batched=False, kpm="bool", am="3bool"),
    "unbatched-float-masks": dict(batched=False, kpm="float", am="2float", qkv="kv", S=7),
    "causal": dict(am="causal", is_causal=True),
    "causal-float-mask": dict(am="causal-float", is_causal=True, batch_first=True),
    "causal-with-kpm": dict(am="causal", is_causal=True, kpm="bool", batch_first=True),
    "causal-bias-kv-zero-attn": dict(mod=dict(add_bias_kv=True, add_zero_attn=True),
                                     am="causal", is_causal=True),
    "causal-unbatched": dict(am="causal", is_causal=True, batched=False),
    "primes": dict(E=15, H=5, N=3, L=7, S=11, qkv="kv", kpm="float", am="2float"),
    "sizes-1": dict(E=4, H=4, N=1, L=1, S=1, qkv="distinct", batch_first=True),
}
WEIGHTS = {"no-weights": dict(need_weights=False),
           "avg-weights": dict(need_weights=True),
           "head-weights": dict(need_weights=True, average_attn_weights=False)}


def _spec(name):
    c = dict(mod={}, E=12, H=3, N=2, L=5, S=5, qkv="self", batched=True, batch_first=False,
             kpm=None, am=None, is_causal=False, noncontiguous=False)
    c.update(CASES[name])
    if c["qkv"] == "self":
        c["S"] = c["L"]
    return c


def _modules(c, seed=0, **extra):
    """torch's module in float64 and float32, and fastlm's in float32 loaded from torch's
    state_dict. Torch's initialisation, with random biases instead of zeros so they matter."""
    kw = dict(c["mod"], batch_first=c["batch_first"], **extra)
    torch.manual_seed(seed)
    ref64 = torch.nn.MultiheadAttention(c["E"], c["H"], dtype=F64, **kw)
    with torch.no_grad():
        for name, p in ref64.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    ref32 = torch.nn.MultiheadAttention(c["E"], c["H"], **kw)
    ref32.load_state_dict(ref64.state_dict())
    mod = fastlm.nn.MultiheadAttention(c["E"], c["H"], **kw)
    mod.load_state_dict(ref64.state_dict())
    return ref64, ref32, mod


def _masks(c, g):
    """(key_padding_mask, attn_mask) in float64 or bool. Key 0 is never masked, so no row is
    fully masked (that case has its own test: torch's need_weights path gives NaN there)."""
    N, H, L, S = c["N"], c["H"], c["L"], c["S"]
    kpm = am = None
    if c["kpm"]:
        m = torch.rand((N, S) if c["batched"] else (S,), generator=g) < 0.4
        m[..., 0] = False
        kpm = m if c["kpm"] == "bool" else _additive(m, g)
    if c["am"]:
        if c["am"].startswith("causal"):
            m = torch.ones(L, S, dtype=torch.bool).triu(1)
        else:
            lead = (N * H if c["batched"] else H,) if c["am"].startswith("3") else ()
            m = torch.rand(*lead, L, S, generator=g) < 0.4
            m[..., 0] = False
        am = m if c["am"].endswith("bool") or c["am"] == "causal" else _additive(m, g)
    return kpm, am


def _additive(masked, g):
    """A float mask: -inf where masked, small random values elsewhere (all of it matters)."""
    vals = 0.5 * torch.randn(masked.shape, generator=g, dtype=F64)
    return vals.masked_fill(masked, float("-inf"))


def _inputs(c, seed=1):
    """float64 query, key, value (with the identities of c["qkv"]) and masks."""
    g = torch.Generator().manual_seed(seed)
    N, L, S, E = c["N"], c["L"], c["S"], c["E"]
    kd, vd = c["mod"].get("kdim") or E, c["mod"].get("vdim") or E

    def shape(T, D):
        if not c["batched"]:
            return (T, D)
        return (N, T, D) if c["batch_first"] else (T, N, D)

    q = torch.randn(shape(L, E), generator=g, dtype=F64)
    k = torch.randn(shape(S, kd), generator=g, dtype=F64)
    v = torch.randn(shape(S, vd), generator=g, dtype=F64)
    if c["qkv"] == "self":
        k = v = q
    elif c["qkv"] == "kv":
        v = k
    kpm, am = _masks(c, g)
    return (q, k, v), kpm, am


def _leaves(qkv, kpm, am, dtype, noncontiguous=False):
    """Leaves in `dtype` that keep the identities among query, key and value (non-contiguous:
    the first two dims swapped in memory); float masks require grad too."""
    made = {}
    out = []
    for t in qkv:
        if id(t) not in made:
            leaf = t.detach().to(dtype)
            if noncontiguous:
                leaf = leaf.transpose(0, 1).contiguous().transpose(0, 1)
                assert not leaf.is_contiguous()
            made[id(t)] = leaf.requires_grad_()
        out.append(made[id(t)])
    masks = [m.detach().to(dtype).requires_grad_() if m is not None and m.is_floating_point()
             else m for m in (kpm, am)]
    return out, list(made.values()), masks


def _run(mod, c, inputs, dtype, call):
    """Forward and backward of `mod` in `dtype`: output, weights and the gradients of the
    distinct inputs, the float masks and every parameter (by name)."""
    qkv, kpm, am = inputs
    (q, k, v), distinct, (kpm, am) = _leaves(qkv, kpm, am, dtype, c["noncontiguous"])
    out, w = mod(q, k, v, key_padding_mask=kpm, attn_mask=am, is_causal=c["is_causal"], **call)
    gen = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=F64).to(dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=F64).to(dtype)).sum()
    float_masks = [m for m in (kpm, am) if m is not None and m.requires_grad]
    names, params = zip(*mod.named_parameters())
    # allow_unused: a float attn_mask with the is_causal hint is not used (torch's rule).
    grads = torch.autograd.grad(loss, [*distinct, *float_masks, *params], allow_unused=True)
    n_in = len(distinct) + len(float_masks)
    return out.detach(), (None if w is None else w.detach()), grads[:n_in], dict(
        zip(names, grads[n_in:]))


def _compare(c, call, seed=0, train=True, **extra):
    ref64, ref32, mod = _modules(c, seed, **extra)
    for m in (ref64, ref32, mod):
        m.train(train)
    inputs = _inputs(c)
    o, w, gi, gp = _run(mod, c, inputs, F32, call)
    o_t, w_t, gi_t, gp_t = _run(ref32, c, inputs, F32, call)
    o_o, w_o, gi_o, gp_o = _run(ref64, c, inputs, F64, call)
    floor = FLOOR[F32]
    assert_close_2x(o, o_o, o_t, floor, "attn_output")
    if w_t is None:
        assert w is None, "fastlm returned weights with need_weights=False"
    else:
        assert_close_2x(w, w_o, w_t, floor, "attn_weights")
    for i, (a, b, r) in enumerate(zip(gi, gi_o, gi_t)):
        if r is None:
            assert a is None and b is None, f"input {i}: fastlm used an input torch does not"
            continue
        assert a is not None, f"input {i}: no gradient from fastlm"
        assert_close_2x(a, b, r, floor, f"grad of input {i}")
    rows = c["N"] * c["L"]
    assert list(gp) == list(gp_t)
    for name in gp:
        assert_close_2x(gp[name], gp_o[name], gp_t[name], param_floor(F32, rows), f"d{name}")
    return o


# ---------------------------------------------------------------------------------------------
# Constructor, parameters, state_dict.
def test_signature_matches_torch():
    assert (inspect.signature(fastlm.nn.MultiheadAttention)
            == inspect.signature(torch.nn.MultiheadAttention))
    fwd = inspect.signature(fastlm.nn.MultiheadAttention.forward).parameters
    ref = inspect.signature(torch.nn.MultiheadAttention.forward).parameters
    assert list(fwd) == list(ref)
    assert all(fwd[n].default == ref[n].default for n in fwd)
    assert isinstance(fastlm.nn.MultiheadAttention(8, 2), torch.nn.MultiheadAttention)


CONFIGS = {
    "default": dict(),
    "no-bias": dict(bias=False),
    "bias-kv-zero-attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim-vdim": dict(kdim=5, vdim=7),
    "kdim-equal": dict(kdim=12, vdim=12),
    "dropout-batch-first": dict(dropout=0.25, batch_first=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_parameters_and_state_dict_match_torch(config):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(12, 3, **CONFIGS[config])
    torch.manual_seed(0)
    mod = fastlm.nn.MultiheadAttention(12, 3, **CONFIGS[config])
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout",
                 "batch_first", "add_zero_attn", "_qkv_same_embed_dim"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p), (_, r) in zip(mod.named_parameters(), ref.named_parameters()):
        assert p.shape == r.shape and p.dtype == r.dtype and torch.equal(p, r), n
    assert list(mod.state_dict()) == list(ref.state_dict())


def test_device_and_dtype_arguments():
    mod = fastlm.nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=5, device="cpu",
                                       dtype=torch.bfloat16)
    for n, p in mod.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16, n


@pytest.mark.parametrize("config", list(CONFIGS))
def test_load_state_dict_both_ways(config):
    kw = CONFIGS[config]
    src = torch.nn.MultiheadAttention(12, 3, **kw)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    mod = fastlm.nn.MultiheadAttention(12, 3, **kw)
    mod.load_state_dict(src.state_dict())
    for (n, a), b in zip(mod.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        for p in mod.parameters():
            p.mul_(-2.0)
    back = torch.nn.MultiheadAttention(12, 3, **kw)
    back.load_state_dict(mod.state_dict())
    for (n, a), b in zip(back.state_dict().items(), mod.state_dict().values()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------
# Outputs and gradients against torch's module.
@pytest.mark.parametrize("weights", ["no-weights", "head-weights"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, weights):
    _compare(_spec(case), WEIGHTS[weights])


@pytest.mark.parametrize("case", ["self", "unbatched-masks", "kdim-vdim-batch-first-masks",
                                  "bias-kv-zero-attn", "causal-with-kpm"])
def test_matches_torch_averaged_weights(case):
    _compare(_spec(case), WEIGHTS["avg-weights"])


def test_output_shapes_match_torch():
    """Shapes of the output and of averaged / per-head weights, batched and unbatched."""
    for batched, bf in ((True, False), (True, True), (False, False)):
        c = _spec("self")
        c.update(batched=batched, batch_first=bf)
        _, ref, mod = _modules(c)
        (q, _, _), _, _ = _inputs(c)
        q = q.float()
        for call in WEIGHTS.values():
            o, w = mod(q, q, q, **call)
            o_t, w_t = ref(q, q, q, **call)
            assert o.shape == o_t.shape and o.dtype == o_t.dtype
            assert (w is None) == (w_t is None)
            if w is not None:
                assert w.shape == w_t.shape and w.dtype == w_t.dtype


def test_empty_inputs():
    for shape in ((0, 3, 8), (3, 0, 8)):
        ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        mod = fastlm.nn.MultiheadAttention(8, 2, batch_first=True)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(shape, requires_grad=True)
        for need_weights in (True, False):
            o, w = mod(x, x, x, need_weights=need_weights)
            o_t, w_t = ref(x, x, x, need_weights=need_weights)
            assert o.shape == o_t.shape
            assert (w is None) == (w_t is None) and (w is None or w.shape == w_t.shape)
            (gx,) = torch.autograd.grad(o.sum(), x)
            assert gx.shape == x.shape


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_mismatched_mask_types_warn_and_match_torch(weights):
    """A bool key_padding_mask with a float attn_mask: torch's deprecation warning, and the
    bool mask becomes -inf added to the float one."""
    c = _spec("self")
    c.update(kpm="bool", am="2float")
    _, _, mod = _modules(c)
    (q, _, _), kpm, am = _inputs(c)
    q = q.float()
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        mod(q, q, q, key_padding_mask=kpm, attn_mask=am.float(), **WEIGHTS[weights])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every module run warns
        _compare(c, WEIGHTS[weights])


# ---------------------------------------------------------------------------------------------
# The fused path: what reaches fastlm.scaled_dot_product_attention.
@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = mha_module.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append(dict(q=q, k=k, v=v, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    **kw)

    monkeypatch.setattr(mha_module, "scaled_dot_product_attention", spy)
    return calls


def test_fused_path_heads_are_views_of_one_projection(sdpa_calls):
    mod = fastlm.nn.MultiheadAttention(12, 3, batch_first=True)
    x = torch.randn(2, 5, 12)
    mod(x, x, x, need_weights=False)
    (call,) = sdpa_calls
    q, k, v = call["q"], call["k"], call["v"]
    assert q.shape == k.shape == v.shape == (2, 3, 5, 4)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() \
        == v.untyped_storage().data_ptr(), "self-attention: one in-projection matmul"
    assert call["attn_mask"] is None and call["is_causal"] is False
    assert call["dropout_p"] == 0.0


def test_fused_path_bool_masks_stay_bool_and_unexpanded(sdpa_calls):
    N, H, L, S = 2, 3, 5, 7
    mod = fastlm.nn.MultiheadAttention(12, H)
    q, kv = torch.randn(L, N, 12), torch.randn(S, N, 12)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 3:] = True
    am = torch.ones(L, S, dtype=torch.bool).triu(3)
    mod(q, kv, kv, key_padding_mask=kpm, need_weights=False)
    mod(q, kv, kv, attn_mask=am, need_weights=False)
    mod(q, kv, kv, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    m_kpm, m_am, m_both = (c["attn_mask"] for c in sdpa_calls)
    assert m_kpm.dtype == m_am.dtype == m_both.dtype == torch.bool
    assert m_kpm.shape == (N, 1, 1, S) and torch.equal(m_kpm, ~kpm.view(N, 1, 1, S))
    assert m_am.shape == (L, S) and torch.equal(m_am, ~am)
    assert m_both.shape == (N, 1, L, S)
    assert torch.equal(m_both, ~(am | kpm.view(N, 1, 1, S)))
    assert all(c["is_causal"] is False for c in sdpa_calls)


@pytest.mark.parametrize("batch_first", [False, True])
def test_is_causal_hint_reaches_the_kernel(sdpa_calls, batch_first):
    """With is_causal and a causal attn_mask as the only mask, the kernel runs causal with no
    mask (torch's rule); with a key_padding_mask too, the merged mask is used instead."""
    N, L = 2, 6
    mod = fastlm.nn.MultiheadAttention(12, 3, batch_first=batch_first)
    x = torch.randn((N, L, 12) if batch_first else (L, N, 12))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    kpm = torch.zeros(N, L)
    kpm[0, -1] = float("-inf")
    o_hint, _ = mod(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    o_mask, _ = mod(x, x, x, attn_mask=causal, need_weights=False)
    mod(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)
    hint, plain, with_kpm = sdpa_calls
    assert hint["is_causal"] is True and hint["attn_mask"] is None
    assert plain["is_causal"] is False and plain["attn_mask"] is not None
    assert with_kpm["is_causal"] is False and with_kpm["attn_mask"].shape == (N, 1, L, L)
    torch.testing.assert_close(o_hint, o_mask, atol=1e-6, rtol=1e-5)


def test_is_causal_needs_attn_mask_like_torch():
    ref = torch.nn.MultiheadAttention(8, 2)
    mod = fastlm.nn.MultiheadAttention(8, 2)
    x = torch.randn(4, 2, 8)
    for need_weights in (False, True):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
            ref(x, x, x, is_causal=True, need_weights=need_weights)
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
            mod(x, x, x, is_causal=True, need_weights=need_weights)


# ---------------------------------------------------------------------------------------------
# Fully masked rows: zeros, not NaN (the documented difference).
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_give_zeros(need_weights):
    """A query that may attend to no key: attention 0, so its output is the out-projection's
    bias, and zero weights. torch's need_weights=True path gives NaN there (its fused path
    agrees with fastlm on the CPU); the other rows match torch."""
    N, L, E = 3, 4, 12
    ref = torch.nn.MultiheadAttention(E, 3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.copy_(0.1 * torch.randn(3 * E))
        ref.out_proj.bias.copy_(torch.randn(E))
    mod = fastlm.nn.MultiheadAttention(E, 3, batch_first=True)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True                                   # batch element 1 sees no key
    am = torch.zeros(L, L, dtype=torch.bool)
    am[2] = True                                    # query 2 sees no key
    xm = x.clone().requires_grad_()
    o, w = mod(xm, xm, xm, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    o_t, w_t = ref(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    dead = torch.zeros(N, L, dtype=torch.bool)
    dead[1] = True
    dead[:, 2] = True
    if need_weights:
        assert torch.isnan(o_t[dead]).all() and torch.isnan(w_t[dead]).all()
    torch.testing.assert_close(o[dead], ref.out_proj.bias.expand(int(dead.sum()), E))
    torch.testing.assert_close(o[~dead], o_t[~dead], atol=1e-5, rtol=1e-5)
    if need_weights:
        assert torch.equal(w[dead], torch.zeros_like(w[dead]))
        torch.testing.assert_close(w[~dead], w_t[~dead], atol=1e-6, rtol=1e-5)
    (o.sum() + (0.0 if w is None else w.sum())).backward()
    assert torch.isfinite(xm.grad).all()
    for n, p in mod.named_parameters():
        assert torch.isfinite(p.grad).all(), n


# ---------------------------------------------------------------------------------------------
# Dropout: only in training.
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_dropout_in_eval_matches_torch(weights):
    """dropout > 0 in eval: no dropout, torch's result; exactly the module without dropout.
    (Inputs require grad, so torch's inference fast path is not taken.)"""
    c = _spec("masks-both-bool")
    o = _compare(c, WEIGHTS[weights], train=False, dropout=0.4)
    o_plain = _compare(c, WEIGHTS[weights], train=False, dropout=0.0)
    torch.testing.assert_close(o, o_plain, atol=0, rtol=0)


def test_dropout_in_training_fused_path():
    """need_weights=False: dropout from fastlm's bits, reproducible under torch.manual_seed,
    different from eval; gradients reproducible too."""
    mod = fastlm.nn.MultiheadAttention(12, 3, dropout=0.3)
    x = torch.randn(5, 2, 12, requires_grad=True)

    def run():
        o, _ = mod(x, x, x, need_weights=False)
        return o, torch.autograd.grad(o.square().sum(), [x, mod.in_proj_weight])

    torch.manual_seed(3)
    o1, g1 = run()
    torch.manual_seed(3)
    o2, g2 = run()
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    o3, _ = run()
    assert not torch.equal(o1, o3), "a new draw gives new dropout bits"
    mod.eval()
    o_eval, _ = mod(x, x, x, need_weights=False)
    assert (o1 - o_eval).abs().max() > 1e-3
    mod.train()
    mod.dropout = 0.0
    o_nodrop, _ = mod(x, x, x, need_weights=False)
    torch.testing.assert_close(o_nodrop, o_eval, atol=0, rtol=0)


def test_dropout_in_training_with_weights_matches_torch():
    """need_weights=True drops the materialized weights with torch's dropout, as torch does:
    under one seed, the same output and weights as torch's module."""
    ref = torch.nn.MultiheadAttention(12, 3, dropout=0.3)
    mod = fastlm.nn.MultiheadAttention(12, 3, dropout=0.3)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 12)
    torch.manual_seed(5)
    o, w = mod(x, x, x, average_attn_weights=False)
    torch.manual_seed(5)
    o_t, w_t = ref(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(o, o_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_t, atol=1e-7, rtol=1e-6)
    assert (w == 0).any(), "some weights were dropped"
    mod.eval()
    o_eval, _ = mod(x, x, x)
    assert (o - o_eval).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the fused path.
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = fastlm.nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x, kpm, mask, is_causal):
        a, _ = self.attn(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False,
                         is_causal=is_causal)
        return self.fc(a) + x


@pytest.mark.parametrize("masks", ["padding-and-mask", "causal-hint"])
def test_compile_fullgraph(masks):
    torch.manual_seed(0)
    model = Block()
    compiled_model = copy.deepcopy(model)
    N, L = 2, 6
    x = torch.randn(N, L, 16)
    dy = torch.randn(N, L, 16)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    if masks == "causal-hint":
        args = (None, causal, True)
    else:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, 4:] = True
        args = (kpm, causal, False)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    # The torch backend: the dispatch of fastlm.scaled_dot_product_attention itself is not
    # what this module test is about.
    with fastlm.use_backend("torch"):
        xe = x.clone().requires_grad_()
        ye = model(xe, *args)
        ye.backward(dy)
        xc = x.clone().requires_grad_()
        yc = compiled(xc, *args)
        yc.backward(dy)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
    for (n, p), (_, r) in zip(compiled_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------
# Bad input: the exception type of torch's module, and a message that says what is wrong.
def test_embed_dim_not_divisible_by_num_heads():
    with pytest.raises(Exception) as ref:
        torch.nn.MultiheadAttention(10, 3)
    with pytest.raises(ref.type, match=str(ref.value)):
        fastlm.nn.MultiheadAttention(10, 3)
    assert ref.type in (AssertionError, ValueError)


def _bad(name):
    E, H, N, L, S = 8, 2, 2, 3, 4
    x = torch.randn(L, N, E)
    kv = torch.randn(S, N, E)
    bmask = lambda *s: torch.zeros(*s, dtype=torch.bool)  # noqa: E731
    return {
        "query-4d": ((torch.randn(1, L, N, E),) * 3, {}, "query should be unbatched 2D or "),
        "key-rank": ((x, kv[0], kv[0]), {}, "expected `key` and `value` to be 3-D"),
        "kpm-rank": ((x, kv, kv), dict(key_padding_mask=bmask(S)),
                     "expected `key_padding_mask` to be `None` or 2-D"),
        "mask-rank": ((x, kv, kv), dict(attn_mask=bmask(1, 1, L, S)),
                      "expected `attn_mask` to be `None`, 2-D or 3-D"),
        "mask-2d-shape": ((x, kv, kv), dict(attn_mask=bmask(L, S + 1)),
                          "The shape of the 2D attn_mask"),
        "mask-3d-shape": ((x, kv, kv), dict(attn_mask=bmask(H, L, S)),
                          "The shape of the 3D attn_mask"),
        "unbatched-mask-3d-shape": ((x[:, 0], kv[:, 0], kv[:, 0]),
                                    dict(attn_mask=bmask(H + 1, L, S)),
                                    "Expected `attn_mask` shape to be"),
        "kpm-shape": ((x, kv, kv), dict(key_padding_mask=bmask(N, S + 1)),
                      r"Expected key_padded_mask.shape\[1\] to be"),
        "kpm-batch": ((x, kv, kv), dict(key_padding_mask=bmask(N + 1, S)),
                      r"Expected key_padded_mask.shape\[0\] to be"),
        "mask-dtype": ((x, kv, kv), dict(attn_mask=torch.zeros(L, S, dtype=torch.int64)),
                       "only bool and floating types of attn_mask"),
        "embed-dim": ((torch.randn(L, N, E + 1), kv, kv), {},
                      "was expecting embedding dimension of 8"),
        "key-value-shape": ((x, kv, kv[:-1]), {}, "does not match value shape"),
        "key-batch": ((x, kv[:, :1], kv[:, :1]), {}, "batch size 1 but query has 2"),
    }[name]


@pytest.mark.parametrize("name", ["query-4d", "key-rank", "kpm-rank", "mask-rank",
                                  "mask-2d-shape", "mask-3d-shape", "unbatched-mask-3d-shape",
                                  "kpm-shape", "kpm-batch", "mask-dtype", "embed-dim",
                                  "key-value-shape", "key-batch"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_bad_input_raises_like_torch(name, need_weights):
    args, kw, msg = _bad(name)
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2)
    mod = fastlm.nn.MultiheadAttention(8, 2)
    with pytest.raises(Exception) as ref_err:
        ref(*args, need_weights=need_weights, **kw)
    with pytest.raises(ref_err.type, match=msg):
        mod(*args, need_weights=need_weights, **kw)


def test_kdim_mismatch_raises_like_torch():
    ref = torch.nn.MultiheadAttention(8, 2, kdim=5, vdim=6)
    mod = fastlm.nn.MultiheadAttention(8, 2, kdim=5, vdim=6)
    q, k, v = torch.randn(3, 2, 8), torch.randn(4, 2, 6), torch.randn(4, 2, 6)
    with pytest.raises(Exception) as ref_err:
        ref(q, k, v)
    with pytest.raises(ref_err.type, match="expecting key embedding dimension of 5"):
        mod(q, k, v)


def test_nested_tensor_input_is_refused():
    mod = fastlm.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="NestedTensor"):
        with torch.no_grad():
            mod(nt, nt, nt, need_weights=False)


# ---------------------------------------------------------------------------------------------
# Autocast: torch's dtypes, and the tolerance rule against torch's own autocast run.
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_autocast_bfloat16_matches_torch(weights):
    c = _spec("bias-kv-zero-attn")
    c.update(kpm="float", am="3float")
    ref64, ref32, mod = _modules(c)
    (q, k, v), kpm, am = _inputs(c)
    q32, k32 = q.float(), k.float()
    masks = dict(key_padding_mask=kpm.float(), attn_mask=am.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, w = mod(q32, k32, k32, **masks, **WEIGHTS[weights])
        o_t, w_t = ref32(q32, k32, k32, **masks, **WEIGHTS[weights])
    o_o, w_o = ref64(q, k, v, key_padding_mask=kpm, attn_mask=am, **WEIGHTS[weights])
    assert_close_2x(o, o_o, o_t, FLOOR[torch.bfloat16], "attn_output")
    if w_t is None:
        assert w is None
    else:
        assert_close_2x(w, w_o, w_t, FLOOR[torch.bfloat16], "attn_weights")
