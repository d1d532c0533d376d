"""A BERT block on the sparse int8 runtime as one short function: the same arithmetic, a tenth of the calls.

At batch 1 a transformers BERT layer spends more time in Python (about 15 module calls and 50 tensor operations per
block, ~0.35 ms on the 2-core test machine) than in its attention. For families whose blocks are BERT's post-LayerNorm
layer under BERT's names (:attr:`pofa.families.ModelFamily.bert_blocks`), :func:`short_bert_blocks_` gives each
block a forward that calls the kernels and torch directly:

    qkv = one kernel call (query, key and value of the shared input)       [B, S, 3D]
    a = LayerNorm(attention.output.dense(SDPA(q, k, v, mask)) + x)         residual added in the kernel call
    y = LayerNorm(output.dense(GELU(intermediate.dense(a))) + a)           GELU and residual in the kernel calls

It computes what the block's own forward computes with the runtime's modules (scaled dot-product attention with
the mask the model built, the same LayerNorms, the same float additions), so the logits agree to float rounding.
A call the short path does not cover runs the block's own forward: cross-attention or a cache (decoders), attention
weights requested (``output_attentions``), training mode, an attention implementation other than ``sdpa`` or
``eager``, or any other argument it does not know. Hooks on modules
inside a block do not fire on the short path (the block's own hooks do, so ``output_hidden_states`` works);
``sparse_int8_(model, fuse=False)`` keeps every module's forward.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pofa.runtime.int8 import SparseInt8Linear

__all__ = ["ShortBertBlock", "short_bert_blocks_"]

# Arguments the short path ignores whatever their value (every other one must be None or False: an encoder
# attention mask, a cache, attention weights asked for): position ids are the embeddings' business, hidden states
# are recorded by a hook on the block itself.
_IGNORED = frozenset({"position_ids", "output_hidden_states"})
# Attention implementations whose result scaled dot-product attention reproduces (eager: the same softmax in fp32).
_ATTENTION = ("sdpa", "eager")


class ShortBertBlock:
    """The forward of one BERT-layout block whose Linears are on the sparse int8 runtime (set as the block's
    ``forward``); anything it does not cover goes to the block class's own forward."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def covers(self, hidden_states: Tensor, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether the short path computes this call as the block's own forward would."""
        block = self.block
        return (not block.training and hidden_states.dim() == 3 and all(a is None for a in args)
                and all(v is None or v is False for k, v in kwargs.items() if k not in _IGNORED)
                and block.attention.self.config._attn_implementation in _ATTENTION)

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        block = self.block
        if not self.covers(hidden_states, args, kwargs):
            return type(block).forward(block, hidden_states, attention_mask, *args, **kwargs)
        attention = block.attention.self
        batch, length, _ = hidden_states.shape
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        qkv = attention.query.shared.stacked(hidden_states)
        q, k, v = qkv.view(batch, length, 3, heads, head_size).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attention.scaling)
        context = context.transpose(1, 2).reshape(batch, length, heads * head_size)
        after_attention = _layer_norm(block.attention.output.LayerNorm,
                                      block.attention.output.dense.forward(context, residual=hidden_states))
        inner = block.intermediate.dense.forward(after_attention)
        return _layer_norm(block.output.LayerNorm, block.output.dense.forward(inner, residual=after_attention))

    def __reduce__(self) -> tuple:
        return ShortBertBlock, (self.block,)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _is_short_path_ready(block: nn.Module) -> bool:
    """Whether ``block`` has BERT's layout with the runtime's fusions in place: query, key and value sharing one
    call in that order, the feed-forward activation fused, no cross-attention, no chunked feed-forward."""
    try:
        attention = block.attention.self
        q, k, v = attention.query, attention.key, attention.value
        outputs = (block.attention.output.dense, block.intermediate.dense, block.output.dense)
        norms = (block.attention.output.LayerNorm, block.output.LayerNorm)
        activation = block.intermediate.intermediate_act_fn
    except AttributeError:
        return False
    shared = getattr(q, "shared", None)
    return (all(isinstance(m, SparseInt8Linear) for m in (q, k, v, *outputs))
            and shared is not None and [id(m) for m in shared.members] == [id(q), id(k), id(v)]
            and all(m.shared is None for m in outputs) and outputs[1].activation is not None
            and isinstance(activation, nn.Identity) and all(isinstance(n, nn.LayerNorm) for n in norms)
            and not getattr(block, "is_decoder", False) and not hasattr(block, "crossattention")
            and not getattr(block, "chunk_size_feed_forward", 0)
            and isinstance(getattr(attention, "scaling", None), float))


def short_bert_blocks_(model: nn.Module) -> int:
    """Give every block of a BERT-layout family (``bert_blocks`` in :mod:`pofa.families`) that
    :func:`pofa.runtime.sparse_int8_` has fused the short forward; return how many. Blocks of other families, or
    not fully on the runtime, keep their own forward."""
    from pofa.families import UnknownFamilyError, family_of

    try:
        family = family_of(model)
    except UnknownFamilyError:
        return 0
    if not family.bert_blocks:
        return 0
    count = 0
    for name, module in model.named_modules():
        found = family.block_pattern.search(name + ".")
        if found and found.end() == len(name) + 1 and _is_short_path_ready(module):
            module.forward = ShortBertBlock(module)
            count += 1
    return count
