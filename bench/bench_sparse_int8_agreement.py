"""Do pofa's sparse int8 runtime and the QAT model it comes from predict the same labels on a real evaluation set?

    python bench/bench_sparse_int8_agreement.py runs/quickstart/qat/final            # movie_reviews test split
    python bench/bench_sparse_int8_agreement.py DIR --task movie_reviews --split validation

DIR is a QAT folder (compact int8 checkpoint, config, tokenizer) of a sequence classifier. The reference is the QAT
model as ``pofa.compact.load_compact_model`` rebuilds it from the same file (fake-quant, float matmuls); the runtime
is ``pofa.runtime.load_sparse_model(DIR)`` (sparse int8 kernels). Prints the argmax agreement, both accuracies, the
largest logit difference and both models' time over the set (one process, alternating per batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pofa.artifacts import COMPACT_FILE  # noqa: E402
from pofa.compact import load_compact_model  # noqa: E402
from pofa.data.tasks import get_task, load_task  # noqa: E402
from pofa.runtime import load_sparse_model, sparse_int8_kernel  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a QAT folder of a sequence classifier")
    parser.add_argument("--task", default="movie_reviews")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    spec = get_task(args.task)
    rows = load_task(spec)[args.split]
    tokenizer = AutoTokenizer.from_pretrained(str(args.folder))
    qat = load_compact_model(args.folder / COMPACT_FILE, args.folder)
    runtime = load_sparse_model(args.folder, int8=True)
    agree = correct_qat = correct_rt = 0
    max_diff, seconds = 0.0, {"qat": 0.0, "runtime": 0.0}
    with torch.inference_mode():
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            texts = [chunk[f] for f in spec.text_fields]
            batch = tokenizer(*texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            logits = {}
            for name, model in (("qat", qat), ("runtime", runtime)):
                t0 = time.perf_counter()
                logits[name] = model(**batch).logits
                seconds[name] += time.perf_counter() - t0
            labels = torch.tensor(chunk[spec.label_field])
            a, b = logits["qat"].argmax(-1), logits["runtime"].argmax(-1)
            agree += int((a == b).sum())
            correct_qat += int((a == labels).sum())
            correct_rt += int((b == labels).sum())
            max_diff = max(max_diff, float((logits["qat"] - logits["runtime"]).abs().max()))
    n = len(rows)
    print(f"{args.task} {args.split}: {n} examples; kernel {sparse_int8_kernel().isa}")
    print(f"argmax agreement runtime vs QAT model: {agree / n:.4f} ({n - agree} differ); max |logit diff| "
          f"{max_diff:.2e}")
    print(f"accuracy: QAT model {correct_qat / n:.4f}, sparse int8 runtime {correct_rt / n:.4f}")
    print(f"time over the set: QAT model (torch, fake-quant) {seconds['qat']:.1f} s, runtime {seconds['runtime']:.1f} s")


if __name__ == "__main__":
    main()
