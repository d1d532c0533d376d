import math

import pytest
import torch
import torch.nn.functional as F

from pofa.distill import distillation_loss, hidden_state_loss, kd_loss, span_kd_loss


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def hand_kd(student_rows, teacher_rows, temperature):
    """KL(p_teacher || p_student) * T^2, averaged over rows, with plain Python floats."""
    total = 0.0
    for student, teacher in zip(student_rows, teacher_rows):
        p_s, p_t = softmax(student, temperature), softmax(teacher, temperature)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t))
    return total / len(student_rows) * temperature**2


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 2.0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_loss_matches_hand_computation(temperature):
    loss = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(hand_kd(STUDENT, TEACHER, temperature), rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 3.0):
        assert kd_loss(logits, logits.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits, temperature=2.0, mask=torch.rand(2, 5) > 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_selects_positions_over_leading_dims():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 7, generator=generator)
    teacher = torch.randn(2, 3, 7, generator=generator)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loss = kd_loss(student, teacher, temperature=2.0, mask=mask)
    expected = hand_kd(student[mask].tolist(), teacher[mask].tolist(), 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Unselected positions do not matter at all.
    changed = student.clone()
    changed[~mask] = 100.0
    assert kd_loss(changed, teacher, temperature=2.0, mask=mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_empty_mask_gives_zero_with_a_graph():
    student = torch.randn(2, 3, 5, requires_grad=True)
    loss = kd_loss(student, torch.randn(2, 3, 5), temperature=2.0, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and not student.grad.any()


def test_low_precision_inputs_are_computed_in_float32():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, 50, generator=generator).to(torch.bfloat16)
    teacher = torch.randn(4, 50, generator=generator).to(torch.bfloat16)
    loss = kd_loss(student, teacher, temperature=2.0)
    assert loss.dtype == torch.float32
    reference = kd_loss(student.float(), teacher.float(), temperature=2.0)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_gradient_flows_to_student_only():
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6, requires_grad=True)
    kd_loss(student, teacher, temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_matches_torch_reference_for_mlm_shaped_logits():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 30, generator=generator)
    teacher = torch.randn(2, 4, 30, generator=generator)
    temperature = 3.0
    reference = F.kl_div(
        F.log_softmax(student.reshape(-1, 30) / temperature, -1),
        F.softmax(teacher.reshape(-1, 30) / temperature, -1),
        reduction="batchmean",
    ) * temperature**2
    assert kd_loss(student, teacher, temperature=temperature).item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(teacher=torch.zeros(2, 4)), "shape"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(2, 3)), "bool"),
    ],
)
def test_kd_loss_validation(kwargs, match):
    arguments = dict(student=torch.zeros(2, 3, 5), teacher=torch.zeros(2, 3, 5), temperature=1.0)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kd_loss(arguments.pop("student"), arguments.pop("teacher"), **arguments)


def test_distillation_loss_combines_and_reports_parts():
    student = torch.tensor(STUDENT, requires_grad=True)
    hard = torch.tensor(1.25)
    total, parts = distillation_loss(
        hard, student, torch.tensor(TEACHER), hard_weight=0.5, soft_weight=2.0, temperature=2.0
    )
    soft = hand_kd(STUDENT, TEACHER, 2.0)
    assert total.item() == pytest.approx(0.5 * 1.25 + 2.0 * soft, rel=1e-5)
    assert set(parts) == {"loss", "hard_loss", "kd_loss"}
    # tensors on the device, detached: reading them is the logger's business, never the training step's
    assert all(torch.is_tensor(value) and not value.requires_grad for value in parts.values())
    assert parts["kd_loss"].item() == pytest.approx(soft, rel=1e-5) and parts["hard_loss"].item() == 1.25
    assert parts["loss"].item() == pytest.approx(total.item())
    total.backward()
    assert student.grad is not None


@pytest.mark.parametrize(
    ("weights", "match"),
    [((-1.0, 1.0), "hard_weight"), ((1.0, -0.5), "soft_weight"), ((0.0, 0.0), "both")],
)
def test_distillation_loss_validation(weights, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.tensor(1.0), torch.zeros(2, 3), torch.zeros(2, 3),
                          hard_weight=weights[0], soft_weight=weights[1], temperature=1.0)
    with pytest.raises(ValueError, match="scalar"):
        distillation_loss(
            torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), hard_weight=1.0, soft_weight=1.0, temperature=1.0
        )


