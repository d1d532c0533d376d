import math
import os

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
)

from pofa.sparsity import (
    DEFAULT_TARGETS,
    POOLER_TARGET,
    MaskFileError,
    MaskStore,
    MaskViolationError,
    check_masks,
    format_sparsity_table,
    magnitude_masks,
    select_targets,
    sparsity_report,
)

torch.set_num_threads(1)

ENCODER_SUFFIXES = (
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
)


def config(**overrides):
    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def zeros_of(mask):
    return int((~mask).sum())


# --- select_targets -------------------------------------------------------------------------------------------------


def test_default_targets_select_every_encoder_linear_of_bert():
    torch.manual_seed(0)
    model = BertForMaskedLM(config())
    names = select_targets(model.named_parameters())
    expected = [f"bert.encoder.layer.{i}.{suffix}" for i in range(2) for suffix in ENCODER_SUFFIXES]
    assert sorted(names) == sorted(expected)
    # Embeddings, LayerNorms, biases and the MLM head stay dense.
    dense_parts = ("embeddings", "LayerNorm", "bias", "cls.")
    assert not any(part in name for name in names for part in dense_parts)


def test_default_targets_cover_distilbert():
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    names = select_targets(model.named_parameters())
    suffixes = ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"]
    assert sorted(names) == sorted(f"distilbert.transformer.layer.{i}.{s}.weight" for i in range(2) for s in suffixes)


def test_pooler_is_opt_in_and_exclude_wins():
    model = BertModel(config())
    assert not any("pooler" in n for n in select_targets(model.named_parameters()))
    names = select_targets(model.named_parameters(), include=(*DEFAULT_TARGETS, POOLER_TARGET))
    assert "pooler.dense.weight" in names and len(names) == 13
    names = select_targets(model.named_parameters(), exclude=(r"\.layer\.0\.",))
    assert len(names) == 6 and all(".layer.1." in n for n in names)


def test_select_targets_matches_wrapped_names_and_skips_1d():
    params = [("module.bert.encoder.layer.3.output.dense.weight", torch.zeros(4, 4)),
              ("module.bert.encoder.layer.3.output.dense.bias", torch.zeros(4)),
              ("weird.encoder.layer.0.output.dense.weight", torch.zeros(4))]  # 1-D: never a target
    assert select_targets(params) == ["module.bert.encoder.layer.3.output.dense.weight"]


def test_select_targets_invalid_regex_is_named():
    with pytest.raises(ValueError, match=r"include.*\(unclosed"):
        select_targets([("a.weight", torch.zeros(2, 2))], include=("(unclosed",))
    with pytest.raises(ValueError, match="exclude"):
        select_targets([("a.weight", torch.zeros(2, 2))], include=("a",), exclude=("[",))


