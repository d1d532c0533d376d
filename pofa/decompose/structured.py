"""Structured pruning of attention heads and feed-forward neurons, as ROSITA (Liu et al., AAAI 2021) compresses BERT
before (and together with) low-rank factorization and distillation.

Each encoder block keeps the `heads` fraction of the model's attention heads and the `ffn` fraction of its
feed-forward neurons (fractions of the *original* counts, `config.num_attention_heads` and the intermediate size, so
that the iterative schedule, `pofa.decompose.schedule`, can call it again with smaller fractions), those with the
largest magnitude importance: a head scores the squared norm of its rows of every Linear that produces per-head
outputs (Q, K, V; DeBERTa's position projections) and of its columns of the attention output; a neuron, the norm of
its rows of the FFN input (both halves of a gated one) times the norm of its column of the FFN output. (ROSITA
scores with accumulated first-order Taylor terms |w * grad| instead; magnitude needs no gradient pass.) The Linears
are sliced (new, smaller `nn.Linear`s, or `LowRankLinear`s whose outer factors are sliced), so the model really
shrinks and runs faster. The kept heads (as indices of the original heads) and neuron counts per block are recorded
for `load_decomposed`.

    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))

Families (`BLOCKS`): BERT, RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2 (its attention reshapes by its
`num_attention_heads`, which is updated; its unshared `pos_key_proj` / `pos_query_proj` lose the same heads), MPNet
(the encoder computes one relative-position bias for all heads and all layers: each pruned layer selects its kept
heads from it, by a forward pre-hook on its attention that `rebuild_structured_` restores at load) and ModernBERT (its
fused `Wqkv` holds Q, K, V as three chunks of heads, its gated `Wi` input and gate as two chunks of neurons: both are
sliced chunk by chunk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.decompose.common import Swap, base_of, decomposition_record, record_, set_submodule
from pofa.families import FamilyError, family_of


@dataclass(frozen=True)
class BlockLayout:
    """Where one family's heads and neurons live, relative to an encoder block."""

    attention: str
    """The module that holds the attention's head-count attributes (`num_attention_heads`, `all_head_size`)."""
    head_rows: tuple[tuple[str, int], ...]
    """(Linear, chunks): output rows laid out [chunks, heads, head_size] (Q, K, V; ModernBERT's Wqkv: 3 chunks)."""
    head_columns: str
    """The attention output Linear: input columns laid out [heads, head_size]."""
    ffn_rows: tuple[str, int]
    """(FFN input Linear, chunks): output rows laid out [chunks, neurons] (ModernBERT's gated Wi: 2 chunks)."""
    ffn_columns: str
    """The FFN output Linear: input columns, one per neuron."""
    optional: tuple[str, ...] = ()
    """`head_rows` Linears that only some configs have (DeBERTa's unshared position projections)."""
    position_bias: bool = False
    """The attention receives a bias for every original head (MPNet): select the kept ones."""


_BERT_LIKE = BlockLayout("attention.self", (("attention.self.query", 1), ("attention.self.key", 1),
                                            ("attention.self.value", 1)),
                         "attention.output.dense", ("intermediate.dense", 1), "output.dense")
BLOCKS: dict[str, BlockLayout] = {
    "BERT": _BERT_LIKE,
    "RoBERTa": _BERT_LIKE,
    "ELECTRA": _BERT_LIKE,
    "DistilBERT": BlockLayout("attention", (("attention.q_lin", 1), ("attention.k_lin", 1), ("attention.v_lin", 1)),
                              "attention.out_lin", ("ffn.lin1", 1), "ffn.lin2"),
    "DeBERTa-v2": BlockLayout("attention.self", (("attention.self.query_proj", 1), ("attention.self.key_proj", 1),
                                                 ("attention.self.value_proj", 1), ("attention.self.pos_key_proj", 1),
                                                 ("attention.self.pos_query_proj", 1)),
                              "attention.output.dense", ("intermediate.dense", 1), "output.dense",
                              optional=("attention.self.pos_key_proj", "attention.self.pos_query_proj")),
    "MPNet": BlockLayout("attention.attn", (("attention.attn.q", 1), ("attention.attn.k", 1), ("attention.attn.v", 1)),
                         "attention.attn.o", ("intermediate.dense", 1), "output.dense", position_bias=True),
    "ModernBERT": BlockLayout("attn", (("attn.Wqkv", 3),), "attn.Wo", ("mlp.Wi", 2), "mlp.Wo"),
}
"""Per family (`pofa.families` name), the layout of an encoder block's heads and neurons."""


