import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pofa.data.corpus import CorpusError
from pofa.data.mlm import (BlockPacker, MLMBatcher, batch_indices, build_block_cache, mask_tokens, pack_blocks,
                           split_blocks, step_generator)
from pofa.recipe import CorpusSource

CLS, SEP = 2, 3


def test_packing_loses_no_token_but_the_final_remainder():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 100, size=n)) for n in rng.integers(1, 40, size=50)]
    blocks = list(pack_blocks(docs, block_length=16, cls_id=CLS, sep_id=SEP))
    stream = [t for d in docs for t in (*d, SEP)]
    payload = [t for b in blocks for t in b[1:-1]]
    assert all(len(b) == 16 and b[0] == CLS and b[-1] == SEP for b in blocks)
    assert payload == stream[: len(payload)]
    assert len(stream) - len(payload) < 14  # only the final remainder is dropped


def test_packing_handles_documents_longer_than_a_block():
    blocks = list(pack_blocks([list(range(10, 110))], block_length=10, cls_id=CLS, sep_id=SEP))
    assert len(blocks) == 101 // 8
    assert [t for b in blocks for t in b[1:-1]] == list(range(10, 110))[: 8 * len(blocks)]


def test_masking_statistics_and_specials():
    ids = torch.randint(10, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = CLS, SEP
    inputs, labels = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0, CLS, SEP],
                                 mlm_probability=0.15, generator=step_generator(0, 0, 0))
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, -1].any()
    rate = selected[:, 1:-1].float().mean().item()
    assert 0.14 < rate < 0.16
    masked = (inputs == 4) & selected
    unchanged = (inputs == ids) & selected
    assert 0.77 < masked.sum() / selected.sum() < 0.83
    assert 0.08 < unchanged.sum() / selected.sum() < 0.13  # 10% kept (+ random tokens that hit the same id)
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])


