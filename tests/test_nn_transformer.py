"""fastlm.nn's Transformer modules are drop-in torch.nn ones: same constructors, defaults,
initialisation, state_dict and forward arguments; outputs and every gradient within the
tolerance rule of their torch twins loaded with the same state_dict (dropout 0), in training
and in eval; torch's inference fast path never bypasses fastlm's kernels; dropout trains
reproducibly; a model written against torch.nn switches with its import alone."""

import contextlib
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import (FLOOR, PAIRS, assert_close_2x, assert_close_2x_interpreter, interpreted,
                      param_floor)

D, H, FF = 12, 3, 20          # d_model, nhead (odd; head dim 4), dim_feedforward
N, L, S = 3, 6, 5             # batch, target / self-attention length, memory length
VOCAB = 11
CLASSES = ("TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer",
           "TransformerDecoder", "Transformer")
NESTED_WARNING = "enable_nested_tensor is True"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The shapes here are tiny: intra-op threads only add contention (10x slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Building twins: a torch module and the fastlm module loaded with its state_dict.
@contextlib.contextmanager
def _quiet():
    """torch.nn.TransformerEncoder (and Transformer) warn that nested tensors are off."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NESTED_WARNING)
        yield


def _randomize(module, seed=0):
    """Move every parameter off its initial value (MHA biases start at 0, norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))


def _build(nn, name, kw, layers=2, norm=True, device="cpu", nhead=H):
    """One of CLASSES from the namespace `nn` (torch.nn or fastlm.nn)."""
    kw = dict(kw, device=device)
    with _quiet():
        if name == "Transformer":
            return nn.Transformer(D, nhead, layers, layers, FF, **kw)
        if name.endswith("Layer"):
            return getattr(nn, name)(D, nhead, FF, **kw)
        layer = getattr(nn, name + "Layer")(D, nhead, FF, **kw)
        final = nn.LayerNorm(D, eps=kw.get("layer_norm_eps", 1e-5), bias=kw.get("bias", True),
                             device=device) if norm else None
        return getattr(nn, name)(layer, layers, norm=final)


def _twins(name, kw, **build):
    kw = dict({"dropout": 0.0}, **kw)
    torch.manual_seed(0)
    ref = _build(torch.nn, name, kw, **build)
    _randomize(ref)
    mod = _build(fastlm.nn, name, kw, **build)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


