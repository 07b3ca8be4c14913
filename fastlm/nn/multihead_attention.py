import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import scaled_dot_product_attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on fastlm's fused attention kernel.

    Same constructor (embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device, dtype), parameters,
    initialisation and state_dict keys as torch.nn.MultiheadAttention, of which it is a
    subclass: either module loads the other's state_dict. ``forward`` takes torch's arguments
    (key_padding_mask and attn_mask bool or float, 2-D or 3-D attn_mask, need_weights,
    average_attn_weights, is_causal) and returns torch's ``(attn_output, attn_weights)``.

    With ``need_weights=False`` (the fast path) the in-projection is one matmul for
    self-attention (two for ``key is value``), the heads are views, attention runs in
    :func:`fastlm.scaled_dot_product_attention` with the merged mask (bool masks stay bool,
    broadcast dims unexpanded; with the ``is_causal`` hint and no key_padding_mask the mask is
    dropped and the kernel runs causal, as torch), then the out-projection. With
    ``need_weights=True`` the weights are materialized in plain PyTorch ops, as torch does.

    Differences from torch, deliberate:

    - A query row that may attend to no key (every key masked) attends to nothing: its
      attention is zeros (so its output is the out-projection's bias), its returned weights
      are zeros and its gradients are finite, on both paths. torch's need_weights=True path
      gives NaN there (its fused path gives zeros or NaN depending on its SDPA backend). These
      are the semantics of :func:`fastlm.scaled_dot_product_attention`.
    - Dropout with ``need_weights=False`` uses fastlm's counter-based dropout bits (see
      docs/attention.md): the same distribution and reproducible under ``torch.manual_seed``,
      but not the same random mask as torch's. With ``need_weights=True`` the weights go
      through ``torch.nn.functional.dropout`` as in torch.
    - No NestedTensor inputs (torch accepts them only on its inference fast path).
    - ``torch.jit.script`` compiles it (as torch's); the scripted module runs torch's own
      computation (F.multi_head_attention_forward), not fastlm's kernels: TorchScript cannot
      compile fastlm's backend dispatch.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():
            # TorchScript compiles this branch only (the call below is never compiled): the
            # scripted module runs torch's own computation (docs/fidelity.md).
            return self._scripted_forward(query, key, value, key_padding_mask, need_weights,
                                          attn_mask, average_attn_weights, is_causal)
        return self._fastlm_forward(query, key, value, key_padding_mask, need_weights,
                                    attn_mask, average_attn_weights, is_causal)

    def _scripted_forward(self, query: Tensor, key: Tensor, value: Tensor,
                          key_padding_mask: Optional[Tensor], need_weights: bool,
                          attn_mask: Optional[Tensor], average_attn_weights: bool,
                          is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """torch.nn.MultiheadAttention's computation (its path without the inference fast
        path), written so TorchScript compiles it: F.multi_head_attention_forward in the
        sequence-first layout."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def _fastlm_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError(
                "fastlm.nn.MultiheadAttention does not take NestedTensor inputs: pad the "
                "sequences and pass a key_padding_mask")
        is_batched = _check_shapes(query, key, value, key_padding_mask, attn_mask,
                                   self.num_heads)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.")

        # Work in one of two layouts, features last: batch-first (N, T, E) or seq-first
        # (T, N, E). Unbatched input is batch-first with N = 1.
        self_attn = query is key and key is value
        kv_same = key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        bf = self.batch_first or not is_batched
        sd = 1 if bf else 0  # the sequence dim
        bd = 1 - sd          # the batch dim
        E, H = self.embed_dim, self.num_heads
        hd = self.head_dim
        N, L, S = query.shape[bd], query.shape[sd], key.shape[sd]
        self._check_dims(query, key, value, bd)

        # The causal hint replaces the mask only when it is the only mask and no weights are
        # wanted (torch's rule); otherwise the mask given is used.
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if attn_mask is not None:
            attn_mask = _check_attn_mask(attn_mask, N, H, L, S)
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != N:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {N}, but got "
                                     f"{key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != S:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {S}, but got "
                                     f"{key_padding_mask.shape[1]}")

        q, k, v = self._in_projection(query, key, value, self_attn, kv_same)

        # Extra keys at the end of the sequence: bias_k/bias_v, then a zero key/value. Each
        # gets an extra mask column that lets every query attend to it.
        extra = []
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k, self.bias_v))
        if self.add_zero_attn:
            extra.append((None, None))
        for bk, bv in extra:
            shape = list(k.shape)
            shape[sd] = 1
            if bk is None:
                bk = bv = k.new_zeros(shape)
            k = torch.cat([k, bk.to(k.dtype).expand(shape)], sd)
            v = torch.cat([v, bv.to(v.dtype).expand(shape)], sd)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S = k.shape[sd]

        # Heads: (N, H, T, hd) views of the projections.
        def heads(x):
            x = x.unflatten(-1, (H, hd))
            return x.transpose(1, 2) if bf else x.permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        masked, additive = _merge_masks(attn_mask, key_padding_mask, N, S, query.dtype)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            o, weights = _attention_with_weights(q, k, v, masked, additive, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            mask = additive if masked is None else ~masked
            o = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=causal)
            weights = None

        o = o.transpose(1, 2).reshape(N, L, E) if bf else o.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(o, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(0)
        return out, weights

    def _check_dims(self, query, key, value, bd):
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but "
                                 f"got {query.shape[-1]}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape "
                                     f"{value.shape}")
        else:
            if key.shape[:-1] != value.shape[:-1]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not "
                                     f"match value's {value.shape[:-1]}")
            for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
                if t.shape[-1] != dim:
                    raise AssertionError(f"expecting {name} embedding dimension of {dim} "
                                         f"({name[0]}dim), but got {t.shape[-1]}")
        if key.shape[bd] != query.shape[bd]:
            raise RuntimeError(f"key and value have batch size {key.shape[bd]} but query has "
                               f"{query.shape[bd]}")

    def _in_projection(self, query, key, value, self_attn, kv_same):
        """q, k, v = query W_q^T + b_q, key W_k^T + b_k, value W_v^T + b_v, in the inputs'
        layout; one matmul for self-attention, two when key is value."""
        E = self.embed_dim
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attn:
                return F.linear(query, w, b).chunk(3, dim=-1)
            if kv_same:
                w_q, w_kv = w.split([E, 2 * E])
                b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
                k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
                return F.linear(query, w_q, b_q), k, v
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _check_shapes(query, key, value, key_padding_mask, attn_mask, num_heads):
    """torch's checks of the input ranks (AssertionError); returns whether input is batched."""
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")
    batched = query.dim() == 3
    what = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {what} `query`, expected `key` and `value` to be "
                             f"{query.dim()}-D but found {key.dim()}-D and {value.dim()}-D "
                             "tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(f"For {what} `query`, expected `key_padding_mask` to be `None` or "
                             f"{query.dim() - 1}-D but found {key_padding_mask.dim()}-D tensor "
                             "instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For {what} `query`, expected `attn_mask` to be `None`, 2-D or "
                                 f"3-D but found {attn_mask.dim()}-D tensor instead")
        if not batched and attn_mask.dim() == 3:
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got "
                                     f"{attn_mask.shape}")
    return batched


