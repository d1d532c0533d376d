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