# ---------------------------------------------------------------------------------------------
# Running the three computations: fastlm float32, torch float32, torch float64 (the oracle).
def _to64(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _run(module, inputs, kwargs, dy_seed=7, params_of=None):
    """Forward and backward with a fixed upstream gradient; returns (out, input grads,
    {parameter name: grad}) (the parameters of `params_of`, by default of `module`)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = module(*leaves, **kwargs)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    out.backward(dy)
    params = (params_of or module).named_parameters()
    return out.detach(), [x.grad for x in leaves], {n: p.grad for n, p in params}


def compare(ref, mod, inputs, kwargs=None, train=True, backend=None, device="cpu"):
    """fastlm's output, input grads and every parameter grad against the float64 oracle,
    within 2x torch's float32 error plus the floor (DESIGN.md, Tests)."""
    kwargs = kwargs or {}
    oracle = copy.deepcopy(ref).double()
    for m in (ref, mod, oracle):
        m.train(train)
    ctx = fastlm.use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        out, dx, grads = _run(mod, inputs, kwargs)
    out_t, dx_t, grads_t = _run(ref, inputs, kwargs)
    out_o, dx_o, grads_o = _run(oracle, [x.double() for x in inputs],
                                {k: _to64(v) for k, v in kwargs.items()})
    check = assert_close_2x_interpreter if interpreted(backend, device) else assert_close_2x
    assert torch.isfinite(out_o).all(), "the oracle has a fully masked row: fix the test input"
    check(out, out_o, out_t, FLOOR[torch.float32], "output")
    for i, (g, g_t, g_o) in enumerate(zip(dx, dx_t, dx_o)):
        check(g, g_o, g_t, FLOOR[torch.float32], f"grad of input {i}")
    assert list(grads) == list(grads_t)
    rows = out.numel() // D
    for name in grads_t:
        assert grads[name] is not None and grads_t[name] is not None, name
        check(grads[name], grads_o[name], grads_t[name], param_floor(torch.float32, rows), name)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs and masks. Key 0 is never padded nor masked, so no query row is fully masked.
def _x(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _layout(t, batch_first):
    """(N, T, E) data -> the module's layout."""
    return t if batch_first else t.transpose(0, 1).contiguous()


def _bool_mask(q, k, *lead, seed=1):
    m = torch.rand(*lead, q, k, generator=torch.Generator().manual_seed(seed)) < 0.35
    m[..., 0] = False
    return m


def _float_mask(q, k, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.where(_bool_mask(q, k, seed=seed), float("-inf"),
                       -torch.rand(q, k, generator=g))


def _padding(n, k):
    """True = padding: sequence i has its last i keys padded (at most k - 1)."""
    pad = torch.zeros(n, k, dtype=torch.bool)
    for i in range(n):
        if i:
            pad[i, k - min(i, k - 1):] = True
    return pad


def _float_padding(n, k):
    return torch.zeros(n, k).masked_fill(_padding(n, k), float("-inf"))


def _causal(t):
    return torch.nn.Transformer.generate_square_subsequent_mask(t)


ENCODER_MASKS = {
    "none": lambda: {},
    "bool": lambda: {"src_mask": _bool_mask(L, L)},
    "float": lambda: {"src_mask": _float_mask(L, L)},
    "bool-3d": lambda: {"src_mask": _bool_mask(L, L, N * H)},
    "padding": lambda: {"src_key_padding_mask": _padding(N, L)},
    "float-padding": lambda: {"src_key_padding_mask": _float_padding(N, L)},
    "bool+padding": lambda: {"src_mask": _bool_mask(L, L), "src_key_padding_mask": _padding(N, L)},
    "causal": lambda: {"src_mask": _causal(L), "is_causal": True},
    "causal+padding": lambda: {"src_mask": _causal(L), "is_causal": True,
                               "src_key_padding_mask": _float_padding(N, L)},
}

LAYER_CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "norm_first": {"norm_first": True},
    "batch_first-norm_first": {"batch_first": True, "norm_first": True},
    "gelu": {"activation": "gelu"},
    "callable": {"activation": F.silu},
    "module-activation": {"activation": torch.nn.GELU(approximate="tanh")},
    "no-bias": {"bias": False},
    "eps": {"layer_norm_eps": 1e-3},
}


def _encoder_inputs(kw, masks):
    return [_layout(_x(N, L, D), kw.get("batch_first", False))], ENCODER_MASKS[masks]()


# ---------------------------------------------------------------------------------------------
# Interface: signatures, defaults, types, init, state_dict, repr.
def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", CLASSES)
def test_signatures_and_defaults_match_torch(name):
    ours, theirs = getattr(fastlm.nn, name), getattr(torch.nn, name)
    assert issubclass(ours, theirs)
    assert _params(ours.__init__) == _params(theirs.__init__)
    assert _params(ours.forward) == _params(theirs.forward)
    if "Layer" in name or name == "Transformer":
        p = inspect.signature(ours.__init__).parameters
        assert p["dropout"].default == 0.1 and p["activation"].default is F.relu
        assert p["layer_norm_eps"].default == 1e-5 and p["batch_first"].default is False
        assert p["norm_first"].default is False and p["bias"].default is True


def _fastlm_types_only(module):
    torch_twins = {getattr(torch.nn, n) for n in CLASSES + ("LayerNorm", "MultiheadAttention")}
    leftovers = [n for n, m in module.named_modules() if type(m) in torch_twins]
    assert not leftovers, f"torch modules left in a fastlm module: {leftovers}"


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_same_init_state_dict_and_repr_as_torch(name, batch_first):
    """Under one seed, fastlm builds the same parameters as torch with the same random draws
    (the generator ends in the same state); the submodules are fastlm's."""
    kw = {"batch_first": batch_first}
    torch.manual_seed(0)
    ref = _build(torch.nn, name, kw)
    after_ref = torch.rand(4)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no nested-tensor warning from fastlm
        mod = _build(fastlm.nn, name, kw)
    assert torch.equal(torch.rand(4), after_ref)
    assert type(mod) is getattr(fastlm.nn, name)
    _fastlm_types_only(mod)
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(mod.state_dict().items(), ref.state_dict().values()):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), k
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert repr(mod) == repr(ref)


def test_submodule_types():
    mod = fastlm.nn.Transformer(D, H, 2, 1, FF)
    assert isinstance(mod.encoder, fastlm.nn.TransformerEncoder)
    assert isinstance(mod.decoder, fastlm.nn.TransformerDecoder)
    assert type(mod.encoder.norm) is fastlm.nn.LayerNorm
    assert type(mod.decoder.norm) is fastlm.nn.LayerNorm
    for layer in mod.encoder.layers:
        assert type(layer) is fastlm.nn.TransformerEncoderLayer
        assert type(layer.self_attn) is fastlm.nn.MultiheadAttention
        assert type(layer.norm1) is type(layer.norm2) is fastlm.nn.LayerNorm
    layer = mod.decoder.layers[0]
    assert type(layer) is fastlm.nn.TransformerDecoderLayer
    assert type(layer.self_attn) is type(layer.multihead_attn) is fastlm.nn.MultiheadAttention
    assert type(layer.norm1) is type(layer.norm2) is type(layer.norm3) is fastlm.nn.LayerNorm
    assert mod.encoder.use_nested_tensor is False and mod.encoder.enable_nested_tensor is True
    assert mod.encoder.layers[0] is not mod.encoder.layers[1]


def test_torch_layer_given_to_fastlm_stack_becomes_fastlm():
    """TransformerEncoder/Decoder copy the layer they are given; the copies of a torch layer
    are fastlm layers, and a torch norm is re-classed in place (torch keeps that object)."""
    layer = torch.nn.TransformerEncoderLayer(D, H, FF)
    norm = torch.nn.LayerNorm(D)
    enc = fastlm.nn.TransformerEncoder(layer, 2, norm=norm)
    assert type(layer) is torch.nn.TransformerEncoderLayer  # the given layer is untouched
    assert type(layer.self_attn) is torch.nn.MultiheadAttention
    assert enc.norm is norm and type(norm) is fastlm.nn.LayerNorm
    _fastlm_types_only(enc)
    dec = fastlm.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, H, FF), 2)
    _fastlm_types_only(dec)
    assert dec.norm is None


