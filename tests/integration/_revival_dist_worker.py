"""Worker for test_revival_distributed.py; run with ``torchrun --nproc_per_node 2``.

    torchrun --nproc_per_node 2 tests/integration/_revival_dist_worker.py MODE OUT_DIR

MODE is zero2 or zero3 (DeepSpeed, bf16, client torch AdamW) or fsdp2. Every rank trains a tiny BERT on CPU (gloo)
with its own data, prunes 90% with ``revive=``, trains, then prunes to 50% so that 40% of the weights come back, and
writes OUT_DIR/rank{R}.json with what the test asserts: the revived values in the fp32 master (or the weight) and in
the visible weight, the optimizer moments there, the masks (same on every rank) and check_masks after more steps.
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

from pofa.sparsity import MaskGuard, MaskStore, PrunedValues, check_masks
from pofa.sparsity.masks import deepspeed_master_weight, gathered_param

BATCH, SEQ, VOCAB, LR, WEIGHT_DECAY = 4, 16, 100, 1e-2, 0.01


def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)  # same initial weights on every rank
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    return BertForMaskedLM(config)


def batches(rank: int, count: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    ids = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(count)]
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def master_or_weight(param: nn.Parameter) -> Tensor:
    master = deepspeed_master_weight(param)
    if master is not None:
        return master.detach().clone().float()
    return visible(param).float()


def visible(param: nn.Parameter) -> Tensor:
    with gathered_param(param) as value:
        return value.detach().clone()


def build(mode: str) -> tuple[nn.Module, Any, Callable[[dict[str, Tensor]], None], Callable[[nn.Parameter], Tensor]]:
    """(model to guard, optimizer to pass to prune_, one training step, full exp_avg of a parameter)."""
    model = tiny_bert()
    if mode.startswith("zero"):
        import deepspeed
        import deepspeed.ops
        from deepspeed.utils import safe_get_full_optimizer_state

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see tests/integration/_dist_masks_worker.py
        config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": int(mode[-1])}, "zero_force_ds_cpu_optimizer": False,
                  "steps_per_print": 10**9}
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def ds_step(batch: dict[str, Tensor]) -> None:
            engine.backward(engine(**batch).loss)
            engine.step()

        return engine, engine.optimizer, ds_step, lambda p: safe_get_full_optimizer_state(p, "exp_avg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def fsdp_step(batch: dict[str, Tensor]) -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, optimizer, fsdp_step, lambda p: optimizer.state[p]["exp_avg"].full_tensor()


def run(mode: str, rank: int) -> dict[str, Any]:
    model, optimizer, step, exp_avg = build(mode)
    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)
    pruned_values = PrunedValues.zeros(store)
    params = store.bind(model)
    data = batches(rank, 8)

    def train(part: list[dict[str, Tensor]]) -> None:
        for batch in part:
            step(batch)
            pruned_values.step_(LR, WEIGHT_DECAY)

    train(data[:3])
    before = {name: master_or_weight(params[name]) for name in sorted(params)}
    guard.prune_(0.9, optimizer=optimizer, revive=pruned_values)
    stored = {name: values.clone() for name, values in pruned_values.current_().items()}
    stored_ok = all(torch.equal(stored[n][~store[n]], before[n][~store[n]]) for n in params)
    train(data[3:5])
    expected = {name: stored[name] * pruned_values.decay for name in params}
    changes = guard.prune_(0.5, optimizer=optimizer, revive=pruned_values)
    revived = changes.revived
    master_ok = all(torch.equal(master_or_weight(params[n])[revived[n]], expected[n][revived[n]]) for n in params)
    visible_ok = all(
        torch.equal(visible(params[n]).reshape(store[n].shape)[revived[n]].float(),
                    expected[n][revived[n]].to(params[n].dtype).float())
        for n in params
    )
    moments_zero = all(not exp_avg(params[n]).reshape(store[n].shape)[revived[n]].any() for n in sorted(params))
    check_masks(model, store)
    train(data[5:])
    check_masks(model, store)
    digest = hashlib.sha256(b"".join(store[n].numpy().tobytes() for n in sorted(params))).hexdigest()
    return {"revived": changes.num_revived(), "numel": sum(m.numel() for _, m in store.items()),
            "sparsity": store.sparsity(), "stored_ok": stored_ok, "master_ok": master_ok, "visible_ok": visible_ok,
            "moments_zero": moments_zero, "mask_digest": digest}


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode not in ("zero2", "zero3", "fsdp2"):
        raise SystemExit(f"unknown mode {mode!r}; expected zero2, zero3 or fsdp2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = run(mode, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