def test_select_targets_no_match_shows_patterns_and_names():
    params = [("embeddings.word.weight", torch.zeros(2, 2)), ("head.weight", torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=r"nothing_like_this.*embeddings\.word\.weight"):
        select_targets(params, include=("nothing_like_this",))


# --- magnitude_masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 1 / 3, 0.5, 0.9, 0.97, 1.0])
def test_layer_masks_have_exact_zero_counts_and_prune_smallest(sparsity):
    generator = torch.Generator().manual_seed(1)
    weights = {
        "a": torch.randn(7, 13, generator=generator),
        "b": torch.randn(31, generator=generator).reshape(31, 1) * 100,
        "c": torch.randn(3, 4, 5, generator=generator),
    }
    masks = magnitude_masks(weights, sparsity)
    for name, weight in weights.items():
        mask = masks[name]
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert zeros_of(mask) == round(sparsity * weight.numel())
        if 0 < zeros_of(mask) < weight.numel():
            assert weight.abs()[~mask].max() <= weight.abs()[mask].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_global_masks_share_one_threshold_with_exact_total(sparsity):
    generator = torch.Generator().manual_seed(2)
    weights = {
        "small": torch.randn(40, 10, generator=generator) * 0.01,
        "large": torch.randn(20, 30, generator=generator),
    }
    masks = magnitude_masks(weights, sparsity, scope="global")
    total = sum(w.numel() for w in weights.values())
    assert sum(zeros_of(m) for m in masks.values()) == round(sparsity * total)
    pruned = torch.cat([weights[n].abs()[~masks[n]] for n in weights])
    kept = torch.cat([weights[n].abs()[masks[n]] for n in weights])
    assert pruned.max() <= kept.min()
    # One threshold: the small-scale tensor is pruned much harder than the large one.
    assert zeros_of(masks["small"]) / 400 > zeros_of(masks["large"]) / 600


def test_ties_are_broken_by_flat_index_deterministically():
    weights = {"w": torch.ones(4, 5)}
    first = magnitude_masks(weights, 0.35)
    assert zeros_of(first["w"]) == 7
    assert torch.equal(first["w"].reshape(-1), torch.arange(20) >= 7)
    for _ in range(3):
        assert torch.equal(magnitude_masks({"w": torch.ones(4, 5)}, 0.35)["w"], first["w"])


def test_global_ties_follow_name_order_not_insertion_order():
    forward = {"a": torch.full((3,), 2.0).reshape(3, 1), "b": torch.full((3,), 2.0).reshape(3, 1)}
    backward = {"b": forward["b"].clone(), "a": forward["a"].clone()}
    first = magnitude_masks(forward, 0.5, scope="global")
    second = magnitude_masks(backward, 0.5, scope="global")
    assert zeros_of(first["a"]) == 3 and zeros_of(first["b"]) == 0
    for name in forward:
        assert torch.equal(first[name], second[name])


def test_magnitude_uses_absolute_value():
    weights = {"w": torch.tensor([[-5.0, 0.1, -0.2, 3.0]])}
    assert magnitude_masks(weights, 0.5)["w"].tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_previously_pruned_stays_pruned_even_if_large(scope):
    generator = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(10, 10, generator=generator), "b": torch.randn(10, 20, generator=generator)}
    # Pretend the *largest* weights were pruned earlier (e.g. they grew back in a checkpoint).
    previous = {name: magnitude_masks({name: -w.abs()}, 0.3)[name] for name, w in weights.items()}
    weights = {name: w.abs() + 1.0 for name, w in weights.items()}
    masks = magnitude_masks(weights, 0.6, scope=scope, previous=previous)
    for name in weights:
        assert not (masks[name] & ~previous[name]).any(), f"{name}: a previously pruned weight was revived"
    if scope == "layer":
        assert [zeros_of(masks[n]) for n in weights] == [60, 120]
    else:
        assert sum(zeros_of(m) for m in masks.values()) == 180


def test_previously_pruned_ranks_below_exact_zero_weights():
    weights = {"w": torch.tensor([[0.0, 0.0, 5.0, 6.0]])}
    previous = {"w": torch.tensor([[True, True, False, True]])}
    assert magnitude_masks(weights, 0.25, previous=previous)["w"].tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_lower_sparsity_never_revives(scope):
    generator = torch.Generator().manual_seed(4)
    weights = {"w": torch.randn(10, 10, generator=generator)}
    previous = magnitude_masks(weights, 0.8)
    masks = magnitude_masks(weights, 0.5, scope=scope, previous=previous)
    assert torch.equal(masks["w"], previous["w"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_weights(dtype):
    weights = {"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(5)).to(dtype)}
    mask = magnitude_masks(weights, 0.75)["w"]
    assert mask.dtype == torch.bool and zeros_of(mask) == 192


def test_accepts_a_mask_store_as_previous():
    weights = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(6))}
    store = MaskStore(magnitude_masks(weights, 0.5))
    masks = magnitude_masks(weights, 0.75, previous=store)
    assert zeros_of(masks["w"]) == 48 and not (masks["w"] & ~store["w"]).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(scope="row"), "scope"),
        (dict(previous={}), "previous has no mask for 'w'"),
        (dict(previous={"w": torch.ones(3, 3, dtype=torch.bool)}), "previous"),
        (dict(previous={"w": torch.ones(2, 2)}), "bool"),
    ],
)
def test_magnitude_masks_validation(kwargs, match):
    arguments = dict(sparsity=0.5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        magnitude_masks({"w": torch.ones(2, 2)}, arguments.pop("sparsity"), **arguments)


def test_magnitude_masks_rejects_empty_and_integer_weights():
    with pytest.raises(ValueError, match="empty"):
        magnitude_masks({}, 0.5)
    with pytest.raises(ValueError, match="floating"):
        magnitude_masks({"w": torch.ones(2, 2, dtype=torch.int64)}, 0.5)


# --- MaskStore ------------------------------------------------------------------------------------------------------


def random_store(seed=0, sparsity=0.7):
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "bert.encoder.layer.0.output.dense.weight": torch.randn(13, 7, generator=generator),  # 91: not a multiple of 8
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=generator),
        "odd.weight": torch.randn(3, 1, 5, generator=generator),
    }
    return MaskStore(magnitude_masks(weights, sparsity))