def test_custom_encoder_and_decoder_used_as_given():
    enc = fastlm.nn.TransformerEncoder(fastlm.nn.TransformerEncoderLayer(D, H, FF), 1)
    dec = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, H, FF), 1)
    mod = fastlm.nn.Transformer(D, H, custom_encoder=enc, custom_decoder=dec)
    assert mod.encoder is enc and mod.decoder is dec
    assert type(dec) is torch.nn.TransformerDecoder  # as torch: fastlm.patch converts it


def test_device_and_dtype_arguments():
    mod = fastlm.nn.Transformer(D, H, 1, 1, FF, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in mod.parameters())
    _fastlm_types_only(mod)


@pytest.mark.parametrize("name", CLASSES)
def test_load_state_dict_both_ways(name):
    torch.manual_seed(0)
    ref = _build(torch.nn, name, {})
    _randomize(ref)
    mod = _build(fastlm.nn, name, {})
    mod.load_state_dict(ref.state_dict())
    for a, b in zip(mod.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    _randomize(mod, seed=5)
    back = _build(torch.nn, name, {})
    back.load_state_dict(mod.state_dict())
    for a, b in zip(back.state_dict().values(), mod.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation,code", [("relu", 1), (F.relu, 1), ("gelu", 2),
                                             (torch.nn.GELU(), 2), (F.silu, 0)])
def test_activation_attributes_as_torch(activation, code):
    mod = fastlm.nn.TransformerEncoderLayer(D, H, activation=activation)
    ref = torch.nn.TransformerEncoderLayer(D, H, activation=activation)
    assert mod.activation_relu_or_gelu == ref.activation_relu_or_gelu == code
    assert mod.activation is ref.activation or type(mod.activation) is type(ref.activation)


# ---------------------------------------------------------------------------------------------
# Outputs and gradients against the torch twins.
@pytest.mark.parametrize("masks", list(ENCODER_MASKS))
@pytest.mark.parametrize("config", list(LAYER_CONFIGS))
def test_encoder_layer_matches_torch(config, masks):
    kw = LAYER_CONFIGS[config]
    ref, mod = _twins("TransformerEncoderLayer", kw)
    inputs, kwargs = _encoder_inputs(kw, masks)
    compare(ref, mod, inputs, kwargs)


@pytest.mark.parametrize("masks", ["none", "bool+padding", "causal+padding", "float"])
@pytest.mark.parametrize("config", ["default", "batch_first-norm_first", "gelu"])
def test_encoder_layer_matches_torch_in_eval(config, masks):
    kw = LAYER_CONFIGS[config]
    ref, mod = _twins("TransformerEncoderLayer", kw)
    inputs, kwargs = _encoder_inputs(kw, masks)
    compare(ref, mod, inputs, kwargs, train=False)


@pytest.mark.parametrize("kw", [{}, {"batch_first": True, "norm_first": True}], ids=str)
def test_encoder_layer_unbatched_and_tiny(kw):
    ref, mod = _twins("TransformerEncoderLayer", kw)
    compare(ref, mod, [_x(L, D)], {"src_mask": _bool_mask(L, L),
                                  "src_key_padding_mask": _padding(2, L)[1]})
    compare(ref, mod, [_layout(_x(1, 1, D), kw.get("batch_first", False))],
            {"src_mask": _causal(1), "is_causal": True})


def _decoder_inputs(kw, masks):
    bf = kw.get("batch_first", False)
    inputs = [_layout(_x(N, L, D), bf), _layout(_x(N, S, D, seed=3), bf)]
    return inputs, DECODER_MASKS[masks]()


DECODER_MASKS = {
    "none": lambda: {},
    "causal": lambda: {"tgt_mask": _causal(L), "tgt_is_causal": True},
    "bool": lambda: {"tgt_mask": _bool_mask(L, L), "memory_mask": _bool_mask(L, S, seed=4)},
    "float": lambda: {"tgt_mask": _float_mask(L, L), "memory_mask": _float_mask(L, S, seed=5)},
    "padding": lambda: {"tgt_key_padding_mask": _padding(N, L),
                        "memory_key_padding_mask": _padding(N, S)},
    "all": lambda: {"tgt_mask": _causal(L), "memory_mask": _float_mask(L, S, seed=6),
                    "tgt_key_padding_mask": _float_padding(N, L),
                    "memory_key_padding_mask": _float_padding(N, S), "tgt_is_causal": True},
    "memory-causal": lambda: {"memory_mask": _bool_mask(L, S), "memory_is_causal": True},
}


@pytest.mark.parametrize("masks", list(DECODER_MASKS))
@pytest.mark.parametrize("config", ["default", "batch_first", "norm_first", "gelu", "callable",
                                    "no-bias"])
def test_decoder_layer_matches_torch(config, masks):
    kw = LAYER_CONFIGS[config]
    ref, mod = _twins("TransformerDecoderLayer", kw)
    inputs, kwargs = _decoder_inputs(kw, masks)
    compare(ref, mod, inputs, kwargs)


