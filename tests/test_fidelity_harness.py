"""Differential harness (issue 14): fastlm against its torch twins on drawn arguments.

For every public function and module of fastlm that has a torch twin, hypothesis draws the
arguments (shapes with 0/1/prime sizes, dtypes, strided and broadcast views, masks of every
kind including torch.nn.attention.bias objects, GQA, options, train/eval, state_dicts,
optimizer options and param-group layouts, copies and pickles) and runs both. Then either
  - torch raises and fastlm raises an instance of torch's exception class, or
  - neither raises, and every output and gradient (and optimizer state) agrees with torch by
    the 2x rule of DESIGN.md: max|fastlm - oracle| <= 2 max|torch - oracle| + floor, the
    oracle being torch's own computation in float64 and the floor FLOOR[dtype] times
    max(1, max|oracle|) (a relative floor: gradients and long rows grow past 1).
The deliberate differences of docs/fidelity.md are handled where they arise, each naming
its section there: a query row that may attend to nothing gives zeros (compared as such,
gradients compared only without such rows), dropout is drawn 0, fastlm accepting what a
torch CPU kernel rejects (listed). Anything else is a finding: a named regression test in
tests/test_fidelity.py once fixed, or a documented difference.

Profiles:
  CI (default run): fixed seed (derandomize), a few examples per property, cpu and torch
      backends only (the Triton interpreter is too slow for it): about 2 minutes on 2 cores.
  long (marker `ondemand`): FASTLM_ONDEMAND=1 python -m pytest -m ondemand
      tests/test_fidelity_harness.py; random seeds, each property for
      FASTLM_FIDELITY_MINUTES (default 5) minutes, Triton (interpreted, tiny shapes) included;
      every failure found is collected (shrunk by hypothesis) and reported at the end.
"""

import contextlib
import copy
import io
import math
import os
import pickle
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastlm
from conftest import FLOOR

FLOORS = {**FLOOR, torch.float64: 1e-12}
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=list(HealthCheck))
# CI: examples per property, sized so the profile takes about a minute and a half on 2 cores
# (FASTLM_FIDELITY_CI_EXAMPLES overrides them all).
CI_EXAMPLES = {"layer_norm": 60, "add_layer_norm": 60, "sdpa": 60, "varlen": 40,
               "multihead_attention": 40, "transformer": 25, "module_state_and_copies": 25,
               "optimizer": 60}
LONG_MINUTES = float(os.environ.get("FASTLM_FIDELITY_MINUTES", "5"))
_LONG = {"on": False}  # set by the long profile: Triton joins the backends


# ---------------------------------------------------------------------------------------------
# Drawing tensors.
def _backend(data):
    """None (fastlm's automatic choice: the cpu kernels here), or a forced backend."""
    names = [None, "torch"] + (["triton"] if _LONG["on"] else [])
    return data.draw(st.sampled_from(names), label="backend")


@contextlib.contextmanager
def _use(backend, dtype):
    """fastlm.use_backend(backend), automatic for float64 (a forced kernel backend rejects
    float64 by design: fastlm's switch, not a torch argument). Notes whether Triton runs in
    its CPU interpreter, which rounds float32 to bfloat16 by truncation (a GPU rounds to
    nearest): the comparison then allows one more bfloat16 ulp, as tests/conftest.py does."""
    b = None if dtype in (F64, torch.complex128) else backend
    _LONG["interpreted"] = b == "triton" and not torch.cuda.is_available()
    with fastlm.use_backend(b):
        yield


def _size(data, lo=0, hi=9, label="size"):
    return data.draw(st.integers(lo, hi) | st.sampled_from([1, 13, 17, 31]), label=label)


def _values(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    real = {torch.complex64: F32, torch.complex128: F64}.get(dtype)
    if real is not None:
        return torch.complex(torch.randn(shape, generator=g, dtype=real),
                             torch.randn(shape, generator=g, dtype=real)) * scale
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def _laid_out(data, values, label):
    """`values` (contiguous) as a tensor of the same shape and values in a drawn layout:
    contiguous, another dim order (a permuted copy viewed back), a strided slice of a bigger
    tensor, or (for dims of size 1 only) broadcast with stride 0."""
    kind = data.draw(st.sampled_from(["contiguous", "permuted", "sliced", "expanded"]),
                     label=f"{label} layout")
    d = values.dim()
    if kind == "permuted" and d >= 2:
        perm = data.draw(st.permutations(range(d)), label=f"{label} perm")
        inv = sorted(range(d), key=lambda i: perm[i])
        return values.permute(*perm).contiguous().permute(*inv)
    if kind == "sliced" and d >= 1:
        dim = data.draw(st.integers(0, d - 1), label=f"{label} slice dim")
        shape = list(values.shape)
        shape[dim] *= 2
        big = torch.zeros(shape, dtype=values.dtype)
        idx = [slice(None)] * d
        idx[dim] = slice(0, None, 2)
        big[tuple(idx)] = values
        return big[tuple(idx)]
    if kind == "expanded" and d >= 1 and 1 in values.shape:
        dim = values.shape.index(1)
        return values.expand(*values.shape).as_strided(
            values.shape, tuple(0 if i == dim else s for i, s in enumerate(values.stride())))
    return values


def _leaf(t, requires_grad=True):
    return t.detach().requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))


# ---------------------------------------------------------------------------------------------
# Running both sides and comparing.
class _Raised:
    def __init__(self, err):
        self.err = err


