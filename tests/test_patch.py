"""fastlm.patch(model) replaces, in place, the torch.nn LayerNorm, MultiheadAttention and
Transformer modules of any model with fastlm's: the same module objects re-classed, so the
same Parameter objects (an optimizer built before keeps working), device, dtype, training mode,
hooks and state_dict; it returns what it replaced, leaves kinds out on request, leaves fastlm
modules and user subclasses alone, and is idempotent."""

import copy
import io
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import FLOOR, assert_close_2x, param_floor

D, H, FF, VOCAB = 12, 3, 20, 11
N, L = 3, 6
TORCH = "torch.nn."
FASTLM = "fastlm.nn."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(torch.nn.Module):
    """A model written against torch.nn with every kind fastlm.patch knows, nested in
    containers, plus modules it must leave alone."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.ln = torch.nn.LayerNorm(D)
        self.attn = torch.nn.MultiheadAttention(D, H, batch_first=True)
        self.blocks = torch.nn.ModuleList([
            torch.nn.TransformerEncoderLayer(D, H, FF, dropout=dropout, batch_first=True)
            for _ in range(2)])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.seq2seq = torch.nn.Transformer(D, H, 1, 1, FF, dropout=dropout,
                                                batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(D, bias=False),
                                        torch.nn.Linear(D, VOCAB))

    def forward(self, tokens, padding):
        x = self.ln(self.emb(tokens))
        a, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        x = x + a
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = self.seq2seq(x, x, tgt_mask=mask, src_key_padding_mask=padding,
                         memory_key_padding_mask=padding)
        return self.head(x)


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    net = Net(**kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return net


def _data():
    tokens = torch.randint(VOCAB, (N, L), generator=torch.Generator().manual_seed(3))
    target = torch.randint(VOCAB, (N, L), generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -2:] = True
    padding[2, -1:] = True
    return tokens, padding, target


def _expected(net, kinds):
    """[(name, old, new)] predicted from the exact types in the model."""
    names = {"layer_norm": ("LayerNorm",), "attention": ("MultiheadAttention",),
             "transformer": ("TransformerEncoderLayer", "TransformerDecoderLayer",
                             "TransformerEncoder", "TransformerDecoder", "Transformer")}
    wanted = {getattr(torch.nn, n) for k in kinds for n in names[k]}
    return [(n, TORCH + type(m).__name__, FASTLM + type(m).__name__)
            for n, m in net.named_modules() if type(m) in wanted]


ALL = ("layer_norm", "attention", "transformer")


def test_patch_is_exported():
    assert callable(fastlm.patch) and "patch" in fastlm.__all__
    assert sys.modules["fastlm.patch"].patch is fastlm.patch  # the module, by its name


def test_replaces_every_kind_and_reports_it():
    net = _net()
    want = _expected(net, ALL)
    got = fastlm.patch(net)
    assert got == want
    names = [n for n, _, _ in got]
    for name in ("ln", "attn", "blocks.0", "blocks.0.self_attn", "blocks.0.norm1",
                 "blocks.1.norm2", "seq2seq", "seq2seq.encoder", "seq2seq.encoder.layers.0",
                 "seq2seq.encoder.norm", "seq2seq.decoder.layers.0.multihead_attn",
                 "seq2seq.decoder.norm", "head.0"):
        assert name in names, name
    assert ("blocks.0", "torch.nn.TransformerEncoderLayer",
            "fastlm.nn.TransformerEncoderLayer") in got
    assert ("attn", "torch.nn.MultiheadAttention", "fastlm.nn.MultiheadAttention") in got
    for name, _, new in got:
        assert type(net.get_submodule(name)) is getattr(fastlm.nn, new.removeprefix(FASTLM))
    assert type(net.emb) is torch.nn.Embedding and type(net.head[1]) is torch.nn.Linear


def test_keeps_parameter_objects_state_dict_and_training_mode():
    net = _net()
    net.blocks[1].eval()
    net.seq2seq.decoder.eval()
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    modules = dict(net.named_modules())
    fastlm.patch(net)
    assert all(p is params[n] for n, p in net.named_parameters())
    assert list(dict(net.named_parameters())) == list(params)
    assert all(b is buffers[n] for n, b in net.named_buffers())
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert all(m is modules[n] for n, m in net.named_modules())  # re-classed, not rebuilt


def test_same_outputs_and_gradients_after_patching():
    """The patched model against the unpatched one (its copy) and the float64 oracle."""
    net = _net()
    ref = copy.deepcopy(net)
    oracle = copy.deepcopy(net).double()
    fastlm.patch(net)
    tokens, padding, target = _data()

    def loss_and_grads(model):
        logits = model(tokens, padding)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(net)
    loss_t, grads_t = loss_and_grads(ref)
    loss_o, grads_o = loss_and_grads(oracle)
    assert_close_2x(loss, loss_o.float(), loss_t, FLOOR[torch.float32], "loss")
    for name in grads_t:
        assert_close_2x(grads[name], grads_o[name], grads_t[name],
                        param_floor(torch.float32, N * L), name)


def test_optimizer_built_before_patching_keeps_working():
    net = _net()
    twin = copy.deepcopy(net)
    # SGD: its step is linear in the gradient (Adam would blow up the rounding noise of the
    # mathematically zero gradient of the key bias into full-size steps).
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    tokens, padding, target = _data()

    def step(model, optimizer):
        loss = F.cross_entropy(model(tokens, padding).flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    step(net, opt)
    step(twin, opt_twin)
    fastlm.patch(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = [step(net, opt) for _ in range(3)]
    losses_twin = [step(twin, opt_twin) for _ in range(3)]
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters())
    for a, b in zip(losses, losses_twin):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    for (n, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kinds", [("layer_norm",), ("attention",), ("transformer",),
                                   ("layer_norm", "attention"), ("attention", "transformer"),
                                   ()], ids=lambda k: "+".join(k) or "nothing")
def test_options_leave_kinds_out(kinds):
    net = _net()
    want = _expected(net, kinds)
    got = fastlm.patch(net, **{k: k in kinds for k in ALL})
    assert got == want
    left = {n for n, m in net.named_modules()
            if type(m).__module__.startswith("torch.nn")
            and type(m).__name__ in ("LayerNorm", "MultiheadAttention")
            or type(m) in (torch.nn.TransformerEncoderLayer, torch.nn.Transformer)}
    if "layer_norm" not in kinds:
        assert {"ln", "head.0", "blocks.0.norm1"} <= left
    if "attention" not in kinds:
        assert {"attn", "blocks.1.self_attn"} <= left
    if "transformer" not in kinds:
        assert {"blocks.0", "seq2seq"} <= left
    # Whatever mix results still computes the model's function.
    tokens, padding, _ = _data()
    torch.testing.assert_close(net(tokens, padding), _net()(tokens, padding),
                               atol=1e-4, rtol=1e-4)


def test_idempotent_and_fastlm_modules_left_alone():
    net = _net()
    first = fastlm.patch(net)
    assert first
    assert fastlm.patch(net) == []
    model = fastlm.nn.Transformer(D, H, 1, 1, FF)
    assert fastlm.patch(model) == []


def test_user_subclasses_left_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(D), torch.nn.LayerNorm(D))
    assert fastlm.patch(model) == [("1", "torch.nn.LayerNorm", "fastlm.nn.LayerNorm")]
    assert type(model[0]) is MyNorm


def test_root_module_and_shared_modules():
    ln = torch.nn.LayerNorm(D)
    assert fastlm.patch(ln) == [("", "torch.nn.LayerNorm", "fastlm.nn.LayerNorm")]
    assert type(ln) is fastlm.nn.LayerNorm
    shared = torch.nn.LayerNorm(D)
    model = torch.nn.ModuleDict({"a": shared, "b": shared})
    assert fastlm.patch(model) == [("a", "torch.nn.LayerNorm", "fastlm.nn.LayerNorm")]
    assert model["b"] is model["a"] and type(model["b"]) is fastlm.nn.LayerNorm


def test_hooks_survive():
    model = torch.nn.Sequential(torch.nn.LayerNorm(D))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    fastlm.patch(model)
    model(torch.randn(2, D))
    assert seen == [fastlm.nn.LayerNorm]


def test_device_and_dtype_kept():
    model = torch.nn.Sequential(torch.nn.LayerNorm(D, dtype=torch.bfloat16),
                                torch.nn.MultiheadAttention(D, H, device="meta"))
    fastlm.patch(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].weight.device.type == "cpu"
    assert all(p.device.type == "meta" for p in model[1].parameters())
    y = model[0](torch.randn(2, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_model_stays_on_cuda():
    net = _net().cuda()
    fastlm.patch(net)
    assert all(p.is_cuda for p in net.parameters())
    tokens, padding, _ = _data()
    ref = _net().cuda()
    torch.testing.assert_close(net(tokens.cuda(), padding.cuda()),
                               ref(tokens.cuda(), padding.cuda()), atol=1e-4, rtol=1e-4)


def test_patched_model_takes_no_torch_fast_path_in_inference(monkeypatch):
    """After patching, eval under no_grad runs fastlm's modules, never torch's fused
    inference kernels (which read the weights directly)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, 2, FF, batch_first=True)  # fast-path eligible
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        model = torch.nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(N, L, D)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -2:] = True
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            want = model(x, src_key_padding_mask=padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    fastlm.patch(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's fused inference path ran after fastlm.patch")

    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
                 "_nested_tensor_from_mask"):
        monkeypatch.setattr(torch, name, forbidden)
    with torch.no_grad():
        got = model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_patched_model_saves_and_loads():
    net = _net()
    fastlm.patch(net)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = _net(seed=9)
    fresh.load_state_dict(torch.load(buf))  # into an unpatched torch model
    tokens, padding, _ = _data()
    torch.testing.assert_close(fresh(tokens, padding), net(tokens, padding),
                               atol=1e-4, rtol=1e-4)
    clone = copy.deepcopy(net)
    assert type(clone.blocks[0]) is fastlm.nn.TransformerEncoderLayer


def test_patch_on_a_model_written_against_torch_nn():
    """The encoder LM and the seq2seq of test_nn_transformer, built from torch.nn and
    patched, against the same models built from fastlm.nn: the same module types and the
    same loss and gradients."""
    from test_nn_transformer import LM_CASES, assert_same_loss_and_grads

    for build, data in LM_CASES.values():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            patched = build(torch.nn)
        ref = copy.deepcopy(patched)
        replaced = fastlm.patch(patched)
        assert replaced and all(new.startswith(FASTLM) for _, _, new in replaced)
        torch.manual_seed(0)
        built = build(fastlm.nn)
        # (the model classes themselves are local to each build call)
        assert [type(m) for m in patched.modules()][1:] == [type(m) for m in built.modules()][1:]
        args, target = data()
        assert_same_loss_and_grads(patched, ref, args, target)


def test_bad_argument():
    with pytest.raises(TypeError, match="fastlm.patch: model must be a torch.nn.Module, got "
                                        "dict"):
        fastlm.patch({"ln": torch.nn.LayerNorm(4)})
    with pytest.raises(TypeError, match="takes 1 positional argument"):
        fastlm.patch(torch.nn.LayerNorm(4), False)


def test_patched_modules_have_the_state_of_built_ones():
    """Re-classing is faithful only while fastlm's modules keep no state of their own beyond
    torch's: a patched module has the attributes (and values) of one built by fastlm."""
    net = _net()
    fastlm.patch(net)
    torch.manual_seed(0)
    built = {
        "ln": fastlm.nn.LayerNorm(D),
        "attn": fastlm.nn.MultiheadAttention(D, H, batch_first=True),
        "blocks.0": fastlm.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True),
        "seq2seq": fastlm.nn.Transformer(D, H, 1, 1, FF, dropout=0.0, batch_first=True),
        "seq2seq.encoder": fastlm.nn.Transformer(D, H, 1, 1, FF, dropout=0.0,
                                                 batch_first=True).encoder,
        "seq2seq.decoder.layers.0": fastlm.nn.TransformerDecoderLayer(D, H, FF, dropout=0.0,
                                                                      batch_first=True),
    }
    for name, fresh in built.items():
        patched = net.get_submodule(name)
        assert type(patched) is type(fresh), name
        plain = {k: v for k, v in vars(fresh).items() if not k.startswith("_")}
        assert {k: v for k, v in vars(patched).items() if not k.startswith("_")} == plain, name
        assert set(vars(patched)) == set(vars(fresh)), name
