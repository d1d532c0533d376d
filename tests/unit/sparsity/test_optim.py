import contextlib

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pofa.sparsity import (
    MaskGuard,
    MaskStore,
    MaskViolationError,
    check_masks,
    cubic_sparsity,
    is_pruning_step,
    magnitude_masks,
)

torch.set_num_threads(1)

VOCAB, BATCH, SEQ = 100, 4, 12


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertForMaskedLM(config)


def batch(generator):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}


def train(model, optimizer, steps, generator, *, accumulation=1, autocast=False, after_each_step=None):
    for _ in range(steps):
        for _ in range(accumulation):
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                loss = model(**batch(generator)).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if after_each_step is not None:
            after_each_step()


def pruned_nonzero(model, store):
    return {
        name: int(((param != 0) & ~store[name]).sum())
        for name, param in store.bind(model).items()
        if ((param != 0) & ~store[name]).any()
    }


def prune_by_magnitude(model, store, sparsity):
    weights = {name: param.detach() for name, param in store.bind(model).items()}
    return store.update(magnitude_masks(weights, sparsity, previous=store))


def setup(lr=1e-2):
    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, store, optimizer


@pytest.mark.parametrize(
    ("accumulation", "autocast"),
    [(1, False), (2, False), (1, True)],
    ids=["plain", "grad-accumulation", "autocast-bf16"],
)
def test_adamw_with_momentum_never_revives_pruned_weights(accumulation, autocast):
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    train(model, optimizer, 50, generator, accumulation=accumulation, autocast=autocast)  # momentum builds up
    assert all(state["exp_avg"].abs().sum() > 0 for state in optimizer.state.values())
    newly = prune_by_magnitude(model, store, 0.9)
    guard.enforce_(optimizer, newly)
    before = {name: param.detach().clone() for name, param in store.bind(model).items()}
    violations = []
    train(model, optimizer, 200, generator, accumulation=accumulation, autocast=autocast,
          after_each_step=lambda: violations.append(pruned_nonzero(model, store)))
    assert not any(violations), f"pruned weights revived: {next(v for v in violations if v)}"
    check_masks(model, store)
    assert store.sparsity() == pytest.approx(0.9, abs=1e-3)
    for name, param in store.bind(model).items():
        state = optimizer.state[param]
        assert not state["exp_avg"][~store[name]].any() and not state["exp_avg_sq"][~store[name]].any()
        # The kept weights did train.
        assert not torch.equal(param.detach()[store[name]], before[name][store[name]])


def test_without_guard_adamw_revives_zeroed_weights():
    """Sanity check that the test above can fail: zeroing the weights once is not enough."""
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    train(model, optimizer, 50, generator)
    prune_by_magnitude(model, store, 0.9)
    with torch.no_grad():
        for name, param in store.bind(model).items():
            param.masked_fill_(~store[name], 0)
    check_masks(model, store)
    train(model, optimizer, 1, generator)
    with pytest.raises(MaskViolationError):
        check_masks(model, store)


def test_gradient_hooks_alone_do_not_stop_momentum():
    """enforce_ must also clear Adam's moments: with hooks but stale momentum, zeros are revived."""
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    train(model, optimizer, 50, generator)
    prune_by_magnitude(model, store, 0.9)
    guard.enforce_()  # weights only, optimizer state untouched
    train(model, optimizer, 1, generator)
    assert pruned_nonzero(model, store)


def test_hooks_zero_pruned_gradients_so_clipping_ignores_them():
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    prune_by_magnitude(model, store, 0.5)
    guard.enforce_(optimizer)
    model(**batch(generator)).loss.backward()
    params = store.bind(model)
    for name, param in params.items():
        assert param.grad is not None and not param.grad[~store[name]].any()
        assert param.grad[store[name]].any()
    guard.remove()
    optimizer.zero_grad()
    model(**batch(generator)).loss.backward()
    assert any(param.grad[~store[name]].any() for name, param in params.items()), "remove() must drop the hooks"


def test_mask_updates_reach_hooks_without_rebinding():
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    prune_by_magnitude(model, store, 0.3)
    guard.enforce_(optimizer)
    prune_by_magnitude(model, store, 0.8)  # same guard, new masks
    guard.enforce_(optimizer)
    model(**batch(generator)).loss.backward()
    for name, param in store.bind(model).items():
        assert int((~store[name]).sum()) == round(0.8 * param.numel())
        assert not param.grad[~store[name]].any()


def test_newly_pruned_limits_state_zeroing_to_those_positions():
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    params = store.bind(model)
    for param in params.values():
        optimizer.state[param]["exp_avg"] = torch.ones_like(param)
        optimizer.state[param]["step"] = torch.tensor(3.0)
    name = "bert.encoder.layer.0.output.dense.weight"
    new_mask = store[name].clone()
    new_mask[0, :5] = False
    newly = store.update({name: new_mask})
    newly_only = {name: torch.zeros_like(new_mask)}
    newly_only[name][0, :2] = True  # pretend only these two are new
    guard.enforce_(optimizer, newly_only)
    state = optimizer.state[params[name]]["exp_avg"]
    assert state[0, :2].eq(0).all() and state[0, 2:].eq(1).all()
    assert params[name].detach()[0, :5].eq(0).all(), "weights are zeroed at every pruned position"
    guard.enforce_(optimizer, newly)
    assert state[0, :5].eq(0).all() and int((state == 0).sum()) == 5


