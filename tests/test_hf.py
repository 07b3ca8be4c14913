"""fastlm.patch on Hugging Face transformers models (fastlm/hf.py): each family (Llama, Mistral,
Qwen2, Qwen3, Gemma, GPT-2) built from a tiny random config (no downloads) gives, patched, the
logits, loss and gradients of unpatched transformers within the 2x rule (against the same
model in float64), trains the same for a few steps, and generates the same greedy tokens.
Also: what patch reports, idempotence, attn_implementation="fastlm", padding masks, gradient
accumulation (num_items_in_batch) and a model fastlm does not know. Skipped cleanly when
transformers is not installed."""

import copy
import logging
import math

import pytest
import torch
from conftest import FLOOR, max_err, param_floor

import fastlm

transformers = pytest.importorskip("transformers")
import fastlm.hf  # noqa: E402  (registers attn_implementation="fastlm")

VOCAB, B, S = 96, 2, 12
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16,
                                              hidden_activation="gelu_pytorch_tanh"),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0),
}
# The modules each family must have swapped (old class names), beyond attn_implementation.
EXPECTED = {
    "llama": {"LlamaRMSNorm", "LlamaMLP", "LlamaAttention", "LlamaForCausalLM"},
    "mistral": {"MistralRMSNorm", "MistralMLP", "MistralAttention", "MistralForCausalLM"},
    "qwen2": {"Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention", "Qwen2ForCausalLM"},
    "qwen3": {"Qwen3RMSNorm", "Qwen3MLP", "Qwen3Attention", "Qwen3ForCausalLM"},
    "gemma": {"GemmaRMSNorm", "GemmaMLP", "GemmaAttention", "GemmaForCausalLM"},
    "gpt2": {"LayerNorm", "GPT2LMHeadModel"},
}


def _model(family, dtype=torch.float32, attn="sdpa"):
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # weights larger than the init's, so every op matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def _batch(pad=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:  # left padding of the second row
        mask[1, :4] = 0
        labels[1, :4] = -100
    return ids, labels, mask


def _run(model, ids, labels, mask, train):
    """(logits (eval, no labels), loss (train mode with labels), {param name: grad})."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.train(train)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return logits, loss.detach(), grads


def _assert_2x(ours, torch32, oracle, floor, what):
    err, ref = max_err(ours, oracle), max_err(torch32, oracle)
    assert err <= 2 * ref + floor, (f"{what}: max error {err:.3e} vs float64; bound 2 x "
                                    f"torch's {ref:.3e} + {floor:.1e}")


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("pad", [False, True], ids=["full", "left-padded"])
def test_logits_loss_grads_match_transformers(family, pad):
    ref = _model(family)
    oracle = _model(family, torch.float64)
    ours = copy.deepcopy(ref)
    replaced = fastlm.patch(ours)
    old = {r[1].split(".")[-1] for r in replaced}
    assert EXPECTED[family] <= old, (EXPECTED[family] - old, replaced)
    assert ("", "attn_implementation='sdpa'", "attn_implementation='fastlm'") in replaced
    batch = _batch(pad)
    lo_t, loss_t, g_t = _run(ref, *batch, train=True)
    lo_o, loss_o, g_o = _run(oracle, *batch, train=True)
    lo, loss, g = _run(ours, *batch, train=True)
    valid = batch[2].bool()  # padded query rows: no defined output, as transformers'
    _assert_2x(lo[valid], lo_t[valid], lo_o[valid], FLOOR[torch.float32], "logits")
    _assert_2x(loss, loss_t, loss_o, FLOOR[torch.float32], "loss")
    assert set(g) == set(g_t)
    for name in g_t:
        _assert_2x(g[name], g_t[name], g_o[name], param_floor(torch.float32, B * S),
                   f"grad {name}")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_training_and_greedy_generation_match(family):
    ref = _model(family)
    ours = copy.deepcopy(ref)
    fastlm.patch(ours)
    ids, labels, mask = _batch()
    losses = {}
    for name, model in (("ref", ref), ("ours", ours)):
        # SGD, not Adam: Adam's m / sqrt(v) turns the rounding noise of gradients that are zero
        # in exact arithmetic (GPT-2's key bias) into full-size steps of random sign.
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        model.train()
        trace = []
        for _ in range(3):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            trace.append(loss.item())
        losses[name] = trace
    assert losses["ours"][-1] < losses["ours"][0]
    for a, b in zip(losses["ours"], losses["ref"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), losses
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=1e-3, msg=n)
    ref.eval()
    ours.eval()
    prompt = ids[:, :5]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        got = ours.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    assert torch.equal(got, want)


def test_patched_modules_keep_state_and_patch_is_idempotent():
    model = _model("llama")
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    first = fastlm.patch(model)
    assert first and fastlm.patch(model) == []
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert list(model.state_dict()) == keys
    fresh = _model("llama")
    fresh.load_state_dict(model.state_dict())
    kinds = {type(m).__module__ for m in model.modules()}
    assert "fastlm.hf" in kinds


def test_attn_implementation_fastlm_from_config():
    ref = _model("qwen2")
    ours = _model("qwen2", attn="fastlm")
    assert ours.config._attn_implementation == "fastlm"
    ids, _, mask = _batch(pad=True)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=1e-4, rtol=1e-4)


def test_fused_loss_gradient_accumulation_and_eval_logits():
    """num_items_in_batch (the Trainer's gradient accumulation): sum / n as transformers'; in
    training the logits are not made (empty), in eval they are transformers'."""
    ref = _model("llama")
    ours = copy.deepcopy(ref)
    fastlm.patch(ours)
    ids, labels, mask = _batch()
    n = torch.tensor(17)
    for m in (ref, ours):
        m.train()
    out_t = ref(input_ids=ids, labels=labels, num_items_in_batch=n)
    out = ours(input_ids=ids, labels=labels, num_items_in_batch=n)
    assert out.logits.shape == (B, S, 0)
    torch.testing.assert_close(out.loss, out_t.loss, atol=1e-5, rtol=1e-5)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        out_e = ours(input_ids=ids, labels=labels)
        ref_e = ref(input_ids=ids, labels=labels)
    assert out_e.logits.shape == (B, S, VOCAB)
    torch.testing.assert_close(out_e.loss, ref_e.loss, atol=1e-5, rtol=1e-5)


def test_unknown_transformers_model_left_alone(caplog):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(cfg)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        replaced = fastlm.patch(model)
    assert all(old == "torch.nn.LayerNorm" for _, old, _ in replaced)
    assert any("family fastlm does not know" in m for m in caplog.messages)
    assert any("fastlm.patch: replaced" in m for m in caplog.messages)


def test_patch_logs_what_it_replaced(caplog):
    model = _model("gemma")
    with caplog.at_level(logging.INFO, logger="fastlm"):
        fastlm.patch(model)
    msg = next(m for m in caplog.messages if m.startswith("fastlm.patch: replaced"))
    assert "transformers.GemmaRMSNorm -> fastlm.hf.GemmaRMSNorm" in msg
    assert math.isfinite(model(input_ids=_batch()[0]).logits.sum().item())
