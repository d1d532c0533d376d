"""Keep pruned weights at exactly zero while an optimizer trains the rest.

Zeroing the visible weights after each step is not enough, and earlier tools failed in two ways:
  * DeepSpeed keeps fp32 master weights (and FSDP keeps shards) that the optimizer updates and copies back over the
    module's weights, so the zeros the module shows are overwritten at the next step;
  * Adam's moments hold momentum from before pruning, and weight decay / momentum keep moving a zeroed weight, so a
    pruned weight comes back to life one step later.

:class:`MaskGuard` closes both gaps: gradient hooks make the gradient of every pruned position exactly zero before
anything else sees it (gradient accumulation, DDP all-reduce, DeepSpeed/FSDP reduce-scatter, clipping norms, Adam
moments), and :meth:`MaskGuard.enforce_` (called after each mask update) zeroes the pruned positions of the weights,
of every optimizer state tensor shaped like the weight, and of DeepSpeed's fp32 master weights and optimizer states.
After that, an AdamW-like optimizer can never move a pruned weight: its gradient and moments are 0, so its update is
0, and decoupled weight decay multiplies 0 by a constant.

Usage (one loop, any backend below)::

    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)              # after accelerator.prepare / deepspeed.initialize is fine too
    for step ...:
        loss.backward(); clip; optimizer.step(); optimizer.zero_grad()
        if is_pruning_step(done_steps, ...):
            guard.prune_(cubic_sparsity(done_steps, ...), optimizer=optimizer)   # all ranks
            # or revive=pruned_values to let pruned weights come back (pofa.sparsity.revival.PrunedValues)
    check_masks(model, store)

Supported and tested (tests/unit/sparsity/test_optim.py, tests/integration/test_distributed_masks.py, 2 CPU
processes over gloo): plain PyTorch with AdamW (and SGD with momentum), gradient accumulation, ``torch.autocast``
bf16; torch DDP; DeepSpeed ZeRO-2 (fp32, and bf16 with gradient accumulation) and ZeRO-3 (bf16 with gradient
accumulation) with a client torch AdamW; torch FSDP2 ``fully_shard`` (DTensor parameters: gradients are masked on
the local shard in the sharded parameter's post-accumulate-grad hook, which FSDP2 runs after its reduce-scatter).
fp16 autocast takes the same path as bf16 (the hook masks whatever dtype the gradient has). ``torch.compile``d
models work (hooks sit on the leaf parameters, outside the compiled graph).

Not supported: FSDP1 (flat parameters), DeepSpeed without ZeRO in fp16 (its FP16_Optimizer master weights have no
``safe_*`` accessors), DeepSpeed parameter/optimizer offload and NVMe swapping (untested). :func:`check_masks` detects
all of these. Optimizers whose state is not shaped like the weight (Adafactor's factored moments) stay correct
because the gradient is zero; for optimizers that move a weight with zero gradient and zero state (none of the
usual ones), call :meth:`MaskGuard.after_step_`.

Cost: with hooks, one ``torch.where`` over each masked gradient per backward pass (memory-bound, a new tensor each
time), so the share grows as micro-batches shrink. pofa's own loops use ``gradients="step"`` instead on plain and DDP
parameters: one in-place multiply by the mask per masked gradient per optimizer step, before clipping
(``bench/bench_student_step.py`` measures both). Pruning events (every ~1000 steps) cost a magnitude selection per
weight plus, for DeepSpeed/FSDP2, gathers of the weights and optimizer states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from pofa.sparsity.masks import (
    MaskChanges,
    MaskStore,
    _is_deepspeed_param,
    _is_dtensor,
    bind_masks,
    deepspeed_master_weight,
    gathered_param,
    magnitude_masks,
)

if TYPE_CHECKING:
    from pofa.sparsity.revival import PrunedValues

__all__ = ["MaskGuard"]


def _local_part(full: Tensor, like: Tensor) -> Tensor:
    """The part of the full tensor ``full`` that lives on this rank for ``like`` (its local shard if a DTensor)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Masks are identical on every rank, so each rank can cut its own shard: no communication (src_data_rank=None).
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _make_grad_hook(mask_of: Callable[[], Tensor], name: str) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        mask = mask_of()
        if grad.shape != mask.shape:
            # DeepSpeed ZeRO-3 can hand an empty placeholder for a partitioned parameter; nothing to mask there.
            if grad.numel() == 0:
                return grad
            raise RuntimeError(f"gradient of {name} has shape {tuple(grad.shape)}, its mask {tuple(mask.shape)}")
        # where() rather than grad * mask: an inf gradient (fp16 overflow) times 0 would be NaN.
        return torch.where(mask, grad, 0)

    return hook


