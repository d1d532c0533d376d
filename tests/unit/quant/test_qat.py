"""QAT: fake-quant arithmetic, module swap, masks through training, observers, int8 conversion."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from pofa.quant import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    QATConfig,
    convert_to_int8,
    default_qat_filter,
    freeze_observers_,
    prepare_qat_,
    qat_modules,
    qat_step_,
)
from pofa.quant.qat import (
    _ActivationQDQ,
    _activation_qparams_tensors,
    activation_qparams,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
    weight_scale,
)

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY, num_labels=3))


def random_batch(batch_size: int = 4, seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch_size,), generator=g)}


def encoder_linear_masks(model: nn.Module, sparsity: float = 0.7) -> dict[str, torch.Tensor]:
    """Magnitude masks (True = kept) for the encoder Linear weights; applies them (pruned weights are 0.0)."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".encoder.layer." in f".{name}.":
            w = module.weight.detach()
            threshold = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
            masks[f"{name}.weight"] = w.abs() > threshold
            with torch.no_grad():
                w.mul_(masks[f"{name}.weight"])  # leaves -0.0 where negatives were pruned, on purpose
    return masks


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="weight_bits"):
        QATConfig(weight_bits=9)
    with pytest.raises(ValueError, match="activation_observer_momentum"):
        QATConfig(activation_observer_momentum=1.0)
    with pytest.raises(ValueError, match="freeze_observers_after_step"):
        QATConfig(freeze_observers_after_step=-1)
    with pytest.raises(ValueError, match="bogus"):
        QATConfig.from_dict({"bogus": 1})
    assert QATConfig.from_dict(QATConfig(weight_bits=7).to_dict()) == QATConfig(weight_bits=7)


def test_zero_weights_fake_quantize_to_exact_zero_and_int8_zero():
    w = torch.randn(6, 10)
    w[:, ::3] = 0.0
    w[1, 1] = -0.0
    w[4] = 0.0  # a fully pruned row
    scale = weight_scale(w, 8, per_channel=True)
    zeros = w == 0
    assert torch.all(fake_quantize_weight(w, scale, 8)[zeros] == 0)
    assert torch.all(quantize_weight(w, scale, 8)[zeros] == 0)
    assert scale[4] > 0  # no division by zero for the empty row


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_fake_quant_error_bounded_by_half_scale(per_channel, bits):
    w = torch.randn(16, 40) * torch.linspace(0.01, 3.0, 16).reshape(-1, 1)
    scale = weight_scale(w, bits, per_channel)
    q = quantize_weight(w, scale, bits)
    assert q.dtype == torch.int8
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= qmax
    err = (fake_quantize_weight(w, scale, bits) - w).abs()
    bound = scale.reshape(-1, 1).expand_as(w) / 2
    assert torch.all(err <= bound * (1 + 1e-6))


def test_activation_fake_quant_error_bounded_inside_range_and_zero_exact():
    x = torch.randn(1000) * 2 + 0.5
    scale, zero_point = activation_qparams(x.min(), x.max(), 8)
    assert 0 <= zero_point <= 255
    err = (fake_quantize_activation(x, scale, zero_point, 8) - x).abs()
    assert float(err.max()) <= scale / 2 * (1 + 1e-5)
    assert float(fake_quantize_activation(torch.zeros(3), scale, zero_point, 8).abs().max()) == 0.0


def test_straight_through_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    module = FakeQuantLinear(linear, QATConfig())
    module.train()
    x = torch.randn(5, 8)
    module(x)  # observer sees x's range
    x_far = (x * 100).requires_grad_()  # mostly outside the observed range
    module(x_far).sum().backward()
    # Weight: identity STE, so the gradient is that of the linear map on the fake-quantized input.
    assert linear.weight.grad is not None and torch.count_nonzero(linear.weight.grad) > 0
    # Activation: clipped STE, zero gradient where the input fell outside the representable range.
    scale, zero_point = module.activation_qparams()
    levels = torch.round(x_far.detach() / scale) + zero_point
    outside = (levels > 255) | (levels < 0)
    assert outside.any()
    assert torch.all(x_far.grad[outside] == 0)
    assert torch.all(x_far.grad[~outside].abs().sum() > 0)


def test_prepare_keeps_parameter_objects_and_names():
    model = tiny_classifier()
    before = dict(model.named_parameters())
    prepare_qat_(model, QATConfig())
    after = dict(model.named_parameters())
    assert list(before) == list(after)
    assert all(before[name] is after[name] for name in before)
    swapped = qat_modules(model)
    assert len(swapped) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(".encoder.layer." in f".{name}." for name in swapped)
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)  # still selectable by type
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat_(model, QATConfig())