def test_hidden_state_loss():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, 8, generator=generator)
    teacher = torch.randn(2, 3, 8, generator=generator)
    assert hidden_state_loss(student, student.clone()).item() == 0.0
    expected = ((student - teacher) ** 2).mean().item()
    assert hidden_state_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[True, False, False], [False, True, True]])
    expected = ((student[mask] - teacher[mask]) ** 2).mean().item()
    assert hidden_state_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    assert hidden_state_loss(student.half(), teacher.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        hidden_state_loss(student, teacher[:, :2])


# --- span_kd_loss: extractive QA, a distribution over the positions of each example --------------------------------

SPAN_STUDENT = [[1.0, 2.0, 0.5, 9.0], [0.0, -1.0, 3.0, 1.5]]
SPAN_TEACHER = [[2.0, 0.0, 1.0, -7.0], [0.5, 0.5, 2.0, 1.0]]
SPAN_VALID = [[True, True, True, False], [True, True, True, True]]  # example 0 has one padded position


def test_span_kd_loss_matches_hand_computation_over_valid_positions():
    valid = torch.tensor(SPAN_VALID)
    loss = span_kd_loss(torch.tensor(SPAN_STUDENT), torch.tensor(SPAN_TEACHER), temperature=2.0, valid=valid)
    # By hand: drop the padded position, then one softmax over the remaining positions of each example.
    students = [[v for v, ok in zip(row, oks) if ok] for row, oks in zip(SPAN_STUDENT, SPAN_VALID)]
    teachers = [[v for v, ok in zip(row, oks) if ok] for row, oks in zip(SPAN_TEACHER, SPAN_VALID)]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(hand_kd(students, teachers, 2.0), rel=1e-5)


def test_span_kd_loss_ignores_logits_at_padded_positions():
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(3, 10, generator=generator), torch.randn(3, 10, generator=generator)
    valid = torch.arange(10) < torch.tensor([[10], [6], [2]])  # padded tails of 0, 4 and 8 positions
    loss = span_kd_loss(student, teacher, temperature=2.0, valid=valid)
    for fill in (1e4, -1e4, float("inf"), float("nan")):
        s, t = student.clone(), teacher.clone()
        s[~valid], t[~valid] = fill, -fill
        assert span_kd_loss(s, t, temperature=2.0, valid=valid).item() == pytest.approx(loss.item(), rel=1e-6)


def test_span_kd_loss_is_zero_for_identical_logits_and_bf16_is_float32():
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(6))
    valid = torch.arange(12) < torch.tensor([[12], [7], [1], [3]])
    assert span_kd_loss(logits, logits.clone(), temperature=2.0, valid=valid).item() == pytest.approx(0.0, abs=1e-6)
    low = span_kd_loss(logits.bfloat16(), logits.flip(0).bfloat16(), temperature=2.0, valid=valid)
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_span_kd_loss_gradient_is_finite_and_zero_at_padding():
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(3, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 8, generator=generator, requires_grad=True)
    valid = torch.arange(8) < torch.tensor([[8], [3], [0]])  # the last example is entirely padding
    loss = span_kd_loss(student, teacher, temperature=2.0, valid=valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert not student.grad[~valid].any() and student.grad[valid].abs().sum() > 0
    assert teacher.grad is None
    # The empty example is not counted in the mean: same loss as the two others alone.
    alone = span_kd_loss(student[:2], teacher[:2], temperature=2.0, valid=valid[:2])
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    nothing = span_kd_loss(student, teacher, temperature=2.0, valid=torch.zeros_like(valid))
    assert nothing.item() == 0.0 and nothing.requires_grad


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(temperature=0.0), "temperature"),
    (dict(teacher=torch.zeros(2, 4)), "shape"),
    (dict(valid=torch.ones(2, 5)), "bool"),
    (dict(valid=torch.ones(2, dtype=torch.bool)), "valid"),
])
def test_span_kd_loss_validation(kwargs, match):
    arguments = dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 5), temperature=1.0,
                     valid=torch.ones(2, 5, dtype=torch.bool))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        span_kd_loss(arguments.pop("student"), arguments.pop("teacher"), **arguments)


# ---------------------------------------------------------------------------------------------------------------------
# Intermediate layers: hidden states, attentions, layer maps
# ---------------------------------------------------------------------------------------------------------------------