@pytest.mark.parametrize("masks", ["none", "all"])
def test_decoder_layer_matches_torch_in_eval(masks):
    kw = {"batch_first": True}
    ref, mod = _twins("TransformerDecoderLayer", kw)
    inputs, kwargs = _decoder_inputs(kw, masks)
    compare(ref, mod, inputs, kwargs, train=False)


STACK_MASKS = {
    "none": lambda: {},
    "padding": lambda: {"src_key_padding_mask": _padding(N, L)},
    "detected-causal": lambda: {"mask": _causal(L)},  # is_causal=None: torch detects it
    "detected-causal-bool": lambda: {"mask": torch.ones(L, L, dtype=torch.bool).triu(1)},
    "causal-hint": lambda: {"mask": _causal(L), "is_causal": True},
    "bool+padding": lambda: {"mask": _bool_mask(L, L), "src_key_padding_mask": _padding(N, L)},
    "float+padding": lambda: {"mask": _float_mask(L, L),
                              "src_key_padding_mask": _float_padding(N, L)},
}
STACK_CONFIGS = {"default": {}, "batch_first-norm_first": {"batch_first": True,
                                                           "norm_first": True},
                 "gelu-no-bias": {"activation": "gelu", "bias": False}}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masks", list(STACK_MASKS))
@pytest.mark.parametrize("config", list(STACK_CONFIGS))
def test_encoder_matches_torch(config, masks, train):
    kw = STACK_CONFIGS[config]
    ref, mod = _twins("TransformerEncoder", kw)
    inputs = [_layout(_x(N, L, D), kw.get("batch_first", False))]
    compare(ref, mod, inputs, STACK_MASKS[masks](), train=train)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("masks", ["none", "all", "bool"])
@pytest.mark.parametrize("config", list(STACK_CONFIGS))
def test_decoder_matches_torch(config, masks, norm):
    kw = STACK_CONFIGS[config]
    ref, mod = _twins("TransformerDecoder", kw, norm=norm)
    inputs, kwargs = _decoder_inputs(kw, masks)
    if masks == "all":
        kwargs.pop("tgt_is_causal")  # the decoder detects the causal tgt_mask itself
    compare(ref, mod, inputs, kwargs)


@pytest.mark.parametrize("name", ["TransformerEncoder", "TransformerDecoder"])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_causal_mask_detected(name, kind):
    """With is_causal / tgt_is_causal None, a causal mask reaches the attention as the
    is_causal hint (so the kernel can run causal); torch's decoder misses bool ones."""
    ref, mod = _twins(name, {})
    mask = _causal(L) if kind == "float" else torch.ones(L, L, dtype=torch.bool).triu(1)
    hints = []
    mod.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: hints.append(kwargs["is_causal"]), with_kwargs=True)
    if name == "TransformerEncoder":
        compare(ref, mod, [_x(L, N, D)], {"mask": mask})
    else:
        compare(ref, mod, [_x(L, N, D), _x(S, N, D, seed=3)], {"tgt_mask": mask})
    assert hints == [True]


TRANSFORMER_MASKS = {
    "none": lambda: {},
    "causal": lambda: {"tgt_mask": _causal(L), "tgt_is_causal": True},
    "all": lambda: {"src_mask": _bool_mask(S, S), "tgt_mask": _causal(L),
                    "memory_mask": _bool_mask(L, S, seed=8),
                    "src_key_padding_mask": _padding(N, S),
                    "tgt_key_padding_mask": _float_padding(N, L),
                    "memory_key_padding_mask": _padding(N, S)},
    "float": lambda: {"src_mask": _float_mask(S, S), "tgt_mask": _float_mask(L, L, seed=9),
                      "src_key_padding_mask": _float_padding(N, S),
                      "memory_key_padding_mask": _float_padding(N, S)},
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masks", list(TRANSFORMER_MASKS))
@pytest.mark.parametrize("config", ["default", "batch_first-norm_first", "gelu", "no-bias"])
def test_transformer_matches_torch(config, masks, train):
    kw = LAYER_CONFIGS[config]
    ref, mod = _twins("Transformer", kw)
    bf = kw.get("batch_first", False)
    inputs = [_layout(_x(N, S, D), bf), _layout(_x(N, L, D, seed=4), bf)]
    compare(ref, mod, inputs, TRANSFORMER_MASKS[masks](), train=train)


def _backend_pairs():
    """PAIRS, minus the C++ cpu backend while this build has no CPU attention kernel (forcing
    it raises BackendUnavailable, as it should; the default choice still runs the layers)."""
    from fastlm.ops.attention import _has_kernel

    no_cpu = pytest.mark.skipif(not _has_kernel("cpu"),
                                reason="this build of fastlm._C has no CPU attention kernel")
    return [pytest.param(*p.values, marks=list(p.marks) + ([no_cpu] if p.values == ("cpu", "cpu")
                                                           else []), id=p.id)
            for p in PAIRS]


@pytest.mark.parametrize("backend,device", _backend_pairs())
def test_layers_match_torch_on_every_backend(backend, device):
    kw = {"batch_first": True}
    ref, mod = _twins("TransformerEncoderLayer", kw, device=device)
    inputs = [_x(N, L, D).to(device)]
    kwargs = {"src_mask": _bool_mask(L, L).to(device),
              "src_key_padding_mask": _padding(N, L).to(device)}
    compare(ref, mod, inputs, kwargs, backend=backend, device=device)
    ref, mod = _twins("TransformerDecoderLayer", kw, device=device)
    inputs, kwargs = _decoder_inputs(kw, "all")
    compare(ref, mod, [x.to(device) for x in inputs], {k: v.to(device) if
                                                       isinstance(v, torch.Tensor) else v
                                                       for k, v in kwargs.items()},
            backend=backend, device=device)


def test_bfloat16_within_the_rule():
    """bfloat16 modules (parameters and activations): the rule against the float64 oracle
    with torch's bfloat16 module as the low-precision reference."""
    ref, mod = _twins("TransformerEncoderLayer", {"batch_first": True})
    oracle = copy.deepcopy(ref).double()
    ref, mod = ref.bfloat16(), mod.bfloat16()
    x = _x(N, L, D).bfloat16()
    kwargs = {"src_key_padding_mask": _padding(N, L)}
    out, dx, grads = _run(mod, [x], kwargs)
    out_t, dx_t, grads_t = _run(ref, [x], kwargs)
    out_o, dx_o, grads_o = _run(oracle, [x.double()], kwargs)
    assert_close_2x(out, out_o, out_t, FLOOR[torch.bfloat16], "output")
    assert_close_2x(dx[0], dx_o[0], dx_t[0], FLOOR[torch.bfloat16], "grad of input")
    for name in grads_t:
        assert_close_2x(grads[name], grads_o[name], grads_t[name],
                        param_floor(torch.bfloat16, N * L), name)


# ---------------------------------------------------------------------------------------------
# torch's inference fast path never bypasses fastlm's kernels.
def _forbid_torch_fast_paths(monkeypatch):
    def forbidden(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"torch.{name} was called: torch's fast path bypassed fastlm")
        return fn

    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
                 "_nested_tensor_from_mask"):
        monkeypatch.setattr(torch, name, forbidden(name))


