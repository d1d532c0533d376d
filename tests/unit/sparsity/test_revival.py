"""Pruned weights that come back: PrunedValues, magnitude_masks(revive=...) and MaskGuard.prune_(revive=...).

The reference rule is the Prune-Once-for-All authors' code (IntelLabs Model-Compression-Research-Package,
``UnstructuredMagnitudePruningMethod._compute_mask`` with ``calc_pruning_threshold``): the weight is ``original *
mask`` and every event sets ``mask = |original| > kthvalue(|original|, int(s * n))`` over all positions.
"""

import pytest
import torch
from torch import nn

from pofa.sparsity import (
    MaskFileError,
    MaskGuard,
    MaskStore,
    PrunedValues,
    check_masks,
    cubic_sparsity,
    is_pruning_step,
    magnitude_masks,
)

torch.set_num_threads(1)

NAME = "layer.weight"


class OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def guarded(weight, dtype=torch.float32):
    model = OneLinear(weight).to(dtype)
    store = MaskStore({NAME: torch.ones(weight.shape, dtype=torch.bool)})
    return model, store, MaskGuard(model, store), PrunedValues.zeros(store)


# The scenario of the first tests: |w| = 0.1 ... 0.8, pruned at 50%, then training shrinks the kept weights.
START = torch.tensor([[0.8, -0.1, 0.5, 0.2], [-0.3, 0.7, 0.4, -0.6]])
FIRST_PRUNED = torch.tensor([[False, True, False, True], [True, False, True, False]])
# Kept weights after "training": 0.35, -0.05, 0.7, -0.25. Pruned ones still hold -0.1, 0.2, -0.3, 0.4.
SHRUNK = torch.tensor([[0.35, 0.0, -0.05, 0.0], [0.0, 0.7, 0.0, -0.25]])


def set_weight(model, value):
    with torch.no_grad():
        model.layer.weight.copy_(value)


# --- (a) a pruned weight returns exactly when the rule says so -----------------------------------------------------


def test_pruned_weights_return_with_their_stored_values_when_kept_ones_shrink_below_them():
    model, store, guard, pruned_values = guarded(START)
    first = guard.prune_(0.5, revive=pruned_values)
    assert torch.equal(first[NAME], FIRST_PRUNED) and first.num_revived() == 0
    assert torch.equal(pruned_values.current_()[NAME], torch.where(FIRST_PRUNED, START, 0))

    set_weight(model, SHRUNK)
    # Magnitudes now: kept 0.05 0.25 0.35 0.7, pruned 0.1 0.2 0.3 0.4; the 4 smallest are 0.05 0.1 0.2 0.25.
    changes = guard.prune_(0.5, revive=pruned_values)
    revived = torch.tensor([[False, False, False, False], [True, False, True, False]])
    newly_pruned = torch.tensor([[False, False, True, False], [False, False, False, True]])
    assert torch.equal(changes.revived[NAME], revived) and torch.equal(changes[NAME], newly_pruned)
    expected = torch.tensor([[0.35, 0.0, 0.0, 0.0], [-0.3, 0.7, 0.4, 0.0]])
    assert torch.equal(model.layer.weight.detach(), expected), "revived weights come back with their stored values"
    assert int((~store[NAME]).sum()) == 4 and int((model.layer.weight == 0).sum()) == 4
    # The shadow forgot the revived values and holds the newly pruned ones.
    stored = torch.tensor([[0.0, -0.1, -0.05, 0.2], [0.0, 0.0, 0.0, -0.25]])
    assert torch.equal(pruned_values.current_()[NAME], stored)
    check_masks(model, store)


def test_weight_decay_shrinks_stored_values_by_exactly_the_product_and_flips_a_revival():
    lr, weight_decay, steps = 0.5, 0.1, 4
    model, store, guard, pruned_values = guarded(START)
    guard.prune_(0.5, revive=pruned_values)
    decay = 1.0
    for _ in range(steps):
        pruned_values.step_(lr, weight_decay)
        decay *= 1 - lr * weight_decay
    assert pruned_values.decay == decay == pytest.approx(0.95**4)
    set_weight(model, SHRUNK)
    # Decayed by 0.8145, the pruned ones hold 0.081 0.163 0.244 0.326. The pruned -0.3 (now 0.244) falls below the
    # kept -0.25, so it stays pruned and -0.25 stays kept (without decay they swapped, previous test); 0.4 (now
    # 0.326) still comes back.
    changes = guard.prune_(0.5, revive=pruned_values)
    revived = torch.tensor([[False, False, False, False], [False, False, True, False]])
    assert torch.equal(changes.revived[NAME], revived)
    assert torch.equal(changes[NAME], torch.tensor([[False, False, True, False], [False, False, False, False]]))
    assert model.layer.weight[1, 2].item() == (torch.tensor(0.4) * decay).item()
    assert int((~store[NAME]).sum()) == 4
    held = pruned_values.current_()[NAME]
    assert held[1, 0].item() == (torch.tensor(-0.3) * decay).item(), "still pruned: decayed by exactly the product"
    assert pruned_values.decay == 1.0, "the decay was folded into the stored values at the event"


