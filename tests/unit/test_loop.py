import pytest
from transformers import BertConfig, BertForMaskedLM

from pofa.loop import decay_groups, lr_multiplier, plan_steps, steps_for_epochs


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


def test_lr_warmup_then_linear_decay_and_rewind():
    f = lambda s, **kw: lr_multiplier(s, max_steps=100, warmup_steps=10, **kw)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert f(50, schedule="constant") == 1.0
    # a rewind at step 50 restarts the warm-up, capped by the decay
    assert f(50, warmup_from=50) == pytest.approx(0.1)
    assert f(59, warmup_from=50) == pytest.approx(min(1.0, 41 / 90))


def test_no_weight_decay_on_biases_and_layernorm():
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    decay, no_decay = decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
