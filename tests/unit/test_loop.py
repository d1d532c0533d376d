import pytest
from transformers import BertConfig, BertForMaskedLM

from pofa.loop import (decay_groups, due, lr_multiplier, plan_steps, rewinding_lr_multiplier,
                       steps_for_epochs)


def test_step_arithmetic_with_accumulation_and_processes():
    plan = plan_steps(max_steps=100, per_device_batch_size=8, gradient_accumulation_steps=4, num_processes=2,
                      warmup_ratio=0.01)
    assert plan.global_batch_size == 64
    assert plan.micro_steps == 400
    assert plan.warmup_steps == 1
    assert plan.micro_step(0, 0) == 0 and plan.micro_step(3, 2) == 14
    assert plan.examples_seen(10) == 640
    with pytest.raises(ValueError):
        plan.micro_step(1, 4)
    assert plan_steps(max_steps=10, per_device_batch_size=1, gradient_accumulation_steps=1, num_processes=1,
                      warmup_ratio=0.5, warmup_steps=3).warmup_steps == 3


def test_paper_batch_256_as_8_gpus_x_32_or_one_cpu_with_accumulation():
    a = plan_steps(max_steps=100_000, per_device_batch_size=32, gradient_accumulation_steps=1, num_processes=8)
    b = plan_steps(max_steps=100_000, per_device_batch_size=16, gradient_accumulation_steps=16, num_processes=1)
    assert a.global_batch_size == b.global_batch_size == 256


def test_steps_for_epochs():
    assert steps_for_epochs(num_examples=1000, epochs=2, per_device_batch_size=10, gradient_accumulation_steps=2,
                            num_processes=1) == 100
    assert steps_for_epochs(num_examples=5, epochs=1, per_device_batch_size=10, gradient_accumulation_steps=1,
                            num_processes=1) == 1


def test_lr_warmup_then_linear_decay():
    f = lambda s, **kw: lr_multiplier(s, max_steps=100, warmup_steps=10, **kw)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert f(50, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="cosine"):
        f(5, schedule="cosine")


# Prune Once for All's student run (recipe bert-base-sparse90): 100k steps, warm-up 1% (1,000 steps), sparsity
# ramp 0-50k, an event every 1,000 steps. Expected values worked out by hand from the authors' formula
# (get_linear_rewinding_schedule_with_warmup, api_utils.py of IntelLabs Model-Compression-Research-Package):
# steps_without_ramp = 100000 - 50000 = 50000, slope = 50000 - 1000 = 49000.
PAPER = dict(max_steps=100_000, warmup_steps=1_000, ramp_start=0, ramp_end=50_000, rewind_every=1_000)
PAPER_CURVE = {
    0: 0.0,  # their warm-up starts at 0
    500: 0.5,
    1_000: 50_000 / 49_000,  # an event: wound back to the event itself, ~1.02x the peak
    1_500: 49_500 / 49_000,  # decays within the interval...
    1_999: 49_001 / 49_000,
    2_000: 50_000 / 49_000,  # ...and rewinds at the next event
    25_000: 50_000 / 49_000,
    49_999: 49_001 / 49_000,
    50_000: 50_000 / 49_000,  # ramp over: linear decay to 0 at the end
    80_000: 20_000 / 49_000,
    99_999: 1 / 49_000,
    100_000: 0.0,
}


@pytest.mark.parametrize("step", sorted(PAPER_CURVE))
def test_rewinding_lr_matches_the_authors_formula(step):
    assert rewinding_lr_multiplier(step, **PAPER) == pytest.approx(PAPER_CURVE[step], abs=1e-12)


def test_rewinding_lr_stays_near_the_peak_during_the_ramp():
    ramp = [rewinding_lr_multiplier(s, **PAPER) for s in range(1_000, 50_000)]
    assert min(ramp) > 0.99 and max(ramp) < 1.03
    assert sum(ramp) / len(ramp) > 1.0  # not a 0-to-peak sawtooth averaging half the peak


def test_rewinding_lr_before_a_late_ramp_decays_as_if_the_ramp_were_cut_out():
    f = lambda s: rewinding_lr_multiplier(s, max_steps=100, warmup_steps=0, ramp_start=20, ramp_end=60,
                                          rewind_every=10)
    # steps_without_ramp = 60, slope 60: before the ramp (60 - step) / 60, inside (60 - step + wound) / 60
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(50 / 60)
    assert f(20) == pytest.approx(40 / 60) and f(25) == pytest.approx(35 / 60) and f(30) == pytest.approx(40 / 60)
    assert f(60) == pytest.approx(40 / 60) and f(100) == 0.0


def test_due_runs_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]


def test_no_weight_decay_on_biases_and_layernorm():
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    decay, no_decay = decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