def test_revived_positions_restart_with_zero_adam_moments_and_train_again():
    model, store, guard, pruned_values = guarded(START)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    guard.prune_(0.5, optimizer=optimizer, revive=pruned_values)
    set_weight(model, torch.where(store[NAME], SHRUNK, 0))
    changes = guard.prune_(0.5, optimizer=optimizer, revive=pruned_values)
    state = optimizer.state[model.layer.weight]
    touched = changes.touched()[NAME]
    assert changes.num_revived() == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][touched].eq(0).all() and state[key][~store[NAME]].eq(0).all()
    before = model.layer.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    assert (model.layer.weight.detach() != before)[changes.revived[NAME]].all(), "revived weights train again"
    check_masks(model, store)


def test_bf16_weights_are_stored_in_float32_and_come_back_exactly():
    model, store, guard, pruned_values = guarded(START, dtype=torch.bfloat16)
    guard.prune_(0.5, revive=pruned_values)
    held = pruned_values.current_()[NAME]
    assert held.dtype == torch.float32
    assert torch.equal(held, torch.where(FIRST_PRUNED, START.to(torch.bfloat16).float(), 0))
    set_weight(model, SHRUNK)
    changes = guard.prune_(0.5, revive=pruned_values)
    at = changes.revived[NAME]
    assert torch.equal(model.layer.weight.detach()[at], START.to(torch.bfloat16)[at])


def test_sparsity_below_the_previous_one_revives_the_largest_pruned_weights():
    model, store, guard, pruned_values = guarded(START)
    guard.prune_(0.75, revive=pruned_values)
    changes = guard.prune_(0.25, revive=pruned_values)
    assert int((~store[NAME]).sum()) == 2 and changes.num_revived() == 4
    assert torch.equal(model.layer.weight.detach(), torch.where(START.abs() > 0.2, START, 0))


# --- (b) the authors' rule, re-implemented, over a random run ------------------------------------------------------


def their_mask(original: torch.Tensor, sparsity: float) -> torch.Tensor:
    """calc_pruning_threshold + _compute_mask: |original| > the int(s * n)-th smallest |original|."""
    magnitude = original.abs()
    k = int(sparsity * magnitude.numel())
    threshold = magnitude.flatten().kthvalue(k).values if k > 0 else magnitude.min() - 1
    return magnitude > threshold


def sgd_with_decoupled_decay(tensor, grad, lr, weight_decay):
    # What AdamW does to the weight through weight decay, with a plain gradient step in place of Adam's.
    tensor.mul_(1 - lr * weight_decay)
    tensor.sub_(lr * grad)


