"""Worker for tests/integration/test_distributed_masks.py; run with ``torchrun --nproc_per_node 2``.

    torchrun --nproc_per_node 2 tests/integration/_dist_masks_worker.py MODE OUT_DIR

MODE is one of: ddp, zero2, zero2-unguarded, zero3, fsdp2. Every rank trains a tiny BERT on CPU (gloo) with its own
data, prunes 90% after some dense AdamW steps (momentum built up), trains on, and writes OUT_DIR/rank{R}.json with
what the test asserts. ``zero2-unguarded`` only zeroes the module's visible weights (the naive approach) and no
gradients or optimizer states, to show the failure that MaskGuard prevents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import BertConfig, BertForMaskedLM

from pofa.sparsity import MaskGuard, MaskStore, MaskViolationError, check_masks, magnitude_masks
from pofa.sparsity.masks import deepspeed_master_weight, gathered_param

DENSE_STEPS = 10
SPARSE_STEPS = 10
SPARSITY = 0.9
BATCH, SEQ, VOCAB = 4, 16, 100


def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)  # same initial weights on every rank, as a checkpoint load would give
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertForMaskedLM(config)


def batches(rank: int, count: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def mask_digest(store: MaskStore) -> str:
    digest = hashlib.sha256()
    for name in sorted(store.names()):
        digest.update(name.encode())
        digest.update(store[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def pruned_nonzero(weights: dict[str, Tensor], store: MaskStore) -> int:
    return sum(int(((w.reshape(store[n].shape) != 0) & ~store[n].to(w.device)).sum()) for n, w in weights.items())


def visible_weights(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    out = {}
    for name in sorted(params):
        with gathered_param(params[name]) as value:
            out[name] = value.detach().clone()
    return out


def check_result(model: nn.Module, store: MaskStore) -> str:
    try:
        check_masks(model, store)
    except MaskViolationError as error:
        return str(error)
    return "ok"


def train(step: Callable[[dict[str, Tensor]], float], data: list[dict[str, Tensor]]) -> list[float]:
    return [step(batch) for batch in data]


def dense_then_pruned(model: nn.Module, guard: MaskGuard, rank: int) -> tuple[list[float], torch.optim.Optimizer]:
    """DENSE_STEPS of AdamW (momentum builds up), prune to SPARSITY, SPARSE_STEPS more: sparse losses, optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    def step(batch: dict[str, Tensor]) -> float:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    data = batches(rank, DENSE_STEPS + SPARSE_STEPS)
    train(step, data[:DENSE_STEPS])
    guard.prune_(SPARSITY, optimizer=optimizer)
    return train(step, data[DENSE_STEPS:]), optimizer


def run_ddp(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(tiny_bert())
    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)
    losses, optimizer = dense_then_pruned(model, guard, rank)
    weights = {n: p.detach() for n, p in guard.store.bind(model).items()}
    states = {n: optimizer.state[p]["exp_avg"] for n, p in guard.store.bind(model).items()}
    return {
        "mask_digest": mask_digest(store),
        "weight_digest": hashlib.sha256(b"".join(w.numpy().tobytes() for _, w in sorted(weights.items()))).hexdigest(),
        "sparsity": store.sparsity(),
        "pruned_nonzero": pruned_nonzero(weights, store),
        "pruned_exp_avg_nonzero": pruned_nonzero(states, store),
        "check": check_result(model, store),
        "losses": losses,
    }


def run_deepspeed(rank: int, stage: int, guarded: bool, bf16: bool = False, accumulation: int = 1) -> dict[str, Any]:
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles a shared-memory op for CPU *inference* all-reduce (~100 s the first time, and a C++
    # toolchain); training collectives go through gloo anyway, so skip it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": accumulation,
        "bf16": {"enabled": bf16},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        # The client optimizer is torch's AdamW, which runs on CPU; DeepSpeed would otherwise insist on its own.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    guard = MaskGuard(engine, store) if guarded else None
    params = store.bind(engine)

    def step(batch: dict[str, Tensor]) -> float:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # an optimizer step only at gradient-accumulation boundaries
        return float(loss.detach())

    data = batches(rank, (DENSE_STEPS + SPARSE_STEPS) * accumulation)
    train(step, data[: DENSE_STEPS * accumulation])
    if guard is not None:
        guard.prune_(SPARSITY, optimizer=engine.optimizer)
    else:
        # The naive approach: prune by the visible weights and zero only those.
        new = magnitude_masks(visible_weights(params), SPARSITY)
        store.update(new)
        for name, param in sorted(params.items()):
            with torch.no_grad(), gathered_param(param, modify=True) as value:
                value.masked_fill_(~store[name].reshape(value.shape), 0)
    pruned_visible_after_prune = pruned_nonzero(visible_weights(params), store)
    losses = train(step, data[DENSE_STEPS * accumulation :])
    masters = {name: deepspeed_master_weight(params[name]) for name in sorted(params)}
    has_masters = all(master is not None for master in masters.values())
    from deepspeed.utils import safe_get_full_optimizer_state

    exp_avg = {name: safe_get_full_optimizer_state(params[name], "exp_avg") for name in sorted(params)}
    return {
        "mask_digest": mask_digest(store),
        "sparsity": store.sparsity(),
        "has_masters": has_masters,
        "pruned_visible_after_prune": pruned_visible_after_prune,
        "pruned_master_nonzero": pruned_nonzero(masters, store) if has_masters else -1,
        "pruned_visible_nonzero": pruned_nonzero(visible_weights(params), store),
        "pruned_exp_avg_nonzero": pruned_nonzero(exp_avg, store),
        "check": check_result(engine, store),
        "losses": losses,
    }


def run_fsdp2(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    guard = MaskGuard(model, store)
    losses, optimizer = dense_then_pruned(model, guard, rank)
    params = store.bind(model)
    exp_avg = {}
    for name in sorted(params):
        exp_avg[name] = optimizer.state[params[name]]["exp_avg"].full_tensor()
    return {
        "mask_digest": mask_digest(store),
        "sparsity": store.sparsity(),
        "sharded": all(type(p).__name__ == "DTensor" for p in params.values()),
        "pruned_nonzero": pruned_nonzero(visible_weights(params), store),
        "pruned_exp_avg_nonzero": pruned_nonzero(exp_avg, store),
        "check": check_result(model, store),
        "losses": losses,
    }


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "ddp": lambda: run_ddp(rank),
        "zero2": lambda: run_deepspeed(rank, 2, guarded=True),
        "zero2-bf16-accum": lambda: run_deepspeed(rank, 2, guarded=True, bf16=True, accumulation=2),
        "zero2-unguarded": lambda: run_deepspeed(rank, 2, guarded=False),
        "zero3": lambda: run_deepspeed(rank, 3, guarded=True),
        "zero3-bf16-accum": lambda: run_deepspeed(rank, 3, guarded=True, bf16=True, accumulation=2),
        "fsdp2": lambda: run_fsdp2(rank),
    }
    if mode not in runners:
        raise SystemExit(f"unknown mode {mode!r}; expected one of {sorted(runners)}")
    result = runners[mode]()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
