"""Knowledge-distillation losses: the student matches the teacher's softened output distribution.

Prune Once for All trains the pruned student with ``hard_weight * task_loss + soft_weight * kd_loss`` where
``kd_loss`` is Hinton et al.'s temperature-scaled KL divergence. All losses here are computed in float32 whatever
the logits' dtype (bf16 softmax over a 30k vocabulary loses most of the small probabilities the student should learn
from) and only over the selected positions (e.g. the masked tokens of MLM), which also keeps the float32 copy small.
Extractive QA distils distributions over positions instead of over a vocabulary (`span_kd_loss`). The teacher's
tensors are treated as constants (detached).

Beyond the logits (ROSITA, KroneckerBERT, TinyBERT, MiniLM): `hidden_state_loss` (MSE of hidden states, through a
learned projection when the widths differ) and `attention_loss` (KL between attention distributions), paired layer by
layer by `layer_map`; `intermediate_loss` sums them over the mapped layers of a forward's `hidden_states` and
`attentions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention_loss", "distillation_loss", "hidden_state_loss", "intermediate_distillation", "intermediate_loss",
           "kd_loss", "layer_map", "span_kd_loss"]


def _weights(name: str, mask: Tensor | None, leading: torch.Size, device: torch.device) -> Tensor | None:
    """``mask`` (bool over the ``leading`` dims) as float32 weights on ``device``; None when every position counts.

    Weighted means instead of boolean indexing: indexing by a mask waits for the device to count the selected
    positions (a host sync in every step on a GPU), a multiply does not.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != leading:
        raise ValueError(
            f"{name}: mask must be a bool tensor of shape {tuple(leading)} (the leading dims), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask.to(device=device, dtype=torch.float32)


def _mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``weights`` is 1 (all when None); 0, still attached to the graph,
    when none is (no division by zero, no host sync)."""
    if weights is None:
        return values.mean() if values.numel() else values.sum() * 0.0
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


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
    weights = _weights("kd_loss", mask, student_logits.shape[:-1], student_logits.device)
    student = student_logits.float() / temperature
    teacher = teacher_logits.detach().float() / temperature
    per_position = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none", log_target=True
    ).sum(dim=-1)
    return _mean(per_position, weights) * temperature**2


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


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
                      projection: nn.Module | None = None) -> Tensor:
    """Mean squared error between hidden states ``[..., H]`` over the positions selected by ``mask`` (bool ``[...]``).

    With ``projection`` (e.g. a learned ``nn.Linear(student_width, teacher_width)``), the student's states are
    projected first, so a narrower student can match a wider teacher (TinyBERT's ``W_h``). Computed in float32; the
    mean runs over selected positions and hidden units. 0 (attached to the graph) when nothing is selected.

    Raises:
        ValueError: if the (projected) shapes differ or ``mask`` is not bool over the leading dims.
    """
    student = student_hidden
    if projection is not None:
        student = projection(student.to(next(projection.parameters()).dtype))
    teacher = teacher_hidden.detach()
    _check_pair(student, teacher, "hidden states")
    weights = _weights("hidden_state_loss", mask, student.shape[:-1], student.device)
    per_position = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return _mean(per_position, weights)


def attention_loss(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """``KL(teacher || student)`` between attention distributions ``[batch, heads, query, key]``, summed over keys,
    averaged over heads and over the query positions where ``mask`` (bool ``[batch, query]``, e.g. the attention
    mask) is True.

    Each row is a probability distribution over keys (the softmax a model returns with ``output_attentions``). When
    the head counts differ, each side's heads are averaged first (one distribution per query). Keys the teacher gives
    zero probability (padding) contribute exactly 0, whatever the student gives them. Float32; 0 when nothing is
    selected.

    Raises:
        ValueError: if the tensors are not 4-D with equal batch, query and key sizes, or ``mask`` is malformed.
    """
    if student_attention.dim() != 4 or teacher_attention.dim() != 4:
        raise ValueError(f"attention_loss: attentions must be [batch, heads, query, key], got "
                         f"{tuple(student_attention.shape)} and {tuple(teacher_attention.shape)}")
    student, teacher = student_attention.float(), teacher_attention.detach().float()
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    _check_pair(student, teacher, "attentions")
    # KL with the convention 0 * log(0 / q) = 0; the clamp keeps log finite where the student gives exactly 0.
    per_query = (torch.xlogy(teacher, teacher) - teacher * student.clamp(min=torch.finfo(torch.float32).tiny).log())
    per_query = per_query.sum(dim=-1).mean(dim=1)  # [batch, query]
    return _mean(per_query, _weights("attention_loss", mask, per_query.shape, per_query.device))


def layer_map(student_layers: int, teacher_layers: int,
              kind: Literal["identity", "uniform"] = "uniform") -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)``, 1-based transformer layers, that intermediate distillation matches.

    ``identity``: layer i with layer i (equal depths only). ``uniform``: student layer i with teacher layer
    ``i * teacher_layers / student_layers`` (TinyBERT's uniform strategy; the last layers always meet; equal depths
    give the identity). Index 0 (the embeddings' output in ``hidden_states``) is not included: `intermediate_loss`
    adds it for hidden states.

    Raises:
        ValueError: for a depth < 1, ``identity`` with unequal depths, or ``uniform`` with a teacher shallower than
            the student or a depth that it does not divide.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer_map: depths must be >= 1, got student {student_layers}, teacher {teacher_layers}")
    if kind == "identity":
        if student_layers != teacher_layers:
            raise ValueError(f"distillation.layer_map: identity needs equal depths, got student {student_layers} "
                             f"and teacher {teacher_layers} layers; use uniform")
        return [(i, i) for i in range(1, student_layers + 1)]
    if kind != "uniform":
        raise ValueError(f"distillation.layer_map: unknown kind {kind!r}; known: identity, uniform")
    if teacher_layers < student_layers or teacher_layers % student_layers:
        raise ValueError(f"distillation.layer_map: uniform needs the teacher's depth ({teacher_layers}) to be a "
                         f"multiple of the student's ({student_layers})")
    step = teacher_layers // student_layers
    return [(i, i * step) for i in range(1, student_layers + 1)]


def intermediate_loss(
    student_hidden: Sequence[Tensor] | None,
    teacher_hidden: Sequence[Tensor] | None,
    student_attentions: Sequence[Tensor] | None,
    teacher_attentions: Sequence[Tensor] | None,
    *,
    pairs: Sequence[tuple[int, int]],
    mask: Tensor | None = None,
    hidden_weight: float = 0.0,
    attention_weight: float = 0.0,
    projection: nn.Module | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``hidden_weight * mean hidden_state_loss + attention_weight * mean attention_loss`` over the layer ``pairs``.

    ``*_hidden`` are a forward's ``hidden_states`` (embeddings output first, then one per layer): the embeddings'
    outputs are matched too, then each pair. ``*_attentions`` are its ``attentions`` (one per layer). ``mask`` (bool
    ``[batch, seq]``) selects the positions (hidden states) and query rows (attentions). Each term is the mean over
    its layers, so a weight means the same at any depth. Returns ``(total, parts)``, the parts detached, as
    :func:`distillation_loss`.

    Raises:
        ValueError: for a negative weight, or a positive weight whose tensors are missing.
    """
    parts: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, weight, student, teacher in (("hidden_loss", hidden_weight, student_hidden, teacher_hidden),
                                           ("attention_loss", attention_weight, student_attentions,
                                            teacher_attentions)):
        if not weight >= 0:
            raise ValueError(f"{name.replace('_loss', '')}_weight must be >= 0, got {weight!r}")
        if weight == 0:
            continue
        if student is None or teacher is None:
            raise ValueError(f"{name}: weight {weight} but the forward returned no "
                             f"{'hidden_states' if name == 'hidden_loss' else 'attentions'}")
        if name == "hidden_loss":
            layer_pairs = [(0, 0), *pairs]
            terms = [hidden_state_loss(student[s], teacher[t], mask, projection) for s, t in layer_pairs]
        else:
            terms = [attention_loss(student[s - 1], teacher[t - 1], mask) for s, t in pairs]
        term = torch.stack(terms).mean()
        parts[name] = term.detach()
        total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError("intermediate_loss: hidden_weight and attention_weight are both 0")
    return total, parts


def intermediate_distillation(config, student: nn.Module, teacher: nn.Module | None
                              ) -> tuple[list[tuple[int, int]] | None, nn.Module | None]:
    """What a stage needs for ``distillation.hidden_weight`` / ``attention_weight`` (``config``, a
    ``pofa.recipe.DistillationConfig``): the layer pairs, and a fresh ``nn.Linear`` from the student's width to the
    teacher's when hidden states are distilled between different widths (else None). ``(None, None)`` without a
    teacher or with both weights 0. Attention distillation switches both models to eager attention (SDPA returns no
    probabilities).

    Raises:
        ValueError: naming ``distillation.layer_map`` when the depths do not fit the map.
    """
    if teacher is None or config.hidden_weight + config.attention_weight == 0:
        return None, None
    if config.attention_weight > 0:
        for model in (student, teacher):
            model.set_attn_implementation("eager")
    s, t = student.config, teacher.config
    pairs = layer_map(s.num_hidden_layers, t.num_hidden_layers, config.layer_map)
    projection = None
    if config.hidden_weight > 0 and s.hidden_size != t.hidden_size:
        projection = nn.Linear(s.hidden_size, t.hidden_size)
    return pairs, projection
