"""fastlm.linear_cross_entropy (public) and fastlm.nn.LinearCrossEntropyLoss: equal to
F.cross_entropy(F.linear(input, weight, bias), ...) with bias, label_smoothing, ignore_index and
both reductions, in float64 exactly and in float32 by the 2x rule; under torch.compile with the
inductor backend when some targets are ignored; reduction="sum" for gradient accumulation;
autocast; bad input. (tests/test_gpt.py covers the chunking edge cases of the same op.)"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOOR, max_err

import fastlm


def _inputs(n, c, v, dtype, seed=0, ignore_every=4, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(v, c, generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t


def _both(h, w, b, t, reduction, label_smoothing, chunk_size=None):
    leaves = [x for x in (h, w, b) if x is not None]
    loss = fastlm.linear_cross_entropy(h, w, t, b, reduction=reduction,
                                       label_smoothing=label_smoothing, chunk_size=chunk_size)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction,
                          label_smoothing=label_smoothing)
    ours = (loss, *torch.autograd.grad(loss * 1.3, leaves))
    theirs = (ref, *torch.autograd.grad(ref * 1.3, leaves))
    return ours, theirs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_float64_equals_unfused(reduction, label_smoothing, bias, chunk_size):
    h, w, b, t = _inputs(37, 16, 51, torch.float64, bias=bias)
    ours, ref = _both(h, w, b, t, reduction, label_smoothing, chunk_size)
    for name, a, r in zip(("loss", "dinput", "dweight", "dbias"), ours, ref):
        assert a.dtype == r.dtype == torch.float64
        assert max_err(a, r) <= 1e-12 * max(1.0, r.abs().max().item()), name


def test_float32_tolerance_rule():
    h, w, b, t = _inputs(300, 32, 1021, torch.float32, seed=3)
    ours, ref32 = _both(h, w, b, t, "mean", 0.1, 64)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    _, oracle = _both(h64, w64, b64, t, "mean", 0.1)
    for name, a, r, o in zip(("loss", "dinput", "dweight", "dbias"), ours, ref32, oracle):
        assert a.dtype == torch.float32
        assert max_err(a, o) <= 2 * max_err(r, o) + FLOOR[torch.float32], name


def test_inductor_with_ignored_targets():
    """torch.compile with inductor, fullgraph, some targets ignore_index (and a row block that
    is all ignored): the loss and gradients of eager (the op is opaque to inductor)."""
    torch._dynamo.reset()
    h, w, b, t = _inputs(64, 16, 33, torch.float32, seed=5, ignore_every=3)
    t[40:] = -100

    def step(h, w, b, t):
        return fastlm.linear_cross_entropy(h, w, t, b, label_smoothing=0.05, chunk_size=16)

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        loss = fn(*leaves, t)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    ref = F.cross_entropy(F.linear(h, w, b), t, label_smoothing=0.05)
    torch.testing.assert_close(results[0][0], ref.detach())
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_sum_reduction_for_gradient_accumulation():
    """Micro-batches with reduction="sum", divided by the total number of targets, give the
    full batch's mean loss and gradients (the Trainer's num_items_in_batch)."""
    h, w, b, t = _inputs(48, 8, 29, torch.float64, seed=2)
    n_valid = int((t != -100).sum())
    total = 0.0
    for s in range(0, 48, 16):
        loss = fastlm.linear_cross_entropy(h[s:s + 16], w, t[s:s + 16], b, reduction="sum")
        (loss / n_valid).backward()
        total += loss.item() / n_valid
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    ref = F.cross_entropy(F.linear(h, w, b), t)
    ref.backward()
    assert abs(total - ref.item()) < 1e-12
    for a, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(a, x.grad, atol=1e-12, rtol=1e-12)


def test_opcheck_with_bias_and_label_smoothing():
    h, w, b, t = _inputs(30, 8, 11, torch.float32)
    op = torch.ops.fastlm.linear_cross_entropy_fwd
    torch.library.opcheck(op, (h, w, b, t, -100, "mean", 0.1, 7, torch.float32, True, True,
                               True))
    torch.library.opcheck(op, (h.detach(), w.detach(), b.detach(), t, -100, "sum", 0.0, 30,
                               torch.float32, False, False, False))


def test_module():
    h, w, b, t = _inputs(20, 8, 13, torch.float32, seed=1)
    mod = fastlm.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.2)
    loss = mod(h.view(4, 5, 8), w, t.view(4, 5), b)
    ref = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2)(F.linear(h, w, b), t)
    torch.testing.assert_close(loss, ref)
    assert "label_smoothing=0.2" in repr(mod)


def test_autocast_bf16_with_bias():
    h, w, b, t = _inputs(32, 16, 40, torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastlm.linear_cross_entropy(h, w, t, b)
        ref = F.cross_entropy(F.linear(h, w, b).float(), t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    gb, = torch.autograd.grad(loss, b)
    assert gb.dtype == torch.float32


def test_bad_input():
    h, w, b, t = _inputs(6, 4, 9, torch.float32)
    with pytest.raises(fastlm.ArgumentError, match="reduction"):
        fastlm.linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(fastlm.ArgumentError, match="label_smoothing"):
        fastlm.linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(fastlm.ArgumentError, match="bias"):
        fastlm.linear_cross_entropy(h, w, t, torch.zeros(8))
    with pytest.raises(fastlm.ArgumentError, match="last dim"):
        fastlm.linear_cross_entropy(h[:, :3], w, t)
    with pytest.raises(TypeError, match="int64"):
        fastlm.linear_cross_entropy(h, w, t.int())
    with pytest.raises(TypeError, match="same dtype"):
        fastlm.linear_cross_entropy(h, w, t, b.double())