def _count_fastlm_calls(module):
    counts = {"attention": 0, "layer_norm": 0}

    def hook(kind):
        def fn(*_):
            counts[kind] += 1
        return fn

    for m in module.modules():
        if isinstance(m, fastlm.nn.MultiheadAttention):
            m.register_forward_hook(hook("attention"))
        elif isinstance(m, fastlm.nn.LayerNorm):
            m.register_forward_hook(hook("layer_norm"))
    return counts


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_torch_takes_its_fast_path_under_these_conditions(monkeypatch):
    """The premise of the next test: torch's own modules call their fused inference kernels
    here (batch_first, eval, no grad, a padding mask, an even number of heads)."""
    ref = _build(torch.nn, "TransformerEncoder", {"batch_first": True}, nhead=2)
    ref.eval()
    calls = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ref(_x(N, L, D), src_key_padding_mask=_padding(N, L))
    assert len(calls) == 2


@pytest.mark.parametrize("name", CLASSES)
def test_eval_no_grad_runs_fastlm_kernels(name, monkeypatch):
    """In eval under no_grad / inference_mode, where torch's layers switch to
    torch._transformer_encoder_layer_fwd and nested tensors, fastlm's run the same
    computation as in training, on fastlm's modules; the result is torch's slow path."""
    ref, mod = _twins(name, {"batch_first": True}, nhead=2)
    ref.eval()
    mod.eval()
    x = _x(N, L, D)
    if name.startswith("TransformerEncoder"):
        mask_kw = {"src_key_padding_mask": _padding(N, L)}
        args = (x,)
    else:
        mem = _x(N, S, D, seed=3)
        mask_kw = {"memory_key_padding_mask": _padding(N, S)}
        args = (mem, x) if name == "Transformer" else (x, mem)
        if name == "Transformer":
            mask_kw = {"src_key_padding_mask": _padding(N, S),
                       "memory_key_padding_mask": _padding(N, S)}
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            want = ref(*args, **mask_kw)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    counts = _count_fastlm_calls(mod)
    _forbid_torch_fast_paths(monkeypatch)
    for ctx in (torch.no_grad(), torch.inference_mode()):
        with ctx:
            got = mod(*args, **mask_kw)
        assert not got.is_nested
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts["attention"] > 0 and counts["layer_norm"] > 0