def _outcome(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except Exception as e:  # noqa: BLE001  (the class is what is compared)
        return _Raised(e)


def _flat(x):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    return []


def assert_2x(out, oracle, lowp, what, floor_dtype=None):
    """The 2x rule on one tensor, NaN/inf where torch has them too; dtype and shape as torch's.
    The floor is that of `floor_dtype` (the computation's lowest precision: a float32 weight
    gradient of bfloat16 input carries bfloat16 errors), else of the result's dtype."""
    assert out.shape == lowp.shape, f"{what}: shape {tuple(out.shape)} != torch's {tuple(lowp.shape)}"
    assert out.dtype == lowp.dtype, f"{what}: dtype {out.dtype} != torch's {lowp.dtype}"
    if out.numel() == 0:
        return
    o, t, f = (x.detach().to(torch.complex128 if x.is_complex() else F64) for x in (oracle, lowp, out))
    special = ~torch.isfinite(t)
    if special.any():
        same = (torch.isnan(f) & torch.isnan(t)) | (f == t)
        assert bool(same[special].all()), f"{what}: torch has NaN/inf at {int(special.sum())} places, fastlm differs there"
        fin = ~special
        o, t, f = o[fin], t[fin], f[fin]
    assert bool(torch.isfinite(f).all()), f"{what}: fastlm has NaN/inf where torch does not"
    if f.numel() == 0:
        return
    top = o.abs().max().item()
    floor = FLOORS[_real_dtype(floor_dtype or lowp.dtype)] * max(1.0, top)
    if _LONG.get("interpreted") and BF16 in (lowp.dtype, floor_dtype) and top > 0:
        floor += 2.0 ** (math.frexp(top)[1] - 8)  # one bfloat16 ulp at the largest magnitude
    err = (f - o).abs().max().item()
    ref = (t - o).abs().max().item()
    assert err <= 2 * ref + floor, (f"{what}: max error {err:.3e} vs the float64 oracle; bound 2 x "
                                    f"torch's {ref:.3e} + floor {floor:.1e}")


def _real_dtype(dtype):
    return {torch.complex64: F32, torch.complex128: F64}.get(dtype, dtype)


def differential(fl_fn, torch_fn, oracle_fn, what, exempt=None, floor_dtype=None):
    """Run torch, fastlm and (when torch succeeds) the oracle; the same exception class, or
    every tensor of the results within the 2x rule. `exempt(err)` names a documented case in
    which fastlm may succeed where torch raises (returns the docs section, or None)."""
    _LONG["interpreted"] = False
    t = _outcome(torch_fn)
    f = _outcome(fl_fn)
    if isinstance(t, _Raised):
        if not isinstance(f, _Raised):
            if exempt is not None and exempt(t.err):
                return None
            raise AssertionError(f"{what}: torch raises {type(t.err).__name__}: {t.err}; fastlm "
                                 "does not")
        assert isinstance(f.err, type(t.err)), (
            f"{what}: torch raises {type(t.err).__name__} ({t.err}); fastlm raises "
            f"{type(f.err).__name__} ({f.err}), not a subclass")
        return None
    if isinstance(f, _Raised):
        raise AssertionError(f"{what}: fastlm raises {type(f.err).__name__}: {f.err}; torch "
                             "does not") from f.err
    o = oracle_fn()
    fs, ts, os_ = _flat(f), _flat(t), _flat(o)
    assert len(fs) == len(ts) == len(os_), f"{what}: {len(fs)} results vs torch's {len(ts)}"
    for i, (a, b, c) in enumerate(zip(fs, ts, os_)):
        assert_2x(a, c, b, f"{what} result {i}", floor_dtype)
    return f


def _grads(out, inputs, dy_seed, dtype):
    """(out, *grads of the inputs that require grad) for a random cotangent, drawn in the
    case's `dtype` on every side (the oracle's cotangent holds the same, rounded, values)."""
    outs = [o for o in _flat(out) if o.requires_grad]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    if not outs or not wrt:
        return (out,)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = F32
    dys = [_values(o.shape, dtype, dy_seed + i).to(o.dtype) for i, o in enumerate(outs)]
    gs = torch.autograd.grad(outs, wrt, dys, allow_unused=True)
    return (out, *[torch.zeros_like(w) if g is None else g for w, g in zip(wrt, gs)])


def _twin_inputs(tensors, dtype=None):
    """Fresh leaves (same values and layout) for one side; `dtype` casts (the oracle)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().clone(memory_format=torch.preserve_format) if dtype is None else \
            t.detach().to(dtype if not t.is_complex() else torch.complex128)
        out.append(c.requires_grad_(t.requires_grad))
    return out


# ---------------------------------------------------------------------------------------------
# Properties: each draws one case and runs it differentially.
def prop_layer_norm(data):
    dtype = data.draw(st.sampled_from([F32, F16, BF16, F64]), label="dtype")
    lead = data.draw(st.lists(st.integers(0, 5), max_size=3), label="lead dims")
    ns = data.draw(st.lists(st.integers(1, 9) | st.sampled_from([17, 31, 64]), min_size=1,
                            max_size=2), label="normalized_shape")
    pdtype = data.draw(st.sampled_from([dtype, F32, F64, F16]), label="param dtype")
    given_ns = list(ns)
    if data.draw(st.integers(0, 9), label="bad ns?") == 0:  # a wrong normalized_shape
        given_ns = data.draw(st.lists(st.integers(0, 9), max_size=3), label="bad ns")
    wshape = ns if data.draw(st.integers(0, 9)) else data.draw(
        st.lists(st.integers(1, 9), min_size=1, max_size=2), label="bad weight shape")
    has_w, has_b = data.draw(st.booleans(), label="weight"), data.draw(st.booleans(), label="bias")
    eps = data.draw(st.sampled_from([1e-5, 1e-6, 0.1]), label="eps")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    backend = _backend(data)
    x = _laid_out(data, _values(lead + ns, dtype, seed, 2.0), "x")
    w = _values(wshape, pdtype, seed + 1) + 1 if has_w else None
    b = _values(wshape, pdtype, seed + 2) if has_b else None
    inputs = [_leaf(x), None if w is None else _leaf(w), None if b is None else _leaf(b)]
    module = data.draw(st.booleans(), label="module")

    def run(fn, ts):
        xx, ww, bb = ts
        if module and ww is not None and bb is not None and ww.dtype == bb.dtype:
            m = fn(given_ns, eps=eps)
            with torch.no_grad():
                m.weight = torch.nn.Parameter(ww.detach().clone(), ww.requires_grad)
                m.bias = torch.nn.Parameter(bb.detach().clone(), bb.requires_grad)
            return _grads(m(xx), [xx, m.weight, m.bias], seed + 3, dtype)
        f = F.layer_norm if fn is torch.nn.LayerNorm else fastlm.layer_norm
        return _grads(f(xx, given_ns, ww, bb, eps), [xx, ww, bb], seed + 3, dtype)

    def fl():
        with _use(backend, dtype):
            return run(fastlm.nn.LayerNorm, _twin_inputs(inputs))

    differential(fl, lambda: run(torch.nn.LayerNorm, _twin_inputs(inputs)),
                 lambda: run(torch.nn.LayerNorm, _twin_inputs(inputs, F64)),
                 f"layer_norm {dtype} x{tuple(x.shape)} ns={given_ns} params {pdtype} "
                 f"backend={backend}", exempt=_torch_cpu_mixed_dtype_backward, floor_dtype=dtype)


def _torch_cpu_mixed_dtype_backward(err):
    """docs/fidelity.md, "LayerNorm: float32 parameters on 16-bit input": torch's CPU backward
    rejects a float32 bias without a weight (and a few other mixes its forward takes)."""
    return "expected scalar type" in str(err) or "mixed dtype" in str(err)


def prop_add_layer_norm(data):
    dtype = data.draw(st.sampled_from([F32, F16, BF16, F64]), label="dtype")
    lead = data.draw(st.lists(st.integers(0, 5), max_size=2), label="lead dims")
    ns = data.draw(st.lists(st.integers(1, 9) | st.sampled_from([17, 64]), min_size=1,
                            max_size=2), label="normalized_shape")
    pdtype = data.draw(st.sampled_from([dtype, F32]), label="param dtype")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    backend = _backend(data)
    x = _laid_out(data, _values(lead + ns, dtype, seed), "x")
    r = _laid_out(data, _values(lead + ns, dtype, seed + 1), "residual")
    w = _values(ns, pdtype, seed + 2) + 1 if data.draw(st.booleans(), label="weight") else None
    b = _values(ns, pdtype, seed + 3) if data.draw(st.booleans(), label="bias") else None
    inputs = [_leaf(x), _leaf(r), None if w is None else _leaf(w), None if b is None else _leaf(b)]

    def composition(ts):  # the eager torch code add_layer_norm replaces (dropout 0)
        xx, rr, ww, bb = ts
        summed = rr + xx
        return _grads((F.layer_norm(summed, ns, ww, bb), summed), ts, seed + 4, dtype)

    def fl():
        ts = _twin_inputs(inputs)
        with _use(backend, dtype):
            out, summed = fastlm.add_layer_norm(ts[0], ts[1], ns, ts[2], ts[3], dropout_p=0.0)
        return _grads((out, summed), ts, seed + 4, dtype)

    differential(fl, lambda: composition(_twin_inputs(inputs)),
                 lambda: composition(_twin_inputs(inputs, F64)),
                 f"add_layer_norm {dtype} x{tuple(x.shape)} ns={ns} params {pdtype} "
                 f"backend={backend}", exempt=_torch_cpu_mixed_dtype_backward, floor_dtype=dtype)


def _attention_case(data):
    """(q, k, v, kwargs, empty-rows mask or None, description) for SDPA."""
    dtype = data.draw(st.sampled_from([F32, F32, BF16, F16, F64]), label="dtype")
    batch = data.draw(st.lists(st.integers(1, 3), max_size=2), label="batch dims")
    hk = data.draw(st.sampled_from([1, 2, 3]), label="kv heads")
    gqa = data.draw(st.booleans(), label="enable_gqa")
    hq = hk * data.draw(st.sampled_from([1, 2]), label="group") if gqa else hk
    L, S = _size(data, 1, 9, "L"), _size(data, 1, 9, "S")
    E = data.draw(st.sampled_from([0, 1, 4, 8, 16, 20]), label="E")
    Ev = data.draw(st.sampled_from([E, 8, 3]), label="Ev")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    q = _laid_out(data, _values(batch + [hq, L, E], dtype, seed), "q")
    k = _laid_out(data, _values(batch + [hk, S, E], dtype, seed + 1), "k")
    v = _laid_out(data, _values(batch + [hk, S, Ev], dtype, seed + 2), "v")
    kind = data.draw(st.sampled_from(["none", "causal", "bool", "float", "upper_left",
                                      "lower_right"]), label="mask kind")
    kw = {"enable_gqa": gqa}
    if data.draw(st.booleans(), label="scale?"):
        kw["scale"] = data.draw(st.sampled_from([0.1, 1.0, 2.5]), label="scale")
    allowed = torch.ones(L, S, dtype=torch.bool)
    if kind == "causal":
        kw["is_causal"] = True
        allowed = allowed.tril()
    elif kind in ("bool", "float"):
        # broadcast pattern: each of the leading dims present or 1, or dropped
        full = batch + [hq, L, S]
        shape = [d if data.draw(st.booleans(), label=f"mask dim {i}") else 1
                 for i, d in enumerate(full)]
        keep = len(shape) - data.draw(st.integers(0, len(batch) + 1), label="mask drop")
        shape = shape[len(shape) - max(keep, 2):]
        g = torch.Generator().manual_seed(seed + 5)
        m = torch.rand(shape, generator=g) > data.draw(st.sampled_from([0.0, 0.3, 0.8]),
                                                          label="masked share")
        if kind == "bool":
            kw["attn_mask"] = m
            allowed = m
        else:
            mdt = data.draw(st.sampled_from([dtype, dtype, F32, F16, BF16, F64]),
                            label="float mask dtype")
            fm = torch.where(m, torch.randn(shape, generator=g), torch.tensor(float("-inf")))
            kw["attn_mask"] = fm.to(mdt).requires_grad_(data.draw(st.booleans(), label="mask grad"))
            allowed = m
    elif kind in ("upper_left", "lower_right"):
        from torch.nn.attention import bias as B

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw["attn_mask"] = getattr(B, f"causal_{kind}")(L, S)
        allowed = kw["attn_mask"]._materialize()
    if data.draw(st.integers(0, 14), label="is_causal with a mask?") == 0 and "attn_mask" in kw:
        kw["is_causal"] = True  # torch raises: so must fastlm
    # (not drawn: key and value of different lengths, and dropout_p < 0, which torch's CPU
    # kernels take and fastlm rejects: docs/fidelity.md, "Errors")
    bad = data.draw(st.sampled_from([None] * 8 + ["E", "dtype", "int", "dropout>1", "heads",
                                                  "1-D"]), label="bad argument")
    if min(q.numel(), k.numel(), v.numel()) == 0:
        bad = None  # torch skips its shape checks for some empty inputs (docs/fidelity.md)
    if bad == "E":
        k = k[..., :-1]
    elif bad == "dtype":
        k = k.to(F16 if dtype != F16 else F32)
    elif bad == "int":
        q, k, v = q.long(), k.long(), v.long()
    elif bad == "dropout>1":
        kw["dropout_p"] = 1.5
    elif bad == "heads" and not gqa:
        k, v = torch.cat([k, k], -3), torch.cat([v, v], -3)
        if hq == 2 * hk:
            k, v = torch.cat([k, k], -3), torch.cat([v, v], -3)
    elif bad == "1-D":
        q = q.reshape(-1)[:max(E, 1)]
    empty = ~allowed.expand(*batch, hq, L, S).any(-1)  # (*batch, hq, L): rows with no key
    desc = (f"sdpa {dtype} bad={bad} q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} mask={kind}"
            f"{tuple(kw['attn_mask'].shape) if isinstance(kw.get('attn_mask'), torch.Tensor) and kind in ('bool', 'float') else ''} "
            f"{ {k_: v_ for k_, v_ in kw.items() if k_ != 'attn_mask'} }")
    return q, k, v, kw, (empty if empty.any() else None), desc, seed


def prop_sdpa(data):
    q, k, v, kw, empty, desc, seed = _attention_case(data)
    backend = _backend(data)
    mask = kw.get("attn_mask")
    mask_t = mask if isinstance(mask, torch.Tensor) and type(mask) is torch.Tensor else None
    # 16-bit: no dq, dk (docs/fidelity.md, "16-bit attention gradients": D from the stored
    # 16-bit output, as FlashAttention; up to ~100x torch's CPU error at large logits)
    qk = q.dtype not in (F16, BF16)
    inputs = [_leaf(q, qk), _leaf(k, qk), _leaf(v)] + ([mask_t] if mask_t is not None else [])

    def run(fn, ts, grads=True):
        kw2 = dict(kw)
        if mask_t is not None:
            kw2["attn_mask"] = ts[3]
        out = fn(ts[0], ts[1], ts[2], **kw2)
        if empty is not None:
            # rows that attend to nothing (docs/fidelity.md, "Attention: rows with no key"):
            # zeros on fastlm, zeros or NaN on torch's paths; compared as zeros, no gradients
            return out.masked_fill(empty.unsqueeze(-1), 0.0).detach()
        return _grads(out, ts, seed + 7, q.dtype) if grads else out

    def fl():
        ts = _twin_inputs(inputs)
        with _use(backend, q.dtype):
            out = run(fastlm.scaled_dot_product_attention, ts)
        if empty is not None:  # fastlm's rows with no key are zeros, with finite gradients
            raw = fastlm.scaled_dot_product_attention(*_twin_inputs(inputs)[:3], **kw)
            assert bool((raw.detach()[empty] == 0).all()), f"{desc}: a row with no key is not 0"
        return out

    differential(fl, lambda: run(F.scaled_dot_product_attention, _twin_inputs(inputs)),
                 lambda: run(F.scaled_dot_product_attention, _twin_inputs(inputs, F64)),
                 f"{desc} backend={backend}")


def prop_varlen(data):
    """varlen_attention against torch's SDPA on the padded batch with a key-padding mask."""
    dtype = data.draw(st.sampled_from([F32, BF16, F64]), label="dtype")
    n = data.draw(st.integers(1, 4), label="sequences")
    lq = [_size(data, 1, 7, f"len q {i}") for i in range(n)]
    same = data.draw(st.booleans(), label="self-attention lengths")
    lk = lq if same else [_size(data, 1, 7, f"len k {i}") for i in range(n)]
    hk = data.draw(st.sampled_from([1, 2]), label="kv heads")
    gqa = data.draw(st.booleans(), label="gqa")
    hq = hk * (2 if gqa else 1)
    E = data.draw(st.sampled_from([4, 8, 16]), label="E")
    causal = data.draw(st.booleans(), label="causal")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    backend = _backend(data)
    q = _values((sum(lq), hq, E), dtype, seed)
    k = _values((sum(lk), hk, E), dtype, seed + 1)
    v = _values((sum(lk), hk, E), dtype, seed + 2)
    qk = dtype != BF16  # (no dq, dk in 16 bits: as prop_sdpa)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    mq, mk = max(lq), max(lk)
    inputs = [_leaf(q, qk), _leaf(k, qk), _leaf(v)]
    allowed = torch.zeros(n, mq, mk, dtype=torch.bool)
    for i in range(n):
        a = torch.ones(lq[i], lk[i], dtype=torch.bool)
        allowed[i, :lq[i], :lk[i]] = a.tril() if causal else a
    empty = any(~allowed[i, :lq[i]].any(-1).all() for i in range(n)) or any(
        (~allowed[i, :lq[i]].any(-1)).any() for i in range(n))

    def padded(ts):
        qq, kk, vv = ts
        qp = torch.zeros(n, hq, mq, E, dtype=qq.dtype)
        kp = torch.zeros(n, hk, mk, E, dtype=kk.dtype)
        vp = torch.zeros(n, hk, mk, E, dtype=vv.dtype)
        qp = torch.stack([F.pad(qq[cq[i]:cq[i + 1]].transpose(0, 1), (0, 0, 0, mq - lq[i]))
                          for i in range(n)])
        kp = torch.stack([F.pad(kk[ck[i]:ck[i + 1]].transpose(0, 1), (0, 0, 0, mk - lk[i]))
                          for i in range(n)])
        vp = torch.stack([F.pad(vv[ck[i]:ck[i + 1]].transpose(0, 1), (0, 0, 0, mk - lk[i]))
                          for i in range(n)])
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed.unsqueeze(1),
                                           enable_gqa=gqa)
        out = torch.cat([o[i, :, :lq[i]].transpose(0, 1) for i in range(n)])
        return out if empty else _grads(out, ts, seed + 3, dtype)

    def fl():
        ts = _twin_inputs(inputs)
        with _use(backend, dtype):
            out = fastlm.varlen_attention(ts[0], ts[1], ts[2], cq, ck, mq, mk, is_causal=causal,
                                          enable_gqa=gqa)
        return out if empty else _grads(out, ts, seed + 3, dtype)

    differential(fl, lambda: padded(_twin_inputs(inputs)),
                 lambda: padded(_twin_inputs(inputs, F64)),
                 f"varlen {dtype} lq={lq} lk={lk} hq={hq} hk={hk} E={E} causal={causal} "
                 f"backend={backend}")