def run_against_reference(shapes, scope, steps=60, seed=0):
    """Train reparametrised originals (their code) and guarded zero-pruned weights (pofa) through the same random
    updates and cubic events; return per event (their masks, pofa's masks, originals, pofa's hidden originals)."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.weight" for i in range(len(shapes))]
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(cols, rows, bias=False) for rows, cols in shapes)
    for layer in model.layers:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
    params = {name: layer.weight for name, layer in zip(names, model.layers)}
    originals = {name: param.detach().clone() for name, param in params.items()}
    their = {name: torch.ones_like(param, dtype=torch.bool) for name, param in params.items()}
    store = MaskStore({name: torch.ones_like(param, dtype=torch.bool) for name, param in params.items()})
    guard = MaskGuard(model, store)
    pruned_values = PrunedValues.zeros(store)
    total = sum(p.numel() for p in params.values())
    events = []
    for step in range(steps + 1):
        if is_pruning_step(step, start_step=0, frequency=5, end_pruning_step=50):
            target = cubic_sparsity(step, initial=0.0, final=0.8, start_step=0, end_step=30)
            if scope == "layer":
                their = {name: their_mask(originals[name], target) for name in names}
                k = int(target * params[names[0]].numel())
                sparsity = k / params[names[0]].numel()  # same count as their int(): pofa rounds s * n
            else:  # their group rule, with an exact threshold over the concatenation instead of a histogram
                flat = torch.cat([originals[name].flatten() for name in names])
                cut = their_mask(flat, target)
                sizes = [originals[name].numel() for name in names]
                their = {n: c.reshape(originals[n].shape) for n, c in zip(names, cut.split(sizes))}
                sparsity = int(target * total) / total
            guard.prune_(sparsity, scope=scope, revive=pruned_values)
            held = pruned_values.state_dict()["values"]  # read without folding, not to change the rounding
            hidden = {n: torch.where(store[n], params[n].detach(), held[n]) for n in names}
            events.append(({n: their[n].clone() for n in names}, {n: store[n].clone() for n in names},
                           {n: originals[n].clone() for n in names}, hidden))
        if step == steps:
            break
        lr, weight_decay = 0.05 * (1 - step / 80), 0.1
        for name in names:
            grad = torch.randn(originals[name].shape, generator=generator) * 0.1
            sgd_with_decoupled_decay(originals[name], grad * their[name], lr, weight_decay)
            with torch.no_grad():  # MaskGuard's gradient hook would give exactly this masked gradient
                sgd_with_decoupled_decay(params[name], torch.where(store[name], grad, 0), lr, weight_decay)
        pruned_values.step_(lr, weight_decay)
    check_masks(model, store)
    return events


@pytest.mark.parametrize(("shapes", "scope"), [([(24, 40)], "layer"), ([(7, 13)], "layer"),
                                               ([(24, 40), (16, 8), (5, 31)], "global")],
                         ids=["layer-960", "layer-91", "global-3-tensors"])
def test_masks_match_the_authors_reparametrised_rule_at_every_event(shapes, scope):
    events = run_against_reference(shapes, scope)
    revivals = 0
    previous = None
    for index, (their, ours, originals, hidden) in enumerate(events):
        for name in their:
            assert torch.equal(ours[name], their[name]), f"event {index}: masks differ for {name}"
            # pofa's weight where kept, stored value where pruned, is their original (up to float rounding of the
            # decay product, applied once per event instead of once per step).
            torch.testing.assert_close(hidden[name], originals[name], rtol=1e-5, atol=1e-7)
            if previous is not None:
                revivals += int((ours[name] & ~previous[name]).sum())
        previous = ours
    assert revivals > 0, "the run must exercise revival"


# --- (c) the default rule is unchanged -----------------------------------------------------------------------------


def test_without_revive_pruned_weights_stay_pruned_as_before():
    model, store, guard, _ = guarded(START)
    guard.prune_(0.5)
    set_weight(model, SHRUNK)
    changes = guard.prune_(0.5)
    assert changes.num_revived() == 0 and changes.num_pruned() == 0
    assert torch.equal(store[NAME], ~FIRST_PRUNED)
    weights = {NAME: model.layer.weight.detach()}
    assert torch.equal(magnitude_masks(weights, 0.75, previous=store)[NAME],
                       magnitude_masks(weights, 0.75, previous=store, revive=None)[NAME])


def test_update_reports_revived_positions_and_stays_a_dict_of_newly_pruned():
    store = MaskStore({"w": torch.tensor([True, True, False, False])})
    changes = store.update({"w": torch.tensor([False, True, True, False])})
    assert isinstance(changes, dict) and set(changes) == {"w"}
    assert changes["w"].tolist() == [True, False, False, False]
    assert changes.revived["w"].tolist() == [False, False, True, False]
    assert changes.touched()["w"].tolist() == [True, False, True, False]
    assert changes.num_pruned() == 1 and changes.num_revived() == 1


def test_revive_needs_previous_and_matching_values():
    weights = {"w": torch.randn(3, 4)}
    with pytest.raises(ValueError, match="revive needs previous"):
        magnitude_masks(weights, 0.5, revive={"w": torch.zeros(3, 4)})
    previous = {"w": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="revive has no values"):
        magnitude_masks(weights, 0.5, previous=previous, revive={})
    with pytest.raises(ValueError, match=r"revive\['w'\] must be"):
        magnitude_masks(weights, 0.5, previous=previous, revive={"w": torch.zeros(4, 3)})


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_revive_counts_are_exact_and_ties_break_by_position(scope):
    weights = {"a": torch.tensor([0.0, 0.5, 0.0, 0.9]), "b": torch.tensor([0.2, 0.0, 0.7, 0.0])}
    previous = {"a": torch.tensor([True, True, False, True]), "b": torch.tensor([True, False, True, False])}
    revive = {"a": torch.tensor([0.0, 0.0, 0.5, 0.0]), "b": torch.tensor([0.0, 0.3, 0.0, 0.1])}
    masks = magnitude_masks(weights, 0.5, scope=scope, previous=previous, revive=revive)
    # Scores a: 0, .5, .5, .9; b: .2, .3, .7, .1. Layer: a drops 0 and the first .5; b drops .1 and .2.
    # Global (names sorted, 4 zeros): 0, .1, .2, .3.
    if scope == "layer":
        assert masks["a"].tolist() == [False, False, True, True] and masks["b"].tolist() == [False, True, True, False]
    else:
        assert masks["a"].tolist() == [False, True, True, True] and masks["b"].tolist() == [False, False, True, False]


def test_step_rejects_impossible_factors():
    values = PrunedValues({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="1 - lr \\* weight_decay"):
        values.step_(2.0, 1.0)
    with pytest.raises(ValueError, match="1 - lr \\* weight_decay"):
        values.step_(-0.1, 0.1)
    values.step_(1e-3, 0.0)
    assert values.decay == 1.0
    with pytest.raises(ValueError, match="float32"):
        PrunedValues({"w": torch.zeros(2, dtype=torch.bfloat16)})


# --- (d) saving and loading ----------------------------------------------------------------------------------------


def half_pruned_values():
    generator = torch.Generator().manual_seed(3)
    values = PrunedValues({"a": torch.randn(5, 7, generator=generator), "b": torch.randn(3, generator=generator)})
    for lr in (0.1, 0.07, 0.03):
        values.step_(lr, 0.01)
    return values


def assert_same(left: PrunedValues, right: PrunedValues):
    assert left.names() == right.names() and left.decay == right.decay
    for name in left.names():
        assert torch.equal(left.state_dict()["values"][name], right.state_dict()["values"][name])


def test_save_load_round_trip_is_bitwise_with_the_pending_decay(tmp_path):
    values = half_pruned_values()
    values.save(tmp_path / "pruned_values.safetensors")
    loaded = PrunedValues.load(tmp_path / "pruned_values.safetensors")
    assert_same(values, loaded)
    assert loaded.decay == (1 - 0.1 * 0.01) * (1 - 0.07 * 0.01) * (1 - 0.03 * 0.01)
    into = PrunedValues({"a": torch.zeros(5, 7), "b": torch.zeros(3)})
    into.load_state_dict(loaded.state_dict())
    assert_same(values, into)


def test_state_dict_survives_torch_save(tmp_path):
    values = half_pruned_values()
    torch.save(values.state_dict(), tmp_path / "state.pt")
    into = PrunedValues({"a": torch.zeros(5, 7), "b": torch.zeros(3)})
    into.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert_same(values, into)


def test_load_rejects_other_files_and_mismatched_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="pruned-values file not found"):
        PrunedValues.load(tmp_path / "missing.safetensors")
    MaskStore({"a": torch.ones(3, dtype=torch.bool)}).save(tmp_path / "masks.safetensors")
    with pytest.raises(MaskFileError, match="format"):
        PrunedValues.load(tmp_path / "masks.safetensors")
    with pytest.raises(MaskFileError, match="do not match"):
        PrunedValues({"c": torch.zeros(3)}).load_state_dict(half_pruned_values().state_dict())
    with pytest.raises(MaskFileError, match="not a pofa pruned-values state dict"):
        PrunedValues({"c": torch.zeros(3)}).load_state_dict({"values": {}})


def test_resuming_from_saved_values_continues_bit_for_bit(tmp_path):
    def run(stop_at=None, resume_from=None):
        generator = torch.Generator().manual_seed(7)
        model, store, guard, pruned_values = guarded(torch.randn(12, 10, generator=generator) * 0.1)
        start = 0
        if resume_from is not None:
            set_weight(model, torch.load(resume_from / "weight.pt"))
            store.load_state_dict(MaskStore.load(resume_from / "masks.safetensors").state_dict())
            pruned_values.load_state_dict(PrunedValues.load(resume_from / "pruned_values.safetensors").state_dict())
            guard.enforce_()
            start, rng_state = torch.load(resume_from / "rng.pt")
            generator.set_state(rng_state)
        for step in range(start, 40):
            if step == stop_at:
                torch.save(model.layer.weight.detach().clone(), tmp_path / "weight.pt")
                store.save(tmp_path / "masks.safetensors")
                pruned_values.save(tmp_path / "pruned_values.safetensors")
                torch.save((step, generator.get_state()), tmp_path / "rng.pt")
                return None
            if step % 4 == 0:
                guard.prune_(cubic_sparsity(step, initial=0.0, final=0.7, start_step=0, end_step=24),
                             revive=pruned_values)
            lr = 0.05 * (1 - step / 50)
            with torch.no_grad():
                grad = torch.randn(model.layer.weight.shape, generator=generator) * 0.1
                sgd_with_decoupled_decay(model.layer.weight, torch.where(store[NAME], grad, 0), lr, 0.1)
            pruned_values.step_(lr, 0.1)
        return model.layer.weight.detach().clone(), store[NAME].clone(), pruned_values

    weight, mask, values = run()
    run(stop_at=18)  # mid-way between events, with a pending decay
    weight_resumed, mask_resumed, values_resumed = run(resume_from=tmp_path)
    assert torch.equal(weight, weight_resumed) and torch.equal(mask, mask_resumed)
    assert_same(values, values_resumed)
