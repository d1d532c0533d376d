"""Magnitude masks and the one object that holds them.

A mask is a bool tensor shaped like the weight it belongs to, True = kept, False = pruned. All masks of a run live
in one :class:`MaskStore` (name -> mask), keyed by the parameter names of the model they were made on
(``bert.encoder.layer.0.attention.self.query.weight``). The store is saved beside every checkpoint, bit-packed, and
every later stage (sparse transfer, QAT) starts from it; :meth:`MaskStore.bind` resolves its names on another model of
the same family (task head vs base model, DDP / ``torch.compile`` / DeepSpeed wrappers).

Typical use::

    store = MaskStore.dense(model.named_parameters())          # selects DEFAULT_TARGETS, all kept
    weights = {name: param.detach() for name, param in store.bind(model).items()}
    newly_pruned = store.update(magnitude_masks(weights, 0.9, previous=store))
    # or, letting pruned weights come back (pofa.sparsity.revival.PrunedValues holds their values):
    changes = store.update(magnitude_masks(weights, 0.9, previous=store, revive=pruned_values.current_()))
    check_masks(model, store)                                    # after zeroing (see pofa.sparsity.optim.MaskGuard)
    print(format_sparsity_table(sparsity_report(model, store)))

Sharded parameters (DeepSpeed ZeRO-3, FSDP2 DTensor) are read through :func:`gathered_param`, which is a collective
on those backends: call :func:`check_masks` and :func:`sparsity_report` on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pofa.families import FAMILIES

__all__ = [
    "DEFAULT_TARGETS",
    "POOLER_TARGET",
    "MaskChanges",
    "MaskFileError",
    "MaskStore",
    "MaskViolationError",
    "UNSTRUCTURED",
    "bind_masks",
    "check_masks",
    "deepspeed_master_weight",
    "format_sparsity_table",
    "gathered_param",
    "magnitude_masks",
    "nm_masks",
    "nm_violations",
    "param_shape",
    "parse_pattern",
    "pattern_sparsity",
    "select_targets",
    "sparsity_report",
    "unwrap_model",
]

DEFAULT_TARGETS: tuple[str, ...] = tuple(dict.fromkeys(t for family in FAMILIES for t in family.targets))
"""Regexes (``re.search`` over parameter names) of every encoder Linear weight of every registered model family
(`pofa.families`), for code that sees names only; with a model at hand, `pofa.families.pruning_targets` gives its
own family's."""

POOLER_TARGET: str = r"(^|\.)pooler\.dense\.weight$"
"""Regex for the pooler dense weight; dense by default, add it to ``include`` to prune it too."""

_MASK_FILE_FORMAT = "pofa.masks"
_MASK_FILE_VERSION = "1"
_BITORDER: Literal["little"] = "little"

# Children that wrappers register around the real model, and the name components they add.
_WRAPPER_CHILDREN = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_TOKENS = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


class MaskViolationError(RuntimeError):
    """A weight at a pruned position is non-zero."""


class MaskFileError(ValueError):
    """A mask file exists but cannot be read as a pofa mask file."""


# --------------------------------------------------------------------------------------------------------------------
# Parameters of sharded backends


def param_shape(param: Tensor) -> torch.Size:
    """The global (unsharded) shape of ``param``.

    DeepSpeed ZeRO-3 keeps an empty placeholder in ``param.data`` and the real shape in ``param.ds_shape``; DTensor
    (FSDP2) parameters already report their global shape.
    """
    return torch.Size(getattr(param, "ds_shape", param.shape))


def _is_zero3(param: Tensor) -> bool:
    return hasattr(param, "ds_id")


def _is_deepspeed_param(param: Tensor) -> bool:
    # Attributes that DeepSpeed's ZeRO-3 (ds_id) and ZeRO-1/2 / bf16 optimizers (_hp_mapping) attach to parameters;
    # checking sys.modules first means deepspeed is never imported here.
    return "deepspeed" in sys.modules and (_is_zero3(param) or hasattr(param, "_hp_mapping"))


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without torch.distributed
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def gathered_param(param: Tensor, *, modify: bool = False) -> Iterator[Tensor]:
    """Yield the full, unsharded visible value of ``param`` (the tensor the forward pass uses).

    Plain parameters are yielded as ``param.data`` (no copy). DTensor (FSDP2) parameters are all-gathered into a new
    tensor; with ``modify=True`` the yielded tensor is written back to the local shard on exit. DeepSpeed ZeRO-3
    parameters are gathered with ``deepspeed.zero.GatheredParameters``; with ``modify=True`` rank 0's value is
    re-partitioned on exit, so every rank must make the same change. Sharded cases are collectives: call on every
    rank, in the same order.
    """
    if _is_zero3(param):
        import deepspeed  # only reachable when deepspeed already made this a ZeRO-3 parameter

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None):
            yield param.data
        return
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        full = param.detach().full_tensor()
        yield full
        if modify:
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            with torch.no_grad():
                param.to_local().copy_(local)
        return
    yield param.data


def deepspeed_master_weight(param: Tensor) -> Tensor | None:
    """DeepSpeed's full fp32 master copy of ``param``, or None when DeepSpeed does not manage it.

    Uses ``deepspeed.utils.safe_get_full_fp32_param`` (ZeRO-1/2/3 and the bf16 optimizer), which is a collective:
    call on every rank, in the same order. Never imports deepspeed itself: a parameter can only carry DeepSpeed's
    attributes if deepspeed was imported already.
    """
    if not _is_deepspeed_param(param):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


# --------------------------------------------------------------------------------------------------------------------
# Target selection


