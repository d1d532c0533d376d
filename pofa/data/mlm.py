"""Masked-language-model data: tokenize, pack into fixed-length blocks, cache, batch and mask.

- Packing: documents are tokenized without special tokens and joined with [SEP]; the stream is cut into blocks of
  `[CLS] + (length - 2) tokens + [SEP]`. No token is dropped except the final remainder, no padding inside blocks.
- Cache: packed blocks of a map-style corpus are stored as one int32 array on disk (`blocks.npy`), keyed by corpus,
  tokenizer and length, written atomically, so a rerun skips tokenization and a killed run leaves no half cache.
  `data.preprocessing_workers` processes tokenize (`Dataset.map(num_proc=...)`), one packs in corpus order: the
  blocks, bit for bit, and the key do not depend on the number of workers.
- Batches: the position in the data is a pure function of the micro-step, so resuming at step k needs no replay.
  A streamed corpus (`StreamingMLMBatcher`) is read once per epoch, each process its own share, shuffled in windows;
  its position is saved with each checkpoint and a resumed run re-reads only the current window.
- Masking: 15% of the tokens that are not special (no id of `tokenizer.all_special_ids`, as transformers'
  DataCollatorForLanguageModeling) become targets: 80% [MASK], 10% a random ordinary token, 10% kept. Training
  batches draw from a generator seeded by (seed, micro-step, process): deterministic for a seed and independent of
  how the run was interrupted.
- Held-out set: its blocks, batches and masks are a function of (seed, block) only, never of the number of
  processes, so held-out losses of runs on different hardware compare; each process evaluates a disjoint share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import datasets
import numpy as np
import torch

from pofa.data.corpus import CorpusError, corpus_fingerprint, default_cache_dir, describe_source, load_documents

CACHE_FORMAT = 1


class BlockPacker:
    """Cuts the document stream (each document followed by [SEP]) into `[CLS] + payload + [SEP]` blocks.

    Fed document by document or many at once, in order, it cuts exactly the blocks `pack_blocks` yields: the
    concatenation of all payloads is the document stream minus the tokens still `pending` (fewer than a payload).
    numpy throughout, so one process packs what many tokenize.
    """

    def __init__(self, *, block_length: int, cls_id: int, sep_id: int):
        if block_length < 3:
            raise ValueError(f"block_length must be >= 3, got {block_length}")
        self.block_length, self.cls_id, self.sep_id = block_length, cls_id, sep_id
        self.payload = block_length - 2
        self.pending = np.zeros(0, dtype=np.int32)

    def add(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append documents (their ids concatenated in `values`, one entry of `lengths` each); return the blocks
        completed, `[k, block_length]` int32."""
        lengths = np.asarray(lengths, dtype=np.int64)
        stream = np.empty(len(self.pending) + len(values) + len(lengths), dtype=np.int32)
        stream[: len(self.pending)] = self.pending
        body = stream[len(self.pending) :]
        # document i's ids land after the i [SEP]s of the documents before it; its [SEP] right after its ids
        ends = np.cumsum(lengths) + np.arange(len(lengths))
        body[np.arange(len(values)) + np.repeat(np.arange(len(lengths)), lengths)] = values
        body[ends] = self.sep_id
        count = len(stream) // self.payload
        blocks = np.empty((count, self.block_length), dtype=np.int32)
        blocks[:, 0], blocks[:, -1] = self.cls_id, self.sep_id
        blocks[:, 1:-1] = stream[: count * self.payload].reshape(count, self.payload)
        self.pending = stream[count * self.payload :].copy()
        return blocks


def pack_blocks(token_lists: Iterable[Sequence[int]], *, block_length: int, cls_id: int, sep_id: int
                ) -> Iterator[np.ndarray]:
    """Yield `[CLS] + payload + [SEP]` blocks of `block_length` tokens from documents joined by [SEP].

    The concatenation of all payloads is exactly the document stream (each document followed by [SEP]) minus the
    final remainder shorter than a payload.
    """
    packer = BlockPacker(block_length=block_length, cls_id=cls_id, sep_id=sep_id)
    for tokens in token_lists:
        tokens = np.asarray(tokens, dtype=np.int32)
        yield from packer.add(tokens, [len(tokens)])


