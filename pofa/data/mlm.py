"""Masked-language-model data: tokenize, pack into fixed-length blocks, cache, batch and mask.

- Packing: documents are tokenized without special tokens and joined with [SEP]; the stream is cut into blocks of
  `[CLS] + (length - 2) tokens + [SEP]`. No token is dropped except the final remainder, no padding inside blocks.
- Cache: packed blocks of a map-style corpus are stored as one int32 array on disk (`blocks.npy`), keyed by corpus,
  tokenizer and length, written atomically, so a rerun skips tokenization and a killed run leaves no half cache.
- Batches: the position in the data is a pure function of the micro-step, so resuming at step k needs no replay.
- Masking: 15% of the tokens that are not special (no id of `tokenizer.all_special_ids`, as transformers'
  DataCollatorForLanguageModeling) become targets: 80% [MASK], 10% a random ordinary token, 10% kept. Training
  batches draw from a generator seeded by (seed, micro-step, process): deterministic for a seed and independent of
  how the run was interrupted.
- Held-out set: its blocks, batches and masks are a function of (seed, block) only, never of the number of
  processes, so held-out losses of runs on different hardware compare; each process evaluates a disjoint share.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from pofa.data.corpus import CorpusError, corpus_fingerprint, default_cache_dir, describe_source, load_documents

CACHE_FORMAT = 1


def pack_blocks(token_lists: Iterable[Sequence[int]], *, block_length: int, cls_id: int, sep_id: int
                ) -> Iterator[np.ndarray]:
    """Yield `[CLS] + payload + [SEP]` blocks of `block_length` tokens from documents joined by [SEP].

    The concatenation of all payloads is exactly the document stream (each document followed by [SEP]) minus the
    final remainder shorter than a payload.
    """
    if block_length < 3:
        raise ValueError(f"block_length must be >= 3, got {block_length}")
    payload = block_length - 2
    buffer: list[int] = []
    start = 0
    for tokens in token_lists:
        buffer.extend(tokens)
        buffer.append(sep_id)
        while len(buffer) - start >= payload:
            block = np.empty(block_length, dtype=np.int32)
            block[0] = cls_id
            block[1:-1] = buffer[start : start + payload]
            block[-1] = sep_id
            start += payload
            yield block
        if start > 65536:  # drop consumed tokens now and then, not at every block
            del buffer[:start]
            start = 0


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
                      log=print) -> Path:
    """Tokenize and pack a map-style corpus once; return the path of its `blocks.npy` (reused when present)."""
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
        count = 0
        with open(raw_path, "wb") as raw:
            chunk: list[np.ndarray] = []
            for block in pack_blocks(tokenize_batches((row["text"] for row in documents), tokenizer),
                                     block_length=block_length, cls_id=cls_id, sep_id=sep_id):
                chunk.append(block)
                if len(chunk) == 4096:
                    raw.write(np.stack(chunk).tobytes())
                    count += len(chunk)
                    chunk = []
            if chunk:
                raw.write(np.stack(chunk).tobytes())
                count += len(chunk)
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


class StreamingMLMBatcher(MLMBatcher):
    """MLMBatcher for streamed corpora (larger than the disk): blocks are tokenized and packed on the fly.

    The first `eval_blocks` blocks of the stream are held out. After them, training block `j` goes to process
    `j % num_processes`; micro-step `m` of a process takes its blocks `m * batch .. (m + 1) * batch - 1`. The stream
    is read once, in order; resuming at micro-step `m` skips (re-reads, does not train on) the blocks before it.
    Epochs: when the stream ends it starts again from the beginning.
    """

    def __init__(self, sources, tokenizer, *, block_length: int, eval_blocks: int, per_device_batch_size: int,
                 num_processes: int, process_index: int, seed: int, mlm_probability: float, cache_dir=None):
        self.sources, self.tokenizer, self.block_length, self.cache_dir = sources, tokenizer, block_length, cache_dir
        self.cls_id, self.sep_id = _special_ids(tokenizer)
        stream = self._blocks()
        held_out = [block for _, block in zip(range(eval_blocks), stream)]
        if len(held_out) < eval_blocks:
            raise CorpusError(f"the streamed corpus ({', '.join(describe_source(s) for s in sources)}) has fewer "
                              f"than {eval_blocks} blocks of {block_length} tokens")
        blocks = np.stack(held_out) if held_out else np.zeros((0, block_length), dtype=np.int32)
        super().__init__(BlockSplit(blocks, np.zeros(0, dtype=np.int64), np.arange(len(blocks))), tokenizer,
                         per_device_batch_size=per_device_batch_size, num_processes=num_processes,
                         process_index=process_index, seed=seed, mlm_probability=mlm_probability)
        self.eval_blocks = eval_blocks
        self._stream: Iterator[np.ndarray] | None = None
        self._next_micro_step = 0

    def _blocks(self) -> Iterator[np.ndarray]:
        documents = load_documents(self.sources, cache_dir=self.cache_dir)
        return pack_blocks(tokenize_batches((row["text"] for row in documents), self.tokenizer),
                           block_length=self.block_length, cls_id=self.cls_id, sep_id=self.sep_id)

    def _training_blocks(self) -> Iterator[np.ndarray]:
        """This process's training blocks, in stream order, forever (the stream restarts when it ends)."""
        while True:
            produced = 0
            for index, block in enumerate(self._blocks()):
                if index >= self.eval_blocks and (index - self.eval_blocks) % self.num_processes == self.process_index:
                    produced += 1
                    yield block
            if produced == 0:
                raise CorpusError("the streamed corpus has no training blocks after the held-out ones")

    def train_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        if self._stream is None or micro_step < self._next_micro_step:
            self._stream, self._next_micro_step = self._training_blocks(), 0
        size = self.per_device_batch_size
        for _ in range((micro_step - self._next_micro_step) * size):  # resuming: skip what was trained on
            next(self._stream)
        rows = np.stack([next(self._stream) for _ in range(size)])
        self._next_micro_step = micro_step + 1
        input_ids = torch.from_numpy(rows.astype(np.int64))
        inputs, labels = mask_tokens(input_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                     special_ids=self.special_ids, mlm_probability=self.mlm_probability,
                                     generator=step_generator(self.seed, micro_step, self.process_index))
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}