# ---------------------------------------------------------------------------------------------
# The layers fuse each residual add + dropout + LayerNorm (fastlm.add_layer_norm), unless that
# would skip user code: hooks on the norms or dropouts, or overridden blocks.
def _count_add_layer_norm(monkeypatch):
    import fastlm.ops.add_layer_norm as aln

    calls = []
    real = aln.add_layer_norm
    monkeypatch.setattr(aln, "add_layer_norm", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("layer,fused", [("TransformerEncoderLayer", 2),
                                         ("TransformerDecoderLayer", 3)])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_fuse_residual_dropout_and_norm(monkeypatch, layer, fused, norm_first):
    """Every residual add + dropout + LayerNorm of the layer is one fused call (norm_first:
    one fewer, the last residual add has no norm after it); results as torch's (compared to
    the float64 oracle within the tolerance rule)."""
    ref, mod = _twins(layer, {"batch_first": True, "norm_first": norm_first})
    calls = _count_add_layer_norm(monkeypatch)
    inputs = [_x(N, L, D)] if layer == "TransformerEncoderLayer" else [_x(N, L, D),
                                                                         _x(N, S, D, seed=3)]
    compare(ref, mod, inputs, {})
    per_call = fused - 1 if norm_first else fused
    assert len(calls) > 0 and len(calls) % per_call == 0


def test_hooks_and_overridden_blocks_keep_the_unfused_path(monkeypatch):
    calls = _count_add_layer_norm(monkeypatch)
    torch.manual_seed(0)
    mod = fastlm.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
    seen = []
    mod.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    mod(_x(N, L, D))
    assert calls == [] and seen == [(N, L, D)]          # the hook ran: norm1 was called

    class Custom(fastlm.nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return 0.5 * super()._ff_block(x)

    torch.manual_seed(0)
    custom = Custom(D, H, FF, dropout=0.0, batch_first=True)
    plain = fastlm.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
    plain.load_state_dict(custom.state_dict())
    x = _x(N, L, D)
    y = custom(x)
    assert calls == []                                  # the override ran, unfused
    h = plain.norm1(x + plain._sa_block(x, None, None))
    manual = plain.norm2(h + 0.5 * plain._ff_block(h))
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)


def test_fused_dropout_rate():
    """The fused dropout the layers use drops about p of the branch's entries (seen through
    summed = residual + drop(branch) with a zero residual) and scales the rest by 1/(1-p)."""
    import fastlm.ops.add_layer_norm as aln

    torch.manual_seed(0)
    a = torch.randn(64, 256) + 1.0
    x = torch.zeros(64, 256)
    _, summed = aln.add_layer_norm(a, x, (256,), None, None, 1e-5, 0.25)
    dropped = (summed == 0).float().mean().item()
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / a.numel()) ** 0.5
    kept = summed != 0
    torch.testing.assert_close(summed[kept], a[kept] / 0.75)


@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "TransformerEncoder"])
def test_mismatched_mask_types_warn_as_torch_and_match(name):
    """A bool src_key_padding_mask with a float mask: torch's deprecation warning, and the
    same result (both made float)."""
    ref, mod = _twins(name, {})
    key = "src_mask" if name.endswith("Layer") else "mask"
    kwargs = {key: _float_mask(L, L), "src_key_padding_mask": _padding(N, L)}
    pattern = f"Support for mismatched src_key_padding_mask and {key} is deprecated"
    with pytest.warns(UserWarning, match=pattern):
        ref(_x(L, N, D), **kwargs)
    with pytest.warns(UserWarning, match=pattern):
        compare(ref, mod, [_x(L, N, D)], kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_src_with_a_mask_is_refused():
    mod = fastlm.nn.TransformerEncoderLayer(D, H, FF, batch_first=True).eval()
    nt = torch.nested.nested_tensor([_x(3, D), _x(5, D)])
    with pytest.raises(NotImplementedError, match="neither src_mask nor src_key_padding_mask "
                                                  "is supported with a nested src"):
        with torch.no_grad():
            mod(nt, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="nested src needs batch_first=True"):
        fastlm.nn.TransformerEncoderLayer(D, H, FF)(nt)
    stack = fastlm.nn.TransformerEncoder(mod, 1)
    with pytest.raises(NotImplementedError, match="fastlm.nn.TransformerEncoder: src is a "
                                                  "nested tensor"):
        stack(nt)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_fastlm_layers_in_a_torch_encoder_in_inference(monkeypatch):
    """torch.nn.TransformerEncoder holding fastlm layers (only the layer import changed):
    on its inference fast path torch's encoder hands nested tensors to the layers; fastlm's
    run them padded on fastlm's modules, with torch's result."""
    ref, mod = _twins("TransformerEncoderLayer", {"batch_first": True}, nhead=2)
    with _quiet():
        torch_stack = torch.nn.TransformerEncoder(ref, 2).eval()
        mixed = torch.nn.TransformerEncoder(mod, 2).eval()
    assert type(mixed.layers[0]) is fastlm.nn.TransformerEncoderLayer
    x, pad = _x(N, L, D), _padding(N, L)
    with torch.no_grad():
        want = torch_stack(x, src_key_padding_mask=pad)
    counts = _count_fastlm_calls(mixed)
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        monkeypatch.setattr(torch, name, None)  # calling either would fail
    with torch.no_grad():
        got = mixed(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts["attention"] == 2 and counts["layer_norm"] == 4


@pytest.mark.parametrize("padding", ["bool", "float"])
def test_fully_padded_sequence_gives_finite_output(padding):
    """fastlm.scaled_dot_product_attention gives zeros (and zero gradients) for a query row
    that may attend to no key (torch's CPU kernels give zeros too; some of its CUDA kernels
    give NaN), so a fully padded sequence stays finite in the output and the gradients."""
    ref, mod = _twins("TransformerEncoderLayer", {"batch_first": True})
    pad = _padding(N, L)
    pad[1] = True
    if padding == "float":
        pad = torch.zeros(N, L).masked_fill(pad, float("-inf"))
    x = _x(N, L, D).requires_grad_()
    want = ref(x, src_key_padding_mask=pad)
    got = mod(x, src_key_padding_mask=pad)
    assert torch.isfinite(got).all()
    finite = torch.isfinite(want).flatten(1).all(1)
    assert finite[0] and finite[2]
    torch.testing.assert_close(got[finite], want[finite].detach(), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters())


# ---------------------------------------------------------------------------------------------
# Dropout: trains, reproducibly under torch.manual_seed.
def _train_losses(seed, steps=4, name="TransformerEncoderLayer"):
    torch.manual_seed(seed)
    mod = _build(fastlm.nn, name, {"batch_first": True})  # default dropout 0.1
    assert all(m.p == 0.1 for m in mod.modules() if isinstance(m, torch.nn.Dropout))
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    x = _x(N, L, D)
    target = _x(N, L, D, seed=9)
    args = (x,) if "Encoder" in name else (_x(N, S, D, seed=3), x)  # Transformer(src, tgt)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(mod(*args, **({"src_key_padding_mask": _padding(N, L)}
                                        if "Encoder" in name else {})), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    mod.eval()
    with torch.no_grad():
        final = F.mse_loss(mod(*args), target).item()
    return losses, final