def tokenize_batches(texts: Iterable[str], tokenizer, batch_size: int = 1000) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens), tokenized in batches with the fast tokenizer."""
    batch: list[str] = []
    for text in texts:
        if text and not text.isspace():
            batch.append(text)
        if len(batch) == batch_size:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case", None)).encode())
    return h.hexdigest()[:16]


def _special_ids(tokenizer) -> tuple[int, int]:
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None or tokenizer.mask_token_id is None:
        raise CorpusError(f"tokenizer {tokenizer.name_or_path!r} lacks a CLS/BOS, SEP/EOS or MASK token for MLM")
    return cls_id, sep_id


def build_block_cache(sources, tokenizer, block_length: int, cache_dir: str | os.PathLike | None = None,
                      log=print, *, workers: int = 1) -> Path:
    """Tokenize and pack a map-style corpus once; return the path of its `blocks.npy` (reused when present).

    `workers` processes tokenize (`tokenize_corpus`) and this one packs, in corpus order: the blocks, and so the
    cache key, are the same whatever the number of workers.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(
        f"{CACHE_FORMAT}:{corpus_fingerprint(sources)}:{tokenizer_fingerprint(tokenizer)}:{block_length}".encode()
    ).hexdigest()[:20]
    folder = root / "blocks" / key
    blocks_path = folder / "blocks.npy"
    if blocks_path.is_file() and (folder / "meta.json").is_file():
        return blocks_path
    documents = load_documents(sources, cache_dir=str(root / "datasets"))
    cls_id, sep_id = _special_ids(tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        raw_path = tmp / "blocks.int32"
        packer = BlockPacker(block_length=block_length, cls_id=cls_id, sep_id=sep_id)
        count = 0
        with open(raw_path, "wb") as raw:
            for values, lengths in tokenize_corpus(documents, tokenizer, workers=workers, scratch=tmp, log=log):
                blocks = packer.add(values, lengths)
                raw.write(blocks.tobytes())
                count += len(blocks)
        if count == 0:
            raise CorpusError(
                f"the corpus ({', '.join(describe_source(s) for s in sources)}) gives no complete block of "
                f"{block_length} tokens; add text or lower data.max_seq_length")
        array = np.lib.format.open_memmap(tmp / "blocks.npy", mode="w+", dtype=np.int32, shape=(count, block_length))
        array[:] = np.memmap(raw_path, dtype=np.int32, mode="r", shape=(count, block_length))
        array.flush()
        del array
        raw_path.unlink()
        (tmp / "meta.json").write_text(json.dumps({
            "blocks": count, "block_length": block_length, "tokenizer": tokenizer.name_or_path,
            "sources": [describe_source(s) for s in sources], "format": CACHE_FORMAT}))
        try:
            os.replace(tmp, folder)  # atomic: the cache folder either is complete or does not exist
        except OSError:
            if not blocks_path.is_file():  # another process won the race with the same content
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenized corpus cached: {count} blocks of {block_length} tokens in {folder}")
    return blocks_path


PIECES = 20  # tokenize_corpus logs its progress after each twentieth of the corpus
MIN_PIECE_DOCUMENTS = 10_000
TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})