def _masks_for(kwargs, oracle):
    """The forward's keyword arguments, floating masks in float64 for the oracle."""
    return {k: (v.double() if oracle and isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in kwargs.items()}


def _module_differential(run, fl_m, ref, inputs, backend, dtype, what):
    """run(module, inputs, oracle) on the fastlm module, torch's, and a float64 copy of
    torch's (the oracle), compared by `differential`."""
    def fl():
        with _use(backend, dtype):
            return run(fl_m, _twin_inputs(inputs))

    differential(fl, lambda: run(ref, _twin_inputs(inputs)),
                 lambda: run(copy.deepcopy(ref).double(), _twin_inputs(inputs, F64), True), what)


def prop_multihead_attention(data):
    E = data.draw(st.sampled_from([8, 12, 16]), label="embed_dim")
    H = data.draw(st.sampled_from([h for h in (1, 2, 4) if E % h == 0]), label="heads")
    kw = dict(bias=data.draw(st.booleans(), label="bias"),
              add_bias_kv=data.draw(st.booleans(), label="add_bias_kv"),
              add_zero_attn=data.draw(st.booleans(), label="add_zero_attn"),
              batch_first=data.draw(st.booleans(), label="batch_first"))
    cross = data.draw(st.sampled_from(["self", "kv-same", "cross", "kdim-vdim"]), label="qkv")
    if cross == "kdim-vdim":
        kw.update(kdim=data.draw(st.sampled_from([5, 8])), vdim=data.draw(st.sampled_from([3, 8])))
    dtype = data.draw(st.sampled_from([F32, F32, F64]), label="dtype")
    training = data.draw(st.booleans(), label="train")
    batched = data.draw(st.booleans(), label="batched")
    N, L = _size(data, 1, 4, "N"), _size(data, 1, 6, "L")
    S = L if cross == "self" else _size(data, 1, 6, "S")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    backend = _backend(data)
    need_weights = data.draw(st.booleans(), label="need_weights")
    avg = data.draw(st.booleans(), label="average_attn_weights")
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, **kw).to(dtype)
    fl_m = fastlm.nn.MultiheadAttention(E, H, **kw).to(dtype)
    via = data.draw(st.sampled_from(["load_state_dict", "patch"]), label="weights via")
    if via == "patch":
        fl_m = copy.deepcopy(ref)
        fastlm.patch(fl_m)  # re-classes the module itself, in place
        assert type(fl_m) is fastlm.nn.MultiheadAttention
    else:
        fl_m.load_state_dict(ref.state_dict())
    for m in (ref, fl_m):
        m.train(training)

    def seq(n, t, d, s):
        shape = ((n, t, d) if kw["batch_first"] else (t, n, d)) if batched else (t, d)
        return _values(shape, dtype, s)

    q = seq(N, L, E, seed)
    k = q if cross == "self" else seq(N, S, kw.get("kdim", E), seed + 1)
    v = k if cross in ("self", "kv-same") else seq(N, S, kw.get("vdim", E), seed + 2)
    mkind = data.draw(st.sampled_from(["none", "kpm-bool", "kpm-float", "attn-bool-2d",
                                       "attn-float-3d", "both-bool", "causal-hint"]),
                      label="masks")
    g = torch.Generator().manual_seed(seed + 3)
    fkw = {"need_weights": need_weights, "average_attn_weights": avg}
    allowed = torch.ones(N, H, L, S, dtype=torch.bool)
    if "kpm" in mkind or mkind == "both-bool":
        kpm = torch.rand(N, S, generator=g) < 0.3
        fkw["key_padding_mask"] = kpm if mkind != "kpm-float" else \
            torch.zeros(N, S, dtype=dtype).masked_fill(kpm, float("-inf"))
        allowed = allowed & ~kpm.view(N, 1, 1, S)
        if not batched:
            fkw["key_padding_mask"] = fkw["key_padding_mask"][0]
    if mkind in ("attn-bool-2d", "both-bool", "causal-hint"):
        am = torch.ones(L, S, dtype=torch.bool).triu(1) if mkind == "causal-hint" else \
            torch.rand(L, S, generator=g) < 0.3
        fkw["attn_mask"] = am
        fkw["is_causal"] = mkind == "causal-hint"
        allowed = allowed & ~am
    if mkind == "attn-float-3d":
        am = torch.randn(N * H if batched else H, L, S, generator=g, dtype=F64).to(dtype)
        fkw["attn_mask"] = am
    if kw["add_bias_kv"] or kw["add_zero_attn"]:
        allowed = torch.ones_like(allowed)  # the extra keys are attended by every row
    if not batched:
        allowed = allowed[:1]
    empty = ~allowed.any(-1)
    inputs = [_leaf(q), _leaf(k), _leaf(v)]

    def run(m, ts, oracle=False):
        qq = ts[0]
        kk = qq if cross == "self" else ts[1]
        vv = kk if cross in ("self", "kv-same") else ts[2]
        kw2 = _masks_for(fkw, oracle)
        out, w = m(qq, kk, vv, **kw2)
        if empty.any():
            # rows with no key: fastlm zeros where torch may give NaN (docs/fidelity.md)
            rows = empty.any(1) if batched else empty[0].any(0)
            out = out.detach()
            if batched:
                sel = rows.view(N, 1, L).transpose(1, 2) if kw["batch_first"] else \
                    rows.t().reshape(L, N, 1)
            else:
                sel = rows.view(L, 1)
            out = out.masked_fill(sel.expand_as(out), 0.0)
            return out, None
        params = list(m.parameters())
        wrt = [qq] + ([] if cross == "self" else [kk]) + params
        return _grads((out, w), wrt, seed + 4, dtype)

    _module_differential(
        run, fl_m, ref, inputs, backend, dtype,
        f"MultiheadAttention({E}, {H}, {kw}) {dtype} {cross} batched={batched} N={N} L={L} "
        f"S={S} masks={mkind} {fkw.get('is_causal', '')} need_weights={need_weights} "
        f"train={training} via={via} backend={backend}")