def _make_post_accumulate_hook(mask_of: Callable[[], Tensor]) -> Callable[[Tensor], None]:
    def hook(param: Tensor) -> None:
        if param.grad is not None:
            with torch.no_grad():
                _local(param.grad).masked_fill_(~mask_of(), 0)

    return hook


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps, outermost first (accelerate's and DeepSpeed's wrappers each hold the next in
    ``.optimizer``); a wrapper that points back to one already seen ends the chain."""
    chain: list[Any] = []
    while optimizer is not None and all(optimizer is not seen for seen in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer owning ``.state`` under accelerate / DeepSpeed wrappers."""
    return _optimizer_chain(optimizer)[-1] if optimizer is not None else None


def _deepspeed_state_keys(zero_optimizer: Any) -> list[str]:
    """Optimizer-state keys that DeepSpeed stores per element (e.g. exp_avg, exp_avg_sq), identical on every rank."""
    inner = _innermost_optimizer(zero_optimizer)
    keys: set[str] = set()
    for flat_param, state in getattr(inner, "state", {}).items():
        for key, value in state.items():
            if torch.is_tensor(value) and torch.is_tensor(flat_param) and value.shape == flat_param.shape:
                keys.add(key)
    # ZeRO-1/2 link per-parameter views of the state lazily, at the first step; make sure they exist.
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if keys and callable(link):
        link()
    return sorted(keys)