def tokenize_corpus(documents: datasets.Dataset, tokenizer, *, workers: int = 1, scratch: Path, log=print
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids (no special tokens) of every non-blank document, in corpus order, as (ids, lengths) batches.

    `Dataset.map` tokenizes with `num_proc=workers`, one piece of the corpus (a twentieth, at least 10,000
    documents) after another; a piece's ids stay in `scratch` only until they have been read back, so the scratch
    space holds one piece (int32) at a time. When there are several pieces a log line follows each, with the
    throughput; on a terminal datasets' own progress bar shows each piece too.
    """
    total, started, tokens = len(documents), time.perf_counter(), 0
    size = max(-(-total // PIECES), MIN_PIECE_DOCUMENTS)
    starts = range(0, total, size)
    for number, start in enumerate(starts, 1):
        piece = documents.select(range(start, min(start + size, total)))
        name = f"tokens-{number:03d}"
        ids = _tokenize_piece(piece, tokenizer, workers=workers, path=scratch / f"{name}.arrow",
                              desc=f"tokenizing {number}/{len(starts)}")
        for batch in ids.with_format("arrow").iter(batch_size=10_000):
            column = batch.column("input_ids").combine_chunks()
            values = column.flatten().to_numpy()
            tokens += len(values)
            yield values, column.value_lengths().to_numpy()
        del ids
        for path in scratch.glob(f"{name}*"):
            path.unlink()
        if len(starts) > 1:
            seconds = time.perf_counter() - started
            log(f"tokenized {start + len(piece):,} of {total:,} documents: {tokens:,} tokens in {seconds:.0f} s "
                f"({tokens / max(seconds, 1e-9):,.0f} tokens/s, {workers} worker(s))")


def _tokenize_piece(piece: datasets.Dataset, tokenizer, *, workers: int, path: Path, desc: str) -> datasets.Dataset:
    """`piece`'s non-blank documents as one `input_ids` (int32) row each, in order, written to `path`."""
    with _datasets_progress_bars(sys.stderr.isatty()):
        return piece.map(_token_ids, batched=True, batch_size=1000, fn_kwargs={"tokenizer": tokenizer},
                         remove_columns=piece.column_names, features=TOKEN_FEATURES,
                         num_proc=min(workers, len(piece)) if workers > 1 else None, cache_file_name=str(path),
                         load_from_cache_file=False, new_fingerprint=f"pofa-{path.stem}", desc=desc)


def _token_ids(batch: dict[str, list], tokenizer) -> dict[str, list[list[int]]]:
    """One `Dataset.map` batch: the ids of its non-blank texts (blank ones give no row, as in `tokenize_batches`)."""
    texts = [text for text in batch["text"] if text and not text.isspace()]
    return {"input_ids": tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []}


@contextmanager
def _datasets_progress_bars(show: bool) -> Iterator[None]:
    """datasets' progress bars on (`show`) or off inside the block, as they were after it: `pofa.stage` silences
    them for the whole run, but a tokenization of hours deserves its bar on a terminal."""
    hidden = datasets.utils.are_progress_bars_disabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if hidden else datasets.enable_progress_bars)()


@dataclass(frozen=True)
class BlockSplit:
    """Packed blocks split into training and held-out indices (a fixed, seeded split)."""

    blocks: np.ndarray  # [num_blocks, block_length] int32 (a memory map)
    train_indices: np.ndarray
    eval_indices: np.ndarray


def split_blocks(blocks: np.ndarray, *, eval_fraction: float, max_eval_blocks: int, seed: int) -> BlockSplit:
    n = len(blocks)
    n_eval = min(max_eval_blocks, int(round(n * eval_fraction)))
    if eval_fraction > 0 and n_eval == 0 and n > 1:
        n_eval = 1
    order = np.random.default_rng(seed).permutation(n)
    return BlockSplit(blocks, np.sort(order[n_eval:]), np.sort(order[:n_eval]))


def batch_indices(micro_step: int, *, num_examples: int, per_device_batch_size: int, num_processes: int,
                  process_index: int, seed: int) -> np.ndarray:
    """Indices (into the training set) of one process's batch at a global micro-step.

    Every micro-step consumes one global batch of `per_device_batch_size * num_processes` examples from a seeded
    permutation of the epoch; an epoch's last incomplete global batch is skipped so that all batches are full. Being a
    pure function of the micro-step, it makes resumption exact without replaying the data.
    """
    global_batch = per_device_batch_size * num_processes
    batches_per_epoch = num_examples // global_batch
    if batches_per_epoch == 0:
        raise CorpusError(f"the training set has {num_examples} blocks, fewer than one global batch of "
                          f"{global_batch} (per_device_batch_size x processes); add data or lower the batch size")
    epoch, batch = divmod(micro_step, batches_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    start = batch * global_batch + process_index * per_device_batch_size
    return order[start : start + per_device_batch_size]


def step_generator(seed: int, micro_step: int, process_index: int, device: torch.device | str = "cpu"
                   ) -> torch.Generator:
    state = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(2, dtype=np.uint64)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0] >> np.uint64(1)))
    return g


