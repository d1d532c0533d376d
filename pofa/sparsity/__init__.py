"""Gradual magnitude pruning: when (schedule), what (masks), and keeping zeros at zero under any optimizer (optim)."""

from pofa.sparsity.masks import (
    DEFAULT_TARGETS,
    POOLER_TARGET,
    MaskChanges,
    MaskFileError,
    MaskStore,
    MaskViolationError,
    UNSTRUCTURED,
    bind_masks,
    check_masks,
    format_sparsity_table,
    magnitude_masks,
    nm_masks,
    nm_violations,
    block_masks,
    block_violations,
    parse_block,
    parse_pattern,
    pattern_sparsity,
    select_targets,
    sparsity_report,
)
from pofa.sparsity.optim import MaskGuard
from pofa.sparsity.lock import lock_sparsity
from pofa.sparsity.revival import PrunedValues
from pofa.sparsity.schedule import cubic_sparsity, is_pruning_step

__all__ = [
    "DEFAULT_TARGETS",
    "POOLER_TARGET",
    "MaskChanges",
    "MaskFileError",
    "MaskGuard",
    "MaskStore",
    "MaskViolationError",
    "PrunedValues",
    "UNSTRUCTURED",
    "bind_masks",
    "check_masks",
    "cubic_sparsity",
    "format_sparsity_table",
    "is_pruning_step",
    "lock_sparsity",
    "magnitude_masks",
    "nm_masks",
    "nm_violations",
    "block_masks",
    "block_violations",
    "parse_block",
    "parse_pattern",
    "pattern_sparsity",
    "select_targets",
    "sparsity_report",
]
