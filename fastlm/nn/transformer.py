"""Drop-in torch.nn Transformer modules built from fastlm's LayerNorm and MultiheadAttention.

Each class here subclasses its torch.nn twin and keeps the twin's constructor, defaults,
attributes, forward signature and state_dict keys. The constructor runs torch's own, so the
parameters are created and initialised exactly as torch does (the same random draws under
the same seed), and then re-classes the torch submodules in place as their fastlm twins
(fastlm.patch): the attention blocks become fastlm.nn.MultiheadAttention and the norms
fastlm.nn.LayerNorm, keeping their Parameter objects. The forward passes are torch's
"slow path" (the definition of the layer) with the inference fast path taken out:
torch._transformer_encoder_layer_fwd and the nested-tensor conversion of
torch.nn.TransformerEncoder would read the weights and run torch's fused kernels, bypassing
fastlm's, so fastlm's modules never take them, in training or in eval. (A fastlm layer inside
a torch.nn.TransformerEncoder still accepts the nested tensors that torch's encoder makes on
its inference fast path: it runs them padded, on fastlm's kernels.)
"""

import warnings
from collections.abc import Callable
from typing import Any, Optional

from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import add_layer_norm as _aln
from .layer_norm import LayerNorm


def _fastlm_submodules(module):
    """Re-class the torch LayerNorm / MultiheadAttention / Transformer submodules of `module`
    (not `module` itself when it is already a fastlm module) as fastlm's, in place."""
    from ..patch import patch  # deferred: fastlm.patch maps onto this module's classes

    patch(module)


def _check_not_nested(t, who, name):
    if t.is_nested:
        raise NotImplementedError(
            f"{who}: {name} is a nested tensor; fastlm's Transformer modules take padded tensors "
            "with a key padding mask (they never use torch's nested-tensor fast path)")


def _seq_len(src: Tensor, batch_first: bool):
    """The sequence length of a batched (batch_first or not) or unbatched input."""
    if src.dim() == 2:
        return src.size(0)
    return src.size(1 if batch_first else 0)


def _detect_causal(mask, is_causal, size):
    """torch's rule (torch.nn.modules.transformer._detect_is_causal_mask): an explicit
    is_causal hint wins; with None, a 2-D mask equal to the causal mask of the sequence length
    counts as causal. A bool mask is compared with its bool form (True above the diagonal):
    torch's encoder compares it after converting it to -inf / 0, the same test; torch's
    decoder compares the bool mask itself with the float causal mask and so never detects
    one, where fastlm's does. The hint changes no result: with no key padding mask the
    attention runs its causal kernel instead of reading the mask, otherwise it is ignored."""
    if is_causal is not None or mask is None:
        return is_causal is True
    if mask.dtype == torch.bool:
        causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    else:
        causal = torch.nn.Transformer.generate_square_subsequent_mask(
            size, device=mask.device, dtype=mask.dtype)
    if mask.size() != causal.size():
        return False
    return bool((mask == causal).all())


def _fusable(layer, base, norms, drops):
    """Whether `layer` may run its residual adds, dropouts and LayerNorms as fused
    fastlm.add_layer_norm calls: its blocks are the base class's own (a subclass that
    overrides _sa_block / _mha_block / _ff_block keeps the unfused definition), the norms and
    dropouts are still fastlm LayerNorm and Dropout modules, and none of them has a hook (the
    fused kernel does not call those modules, so their hooks would not run)."""
    cls = type(layer)
    return (all(getattr(cls, m) is getattr(base, m) for m in ("_sa_block", "_ff_block",
                                                              "_mha_block") if hasattr(base, m))
            and all(type(n) is LayerNorm for n in norms)
            and all(type(d) is torch.nn.Dropout for d in drops)
            and no_hooks(*norms, *drops))


def no_hooks(*modules):
    """Whether calling these modules would run no hook (theirs or a global one)."""
    g = torch.nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in modules)