def test_masking_is_deterministic_for_a_seed_and_step():
    ids = torch.randint(10, 1000, (4, 32))
    a = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0], mlm_probability=0.15,
                    generator=step_generator(7, 3, 1))
    b = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0], mlm_probability=0.15,
                    generator=step_generator(7, 3, 1))
    c = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0], mlm_probability=0.15,
                    generator=step_generator(7, 4, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_batches_cover_an_epoch_once_and_shards_are_disjoint():
    n, per_device, procs = 50, 3, 2
    batches_per_epoch = n // (per_device * procs)
    seen = []
    for micro in range(batches_per_epoch):
        shards = [batch_indices(micro, num_examples=n, per_device_batch_size=per_device, num_processes=procs,
                                process_index=p, seed=1) for p in range(procs)]
        assert not set(shards[0]) & set(shards[1])
        seen += [i for s in shards for i in s]
    assert len(seen) == len(set(seen)) == batches_per_epoch * per_device * procs
    nxt = batch_indices(batches_per_epoch, num_examples=n, per_device_batch_size=per_device, num_processes=procs,
                        process_index=0, seed=1)
    assert len(nxt) == per_device  # the next epoch starts, reshuffled
    with pytest.raises(CorpusError, match="fewer than one global batch"):
        batch_indices(0, num_examples=5, per_device_batch_size=3, num_processes=2, process_index=0, seed=0)


def test_block_cache_is_reused_and_split_is_fixed(tmp_path, tiny_tokenizer_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    (tmp_path / "c.txt").write_text(("the for statement iterates over the items of a sequence. " * 20 + "\n\n") * 30)
    sources = [CorpusSource(files=[str(tmp_path / "c.txt")])]
    path = build_block_cache(sources, tokenizer, 32, tmp_path / "cache", log=lambda m: None)
    blocks = np.load(path)
    assert blocks.shape[1] == 32 and (blocks[:, 0] == tokenizer.cls_token_id).all()

    import pofa.data.mlm as mlm
    monkeypatch.setattr(mlm, "tokenize_corpus", lambda *a, **k: pytest.fail("re-tokenized a cached corpus"))
    assert build_block_cache(sources, tokenizer, 32, tmp_path / "cache", log=lambda m: None) == path
    a = split_blocks(blocks, eval_fraction=0.1, max_eval_blocks=100, seed=3)
    b = split_blocks(blocks, eval_fraction=0.1, max_eval_blocks=100, seed=3)
    assert np.array_equal(a.eval_indices, b.eval_indices) and len(a.eval_indices) == round(len(blocks) * 0.1)
    assert not set(a.eval_indices) & set(a.train_indices)


def test_changed_file_invalidates_the_cache(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    f = tmp_path / "c.txt"
    f.write_text("the for statement iterates over a sequence. " * 200)
    sources = [CorpusSource(files=[str(f)])]
    first = build_block_cache(sources, tokenizer, 16, tmp_path / "cache", log=lambda m: None)
    f.write_text("a class defines a new type of object and its methods. " * 300)
    assert build_block_cache(sources, tokenizer, 16, tmp_path / "cache", log=lambda m: None) != first


def test_batcher_yields_masked_batches(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    blocks = np.random.default_rng(0).integers(5, len(tokenizer), size=(40, 16)).astype(np.int32)
    split = split_blocks(blocks, eval_fraction=0.25, max_eval_blocks=10, seed=0)
    batcher = MLMBatcher(split, tokenizer, per_device_batch_size=4, num_processes=1, process_index=0, seed=0,
                         mlm_probability=0.15)
    batch = batcher.train_batch(0)
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].dtype == torch.int64
    assert torch.equal(batcher.train_batch(5)["labels"], batcher.train_batch(5)["labels"])
    evals = list(batcher.eval_batches())
    assert sum(len(b["input_ids"]) for b in evals) == 10
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(evals, batcher.eval_batches()))


def test_eval_shards_have_equal_batch_counts_and_padding_counts_nowhere(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    blocks = np.random.default_rng(0).integers(5, len(tokenizer), size=(30, 16)).astype(np.int32)
    split = split_blocks(blocks, eval_fraction=0.3, max_eval_blocks=9, seed=0)  # 9 blocks over 2 processes
    batches = [list(MLMBatcher(split, tokenizer, per_device_batch_size=4, num_processes=2, process_index=p, seed=0,
                               mlm_probability=0.5).eval_batches()) for p in range(2)]
    assert len(batches[0]) == len(batches[1]) == 2  # batches of 4, 4, 1 blocks: 0 and 2 on one, 1 + padding
    labelled_rows = sum(int((b["labels"] != -100).any(dim=1).sum()) for shard in batches for b in shard)
    assert labelled_rows == 9  # the padded block carries no label


def test_no_special_token_is_ever_a_target(tiny_tokenizer_dir):
    """As transformers' DataCollatorForLanguageModeling: no id of `all_special_ids` ([UNK] and [MASK] included)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    specials = torch.tensor(sorted(tokenizer.all_special_ids))
    rng = np.random.default_rng(0)
    blocks = rng.integers(5, len(tokenizer), size=(40, 32)).astype(np.int32)
    where = rng.random(blocks.shape) < 0.3
    blocks[where] = rng.choice(specials.numpy(), size=int(where.sum()))
    split = split_blocks(blocks, eval_fraction=0.25, max_eval_blocks=10, seed=0)
    batcher = MLMBatcher(split, tokenizer, per_device_batch_size=4, num_processes=1, process_index=0, seed=0,
                         mlm_probability=0.9)
    for batch in [batcher.train_batch(m) for m in range(5)] + list(batcher.eval_batches()):
        labels = batch["labels"]
        original = torch.where(labels != -100, labels, batch["input_ids"])
        is_special = torch.isin(original, specials)
        assert is_special.any() and (labels[is_special] == -100).all()
        assert (labels[~is_special] != -100).any()


def test_random_replacement_draws_ordinary_tokens():
    # A vocabulary of 20 ids whose 0..4 are special: a uniform draw over all 20 would hit 0..3 in 20% of the random
    # replacements; pofa draws from the 15 ordinary ids (as fairseq's RoBERTa masking does).
    ids = torch.randint(5, 20, (64, 128), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, mask_token_id=4, vocab_size=20, special_ids=[0, 1, 2, 3, 4],
                                 mlm_probability=1.0, generator=step_generator(0, 0, 0))
    assert (labels != -100).all()
    assert not torch.isin(inputs, torch.tensor([0, 1, 2, 3])).any()
    random = (inputs != 4) & (inputs != ids)
    assert 0.08 < random.float().mean().item() < 0.1  # 10% random, of which 1/15 hit the token itself
    assert set(inputs[random].tolist()) == set(range(5, 20))


def _eval_rows(blocks, tokenizer, num_processes, *, max_batches=None, per_device_batch_size=4):
    """Every labelled held-out row of every process as (block, masked positions, labels, input ids), and the number
    of batches each process runs."""
    split = split_blocks(blocks, eval_fraction=0.5, max_eval_blocks=23, seed=1)
    where = {row.tobytes(): i for i, row in enumerate(np.asarray(blocks, dtype=np.int64))}
    rows, counts = [], []
    for p in range(num_processes):
        batcher = MLMBatcher(split, tokenizer, per_device_batch_size=per_device_batch_size,
                             num_processes=num_processes, process_index=p, seed=5, mlm_probability=0.5)
        batches = list(batcher.eval_batches(max_batches))
        counts.append(len(batches))
        for batch in batches:
            for inputs, labels in zip(batch["input_ids"], batch["labels"]):
                masked = labels != -100
                if not masked.any():
                    continue  # padding: counts nowhere
                original = torch.where(masked, labels, inputs)
                rows.append((where[original.numpy().tobytes()], tuple(masked.nonzero().flatten().tolist()),
                             tuple(labels[masked].tolist()), tuple(inputs.tolist())))
    return sorted(rows), counts


@pytest.mark.parametrize("max_batches", [None, 2])
def test_held_out_set_and_its_masks_do_not_depend_on_the_process_count(tiny_tokenizer_dir, max_batches):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    blocks = np.random.default_rng(0).integers(5, len(tokenizer), size=(60, 16)).astype(np.int32)
    single, [n_batches] = _eval_rows(blocks, tokenizer, 1, max_batches=max_batches)
    assert len(single) == (23 if max_batches is None else 8)
    assert len({row[0] for row in single}) == len(single)  # no block twice
    for num_processes in (2, 3):
        rows, counts = _eval_rows(blocks, tokenizer, num_processes, max_batches=max_batches)
        assert rows == single  # the same blocks, the same masked positions, labels and inputs; no duplicate
        assert len(set(counts)) == 1 and counts[0] == -(-n_batches // num_processes)  # same forward count each


def test_summed_held_out_loss_does_not_depend_on_the_process_count(tiny_tokenizer_dir):
    from transformers import BertConfig, BertForMaskedLM

    from pofa.modeling import MaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MaskedLM(BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=64))).eval()
    blocks = np.random.default_rng(0).integers(5, len(tokenizer), size=(30, 16)).astype(np.int32)
    split = split_blocks(blocks, eval_fraction=0.3, max_eval_blocks=9, seed=0)  # 3 batches: 2 processes pad

    def summed(num_processes):  # what pofa.pretrain.evaluate sums, reduced over the processes
        loss, correct, count = torch.zeros((), dtype=torch.float64), 0, 0
        for p in range(num_processes):
            batcher = MLMBatcher(split, tokenizer, per_device_batch_size=4, num_processes=num_processes,
                                 process_index=p, seed=0, mlm_probability=0.15)
            for batch in batcher.eval_batches():
                with torch.no_grad():
                    loss_sum, logits, selected = model(**batch, reduction="sum")
                labels = batch["labels"][selected]
                assert torch.isfinite(loss_sum)
                loss += loss_sum.double()
                correct += int((logits.argmax(-1) == labels).sum())
                count += int((labels != -100).sum())
        return loss.item(), correct, count

    loss, correct, count = summed(1)
    assert count > 0 and 1 < loss / count < 10
    for num_processes in (2, 3):
        assert summed(num_processes) == pytest.approx((loss, correct, count), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Corpus scale: parallel tokenization, streamed shares, resumable streams
# ---------------------------------------------------------------------------------------------------------------------


def _todays_blocks(documents, tokenizer, block_length: int) -> np.ndarray:
    """The blocks as pofa packed them before parallel tokenization (its pure-Python loop, kept here verbatim as
    the reference): documents tokenized in order, joined by [SEP], cut into [CLS] ... [SEP] blocks."""
    from pofa.data.mlm import tokenize_batches

    payload, buffer, start, blocks = block_length - 2, [], 0, []
    for tokens in tokenize_batches((row["text"] for row in documents), tokenizer):
        buffer.extend(tokens)
        buffer.append(tokenizer.sep_token_id)
        while len(buffer) - start >= payload:
            block = np.empty(block_length, dtype=np.int32)
            block[0], block[1:-1], block[-1] = tokenizer.cls_token_id, buffer[start : start + payload], SEP
            start += payload
            blocks.append(block)
    return np.stack(blocks)


def _generated_corpus(folder, kind: str, documents: int = 3000):
    """`documents` documents of 0 to 400 words of CPython's prose (every 50th blank), as .jsonl or .txt files."""
    import json

    from pofa.data.corpus import python_docs_documents

    words = " ".join(python_docs_documents()[:200]).split()
    rng = np.random.default_rng(0)
    texts = []
    for i in range(documents):
        start = int(rng.integers(0, len(words) - 400))
        texts.append("" if i % 50 == 0 else " ".join(words[start : start + int(rng.integers(1, 400))]))
    folder.mkdir()
    for part in range(3):
        share = texts[part::3]
        if kind == "jsonl":
            (folder / f"part-{part}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in share) + "\n")
        else:  # paragraphs: blank documents are simply absent
            (folder / f"part-{part}.txt").write_text("\n\n".join(t for t in share if t) + "\n")
    return [CorpusSource(files=[str(folder)])]


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_parallel_tokenization_writes_the_same_blocks_bit_for_bit(tmp_path, tiny_tokenizer_dir, monkeypatch, kind):
    import pofa.data.mlm as mlm
    from pofa.data.corpus import load_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sources = _generated_corpus(tmp_path / "corpus", kind)
    monkeypatch.setattr(mlm, "MIN_PIECE_DOCUMENTS", 400)  # several pieces: remainders carried across them
    lines: list[str] = []
    one = build_block_cache(sources, tokenizer, 64, tmp_path / "one", log=lambda m: None, workers=1)
    two = build_block_cache(sources, tokenizer, 64, tmp_path / "two", log=lines.append, workers=2)
    assert one.parent.name == two.parent.name  # the cache key does not depend on the worker count
    blocks = np.load(one)
    assert blocks.dtype == np.int32 and len(blocks) > 1000
    assert np.load(two).tobytes() == blocks.tobytes()
    assert np.array_equal(blocks, _todays_blocks(load_documents(sources), tokenizer, 64))
    progress = [line for line in lines if line.startswith("tokenized ") and "documents" in line]
    assert len(progress) > 1 and "2 worker(s)" in progress[-1] and "tokens/s" in progress[-1]
    assert list((tmp_path / "two" / "blocks").iterdir()) == [two.parent]  # no scratch left behind


def test_block_packer_cuts_the_same_blocks_however_it_is_fed():
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, 100, size=n).astype(np.int32) for n in rng.integers(0, 40, size=200)]
    one_by_one = np.stack(list(pack_blocks(docs, block_length=16, cls_id=CLS, sep_id=SEP)))
    packer, blocks = BlockPacker(block_length=16, cls_id=CLS, sep_id=SEP), []
    for start in range(0, len(docs), 37):
        group = docs[start : start + 37]
        blocks.append(packer.add(np.concatenate(group), [len(d) for d in group]))
    assert np.array_equal(np.concatenate(blocks), one_by_one)
    stream = np.concatenate([np.append(d, SEP) for d in docs])
    assert np.array_equal(packer.pending, stream[one_by_one.shape[0] * 14 :])


def _streamed(tmp_path, tokenizer, *, files: int = 3, **kwargs) -> list[CorpusSource]:
    import json

    from pofa.data.corpus import python_docs_documents

    folder = tmp_path / "stream"
    if not folder.exists():
        folder.mkdir()
        docs = [" ".join(doc.split()[:30]) for doc in python_docs_documents()[:90]]  # about 60 tokens each
        for f in range(files):
            (folder / f"part-{f}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[f::files]))
    return [CorpusSource(files=[str(folder)], streaming=True, **kwargs)]


def _streaming_batcher(sources, tokenizer, **kwargs):
    from pofa.data.mlm import StreamingMLMBatcher

    settings = dict(block_length=32, eval_blocks=8, per_device_batch_size=4, num_processes=1, process_index=0,
                    seed=3, mlm_probability=0.15, shuffle_buffer=7)
    return StreamingMLMBatcher(sources, tokenizer, **{**settings, **kwargs})


def _training_documents(monkeypatch) -> dict[int, list[str]]:
    """Records, per process, the documents each streaming batcher packs for training."""
    from pofa.data.mlm import StreamingMLMBatcher

    seen: dict[int, list[str]] = {}
    original = StreamingMLMBatcher._window_documents

    def recording(self, texts, epoch, window, first):
        order = self._window_order(epoch, window, len(texts))
        for d, tokens in original(self, texts, epoch, window, first):
            seen.setdefault(self.process_index, []).append(texts[order[d]])
            yield d, tokens

    monkeypatch.setattr(StreamingMLMBatcher, "_window_documents", recording)
    return seen


@pytest.mark.parametrize("files", [2, 1])  # whole files per process; one file split document by document
def test_streamed_processes_train_on_disjoint_shares_and_never_on_held_out_text(tmp_path, tiny_tokenizer_dir,
                                                                                monkeypatch, files):
    from pofa.data.corpus import load_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sources = _streamed(tmp_path, tokenizer, files=files)
    seen = _training_documents(monkeypatch)
    batchers = [_streaming_batcher(sources, tokenizer, num_processes=2, process_index=p) for p in range(2)]
    for batcher in batchers:
        for micro_step in range(30):  # beyond one epoch of each share (about 26 micro-steps)
            batcher.train_batch(micro_step)
    held_out = {t for t in (row["text"] for row in load_documents(sources)) if not batchers[0]._trains_on(t)}
    assert np.array_equal(batchers[0].split.blocks, batchers[1].split.blocks) and len(batchers[0].split.blocks) == 8
    everything = {row["text"] for row in load_documents(sources)}
    shares = [set(seen[p]) for p in range(2)]
    assert not shares[0] & shares[1] and not held_out & (shares[0] | shares[1])
    assert shares[0] | shares[1] == everything - held_out
    first_epoch = seen[0][: len(shares[0])]
    assert first_epoch != sorted(first_epoch, key=[row["text"] for row in load_documents(sources)].index)  # shuffled


def test_a_streamed_run_resumes_exactly_from_its_saved_position(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import json

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sources = _streamed(tmp_path, tokenizer)
    straight = [_streaming_batcher(sources, tokenizer, num_processes=2, process_index=p) for p in range(2)]
    expected = [[b.train_batch(m)["input_ids"] for m in range(30)] for b in straight]  # epochs of ~26 micro-steps

    for stop in (5, 17, 27):  # in epoch 0 (an early window, a later one) and in epoch 1
        interrupted = [_streaming_batcher(sources, tokenizer, num_processes=2, process_index=p) for p in range(2)]
        for b in interrupted:
            for m in range(stop):
                b.train_batch(m)
        # what the main process writes into trainer_state.json: every process's position
        state = json.loads(json.dumps({"data_streams": [b.state_dict()["data_streams"][0] for b in interrupted]}))
        read = []  # documents read by each window of the resumed processes
        for p in range(2):
            resumed = _streaming_batcher(sources, tokenizer, num_processes=2, process_index=p)
            monkeypatch.setattr(resumed, "_window_documents", _counting(resumed._window_documents, read))
            resumed.load_state_dict(state)
            for m in range(stop, 30):
                assert torch.equal(resumed.train_batch(m)["input_ids"], expected[p][m]), (p, stop, m)
        assert read[0] <= 7  # the first window read is the one the position is in, not the stream before it


def _counting(window_documents, read: list[int]):
    def counted(texts, *args):
        read.append(len(texts))
        return window_documents(texts, *args)

    return counted


def test_a_stream_position_needs_the_same_number_of_processes(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    batcher = _streaming_batcher(_streamed(tmp_path, tokenizer), tokenizer)
    batcher.train_batch(0)
    state = batcher.state_dict()
    with pytest.raises(CorpusError, match="stream positions of 1 processes; resume it with 1"):
        _streaming_batcher(_streamed(tmp_path, tokenizer), tokenizer, num_processes=2,
                           process_index=0).load_state_dict(state)
    fresh = _streaming_batcher(_streamed(tmp_path, tokenizer), tokenizer)
    fresh.load_state_dict({})  # an older checkpoint: re-read up to the micro-step
    assert torch.equal(fresh.train_batch(1)["input_ids"], batcher.train_batch(1)["input_ids"])