def test_gradual_schedule_with_prune_():
    generator = torch.Generator().manual_seed(0)
    model, store, optimizer = setup()
    guard = MaskGuard(model, store)
    history = []
    for step in range(0, 41):
        if is_pruning_step(step, start_step=0, frequency=5, end_pruning_step=40):
            target = cubic_sparsity(step, initial=0.0, final=0.8, start_step=0, end_step=30)
            before = {name: mask.clone() for name, mask in store.items()}
            guard.prune_(target, optimizer=optimizer)
            for name, mask in store.items():
                assert not (mask & ~before[name]).any(), "a pruned weight was revived"
            history.append(store.sparsity())
            check_masks(model, store)
        train(model, optimizer, 1, generator)
    assert history == sorted(history) and history[-1] == pytest.approx(0.8, abs=1e-3)
    check_masks(model, store)


def test_sgd_with_momentum_and_weight_decay_keeps_zeros():
    generator = torch.Generator().manual_seed(0)
    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    guard = MaskGuard(model, store)
    train(model, optimizer, 10, generator)
    guard.prune_(0.9, optimizer=optimizer)
    train(model, optimizer, 20, generator)
    check_masks(model, store)


def test_after_step_rezeroes_visible_weights():
    model, store, _ = setup()
    guard = MaskGuard(model, store)
    prune_by_magnitude(model, store, 0.5)
    with torch.no_grad():
        for param in store.bind(model).values():
            param.add_(1.0)  # an optimizer that moves every weight
    guard.after_step_()
    check_masks(model, store)


def test_guard_is_a_context_manager_and_binds_strictly():
    model, store, _ = setup()
    with MaskGuard(model, store) as guard:
        assert guard.store is store
    assert not guard._handles
    bad = MaskStore({"bert.encoder.layer.9.output.dense.weight": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="layer.9"):
        MaskGuard(model, bad)


def test_deepspeed_is_never_imported_by_pofa():
    import subprocess
    import sys

    # No transformers here: it is slow to import, and the point is what pofa imports.
    code = (
        "import sys, torch\n"
        "import pofa.sparsity, pofa.distill\n"
        "m = torch.nn.Module(); m.encoder = torch.nn.Module()\n"
        "m.encoder.layer = torch.nn.ModuleList([torch.nn.Module()])\n"
        "m.encoder.layer[0].output = torch.nn.Module(); m.encoder.layer[0].output.dense = torch.nn.Linear(8, 8)\n"
        "s = pofa.sparsity.MaskStore.dense(m.named_parameters())\n"
        "g = pofa.sparsity.MaskGuard(m, s); g.prune_(0.5); pofa.sparsity.check_masks(m, s)\n"
        "assert len(s) == 1 and 'deepspeed' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def train_masking_once_per_step(model, optimizer, guard, steps, generator, *, accumulation):
    for _ in range(steps):
        for _ in range(accumulation):
            (model(**batch(generator)).loss / accumulation).backward()
        guard.mask_gradients_()  # once per optimizer step, before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("accumulation", [1, 3])
def test_masking_once_per_step_equals_the_hooks_bit_for_bit(accumulation):
    """`gradients="step"`: no hook, one in-place pass per optimizer step; masking commutes with summing."""
    results = {}
    for mode in ("hooks", "step"):
        model = tiny_bert()
        store = MaskStore.dense(model.named_parameters())
        guard = MaskGuard(model, store, gradients=mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        guard.enforce_(optimizer, prune_by_magnitude(model, store, 0.8))
        if mode == "hooks":
            train(model, optimizer, 4, torch.Generator().manual_seed(1), accumulation=accumulation)
        else:
            train_masking_once_per_step(model, optimizer, guard, 4, torch.Generator().manual_seed(1),
                                        accumulation=accumulation)
        check_masks(model, store)
        results[mode] = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert all(torch.equal(results["hooks"][name], results["step"][name]) for name in results["hooks"])


def test_step_mode_leaves_gradients_to_the_loop():
    model = tiny_bert()
    store = MaskStore.dense(model.named_parameters())
    guard = MaskGuard(model, store, gradients="step")
    prune_by_magnitude(model, store, 0.5)
    model(**batch(torch.Generator().manual_seed(0))).loss.backward()
    name, param = next(iter(store.bind(model).items()))
    assert (param.grad[~store[name]] != 0).any()  # no hook ran
    guard.mask_gradients_()
    assert (param.grad[~store[name]] == 0).all() and (param.grad[store[name]] != 0).any()
    with pytest.raises(ValueError, match="gradients"):
        MaskGuard(model, store, gradients="later")