def add_norm(branch, residual, norm, drop):
    """(norm(residual + drop(branch)), residual + drop(branch)) in one fused kernel."""
    return _aln.add_layer_norm(branch, residual, norm.normalized_shape, norm.weight, norm.bias,
                          norm.eps, drop.p if drop.training else 0.0)


def _as_float_mask(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _check_masks(mask, mask_name, padding, padding_name, dtype):
    """The checks of torch's F._canonical_mask on an attention mask and a key padding mask:
    bool or floating (AssertionError), and the deprecation warning when their types differ.
    Unlike torch, a bool mask stays bool when the other mask is bool or absent: fastlm's
    attention takes it as it is (True may not attend: the same function as torch's -inf),
    and reads 1 byte per element instead of 4. Masks of different types are made float, as
    torch does."""
    for m, name in ((padding, padding_name), (mask, mask_name)):
        if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
            raise AssertionError(f"only bool and floating types of {name} are supported")
    if mask is not None and padding is not None and mask.dtype != padding.dtype:
        warnings.warn(f"Support for mismatched {padding_name} and {mask_name} is deprecated. "
                      "Use same type for both instead.", stacklevel=3)
        mask, padding = _as_float_mask(mask, dtype), _as_float_mask(padding, dtype)
    return mask, padding


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on fastlm's attention and LayerNorm.

    Same constructor (d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype),
    initialisation, attributes, state_dict keys and forward(src, src_mask=None,
    src_key_padding_mask=None, is_causal=False) as torch's, of which it is a subclass.
    self_attn is a fastlm.nn.MultiheadAttention and norm1, norm2 are fastlm.nn.LayerNorm.
    The inference fast path of torch's layer (torch._transformer_encoder_layer_fwd, nested
    tensors) is never taken: eval runs the same computation as training, on fastlm's kernels.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                         batch_first, norm_first, bias, device=device, dtype=dtype)
        _fastlm_submodules(self)

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._scripted_forward(src, src_mask, src_key_padding_mask, is_causal)
        if src.is_nested:
            return self._forward_nested(src, src_mask, src_key_padding_mask, is_causal)
        src_mask, src_key_padding_mask = _check_masks(
            src_mask, "src_mask", src_key_padding_mask, "src_key_padding_mask", src.dtype)
        x = src
        if _fusable(self, TransformerEncoderLayer, (self.norm1, self.norm2),
                    (self.dropout1, self.dropout2)):
            # The same computation with each residual add + dropout + LayerNorm fused.
            if self.norm_first:
                a = self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
                h, x = add_norm(a, x, self.norm2, self.dropout1)
                return x + self._ff_block(h)
            a = self._sa(x, src_mask, src_key_padding_mask, is_causal)
            x = add_norm(a, x, self.norm1, self.dropout1)[0]
            return add_norm(self._ff(x), x, self.norm2, self.dropout2)[0]
        return self._unfused(x, src_mask, src_key_padding_mask, is_causal)

    def _scripted_forward(self, src: Tensor, src_mask: Optional[Tensor],
                          src_key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """torch's layer without its inference fast path, for TorchScript: the masks made
        float as torch does (F._canonical_mask), the blocks unfused; the submodules are
        scripted as theirs (torch's computation)."""
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None,
                                     other_name="", target_type=src.dtype, check_other=False)
        return self._unfused(src, src_mask, src_key_padding_mask, is_causal)

    def _unfused(self, x: Tensor, src_mask: Optional[Tensor],
                 src_key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """The layer's definition, block by block (torch's slow path)."""
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
            is_causal: bool = False) -> Tensor:
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False, is_causal=is_causal)[0]

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        return self.dropout1(self._sa(x, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self._ff(x))

    def _forward_nested(self, src, src_mask, src_key_padding_mask, is_causal):
        """A nested (batch, ragged length, d_model) src, as torch.nn.TransformerEncoder passes
        to its layers on its inference fast path: run padded, with the padding as key padding
        mask, on fastlm's kernels, and give back a nested tensor of the same lengths."""
        who = "fastlm.nn.TransformerEncoderLayer"
        if src_mask is not None or src_key_padding_mask is not None:
            raise NotImplementedError(f"{who}: neither src_mask nor src_key_padding_mask is "
                                      "supported with a nested src (as torch)")
        if not self.self_attn.batch_first:
            raise NotImplementedError(f"{who}: a nested src needs batch_first=True")
        lengths = [t.size(0) for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)
        steps = torch.arange(padded.size(1), device=padded.device)
        padding = steps >= torch.tensor(lengths, device=padded.device).unsqueeze(1)
        out = self.forward(padded, src_key_padding_mask=padding, is_causal=is_causal)
        return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)])


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer on fastlm's attention and LayerNorm.

    Same constructor, defaults, initialisation, attributes, state_dict keys and
    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False) as torch's, of
    which it is a subclass. self_attn and multihead_attn are fastlm.nn.MultiheadAttention and
    norm1, norm2, norm3 are fastlm.nn.LayerNorm.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                         batch_first, norm_first, bias, device=device, dtype=dtype)
        _fastlm_submodules(self)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's layer
            return self._unfused(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                 memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        _check_not_nested(tgt, "fastlm.nn.TransformerDecoderLayer", "tgt")
        x = tgt
        norms, drops = (self.norm1, self.norm2, self.norm3), (self.dropout1, self.dropout2,
                                                              self.dropout3)
        if _fusable(self, TransformerDecoderLayer, norms, drops):
            # The same computation with each residual add + dropout + LayerNorm fused.
            if self.norm_first:
                a = self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
                h, x = add_norm(a, x, self.norm2, self.dropout1)
                a = self._mha(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
                h, x = add_norm(a, x, self.norm3, self.dropout2)
                return x + self._ff_block(h)
            a = self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = add_norm(a, x, self.norm1, self.dropout1)[0]
            a = self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = add_norm(a, x, self.norm2, self.dropout2)[0]
            return add_norm(self._ff(x), x, self.norm3, self.dropout3)[0]
        return self._unfused(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                             memory_key_padding_mask, tgt_is_causal, memory_is_causal)

    def _unfused(self, x: Tensor, memory: Tensor, tgt_mask: Optional[Tensor],
                 memory_mask: Optional[Tensor], tgt_key_padding_mask: Optional[Tensor],
                 memory_key_padding_mask: Optional[Tensor], tgt_is_causal: bool,
                 memory_is_causal: bool) -> Tensor:
        """The layer's definition, block by block (torch's slow path)."""
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask,
                                    memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
            is_causal: bool = False) -> Tensor:
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              is_causal=is_causal, need_weights=False)[0]

    def _mha(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor],
             key_padding_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        return self.multihead_attn(x, mem, mem, attn_mask=attn_mask,
                                   key_padding_mask=key_padding_mask, is_causal=is_causal,
                                   need_weights=False)[0]

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        return self.dropout1(self._sa(x, attn_mask, key_padding_mask, is_causal))

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        return self.dropout2(self._mha(x, mem, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self._ff(x))


_NESTED_WARNING = "enable_nested_tensor is True, but self.use_nested_tensor is False"


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder whose layers run on fastlm's kernels.

    Same constructor (encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
    mask_check=True), attributes, state_dict keys and forward(src, mask=None,
    src_key_padding_mask=None, is_causal=None) as torch's. The layer copies are fastlm
    modules: copies of a torch.nn.TransformerEncoderLayer become
    fastlm.nn.TransformerEncoderLayer, torch LayerNorm / MultiheadAttention inside any layer
    become fastlm's, and a torch.nn.LayerNorm passed as `norm` is re-classed in place (torch
    keeps that very object too). enable_nested_tensor is stored as given but nested tensors
    are never used (use_nested_tensor is False, without torch's warning about it): fastlm's
    attention takes the padding mask directly.
    """

    def __init__(self, encoder_layer: torch.nn.Module, num_layers: int,
                 norm: torch.nn.Module | None = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NESTED_WARNING)
            super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        self.use_nested_tensor = False
        _fastlm_submodules(self)

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._scripted_forward(src, mask, src_key_padding_mask, is_causal)
        _check_not_nested(src, "fastlm.nn.TransformerEncoder", "src")
        mask, src_key_padding_mask = _check_masks(
            mask, "mask", src_key_padding_mask, "src_key_padding_mask", src.dtype)
        batch_first = self.layers[0].self_attn.batch_first
        is_causal = _detect_causal(mask, is_causal, _seq_len(src, batch_first))
        return self._layers(src, mask, src_key_padding_mask, is_causal)

    def _scripted_forward(self, src: Tensor, mask: Optional[Tensor],
                          src_key_padding_mask: Optional[Tensor],
                          is_causal: Optional[bool]) -> Tensor:
        """torch's encoder without nested tensors, for TorchScript."""
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        causal = _detect_is_causal_mask(mask, is_causal,
                                        _get_seq_len(src, self.layers[0].self_attn.batch_first))
        return self._layers(src, mask, src_key_padding_mask, causal)

    def _layers(self, output: Tensor, mask: Optional[Tensor],
                src_key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """The layers, then the final norm."""
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal,
                         src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder whose layers run on fastlm's kernels.

    Same constructor (decoder_layer, num_layers, norm=None), attributes, state_dict keys and
    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False) as torch's; the
    layer copies and the norm are made fastlm modules as in TransformerEncoder.
    """

    def __init__(self, decoder_layer: torch.nn.Module, num_layers: int,
                 norm: torch.nn.Module | None = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        _fastlm_submodules(self)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._scripted_forward(tgt, memory, tgt_mask, memory_mask,
                                          tgt_key_padding_mask, memory_key_padding_mask,
                                          tgt_is_causal, memory_is_causal)
        _check_not_nested(tgt, "fastlm.nn.TransformerDecoder", "tgt")
        batch_first = self.layers[0].self_attn.batch_first
        tgt_is_causal = _detect_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        return self._layers(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                            memory_key_padding_mask, tgt_is_causal, memory_is_causal)

    def _scripted_forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor],
                          memory_mask: Optional[Tensor], tgt_key_padding_mask: Optional[Tensor],
                          memory_key_padding_mask: Optional[Tensor],
                          tgt_is_causal: Optional[bool], memory_is_causal: bool) -> Tensor:
        """torch's decoder, for TorchScript (torch's causal-mask detection)."""
        causal = _detect_is_causal_mask(
            tgt_mask, tgt_is_causal, _get_seq_len(tgt, self.layers[0].self_attn.batch_first))
        return self._layers(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                            memory_key_padding_mask, causal, memory_is_causal)

    def _layers(self, output: Tensor, memory: Tensor, tgt_mask: Optional[Tensor],
                memory_mask: Optional[Tensor], tgt_key_padding_mask: Optional[Tensor],
                memory_key_padding_mask: Optional[Tensor], tgt_is_causal: bool,
                memory_is_causal: bool) -> Tensor:
        """The layers, then the final norm."""
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer on fastlm's kernels.

    Same constructor (d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation=relu, custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True,
    device, dtype), initialisation (torch's, random draw for random draw), state_dict keys,
    forward and generate_square_subsequent_mask as torch's. The encoder and decoder it builds
    are fastlm.nn.TransformerEncoder / TransformerDecoder of fastlm layers with
    fastlm.nn.LayerNorm final norms; a custom_encoder / custom_decoder is used as given (as
    torch does; fastlm.patch converts one built from torch modules).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = F.relu,
                 custom_encoder: Any | None = None, custom_decoder: Any | None = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        # torch builds its own layers (and initialises every parameter); they are re-classed
        # as fastlm's below, so the parameters and the random draws are exactly torch's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NESTED_WARNING)
            super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers,
                             dim_feedforward, dropout, activation, custom_encoder,
                             custom_decoder, layer_norm_eps, batch_first, norm_first, bias,
                             device=device, dtype=dtype)
        if custom_encoder is None:
            _fastlm_submodules(self.encoder)
        if custom_decoder is None:
            _fastlm_submodules(self.decoder)