def test_default_filter_names():
    linear, embedding = nn.Linear(2, 2), nn.Embedding(3, 2)
    assert default_qat_filter(linear, "bert.encoder.layer.11.attention.self.query")
    assert default_qat_filter(linear, "distilbert.transformer.layer.0.ffn.lin1")
    assert not default_qat_filter(linear, "classifier")
    assert not default_qat_filter(linear, "bert.pooler.dense")
    assert not default_qat_filter(linear, "qa_outputs")
    assert default_qat_filter(embedding, "bert.embeddings.word_embeddings")


def test_masks_and_zeros_hold_through_qat_training():
    model = tiny_classifier()
    masks = encoder_linear_masks(model, sparsity=0.7)
    params = dict(model.named_parameters())
    # Gradient masking as the sparsity engineer does it: hooks on the Parameter objects, registered before QAT.
    for name, mask in masks.items():
        params[name].register_hook(lambda g, m=mask: g * m)
    config = QATConfig(freeze_observers_after_step=3)
    prepare_qat_(model, config)
    before = {name: params[name].detach().clone() for name in masks}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model.train()
    for step in range(1, 6):
        loss = model(**random_batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        qat_step_(model, step, config)
    for name, mask in masks.items():
        w = params[name].detach()
        assert torch.all(w[~mask] == 0), f"pruned weights of {name} moved during QAT"
        assert not torch.equal(w[mask], before[name][mask]), f"kept weights of {name} did not train"
    int8 = convert_to_int8(model)
    for name, mask in masks.items():
        q = int8[name.removesuffix(".weight")].weight.q
        assert torch.all(q[~mask] == 0)


def test_observers_update_in_training_until_frozen():
    model = tiny_classifier()
    config = QATConfig(freeze_observers_after_step=2)
    prepare_qat_(model, config)
    query = model.bert.encoder.layer[0].attention.self.query
    model.eval()
    with torch.no_grad():
        model(**random_batch())
    assert not bool(query.observer_initialized)  # eval mode does not observe
    model.train()
    with torch.no_grad():
        model(**random_batch(seed=1))
    first = (float(query.act_min), float(query.act_max))
    assert bool(query.observer_initialized) and first[0] < 0 < first[1]
    assert not qat_step_(model, 1, config)
    with torch.no_grad():
        model(**random_batch(seed=2, batch_size=7))
    second = (float(query.act_min), float(query.act_max))
    assert second != first
    assert qat_step_(model, 2, config)
    with torch.no_grad():
        model(**random_batch(seed=3, batch_size=9))
    assert (float(query.act_min), float(query.act_max)) == second


def test_observer_is_an_exponential_moving_average():
    module = FakeQuantLinear(nn.Linear(3, 2), QATConfig(activation_observer_momentum=0.9)).train()
    module(torch.tensor([[-1.0, 0.0, 2.0]]))
    module(torch.tensor([[-3.0, 0.0, 4.0]]))
    assert float(module.act_min) == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert float(module.act_max) == pytest.approx(0.9 * 2 + 0.1 * 4)


def test_convert_to_int8_matches_fake_quant_bitwise():
    model = tiny_classifier()
    encoder_linear_masks(model)
    prepare_qat_(model, QATConfig())
    model.train()
    with torch.no_grad():
        model(**random_batch())
    int8 = convert_to_int8(model)
    modules = qat_modules(model)
    assert set(int8) == set(modules)
    for name, quantized in int8.items():
        module = modules[name]
        expected = fake_quantize_weight(module.weight.detach(), module.weight_scale(), 8)
        assert torch.equal(quantized.weight.dequantize(), expected)
        assert quantized.weight.q.dtype == torch.int8 and quantized.weight.scale.shape == (module.out_features,)
        assert (quantized.activation.scale, quantized.activation.zero_point) == module.activation_qparams()


def test_convert_requires_observed_activations_and_a_prepared_model():
    with pytest.raises(ValueError, match="prepare_qat_"):
        convert_to_int8(tiny_classifier())
    model = prepare_qat_(tiny_classifier(), QATConfig())
    with pytest.raises(ValueError, match="seen no data"):
        convert_to_int8(model)


def test_quantized_embeddings_keep_ties_and_parameters():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**TINY))
    word = model.bert.embeddings.word_embeddings.weight
    prepare_qat_(model, QATConfig(quantize_embeddings=True))
    assert isinstance(model.bert.embeddings.word_embeddings, FakeQuantEmbedding)
    assert model.bert.embeddings.word_embeddings.weight is word
    assert model.cls.predictions.decoder.weight is word  # the MLM decoder stays tied (and float)
    model.train()
    out = model(**{k: v for k, v in random_batch().items() if k != "labels"})
    assert out.logits.shape == (4, 12, TINY["vocab_size"])
    int8 = convert_to_int8(model)
    assert int8["bert.embeddings.word_embeddings"].activation is None


