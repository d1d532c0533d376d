"""When to prune and how much: the cubic gradual-magnitude-pruning schedule of Zhu & Gupta (2017).

Steps are *completed optimizer steps* everywhere in this module (never micro-steps, never epochs): the training loop
passes the number of optimizer updates applied so far. The Prune-Once-for-All recipe ramps sparsity from 0 to the
target over steps 0-50k and recomputes the masks every 1000 steps until step 80k, so the pruning window
(``end_pruning_step``) may extend beyond the end of the ramp (``end_step``): after the ramp the target stays at
``final`` while the masks keep being refreshed at that sparsity.
"""

from __future__ import annotations

__all__ = ["cubic_sparsity", "is_pruning_step", "require_int"]


def require_int(name: str, value: object, *, minimum: int) -> int:
    """`value`, if it is an int (not a bool) of at least `minimum`; else ValueError naming `name` and the value (the
    step arguments of pofa's schedules)."""
    # bool is an int subclass; a True step is always a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _require_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def cubic_sparsity(step: int, *, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Target sparsity after ``step`` completed optimizer steps.

    Returns ``initial`` for ``step <= start_step``, ``final`` for ``step >= end_step`` and in between
    ``final + (initial - final) * (1 - (step - start_step) / (end_step - start_step)) ** 3``, so sparsity rises
    fast while the network has many redundant weights and slowly as it approaches ``final``.

    Raises:
        ValueError: naming the argument, if a step is not a non-negative int, a sparsity lies outside [0, 1],
            or ``end_step <= start_step``.
    """
    require_int("step", step, minimum=0)
    initial = _require_fraction("initial", initial)
    final = _require_fraction("final", final)
    require_int("start_step", start_step, minimum=0)
    require_int("end_step", end_step, minimum=0)
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")
    if step <= start_step:
        return initial
    if step >= end_step:
        return final
    remaining = 1.0 - (step - start_step) / (end_step - start_step)
    return final + (initial - final) * remaining**3


def is_pruning_step(step: int, *, start_step: int, frequency: int, end_pruning_step: int) -> bool:
    """Whether the masks are recomputed after ``step`` completed optimizer steps.

    True at ``start_step, start_step + frequency, start_step + 2 * frequency, ...`` as long as
    ``step <= end_pruning_step``; False everywhere else.

    Raises:
        ValueError: naming the argument, if a step is not a non-negative int, ``frequency < 1``, or
            ``end_pruning_step < start_step``.
    """
    require_int("step", step, minimum=0)
    require_int("start_step", start_step, minimum=0)
    require_int("frequency", frequency, minimum=1)
    require_int("end_pruning_step", end_pruning_step, minimum=0)
    if end_pruning_step < start_step:
        raise ValueError(f"end_pruning_step ({end_pruning_step}) must be >= start_step ({start_step})")
    if step < start_step or step > end_pruning_step:
        return False
    return (step - start_step) % frequency == 0
