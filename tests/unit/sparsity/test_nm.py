"""N:M (semi-structured) masks: creation through the cubic schedule, the store's pattern, check_masks, GPU use."""

import math

import pytest
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from pofa.recipe import PretrainRecipe, RecipeError, recipe_from_dict
from pofa.sparsity import (
    MaskFileError,
    MaskGuard,
    MaskStore,
    MaskViolationError,
    check_masks,
    cubic_sparsity,
    magnitude_masks,
    nm_masks,
    nm_violations,
    parse_pattern,
    pattern_sparsity,
    sparsity_report,
)
from pofa.sparsity.semi_structured import semi_structured_linears, to_semi_structured_

torch.set_num_threads(1)


def weights(seed=0, shapes=((8, 16), (12, 32))):
    generator = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)}


def group_zeros(mask, m):
    return (~mask).reshape(-1, m).sum(dim=1)


# --- patterns -------------------------------------------------------------------------------------------------------


def test_parse_pattern_and_its_sparsity():
    assert parse_pattern("unstructured") is None and pattern_sparsity("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and pattern_sparsity("2:4") == 0.5
    assert parse_pattern("1:4") == (1, 4) and pattern_sparsity("1:4") == 0.75
    assert parse_pattern("4:8") == (4, 8) and pattern_sparsity("4:8") == 0.5


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "2:4:8", "2/4", "", "structured", " 2:4"])
def test_parse_pattern_rejects_and_names_the_value(bad):
    with pytest.raises(ValueError, match="pattern must be"):
        parse_pattern(bad)


# --- masks at the pattern's sparsity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:2"])
def test_final_masks_keep_exactly_n_largest_of_every_group_along_the_input_dimension(pattern):
    n, m = parse_pattern(pattern)
    ws = weights()
    masks = magnitude_masks(ws, pattern_sparsity(pattern), pattern=pattern)
    for name, mask in masks.items():
        groups = mask.reshape(-1, m)
        assert bool((groups.sum(dim=1) == n).all()), name
        magnitude = ws[name].abs().reshape(-1, m)
        smallest_kept = magnitude.masked_fill(~groups, math.inf).min(dim=1).values
        largest_pruned = magnitude.masked_fill(groups, -math.inf).max(dim=1).values
        assert bool((smallest_kept >= largest_pruned).all()), name
        assert nm_violations(mask, (n, m)) == 0


def test_groups_run_along_rows_not_columns():
    # Row r holds 16 ascending magnitudes: 2:4 keeps the two largest of each 4 consecutive entries *of the row*.
    weight = torch.arange(1, 65, dtype=torch.float32).reshape(4, 16)
    mask = nm_masks({"w": weight}, 0.5, (2, 4))["w"]
    expected = torch.tensor([False, False, True, True]).repeat(4, 4)
    assert torch.equal(mask, expected)
    # The same weights read down the columns would give another mask: the layout matters.
    assert nm_violations(mask.t().contiguous(), (2, 4)) > 0


def test_ties_prune_lower_positions_first_deterministically():
    mask = nm_masks({"w": torch.ones(2, 8)}, 0.5, (2, 4))["w"]
    assert torch.equal(mask, torch.tensor([False, False, True, True]).repeat(2, 2))


# --- the schedule's ramp --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_cubic_ramp_reaches_exact_counts_by_groups_and_ends_n_m(pattern):
    n, m = parse_pattern(pattern)
    final = pattern_sparsity(pattern)
    ws = weights(seed=1)
    previous = None
    for step in range(0, 11):
        sparsity = cubic_sparsity(step, initial=0.0, final=final, start_step=0, end_step=10)
        masks = magnitude_masks(ws, sparsity, previous=previous, pattern=pattern)
        base = math.floor(sparsity * m + 1e-9)
        for name, mask in masks.items():
            # exactly the schedule's count, as unstructured layer masks, made of groups of floor(s*M) or one more
            assert int((~mask).sum()) == round(sparsity * mask.numel()), (step, name)
            zeros = group_zeros(mask, m)
            assert bool(((zeros == base) | (zeros == base + 1)).all()), (step, name)
            if previous is not None:
                assert not bool((~previous[name] & mask).any()), f"a pruned weight came back at step {step}"
        previous = masks
    assert all(nm_violations(mask, (n, m)) == 0 for mask in previous.values())


def test_the_extra_zeros_go_to_the_groups_whose_next_weight_is_smallest():
    # 2 groups of 4 at s = 0.375: 3 zeros in all, one per group plus one for the group whose 2nd-smallest is smaller.
    weight = torch.tensor([[1.0, 5.0, 6.0, 7.0, 2.0, 3.0, 8.0, 9.0]])
    mask = nm_masks({"w": weight}, 0.375, (2, 4))["w"]
    assert torch.equal(mask, torch.tensor([[False, True, True, True, False, False, True, True]]))