def prop_transformer(data):
    kind = data.draw(st.sampled_from(["EncoderLayer", "DecoderLayer", "Encoder", "Decoder",
                                      "Transformer"]), label="module")
    d = data.draw(st.sampled_from([8, 16]), label="d_model")
    nhead = data.draw(st.sampled_from([1, 2, 4]), label="nhead")
    lkw = dict(dim_feedforward=data.draw(st.sampled_from([8, 24]), label="ff"), dropout=0.0,
               activation=data.draw(st.sampled_from(["relu", "gelu"]), label="activation"),
               batch_first=data.draw(st.booleans(), label="batch_first"),
               norm_first=data.draw(st.booleans(), label="norm_first"),
               bias=data.draw(st.booleans(), label="bias"))
    dtype = data.draw(st.sampled_from([F32, F64]), label="dtype")
    training = data.draw(st.booleans(), label="train")
    no_grad = not training and data.draw(st.booleans(), label="no_grad")  # torch's fast path
    N, T, M = _size(data, 1, 3, "N"), _size(data, 1, 6, "T"), _size(data, 1, 6, "M")
    masks = data.draw(st.sampled_from(["none", "causal", "padding", "causal+padding"]),
                      label="masks")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    backend = _backend(data)

    def build(ns):
        torch.manual_seed(seed)
        if kind == "EncoderLayer":
            return ns.TransformerEncoderLayer(d, nhead, **lkw)
        if kind == "DecoderLayer":
            return ns.TransformerDecoderLayer(d, nhead, **lkw)
        if kind == "Encoder":
            return ns.TransformerEncoder(ns.TransformerEncoderLayer(d, nhead, **lkw), 2,
                                         norm=ns.LayerNorm(d))
        if kind == "Decoder":
            return ns.TransformerDecoder(ns.TransformerDecoderLayer(d, nhead, **lkw), 2)
        return ns.Transformer(d, nhead, 1, 1, **lkw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = build(torch.nn).to(dtype).train(training)
        fl_m = build(fastlm.nn).to(dtype).train(training)
    fl_m.load_state_dict(ref.state_dict())

    def seq(t, s):
        shape = (N, t, d) if lkw["batch_first"] else (t, N, d)
        return _values(shape, dtype, s)

    src, tgt = seq(T, seed), seq(M, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    fkw = {}
    pad = torch.rand(N, T, generator=g) < 0.3
    pad[:, 0] = False  # every sequence keeps its first token: no row with no key
    if "causal" in masks:
        key = "src_mask" if kind == "EncoderLayer" else "mask" if kind == "Encoder" else "tgt_mask"
        size = T if kind in ("EncoderLayer", "Encoder") else M
        fkw[key] = torch.nn.Transformer.generate_square_subsequent_mask(size, dtype=dtype)
        if kind == "EncoderLayer":
            fkw["is_causal"] = True
    if "padding" in masks:
        key = "src_key_padding_mask" if kind in ("EncoderLayer", "Encoder", "Transformer") else \
            "memory_key_padding_mask"
        fkw[key] = pad
        if kind == "Transformer":  # the decoder skips the padded memory too
            fkw["memory_key_padding_mask"] = pad
    inputs = [_leaf(src), _leaf(tgt)]

    def run(m, ts, oracle=False):
        ss, tt = ts
        args = ((ss,) if kind in ("EncoderLayer", "Encoder") else
                (ss, tt) if kind == "Transformer" else (tt, ss))
        kw2 = _masks_for(fkw, oracle)
        if no_grad:  # torch's inference fast path, where it takes it
            with torch.no_grad():
                out = m(*args, **kw2)
            if "padding" in masks and kind == "Encoder":
                # torch's nested-tensor path gives zeros at padded positions, fastlm the
                # layer's output (docs/fidelity.md, "No inference fast path"): not compared
                at = pad if lkw["batch_first"] else pad.t()
                out = out.masked_fill(at.unsqueeze(-1), 0.0)
            return out
        return _grads(m(*args, **kw2), list(ts) + list(m.parameters()), seed + 3, dtype)

    _module_differential(
        run, fl_m, ref, inputs, backend, dtype,
        f"Transformer{kind}(d={d}, nhead={nhead}, {lkw}) {dtype} N={N} T={T} M={M} "
        f"masks={masks} train={training} no_grad={no_grad} backend={backend}")


def prop_module_state_and_copies(data):
    """state_dict both ways, deepcopy and pickle of the modules: fastlm's still run fastlm's
    forward (same class), with torch's values."""
    kind = data.draw(st.sampled_from(["LayerNorm", "MultiheadAttention", "EncoderLayer"]),
                     label="module")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    how = data.draw(st.sampled_from(["deepcopy", "pickle", "torch.save"]), label="copy")
    affine = data.draw(st.booleans(), label="affine")
    torch.manual_seed(seed)
    make = {"LayerNorm": lambda ns: ns.LayerNorm(6, elementwise_affine=affine),
            "MultiheadAttention": lambda ns: ns.MultiheadAttention(8, 2, batch_first=True),
            "EncoderLayer": lambda ns: ns.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                                  batch_first=True)}[kind]
    ref = make(torch.nn)
    fl_m = make(fastlm.nn)
    assert list(fl_m.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    fl_m.load_state_dict(ref.state_dict())
    back = make(torch.nn)
    back.load_state_dict(fl_m.state_dict())
    for a, b in zip(back.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    if how == "deepcopy":
        cp = copy.deepcopy(fl_m)
    elif how == "pickle":
        cp = pickle.loads(pickle.dumps(fl_m))
    else:
        buf = io.BytesIO()
        torch.save(fl_m, buf)
        buf.seek(0)
        cp = torch.load(buf, weights_only=False)
    assert type(cp) is type(fl_m)
    x = _values((2, 3, 8 if kind != "LayerNorm" else 6), F32, seed + 1)

    def out(m):
        o = m(x) if kind != "MultiheadAttention" else m(x, x, x)[0]
        return o.detach()

    for m in (ref, fl_m, cp):
        m.eval()
    o_ref = out(ref)
    o_f = out(fl_m)
    o_c = out(cp)
    assert torch.equal(o_f, o_c), f"{kind} {how}: the copy computes otherwise"
    o_oracle = (ref.double()(x.double()) if kind != "MultiheadAttention"
                else ref.double()(x.double(), x.double(), x.double())[0]).detach()
    assert_2x(o_f, o_oracle, o_ref, f"{kind} after state_dict round trip")


# Optimizers.
_OPT_DTYPES = [F32, F32, F64, torch.complex64, BF16]


def prop_optimizer(data):
    cls = data.draw(st.sampled_from(["Adam", "AdamW"]), label="class")
    n_groups = data.draw(st.integers(1, 3), label="groups")
    dtype = data.draw(st.sampled_from(_OPT_DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2**30), label="seed")
    lowp = dtype == BF16
    defaults = dict(lr=data.draw(st.sampled_from([1e-3, 0.05, "tensor"]), label="lr"),
                    betas=data.draw(st.sampled_from([(0.9, 0.999), (0.8, 0.95)]), label="betas"),
                    eps=data.draw(st.sampled_from([1e-8, 1e-3]), label="eps"),
                    weight_decay=data.draw(st.sampled_from([0.0, 0.1]), label="wd"),
                    amsgrad=data.draw(st.booleans(), label="amsgrad"),
                    maximize=data.draw(st.booleans(), label="maximize"))
    if cls == "Adam" and data.draw(st.booleans(), label="decoupled"):
        defaults["decoupled_weight_decay"] = True
    if defaults["lr"] == "tensor":
        if dtype in (F64, torch.complex128):
            defaults["lr"] = 0.02  # docs/fidelity.md: torch's float32 step size, fastlm's float64
        else:
            defaults["lr"] = torch.tensor(0.02)
    groups = []
    k = 0
    for gi in range(n_groups):
        n = data.draw(st.integers(0 if gi else 1, 3), label=f"group {gi} params")
        params = []
        for j in range(n):
            shape = data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3),
                              label=f"param {k} shape")
            val = _values(shape, dtype, seed + k)
            params.append(_laid_out(data, val, f"param {k}"))
            k += 1
        opts = {}
        if data.draw(st.booleans(), label=f"group {gi} options"):
            opts = {"lr": data.draw(st.sampled_from([0.01, 0.2])),
                    "weight_decay": data.draw(st.sampled_from([0.0, 0.3])),
                    "amsgrad": data.draw(st.booleans())}
        groups.append((params, opts))
    no_grad = set(data.draw(st.lists(st.integers(0, max(k - 1, 0)), max_size=2),
                            label="params without grad"))
    steps = data.draw(st.integers(1, 4), label="steps")
    copy_at = data.draw(st.sampled_from([None, "deepcopy", "pickle", "state_dict->torch",
                                         "state_dict<-torch"]), label="copy")
    # fastlm's max_grad_norm against torch.nn.utils.clip_grad_norm_ before torch's step
    # (not with bfloat16: torch's clip computes that norm in bfloat16)
    clip = None if lowp else data.draw(st.sampled_from([None, None, 0.5, 5.0]), label="clip")

    def make(opt_cls, torch_side):
        pgroups = []
        for params, opts in groups:
            # torch's fused CPU kernel (the twin of low-precision params) ignores a param's
            # strides (torch 2.14: a wrong update of a strided slice): its params contiguous
            ps = [torch.nn.Parameter(p.detach().contiguous()) if torch_side and lowp else
                  torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
                  if p.stride() == p.contiguous().stride() or p.dim() == 0 else
                  torch.nn.Parameter(_rebuild_view(p)) for p in params]
            pgroups.append({"params": ps, **opts})
        kw = {k_: (v.clone() if isinstance(v, torch.Tensor) else v) for k_, v in defaults.items()}
        if torch_side:
            kw["fused" if lowp else "foreach"] = True if lowp else False
        elif clip is not None:
            kw["max_grad_norm"] = clip
        return opt_cls(pgroups, **kw)

    fl_cls, t_cls = {"Adam": (fastlm.optim.Adam, torch.optim.Adam),
                     "AdamW": (fastlm.optim.AdamW, torch.optim.AdamW)}[cls]
    fl, t = make(fl_cls, False), make(t_cls, True)
    fl_ps = [p for g in fl.param_groups for p in g["params"]]
    t_ps = [p for g in t.param_groups for p in g["params"]]
    desc = (f"{cls}({defaults}) {dtype} groups={[(len(p), o) for p, o in groups]} "
            f"shapes={[tuple(p.shape) for p in fl_ps]} no_grad={sorted(no_grad)} steps={steps} "
            f"copy={copy_at} clip={clip}")
    for s in range(steps):
        for i, (a, b) in enumerate(zip(fl_ps, t_ps)):
            gr = None if i in no_grad else _values(a.shape, dtype, seed + 1000 * (s + 1) + i)
            a.grad = None if gr is None else gr.clone()
            b.grad = None if gr is None else gr.clone()
        if s == steps - 1 and copy_at is not None:
            fl, fl_ps, t, t_ps = _copied(copy_at, fl, fl_ps, t, t_ps, fl_cls, t_cls)
        fl.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in t_ps if p.grad is not None], clip)
        t.step()
    # (with clipping, float64: fastlm's clip coefficient is float32, docs/fidelity.md)
    tol = (dict(rtol=1e-12, atol=1e-12) if dtype == F64 and clip is None else
           dict(rtol=1e-6, atol=1e-7) if dtype == F64 else dict(rtol=1e-5, atol=1e-6))
    for i, (a, b) in enumerate(zip(fl_ps, t_ps)):
        if lowp:  # one ulp per step (test_optim.py's trajectory bound)
            tol = dict(rtol=steps * 2 ** -7, atol=steps * 1e-3)
        torch.testing.assert_close(a.detach(), b.detach(), **tol,
                                   msg=lambda m, i=i: f"{desc}: param {i}: {m}")
        sa, sb = fl.state.get(a, {}), t.state.get(b, {})
        assert set(sb) <= set(sa), f"{desc}: param {i} state keys {set(sa)} vs torch's {set(sb)}"
        for key in sb:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"{desc}: param {i} step"
                continue
            assert sa[key].dtype == sb[key].dtype, f"{desc}: param {i} {key} dtype"
            torch.testing.assert_close(sa[key], sb[key], **tol,
                                       msg=lambda m, i=i, key=key: f"{desc}: param {i} {key}: {m}")


