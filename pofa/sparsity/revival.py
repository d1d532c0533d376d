"""Pruned weights that can come back: the values they had, kept beside the exact zeros.

The Prune-Once-for-All authors' code (IntelLabs Model-Compression-Research-Package, ``UnstructuredMagnitudePruning
Method``) reparametrises every pruned weight as ``original * mask`` and recomputes the mask at every pruning event
from ``|original|`` over all positions, pruned ones included. A pruned original gets zero gradient, so it keeps the
value it had when pruned, shrunk only by AdamW's decoupled weight decay (``p -= lr * wd * p`` every step); when the
kept weights around it shrink below it, a later event brings it back with that value.

pofa keeps pruned weights at exactly zero (:class:`pofa.sparsity.optim.MaskGuard`), so the hidden originals live
here instead: :class:`PrunedValues` holds, per masked weight, a float32 tensor with the values pruned positions had
when pruned (0 at kept positions), and one Python float ``decay`` = prod(1 - lr_t * weight_decay) over the optimizer
steps since those values were last brought up to date. Weight decay is thus exact and costs one float multiply per
step; the tensors are touched only at pruning events, where the decay is folded in (one multiply per tensor).

Usage::

    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)
    pruned_values = PrunedValues.zeros(store)               # after MaskGuard: same device as the masks
    for step ...:
        if is_pruning_step(step, ...):
            changes = guard.prune_(sparsity, optimizer=optimizer, revive=pruned_values)   # all ranks
        ...; optimizer.step()
        pruned_values.step_(optimizer.param_groups[0]["lr"], weight_decay)   # once per optimizer step

Differences from the authors' code, by design: a revived weight's Adam moments start at zero (pofa zeroed them when
it was pruned; theirs decay but persist), and the residual Adam update a pruned original receives in the steps after
pruning (its moments decaying: about ``9 * lr * m / sqrt(v)`` in all for betas 0.9, 0.999) is not modelled. Their
kthvalue threshold with ``>`` prunes ``int(s * n)`` positions when magnitudes are distinct; pofa prunes exactly
``round(s * n)``, ties broken by position. Their global scope uses a 1024-bin histogram threshold; pofa's is exact.

Cost (bench/bench_mask_recompute.py, BERT-base encoder Linear weights, 84.9 M, CPU, 2 threads): 4 bytes per masked
weight (324 MiB: one fp32 copy of the targets, a quarter of fp32 weights + gradients + AdamW moments), on every
rank; a layer-scope pruning event takes about 1.1x the time of one without revival; ``step_`` about 0.1 us, where
decaying the stored tensors every step would take ~14 ms. Tested in tests/unit/sparsity/test_revival.py (against a
re-implementation of the authors' rule) and test_revival_distributed.py (DeepSpeed ZeRO-2/3 bf16, FSDP2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from pofa.sparsity.masks import MaskChanges, MaskFileError, MaskStore, atomic_save

__all__ = ["PrunedValues"]

_FORMAT = "pofa.pruned_values"
_FORMAT_VERSION = "1"


def _as_values(name: str, values: Tensor) -> Tensor:
    if not isinstance(values, Tensor) or values.dtype != torch.float32:
        got = values.dtype if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"pruned values {name!r} must be a float32 tensor, got {got}")
    return values


def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    return float(decay)


class PrunedValues:
    """Per masked weight, the values its pruned positions had when pruned, decayed as AdamW would have decayed them.

    ``values[name]`` is a float32 tensor shaped like the mask, holding at every pruned position the value stored
    when it was pruned and 0 at kept positions; the value a pruned position holds *now* is ``values * decay``.
    :meth:`step_` advances ``decay`` by one optimizer step; :meth:`current_` folds it into the tensors.
    :meth:`pofa.sparsity.optim.MaskGuard.prune_` with ``revive=`` reads and updates this object at every event.
    """

    def __init__(self, values: Mapping[str, Tensor], *, decay: float = 1.0) -> None:
        self._values: dict[str, Tensor] = {name: _as_values(name, tensor) for name, tensor in values.items()}
        self._decay = _check_decay(decay)

    @classmethod
    def zeros(cls, store: MaskStore, *, device: torch.device | str | None = None) -> PrunedValues:
        """Nothing stored yet, for every mask of ``store``, on ``device`` (default: each mask's device).

        Positions already pruned in ``store`` hold 0, so they can only come back where kept weights are exactly 0:
        for a store restored from a checkpoint, load the saved values too (:meth:`load`).
        """
        return cls({
            name: torch.zeros(mask.shape, dtype=torch.float32, device=mask.device if device is None else device)
            for name, mask in store.items()
        })

    # --- reading -----------------------------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        """prod(1 - lr * weight_decay) over the optimizer steps since the tensors were last brought up to date."""
        return self._decay

    def names(self) -> list[str]:
        """Mask names, in insertion order."""
        return list(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def nbytes(self) -> int:
        """Memory of the stored tensors in bytes (4 per masked weight: the same as an fp32 copy of them)."""
        return sum(values.numel() * values.element_size() for values in self._values.values())

    def __repr__(self) -> str:
        return f"PrunedValues({len(self)} tensors, {self.nbytes() / 2**20:.1f} MiB, decay={self._decay!r})"

    # --- changes -----------------------------------------------------------------------------------------------
    def step_(self, lr: float, weight_decay: float) -> None:
        """Account for one optimizer step of decoupled weight decay: ``decay *= 1 - lr * weight_decay``.

        Call once per optimizer step that was applied (not per micro-step; not for a step the optimizer skipped),
        with the learning rate and weight decay of the parameter group holding the masked weights. Only a Python
        float changes, so this costs nothing per step; torch's AdamW multiplies the weight by the same factor.

        Raises:
            ValueError: if ``1 - lr * weight_decay`` is not in [0, 1] (negative lr or decay, or lr * wd > 1).
        """
        factor = 1.0 - float(lr) * float(weight_decay)
        if not 0.0 <= factor <= 1.0:  # also rejects NaN
            raise ValueError(f"1 - lr * weight_decay must be in [0, 1], got {factor!r} (lr={lr!r}, "
                             f"weight_decay={weight_decay!r})")
        self._decay *= factor

    def current_(self) -> dict[str, Tensor]:
        """Name -> the values pruned positions hold now (0 at kept positions), float32.

        Folds the pending decay into the stored tensors (one multiply each, skipped when ``decay`` is 1) and returns
        those tensors themselves, not copies: read them before the next :meth:`record_`.
        """
        if self._decay != 1.0:
            for values in self._values.values():
                values.mul_(self._decay)
            self._decay = 1.0
        return dict(self._values)

    def record_(self, weights: Mapping[str, Tensor], changes: MaskChanges) -> None:
        """Follow one mask update: store the current value of every newly pruned position (from ``weights``, read
        before the pruned weights are zeroed) and forget every revived one.

        ``weights`` are full, unsharded tensors (any float dtype; DeepSpeed's fp32 master copies where they exist,
        as :meth:`pofa.sparsity.optim.MaskGuard.full_weights` gives). Folds the pending decay first, so every stored
        value is as of now.

        Raises:
            ValueError: if ``changes`` names a weight this object holds no values for.
        """
        unknown = sorted((set(changes) | set(changes.revived)) - set(self._values))
        if unknown:
            raise ValueError(f"no pruned values for {unknown[:4]}; create PrunedValues from the same MaskStore")
        self.current_()
        for name, values in self._values.items():
            # Skipping unchanged tensors matters after the ramp, where most events change few weights.
            revived = changes.revived.get(name)
            if revived is not None and bool(revived.any()):
                values.masked_fill_(revived.to(values.device).reshape(values.shape), 0)
            pruned = changes.get(name)
            if pruned is not None and bool(pruned.any()):
                pruned = pruned.to(values.device).reshape(values.shape)
                weight = weights[name].detach().to(device=values.device, dtype=torch.float32).reshape(values.shape)
                # where() rather than boolean indexing: one vectorised pass, several times faster on CPU.
                values.copy_(torch.where(pruned, weight, values))

    # --- persistence -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The values (CPU float32; for CPU buffers the live tensors, not copies) and the pending decay.

        The decay is not folded in: folding rounds once more, and resuming must give the bits an uninterrupted run
        gives. For ``torch.save`` / accelerate's ``register_for_checkpointing``.
        """
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "decay": self._decay,
            "values": {name: values.detach().to("cpu") for name, values in self._values.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make this object equal to ``state`` (from :meth:`state_dict`), bit for bit, copying into the existing
        tensors (their devices are kept).

        Raises:
            MaskFileError: if ``state`` is not a pruned-values state dict, or its names or shapes differ from these.
        """
        values = state.get("values")
        if state.get("format") != _FORMAT or not isinstance(values, Mapping) or "decay" not in state:
            raise MaskFileError(f"not a pofa pruned-values state dict (keys: {sorted(state)})")
        if set(values) != set(self._values):
            missing, extra = sorted(set(self._values) - set(values)), sorted(set(values) - set(self._values))
            raise MaskFileError(f"pruned values do not match the masks: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, tensor in values.items():
            if tensor.shape != self._values[name].shape or tensor.dtype != torch.float32:
                raise MaskFileError(f"pruned values {name!r}: {tensor.dtype} {tuple(tensor.shape)}, expected "
                                    f"float32 {tuple(self._values[name].shape)}")
        try:
            decay = _check_decay(state["decay"])
        except ValueError as error:
            raise MaskFileError(f"pruned values: {error}") from error
        for name, tensor in values.items():
            self._values[name].copy_(tensor)
        self._decay = decay

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the values as float32 safetensors, with the pending decay (exactly, as its repr) in the metadata,
        atomically (write, then rename). About 4 bytes per masked weight."""
        from safetensors.torch import save_file

        tensors = {name: values.detach().to("cpu").contiguous() for name, values in self._values.items()}
        metadata = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "decay": repr(self._decay),
                    "names": json.dumps(list(self._values))}
        atomic_save(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> PrunedValues:
        """Read a file written by :meth:`save` (names in their saved order).

        Raises:
            FileNotFoundError: if ``path`` does not exist (naming it).
            MaskFileError: if it is not a readable pofa pruned-values file (naming it and what is wrong).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pruned-values file not found: {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise MaskFileError(f"{path}: not a readable safetensors file ({error})") from error
        if metadata.get("format") != _FORMAT or metadata.get("format_version") != _FORMAT_VERSION:
            raise MaskFileError(f"{path}: metadata says format={metadata.get('format')!r} "
                                f"version={metadata.get('format_version')!r}, expected {_FORMAT!r} {_FORMAT_VERSION!r}")
        try:
            names = json.loads(metadata["names"])
            decay = float(metadata["decay"])
        except (KeyError, ValueError) as error:
            raise MaskFileError(f"{path}: metadata 'names' or 'decay' is missing or malformed ({error})") from error
        if not isinstance(names, list) or set(names) != set(tensors) or not math.isfinite(decay):
            raise MaskFileError(f"{path}: the metadata does not list exactly the stored tensors")
        try:
            return cls({name: tensors[name].to(device) for name in names}, decay=decay)
        except ValueError as error:
            raise MaskFileError(f"{path}: {error}") from error
