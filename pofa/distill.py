"""Knowledge-distillation losses: the student matches the teacher's softened output distribution.

Prune Once for All trains the pruned student with ``hard_weight * task_loss + soft_weight * kd_loss`` where
``kd_loss`` is Hinton et al.'s temperature-scaled KL divergence. All losses here are computed in float32 whatever
the logits' dtype (bf16 softmax over a 30k vocabulary loses most of the small probabilities the student should learn
from) and only over the selected positions (e.g. the masked tokens of MLM), which also keeps the float32 copy small.
Extractive QA distils distributions over positions instead of over a vocabulary (`span_kd_loss`). The teacher's
tensors are treated as constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "hidden_state_loss", "kd_loss", "span_kd_loss"]


def _select(name: str, tensor: Tensor, mask: Tensor | None, feature_dims: int) -> Tensor:
    """Rows of ``tensor`` (features in its last ``feature_dims`` dims) at the positions where ``mask`` is True."""
    leading = tensor.shape[: tensor.dim() - feature_dims]
    if mask is None:
        return tensor.reshape(-1, *tensor.shape[tensor.dim() - feature_dims :])
    if mask.dtype != torch.bool or mask.shape != leading:
        raise ValueError(
            f"{name}: mask must be a bool tensor of shape {tuple(leading)} (the leading dims), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return tensor[mask.to(tensor.device)]


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        shapes = f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        raise ValueError(f"student and teacher {what} differ in shape: {shapes}")
    if student.dim() < 1:
        raise ValueError(f"{what} need at least one dimension, got a scalar")


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the selected positions.

    Logits are ``[..., V]``; ``mask`` (bool, shape ``[...]``) selects the positions that count. The ``T**2`` factor
    keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015). Returns a float32 scalar; 0
    (still attached to the student's graph) when no position is selected.

    Raises:
        ValueError: if shapes differ, ``temperature <= 0``, or ``mask`` is not bool over the leading dims.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    student = _select("kd_loss", student_logits, mask, 1).float() / temperature
    teacher = _select("kd_loss", teacher_logits.detach(), mask, 1).float() / temperature
    if student.shape[0] == 0:
        return student.sum() * 0.0
    per_position = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none", log_target=True
    ).sum(dim=-1)
    return per_position.mean() * temperature**2


def span_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, valid: Tensor) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` over the positions of each example, then the mean.

    For extractive QA: start (or end) logits ``[batch, length]`` hold one distribution over the positions of each
    example, so the softmax runs over the length dimension, not over a vocabulary at each position (the authors'
    ``HFTeacherWrapper`` distils ``start_logits`` and ``end_logits`` this way and weights the two 1/2 each).
    ``valid`` (bool, the logits' shape, e.g. the attention mask) marks the real tokens: padded positions are set to
    the most negative float32 before either softmax, so they get exactly zero probability in the teacher's and the
    student's distribution and their logits change nothing (a finite fill, not -inf, so that no ``inf - inf`` makes
    a NaN, even for an example with no valid position). The mean runs over the examples with at least one valid
    position. Returns a float32 scalar; 0 (still attached to the student's graph) when no example has one.

    Raises:
        ValueError: if shapes differ, ``temperature <= 0``, or ``valid`` is not a bool tensor of the logits' shape.
    """
    _check_pair(student_logits, teacher_logits, "span logits")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if valid.dtype != torch.bool or valid.shape != student_logits.shape:
        raise ValueError(f"span_kd_loss: valid must be a bool tensor of the logits' shape "
                         f"{tuple(student_logits.shape)}, got {valid.dtype} {tuple(valid.shape)}")
    valid = valid.to(student_logits.device)
    floor = torch.finfo(torch.float32).min
    student = (student_logits.float() / temperature).masked_fill(~valid, floor)
    teacher = (teacher_logits.detach().float() / temperature).masked_fill(~valid, floor)
    log_p_student, log_p_teacher = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    per_position = torch.where(valid, log_p_teacher.exp() * (log_p_teacher - log_p_student), 0.0)
    counted = valid.any(dim=-1)
    # A sum over examples divided by their count on the device: no host sync in the training step.
    return per_position.sum(dim=-1).sum() / counted.sum().clamp(min=1) * temperature**2


def distillation_loss(
    hard_loss: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    hard_weight: float,
    soft_weight: float,
    temperature: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``hard_weight * hard_loss + soft_weight * kd_loss(...)`` and its parts for logging.

    Returns ``(total, {"loss": total, "hard_loss": ..., "kd_loss": ...})``, the parts detached float32 tensors on the
    device: nothing here waits for the device (a training step must not); a logger converts them when it logs.

    Raises:
        ValueError: if a weight is negative or both are zero, ``hard_loss`` is not a scalar, or as :func:`kd_loss`.
    """
    for name, weight in (("hard_weight", hard_weight), ("soft_weight", soft_weight)):
        if not weight >= 0:
            raise ValueError(f"{name} must be >= 0, got {weight!r}")
    if hard_loss.dim() != 0:
        raise ValueError(f"hard_loss must be a scalar, got shape {tuple(hard_loss.shape)}")
    if hard_weight == 0 and soft_weight == 0:
        raise ValueError("hard_weight and soft_weight are both 0: the loss would be constant")
    soft = kd_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
    total = hard_weight * hard_loss.float() + soft_weight * soft
    parts = {"loss": total.detach(), "hard_loss": hard_loss.detach().float(), "kd_loss": soft.detach()}
    return total, parts


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states ``[..., H]`` over the positions selected by ``mask`` (bool ``[...]``).

    Computed in float32; the mean runs over selected positions and hidden units. 0 when nothing is selected.

    Raises:
        ValueError: if shapes differ or ``mask`` is not bool over the leading dims.
    """
    _check_pair(student_hidden, teacher_hidden, "hidden states")
    student = _select("hidden_state_loss", student_hidden, mask, 1).float()
    teacher = _select("hidden_state_loss", teacher_hidden.detach(), mask, 1).float()
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return F.mse_loss(student, teacher)