def _rebuild_view(p):
    """A new non-dense view with p's values, shape and strides (a slice of a bigger base)."""
    base = torch.zeros(p.storage_offset() + sum((s - 1) * st_ for s, st_ in
                                                zip(p.shape, p.stride())) + 1, dtype=p.dtype)
    v = base.as_strided(p.shape, p.stride(), p.storage_offset())
    v.copy_(p.detach())
    return v


def _copied(how, fl, fl_ps, t, t_ps, fl_cls, t_cls):
    """The optimizers (and their params) after a copy / checkpoint round trip."""
    if how in ("deepcopy", "pickle"):
        grads = [p.grad for p in fl_ps]
        if how == "deepcopy":
            fl, fl_ps = copy.deepcopy((fl, fl_ps))
        else:
            fl, fl_ps = pickle.loads(pickle.dumps((fl, fl_ps)))
        for p, g in zip(fl_ps, grads):  # a copied Parameter has no .grad (torch's rule)
            p.grad = None if g is None else g.clone()
        return fl, fl_ps, t, t_ps
    if how == "state_dict->torch":  # fastlm's checkpoint continues in torch
        sd = copy.deepcopy(fl.state_dict())
        t2 = t_cls(t.param_groups, **_ctor_options(t))
        t2.load_state_dict(sd)
        for g in t2.param_groups:  # the groups came from fastlm (fused=None): torch's twin's
            g["fused"], g["foreach"] = t.defaults["fused"], t.defaults["foreach"]
        if t.defaults["fused"]:  # torch's fused CPU kernel ignores strides: contiguous state
            for st in t2.state.values():
                for key, val in st.items():
                    st[key] = val.contiguous() if val.dim() else val
        return fl, fl_ps, t2, t_ps
    sd = copy.deepcopy(t.state_dict())  # torch's checkpoint continues in fastlm
    fl2 = fl_cls(fl.param_groups, max_grad_norm=fl.max_grad_norm,
                 **{k: v for k, v in _ctor_options(fl).items() if k not in ("fused", "foreach")})
    fl2.load_state_dict(sd)
    return fl2, fl_ps, t, t_ps