class MaskGuard:
    """Keeps the pruned weights of ``model`` at exactly zero through training; see the module docstring.

    ``MaskGuard(model, store)`` binds the store's masks to the model's parameters (moving masks to the parameters'
    device if needed) and registers one gradient hook per masked parameter. The hooks read masks from the store at
    every call, so :meth:`MaskStore.update` takes effect immediately. ``model`` may be a plain module, a DDP / FSDP2 /
    ``torch.compile`` wrapped module, or a DeepSpeed engine (or its ``.module``).

    ``gradients="step"`` registers no hook on plain and DDP parameters: the loop calls :meth:`mask_gradients_` once
    per optimizer step instead, after the last backward (and DDP's all-reduce) and before clipping, in place. Masking
    commutes with summing, so the result is the same, bit for bit, at one pass per optimizer step instead of one
    allocating pass per micro-step. DeepSpeed and FSDP2 parameters keep their hooks (their gradients are reduced
    into shards that the loop never sees).
    """

    def __init__(self, model: nn.Module, store: MaskStore, *, gradients: Literal["hooks", "step"] = "hooks") -> None:
        if gradients not in ("hooks", "step"):
            raise ValueError(f"gradients must be 'hooks' or 'step', got {gradients!r}")
        self._model = model
        self._store = store
        self._params = bind_masks(model, store)
        devices = {param.device for param in self._params.values()}
        if len(devices) > 1:
            raise ValueError(f"masked parameters are spread over several devices ({sorted(map(str, devices))}); "
                             "MaskGuard supports one device per process")
        if devices and {mask.device for _, mask in store.items()} != devices:
            store.to(next(iter(devices)))
        self._local_masks: dict[str, tuple[int, Tensor]] = {}
        self._handles: list[Any] = []
        self._masked_per_step: list[str] = []
        for name, param in self._params.items():
            if not param.requires_grad:
                continue
            if gradients == "step" and not _is_dtensor(param) and not _is_deepspeed_param(param):
                self._masked_per_step.append(name)
            elif _is_dtensor(param):
                # FSDP2 reduce-scatters into the sharded DTensor's .grad outside autograd, then runs the sharded
                # parameter's post-accumulate-grad hooks: mask the local gradient shard there.
                hook = _make_post_accumulate_hook(lambda n=name: self._local_mask(n))
                self._handles.append(param.register_post_accumulate_grad_hook(hook))
            else:
                # Tensor hooks run before accumulation into .grad and before DDP / DeepSpeed reduction hooks.
                self._handles.append(param.register_hook(_make_grad_hook(lambda n=name: self._store[n], name)))

    # --- helpers ------------------------------------------------------------------------------------------------
    @property
    def store(self) -> MaskStore:
        """The masks this guard enforces."""
        return self._store

    def _local_mask(self, name: str) -> Tensor:
        """The mask of ``name`` as laid out on this rank (local shard for DTensor parameters), cached per version."""
        param = self._params[name]
        if not _is_dtensor(param):
            return self._store[name]
        cached = self._local_masks.get(name)
        if cached is None or cached[0] != self._store.version:
            cached = (self._store.version, _local_part(self._store[name], param))
            self._local_masks[name] = cached
        return cached[1]

    def _uses_deepspeed(self) -> bool:
        return any(_is_deepspeed_param(param) for param in self._params.values())

    def _zero_optimizer(self, optimizer: Any) -> Any:
        """DeepSpeed's ZeRO optimizer: the engine's when the guard holds the engine, else the one inside what the
        caller passed (accelerate's wrapper > ZeRO optimizer > torch optimizer, as a Trainer callback receives it).
        The torch optimizer inside would not do: the per-parameter views of its state are linked by the ZeRO one."""
        engine_optimizer = getattr(self._model, "optimizer", None)
        outer = engine_optimizer if engine_optimizer is not None else optimizer
        linking = [o for o in _optimizer_chain(outer)
                   if callable(getattr(o, "_lazy_init_hp_params_optimizer_state", None))]
        return linking[0] if linking else outer  # ZeRO-3's optimizer needs no linking

    # --- public API ---------------------------------------------------------------------------------------------
    def mask_gradients_(self) -> None:
        """Zero, in place, the pruned positions of the gradients that ``gradients="step"`` left to this call.

        Call once per optimizer step, after the last micro-step's backward and before clipping and the optimizer
        step (``pofa.loop.micro_step`` does). A no-op for parameters that have hooks.
        """
        with torch.no_grad():
            for name in self._masked_per_step:
                grad = self._params[name].grad
                if grad is not None:
                    # A multiply by the mask's bytes (a free view of the bool mask): vectorised, ~4x faster on CPU
                    # than masked_fill_ with the inverted mask, and no new tensor. An overflowing (inf) pruned
                    # gradient becomes NaN, so fp16's loss scaler skips the step, as it would for an overflow in
                    # dense training.
                    grad.mul_(self._store[name].view(torch.uint8))

    def full_weights(self) -> dict[str, Tensor]:
        """Mask name -> full, unsharded weight to rank by magnitude (DeepSpeed: the fp32 master copy).

        Plain parameters are returned without copying; DTensor and DeepSpeed parameters are gathered (a collective:
        call on every rank).
        """
        weights = {}
        for name in sorted(self._params):
            param = self._params[name]
            master = deepspeed_master_weight(param)
            if master is not None:
                weights[name] = master.reshape(self._store[name].shape)
                continue
            with gathered_param(param) as value:
                # Plain: the parameter itself. FSDP2: a fresh all-gathered tensor. ZeRO-3 (frozen, no master):
                # gathered storage that is released on exit, so copy it.
                fresh_or_own = value is param.data or _is_dtensor(param)
                weights[name] = value.detach() if fresh_or_own else value.detach().clone()
        return weights

    def prune_(
        self,
        sparsity: float,
        *,
        optimizer: Any = None,
        scope: Literal["layer", "global"] = "layer",
        revive: PrunedValues | None = None,
        pattern: str = "unstructured",
    ) -> MaskChanges:
        """Recompute the masks at ``sparsity`` by magnitude, update the store, enforce them; return what changed
        (a dict of newly pruned positions, with the revived ones in ``.revived``). ``pattern`` (``"unstructured"``
        or ``"N:M"``) is :func:`pofa.sparsity.masks.magnitude_masks`'s.

        Without ``revive``, previously pruned weights stay pruned (see :func:`magnitude_masks`). With ``revive`` (a
        :class:`pofa.sparsity.revival.PrunedValues` made from this guard's store), pruned positions compete by the
        values stored in it, as in the authors' reparametrised code: a revived position gets its stored (decayed)
        value back in the weight (and DeepSpeed's fp32 master copy) and its optimizer state restarts at zero; newly
        pruned positions have their values stored before they are zeroed. Call on every rank.
        """
        weights = self.full_weights()
        if revive is None:
            changes = self._store.update(magnitude_masks(weights, sparsity, scope=scope, previous=self._store,
                                                         pattern=pattern))
            self.enforce_(optimizer, changes)
            return changes
        held = revive.current_()  # the hidden originals of the pruned positions, as of now
        changes = self._store.update(
            magnitude_masks(weights, sparsity, scope=scope, previous=self._store, revive=held, pattern=pattern)
        )
        self._write_revived_(changes.revived, held)  # before record_, which forgets the revived values
        revive.record_(weights, changes)  # before enforce_, which zeroes the newly pruned weights
        # Revived positions: their moments were zeroed when pruned and got zero gradients since; zero them anyway so
        # the promise holds for any optimizer state.
        self.enforce_(optimizer, changes.touched())
        return changes

    def _write_revived_(self, revived: Mapping[str, Tensor], held: Mapping[str, Tensor]) -> None:
        """Write ``held`` into the weights at the ``revived`` positions (DeepSpeed: the fp32 master and the visible
        weight). Masks are identical on every rank, so every rank skips the same weights: collectives stay paired."""
        deepspeed = self._uses_deepspeed()
        with torch.no_grad():
            for name in sorted(self._params):
                where = revived.get(name)
                if where is None or not bool(where.any()):
                    continue
                param = self._params[name]
                if deepspeed:
                    self._write_revived_deepspeed(param, where, held[name])
                    continue
                local = _local(param)
                local_where = _local_part(where.to(local.device), param)
                local_held = _local_part(held[name].to(device=local.device, dtype=local.dtype), param)
                # where() rather than boolean indexing: one vectorised pass, several times faster on CPU.
                local.copy_(torch.where(local_where, local_held, local))

    @staticmethod
    def _write_revived_deepspeed(param: Tensor, where: Tensor, values: Tensor) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)  # collectives: same order on every rank
        if master is not None:
            at = where.to(master.device).reshape(master.shape)
            master = torch.where(at, values.to(master.device).reshape(master.shape), master)
            safe_set_full_fp32_param(param, master)
        with gathered_param(param, modify=True) as visible:
            at = where.to(visible.device).reshape(visible.shape)
            held = values.to(device=visible.device, dtype=visible.dtype).reshape(visible.shape)
            visible.copy_(torch.where(at, held, visible))

    def enforce_(self, optimizer: Any = None, newly_pruned: Mapping[str, Tensor] | None = None) -> None:
        """Zero the pruned positions of the weights, of ``optimizer``'s per-element state, and of DeepSpeed's copies.

        Weights are zeroed at every pruned position. Optimizer state tensors shaped like the weight (exp_avg,
        exp_avg_sq, max_exp_avg_sq, momentum_buffer, ...) are zeroed at the positions in ``newly_pruned`` if given,
        else at every pruned position. For DeepSpeed models the fp32 master weights and optimizer states are zeroed
        through ``deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state}``: a collective, call on every rank.
        Call after every :meth:`MaskStore.update` and after loading a checkpoint.
        """
        with torch.no_grad():
            if self._uses_deepspeed():
                self._enforce_deepspeed(self._zero_optimizer(optimizer), newly_pruned)
                return
            optimizer = _innermost_optimizer(optimizer)
            for name in sorted(self._params):
                param = self._params[name]
                keep = self._local_mask(name)
                _local(param).masked_fill_(~keep, 0)
                state = optimizer.state.get(param) if optimizer is not None else None
                if not state:
                    continue
                drop = ~keep if newly_pruned is None or name not in newly_pruned else _local_part(
                    newly_pruned[name].to(keep.device), param
                )
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        _local(value).masked_fill_(drop, 0)

    def _enforce_deepspeed(self, zero_optimizer: Any, newly_pruned: Mapping[str, Tensor] | None) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        keys = _deepspeed_state_keys(zero_optimizer) if zero_optimizer is not None else []
        for name in sorted(self._params):  # same order on every rank: each call below is a collective
            param = self._params[name]
            keep = self._store[name]
            drop = ~keep if newly_pruned is None or name not in newly_pruned else newly_pruned[name].to(keep.device)
            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, master.masked_fill_(~keep.to(master.device).reshape(master.shape), 0))
            for key in keys:
                state = safe_get_full_optimizer_state(param, key)
                if state is not None:
                    state.masked_fill_(drop.to(state.device).reshape(state.shape), 0)
                    safe_set_full_optimizer_state(param, state, key)
            with gathered_param(param, modify=True) as visible:
                visible.masked_fill_(~keep.to(visible.device).reshape(visible.shape), 0)

    def after_step_(self) -> None:
        """Re-zero the pruned weights after ``optimizer.step()``; only needed for optimizers that are not Adam-like.

        Cheap (one in-place multiply per weight, local shards only) for plain, DDP and FSDP2 models. For DeepSpeed
        models the master copies must be zeroed too, which is a collective per weight; prefer Adam-like optimizers.
        """
        if self._uses_deepspeed():
            self.enforce_()
            return
        with torch.no_grad():
            for name, param in self._params.items():
                _local(param).mul_(self._local_mask(name))

    def remove(self) -> None:
        """Remove the gradient hooks; the masks in the store are untouched."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