@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "Transformer"])
def test_dropout_trains_reproducibly(name):
    a, final_a = _train_losses(0, name=name)
    b, final_b = _train_losses(0, name=name)
    c, _ = _train_losses(1, name=name)
    assert a == b and final_a == final_b          # bit-identical under the same seed
    assert a != c                                 # and the seed matters
    assert a[-1] < a[0]


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    mod = fastlm.nn.TransformerEncoderLayer(D, H, FF, dropout=0.5, batch_first=True)
    x = _x(N, L, D)
    torch.manual_seed(1)
    y1 = mod(x)
    torch.manual_seed(2)
    y2 = mod(x)
    assert not torch.allclose(y1, y2)
    mod.eval()
    torch.testing.assert_close(mod(x), mod(x), atol=0, rtol=0)
    ref = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.5, batch_first=True).eval()
    ref.load_state_dict(mod.state_dict())
    torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# "Changing the import is enough": models written against `nn`, built from torch.nn and from
# fastlm.nn (whose other names are torch.nn's).
def build_encoder_lm(nn, dropout=0.0):
    class EncoderLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            layer = nn.TransformerEncoderLayer(D, H, FF, dropout=dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(D))
            self.head = nn.Linear(D, VOCAB)

        def forward(self, tokens, padding=None):
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            h = self.encoder(self.emb(tokens), mask=mask, src_key_padding_mask=padding,
                             is_causal=True)
            return self.head(h)

    return EncoderLM()


def build_seq2seq(nn, dropout=0.0):
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_emb = nn.Embedding(VOCAB, D)
            self.tgt_emb = nn.Embedding(VOCAB, D)
            self.transformer = nn.Transformer(D, H, 2, 2, FF, dropout=dropout,
                                              batch_first=True)
            self.head = nn.Linear(D, VOCAB)

        def forward(self, src, tgt, src_padding=None, tgt_padding=None):
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            h = self.transformer(self.src_emb(src), self.tgt_emb(tgt), tgt_mask=mask,
                                 src_key_padding_mask=src_padding,
                                 tgt_key_padding_mask=tgt_padding,
                                 memory_key_padding_mask=src_padding, tgt_is_causal=True)
            return self.head(h)

    return Seq2Seq()


def _tokens(n, t, seed):
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


LM_CASES = {  # float padding masks: the causal masks are float (no mismatch warning)
    "encoder-lm": (build_encoder_lm,
                   lambda: ((_tokens(N, L, 0), _float_padding(N, L)), _tokens(N, L, 1))),
    "seq2seq": (build_seq2seq,
                lambda: ((_tokens(N, S, 0), _tokens(N, L, 2), _float_padding(N, S),
                          _float_padding(N, L)), _tokens(N, L, 1))),
}


def _loss_and_grads(model, args, target):
    logits = model(*args)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_loss_and_grads(model, ref, args, target):
    oracle = copy.deepcopy(ref).double()
    loss, grads = _loss_and_grads(model, args, target)
    loss_t, grads_t = _loss_and_grads(ref, args, target)
    loss_o, grads_o = _loss_and_grads(oracle, args, target)
    assert_close_2x(loss, loss_o, loss_t, FLOOR[torch.float32], "loss")
    assert list(grads) == list(grads_t)
    rows = target.numel()
    for name in grads_t:
        assert_close_2x(grads[name], grads_o[name], grads_t[name],
                        param_floor(torch.float32, rows), name)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_changing_the_import_is_enough(case):
    build, data = LM_CASES[case]
    torch.manual_seed(0)
    with _quiet():
        ref = build(torch.nn)
    torch.manual_seed(0)
    model = build(fastlm.nn)
    _fastlm_types_only(model)
    # The same seed builds the same model; the state_dicts are interchangeable anyway.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    _randomize(ref)
    model.load_state_dict(ref.state_dict())
    args, target = data()
    assert_same_loss_and_grads(model, ref, args, target)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_model_trains_with_default_dropout_reproducibly(case):
    build, data = LM_CASES[case]
    args, target = data()

    def train(seed):
        torch.manual_seed(seed)
        model = build(fastlm.nn, dropout=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            loss = F.cross_entropy(model(*args).flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    a, b = train(0), train(0)
    assert a == b
    assert a[-1] < a[0]


# ---------------------------------------------------------------------------------------------
# Bad input: the error type and message of torch.
def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the error is the result)
        return e
    raise AssertionError("no error raised")


def _same_error(build_or_call, pattern):
    """Runs the call with torch.nn and with fastlm.nn; both raise the same type and message,
    which matches `pattern`."""
    want = _raised(lambda: build_or_call(torch.nn))
    got = _raised(lambda: build_or_call(fastlm.nn))
    assert type(got) is type(want), (got, want)
    assert str(got) == str(want)
    assert pytest.raises(type(want), lambda: build_or_call(fastlm.nn)).match(pattern)
    return got


@pytest.mark.parametrize("name", CLASSES)
def test_d_model_not_divisible_by_nhead(name):
    def build(nn):
        with _quiet():
            if name == "Transformer":
                return nn.Transformer(d_model=10, nhead=3)
            layer = getattr(nn, name.removesuffix("Layer") + "Layer")(10, 3)
            return layer if name.endswith("Layer") else getattr(nn, name)(layer, 2)

    err = _same_error(build, "embed_dim must be divisible by num_heads")
    assert isinstance(err, AssertionError)


def _enc(nn, bf=False):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=bf)


