import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pofa.modeling import MaskedLM


def tiny_mlm(all_logits: bool) -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=32)), all_logits=all_logits)


@pytest.mark.parametrize("all_logits", [False, True])
@pytest.mark.parametrize("distill_all", [False, True])
def test_a_batch_without_labels_gives_zero_loss_not_nan(all_logits, distill_all):
    model = tiny_mlm(all_logits)
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.full_like(ids, -100)
    distill_mask = torch.ones_like(ids, dtype=torch.bool) if distill_all else None
    loss, logits, selected = model(ids, torch.ones_like(ids), labels, distill_mask=distill_mask)
    assert loss.item() == 0.0 and loss.requires_grad  # finite, and still attached to the graph
    assert logits.shape[0] == int(selected.sum())
    summed, _, _ = model(ids, torch.ones_like(ids), labels, distill_mask=distill_mask, reduction="sum")
    assert summed.item() == 0.0

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # training on such a batch: no NaN anywhere
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("all_logits", [False, True])
def test_summed_loss_and_mean_loss_match_cross_entropy(all_logits):
    model = tiny_mlm(all_logits).eval()
    ids = torch.randint(5, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    with torch.no_grad():
        full = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        mean, _, _ = model(ids, torch.ones_like(ids), labels)
        summed, _, _ = model(ids, torch.ones_like(ids), labels, reduction="sum")
    reference = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="sum")
    assert summed.item() == pytest.approx(reference.item(), rel=1e-5)
    assert mean.item() == pytest.approx(reference.item() / 9, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        model(ids, torch.ones_like(ids), labels, reduction="none")


def test_the_checkpoint_pooler_is_kept_frozen(tmp_path):
    """`...ForMaskedLM` drops the pooler; pofa keeps it, so fine-tuning heads do not start from a random one."""
    from transformers import BertModel

    from pofa.modeling import load_mlm_model

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    base.save_pretrained(tmp_path / "base")
    model = load_mlm_model(str(tmp_path / "base"))
    assert torch.equal(model.bert.pooler.dense.weight, base.pooler.dense.weight)
    assert not model.bert.pooler.dense.weight.requires_grad
    model.save_pretrained(tmp_path / "again")  # and it survives a save: the next stage finds it
    again = load_mlm_model(str(tmp_path / "again"))
    assert torch.equal(again.bert.pooler.dense.weight, base.pooler.dense.weight)


def test_keep_pooler_gives_a_fresh_one_where_the_checkpoint_has_none(tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from pofa.modeling import load_mlm_model

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    assert load_mlm_model(str(tmp_path / "bert")).bert.pooler is None
    assert load_mlm_model(str(tmp_path / "bert"), keep_pooler=True).bert.pooler is not None
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                           hidden_dim=32)).save_pretrained(tmp_path / "distil")
    distil = load_mlm_model(str(tmp_path / "distil"), keep_pooler=True)  # the family has no pooler: nothing added
    assert not any("pooler" in name for name, _ in distil.named_parameters())


@pytest.mark.parametrize("all_logits", [False, True])
@pytest.mark.parametrize("distill_all", [False, True])
def test_host_computed_indices_select_what_the_boolean_mask_selects(all_logits, distill_all):
    """`selected_positions` on the host batch + index_select (no host sync on a GPU) == the boolean-mask path."""
    from pofa.modeling import selected_positions

    model = tiny_mlm(all_logits).eval()  # no dropout: the two calls must see the same network
    ids = torch.randint(5, 50, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]
    mask = attention.bool() if distill_all else None
    index = selected_positions(labels, attention if distill_all else None)
    assert index.tolist() == (mask if distill_all else labels != -100).flatten().nonzero().squeeze(1).tolist()
    by_mask = model(ids, attention, labels, distill_mask=mask)
    by_index = model(ids, attention, labels, selected_index=index)
    torch.testing.assert_close(by_index[0], by_mask[0])
    torch.testing.assert_close(by_index[1], by_mask[1])