def test_hidden_state_loss_through_a_projection_by_hand():
    from torch import nn

    from pofa.distill import hidden_state_loss

    student = torch.tensor([[[1.0, 2.0]]])  # [batch 1, seq 1, width 2]
    teacher = torch.tensor([[[1.0, 0.0, 4.0]]])  # width 3
    projection = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # -> [1, 2, 3]
    # squared errors 0, 4, 1 over 3 units
    assert hidden_state_loss(student, teacher, projection=projection).item() == pytest.approx(5 / 3)
    loss = hidden_state_loss(student, teacher, projection=projection)
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden states differ in shape"):
        hidden_state_loss(student, teacher)


def test_attention_loss_by_hand_with_padding_and_masked_queries():
    from pofa.distill import attention_loss

    # one example, one head, 2 queries, 3 keys; key 2 is padding (teacher gives it 0)
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]]])
    student = torch.tensor([[[[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]]]])
    kl_row0 = 0.5 * math.log(0.5 / 0.25) * 2  # the padding key adds nothing although the student puts 0.5 there
    kl_row1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert attention_loss(student, teacher).item() == pytest.approx((kl_row0 + kl_row1) / 2, rel=1e-6)
    only_first = torch.tensor([[True, False]])
    assert attention_loss(student, teacher, only_first).item() == pytest.approx(kl_row0, rel=1e-6)
    assert attention_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    none = torch.zeros(1, 2, dtype=torch.bool)
    assert attention_loss(student.requires_grad_(), teacher, none).item() == 0.0


def test_attention_loss_averages_heads_when_their_counts_differ():
    from pofa.distill import attention_loss

    torch.manual_seed(0)
    teacher = torch.rand(2, 4, 3, 3).softmax(-1)
    student = torch.rand(2, 2, 3, 3).softmax(-1)
    expected = attention_loss(student.mean(1, keepdim=True), teacher.mean(1, keepdim=True))
    assert attention_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[batch, heads, query, key\]"):
        attention_loss(student[0], teacher)


@pytest.mark.parametrize("student,teacher,kind,expected", [
    (4, 4, "identity", [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (4, 4, "uniform", [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (3, 12, "uniform", [(1, 4), (2, 8), (3, 12)]),
    (6, 12, "uniform", [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]),
])
def test_layer_map(student, teacher, kind, expected):
    from pofa.distill import layer_map

    assert layer_map(student, teacher, kind) == expected


@pytest.mark.parametrize("student,teacher,kind,message", [
    (2, 4, "identity", "identity needs equal depths"),
    (4, 6, "uniform", "multiple of"),
    (4, 2, "uniform", "multiple of"),
    (0, 2, "uniform", ">= 1"),
])
def test_layer_map_refuses(student, teacher, kind, message):
    from pofa.distill import layer_map

    with pytest.raises(ValueError, match=message):
        layer_map(student, teacher, kind)


def test_intermediate_loss_for_a_shallower_narrower_student():
    """A 2-layer, 16-wide student against a 4-layer, 32-wide teacher: the uniform map pairs student layer 1 with
    teacher layer 2 and 2 with 4, hidden states go through a learned projection, attentions are compared per query."""
    from torch import nn
    from transformers import BertConfig, BertModel

    from pofa.distill import attention_loss, hidden_state_loss, intermediate_loss, layer_map

    torch.manual_seed(0)
    common = dict(vocab_size=50, intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    student = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, **common))
    teacher = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, **common)).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    projection = nn.Linear(16, 32)
    pairs = layer_map(2, 4)
    valid = mask.bool()
    total, parts = intermediate_loss(s.hidden_states, t.hidden_states, s.attentions, t.attentions, pairs=pairs,
                                     mask=valid, hidden_weight=2.0, attention_weight=0.5, projection=projection)
    hidden = torch.stack([hidden_state_loss(s.hidden_states[a], t.hidden_states[b], valid, projection)
                          for a, b in [(0, 0), (1, 2), (2, 4)]]).mean()
    attention = torch.stack([attention_loss(s.attentions[0], t.attentions[1], valid),
                             attention_loss(s.attentions[1], t.attentions[3], valid)]).mean()
    assert total.item() == pytest.approx(2.0 * hidden.item() + 0.5 * attention.item(), rel=1e-6)
    assert parts["hidden_loss"].item() == pytest.approx(hidden.item(), rel=1e-6)
    total.backward()
    assert student.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="both 0"):
        intermediate_loss(s.hidden_states, t.hidden_states, None, None, pairs=pairs)
    with pytest.raises(ValueError, match="no attentions"):
        intermediate_loss(s.hidden_states, t.hidden_states, None, None, pairs=pairs, attention_weight=1.0)