@dataclass(frozen=True)
class StructuredConfig:
    """Fractions of the original heads and neurons kept per encoder block (at least one head and one neuron stay)."""

    heads: float = 1.0
    """Fraction of the model's attention heads kept (0 < heads <= 1)."""
    ffn: float = 1.0
    """Fraction of the model's feed-forward neurons kept (0 < ffn <= 1)."""

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"StructuredConfig.{name} must be in (0, 1], got {value!r}")


def original_counts(model: nn.Module) -> tuple[int, int]:
    """(attention heads, feed-forward neurons) per block of the unpruned model, from its config."""
    config = model.config
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    return int(config.num_attention_heads), int(ffn)


def kept_count(fraction: float, total: int) -> int:
    """round(fraction x total), at least 1."""
    return max(1, round(fraction * total))


# --- the weights a module computes, and slicing it ------------------------------------------------------------------


def _is_low_rank(module: nn.Module) -> bool:
    from pofa.decompose.lowrank import LowRankLinear

    return isinstance(module, LowRankLinear)


def effective_weight(module: nn.Module) -> Tensor:
    """The [out, in] matrix a plain or low-rank Linear applies."""
    if _is_low_rank(module):
        return module.second.weight.detach() @ module.first.weight.detach()
    return module.weight.detach()


def _sliced_linear(linear: nn.Linear, keep: Tensor, dim: int) -> tuple[nn.Linear, list[Swap]]:
    """A new Linear with only the output rows (dim 0) or input columns (dim 1) in `keep`."""
    weight = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype,
                    device=weight.device)
    out.weight.requires_grad_(linear.weight.requires_grad)
    with torch.no_grad():
        out.weight.copy_(weight)
    swaps = [Swap(linear.weight, out.weight, (dim, keep))]
    if linear.bias is not None:
        bias_keep = keep if dim == 0 else torch.arange(linear.bias.numel(), device=keep.device)
        with torch.no_grad():
            out.bias.copy_(linear.bias.detach().index_select(0, bias_keep))
        out.bias.requires_grad_(linear.bias.requires_grad)
        swaps.append(Swap(linear.bias, out.bias, (0, bias_keep)))
    return out, swaps


def slice_module(module: nn.Module, keep: Tensor, dim: int) -> tuple[nn.Module, list[Swap]]:
    """`module` (a plain or low-rank Linear) restricted to the output rows (dim 0) or input columns (dim 1) in
    `keep`, and the parameter swaps; a low-rank Linear keeps its rank and slices its outer factor."""
    if type(module) is nn.Linear:
        return _sliced_linear(module, keep, dim)
    if _is_low_rank(module):
        outer = "second" if dim == 0 else "first"
        sliced, swaps = _sliced_linear(getattr(module, outer), keep, dim)
        setattr(module, outer, sliced)
        module.out_features, module.in_features = module.second.out_features, module.first.in_features
        return module, swaps
    raise ValueError(f"structured pruning slices plain or low-rank Linears, not a {type(module).__name__} "
                     "(prune heads and neurons before Kronecker / tensor factorization and QAT)")


# --- scores ---------------------------------------------------------------------------------------------------------


def head_scores(rows: list[tuple[Tensor, int]], columns: Tensor, head_size: int) -> Tensor:
    """Per head: sum of squares of its rows of every (weight, chunks) in `rows` and of its columns of `columns`."""
    score = columns.float().square().reshape(columns.shape[0], -1, head_size).sum(dim=(0, 2))
    for weight, chunks in rows:
        score = score + weight.float().square().reshape(chunks, -1, head_size, weight.shape[1]).sum(dim=(0, 2, 3))
    return score