BAD_ENCODER_CALLS = {
    "2d-mask-shape": (lambda: {"src_mask": torch.zeros(L, L + 1, dtype=torch.bool)},
                      RuntimeError, r"The shape of the 2D attn_mask is torch.Size\(\[6, 7\]\), "
                                    r"but should be \(6, 6\)\."),
    "3d-mask-shape": (lambda: {"src_mask": torch.zeros(5, L, L, dtype=torch.bool)},
                      RuntimeError, r"The shape of the 3D attn_mask is torch.Size\(\[5, 6, 6\]\)"
                                    r", but should be \(9, 6, 6\)\."),
    "padding-length": (lambda: {"src_key_padding_mask": torch.zeros(N, L + 1, dtype=torch.bool)},
                       AssertionError, r"Expected key_padded_mask.shape\[1\] to be 6, but got 7"),
    "padding-batch": (lambda: {"src_key_padding_mask": torch.zeros(N + 1, L, dtype=torch.bool)},
                      AssertionError, r"Expected key_padded_mask.shape\[0\] to be 3, but got 4"),
    "int-mask": (lambda: {"src_mask": torch.zeros(L, L, dtype=torch.int64)},
                 AssertionError, "only bool and floating types of src_mask are supported"),
}


@pytest.mark.parametrize("case", list(BAD_ENCODER_CALLS))
def test_bad_masks_raise_as_torch(case):
    kwargs, etype, pattern = BAD_ENCODER_CALLS[case]
    err = _same_error(lambda nn: _enc(nn)(_x(L, N, D), **kwargs()), pattern)
    assert type(err) is etype


def test_encoder_stack_bad_mask_raises_as_torch():
    def call(nn):
        with _quiet():
            enc = nn.TransformerEncoder(_enc(nn), 2)
        return enc(_x(L, N, D), mask=torch.zeros(L + 1, L + 1))

    _same_error(call, r"The shape of the 2D attn_mask is torch.Size\(\[7, 7\]\), but should be "
                      r"\(6, 6\)\.")


def test_bad_activation_raises_as_torch():
    _same_error(lambda nn: nn.TransformerEncoderLayer(D, H, activation="tanh"),
                "activation should be relu/gelu, not tanh")


@pytest.mark.parametrize("src,tgt,pattern", [
    ((S, N, D), (L, N + 1, D), "the batch number of src and tgt must be equal"),
    ((S, N, D), (L, N, D + 1), "the feature number of src and tgt must be equal to d_model"),
])
def test_transformer_bad_shapes_raise_as_torch(src, tgt, pattern):
    def call(nn):
        with _quiet():
            model = nn.Transformer(D, H, 1, 1, FF)
        return model(_x(*src), _x(*tgt))

    _same_error(call, pattern)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, outputs and grads as in eager.
@pytest.mark.parametrize("name,backend", [
    ("TransformerEncoderLayer", "torch"),
    ("TransformerDecoderLayer", "torch"),
    pytest.param("TransformerEncoderLayer", None, id="TransformerEncoderLayer-default"),
])
def test_compile_fullgraph_training(name, backend):
    """Training mode, dropout 0, masks: one graph (fullgraph=True), outputs and every grad as
    in eager."""
    kw = {"batch_first": True, "norm_first": name == "TransformerDecoderLayer",
          "activation": "gelu"}
    _, mod = _twins(name, kw)
    mod.train()
    compiled_mod = copy.deepcopy(mod)
    if name == "TransformerEncoderLayer":
        inputs = [_x(N, L, D)]
        kwargs = {"src_mask": _bool_mask(L, L), "src_key_padding_mask": _padding(N, L)}
    else:
        inputs, kwargs = _decoder_inputs(kw, "all")
    torch._dynamo.reset()
    compiled = torch.compile(compiled_mod, backend="aot_eager", fullgraph=True)
    with fastlm.use_backend(backend):
        out_e, dx_e, grads_e = _run(mod, inputs, kwargs)
        out_c, dx_c, grads_c = _run(compiled, inputs, kwargs, params_of=compiled_mod)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for a, b in zip(dx_c, dx_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], atol=1e-5, rtol=1e-5, msg=n)
