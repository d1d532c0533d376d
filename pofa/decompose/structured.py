"""Structured pruning of attention heads and feed-forward neurons, as ROSITA (Liu et al., AAAI 2021) compresses BERT
before (and together with) low-rank factorization and distillation.

Each encoder block keeps the `heads` fraction of its attention heads and the `ffn` fraction of its feed-forward
neurons with the largest magnitude importance: a head scores the squared norm of its rows of Q, K, V and of its
columns of the attention output; a neuron, the product of the norms of its row of the FFN input and its column of
the FFN output. The Linears are sliced (new, smaller `nn.Linear`s), so the model really shrinks and runs faster.
transformers 5 has no `prune_heads` any more; its attention views Q/K/V as [..., -1, head_size], so a block with
fewer heads runs unchanged. The kept counts per block are recorded for `load_decomposed`.

    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.decompose.common import base_of, record_, set_submodule
from pofa.families import FamilyError, family_of

# Per family: (query, key, value, attention output, FFN input, FFN output) relative to a block.
_BERT_LIKE = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
BLOCK_LINEARS = {
    "BERT": _BERT_LIKE,
    "RoBERTa": _BERT_LIKE,
    "ELECTRA": _BERT_LIKE,
    "DistilBERT": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                   "ffn.lin2"),
}


@dataclass(frozen=True)
class StructuredConfig:
    """Fractions kept per encoder block (at least one head and one neuron always stay)."""

    heads: float = 1.0
    """Fraction of attention heads kept (0 < heads <= 1)."""
    ffn: float = 1.0
    """Fraction of feed-forward neurons kept (0 < ffn <= 1)."""

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"StructuredConfig.{name} must be in (0, 1], got {value!r}")


def _slice(linear: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the output rows (dim 0) or input columns (dim 1) in `keep`."""
    weight = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype,
                    device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, keep))
    return out


def head_scores(q: Tensor, k: Tensor, v: Tensor, o: Tensor, head_size: int) -> Tensor:
    """Per head: sum of squares of its rows of Q, K, V and its columns of the output projection."""
    rows = sum(w.float().square().reshape(-1, head_size, w.shape[1]).sum(dim=(1, 2)) for w in (q, k, v))
    return rows + o.float().square().reshape(o.shape[0], -1, head_size).sum(dim=(0, 2))


def neuron_scores(w_in: Tensor, w_out: Tensor) -> Tensor:
    """Per FFN neuron: ||row of the input Linear|| * ||column of the output Linear||."""
    return w_in.float().norm(dim=1) * w_out.float().norm(dim=0)


def top(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` largest scores, in increasing index order (the kept units keep their order)."""
    return scores.topk(count).indices.sort().values


def encoder_blocks(model: nn.Module) -> list[str]:
    """Names (relative to the base model) of the family's encoder blocks, in order."""
    pattern = re.compile(family_of(model).blocks)
    names = []
    for fqn, _ in base_of(model).named_modules():
        match = pattern.search(fqn + ".")
        if match is not None and match.end() == len(fqn) + 1:
            names.append(fqn)
    return names


def _paths(model: nn.Module) -> tuple[str, ...]:
    family = family_of(model)
    if family.name not in BLOCK_LINEARS:
        raise FamilyError(f"structured pruning: {family.name} blocks are not mapped (known: "
                          f"{', '.join(BLOCK_LINEARS)}); add their Q/K/V/O/FFN names to "
                          "pofa.decompose.structured.BLOCK_LINEARS")
    return BLOCK_LINEARS[family.name]


def _apply(model: nn.Module, block: str, head_keep: Tensor, ffn_keep: Tensor) -> None:
    base = base_of(model)
    q, k, v, o, f_in, f_out = (f"{block}.{p}" for p in _paths(model))
    head_size = model.config.hidden_size // model.config.num_attention_heads
    rows = (head_keep[:, None] * head_size + torch.arange(head_size, device=head_keep.device)).flatten()
    for name in (q, k, v):
        set_submodule(base, name, _slice(base.get_submodule(name), rows, 0))
    set_submodule(base, o, _slice(base.get_submodule(o), rows, 1))
    set_submodule(base, f_in, _slice(base.get_submodule(f_in), ffn_keep, 0))
    set_submodule(base, f_out, _slice(base.get_submodule(f_out), ffn_keep, 1))


def prune_structured_(model: nn.Module, config: StructuredConfig) -> nn.Module:
    """Remove the least important heads and FFN neurons of every encoder block, in place; returns `model`.

    Raises FamilyError for a family whose block Linears are not mapped, ValueError when a block's Linears are not
    plain `nn.Linear`s (structured pruning comes before factorization)."""
    base = base_of(model)
    head_size = model.config.hidden_size // model.config.num_attention_heads
    table = {}
    for block in encoder_blocks(model):
        linears = [base.get_submodule(f"{block}.{p}") for p in _paths(model)]
        if any(type(m) is not nn.Linear for m in linears):
            raise ValueError(f"prune_structured_: {block} holds factorized or quantized modules; prune heads and "
                             "neurons before low-rank / Kronecker / tensor factorization and QAT")
        q, k, v, o, f_in, f_out = (m.weight.detach() for m in linears)
        heads = q.shape[0] // head_size
        head_keep = top(head_scores(q, k, v, o, head_size), max(1, round(config.heads * heads)))
        ffn_keep = top(neuron_scores(f_in, f_out), max(1, round(config.ffn * f_in.shape[0])))
        _apply(model, block, head_keep, ffn_keep)
        table[block] = {"heads": head_keep.tolist(), "ffn": int(ffn_keep.numel())}
    record_(model, "structured", {"modules": table})
    return model


def rebuild_structured_(model: nn.Module, entry: dict) -> None:
    for block, kept in entry.get("modules", {}).items():
        _apply(model, block, torch.tensor(kept["heads"]), torch.arange(kept["ffn"]))