def test_store_basics_and_statistics():
    store = random_store()
    assert len(store) == 3 and "odd.weight" in store and "nope" not in store
    assert store.names() == list(store) and [n for n, _ in store.items()] == store.names()
    assert store.layer_sparsity()["odd.weight"] == pytest.approx(round(0.7 * 15) / 15)
    total = 91 + 256 + 15
    assert store.sparsity() == pytest.approx((round(0.7 * 91) + round(0.7 * 256) + round(0.7 * 15)) / total)
    with pytest.raises(KeyError, match="nope"):
        store["nope"]
    assert MaskStore().sparsity() == 0.0


def test_store_rejects_non_bool_masks():
    with pytest.raises(ValueError, match="bool"):
        MaskStore({"w": torch.ones(2, 2)})
    store = random_store()
    with pytest.raises(ValueError, match="shape"):
        store.update({"odd.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_update_is_in_place_and_returns_newly_pruned():
    store = MaskStore({"w": torch.tensor([True, True, False, True])})
    tensor = store["w"]
    version = store.version
    newly = store.update({"w": torch.tensor([True, False, False, False]), "v": torch.tensor([[True, False]])})
    assert store["w"] is tensor, "hooks holding the mask tensor must see the new mask"
    assert tensor.tolist() == [True, False, False, False]
    assert newly["w"].tolist() == [False, True, False, True]
    assert newly["v"].tolist() == [[False, True]]
    assert store.version > version


def test_save_load_round_trip_is_bitwise(tmp_path):
    store = random_store()
    path = tmp_path / "masks.safetensors"
    store.save(path)
    loaded = MaskStore.load(path)
    assert loaded.names() == store.names()
    for name, mask in store.items():
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], mask)
    # 1 bit per weight (plus the safetensors header).
    assert os.path.getsize(path) < 1024 + sum(math.ceil(m.numel() / 8) for _, m in store.items())


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        MaskStore.load(missing)
    path = tmp_path / "masks.safetensors"
    random_store().save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="truncated.safetensors"):
        MaskStore.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(MaskFileError, match="garbage.safetensors"):
        MaskStore.load(garbage)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(MaskFileError, match="model.safetensors.*format"):
        MaskStore.load(path)


def test_state_dict_round_trip_in_place_and_torch_save(tmp_path):
    store = random_store(seed=1)
    path = tmp_path / "state.pt"
    torch.save(store.state_dict(), path)
    # accelerate's load_state reads custom objects back with weights_only loading.
    state = torch.load(path, weights_only=True)
    target = random_store(seed=2)
    held = target["odd.weight"]
    target.load_state_dict(state)
    assert target["odd.weight"] is held
    for name, mask in store.items():
        assert torch.equal(target[name], mask)
    with pytest.raises(MaskFileError):
        target.load_state_dict({"something": 1})