def special_token_ids(tokenizer) -> list[int]:
    """Ids never selected as MLM targets nor drawn as random tokens: `all_special_ids` ([CLS], [SEP], [PAD], [MASK],
    [UNK], extra special tokens) - what transformers' collator excludes - plus BOS/EOS where they are set apart."""
    named = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
             tokenizer.eos_token_id, tokenizer.mask_token_id, tokenizer.unk_token_id)
    return sorted({int(i) for i in (*tokenizer.all_special_ids, *named) if i is not None})


def random_ordinary_tokens(shape, *, vocab_size: int, special_ids: Sequence[int], generator: torch.Generator,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Ids drawn uniformly from `range(vocab_size)` without the special ids.

    transformers 5 (`torch.randint(len(tokenizer))`) and Google's BERT draw from the whole vocabulary, specials
    included; pofa, like fairseq's RoBERTa masking, draws ordinary tokens only, so that a "random" replacement is
    never a [MASK] (which would raise the [MASK] rate above 80%), [PAD], [SEP] or [CLS] in the middle of a text.
    """
    specials = _specials_in(vocab_size, special_ids, device)
    rank = torch.randint(vocab_size - len(specials), tuple(shape), generator=generator, device=device)
    return _ordinary_id(rank, specials)


def _specials_in(vocab_size: int, special_ids: Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor(sorted({i for i in special_ids if 0 <= i < vocab_size}), dtype=torch.long, device=device)


def _ordinary_id(rank: torch.Tensor, specials: torch.Tensor) -> torch.Tensor:
    """The `rank`-th id that is not in `specials` (sorted, unique)."""
    # It is rank + (number of specials at or below it). Below the j-th special (0-based) lie specials[j] - j ordinary
    # ids, so that number is #{j : specials[j] - j <= rank}: no vocabulary-sized table.
    return rank + torch.searchsorted(specials - torch.arange(len(specials), device=specials.device), rank, right=True)


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_ids: Sequence[int],
                mlm_probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (inputs, labels); labels are -100 except at the selected positions.

    Of the positions whose id is not in `special_ids`, each is selected with probability `mlm_probability`; a
    selected position becomes [MASK] with probability 0.8, a random ordinary token (`random_ordinary_tokens`) with
    0.1, and is left unchanged with 0.1. The draws are transformers' collator's, in its order; only the random ids
    differ (ordinary ones).
    """
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))
    probability = torch.full(input_ids.shape, mlm_probability, device=input_ids.device)
    probability.masked_fill_(special, 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()
    replace = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=input_ids.device), generator=generator).bool()
    replace &= selected
    # Half of the remaining 20% get a random token: 0.5 of (selected and not replaced).
    randomize = torch.bernoulli(torch.full(input_ids.shape, 0.5, device=input_ids.device), generator=generator).bool()
    randomize &= selected & ~replace
    random_tokens = random_ordinary_tokens(input_ids.shape, vocab_size=vocab_size, special_ids=special_ids,
                                           generator=generator, device=input_ids.device)
    return _apply_mask(input_ids, selected, replace, randomize, random_tokens, mask_token_id)