def _ctor_options(opt):
    d = dict(opt.defaults)
    d.pop("master_weights", None)
    d.pop("differentiable", None)
    if isinstance(opt, (torch.optim.AdamW,)) or type(opt).__name__ == "AdamW":
        d.pop("decoupled_weight_decay", None)
    return d


PROPERTIES = [prop_layer_norm, prop_add_layer_norm, prop_sdpa, prop_varlen,
              prop_multihead_attention, prop_transformer, prop_module_state_and_copies,
              prop_optimizer]


def _run(prop, profile):
    given(st.data())(profile(lambda data: prop(data)))()


def _ci(prop):
    n = os.environ.get("FASTLM_FIDELITY_CI_EXAMPLES")
    n = int(n) if n else CI_EXAMPLES[prop.__name__[5:]]
    return settings(max_examples=n, derandomize=True, **_COMMON)


@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__[5:])
def test_ci_profile(prop):
    _run(prop, _ci(prop))


# The harness itself: a wrong result, a missing error and a wrong exception class are found.
def _broken(monkeypatch, name, wrapper):
    original = getattr(fastlm, name)
    monkeypatch.setattr(fastlm, name, wrapper(original))


@pytest.mark.parametrize("mutation", ["output off by 1e-3", "error swallowed", "wrong class"])
def test_harness_finds_a_mutation(monkeypatch, mutation):
    if mutation == "output off by 1e-3":
        _broken(monkeypatch, "scaled_dot_product_attention",
                lambda f: lambda *a, **k: f(*a, **k) * 1.001)
        prop = prop_sdpa
    elif mutation == "error swallowed":
        def lenient(f):
            def g(x, ns, *a, **k):
                try:
                    return f(x, ns, *a, **k)
                except RuntimeError:
                    return x.clone()
            return g
        _broken(monkeypatch, "layer_norm", lenient)
        prop = prop_layer_norm
    else:
        def wrong(f):
            def g(*a, **k):
                try:
                    return f(*a, **k)
                except RuntimeError as e:
                    raise LookupError(str(e)) from None
            return g
        _broken(monkeypatch, "layer_norm", wrong)
        prop = prop_layer_norm
    with pytest.raises(AssertionError):
        _run(prop, settings(max_examples=60, derandomize=True, phases=[Phase.generate],
                            **_COMMON))


@pytest.mark.ondemand
@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__[5:])
def test_long_profile(prop):
    """Random seeds for FASTLM_FIDELITY_MINUTES per property; every distinct failure is
    collected (with hypothesis's shrunk example) and reported at the end."""
    _LONG["on"] = True
    failures = {}
    runs = 0
    end = time.monotonic() + 60 * LONG_MINUTES
    try:
        while time.monotonic() < end:
            try:
                _run(prop, settings(max_examples=25, derandomize=False,
                                    phases=[Phase.generate, Phase.shrink], **_COMMON))
            except Exception as e:  # noqa: BLE001
                key = str(e).splitlines()[0][:160]
                notes = "\n".join(getattr(e, "__notes__", []))  # hypothesis's example
                failures.setdefault(key, f"{type(e).__name__}: {e}\n{notes}")
            runs += 25
    finally:
        _LONG["on"] = False
    print(f"\n{prop.__name__}: about {runs} examples in {LONG_MINUTES} min, "
          f"{len(failures)} distinct failures")
    assert not failures, "\n\n".join(failures.values())