def test_accelerate_checkpointing_restores_the_store(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    store = random_store(seed=1)
    expected = {name: mask.clone() for name, mask in store.items()}
    accelerator = Accelerator(cpu=True)
    try:
        accelerator.register_for_checkpointing(store)
        accelerator.save_state(str(tmp_path / "ckpt"))
        store.update({name: torch.zeros_like(mask) for name, mask in store.items()})
        accelerator.load_state(str(tmp_path / "ckpt"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    for name, mask in expected.items():
        assert torch.equal(store[name], mask)


def test_from_zeros_and_dense():
    model = BertForMaskedLM(config())
    dense = MaskStore.dense(model.named_parameters())
    assert len(dense) == 12 and dense.sparsity() == 0.0
    with torch.no_grad():
        weight = model.bert.encoder.layer[1].intermediate.dense.weight
        weight[:, :8] = 0
    locked = MaskStore.from_zeros(model.named_parameters())
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    assert zeros_of(locked[name]) == 64 * 8
    assert torch.equal(locked[name], weight != 0)


def test_to_moves_masks():
    store = random_store()
    assert store.to("cpu") is store
    assert all(mask.device.type == "cpu" for _, mask in store.items())


# --- binding across models ------------------------------------------------------------------------------------------


class Wrapper(nn.Module):
    """Stands in for DDP / DeepSpeedEngine: one child called `module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def mlm_store():
    torch.manual_seed(0)
    model = BertForMaskedLM(config())
    store = MaskStore.dense(model.named_parameters())
    weights = {name: param.detach() for name, param in store.bind(model).items()}
    store.update(magnitude_masks(weights, 0.5))
    return model, store


@pytest.mark.parametrize(
    ("target", "prefix"),
    [
        (lambda: BertForSequenceClassification(config(num_labels=3)), "bert."),
        (lambda: BertModel(config()), ""),
        (lambda: Wrapper(BertForSequenceClassification(config())), "module.bert."),
        (lambda: torch.compile(BertModel(config())), "_orig_mod."),
    ],
    ids=["seq-cls", "base-model", "ddp-like-wrapper", "torch-compile"],
)
def test_bind_mlm_masks_to_other_models(target, prefix):
    _, store = mlm_store()
    model = target()
    bound = store.bind(model)
    assert sorted(bound) == sorted(store.names())
    parameters = dict(model.named_parameters())
    for mask_name, param in bound.items():
        expected = prefix + mask_name[len("bert."):]
        assert parameters[expected] is param


def test_bind_base_model_masks_to_task_model():
    base = BertModel(config())
    store = MaskStore.dense(base.named_parameters())
    assert store.names()[0].startswith("encoder.")
    task = BertForMaskedLM(config())
    bound = store.bind(task)
    assert bound["encoder.layer.0.output.dense.weight"] is task.bert.encoder.layer[0].output.dense.weight


def test_bind_names_unresolved_masks_and_shape_mismatches():
    _, store = mlm_store()
    store.update({"bert.encoder.layer.7.output.dense.weight": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"no parameter for masks: bert\.encoder\.layer\.7\.output\.dense\.weight"):
        store.bind(BertModel(config()))
    _, store = mlm_store()
    expected = r"shape mismatch: .*intermediate\.dense\.weight: mask \(64, 32\) vs parameter \(128, 32\)"
    with pytest.raises(ValueError, match=expected):
        store.bind(BertModel(config(intermediate_size=128)))


# --- check_masks and reports ----------------------------------------------------------------------------------------


def zero_pruned_(model, store):
    with torch.no_grad():
        for name, param in store.bind(model).items():
            param.masked_fill_(~store[name], 0)


def test_check_masks_passes_then_names_the_offender():
    model, store = mlm_store()
    with pytest.raises(MaskViolationError):
        check_masks(model, store)  # not zeroed yet
    zero_pruned_(model, store)
    check_masks(model, store)
    name = "bert.encoder.layer.1.attention.self.key.weight"
    pruned_positions = (~store[name]).nonzero()[:3]
    with torch.no_grad():
        for row, col in pruned_positions.tolist():
            model.bert.encoder.layer[1].attention.self.key.weight[row, col] = 0.5
    with pytest.raises(MaskViolationError, match=r"layer\.1\.attention\.self\.key\.weight.*3 of 512 pruned") as info:
        check_masks(model, store)
    assert isinstance(info.value, RuntimeError)
    assert "query" not in str(info.value)


def test_sparsity_report_and_tables():
    model, store = mlm_store()
    zero_pruned_(model, store)
    report = sparsity_report(model, store)
    entry = report["parameters"]["bert.encoder.layer.0.intermediate.dense.weight"]
    assert entry["shape"] == [64, 32] and entry["numel"] == 2048
    assert entry["zeros"] >= 1024 and entry["sparsity"] == entry["zeros"] / 2048
    assert entry["target_sparsity"] == 0.5
    assert report["targets"]["numel"] == 16384 and report["targets"]["target_sparsity"] == 0.5
    assert report["targets"]["zeros"] == sum(e["zeros"] for e in report["parameters"].values())
    assert report["model"]["numel"] == sum(p.numel() for p in model.parameters())
    assert report["model"]["zeros"] >= report["targets"]["zeros"]
    table = format_sparsity_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("parameter") and len(lines) == 1 + 1 + 12 + 1 + 2
    assert "bert.encoder.layer.0.intermediate.dense.weight" in table and "50.00%" in table and "whole model" in table
    assert len({len(line) for line in lines[2:14]}) == 1, "fixed width"
    markdown = format_sparsity_table(report, markdown=True).splitlines()
    assert markdown[0].startswith("| parameter |") and markdown[1].startswith("|---|")
    assert all(line.startswith("|") and line.endswith("|") for line in markdown)


def test_threshold_search_agrees_with_selection():
    from pofa.sparsity.masks import _kth_smallest, _kth_smallest_of_one

    generator = torch.Generator().manual_seed(7)
    for values in (
        torch.randint(-1, 50, (500,), generator=generator, dtype=torch.int32),  # many ties, "previously pruned" -1
        torch.randn(300, generator=generator).abs().view(torch.int32),
    ):
        for k in (1, 7, 250, values.numel()):
            expected = int(values.sort().values[k - 1])
            assert _kth_smallest(lambda t, v=values: int((v <= t).sum()), k) == expected
            assert _kth_smallest_of_one(values, k) == expected
