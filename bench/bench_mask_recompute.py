"""What letting pruned weights come back costs: the PrunedValues memory, one pruning event, and the per-step update.

On BERT-base-shaped encoder Linear weights (12 layers x [4 x 768x768, 3072x768, 768x3072] = 84.9 M weights, random
init, CPU, with AdamW moments): the weights are pruned to --sparsity (90%), "trained" (noise of a quarter of the init
std on the kept weights, 1000 steps of weight decay), and then one pruning event at the same sparsity - a refresh after
the ramp, where revival happens - is timed with ``MaskGuard.prune_`` without and with ``revive=``. The two variants
alternate from the same saved state, so machine load affects both alike; medians and their ratio are
what to read. ``PrunedValues.step_`` (a Python float multiply per optimizer step) is timed against the per-step
tensor multiply over the stored values that it replaces.

    python bench/bench_mask_recompute.py [--layers 12] [--repeats 5] [--sparsity 0.9] [--scope layer] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from pofa.sparsity import MaskGuard, MaskStore, PrunedValues

HIDDEN, INTERMEDIATE = 768, 3072
LR, WEIGHT_DECAY = 1e-4, 0.01


def encoder(layers: int) -> nn.Module:
    """Bare BERT-named encoder Linear weights, so DEFAULT_TARGETS select them; BERT's init (normal, std 0.02)."""
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.attention = nn.Module()
        block.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(block.attention.self, name, nn.Linear(HIDDEN, HIDDEN, bias=False))
        block.attention.output = nn.Module()
        block.attention.output.dense = nn.Linear(HIDDEN, HIDDEN, bias=False)
        block.intermediate = nn.Module()
        block.intermediate.dense = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        block.output = nn.Module()
        block.output.dense = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)
        model.encoder.layer.append(block)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--scope", choices=["layer", "global"], default="layer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = encoder(args.layers)
    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)
    params = store.bind(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for param in params.values():  # the moments prune_ must zero, as in training
        optimizer.state[param] = {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    pruned_values = PrunedValues.zeros(store)

    # A state worth recomputing: pruned, then the kept weights move and the stored values decay.
    guard.prune_(args.sparsity, optimizer=optimizer, scope=args.scope, revive=pruned_values)
    with torch.no_grad():
        for name, param in params.items():
            param.add_(torch.randn_like(param) * 0.005 * store[name])
    for _ in range(1000):
        pruned_values.step_(LR, WEIGHT_DECAY)
    saved_weights = {name: param.detach().clone() for name, param in params.items()}
    saved_masks = store.state_dict()
    saved_values = {key: value for key, value in pruned_values.state_dict().items() if key != "values"}
    saved_values["values"] = {name: v.clone() for name, v in pruned_values.state_dict()["values"].items()}

    def restore() -> None:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved_weights[name])
        store.load_state_dict(saved_masks)
        pruned_values.load_state_dict(saved_values)

    times: dict[str, list[float]] = {"plain": [], "revive": []}
    revived = 0
    for _ in range(args.repeats):
        for variant in ("plain", "revive"):  # alternate, so load drifts hit both
            restore()
            revive = pruned_values if variant == "revive" else None
            result: list = []
            times[variant].append(timed(lambda: result.append(
                guard.prune_(args.sparsity, optimizer=optimizer, scope=args.scope, revive=revive))))
            if variant == "revive":
                revived = result[0].num_revived()

    steps = 100_000
    step_time = timed(lambda: [pruned_values.step_(LR, WEIGHT_DECAY) for _ in range(steps)]) / steps
    held = pruned_values.current_()
    factor = 1 - LR * WEIGHT_DECAY
    naive_time = statistics.median(timed(lambda: [v.mul_(factor) for v in held.values()]) for _ in range(6))

    numel = sum(param.numel() for param in params.values())
    plain, with_revive = statistics.median(times["plain"]), statistics.median(times["revive"])
    print(f"targets: {len(params)} encoder Linear weights, {numel / 1e6:.1f} M weights, scope={args.scope}, "
          f"{args.threads} thread(s), {args.repeats} repeats")
    print(f"PrunedValues memory: {pruned_values.nbytes():,} bytes ({pruned_values.nbytes() / 2**20:.1f} MiB) = "
          f"{pruned_values.nbytes() / (4 * numel):.2f}x the fp32 weights, {pruned_values.nbytes() / (2 * numel):.2f}x "
          f"bf16 weights, {pruned_values.nbytes() / (16 * numel):.2f}x fp32 weights+grads+AdamW moments")
    print(f"pruning event at {args.sparsity:.0%} after drift: without revive {plain:.3f} s, "
          f"with revive {with_revive:.3f} s (ratio {with_revive / plain:.2f}; {revived:,} weights revived)")
    print(f"  all runs, plain:  {', '.join(f'{t:.3f}' for t in times['plain'])}")
    print(f"  all runs, revive: {', '.join(f'{t:.3f}' for t in times['revive'])}")
    print(f"step_ per optimizer step: {step_time * 1e6:.3f} us; the tensor multiply it replaces: "
          f"{naive_time * 1e3:.1f} ms (ratio {step_time / naive_time:.1e})")


if __name__ == "__main__":
    main()
