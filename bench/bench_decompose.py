"""Size and CPU speed of each decomposition at two compression levels, beside the dense model.

For the embedded MiniLM (all-MiniLM-L6-v2: 6 layers, width 384; its pre-trained weights) and a BERT-base-shaped
model (12 layers, width 768, random init: size and speed only, its weights are not pre-trained): parameters (all, and
the encoder blocks' with the shared tensor basis), bytes of model.safetensors, the relative Frobenius error of the
initialised encoder weights (MiniLM only: on pre-trained weights; accuracy after distillation is a training run,
`pofa pretrain` with a `decomposition:` section), and the median CPU latency of the base model's forward (eval, no
grad, fp32) at batch 1 and 8, sequence 128. Latencies on a shared machine are noisy; --threads fixes torch's threads.

    python bench/bench_decompose.py [--models minilm,bert-base] [--untimed bert-base] [--repeats 5] [--threads 2]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pofa.decompose import (KroneckerConfig, LowRankConfig, StructuredConfig, TensorConfig, kronecker_, low_rank_,
                            parameter_count, prune_structured_, tensor_)


def levels(width: int) -> dict[str, object]:
    """Two levels per technique, named by what they keep."""
    return {
        "dense": None,
        f"lowrank r={width // 4}": lambda m: low_rank_(m, LowRankConfig(rank=width // 4)),
        f"lowrank r={width // 12}, E r={width // 6}": lambda m: low_rank_(
            m, LowRankConfig(rank=width // 12, embeddings=True, embedding_rank=width // 6)),
        "kronecker 8 terms": lambda m: kronecker_(m, KroneckerConfig(terms=8)),
        "kronecker 2 terms": lambda m: kronecker_(m, KroneckerConfig(terms=2)),
        f"tensor III d={width // 2}": lambda m: tensor_(m, TensorConfig(rank=width // 2)),
        f"tensor IV d={width // 2} l=24": lambda m: tensor_(m, TensorConfig(rank=width // 2, bank=24)),
        f"rosita heads/ffn 1/2 + r={width // 8}": lambda m: low_rank_(
            prune_structured_(m, StructuredConfig(heads=0.5, ffn=0.5)), LowRankConfig(rank=width // 8)),
        f"rosita heads/ffn 1/4 + r={width // 16}": lambda m: low_rank_(
            prune_structured_(m, StructuredConfig(heads=0.25, ffn=0.25)), LowRankConfig(rank=width // 16)),
    }


def load(name: str) -> nn.Module:
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from pofa.modeling import resolve_model_path

    if name == "minilm":
        return AutoModelForMaskedLM.from_pretrained(resolve_model_path("embedded:minilm")).eval()
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig()).eval()


def encoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight every encoder Linear computes, read off its forward on the identity (whatever its structure)."""
    from pofa.decompose import KroneckerLinear, LowRankLinear, TuckerLinear

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, layer in enumerate(model.base_model.encoder.layer):
            factors: list[str] = []
            for name, module in layer.named_modules():
                if any(name.startswith(f"{f}.") for f in factors):
                    continue  # the first / second Linear of a LowRankLinear
                if isinstance(module, (LowRankLinear, KroneckerLinear, TuckerLinear)):
                    factors.append(name)
                elif type(module) is not nn.Linear:
                    continue
                # the response to the identity minus the response to zero: the weight, whichever module holds the bias
                zero = torch.zeros(1, module.in_features)
                out[f"{index}.{name}"] = (module(torch.eye(module.in_features)) - module(zero)).t()
    return out


def relative_error(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    num = sum(torch.linalg.norm(before[k] - after[k]) ** 2 for k in before if k in after)
    den = sum(torch.linalg.norm(before[k]) ** 2 for k in before if k in after)
    return float((num / den).sqrt())


def latency(model: nn.Module, batch: int, repeats: int, seq: int = 128) -> float:
    ids = torch.randint(1000, 2000, (batch, seq))
    mask = torch.ones_like(ids)
    base = model.base_model
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            base(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def encoder_parameters(model: nn.Module) -> int:
    base = model.base_model
    shared = getattr(base, "pofa_shared_basis", None)
    return parameter_count(base.encoder) + (parameter_count(shared) if shared is not None else 0)


def measure(name: str, repeats: int, with_error: bool, timed: bool = True) -> list[dict]:
    rows = []
    reference = load(name)
    width = reference.config.hidden_size
    dense_weights = encoder_weights(reference) if with_error else None
    for label, verb in levels(width).items():
        model = load(name)
        if verb is not None:
            verb(model)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            size = (Path(folder) / "model.safetensors").stat().st_size
        row = {"model": name, "technique": label, "parameters": parameter_count(model),
               "encoder_parameters": encoder_parameters(model), "bytes": size}
        if timed:
            row |= {"latency_ms_b1": latency(model, 1, repeats), "latency_ms_b8": latency(model, 8, repeats)}
        if with_error and verb is not None and "rosita" not in label:  # a pruned head has no weight to compare
            row["init_relative_error"] = relative_error(dense_weights, encoder_weights(model))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | technique | parameters | encoder parameters | size | init error | latency b1 / b8 (ms) |",
             "|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r for r in rows if r["technique"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        error = f"{r['init_relative_error']:.2f}" if "init_relative_error" in r else "-"
        speed = f"{r['latency_ms_b1']:.0f} / {r['latency_ms_b8']:.0f}" if "latency_ms_b1" in r else "-"
        lines.append(f"| {r['model']} | {r['technique']} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['encoder_parameters'] / 1e6:.2f} M ({d['encoder_parameters'] / r['encoder_parameters']:.1f}x)"
                     f" | {r['bytes'] / 1e6:.1f} MB | {error} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--untimed", default="", help="models measured for size only (comma-separated)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.repeats, with_error=name == "minilm", timed=name not in args.untimed.split(","))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
