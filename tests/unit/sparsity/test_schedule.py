import pytest

from pofa.sparsity.schedule import cubic_sparsity, is_pruning_step

RAMP = dict(initial=0.0, final=0.9, start_step=0, end_step=100)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (10, 0.9 - 0.9 * 0.9**3),
        (50, 0.9 - 0.9 * 0.5**3),  # 0.7875
        (75, 0.9 - 0.9 * 0.25**3),
        (100, 0.9),
        (1000, 0.9),
    ],
)
def test_cubic_values_from_zero(step, expected):
    assert cubic_sparsity(step, **RAMP) == pytest.approx(expected, abs=1e-12)


def test_cubic_with_offset_and_nonzero_initial():
    kwargs = dict(initial=0.5, final=0.9, start_step=100, end_step=200)
    assert cubic_sparsity(0, **kwargs) == 0.5
    assert cubic_sparsity(100, **kwargs) == 0.5
    assert cubic_sparsity(125, **kwargs) == pytest.approx(0.9 - 0.4 * 0.75**3)
    assert cubic_sparsity(200, **kwargs) == 0.9
    assert cubic_sparsity(10_000, **kwargs) == 0.9


def test_cubic_is_monotone_and_front_loaded():
    values = [cubic_sparsity(t, **RAMP) for t in range(0, 101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # Cubic: the first half of the ramp does most of the pruning (7/8 of it).
    assert values[50] == pytest.approx(0.9 * 7 / 8)


def test_paper_schedule_end_points():
    kwargs = dict(initial=0.0, final=0.9, start_step=0, end_step=50_000)
    assert cubic_sparsity(0, **kwargs) == 0.0
    assert cubic_sparsity(50_000, **kwargs) == 0.9
    assert cubic_sparsity(80_000, **kwargs) == 0.9


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(step=-1), "step"),
        (dict(step=1.5), "step"),
        (dict(step=True), "step"),
        (dict(initial=-0.1), "initial"),
        (dict(final=1.5), "final"),
        (dict(start_step=-3), "start_step"),
        (dict(start_step=100, end_step=100), "end_step"),
        (dict(start_step=10, end_step=5), "end_step"),
    ],
)
def test_cubic_validation_names_argument(kwargs, argument):
    arguments = dict(step=0, **RAMP)
    arguments.update(kwargs)
    step = arguments.pop("step")
    with pytest.raises(ValueError, match=argument):
        cubic_sparsity(step, **arguments)


def test_is_pruning_step_paper_settings():
    kwargs = dict(start_step=0, frequency=1000, end_pruning_step=80_000)
    assert is_pruning_step(0, **kwargs)
    assert is_pruning_step(1000, **kwargs)
    assert not is_pruning_step(999, **kwargs)
    assert not is_pruning_step(1001, **kwargs)
    assert is_pruning_step(50_000, **kwargs)
    # Masks keep being recomputed after the ramp ended at 50k, up to and including 80k.
    assert is_pruning_step(80_000, **kwargs)
    assert not is_pruning_step(81_000, **kwargs)
    assert sum(is_pruning_step(t, **kwargs) for t in range(0, 100_001)) == 81


def test_is_pruning_step_with_offset():
    kwargs = dict(start_step=10, frequency=5, end_pruning_step=32)
    assert [t for t in range(50) if is_pruning_step(t, **kwargs)] == [10, 15, 20, 25, 30]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(frequency=0), "frequency"),
        (dict(step=-1), "step"),
        (dict(start_step=-1), "start_step"),
        (dict(start_step=10, end_pruning_step=5), "end_pruning_step"),
    ],
)
def test_is_pruning_step_validation(kwargs, argument):
    arguments = dict(step=0, start_step=0, frequency=10, end_pruning_step=100)
    arguments.update(kwargs)
    step = arguments.pop("step")
    with pytest.raises(ValueError, match=argument):
        is_pruning_step(step, **arguments)
