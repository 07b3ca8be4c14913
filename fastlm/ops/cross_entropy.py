"""Linear + cross-entropy, fused and chunked over rows: the language-model head and its loss
without the (rows, vocab) float32 logits ever existing whole.

    loss = fastlm.linear_cross_entropy(h, W, target)
    # == F.cross_entropy(h @ W.T, target) (float32 logits), in a fraction of the memory
    loss = fastlm.linear_cross_entropy(h, W, target, bias, label_smoothing=0.1)

The rows are processed in chunks of about 2**26 logits (256 MiB in float32). For each chunk the
forward computes

    z = h_c W^T (+ b)              logits, in the compute dtype (the autocast dtype, else h's)
    logp = log_softmax(z) (float32, one fused kernel reading z)
    loss_c = -(1 - e) logp[target] - e mean(logp)   per row (label smoothing e, as torch's),
                                   zero where target == ignore_index

and, when gradients are wanted, the gradient right away, while z is still there (as Liger's
fused linear cross-entropy does, which saves recomputing z in the backward: 2·N·C·V FLOPs, a
third of the head's forward + backward):

    dz = (exp(logp) - (1 - e) onehot(target) - e / V) * valid / n_valid  (mean; sum: without
                                   / n_valid), in place in logp, then scaled and cast into z's
                                   buffer
    dh_c = dz W                    written into the (N, C) grad_input
    dW  += dz^T h_c                accumulated in float32 (float64 for float64) over the chunks
    db  += sum over rows of dz     (with a bias), likewise

The backward only scales the saved dh, dW (and db) by the incoming gradient of the loss (a
scalar).
Memory traffic over the logits, per logit with bfloat16 compute: z written (2 bytes), the
log-softmax (reads z twice, writes float32: 10), exp in place (8), scale and cast (6): 26 bytes,
where the unfused eager path (autocast upcast, log_softmax, its backward, downcast) moves about
42. Peak extra memory: one chunk's logits (compute dtype and float32) plus dh (N x C) and dW.

The op is `torch.ops.fastlm.linear_cross_entropy_fwd`, a torch.library custom op with a fake
kernel and an autograd formula, so torch.compile(fullgraph=True) sees one opaque node: no graph
break and no (N, V) intermediate in the compiled graph, and inductor cannot fuse into it (the
ignore_index rows stay zero under any backend).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .._errors import ArgumentError, ArgumentTypeError

# About this many logits per chunk: 256 MiB in float32.
CHUNK_LOGITS = 1 << 26
_REDUCTIONS = ("mean", "sum")


def _chunk_rows(n_rows, vocab, chunk_size):
    """Rows per chunk: `chunk_size` if given, else even chunks of at most CHUNK_LOGITS logits,
    rounded up to a multiple of 64 rows."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    n_chunks = max(1, math.ceil(n_rows * vocab / CHUNK_LOGITS))
    rows = math.ceil(n_rows / n_chunks)
    return max(1, min(n_rows, 64 * math.ceil(rows / 64)))