def neuron_scores(w_in: Tensor, w_out: Tensor, chunks: int = 1) -> Tensor:
    """Per FFN neuron: ||its rows of the input Linear (every chunk)|| * ||its column of the output Linear||."""
    rows = w_in.float().square().reshape(chunks, -1, w_in.shape[1]).sum(dim=(0, 2)).sqrt()
    return rows * w_out.float().norm(dim=0)


def top(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` largest scores, in increasing index order (the kept units keep their order)."""
    return scores.topk(count).indices.sort().values


def chunked_rows(keep: Tensor, unit: int, count: int, chunks: int) -> Tensor:
    """Row indices of the kept units (each `unit` rows wide, `count` per chunk) in every chunk."""
    rows = (keep[:, None] * unit + torch.arange(unit, device=keep.device)).flatten()
    return torch.cat([rows + c * count * unit for c in range(chunks)])


# --- blocks ---------------------------------------------------------------------------------------------------------


def encoder_blocks(model: nn.Module) -> list[str]:
    """Names (relative to the base model) of the family's encoder blocks, in order."""
    pattern = re.compile(family_of(model).blocks)
    names = []
    for fqn, _ in base_of(model).named_modules():
        match = pattern.search(fqn + ".")
        if match is not None and match.end() == len(fqn) + 1:
            names.append(fqn)
    return names


def layout_of(model: nn.Module) -> BlockLayout:
    family = family_of(model)
    if family.name not in BLOCKS:
        raise FamilyError(f"structured pruning: {family.name} blocks are not mapped (known: {', '.join(BLOCKS)}); "
                          "add their layout to pofa.decompose.structured.BLOCKS")
    return BLOCKS[family.name]


def head_size_of(model: nn.Module, attention: nn.Module) -> int:
    for name in ("attention_head_size", "head_dim"):
        if isinstance(getattr(attention, name, None), int):
            return getattr(attention, name)
    return model.config.hidden_size // model.config.num_attention_heads


def _select_position_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """MPNet: the relative-position bias [batch, original heads, q, k] restricted to this layer's kept heads."""
    keep = module.pofa_heads
    if len(args) > 2 and args[2] is not None:
        args = (*args[:2], args[2].index_select(1, keep), *args[3:])
    elif kwargs.get("position_bias") is not None:
        kwargs = {**kwargs, "position_bias": kwargs["position_bias"].index_select(1, keep)}
    return args, kwargs


def _set_head_count(attention: nn.Module, heads: Tensor, head_size: int, layout: BlockLayout) -> None:
    count = int(heads.numel())
    for name, value in (("num_attention_heads", count), ("n_heads", count), ("all_head_size", count * head_size)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)
    if layout.position_bias:
        attention.register_buffer("pofa_heads", heads.clone(), persistent=False)  # original head indices
        if not getattr(attention, "_pofa_bias_hook", False):
            attention.register_forward_pre_hook(_select_position_bias, with_kwargs=True)
            attention._pofa_bias_hook = True


def _present(base: nn.Module, block: str, layout: BlockLayout) -> list[tuple[str, int]]:
    rows = []
    for path, chunks in layout.head_rows:
        try:
            base.get_submodule(f"{block}.{path}")
        except AttributeError:
            if path in layout.optional:
                continue
            raise
        rows.append((path, chunks))
    return rows


def _replace(base: nn.Module, fqn: str, keep: Tensor, dim: int) -> list[Swap]:
    module, swaps = slice_module(base.get_submodule(fqn), keep, dim)
    set_submodule(base, fqn, module)
    return swaps


def _apply(model: nn.Module, block: str, head_keep: Tensor, ffn_keep: Tensor, original_heads: Tensor) -> list[Swap]:
    """Keep heads `head_keep` and neurons `ffn_keep` (indices among the block's current ones); `original_heads`: the
    kept heads' indices among the model's original heads."""
    base, layout = base_of(model), layout_of(model)
    attention = base.get_submodule(f"{block}.{layout.attention}")
    head_size = head_size_of(model, attention)
    swaps: list[Swap] = []
    rows = _present(base, block, layout)
    heads_now = effective_weight(base.get_submodule(f"{block}.{layout.head_columns}")).shape[1] // head_size
    for path, chunks in rows:
        keep = chunked_rows(head_keep, head_size, heads_now, chunks)
        swaps += _replace(base, f"{block}.{path}", keep, 0)
    swaps += _replace(base, f"{block}.{layout.head_columns}", chunked_rows(head_keep, head_size, heads_now, 1), 1)
    _set_head_count(attention, original_heads, head_size, layout)
    path, chunks = layout.ffn_rows
    neurons_now = effective_weight(base.get_submodule(f"{block}.{layout.ffn_columns}")).shape[1]
    swaps += _replace(base, f"{block}.{path}", chunked_rows(ffn_keep, 1, neurons_now, chunks), 0)
    swaps += _replace(base, f"{block}.{layout.ffn_columns}", ffn_keep, 1)
    return swaps


def prune_structured(model: nn.Module, config: StructuredConfig) -> list[Swap]:
    """`prune_structured_`, returning the parameter swaps (for an optimizer that must follow them,
    `pofa.decompose.common.retarget_optimizer_`). A block already at or below the kept counts is left alone."""
    base, layout = base_of(model), layout_of(model)
    heads_total, ffn_total = original_counts(model)
    want_heads, want_ffn = kept_count(config.heads, heads_total), kept_count(config.ffn, ffn_total)
    previous = decomposition_record(model).get("structured", {}).get("modules", {})
    table, swaps = {}, []
    for block in encoder_blocks(model):
        attention = base.get_submodule(f"{block}.{layout.attention}")
        head_size = head_size_of(model, attention)
        rows = [(effective_weight(base.get_submodule(f"{block}.{p}")), c) for p, c in _present(base, block, layout)]
        columns = effective_weight(base.get_submodule(f"{block}.{layout.head_columns}"))
        f_in = effective_weight(base.get_submodule(f"{block}.{layout.ffn_rows[0]}"))
        f_out = effective_weight(base.get_submodule(f"{block}.{layout.ffn_columns}"))
        heads_now, ffn_now = columns.shape[1] // head_size, f_out.shape[1]
        original = torch.tensor(previous.get(block, {}).get("heads", list(range(heads_now))),
                                device=columns.device)
        if block in previous and want_heads >= heads_now and want_ffn >= ffn_now:
            continue  # nothing to remove (a first prune always slices, so that even keeping all runs the path)
        head_keep = (top(head_scores(rows, columns, head_size), want_heads) if want_heads < heads_now
                     else torch.arange(heads_now, device=columns.device))
        ffn_keep = (top(neuron_scores(f_in, f_out, layout.ffn_rows[1]), want_ffn) if want_ffn < ffn_now
                    else torch.arange(ffn_now, device=columns.device))
        swaps += _apply(model, block, head_keep, ffn_keep, original[head_keep])
        table[block] = {"heads": original[head_keep].tolist(), "ffn": int(ffn_keep.numel())}
    if table or "structured" not in decomposition_record(model):
        record_(model, "structured", {"modules": table})
    return swaps


def prune_structured_(model: nn.Module, config: StructuredConfig) -> nn.Module:
    """Remove the least important heads and FFN neurons of every encoder block, in place; returns `model`.

    Raises FamilyError for a family whose blocks are not mapped (`BLOCKS`), ValueError when a block's Linears are
    neither plain nor low-rank Linears (Kronecker / tensor factors, fake-quant modules: prune before those)."""
    prune_structured(model, config)
    return model


def rebuild_structured_(model: nn.Module, entry: dict) -> None:
    """The shapes `prune_structured_` recorded, on a freshly built model (weights are loaded next)."""
    for block, kept in entry.get("modules", {}).items():
        heads = torch.tensor(kept["heads"])
        _apply(model, block, heads, torch.arange(kept["ffn"]), heads)