def test_freeze_observers_freezes_all():
    model = prepare_qat_(tiny_classifier(), QATConfig())
    freeze_observers_(model)
    assert all(bool(m.observer_frozen) for m in model.modules() if isinstance(m, FakeQuantLinear))
    assert all(m.frozen for m in model.modules() if isinstance(m, FakeQuantLinear))


# --------------------------------------------------------------------------------------------------------------
# No host read in the training step; observer flags as Python state; the same numbers as before
# --------------------------------------------------------------------------------------------------------------

# Every way a tensor's value reaches Python; each is a device -> host sync on a GPU.
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def no_host_reads(reads: list[str]):
    """Within the block, reading a tensor's value on the host raises, and is recorded in ``reads`` (in case
    something catches the error)."""

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"Tensor.{name}: a host read of a tensor inside the QAT training step")
        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


def guard_forwards(modules, reads: list[str]) -> None:
    """Make each module's forward run under :func:`no_host_reads` (transformers' own code around it may read)."""
    for module in modules:
        def forward(*args, _forward=module.forward, **kwargs):
            with no_host_reads(reads):
                return _forward(*args, **kwargs)
        module.forward = forward


def test_the_host_read_guard_catches_reads():
    reads = []
    t = torch.ones(())
    with no_host_reads(reads):
        for read in (bool, float, int, lambda v: v.item(), lambda v: v.tolist(), lambda v: [0, 1][v.long()]):
            with pytest.raises(AssertionError, match="host read"):
                read(t)
    assert len(reads) == 6
    assert bool(t) and float(t) == 1.0  # restored


def test_fake_quant_modules_do_not_read_tensors_on_the_host_in_training():
    torch.manual_seed(0)
    linear = FakeQuantLinear(nn.Linear(8, 4), QATConfig()).train()
    embedding = FakeQuantEmbedding(nn.Embedding(10, 8), QATConfig(quantize_embeddings=True)).train()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    reads = []
    for _ in range(3):  # the very first batch (observer empty), then with an observed range, then frozen
        with no_host_reads(reads):
            x = embedding(ids)
            linear(x).sum().backward()
            frozen = qat_step_(linear, step=2, config=QATConfig(freeze_observers_after_step=2))
    assert reads == []
    assert linear.initialized and linear.frozen and frozen
    assert linear.weight.grad is not None and embedding.weight.grad is not None
    linear.eval()
    with no_host_reads(reads), torch.no_grad():
        linear(embedding(ids))  # evaluation (and the parity check) too
    assert reads == []


def test_a_qat_bert_training_step_does_not_read_tensors_on_the_host():
    config = QATConfig(freeze_observers_after_step=2, quantize_embeddings=True)
    model = prepare_qat_(tiny_classifier(), config).train()
    modules = qat_modules(model)
    assert any(isinstance(m, FakeQuantEmbedding) for m in modules.values())
    reads = []
    guard_forwards(modules.values(), reads)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(1, 4):
        loss = model(**random_batch(seed=step)).loss
        with no_host_reads(reads):
            loss.backward()  # our autograd Functions' backward runs Python
        optimizer.step()
        optimizer.zero_grad()
        with no_host_reads(reads):
            qat_step_(model, step, config)
    assert reads == []
    assert all(m.initialized and m.frozen for m in modules.values() if isinstance(m, FakeQuantLinear))


@pytest.mark.parametrize("frozen", [False, True])
def test_observer_flags_follow_the_state_dict(frozen):
    config = QATConfig(freeze_observers_after_step=1 if frozen else None)
    model = prepare_qat_(tiny_classifier(), config).train()
    with torch.no_grad():
        model(**random_batch())
    assert qat_step_(model, 1, config) == frozen
    resumed = prepare_qat_(tiny_classifier(seed=1), config).train()
    assert not any(m.initialized or m.frozen for m in qat_modules(resumed).values())
    resumed.load_state_dict(model.state_dict())
    for name, module in qat_modules(resumed).items():
        assert (module.initialized, module.frozen) == (True, frozen), name
        assert (bool(module.observer_initialized), bool(module.observer_frozen)) == (True, frozen), name
    # Resume is exact: the next step observes (EMA, or not at all when frozen) and quantizes as the original would.
    with torch.no_grad():
        torch.manual_seed(2)  # the same dropout
        expected = model(**random_batch(seed=2))
        torch.manual_seed(2)
        got = resumed(**random_batch(seed=2))
    assert torch.equal(expected.logits, got.logits)
    originals = qat_modules(model)
    for name, module in qat_modules(resumed).items():
        original = originals[name]
        assert torch.equal(module.act_min, original.act_min) and torch.equal(module.act_max, original.act_max)
    # Loading an unobserved state resets the flags too.
    resumed.load_state_dict(prepare_qat_(tiny_classifier(), config).state_dict())
    assert not any(m.initialized or m.frozen for m in qat_modules(resumed).values())


