"""Block masks (`pruning.pattern: RxC`, e.g. 1x4): whole blocks pruned by their summed magnitude, the store's pattern,
check_masks, the recipe's check, and the sparse int8 kernel's work falling with them."""

import pytest
import torch
from torch import nn

from pofa.recipe import PretrainRecipe, RecipeError, recipe_from_dict
from pofa.sparsity import (
    MaskStore,
    MaskViolationError,
    block_masks,
    block_violations,
    check_masks,
    magnitude_masks,
    parse_block,
    parse_pattern,
    pattern_sparsity,
)

from tests.unit.sparsity.test_nm import weights  # the same two random weights as the N:M tests

torch.set_num_threads(1)


def test_parse_block_and_the_patterns_it_shares_parse_pattern_with():
    assert parse_block("1x4") == (1, 4) and parse_block("4x1") == (4, 1) and parse_block("2x2") == (2, 2)
    assert parse_pattern("1x4") is None and pattern_sparsity("1x4") is None  # no N of M rule: any sparsity
    assert parse_block("unstructured") is None and parse_block("2:4") is None


@pytest.mark.parametrize("bad", ["1x1", "0x4", "4x0", "1x4x2", "x4", "1X4", " 1x4"])
def test_bad_block_patterns_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=f"pattern must be .*got '{bad}'"):
        parse_block(bad)


def test_the_blocks_with_the_largest_summed_magnitude_are_kept_whole():
    weight = torch.tensor([[0.1, 0.1, 0.1, 0.1, 5.0, 0.0, 0.0, 0.0],    # sums 0.4 | 5.0
                           [1.0, 1.0, 1.0, 1.0, -0.2, 0.3, 0.1, 0.1]])  # sums 4.0 | 0.7
    mask = block_masks({"w": weight}, 0.5, (1, 4))["w"]
    # A single large weight carries its block (5.0 > 0.7): blocks are ranked by the sum, not by their members.
    expected = torch.tensor([[False] * 4 + [True] * 4, [True] * 4 + [False] * 4])
    assert torch.equal(mask, expected)
    assert torch.equal(magnitude_masks({"w": weight}, 0.5, pattern="1x4")["w"], expected)


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (2, 2), (1, 8)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9, 1.0])
def test_layer_scope_prunes_exactly_round_s_blocks_of_every_tensor(block, sparsity):
    masks = block_masks(weights(), sparsity, block)
    size = block[0] * block[1]
    for name, mask in masks.items():
        assert block_violations(mask, block, name) == 0
        blocks = mask.numel() // size
        assert int((~mask).sum()) == round(sparsity * blocks) * size, (name, block, sparsity)


def test_global_scope_prunes_exactly_round_s_of_all_blocks():
    masks = block_masks(weights(), 0.6, (1, 4), scope="global")
    blocks = sum(m.numel() for m in masks.values()) // 4
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * blocks) * 4
    assert all(block_violations(m, (1, 4)) == 0 for m in masks.values())


def test_previous_blocks_stay_pruned_unless_revive_lets_them_compete():
    w = weights()
    first = block_masks(w, 0.5, (1, 4))
    grown = {name: torch.where(first[name], weight, torch.zeros_like(weight)) for name, weight in w.items()}
    # A pruned block's weights are zero, but it would win on the held values: without revive it stays pruned.
    held = {name: torch.where(first[name], torch.zeros_like(weight), torch.full_like(weight, 100.0))
            for name, weight in w.items()}
    again = block_masks(grown, 0.5, (1, 4), previous=first)
    assert all(torch.equal(again[name], first[name]) for name in w)
    revived = block_masks(grown, 0.5, (1, 4), previous=first, revive=held)
    assert all(torch.equal(revived[name], ~first[name]) for name in w)  # every held block outranks every kept one
    assert all(int((~revived[name]).sum()) == int((~first[name]).sum()) for name in w)


def test_errors_name_the_weight_and_the_mask():
    with pytest.raises(ValueError, match=r"w0: its shape \(8, 16\) cannot be cut into 3x4 blocks"):
        block_masks(weights(), 0.5, (3, 4))
    with pytest.raises(ValueError, match=r"bias: its shape \(16,\) cannot be cut into 1x4 blocks"):
        block_masks({"bias": torch.randn(16)}, 0.5, (1, 4))
    ragged = {name: torch.rand(w.shape) > 0.5 for name, w in weights().items()}
    with pytest.raises(ValueError, match="previous mask 'w0' is not made of whole 1x4 blocks"):
        block_masks(weights(), 0.5, (1, 4), previous=ragged)


def test_store_refuses_masks_that_are_not_whole_blocks_and_check_masks_sees_an_in_place_break(tmp_path):
    masks = block_masks(weights(), 0.5, (1, 4))
    store = MaskStore(masks, pattern="1x4")
    store.save(tmp_path / "masks.safetensors")
    assert MaskStore.load(tmp_path / "masks.safetensors").pattern == "1x4"
    ragged = dict(masks)
    ragged["w1"] = ragged["w1"].clone()
    ragged["w1"][0, :4] = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match=r"masks do not follow pattern '1x4': w1: 1 of 96 1x4 blocks are kept in part"):
        MaskStore(ragged, pattern="1x4")

    model = nn.Module()
    model.w0, model.w1 = (nn.Parameter(w * m) for w, m in zip(weights().values(), masks.values()))
    check_masks(model, store)
    store["w0"][0, 0] = not bool(store["w0"][0, 0])  # a mask tensor written in place
    with pytest.raises(MaskViolationError, match=r"w0: 1 of 32 1x4 blocks are kept in part only \(pattern 1x4\)"):
        check_masks(model, store)


def test_recipe_takes_any_target_and_scope_with_a_block_pattern_and_names_a_bad_one():
    base = {"stage": "student", "model": {"name_or_path": "m"}, "data": {"sources": [{"embedded": "python-docs"}]},
            "training": {"max_steps": 10}}
    for scope in ("layer", "global"):
        recipe = recipe_from_dict(PretrainRecipe, {**base, "pruning": {
            "enabled": True, "pattern": "1x4", "target_sparsity": 0.9, "end_step": 8, "frequency": 2, "scope": scope}})
        assert recipe.pruning.pattern == "1x4"
    with pytest.raises(RecipeError, match=r"pruning.pattern.*'RxC' blocks \(e.g. 1x4\); got '1x1'"):
        recipe_from_dict(PretrainRecipe, {**base, "pruning": {"enabled": True, "pattern": "1x1", "end_step": 8,
                                                               "frequency": 2}})


def test_one_by_four_blocks_leave_the_sparse_int8_kernel_a_tenth_of_its_groups():
    """The reason for 1x4: the kernel runs every non-empty group of 4 input features. At 90% sparsity unstructured
    masks leave about 1 - 0.9^4 = 34% of the groups non-empty, 1x4 blocks exactly 10%."""
    from pofa.quant.qat import ActivationQuant
    from pofa.runtime.int8 import pack_sparse_int8

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    groups = weight.numel() // 4
    for pattern, expected in (("unstructured", (0.30, 0.38)), ("1x4", (0.10, 0.10))):
        mask = magnitude_masks({"w": weight}, 0.9, pattern=pattern)["w"]
        q = torch.where(mask, torch.randint(1, 100, weight.shape, dtype=torch.int8), torch.zeros((), dtype=torch.int8))
        packed = pack_sparse_int8(q, torch.ones(64), ActivationQuant(scale=0.1, zero_point=0, bits=8))
        share = packed.group.numel() / groups
        assert expected[0] <= share <= expected[1] + 1e-3, (pattern, share)