def _loss_dtype(compute_dtype):
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                             target: Tensor, ignore_index: int, reduction: str,
                             label_smoothing: float, chunk_size: int, compute_dtype: torch.dtype,
                             input_grad: bool, weight_grad: bool, bias_grad: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_input, grad_weight, grad_bias): the loss (0-d, float32; float64 for float64
    compute) and, where asked, the gradients of that loss (empty tensors otherwise).

    input (N, C), weight (V, C), bias (V,) or None, target (N,) int64; the matmuls run in
    compute_dtype, the softmax in float32 (float64 for float64)."""
    n, c = input.shape
    v = weight.shape[0]
    acc = _loss_dtype(compute_dtype)
    eps = float(label_smoothing)
    with torch.autocast(input.device.type, enabled=False):
        h = input.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        valid_all = target != ignore_index
        n_valid = valid_all.sum()
        loss = torch.zeros((), dtype=acc, device=input.device)
        want_grad = input_grad or weight_grad or bias_grad
        if reduction == "mean":
            # 0 valid rows: the loss is 0/0 = nan (as torch's), the gradients are zero.
            row_scale = 1.0 / n_valid.clamp(min=1).to(acc)
        else:
            row_scale = torch.ones((), dtype=acc, device=input.device)
        grad_input = input.new_empty((n, c) if input_grad else (0,))
        grad_weight = torch.zeros((v, c) if weight_grad else (0,), dtype=acc,
                                  device=weight.device)
        grad_bias = torch.zeros((v,) if bias_grad else (0,), dtype=acc, device=weight.device)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h_c = h[start:end]
            valid = valid_all[start:end]
            t_c = torch.where(valid, target[start:end], 0).unsqueeze(1)
            z = h_c @ w.t() if b is None else torch.addmm(b, h_c, w.t())  # (rows, V)
            # One fused kernel: float32 log-probabilities read straight from z.
            logp = torch.log_softmax(z, dim=-1, dtype=acc)
            nll = -logp.gather(1, t_c).squeeze(1)
            if eps > 0.0:
                nll = (1.0 - eps) * nll - eps * logp.mean(1)
            loss = loss + torch.where(valid, nll, torch.zeros_like(nll)).sum()
            if not want_grad:
                continue
            # dz = (softmax(z) - onehot(target)) * scale, scale = valid / n_valid (or valid)
            p = logp.exp_()
            if eps > 0.0:
                p.sub_(eps / v)
            p.scatter_add_(1, t_c, torch.full_like(nll, eps - 1.0).unsqueeze(1))
            scale = (valid.to(acc) * row_scale).unsqueeze(1)
            if compute_dtype == acc:
                dz = p.mul_(scale)
                del z
            else:
                dz = torch.mul(p, scale, out=z)                 # scaled and cast in one pass
            del p, logp
            if input_grad:
                if input.dtype == compute_dtype:
                    torch.mm(dz, w, out=grad_input[start:end])
                else:
                    grad_input[start:end] = dz @ w
            if weight_grad:
                if compute_dtype == acc:
                    grad_weight.addmm_(dz.t(), h_c)
                else:
                    grad_weight.add_(dz.t() @ h_c)              # (V, C) partial, summed in acc
            if bias_grad:
                grad_bias.add_(dz.sum(0, dtype=acc))
        if reduction == "mean":
            loss = loss / n_valid.to(acc)
        grad_weight = grad_weight.to(weight.dtype) if weight_grad else weight.new_empty((0,))
        grad_bias = grad_bias.to(bias.dtype) if bias_grad else weight.new_empty((0,))
    return loss, grad_input, grad_weight, grad_bias


@linear_cross_entropy_fwd.register_fake
def _(input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_size,
      compute_dtype, input_grad, weight_grad, bias_grad):
    loss = input.new_empty((), dtype=_loss_dtype(compute_dtype))
    gi = input.new_empty(tuple(input.shape) if input_grad else (0,))
    gw = weight.new_empty(tuple(weight.shape) if weight_grad else (0,))
    gb = (bias if bias_grad else weight).new_empty(tuple(bias.shape) if bias_grad else (0,))
    return loss, gi, gw, gb


def _setup_context(ctx, inputs, output):
    _, grad_input, grad_weight, grad_bias = output
    ctx.grads = inputs[9:12]  # which gradients the forward computed: input, weight, bias
    ctx.save_for_backward(grad_input, grad_weight, grad_bias)


def _backward(ctx, grad_loss, _grad_gi, _grad_gw, _grad_gb):
    saved = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if any(n and not have for n, have in zip(need, ctx.grads)):
        raise RuntimeError("fastlm.linear_cross_entropy: the forward ran without the gradient "
                           "that backward now asks for")
    gi, gw, gb = (g * grad_loss.to(g.dtype) if n else None for g, n in zip(saved, need))
    return gi, gw, gb, None, None, None, None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, chunk_size=None):
    """F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=..., reduction=...,
    label_smoothing=...), computed in chunks of rows so the full logits never exist.

    input: (..., C); weight: (V, C); bias: (V,) or None; target: (...) class indices in [0, V)
    or ignore_index. reduction: "mean" (over the rows whose target is not ignore_index; nan if
    none, as torch) or "sum" (for gradient accumulation: divide by the total count yourself).
    label_smoothing in [0, 1], as torch's. Under autocast the matmuls run in the autocast
    dtype; the softmax always in float32 (float64 for float64 inputs). chunk_size: rows per
    chunk (default: about 2**26 logits per chunk). Returns the 0-d loss, float32 (float64 for
    float64 inputs).

    The gradients are computed during the forward when autograd will want them (grad mode on
    and input, weight or bias requiring grad), so the backward is a few scalings. The op is
    opaque to torch.compile (any backend, inductor included): one node, ignore_index rows
    handled inside it.
    """
    who = "fastlm.linear_cross_entropy"
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
    if reduction not in _REDUCTIONS:
        raise ArgumentError(f"{who}: reduction must be one of {_REDUCTIONS}, got {reduction!r} "
                            "('none' would need the per-row gradients kept: use "
                            "F.cross_entropy on full logits)")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ArgumentError(f"{who}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight.dim() != 2:
        raise ArgumentError(f"{who}: weight must be 2-D (vocab, features), got shape "
                            f"{list(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ArgumentError(f"{who}: input's last dim ({input.shape[-1]}) must equal weight's "
                            f"features ({weight.shape[1]})")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise ArgumentError(f"{who}: bias must be a ({weight.shape[0]},) tensor (one per "
                            f"class), got {getattr(bias, 'shape', type(bias).__name__)}")
    if target.shape != input.shape[:-1]:
        raise ArgumentError(f"{who}: target must have input's leading shape "
                            f"{list(input.shape[:-1])}, got {list(target.shape)}")
    if target.dtype != torch.int64:
        raise ArgumentTypeError(f"{who}: target must hold int64 class indices, got "
                                f"{target.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ArgumentError(f"{who}: {name} is on {t.device} but input is on "
                                f"{input.device}; expected all on the same device")
    dev = input.device.type
    if torch.is_autocast_enabled(dev) and input.dtype != torch.float64:
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
            raise ArgumentTypeError(f"{who}: input, weight (and bias) must have the same "
                                    f"dtype outside autocast, got {input.dtype}, {weight.dtype}"
                                    + ("" if bias is None else f" and {bias.dtype}"))
        compute_dtype = input.dtype
    h = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_size)
    loss, _, _, _ = torch.ops.fastlm.linear_cross_entropy_fwd(
        h, weight, bias, t, int(ignore_index), reduction, float(label_smoothing), rows,
        compute_dtype, grad_on and input.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad)
    return loss