def test_previously_pruned_large_weights_stay_pruned_and_revive_lets_them_compete():
    weight = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    previous = {"w": torch.tensor([[False, True, True, True]])}
    kept = nm_masks({"w": weight}, 0.5, (2, 4), previous=previous)["w"]
    assert torch.equal(kept, torch.tensor([[False, False, True, True]]))
    # Revived: the pruned 9.0 still holds its value and outranks the kept 2.0 and 1.0.
    revived = nm_masks({"w": weight}, 0.5, (2, 4), previous=previous, revive={"w": torch.tensor([[9.0, 0, 0, 0]])})["w"]
    assert torch.equal(revived, torch.tensor([[True, False, False, True]]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0.6, pattern="2:4"), "exceeds what pattern 2:4 allows"),
    (dict(sparsity=0.5, pattern="2:4", scope="global"), "scope must be 'layer'"),
    (dict(sparsity=0.25, pattern="2:3"), "not a multiple of M=3"),
    (dict(sparsity=0.5, pattern="two:four"), "pattern must be"),
])
def test_magnitude_masks_pattern_errors_name_the_value(kwargs, match):
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(ValueError, match=match):
        magnitude_masks({"w": torch.randn(4, 8)}, sparsity, **kwargs)


# --- the store records and enforces its pattern -----------------------------------------------------------------------


def two_four_store(seed=0):
    return MaskStore(magnitude_masks(weights(seed), 0.5, pattern="2:4"), pattern="2:4")


def test_store_refuses_masks_that_break_its_pattern():
    unstructured = magnitude_masks(weights(), 0.5)
    with pytest.raises(ValueError, match=r"do not follow pattern '2:4': w0: \d+ of 32 groups of 4 keep more than 2"):
        MaskStore(unstructured, pattern="2:4")
    store = two_four_store()
    with pytest.raises(ValueError, match="do not follow pattern"):
        store.update(unstructured)
    assert store.pattern == "2:4" and nm_violations(store["w0"], (2, 4)) == 0  # unchanged
    plain = MaskStore(unstructured)
    assert plain.pattern == "unstructured"
    with pytest.raises(ValueError, match="do not follow pattern"):
        plain.pattern = "2:4"
    with pytest.raises(ValueError, match="pattern must be"):
        MaskStore(unstructured, pattern="2-4")


def test_pattern_survives_file_and_state_dict_round_trips(tmp_path):
    store = two_four_store()
    store.save(tmp_path / "masks.safetensors")
    with safe_open(str(tmp_path / "masks.safetensors"), framework="np") as handle:
        assert handle.metadata()["pattern"] == "2:4"
    loaded = MaskStore.load(tmp_path / "masks.safetensors")
    assert loaded.pattern == "2:4" and all(torch.equal(loaded[n], store[n]) for n in store)
    target = MaskStore({name: torch.ones_like(mask) for name, mask in store.items()})
    target.load_state_dict(store.state_dict())
    assert target.pattern == "2:4" and all(torch.equal(target[n], store[n]) for n in store)


def test_a_file_claiming_a_pattern_its_masks_break_is_refused_and_old_files_are_unstructured(tmp_path):
    path = tmp_path / "masks.safetensors"
    MaskStore(magnitude_masks(weights(), 0.5)).save(path)
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    arrays = load_numpy(str(path))
    save_numpy(arrays, str(path), metadata={**metadata, "pattern": "2:4"})
    with pytest.raises(MaskFileError, match="masks.safetensors: masks do not follow pattern '2:4'"):
        MaskStore.load(path)
    save_numpy(arrays, str(path), metadata={k: v for k, v in metadata.items() if k != "pattern"})
    assert MaskStore.load(path).pattern == "unstructured"


# --- check_masks verifies N:M, not only zeros ---------------------------------------------------------------------


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))


def pruned_two_four(model):
    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store)
    guard.prune_(0.5, pattern="2:4")
    guard.remove()
    store.pattern = "2:4"
    return store


def test_check_masks_verifies_the_pattern_itself():
    model = tiny_bert()
    store = pruned_two_four(model)
    check_masks(model, store)
    name = store.names()[0]
    # Written in place (bypassing the store's checks): one group now keeps 3, and the weight is zero where pruned.
    store[name][0, :4] = torch.tensor([True, True, True, False])
    with torch.no_grad():
        store.bind(model)[name].mul_(store[name])
    with pytest.raises(MaskViolationError, match=rf"{name}: 1 of \d+ groups of 4 keep more than 2 \(pattern 2:4\)"):
        check_masks(model, store)