def mask_held_out(input_ids: torch.Tensor, blocks: Sequence[int], *, seed: int, mask_token_id: int, vocab_size: int,
                  special_ids: Sequence[int], mlm_probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_tokens` for held-out rows, row i drawn from its own stream seeded by (seed, blocks[i]).

    A block's mask is then a function of (seed, block) alone: not of the batch it lands in, nor of the number of
    processes. (Per-row numpy streams, the rest batched: `mask_tokens` row by row costs about 3x more.)
    """
    if len(blocks) == 0:
        return input_ids.clone(), torch.full_like(input_ids, -100)
    length = input_ids.shape[1]
    specials = _specials_in(vocab_size, special_ids, "cpu")
    uniforms, ranks = [], []
    for block in blocks:
        # spawn_key keeps these streams apart from step_generator's (SeedSequence pads short entropy with zeros)
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(block)], spawn_key=(1,)))
        uniforms.append(rng.random((3, length)))
        ranks.append(rng.integers(vocab_size - len(specials), size=length))
    u = torch.from_numpy(np.stack(uniforms))
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids)))
    selected = (u[:, 0] < mlm_probability) & ~special
    replace = selected & (u[:, 1] < 0.8)
    randomize = selected & ~replace & (u[:, 2] < 0.5)
    random_tokens = _ordinary_id(torch.from_numpy(np.stack(ranks)), specials)
    return _apply_mask(input_ids, selected, replace, randomize, random_tokens, mask_token_id)


def _apply_mask(input_ids, selected, replace, randomize, random_tokens, mask_token_id):
    labels = input_ids.clone()
    labels[~selected] = -100
    inputs = input_ids.clone()
    inputs[replace] = mask_token_id
    inputs[randomize] = random_tokens[randomize]
    return inputs, labels


class MLMBatcher:
    """Turns (micro-step, process) into a masked batch of tensors, deterministically."""

    def __init__(self, split: BlockSplit, tokenizer, *, per_device_batch_size: int, num_processes: int,
                 process_index: int, seed: int, mlm_probability: float):
        self.split = split
        self.per_device_batch_size = per_device_batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.mlm_probability = mlm_probability
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = special_token_ids(tokenizer)

    def _masked(self, rows: np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.asarray(self.split.blocks[rows], dtype=np.int64))
        inputs, labels = mask_tokens(input_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                     special_ids=self.special_ids, mlm_probability=self.mlm_probability,
                                     generator=generator)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}

    def train_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        local = batch_indices(micro_step, num_examples=len(self.split.train_indices),
                              per_device_batch_size=self.per_device_batch_size, num_processes=self.num_processes,
                              process_index=self.process_index, seed=self.seed)
        rows = self.split.train_indices[local]
        return self._masked(rows, step_generator(self.seed, micro_step, self.process_index))

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of the held-out batches, masked identically at every evaluation.

        The held-out blocks, in order, form batches of `per_device_batch_size` (the first `max_batches` of them when
        given); each block is masked from a stream seeded by (seed, block) (`mask_held_out`). Batch `b` goes to
        process `b % num_processes`, so the union over processes is exactly the single-process set, whatever the
        number of processes: sum the losses and counts, then reduce. Every process yields the same number of batches
        (DeepSpeed ZeRO-3 and FSDP need every process in every forward): a process short of one gets a padding batch
        whose labels are all -100, so it counts nowhere (`MaskedLM` gives it a loss of 0, not NaN).
        """
        size = self.per_device_batch_size
        indices = self.split.eval_indices
        num_batches = -(-len(indices) // size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        per_process = -(-num_batches // self.num_processes)
        for round_ in range(per_process):
            number = round_ * self.num_processes + self.process_index
            padding = number >= num_batches
            rows = indices[(0 if padding else number) * size :][:size]
            input_ids = torch.from_numpy(np.asarray(self.split.blocks[rows], dtype=np.int64))
            inputs, labels = mask_held_out(input_ids, rows, seed=self.seed, mask_token_id=self.mask_token_id,
                                           vocab_size=self.vocab_size, special_ids=self.special_ids,
                                           mlm_probability=self.mlm_probability)
            if padding:
                labels.fill_(-100)
            yield {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}

    def tokens_per_micro_step(self) -> int:
        return self.per_device_batch_size * self.split.blocks.shape[1]

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue the data: nothing, the position is a function of the micro-step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see `state_dict`)."""


@dataclass(frozen=True)
class StreamPosition:
    """Where a process's training stream continues: the first token of its next block.

    Token `offset` of document `document` (counting the document's [SEP]; documents in their shuffled order) of
    window `window` of epoch `epoch`; `source` is the documents stream's `state_dict()` at the start of that window
    (None: the epoch's start). JSON-serialisable, so a checkpoint can hold it.
    """

    epoch: int = 0
    window: int = 0
    source: dict | None = None
    document: int = 0
    offset: int = 0


class StreamingMLMBatcher(MLMBatcher):
    """MLMBatcher for streamed corpora (larger than the disk): blocks are tokenized and packed on the fly.

    - Held out: the first `eval_blocks` blocks of the whole stream, in its order, the same on every process; the
      documents they touch are never trained on (recognised by a hash of their text, duplicates included).
    - Training: each process reads its own share of the documents (`pofa.data.corpus.shard_stream`: whole files
      when they divide among the processes, else every n-th document; shard order reshuffled every epoch),
      shuffles them in consecutive windows of `shuffle_buffer` documents (seeded by seed, epoch, window and
      process) and packs them into blocks; micro-step `m` takes the next `per_device_batch_size` blocks. When the
      share ends, the next epoch begins (its last incomplete block is dropped).
    - Resume: `state_dict()` holds every process's `StreamPosition` (gathered to the main process, which writes
      the checkpoint); after `load_state_dict` a process re-reads only the current window, never the stream
      before it. Without a saved position (an older checkpoint) it re-reads its share up to the micro-step.
    """

    def __init__(self, sources, tokenizer, *, block_length: int, eval_blocks: int, per_device_batch_size: int,
                 num_processes: int, process_index: int, seed: int, mlm_probability: float, cache_dir=None,
                 shuffle_buffer: int = 10_000, gather: Callable[[dict], list[dict]] | None = None):
        self.sources, self.tokenizer, self.block_length, self.cache_dir = sources, tokenizer, block_length, cache_dir
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.gather = gather or (lambda state: [state])
        self.cls_id, self.sep_id = _special_ids(tokenizer)
        blocks, self._held_out_documents = self._held_out(eval_blocks)
        super().__init__(BlockSplit(blocks, np.zeros(0, dtype=np.int64), np.arange(len(blocks))), tokenizer,
                         per_device_batch_size=per_device_batch_size, num_processes=num_processes,
                         process_index=process_index, seed=seed, mlm_probability=mlm_probability)
        self.eval_blocks = eval_blocks
        self._saved: tuple[int, StreamPosition] = (0, StreamPosition())
        self._stream: Iterator[tuple[np.ndarray, StreamPosition]] | None = None
        self._next_micro_step, self._position = 0, StreamPosition()

    # --- held-out blocks ---------------------------------------------------------------------------------------
    def _held_out(self, eval_blocks: int) -> tuple[np.ndarray, set[bytes]]:
        """The first `eval_blocks` blocks of the whole stream, and the hashes of the documents they touch."""
        if eval_blocks == 0:
            return np.zeros((0, self.block_length), dtype=np.int32), set()
        packer = BlockPacker(block_length=self.block_length, cls_id=self.cls_id, sep_id=self.sep_id)
        blocks: list[np.ndarray] = []
        touched: set[bytes] = set()
        texts = (row["text"] for row in load_documents(self.sources, cache_dir=self.cache_dir))
        for batch in iter(lambda: list(itertools.islice(texts, 1000)), []):
            for text, tokens in self._tokenized(batch):
                touched.add(_text_hash(text))
                blocks.extend(packer.add(tokens, [len(tokens)]))
                if len(blocks) >= eval_blocks:
                    return np.stack(blocks[:eval_blocks]), touched
        raise CorpusError(f"the streamed corpus ({', '.join(describe_source(s) for s in self.sources)}) has fewer "
                          f"than {eval_blocks} blocks of {self.block_length} tokens")

    def _tokenized(self, texts: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(text, int32 ids) of each non-blank text, in order (blank ones are skipped, as in `tokenize_batches`)."""
        kept = [text for text in texts if text and not text.isspace()]
        if kept:
            ids = self.tokenizer(kept, add_special_tokens=False, verbose=False)["input_ids"]
            yield from ((text, np.asarray(tokens, dtype=np.int32)) for text, tokens in zip(kept, ids))

    # --- training blocks ---------------------------------------------------------------------------------------
    def _documents(self, epoch: int, source: dict | None):
        """This process's share of the documents at the start of `epoch`, or where `source` left them."""
        from pofa.data.corpus import restore_stream, shard_stream

        documents = load_documents(self.sources, cache_dir=self.cache_dir)
        if not isinstance(documents, datasets.IterableDataset):
            documents = documents.to_iterable_dataset()
        share = shard_stream(documents, rank=self.process_index, world_size=self.num_processes, seed=self.seed)
        share.set_epoch(epoch)
        if source is not None:
            restore_stream(share, source)
        return share

    def _window_order(self, epoch: int, window: int, size: int) -> np.ndarray:
        if self.shuffle_buffer == 1:
            return np.arange(size)
        # spawn_key keeps these streams apart from step_generator's and mask_held_out's
        entropy = np.random.SeedSequence([self.seed, epoch, window, self.process_index], spawn_key=(2,))
        return np.random.default_rng(entropy).permutation(size)

    def _window_documents(self, texts: list[str], epoch: int, window: int, first: int
                          ) -> Iterator[tuple[int, np.ndarray]]:
        """(index in the shuffled window, int32 ids) of the window's documents from `first` on that are trained on,
        tokenized a thousand at a time."""
        ordered = [texts[i] for i in self._window_order(epoch, window, len(texts))]
        for start in range(first, len(ordered), 1000):
            trained = [(d, ordered[d]) for d in range(start, min(start + 1000, len(ordered)))
                       if self._trains_on(ordered[d])]
            if trained:
                batch = [text for _, text in trained]
                ids = self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
                yield from ((d, np.asarray(tokens, dtype=np.int32)) for (d, _), tokens in zip(trained, ids))

    def _trains_on(self, text: str) -> bool:
        """Not blank, and not touched by a held-out block."""
        if not text or text.isspace():
            return False
        return not self._held_out_documents or _text_hash(text) not in self._held_out_documents

    def _epoch_blocks(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        """The blocks of `start`'s epoch from `start` on, each with the position of the block after it."""
        documents = self._documents(start.epoch, start.source)
        rows = iter(documents)
        packer = BlockPacker(block_length=self.block_length, cls_id=self.cls_id, sep_id=self.sep_id)
        window, source, first, skip = start.window, start.source, start.document, start.offset
        while True:
            texts = [row["text"] for row in itertools.islice(rows, self.shuffle_buffer)]
            if not texts:
                return
            for d, tokens in self._window_documents(texts, start.epoch, window, first):
                skipped = skip if d == first else 0  # resuming inside this document
                if skipped > len(tokens):  # its [SEP] too
                    continue
                pending = len(packer.pending)
                for j, block in enumerate(packer.add(tokens[skipped:], [len(tokens) - skipped])):
                    # block j + 1 starts (j + 1) payloads after the pending tokens began, inside this document
                    after = skipped + (j + 1) * packer.payload - pending
                    yield block, StreamPosition(start.epoch, window, source, d, after)
            window, first, skip = window + 1, 0, 0
            source = documents.state_dict()  # the next window starts here

    def _training_blocks(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        """This process's training blocks from `start` on, forever (epoch after epoch)."""
        position = start
        while True:
            produced = False
            for block, after in self._epoch_blocks(position):
                produced = True
                yield block, after
            if not produced and position == StreamPosition(epoch=position.epoch):
                raise CorpusError("the streamed corpus gives this process no training block after the held-out ones; "
                                  "add text, use fewer processes or lower data.max_seq_length")
            position = StreamPosition(epoch=position.epoch + 1)

    def train_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        if self._stream is None or micro_step < self._next_micro_step:
            saved_step, saved = self._saved if self._saved[0] <= micro_step else (0, StreamPosition())
            self._stream, self._next_micro_step, self._position = self._training_blocks(saved), saved_step, saved
        size = self.per_device_batch_size
        for _ in range((micro_step - self._next_micro_step) * size):  # no saved position this far: re-read
            next(self._stream)
        taken = [next(self._stream) for _ in range(size)]
        self._next_micro_step, self._position = micro_step + 1, taken[-1][1]
        input_ids = torch.from_numpy(np.stack([block for block, _ in taken]).astype(np.int64))
        inputs, labels = mask_tokens(input_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                     special_ids=self.special_ids, mlm_probability=self.mlm_probability,
                                     generator=step_generator(self.seed, micro_step, self.process_index))
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`{"data_streams": [...]}`: every process's next micro-step and `StreamPosition`, in process order.

        A collective (`gather`): call it on every process at once, as a checkpoint save is.
        """
        own = {"micro_step": self._next_micro_step, **dataclasses.asdict(self._position)}
        return {"data_streams": self.gather(own)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this process's saved position (no-op for a state without positions: the stream is then
        re-read up to the micro-step asked for)."""
        streams = state.get("data_streams")
        if streams is None:
            return
        if len(streams) != self.num_processes:
            raise CorpusError(f"the checkpoint holds the stream positions of {len(streams)} processes; resume it "
                              f"with {len(streams)} processes (this run has {self.num_processes})")
        own = dict(streams[self.process_index])
        self._saved = (own.pop("micro_step"), StreamPosition(**own))
        self._stream = None


def _text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
