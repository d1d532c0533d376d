"""Small sub-commands of `pofa` that attach existing functions to the command line: export, push, bench-inference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def export_main(argv: Sequence[str] | None = None) -> int:
    """`pofa export MODEL_DIR [--int8] [--output PATH]`: ONNX export (int8 QDQ from a QAT model's compact file)."""
    parser = argparse.ArgumentParser(prog="pofa export", description=export_main.__doc__)
    parser.add_argument("model_dir", type=Path, help="a final/ folder written by pofa")
    parser.add_argument("--int8", action="store_true", help="int8 QDQ graph (needs a model trained with QAT)")
    parser.add_argument("--output", type=Path, help="ONNX file to write (default MODEL_DIR/model[.int8].onnx)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the example input")
    args = parser.parse_args(argv)
    import torch

    from pofa.compact import load_compact_model
    from pofa.modeling import load_tokenizer
    from pofa.quant import export_onnx, is_qat_prepared

    folder = args.model_dir
    if not (folder / "config.json").is_file():
        return _fail(f"{folder} is not a model folder (no config.json)")
    compact = folder / "compact.safetensors"
    if args.int8:
        if not compact.is_file():
            return _fail(f"{folder} has no compact.safetensors: an int8 export needs the QAT stage's output "
                         "(a finetune recipe with quantization.enabled: true and export.compact: true)")
        model = load_compact_model(compact, folder)
        if not is_qat_prepared(model):
            return _fail(f"{folder} was not trained with QAT (its compact file holds float weights): run the QAT "
                         "stage (quantization.enabled: true), or export without --int8")
    else:
        from transformers import AutoConfig

        import transformers

        config = AutoConfig.from_pretrained(folder)
        model = getattr(transformers, config.architectures[0]).from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    example = dict(tokenizer(["an example input"] * 2, padding="max_length", max_length=args.seq_len,
                             return_tensors="pt"))
    output = args.output or folder / ("model.int8.onnx" if args.int8 else "model.onnx")
    with torch.no_grad():
        export_onnx(model, example, output, int8=args.int8, parity_batches=[example])
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    return 0


def push_main(argv: Sequence[str] | None = None) -> int:
    """`pofa push DIR REPO_ID [--dry-run]`: publish a model folder with its generated model card."""
    parser = argparse.ArgumentParser(prog="pofa push", description=push_main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("--dry-run", action="store_true", help="prepare the folder and card; upload nothing")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--base-model", help="Hub id of the model it was made from (card metadata)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a data set used (repeatable)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    from pofa.hub import HubUnreachableError, PublicationError, push_to_hub

    try:
        where = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            dry_run=args.dry_run, endpoint=args.endpoint, base_model=args.base_model,
                            datasets=args.dataset, license=args.license)
    except (PublicationError, HubUnreachableError) as exc:
        return _fail(str(exc))
    print(f"{'prepared (dry run)' if args.dry_run else 'pushed'}: {where}")
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """`pofa bench-inference MODEL [--onnx PATH]`: latency of dense fp32, sparse kernels and int8 ONNX, as ratios."""
    parser = argparse.ArgumentParser(prog="pofa bench-inference", description=bench_main.__doc__)
    parser.add_argument("model", help="a model folder (sparse weights)")
    parser.add_argument("--onnx", type=Path, help="an int8 ONNX export of the same model")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    from pofa.runtime import benchmark_latency

    if not Path(args.model).is_dir():
        return _fail(f"model folder not found: {args.model}")
    if args.onnx is not None and not args.onnx.is_file():
        return _fail(f"ONNX file not found: {args.onnx}")
    rows = benchmark_latency(args.model, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                             seq_len=args.seq_len, onnx_int8_path=args.onnx, repeats=args.repeats)
    print(f"{'batch':>5} {'variant':<14} {'latency ms':>11} {'vs dense fp32':>14}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['variant']:<14} {row['latency_ms']:>11.1f} "
              f"{row['speedup_vs_dense']:>13.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
