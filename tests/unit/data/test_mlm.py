import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pofa.data.corpus import CorpusError
from pofa.data.mlm import (MLMBatcher, batch_indices, build_block_cache, mask_tokens, pack_blocks, split_blocks,
                           step_generator)
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
    monkeypatch.setattr(mlm, "tokenize_batches", lambda *a, **k: pytest.fail("re-tokenized a cached corpus"))
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
