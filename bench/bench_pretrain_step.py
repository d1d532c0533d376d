"""Tokens per second of pofa's MLM training step against a plain reference step, in one process.

The reference is the same model, same batches, computing logits at every position (`model(..., labels=...)`, as
`run_mlm.py` does); pofa's step projects only the masked positions (`pofa.modeling.MaskedLM`). The two alternate,
step by step, so that machine load affects both alike; the ratio is what to read.

    python bench/bench_pretrain_step.py [--model embedded:minilm] [--steps 20] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pofa.data.mlm import mask_tokens, step_generator
from pofa.loop import build_optimizer
from pofa.modeling import MaskedLM, load_mlm_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_mlm_model(args.model)
    model.train()
    optimizer = build_optimizer(model, learning_rate=1e-5, weight_decay=0.01)
    fast = MaskedLM(model)

    def batch(i):
        ids = torch.randint(1000, len(tokenizer), (args.batch, args.seq))
        inputs, labels = mask_tokens(ids, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                     special_ids=[0], mlm_probability=0.15, generator=step_generator(0, i, 0))
        return inputs, torch.ones_like(inputs), labels

    def reference_step(b):
        loss = model(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def pofa_step(b):
        loss = fast(*b)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    times = {"reference (full logits)": [], "pofa (masked logits)": []}
    for i in range(args.steps + 2):
        b = batch(i)
        for name, step in (("reference (full logits)", reference_step), ("pofa (masked logits)", pofa_step)):
            start = time.perf_counter()
            step(b)
            if i >= 2:  # the first two rounds warm up allocators and kernels
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    base = statistics.median(times["reference (full logits)"])
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} alternated steps, "
          f"{torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<26} {tokens / median:9.0f} tokens/s   median step {median * 1000:7.1f} ms   "
              f"ratio {base / median:.2f}x")


if __name__ == "__main__":
    main()
