"""What the decomposition verbs share: module selection, swapping a submodule, the record kept in the config."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CONFIG_KEY = "pofa_decomposition"
"""The model config's attribute that records every decomposition applied (`load_decomposed` rebuilds from it)."""

FilterFn = Callable[[nn.Module, str], bool]


class Factor(nn.Module):
    """A bare holder of one factor tensor, named `weight`, so that a factor is addressed like a Linear weight:
    `pofa.families.pruning_targets`' default regex (`<block>.*\\.weight$`) selects the factors inside encoder blocks,
    and masks, `MaskGuard` and the sparsity report work on them unchanged."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def base_of(model: nn.Module) -> nn.Module:
    """The model's base model (`bert`, `distilbert`, ...): records are relative to it, so that they survive a change
    of head (a masked-LM student fine-tuned as a classifier)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def set_submodule(root: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def encoder_filter(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> FilterFn:
    """Select modules by name (relative to the base model): `include` regexes (empty: every module inside the
    model family's encoder blocks, `pofa.families`), minus those matching an `exclude` regex."""
    from pofa.families import family_of

    family = family_of(model)
    includes = [re.compile(p) for p in include]
    excludes = [re.compile(p) for p in exclude]

    def select(module: nn.Module, fqn: str) -> bool:
        chosen = any(p.search(fqn) for p in includes) if includes else family.is_encoder_linear(fqn)
        return chosen and not any(p.search(fqn) for p in excludes)

    return select


def selected_linears(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Linear]]:
    """(name relative to the base model, module) of every plain `nn.Linear` the filter selects, in module order.

    Exactly `nn.Linear`: a module already swapped (a factor, a fake-quant Linear) is never decomposed again."""
    select = filter_fn or encoder_filter(model)
    return [(fqn, m) for fqn, m in base_of(model).named_modules() if type(m) is nn.Linear and select(m, fqn)]


def record_(model: nn.Module, kind: str, entry: dict[str, Any]) -> None:
    """Add `entry` under `kind` to the config's record (merging module tables with an earlier record of that kind)."""
    config = model.config
    recorded = dict(getattr(config, CONFIG_KEY, None) or {})
    previous = dict(recorded.get(kind) or {})
    modules = {**previous.get("modules", {}), **entry.get("modules", {})}
    recorded[kind] = {**previous, **entry, **({"modules": modules} if modules else {})}
    setattr(config, CONFIG_KEY, recorded)


def decomposition_record(model_or_config: Any) -> dict[str, Any]:
    """The config's record of decompositions ({} for a plain model)."""
    config = getattr(model_or_config, "config", model_or_config)
    return dict(getattr(config, CONFIG_KEY, None) or {})


def require_selection(found: Sequence[Any], verb: str) -> None:
    if not found:
        raise ValueError(f"{verb}: no nn.Linear was selected; the default filter selects the Linears of the model "
                         "family's encoder blocks (pass filter_fn, or check include/exclude)")


# ---------------------------------------------------------------------------------------------------------------------
# Parameters that change shape during training (the iterative schedule): the optimizer follows them
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    """`old` was replaced by `new` in the model."""

    old: nn.Parameter
    new: nn.Parameter
    index: tuple[int, Tensor] | None = None
    """(dim, indices of `old` along dim that `new` holds) when `new` is a slice (or a copy) of `old`: its optimizer
    state is sliced alike; None when `new` holds new values (a re-factorization): its state starts afresh."""


def retarget_optimizer_(optimizer: Any, swaps: Sequence[Swap]) -> None:
    """Point `optimizer`'s parameter groups at the `new` parameters of `swaps`, each in the group of the `old` one it
    replaces (so weight decay stays where it was), with the old state sliced by `index` (AdamW's moments of the kept
    rows are those rows' moments; the per-parameter `step` is kept) or dropped.

    Works on a torch optimizer or on accelerate's wrapper around one (its `optimizer`). A slice of the state rather
    than a new optimizer: ROSITA rebuilds its optimizer at every pruning event and so forgets the moments of every
    weight, the kept ones included; slicing keeps what is still true."""
    inner = getattr(optimizer, "optimizer", optimizer)
    by_old: dict[int, list[Swap]] = {}
    for swap in swaps:
        by_old.setdefault(id(swap.old), []).append(swap)
    for group in inner.param_groups:
        params = []
        for param in group["params"]:
            replaced = by_old.get(id(param))
            if replaced is None:
                params.append(param)
                continue
            state = inner.state.pop(param, None)
            for swap in replaced:
                params.append(swap.new)
                if state and swap.index is not None:
                    inner.state[swap.new] = {k: _sliced(v, param, swap.index) for k, v in state.items()}
        group["params"] = params


def _sliced(value: Any, param: Tensor, index: tuple[int, Tensor]) -> Any:
    if not torch.is_tensor(value):
        return value
    if value.shape != param.shape:  # a scalar `step`
        return value.clone()
    dim, keep = index
    return value.index_select(dim, keep.to(value.device))