def test_accelerate_load_state_restores_the_observer_flags(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    config = QATConfig(freeze_observers_after_step=1)
    model = prepare_qat_(tiny_classifier(), config).train()
    with torch.no_grad():
        model(**random_batch())
    qat_step_(model, 1, config)
    accelerator = Accelerator(cpu=True)
    try:
        model = accelerator.prepare(model)
        accelerator.save_state(str(tmp_path / "ckpt"))
        model.load_state_dict(prepare_qat_(tiny_classifier(), config).state_dict())  # as a fresh start
        assert not any(m.initialized or m.frozen for m in qat_modules(model).values())
        accelerator.load_state(str(tmp_path / "ckpt"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert all(m.initialized and m.frozen for m in qat_modules(model).values())


def reference_activation_fake_quant(x, min_val, max_val, bits):
    """The activation fake-quant as it was computed before its scale stayed on the device (a copy of the old code):
    Python scale and zero-point, and the mask of the clipped straight-through estimator."""
    qmax = 2**bits - 1
    lo = torch.clamp(min_val.detach().float(), max=0.0)
    hi = torch.clamp(max_val.detach().float(), min=0.0)
    scale = (hi - lo) / qmax
    if not bool(torch.isfinite(scale)) or float(scale) <= 0.0:
        scale, zero_point = 1.0, 0
    else:
        zero_point = int(torch.clamp(torch.round(-lo / scale), 0, qmax))
        scale = float(scale)
    unclamped = torch.round(x / scale) + zero_point
    inside = (unclamped >= 0) & (unclamped <= qmax)
    return (torch.clamp(unclamped, 0, qmax) - zero_point) * scale, inside


def _batches(case: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(6, 8, generator=g) * scale

    def with_value(value: float) -> torch.Tensor:
        x = randn()
        x[2, 3] = value
        return x

    return {
        "mixed": [randn(2.0) + 0.5, randn(), randn(20.0)],  # the last batch is mostly clipped
        "positive": [randn().abs() + 0.1, randn()],  # zero-point 0; negatives clipped
        "negative": [-randn().abs() - 0.1, randn()],  # zero-point qmax
        "all zero": [torch.zeros(6, 8), torch.zeros(6, 8), randn()],  # min == max == 0: scale 1, zero-point 0
        "infinite": [with_value(float("inf")), randn(3.0)],  # a non-finite range: scale 1, zero-point 0
        "nan": [with_value(float("nan")), randn()],
    }[case]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "all zero", "infinite", "nan"])
def test_activation_fake_quant_matches_the_previous_host_formula(case, bits):
    torch.manual_seed(0)
    module = FakeQuantLinear(nn.Linear(8, 5), QATConfig(activation_bits=bits)).train()
    exact = dict(rtol=0, atol=0, equal_nan=True)
    for i, batch in enumerate(_batches(case)):
        if i == 2:
            freeze_observers_(module)
        x = batch.clone().requires_grad_()
        y = module(x)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
        y.backward(grad_y)
        # Reference: the old arithmetic from the observer state this forward used, then the same weight path.
        xq, inside = reference_activation_fake_quant(batch, module.act_min, module.act_max, bits)
        xq.requires_grad_()
        w = fake_quantize_weight(module.weight.detach(), module.weight_scale(), module.config.weight_bits)
        expected = F.linear(xq, w, module.bias.detach())
        expected.backward(grad_y)
        torch.testing.assert_close(y, expected, **exact)
        torch.testing.assert_close(x.grad, xq.grad * inside, **exact)  # the old backward: grad * inside
        scale, zero_point = _activation_qparams_tensors(module.act_min, module.act_max, bits)
        assert (scale.dtype, zero_point.dtype, scale.dim()) == (torch.float32, torch.float32, 0)
    module.eval()
    with torch.no_grad():
        batch = _batches(case)[0]
        xq, _ = reference_activation_fake_quant(batch, module.act_min, module.act_max, bits)
        torch.testing.assert_close(module(batch), F.linear(xq, w, module.bias), **exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_activations_are_fake_quantized_in_float32(dtype):
    x = torch.randn(64, 16) * 3
    scale, zero_point = _activation_qparams_tensors(x.min(), x.max(), 8)
    low = x.to(dtype).requires_grad_()
    y = _ActivationQDQ.apply(low, scale, zero_point, 8)
    expected, inside = reference_activation_fake_quant(low.detach().float(), x.min(), x.max(), 8)
    assert y.dtype == dtype
    assert torch.equal(y, expected.to(dtype))
    y.backward(torch.ones_like(y))
    assert torch.equal(low.grad, inside.to(dtype))