def test_check_masks_still_catches_non_zero_pruned_weights_and_report_names_the_pattern():
    model = tiny_bert()
    store = pruned_two_four(model)
    assert sparsity_report(model, store)["pattern"] == "2:4"
    assert sparsity_report(model, store)["targets"]["sparsity"] == pytest.approx(0.5)
    name = store.names()[1]
    with torch.no_grad():
        store.bind(model)[name].add_(1.0)
    with pytest.raises(MaskViolationError, match=rf"{name} \(weight\): \d+ of \d+ pruned positions are non-zero"):
        check_masks(model, store)


def test_mask_guard_keeps_two_four_through_adamw_steps():
    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = MaskGuard(model, store)
    inputs = torch.randint(0, 100, (2, 8))
    for step in range(6):
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        guard.prune_(cubic_sparsity(step, initial=0.0, final=0.5, start_step=0, end_step=4), optimizer=optimizer,
                     pattern="2:4")
    store.pattern = "2:4"
    check_masks(model, store)
    for name, param in store.bind(model).items():
        assert nm_violations(param.detach() != 0, (2, 4)) == 0, name


# --- the recipe field ---------------------------------------------------------------------------------------------


def recipe(**pruning):
    return recipe_from_dict(PretrainRecipe, {"data": {"sources": [{"embedded": "python-docs"}]},
                                             "pruning": {"enabled": True, **pruning}})


def test_recipe_pattern_is_checked_before_anything_runs():
    assert recipe().pruning.pattern == "unstructured"
    assert recipe(pattern="2:4", target_sparsity=0.5).pruning.pattern == "2:4"
    assert recipe(pattern="1:4", target_sparsity=0.75).pruning.pattern == "1:4"
    with pytest.raises(RecipeError, match=r"pruning.target_sparsity: must be 0.5 with pruning.pattern 2:4"):
        recipe(pattern="2:4")
    with pytest.raises(RecipeError, match="pruning.scope: must be layer with pruning.pattern 2:4"):
        recipe(pattern="2:4", target_sparsity=0.5, scope="global")
    with pytest.raises(RecipeError, match="pruning.pattern: must be 'unstructured', 'N:M'.*'RxC' blocks.*'2/4'"):
        recipe(pattern="2/4", target_sparsity=0.5)
    assert recipe(pattern="2x4", target_sparsity=0.5).pruning.pattern == "2x4"  # blocks of 2 rows x 4 inputs


# --- GPU semi-structured conversion (its CPU-checkable parts; bench/gpu_check.py runs it on a GPU) --------------------


def test_semi_structured_linears_are_the_two_four_masked_linears():
    model = tiny_bert()
    store = pruned_two_four(model)
    linears = semi_structured_linears(model, store)
    assert len(linears) == 12 and all(isinstance(module, nn.Linear) for module in linears.values())
    assert all(name.startswith("bert.encoder.layer.") for name in linears)
    # A 1:4 mask is 2:4 as well; an unstructured one is not.
    names = store.names()
    mixed = MaskStore({names[0]: store[names[0]], names[1]: nm_masks({"w": torch.randn(32, 32)}, 0.75, (1, 4))["w"],
                       names[2]: magnitude_masks({"w": torch.randn(32, 32)}, 0.5)["w"]})
    assert [f"{name}.weight" for name in semi_structured_linears(model, mixed)] == names[:2]


def test_to_semi_structured_refuses_what_its_kernels_cannot_run():
    model = tiny_bert()
    store = pruned_two_four(model)
    with pytest.raises(ValueError, match=r"bert.encoder.layer.0.attention.self.query.weight is torch.float32 on cpu"):
        to_semi_structured_(model, store)
    with pytest.raises(ValueError, match="no Linear of BertForMaskedLM has a 2:4 mask"):
        to_semi_structured_(model, MaskStore(magnitude_masks({n: store.bind(model)[n].detach() for n in store}, 0.1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels run on CUDA only")
def test_semi_structured_bert_matches_dense_on_gpu():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(num_hidden_layers=2)).to("cuda", torch.bfloat16).eval()
    store = pruned_two_four(model)
    inputs = torch.randint(0, 30522, (4, 128), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=inputs).logits.float()
        assert len(to_semi_structured_(model, store)) == 12
        sparse = model(input_ids=inputs).logits.float()
    assert torch.allclose(dense, sparse, atol=0.15, rtol=0.05)
