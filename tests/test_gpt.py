"""fastlm.models.GPT and the fused chunked head + cross-entropy
(fastlm.ops.cross_entropy.linear_cross_entropy): shapes and errors; the fused loss and its
gradients against F.cross_entropy on full logits; GPT against its torch.nn twin (TorchGPT) with
the same weights, under the tolerance rule against a float64 oracle; convergence on a small
deterministic task; generation with and without the KV cache; optimizer groups; loading a
Hugging Face checkpoint; torch.compile(fullgraph=True). Small configs: the file runs in well
under a minute on two CPU cores."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import GPT, GPTConfig, TorchGPT
from fastlm.ops.cross_entropy import linear_cross_entropy

# Small and awkward: a prime vocabulary, two heads of width 8.
SMALL = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
FLOOR32 = 1e-5  # absolute floor of the tolerance rule for float32 (tests/conftest.py)


def _model(cls=GPT, config=SMALL, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return cls(config).to(dtype)


def _batch(config=SMALL, B=3, T=11, seed=1, ignore=True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, config.vocab_size, (B, T), generator=g)
    if ignore:
        targets[0, :3] = -1  # ignored positions
    return idx, targets


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Shapes, configuration and argument errors.
def test_forward_shapes():
    model = _model()
    idx, targets = _batch()
    logits, loss = model(idx, targets)
    assert logits is None and loss.shape == () and loss.dtype == torch.float32
    logits, loss = model(idx)
    assert logits.shape == (3, 1, SMALL.vocab_size) and loss is None
    assert model.hidden_states(idx).shape == (3, 11, SMALL.n_embd)
    logits, loss = _model(TorchGPT)(idx, targets)
    assert logits.shape == (3, 11, SMALL.vocab_size) and loss.shape == ()
    # GPT-2 124M: 124,439,808 parameters (the tied embedding counted once)
    assert GPTConfig() == GPTConfig(50257, 1024, 12, 12, 768, 0.0, True)
    n = 50257 * 768 + 1024 * 768 + 12 * (12 * 768 ** 2 + 13 * 768) + 2 * 768
    assert n == 124_439_808
    assert _model(config=SMALL).num_params() == (
        61 * 16 + 16 * 16 + 2 * (12 * 16 * 16 + 13 * 16) + 2 * 16)


def test_init_is_gpt2s():
    config = GPTConfig(vocab_size=300, block_size=64, n_layer=4, n_head=4, n_embd=64)
    model = _model(config=config)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = 0.02 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - want) < 0.15 * want, (name, p.std().item(), want)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be a multiple of n_head \\(3\\)"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"n_layer": 2})
    model = _model()
    with pytest.raises(ValueError, match="length 17: block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be \\(batch, time\\)"):
        model(torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# The fused, chunked head + cross-entropy.
def _ce_inputs(n, c, v, dtype, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(v, c, generator=g)).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -1
    return h, w, t


def _fused_and_unfused(h, w, t, reduction, chunk_size):
    loss = linear_cross_entropy(h, w, t, ignore_index=-1, reduction=reduction,
                                chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 1.7, (h, w))  # an upstream gradient other than 1
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1, reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 1.7, (h, w))
    return (loss, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_linear_cross_entropy_float64_equals_unfused(reduction, chunk_size):
    h, w, t = _ce_inputs(53, 24, 97, torch.float64)
    ours, ref = _fused_and_unfused(h, w, t, reduction, chunk_size)
    for name, a, b in zip(("loss", "d input", "d weight"), ours, ref):
        assert a.dtype == b.dtype == torch.float64
        assert _max_err(a, b) <= 1e-12 * max(1.0, b.abs().max().item()), name


def test_linear_cross_entropy_float32_tolerance_rule():
    """float32 fused vs the float64 oracle: at most 2x the error of F.cross_entropy on full
    float32 logits, plus a floor."""
    h, w, t = _ce_inputs(300, 32, 1021, torch.float32, seed=3)
    ours, ref32 = _fused_and_unfused(h, w, t, "mean", 64)
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    _, oracle = _fused_and_unfused(h64, w64, t, "mean", None)
    for name, a, r, o in zip(("loss", "d input", "d weight"), ours, ref32, oracle):
        assert a.dtype == torch.float32
        assert _max_err(a, o) <= 2 * _max_err(r, o) + FLOOR32, name


def test_linear_cross_entropy_edge_cases():
    # Every target ignored: the mean is nan (as torch's), the gradients are zero.
    h, w, t = _ce_inputs(6, 4, 9, torch.float32, ignore_every=1)
    loss = linear_cross_entropy(h, w, t, ignore_index=-1)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.t(), t, ignore_index=-1))
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # Leading batch dims; torch's default ignore_index (-100); no grad mode (nothing saved).
    h3 = torch.randn(2, 5, 4)
    w = torch.randn(9, 4)
    t3 = torch.randint(0, 9, (2, 5))
    t3[1, 2] = -100
    with torch.no_grad():
        loss = linear_cross_entropy(h3, w, t3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy((h3 @ w.t()).view(-1, 9), t3.view(-1)))
    # Only the weight needs a gradient.
    wg = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(linear_cross_entropy(h3, wg, t3), (wg,))
    (gw_ref,) = torch.autograd.grad(F.cross_entropy((h3 @ wg.t()).view(-1, 9), t3.view(-1)),
                                    (wg,))
    torch.testing.assert_close(gw, gw_ref)


def test_linear_cross_entropy_bf16_autocast():
    """Under autocast the matmuls run in bfloat16 and the softmax in float32, like
    F.cross_entropy(F.linear(...)) under autocast; the gradients keep the inputs' dtypes."""
    h, w, t = _ce_inputs(64, 32, 50, torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, ignore_index=-1, chunk_size=16)
        ref = F.cross_entropy(F.linear(h, w), t, ignore_index=-1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    assert _max_err(gh, rh) < 2e-2 * rh.abs().max().item()
    assert _max_err(gw, rw) < 2e-2 * rw.abs().max().item()


def test_linear_cross_entropy_errors():
    h, w, t = _ce_inputs(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="input's last dim \\(3\\) must equal weight's features"):
        linear_cross_entropy(h, torch.randn(5, 4), t)
    with pytest.raises(ValueError, match="target must have input's leading shape"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match="target must hold int64"):
        linear_cross_entropy(h, w, t.int())
    with pytest.raises(TypeError, match="same dtype outside autocast"):
        linear_cross_entropy(h, w.double(), t)


def test_linear_cross_entropy_opcheck():
    h, w, t = _ce_inputs(30, 8, 11, torch.float32, ignore_every=4)
    op = torch.ops.fastlm.linear_cross_entropy_fwd
    torch.library.opcheck(op, (h, w, None, t, -1, "mean", 0.0, 7, torch.float32, True, True,
                               False))
    torch.library.opcheck(op, (h.detach(), w.detach(), None, t, -1, "sum", 0.0, 30,
                               torch.float32, False, False, False))


# ---------------------------------------------------------------------------------------------
# The model against the unfused head and against its torch.nn twin.
def test_fused_loss_equals_full_logits_cross_entropy():
    model = _model(dtype=torch.float64)
    idx, targets = _batch()
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model.lm_head(model.hidden_states(idx))
    ref = F.cross_entropy(logits.view(-1, SMALL.vocab_size), targets.view(-1), ignore_index=-1)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert abs(loss.item() - ref.item()) < 1e-13
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert _max_err(g, r) < 1e-13, name


def _loss_and_grads(model, idx, targets, run=None):
    """Loss and gradients of `model`'s parameters; the forward runs through `run` (a compiled
    wrapper of the model, say) when given."""
    model.zero_grad(set_to_none=True)
    _, loss = (model if run is None else run)(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_matches_torch_twin_under_tolerance_rule():
    """GPT (fastlm ops) and TorchGPT with the same weights, float32, against TorchGPT in
    float64: loss and every gradient within 2x the error of the torch twin plus a floor."""
    config = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16,
                       dropout=0.1)  # dropout is off in eval mode: the twins must agree
    ours = _model(GPT, config).eval()
    twin = _model(TorchGPT, config, seed=7).eval()
    assert set(twin.state_dict()) == set(ours.state_dict())
    twin.load_state_dict(ours.state_dict())
    oracle = _model(TorchGPT, config, dtype=torch.float64).eval()
    oracle.load_state_dict(ours.state_dict())
    idx, targets = _batch(T=16)
    loss, grads = _loss_and_grads(ours, idx, targets)
    loss_t, grads_t = _loss_and_grads(twin, idx, targets)
    loss_o, grads_o = _loss_and_grads(oracle, idx, targets)
    assert _max_err(loss, loss_o) <= 2 * _max_err(loss_t, loss_o) + FLOOR32
    for name in grads_o:
        bound = 2 * _max_err(grads_t[name], grads_o[name]) + FLOOR32
        assert _max_err(grads[name], grads_o[name]) <= bound, name
    # Inference: the last position's logits match the twin's.
    torch.testing.assert_close(ours(idx)[0], twin(idx)[0], atol=1e-5, rtol=1e-5)


def test_residual_adds_and_norms_are_fused(monkeypatch):
    """GPT runs each residual add + dropout + the next LayerNorm as one fastlm.add_layer_norm
    call (2 per block); a forward hook on a block keeps the unfused path (and runs)."""
    import fastlm.ops.add_layer_norm as aln

    calls = []
    real = aln.add_layer_norm
    monkeypatch.setattr(aln, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=2, n_embd=16)
    model = _model(GPT, config)
    idx, targets = _batch(T=16)
    fused = model(idx, targets)[1]
    assert len(calls) == 2 * config.n_layer
    seen = []
    model.transformer.h[1].register_forward_hook(lambda *a: seen.append(1))
    unfused = model(idx, targets)[1]
    assert len(calls) == 2 * config.n_layer and seen == [1]
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


def test_converges_on_a_cyclic_sequence():
    """Sequences are windows of one fixed cycle of 13 distinct tokens (vocab 16) at random
    phases: every target is a function of its input token, so the best loss is 0, while a model
    that learned nothing stays near ln(16) = 2.77. 60 AdamW steps must bring the loss below
    0.05 (a correct model reaches about 0.01 here; a broken gradient or head stalls above 1)."""
    config = GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = _model(config=config)
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(0)
    cycle = torch.randperm(16, generator=g)[:13]
    first = None
    for _ in range(60):
        phase = torch.randint(0, 13, (8, 1), generator=g)
        seq = cycle[(phase + torch.arange(17)) % 13]
        _, loss = model(seq[:, :-1], seq[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.05, loss.item()


# ---------------------------------------------------------------------------------------------
# Generation.
def test_generate_with_and_without_cache_agree():
    model = _model().eval()
    prompt, _ = _batch(B=2, T=5, ignore=False)
    lengths = []
    real = model.hidden_states

    def spy(idx, cache=None, pos=0):
        lengths.append((idx.shape[1], pos, cache is not None))
        return real(idx, cache, pos)

    model.hidden_states = spy
    torch.manual_seed(123)
    cached = model.generate(prompt, 20, temperature=0.9, top_k=7)
    calls, lengths[:] = list(lengths), []
    torch.manual_seed(123)
    plain = model.generate(prompt, 20, temperature=0.9, top_k=7, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)
    # Prefill of the prompt, one token at a time up to block_size (16), then a recomputation
    # of the last 16 tokens each step (the sequence no longer fits the cache).
    assert calls[0] == (5, 0, True)
    assert calls[1:12] == [(1, p, True) for p in range(5, 16)]
    assert calls[12:] == [(16, 0, False)] * 8
    assert lengths == [(min(t, 16), 0, False) for t in range(5, 25)]
    # Greedy decoding draws nothing from the generator and agrees too.
    assert torch.equal(model.generate(prompt, 6, temperature=0),
                       model.generate(prompt, 6, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(prompt, 1, top_k=0)


def test_cached_attention_matches_full_for_several_new_tokens():
    """A chunk of several tokens attending to a cache (bottom-right causal) equals the full
    forward's hidden states at those positions."""
    model = _model().eval()
    idx, _ = _batch(B=2, T=12, ignore=False)
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = model._new_cache(2, idx.device, torch.float32)
        model.hidden_states(idx[:, :7], cache, 0)
        part = model.hidden_states(idx[:, 7:], cache, 7)
    torch.testing.assert_close(part, full[:, 7:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Optimizer groups.
def test_configure_optimizers_groups():
    model = _model()
    opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu", max_grad_norm=1.0)
    assert isinstance(opt, fastlm.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 3e-4 and decay["betas"] == (0.9, 0.95) and opt.max_grad_norm == 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decay_names and "transformer.wpe.weight" in decay_names
    assert "transformer.h.0.attn.c_attn.weight" in decay_names
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_1.weight",
        "transformer.ln_f.bias"}
    # Every parameter once (the tied head is the embedding).
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# from_pretrained on a synthetic Hugging Face checkpoint.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_state(model, prefix, lm_head):
    """The model's weights in Hugging Face GPT-2 layout (Conv1D weights transposed)."""
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        key = name.removeprefix("transformer.")
        sd[prefix + key] = (t.t() if key.endswith(_CONV1D) else t).contiguous().clone()
    for i in range(model.config.n_layer):  # the causal-mask buffer of older checkpoints
        sd[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    if lm_head:
        sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return sd


def _write_safetensors(path, tensors):
    """A minimal safetensors writer (the format: u64 header size, JSON header, raw data)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def _hf_config(config):
    return {"model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_embd": config.n_embd,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_local_checkpoint(tmp_path, fmt):
    source = _model(seed=11)
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in source.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(SMALL)))
    if fmt == "safetensors":
        _write_safetensors(tmp_path / "model.safetensors", _hf_state(source, "", False))
    else:
        torch.save(_hf_state(source, "transformer.", True), tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(tmp_path)
    assert model.config == SMALL
    for name, t in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert model.lm_head.weight is model.transformer.wte.weight
    idx, targets = _batch()
    torch.testing.assert_close(model(idx, targets)[1], source(idx, targets)[1], rtol=0, atol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory.*never downloads"):
        GPT.from_pretrained(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(SMALL)))
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)
    sd = _hf_state(_model(), "", False)
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"].t().contiguous()  # not transposed
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="'h.1.mlp.c_fc.weight' has shape \\[64, 16\\], "
                                         "expected \\[16, 64\\]"):
        GPT.from_pretrained(tmp_path)
    sd = _hf_state(_model(), "", False)
    del sd["ln_f.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="lacks transformer.ln_f.bias"):
        GPT.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# torch.compile.
@pytest.mark.parametrize("backend", [None, "torch"], ids=["default-backends", "torch-backend"])
def test_compile_fullgraph_forward_loss_backward(backend):
    """The model's forward with the fused loss, and its backward, compile with no graph break
    (aot_eager: dynamo and AOTAutograd, without inductor's code generation) and match eager."""
    model = _model()
    idx, targets = _batch()
    loss, grads = _loss_and_grads(model, idx, targets)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        loss_c, grads_c = _loss_and_grads(model, idx, targets, run=compiled)
    torch.testing.assert_close(loss_c, loss)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)


# ---------------------------------------------------------------------------------------------
# The benchmark case's models and formulas (fastlm/bench/gpt.py).
def test_bench_models_agree_and_formulas():
    from fastlm import bench
    from fastlm.bench import gpt as bg

    model = _model(TorchGPT)
    enc = bg.EncoderLayerGPT(SMALL)
    enc.load_gpt_state_dict(model.state_dict())
    idx, targets = _batch()
    torch.testing.assert_close(enc(idx, targets)[1], model(idx, targets)[1], atol=1e-5,
                               rtol=1e-5)
    assert bg.n_params(SMALL) == model.num_params(non_embedding=True)
    shape = {"model": "gpt2-124M", "B": 32, "T": 1024, "dtype": "bfloat16"}
    n = 124_439_808 - 1024 * 768
    assert bg._flops(shape, "step") == 6 * n * 32 * 1024 + 7 * 12 * 32 * 1024 ** 2 * 768
    assert bench.get("gpt").tokens(shape) == 32 * 1024
    # --quick on the CPU leaves the compiled rows out (inductor builds for minutes there).
    planned, skipped = bench.runner.plan(["gpt"], "cpu", "quick")
    assert [i.name for i in planned[0][2]] == ["fastlm", "torch", "torch-encoder-layer"]
    assert {s["backend"] for s in skipped} == {"fastlm-compile", "torch-compile"}
    planned, _ = bench.runner.plan(["gpt"], "cpu", "full")
    assert len(planned[0][2]) == 5