def _compile_patterns(argument: str, patterns: Sequence[str]) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        raise ValueError(f"{argument} must be a sequence of regexes, not a single string: {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"invalid regex in {argument}: {pattern!r} ({error})") from error
    return compiled


def select_targets(
    named_parameters: Iterable[tuple[str, Tensor]],
    include: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Names of the parameters to prune: matching some ``include`` regex, no ``exclude`` regex, at least 2-D.

    Order follows ``named_parameters``. ``re.search`` semantics, so patterns match anywhere unless anchored.

    Raises:
        ValueError: if a regex is invalid (naming it), or if nothing matches (naming the patterns and showing a few
            parameter names).
    """
    include_patterns = _compile_patterns("include", include)
    exclude_patterns = _compile_patterns("exclude", exclude)
    seen: list[str] = []
    selected: list[str] = []
    for name, param in named_parameters:
        seen.append(name)
        # Biases and LayerNorm weights are 1-D: pruning them saves nothing and hurts accuracy.
        if len(param_shape(param)) < 2:
            continue
        if any(p.search(name) for p in include_patterns) and not any(p.search(name) for p in exclude_patterns):
            selected.append(name)
    if not selected:
        sample = ", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")
        raise ValueError(
            f"no parameter of dim >= 2 matches include={list(include)} and not exclude={list(exclude)}; "
            f"the {len(seen)} parameter names look like: {sample or '(none)'}"
        )
    return selected


# --------------------------------------------------------------------------------------------------------------------
# Magnitude masks

# Scores are |w| in float32 reinterpreted as int32: for non-negative floats the bit pattern is monotonic in the
# value, so an exact integer binary search finds the k-th smallest score without sorting or concatenating tensors.
_PREVIOUSLY_PRUNED = -1
_KEY_LOW, _KEY_HIGH = _PREVIOUSLY_PRUNED, 2**31 - 1


def _scores(weight: Tensor, previous: Tensor | None, revive: Tensor | None = None) -> Tensor:
    magnitude = weight.detach().to(torch.float32).abs().reshape(-1)
    if previous is None:
        return magnitude.view(torch.int32)
    kept = previous.reshape(-1).to(magnitude.device)
    if revive is not None:
        # The reparametrised rule: a pruned position competes with the value its hidden original still holds.
        held = revive.detach().to(device=magnitude.device, dtype=torch.float32).abs().reshape(-1)
        return torch.where(kept, magnitude, held).view(torch.int32)
    # Previously pruned positions rank below every weight, even an exact 0.0, so they are pruned first.
    return magnitude.view(torch.int32).masked_fill(~kept, _PREVIOUSLY_PRUNED)


def _kth_smallest(count_at_most: Any, k: int) -> int:
    """Smallest integer key t with count_at_most(t) >= k (k >= 1)."""
    low, high = _KEY_LOW, _KEY_HIGH
    while low < high:
        middle = (low + high) // 2
        if count_at_most(middle) >= k:
            high = middle
        else:
            low = middle + 1
    return low


def _kth_smallest_of_one(score: Tensor, k: int) -> int | None:
    """k-th smallest entry of one score tensor by selection (~7x faster than counting passes), None if unsupported."""
    try:
        return int(torch.kthvalue(score, k).values)
    except (RuntimeError, NotImplementedError):  # backends without an integer kthvalue
        return None


def _prune_lowest(names: Sequence[str], score_of: Any, prune: int) -> dict[str, Tensor]:
    """Flat keep-masks pruning exactly ``prune`` positions with the lowest scores over all ``names``.

    Ties at the threshold are broken by position: earlier names first, then lower flat index, so equal inputs give
    equal masks on every process.
    """
    if prune == 0:
        return {name: torch.ones_like(score_of(name), dtype=torch.bool) for name in names}

    def count_at_most(threshold: int) -> int:
        return sum(int((score_of(name) <= threshold).sum()) for name in names)

    threshold = _kth_smallest_of_one(score_of(names[0]), prune) if len(names) == 1 else None
    if threshold is None:
        threshold = _kth_smallest(count_at_most, prune)
    remaining = prune - count_at_most(threshold - 1)
    masks = {}
    for name in names:
        score = score_of(name)
        drop = score < threshold
        if remaining > 0:
            tied = torch.nonzero(score == threshold).reshape(-1)[:remaining]
            drop[tied] = True
            remaining -= tied.numel()
        masks[name] = ~drop
    return masks


def _validate_revive(weights: Mapping[str, Tensor], revive: Mapping[str, Tensor]) -> None:
    for name, weight in weights.items():
        if name not in revive:
            raise ValueError(f"revive has no values for {name!r}")
        values = revive[name]
        if not torch.is_floating_point(values) or values.shape != weight.shape:
            raise ValueError(
                f"revive[{name!r}] must be a floating-point tensor of shape {tuple(weight.shape)}, "
                f"got {values.dtype} {tuple(values.shape)}"
            )


def _validate_mask_inputs(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    previous: Mapping[str, Tensor] | None,
    revive: Mapping[str, Tensor] | None = None,
) -> None:
    if not weights:
        raise ValueError("weights is empty: nothing to prune")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    for name, weight in weights.items():
        if not torch.is_floating_point(weight):
            raise ValueError(f"weights[{name!r}] must be a floating-point tensor, got {weight.dtype}")
        if previous is None:
            continue
        if name not in previous:
            raise ValueError(f"previous has no mask for {name!r}")
        mask = previous[name]
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(
                f"previous[{name!r}] must be a bool tensor of shape {tuple(weight.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    if revive is not None:
        if previous is None:
            raise ValueError("revive needs previous: the masks whose pruned positions the revive values belong to")
        _validate_revive(weights, revive)


def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Literal["layer", "global"] = "layer",
    previous: Mapping[str, Tensor] | None = None,
    revive: Mapping[str, Tensor] | None = None,
    pattern: str = "unstructured",
) -> dict[str, Tensor]:
    """Keep-masks (bool, True = kept) that prune the smallest-magnitude weights.

    ``scope="layer"``: each tensor gets exactly ``round(sparsity * numel)`` zeros. ``scope="global"``: one magnitude
    threshold over all tensors, exactly ``round(sparsity * total_numel)`` zeros in all. A position pruned in
    ``previous`` (a mapping or a :class:`MaskStore`) stays pruned: such positions rank below every weight, and when
    ``sparsity`` is below the previous sparsity all previous zeros are kept (never revived), so the count is then
    the previous count. Ties are broken by flat index (and, for global scope, by name order), so the same inputs
    give the same masks on every process and device. Scores are computed in float32 whatever the weights' dtype;
    masks are on each weight's device. Memory stays at a few copies of the largest single tensor.

    ``revive`` (needs ``previous``; e.g. :meth:`pofa.sparsity.revival.PrunedValues.current_`) switches to the rule
    of the Prune-Once-for-All authors' code, where a pruned weight lives on, hidden behind its mask: name -> the
    values the positions pruned in ``previous`` hold now (read only there). Every position then competes, a kept one
    by ``|weight|``, a pruned one by ``|revive value|``, so a pruned weight larger than the kept ones around it comes
    back; the count is exactly ``round(sparsity * numel)`` (layer) or ``round(sparsity * total_numel)`` (global),
    also below the previous count, and ties are broken as above.

    ``pattern="N:M"`` (e.g. ``"2:4"``) makes the pruning structured instead, in groups of M consecutive weights along
    the last (input) dimension, the layout torch's semi-structured sparse kernels read: see :func:`nm_masks`, which
    this delegates to (layer scope only; ``sparsity`` at most ``(M - N) / M``). ``pattern="RxC"`` (e.g. ``"1x4"``)
    prunes whole blocks of R rows x C consecutive input features: see :func:`block_masks`.

    Raises:
        ValueError: on empty ``weights``, a non-float weight, ``sparsity`` outside [0, 1], an unknown ``scope``, a
            ``previous`` mask that is missing, not bool, or shaped differently from its weight, or ``revive``
            without ``previous`` or with a missing, non-float or misshaped tensor; for an N:M ``pattern`` also as
            :func:`nm_masks` says.
    """
    _validate_mask_inputs(weights, sparsity, scope, previous, revive)
    block = parse_block(pattern)
    if block is not None:
        return block_masks(weights, sparsity, block, scope=scope, previous=previous, revive=revive)
    nm = parse_pattern(pattern)
    if nm is not None:
        if scope != "layer":
            raise ValueError(f"scope must be 'layer' with pattern {pattern!r}: every group of {nm[1]} keeps {nm[0]}, "
                             f"there is no global threshold to share; got scope={scope!r}")
        return nm_masks(weights, sparsity, nm, previous=previous, revive=revive)
    names = list(weights)
    numel = {name: weights[name].numel() for name in names}

    def previous_of(name: str) -> Tensor | None:
        return None if previous is None else previous[name]

    def previously_pruned(name_list: Iterable[str]) -> int:
        # Only the never-revive rule keeps every previous zero; with revive the count is exact.
        if previous is None or revive is not None:
            return 0
        return sum(int((~previous[name]).sum()) for name in name_list)

    def score_of(name: str) -> Tensor:
        return _scores(weights[name], previous_of(name), None if revive is None else revive[name])

    flat: dict[str, Tensor] = {}
    if scope == "layer":
        for name in names:
            score = score_of(name)
            prune = max(round(sparsity * numel[name]), previously_pruned([name]))
            flat.update(_prune_lowest([name], lambda _name, s=score: s, prune))
    else:
        # Recomputing the scores per pass keeps memory at one tensor's worth instead of a copy of all weights.
        order = sorted(names)
        prune = max(round(sparsity * sum(numel.values())), previously_pruned(order))
        flat = _prune_lowest(order, score_of, prune)
    return {name: flat[name].reshape(weights[name].shape) for name in names}


# --------------------------------------------------------------------------------------------------------------------
# N:M patterns (semi-structured sparsity)

UNSTRUCTURED = "unstructured"
"""The pattern name of masks with no structure: any position may be pruned."""

_NM_RE = re.compile(r"^([0-9]+):([0-9]+)$")
_BLOCK_RE = re.compile(r"^([0-9]+)x([0-9]+)$")
_PATTERNS = ("'unstructured', 'N:M' with integers 1 <= N < M (e.g. '2:4'), or 'RxC' blocks with integers R, C >= 1, "
             "RxC != 1x1 (e.g. '1x4')")


def parse_block(pattern: str) -> tuple[int, int] | None:
    """``(R, C)`` for an ``"RxC"`` block pattern (weights pruned and kept in whole blocks of R consecutive rows x C
    consecutive columns, i.e. output x input features), None for any other valid pattern.

    Raises:
        ValueError: naming ``pattern`` if it is none of the valid patterns (:func:`parse_pattern`'s rule).
    """
    parse_pattern(pattern)
    match = _BLOCK_RE.match(pattern)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(N, M)`` for an ``"N:M"`` pattern (at most N weights kept in every group of M consecutive weights along the
    last dimension), None for ``"unstructured"`` and for an ``"RxC"`` block pattern (:func:`parse_block`).

    Raises:
        ValueError: naming ``pattern`` unless it is ``"unstructured"``, ``"N:M"`` with integers ``1 <= N < M``, or
            ``"RxC"`` with integers ``R, C >= 1`` other than ``1x1``.
    """
    if pattern == UNSTRUCTURED:
        return None
    block = _BLOCK_RE.match(pattern) if isinstance(pattern, str) else None
    if block is not None and min(int(block.group(1)), int(block.group(2))) >= 1 and pattern != "1x1":
        return None
    match = _NM_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 1 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern must be {_PATTERNS}, got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def pattern_sparsity(pattern: str) -> float | None:
    """The sparsity an ``"N:M"`` pattern reaches, ``(M - N) / M`` (0.5 for 2:4); None for ``"unstructured"``."""
    nm = parse_pattern(pattern)
    return None if nm is None else (nm[1] - nm[0]) / nm[1]


def _groups(tensor: Tensor, m: int, name: str) -> Tensor:
    """``tensor`` as rows of ``m`` consecutive entries along its last dimension."""
    if tensor.dim() < 1 or tensor.shape[-1] % m:
        raise ValueError(f"{name}: its last dimension ({tuple(tensor.shape)}) is not a multiple of M={m}, so it "
                         f"cannot be cut into groups of {m}; exclude it from pruning or choose another pattern")
    return tensor.reshape(-1, m)


def _blocks(tensor: Tensor, block: tuple[int, int], name: str) -> Tensor:
    """A 2-D ``tensor`` as ``[rows / R, R, columns / C, C]``: block (i, j) is ``[i, :, j, :]``."""
    r, c = block
    if tensor.dim() != 2 or tensor.shape[0] % r or tensor.shape[1] % c:
        raise ValueError(f"{name}: its shape {tuple(tensor.shape)} cannot be cut into {r}x{c} blocks (a 2-D weight "
                         f"with rows a multiple of {r} and columns a multiple of {c}); exclude it from pruning or "
                         "choose another pattern")
    return tensor.reshape(tensor.shape[0] // r, r, tensor.shape[1] // c, c)


def block_violations(mask: Tensor, block: tuple[int, int], name: str = "mask") -> int:
    """How many R x C blocks of ``mask`` are kept in part only; 0 means ``mask`` is made of whole blocks. Raises
    ValueError (naming ``name``) if the mask cannot be cut into such blocks."""
    blocks = _blocks(mask, block, name)
    return int((blocks.any(dim=(1, 3)) != blocks.all(dim=(1, 3))).sum())


def block_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    block: tuple[int, int],
    *,
    scope: Literal["layer", "global"] = "layer",
    previous: Mapping[str, Tensor] | None = None,
    revive: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks that prune whole blocks of R consecutive rows x C consecutive columns (output x input features)
    with the smallest magnitude, a block's magnitude being the sum of its weights' ``|w|``.

    ``1x4`` blocks are the 4 consecutive input features that one VNNI instruction multiplies for one output, the
    unit of pofa's sparse int8 kernel (`pofa.runtime`): at 90% block sparsity it runs 10% of the groups where 90%
    unstructured sparsity leaves about 34% of them non-empty. The blocks are ranked as :func:`magnitude_masks`
    ranks weights, so everything it promises holds per block: ``scope="layer"`` prunes exactly
    ``round(sparsity * blocks)`` blocks of each tensor, ``"global"`` exactly ``round(sparsity * all blocks)``;
    ``previous`` blocks stay pruned (never revived) unless ``revive`` gives the values pruned positions hold, and
    then a pruned block competes by the sum of its held ``|value|``; ties are broken by block position.

    Raises:
        ValueError: if a weight is not 2-D or its shape is not a multiple of the block (naming it), if a
            ``previous`` mask is not made of whole blocks (naming it), and as :func:`magnitude_masks` for the rest.
    """
    _validate_mask_inputs(weights, sparsity, scope, previous, revive)

    def magnitude(tensor: Tensor, name: str) -> Tensor:
        return _blocks(tensor.detach().to(torch.float32).abs(), block, name).sum(dim=(1, 3))

    scores = {name: magnitude(weight, name) for name, weight in weights.items()}
    kept_blocks = None
    if previous is not None:
        kept_blocks = {}
        for name in weights:
            if block_violations(previous[name], block, name):
                raise ValueError(f"previous mask {name!r} is not made of whole {block[0]}x{block[1]} blocks")
            kept_blocks[name] = _blocks(previous[name], block, name).all(dim=(1, 3))
    held = None if revive is None else {name: magnitude(revive[name], name) for name in weights}
    keep = magnitude_masks(scores, sparsity, scope=scope, previous=kept_blocks, revive=held)
    r, c = block
    return {name: keep[name].repeat_interleave(r, dim=0).repeat_interleave(c, dim=1) for name in weights}


def nm_violations(mask: Tensor, nm: tuple[int, int], name: str = "mask") -> int:
    """How many groups of M consecutive positions of ``mask`` (along its last dimension) keep more than N; 0 means
    ``mask`` is N:M. Raises ValueError (naming ``name``) if the last dimension is not a multiple of M."""
    n, m = nm
    return int((_groups(mask, m, name).sum(dim=1) > n).sum())


def nm_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    nm: tuple[int, int],
    *,
    previous: Mapping[str, Tensor] | None = None,
    revive: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks pruning the smallest-magnitude weights group by group: groups of M consecutive weights along the
    last dimension (a Linear's input dimension, as torch's 2:4 semi-structured kernels need), ``sparsity`` of each.

    How a schedule's sparsity ``s`` (at most ``(M - N) / M``) is reached: every group prunes its ``floor(s * M)``
    smallest weights, and the groups whose next-smallest weight is smallest over the whole tensor prune one more, as
    many as it takes to prune exactly ``round(s * numel)`` weights, as unstructured layer masks do. So each group
    prunes ``floor(s * M)`` or ``floor(s * M) + 1``, the masks move towards N:M as the cubic schedule ramps, and at
    ``s = (M - N) / M`` every group keeps exactly N: the masks are N:M (:func:`nm_violations` is 0).

    ``previous`` and ``revive`` follow :func:`magnitude_masks`: without ``revive`` a previously pruned position stays
    pruned (it ranks below every weight; a group never prunes fewer than it did, and the count never falls below
    the previous count); with ``revive`` pruned positions compete by their held values and the counts are exact.
    Ties are broken by position (lower index first, within a group and between groups), so equal inputs give equal
    masks everywhere. Scores are float32; masks are on each weight's device.

    Raises:
        ValueError: if ``sparsity`` exceeds ``(M - N) / M``, or a weight's last dimension is not a multiple of M
            (naming it); other input errors as :func:`magnitude_masks`.
    """
    n, m = nm
    _validate_mask_inputs(weights, sparsity, "layer", previous, revive)
    if sparsity > (m - n) / m + 1e-9:
        raise ValueError(f"sparsity {sparsity} exceeds what pattern {n}:{m} allows, {(m - n) / m:g} "
                         f"({n} of every {m} weights kept)")
    return {
        name: _nm_keep(name, weight, sparsity, m,
                       None if previous is None else previous[name], None if revive is None else revive[name])
        for name, weight in weights.items()
    }


def _nm_keep(name: str, weight: Tensor, sparsity: float, m: int, previous: Tensor | None,
             revive: Tensor | None) -> Tensor:
    score = weight.detach().to(torch.float32).abs()
    if previous is not None:
        kept = previous.to(score.device)
        if revive is not None:
            score = torch.where(kept, score, revive.detach().to(device=score.device, dtype=torch.float32).abs())
        else:
            score = score.masked_fill(~kept, -1.0)  # below every weight, even an exact 0.0: pruned first
    groups = _groups(score, m, name)
    # A stable sort ranks equal scores by position within the group.
    ordered, order = torch.sort(groups, dim=1, stable=True)
    base = math.floor(sparsity * m + 1e-9)  # 1e-9: 0.3 * 10 is 2.9999999999999996 in floating point
    zeros = torch.full((groups.shape[0],), base, dtype=torch.long, device=score.device)
    total = round(sparsity * weight.numel())
    if previous is not None and revive is None:
        previously = (~_groups(kept, m, name)).sum(dim=1)
        zeros = torch.maximum(zeros, previously)
        total = max(total, int(previously.sum()))
    extra = total - int(zeros.sum())
    if extra > 0 and base < m:
        # One more zero for the groups whose next weight in line is smallest; only groups at the base count take
        # one, so a group prunes at most floor(s * M) + 1. Ties: lower group index first (stable sort).
        following = ordered[:, base].masked_fill(zeros != base, float("inf"))
        candidates = torch.sort(following, stable=True).indices[: min(extra, int((zeros == base).sum()))]
        zeros[candidates] += 1
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m, device=order.device).expand_as(order))
    return (rank >= zeros[:, None]).reshape(weight.shape)


# --------------------------------------------------------------------------------------------------------------------
# Resolving mask names on a model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / ``torch.compile`` / FSDP1 wrappers (a wrapper has that one child)."""
    while True:
        children = dict(model.named_children())
        if len(children) != 1:
            return model
        (child_name, child), = children.items()
        if child_name not in _WRAPPER_CHILDREN:
            return model
        model = child


def _normalize_name(name: str) -> str:
    name = _WRAPPER_TOKENS.sub("", name)
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def _format_names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def bind_masks(model: nn.Module, store: MaskStore) -> dict[str, nn.Parameter]:
    """Resolve every mask name in ``store`` to a parameter of ``model``: mask name -> parameter.

    Exact names match first. Otherwise names are compared after removing wrapper components (a leading
    ``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``) and the model's ``base_model_prefix`` (``bert``), so masks
    made on ``BertForMaskedLM`` (``bert.encoder...``) bind to ``BertModel`` (``encoder...``) and to
    ``BertForSequenceClassification`` (``bert.encoder...``), wrapped or not.

    Raises:
        ValueError: naming every mask that resolves to no parameter and every shape mismatch.
    """
    named = list(model.named_parameters())
    exact = {name: param for name, param in named}
    prefix = getattr(unwrap_model(model), "base_model_prefix", "") or ""
    canonical: dict[str, nn.Parameter | None] = {}
    for name, param in named:
        key = _strip_prefix(_normalize_name(name), prefix)
        # Two parameters with one canonical name cannot be told apart: mark ambiguous rather than guess.
        canonical[key] = None if key in canonical else param

    bound: dict[str, nn.Parameter] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for mask_name in store.names():
        param = exact.get(mask_name)
        if param is None:
            param = canonical.get(_strip_prefix(_normalize_name(mask_name), prefix))
        if param is None:
            missing.append(mask_name)
        elif param_shape(param) != store[mask_name].shape:
            mask_shape, shape = tuple(store[mask_name].shape), tuple(param_shape(param))
            mismatched.append(f"{mask_name}: mask {mask_shape} vs parameter {shape}")
        else:
            bound[mask_name] = param
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"no parameter for masks: {_format_names(missing)}")
        if mismatched:
            problems.append(f"shape mismatch: {_format_names(mismatched)}")
        sample = _format_names([name for name, _ in named], limit=4)
        raise ValueError(
            f"cannot bind masks to {type(unwrap_model(model)).__name__} (base_model_prefix={prefix!r}): "
            + "; ".join(problems)
            + f". The model's parameters look like: {sample}"
        )
    return bound


# --------------------------------------------------------------------------------------------------------------------
# The mask store


def atomic_save(write: Callable[[str], None], path: str | os.PathLike[str]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it to `path`: a crash mid-save never leaves a
    truncated file (masks, pruned values) beside a good checkpoint."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _as_mask(name: str, mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask {name!r} must be a bool tensor, got {got}")
    return mask


def _pattern_problems(masks: Mapping[str, Tensor], pattern: str) -> list[str]:
    """One line per mask that breaks ``pattern``: an N:M mask's groups that keep more than N, a block mask's blocks
    kept in part. None for ``"unstructured"``."""
    nm, block = parse_pattern(pattern), parse_block(pattern)
    problems = []
    for name, mask in masks.items():
        if nm is not None and (bad := nm_violations(mask, nm, name)):
            problems.append(f"{name}: {bad} of {mask.numel() // nm[1]} groups of {nm[1]} keep more than {nm[0]}")
        if block is not None and (bad := block_violations(mask, block, name)):
            blocks = mask.numel() // (block[0] * block[1])
            problems.append(f"{name}: {bad} of {blocks} {block[0]}x{block[1]} blocks are kept in part only")
    return problems


def _require_pattern(masks: Mapping[str, Tensor], pattern: str) -> None:
    """Raise ValueError (naming the pattern and the first offending masks) unless every mask follows ``pattern``."""
    problems = _pattern_problems(masks, pattern)
    if problems:
        raise ValueError(f"masks do not follow pattern {pattern!r}: {_format_names(problems, 3)}")


def _pack(mask: Tensor) -> Tensor:
    bits = np.packbits(mask.detach().to("cpu").reshape(-1).numpy(), bitorder=_BITORDER)
    return torch.from_numpy(bits)


def _unpack(packed: np.ndarray, shape: Sequence[int], where: str) -> Tensor:
    numel = math.prod(shape)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (numel + 7) // 8:
        raise MaskFileError(
            f"{where}: packed mask has {packed.size} {packed.dtype} bytes, expected {(numel + 7) // 8} uint8 "
            f"for shape {list(shape)}"
        )
    bits = np.unpackbits(packed, count=numel, bitorder=_BITORDER).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


class MaskChanges(dict[str, Tensor]):
    """What one :meth:`MaskStore.update` changed, per mask name (bool tensors shaped like the masks).

    The mapping itself holds the newly pruned positions (kept before, pruned now), as ``update`` always returned, so
    callers that read it as a dict keep working; :attr:`revived` holds the positions kept now that were pruned before
    (only a ``revive`` rule in :func:`magnitude_masks` produces them).
    """

    def __init__(self, pruned: Mapping[str, Tensor], revived: Mapping[str, Tensor]) -> None:
        super().__init__(pruned)
        self.revived: dict[str, Tensor] = dict(revived)

    @property
    def pruned(self) -> dict[str, Tensor]:
        """Newly pruned positions per name (a plain-dict view of this mapping)."""
        return dict(self)

    def num_pruned(self) -> int:
        """How many positions were newly pruned, over all names."""
        return sum(int(where.sum()) for where in self.values())

    def num_revived(self) -> int:
        """How many positions were revived, over all names."""
        return sum(int(where.sum()) for where in self.revived.values())

    def touched(self) -> dict[str, Tensor]:
        """Positions that changed either way (newly pruned or revived), per name: where optimizer state must restart."""
        return {name: self[name] | self.revived[name] if name in self.revived else self[name] for name in self}


class MaskStore:
    """The masks of one run: parameter name -> bool tensor (True = kept).

    Names are the parameter names of the model the masks were made on; :meth:`bind` resolves them on other models.
    :meth:`update` changes masks in place, so code holding a mask tensor sees new masks; :attr:`version` increases on
    every change so caches of derived tensors (e.g. local shards) know when to refresh.

    :attr:`pattern` is the structure every mask is promised to have: ``"unstructured"`` (none), ``"N:M"`` (at most
    N kept in every group of M consecutive positions along the last dimension), or ``"RxC"`` (whole blocks of R rows
    x C columns kept or pruned). It is saved with the masks, and a
    store never holds masks that break it: the constructor, :meth:`update`, the setter and :meth:`load` refuse them.
    """

    def __init__(self, masks: Mapping[str, Tensor] | None = None, *, pattern: str = UNSTRUCTURED) -> None:
        self._masks: dict[str, Tensor] = {name: _as_mask(name, mask) for name, mask in (masks or {}).items()}
        self._version = 0
        self._pattern = UNSTRUCTURED
        self.pattern = pattern

    @property
    def pattern(self) -> str:
        """``"unstructured"``, or the ``"N:M"`` or ``"RxC"`` pattern every mask of the store follows."""
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: str) -> None:
        """Declare the masks ``pattern``; raises ValueError naming it and the first masks that do not follow it."""
        _require_pattern(self._masks, pattern)
        self._pattern = pattern

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def dense(
        cls,
        named_parameters: Iterable[tuple[str, Tensor]],
        include: Sequence[str] = DEFAULT_TARGETS,
        exclude: Sequence[str] = (),
    ) -> MaskStore:
        """All-kept masks for the selected targets (the start of gradual pruning).

        Mask names drop wrapper components (``module.``, ``_orig_mod.``), so masks made on a DDP-wrapped or compiled
        model are named like the bare model's parameters.
        """
        params = dict(named_parameters)
        names = select_targets(params.items(), include, exclude)
        # Wrapper components (`module.`, `_orig_mod.`) are not part of the model's names: keep them out of the file.
        return cls({
            _normalize_name(name): torch.ones(param_shape(params[name]), dtype=torch.bool, device=params[name].device)
            for name in names
        })

    @classmethod
    def from_zeros(
        cls,
        named_parameters: Iterable[tuple[str, Tensor]],
        include: Sequence[str] = DEFAULT_TARGETS,
        exclude: Sequence[str] = (),
    ) -> MaskStore:
        """Masks that keep exactly the non-zero weights of the selected targets.

        Locks the pattern of a sparse checkpoint that was published without a mask file. Needs unsharded weights.
        Names drop wrapper components, as in :meth:`dense`.
        """
        params = dict(named_parameters)
        names = select_targets(params.items(), include, exclude)
        return cls({_normalize_name(name): params[name].detach() != 0 for name in names})

    # --- mapping protocol ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._masks[name]
        except KeyError:
            raise KeyError(f"no mask named {name!r}; the store has {_format_names(list(self._masks), 4)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def names(self) -> list[str]:
        """Mask names, in insertion order."""
        return list(self._masks)

    def keys(self) -> list[str]:
        """Same as :meth:`names` (lets a store pass where a mapping is expected)."""
        return self.names()

    def items(self) -> list[tuple[str, Tensor]]:
        """(name, mask) pairs; the masks are the stored tensors, not copies."""
        return list(self._masks.items())

    @property
    def version(self) -> int:
        """Increases whenever a mask changes or moves."""
        return self._version

    def __repr__(self) -> str:
        return f"MaskStore({len(self)} masks, sparsity={self.sparsity():.4f})"

    # --- changes ------------------------------------------------------------------------------------------------
    def update(self, new_masks: Mapping[str, Tensor]) -> MaskChanges:
        """Replace masks by ``new_masks``; return what changed: the newly pruned positions (kept before, pruned now)
        per name, as a dict, with the revived positions (pruned before, kept now) in its ``.revived``.

        Existing masks are overwritten in place (same tensor objects, same devices); unknown names are added (all
        their pruned positions count as newly pruned).

        Raises:
            ValueError: if a new mask is not bool, its shape differs from the stored mask, or it breaks the store's
                N:M :attr:`pattern` (nothing is changed then).
        """
        for name, mask in new_masks.items():
            _as_mask(name, mask)
            if name in self._masks and self._masks[name].shape != mask.shape:
                stored = tuple(self._masks[name].shape)
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, stored {stored}")
        _require_pattern(new_masks, self._pattern)
        newly_pruned, revived = {}, {}
        for name, mask in new_masks.items():
            current = self._masks.get(name)
            if current is None:
                self._masks[name] = mask.detach().clone()
                newly_pruned[name] = ~self._masks[name]
                revived[name] = torch.zeros_like(self._masks[name])
            else:
                mask = mask.to(current.device)
                newly_pruned[name] = current & ~mask
                revived[name] = ~current & mask
                current.copy_(mask)
        self._version += 1
        return MaskChanges(newly_pruned, revived)

    def to(self, device: torch.device | str) -> MaskStore:
        """Move every mask to ``device`` (in place on the store) and return the store."""
        self._masks = {name: mask.to(device) for name, mask in self._masks.items()}
        self._version += 1
        return self

    def bind(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Mask name -> parameter of ``model``; see :func:`bind_masks`."""
        return bind_masks(model, self)

    # --- statistics ---------------------------------------------------------------------------------------------
    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned positions per mask."""
        return {name: 1.0 - int(mask.sum()) / max(mask.numel(), 1) for name, mask in self._masks.items()}

    def sparsity(self) -> float:
        """Fraction of pruned positions over all masks (0.0 for an empty store)."""
        total = sum(mask.numel() for mask in self._masks.values())
        kept = sum(int(mask.sum()) for mask in self._masks.values())
        return 1.0 - kept / total if total else 0.0

    # --- persistence --------------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "format": _MASK_FILE_FORMAT,
            "format_version": _MASK_FILE_VERSION,
            "bitorder": _BITORDER,
            "pattern": self._pattern,
            "shapes": {name: list(mask.shape) for name, mask in self._masks.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the masks as bit-packed safetensors (1 bit per weight; shapes in the metadata), atomically."""
        from safetensors.numpy import save_file

        meta = self._metadata()
        metadata = {key: json.dumps(value) if key == "shapes" else value for key, value in meta.items()}
        arrays = {name: _pack(mask).numpy() for name, mask in self._masks.items()}
        atomic_save(lambda tmp: save_file(arrays, tmp, metadata=metadata), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> MaskStore:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist (naming it).
            MaskFileError: if it is not a readable pofa mask file (naming it and what is wrong).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        try:
            with safe_open(path, framework="np") as handle:
                metadata = handle.metadata() or {}
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise MaskFileError(f"{path}: not a readable safetensors mask file ({error})") from error
        if metadata.get("format") != _MASK_FILE_FORMAT or metadata.get("format_version") != _MASK_FILE_VERSION:
            raise MaskFileError(
                f"{path}: metadata says format={metadata.get('format')!r} version={metadata.get('format_version')!r}, "
                f"expected {_MASK_FILE_FORMAT!r} version {_MASK_FILE_VERSION!r}"
            )
        try:
            shapes = json.loads(metadata["shapes"])
        except (KeyError, json.JSONDecodeError) as error:
            raise MaskFileError(f"{path}: metadata 'shapes' is missing or not JSON ({error})") from error
        if not isinstance(shapes, dict) or set(shapes) != set(arrays):
            raise MaskFileError(f"{path}: the shapes in the metadata do not list exactly the stored masks")
        masks = {name: _unpack(arrays[name], shapes[name], f"{path} [{name}]").to(device) for name in shapes}
        try:
            # Files written before patterns were recorded hold unstructured masks.
            return cls(masks, pattern=metadata.get("pattern", UNSTRUCTURED))
        except ValueError as error:
            raise MaskFileError(f"{path}: {error}") from error

    def state_dict(self) -> dict[str, Any]:
        """Bit-packed CPU copy of the masks, for ``torch.save`` / accelerate's ``register_for_checkpointing``."""
        meta = self._metadata()
        return {**meta, "packed": {name: _pack(mask) for name, mask in self._masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the store equal to ``state`` (from :meth:`state_dict`).

        Masks whose name and shape already exist are overwritten in place on their current device; new ones go to the
        device of the existing masks (CPU for an empty store); masks absent from ``state`` are dropped.

        Raises:
            MaskFileError: if ``state`` is not a pofa mask state dict.
        """
        packed, shapes = state.get("packed"), state.get("shapes")
        if (
            state.get("format") != _MASK_FILE_FORMAT
            or not isinstance(packed, Mapping)
            or not isinstance(shapes, Mapping)
            or set(packed) != set(shapes)
        ):
            raise MaskFileError(f"not a pofa mask state dict (keys: {sorted(state)})")
        device = next(iter(self._masks.values())).device if self._masks else torch.device("cpu")
        loaded = {
            name: _unpack(bits.numpy(), shapes[name], f"state_dict [{name}]")
            for name, bits in packed.items()
        }
        pattern = state.get("pattern", UNSTRUCTURED)
        try:
            _require_pattern(loaded, pattern)
        except ValueError as error:
            raise MaskFileError(f"state_dict: {error}") from error
        masks: dict[str, Tensor] = {}
        for name, mask in loaded.items():
            current = self._masks.get(name)
            if current is not None and current.shape == mask.shape:
                current.copy_(mask)
                masks[name] = current
            else:
                masks[name] = mask.to(device)
        self._masks = masks
        self._pattern = pattern
        self._version += 1


# --------------------------------------------------------------------------------------------------------------------
# Checks and reports


def _copies_of(param: nn.Parameter) -> Iterator[tuple[str, Tensor]]:
    """(label, full tensor) for each copy of ``param`` that must respect its mask."""
    with gathered_param(param) as visible:
        yield "weight", visible
    master = deepspeed_master_weight(param)
    if master is not None:
        yield "fp32 master", master


def check_masks(model: nn.Module, store: MaskStore) -> None:
    """Check that every pruned position of every masked weight is exactly zero, and, for a store with an N:M or block
    :attr:`MaskStore.pattern`, that every mask follows it (so the weights do: at most N non-zeros in each group of M;
    each block all zero or all kept).

    On DeepSpeed models both the visible weights and DeepSpeed's fp32 master copies are checked; on sharded backends
    this is a collective (call on every rank).

    Raises:
        MaskViolationError: naming each offending parameter (and copy) with how many pruned positions are non-zero,
            and each mask that breaks the store's N:M pattern with how many of its groups keep too many.
        ValueError: if the masks do not bind to ``model``.
    """
    bound = bind_masks(model, store)
    # The store refuses masks that break its pattern, but a mask tensor can be written in place: check again.
    problems = [f"{line} (pattern {store.pattern})" for line in _pattern_problems(dict(store.items()), store.pattern)]
    for name in sorted(bound):
        keep = store[name]
        pruned = keep.numel() - int(keep.sum())
        for label, tensor in _copies_of(bound[name]):
            nonzero = int(((tensor.reshape(keep.shape) != 0) & ~keep.to(tensor.device)).sum())
            if nonzero:
                problems.append(f"{name} ({label}): {nonzero} of {pruned} pruned positions are non-zero")
    if problems:
        raise MaskViolationError("pruned weights are non-zero or masks break their pattern:\n  "
                                 + "\n  ".join(problems))


def sparsity_report(model: nn.Module, store: MaskStore) -> dict[str, Any]:
    """Measured sparsity of ``model`` against ``store``.

    Returns ``{"pattern": store.pattern, "parameters": {mask name: {shape, numel, zeros, sparsity,
    target_sparsity}}, "targets": {numel, zeros, sparsity, target_sparsity}, "model": {numel, zeros, sparsity}}``:
    ``zeros``/``sparsity`` are measured on the weights, ``target_sparsity`` is the mask's; ``targets`` sums the masked
    weights (the encoder Linear layers by default), ``model`` every parameter. A collective on sharded backends.
    """
    bound = bind_masks(model, store)
    name_of = {id(param): name for name, param in bound.items()}
    parameters: dict[str, dict[str, Any]] = {}
    model_numel = model_zeros = 0
    for _, param in model.named_parameters():
        with gathered_param(param) as value:
            zeros = int((value == 0).sum())
            numel = value.numel()
        model_numel += numel
        model_zeros += zeros
        name = name_of.get(id(param))
        if name is not None:
            keep = store[name]
            parameters[name] = {
                "shape": list(keep.shape),
                "numel": numel,
                "zeros": zeros,
                "sparsity": zeros / numel,
                "target_sparsity": 1.0 - int(keep.sum()) / numel,
            }
    target_numel = sum(entry["numel"] for entry in parameters.values())
    target_zeros = sum(entry["zeros"] for entry in parameters.values())
    target_pruned = sum(entry["target_sparsity"] * entry["numel"] for entry in parameters.values())
    return {
        "pattern": store.pattern,
        "parameters": {name: parameters[name] for name in store.names() if name in parameters},
        "targets": {
            "numel": target_numel,
            "zeros": target_zeros,
            "sparsity": target_zeros / target_numel if target_numel else 0.0,
            "target_sparsity": target_pruned / target_numel if target_numel else 0.0,
        },
        "model": {
            "numel": model_numel,
            "zeros": model_zeros,
            "sparsity": model_zeros / model_numel if model_numel else 0.0,
        },
    }


def format_sparsity_table(report: Mapping[str, Any], *, markdown: bool = False) -> str:
    """Render :func:`sparsity_report` as a fixed-width text table, or a markdown table with ``markdown=True``."""
    header = ["parameter", "shape", "numel", "zeros", "sparsity", "target"]
    def row(label: str, shape: str, entry: Mapping[str, Any]) -> list[str]:
        target = f"{entry['target_sparsity']:.2%}" if "target_sparsity" in entry else ""
        return [label, shape, str(entry["numel"]), str(entry["zeros"]), f"{entry['sparsity']:.2%}", target]

    rows = [row(name, "x".join(map(str, e["shape"])), e) for name, e in report["parameters"].items()]
    rows.append(row("masked weights (total)", "", report["targets"]))
    rows.append(row("whole model", "", report["model"]))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows[:-2]), rule, *map(line, rows[-2:])])