def _check_mask_dtype(mask, name):
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _check_attn_mask(attn_mask, N, H, L, S):
    """attn_mask as (L, S) or (N, H, L, S): torch's shape checks (RuntimeError)."""
    if attn_mask.dim() == 2:
        if attn_mask.shape != (L, S):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should "
                               f"be {(L, S)}.")
        return attn_mask
    if attn_mask.shape != (N * H, L, S):
        raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                           f"{(N * H, L, S)}.")
    return attn_mask.view(N, H, L, S)


def _merge_masks(attn_mask, key_padding_mask, N, S, dtype):
    """(masked, additive): a bool mask (True = may not attend) when every mask given is bool,
    else a float mask added to the scores (bool masks become -inf there, as in torch). Either
    broadcasts to (N, H, L, S) and is not expanded; both None without masks."""
    kpm = None if key_padding_mask is None else key_padding_mask.view(N, 1, 1, S)
    masks = [m for m in (attn_mask, kpm) if m is not None]
    if not masks:
        return None, None
    if all(m.dtype == torch.bool for m in masks):
        return (masks[0] if len(masks) == 1 else masks[0] | masks[1]), None
    masks = [torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
             if m.dtype == torch.bool else m for m in masks]
    return None, (masks[0] if len(masks) == 1 else masks[0] + masks[1])


def _attention_with_weights(q, k, v, masked, additive, dropout_p):
    """Attention that materializes the (N, H, L, S) weights, as torch's need_weights path:
    softmax(q k^T / sqrt(hd) + mask), dropout on the weights, weights @ v. A row with every
    key masked gets zero weights (and zero gradients) instead of NaN."""
    s = torch.matmul(q * math.sqrt(1.0 / q.shape[-1]), k.transpose(-2, -1))
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    elif additive is not None:
        s = s + additive.to(s.dtype)  # torch's baddbmm: the scores' dtype (autocast included)
    if masked is not None or additive is not None:
        empty = torch.isneginf(s).all(dim=-1, keepdim=True)
        w = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        w = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p)
    return torch.matmul(w, v), w
