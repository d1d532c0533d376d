"""Quality benchmark: does a model pruned once, upstream, keep its accuracy downstream, and against what baselines?

    python bench/quality.py run --quick                      # CI: tiny random BERT, every arm, ~1-2 min on 2 cores
    python bench/quality.py run                              # full: embedded MiniLM, every arm (time: see below)
    python bench/quality.py run --arms dense,pofa --tasks movie_reviews --seeds 1 --sparsities 0.9
    python bench/quality.py run --budgets 30,60,120,240 --arms pofa   # retention against the pruning budget
    python bench/quality.py report                           # bench/RESULTS.md and its PNGs from the JSON lines

Every arm runs pofa's real stages (`pofa.pretrain.train`, `pofa.finetune.finetune`) on recipes built in code from
the shipped quickstart recipes (`pofa/recipes/quickstart-*.yaml`), with the same fine-tuning budget (optimizer
steps, examples, batch, sequence length, seed) for every arm:

    dense            the prepared teacher fine-tuned dense (the accuracy baseline, and the KD teacher of the others)
    pofa             upstream gradual magnitude pruning + KD from the prepared teacher (the student stage), then
                     sparse transfer with the pattern locked and KD from `dense`
    pofa-nokd        the same student, sparse transfer without distillation
    pofa-qat         the same student, sparse transfer with KD and 8-bit quantization-aware training
    oneshot          the prepared teacher magnitude-pruned once (no upstream training), then the same sparse transfer
    oneshot-nokd     the same, without distillation
    downstream       the dense prepared teacher pruned gradually during fine-tuning (`pruning:` in the fine-tuning
                     recipe, the comparison the paper makes), KD from `dense`
    downstream-nokd  the same, without distillation
    pofa-inter       pofa with intermediate-layer distillation in the student stage: hidden-state MSE and attention KL
                     of every layer beside the logits (issue: what distilling more than the logits buys)
    pofa-1x4         pofa with 1x4 block masks (`pruning.pattern: 1x4`, the sparse int8 kernel's unit): what the
                     runtime's speed costs in accuracy

Decomposition arms (`pofa.decompose`), two levels per technique (`DECOMPOSITIONS`: lowrank-1/2, kronecker-1/2,
tensor-1/2, rosita-1/2): the prepared teacher decomposed at the start of a student stage without pruning (ROSITA's
heads, neurons and ranks shrinking over the pruning ramp instead, `schedule: iterative`), distilled from itself
uncompressed (logits, hidden states, attention) for the pofa student's budget, then fine-tuned with the
same budget and KD from `dense`. The report's size table puts every arm's parameters, non-zeros, bytes and
accuracy side by side, with a plot of accuracy against non-zero parameters.

Upstream stages (teacher preparation, student pruning, one-shot pruning) run once, with the recipe's seed, as the
paper pre-trains once and fine-tunes with several seeds: the seeds vary the fine-tuning (training subset, order,
head, dropout). Each upstream model's held-out MLM loss is measured on the same held-out blocks (the teacher's, as
`pofa.pretrain.evaluate` scores them). Results are JSON lines appended to `bench/results/quality.jsonl`: one
`finetune` record per arm x task x sparsity x seed (x pruning budget for `pofa`), one `upstream` record per
upstream model, each with its mode, its recipe keys that differ from the defaults, its measured sparsity and its
time. `report` keeps the latest record per key and writes `bench/RESULTS.md` with tables and PNG plots.

Full mode (MiniLM-L6 on python-docs; the quickstart's budget per stage: teacher 80 steps, student 120 steps, and
125 fine-tuning steps of 32 sentences, 2 epochs of 2,000, for every arm) takes, at the quickstart's speed on 2 idle
cores (~1.4 s per teacher step, ~1.6 s per student step, ~2-2.2 s per fine-tuning step), about 16 hours for the
whole grid (2 tasks x 80%, 90% x 3 seeds x 10 pruning arms, the pofa arm at 60 and 240 student steps, and the 8
decompositions per task and seed: 205 stage runs), 14 hours without the extra budgets, an hour for the 10 pruning
arms on one task, one sparsity and one seed. `python bench/quality.py
plan [selection]` prints the count of each stage and the estimate (from the results' measured seconds per step once
there are any); `--scale 0.25` runs every method at a quarter of its steps (the teacher keeps its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quality.jsonl"
PAGE = ROOT / "bench" / "RESULTS.md"
PLOTS = ROOT / "bench" / "results"

PRUNING_ARMS = ("dense", "pofa", "pofa-nokd", "pofa-qat", "pofa-inter", "pofa-1x4", "oneshot", "oneshot-nokd",
                "downstream", "downstream-nokd")
# Decomposition arms (pofa.decompose), two levels per technique: arm -> (level, the recipe's `decomposition`
# section for hidden width D). The levels of bench/bench_decompose.py, whose size and latency tables they join.
DECOMPOSITIONS: dict[str, tuple[str, Any]] = {
    "lowrank-1": ("rank D/4", lambda d: {"method": "lowrank", "rank": d // 4}),
    "lowrank-2": ("rank D/12, embedding rank D/6",
                  lambda d: {"method": "lowrank", "rank": d // 12, "embeddings": True, "embedding_rank": d // 6}),
    "kronecker-1": ("8 Kronecker terms", lambda d: {"method": "kronecker", "terms": 8}),
    "kronecker-2": ("2 Kronecker terms", lambda d: {"method": "kronecker", "terms": 2}),
    "tensor-1": ("method III, d = D/2", lambda d: {"method": "tensor", "rank": d // 2}),
    "tensor-2": ("method IV, d = D/2, bank 24", lambda d: {"method": "tensor", "rank": d // 2, "bank": 24}),
    "rosita-1": ("heads and FFN 1/2 + rank D/8, iterative",
                 lambda d: {"method": "lowrank", "rank": d // 8, "heads": 0.5, "ffn": 0.5}),
    "rosita-2": ("heads and FFN 1/4 + rank D/16, iterative",
                 lambda d: {"method": "lowrank", "rank": d // 16, "heads": 0.25, "ffn": 0.25}),
}
ARMS = PRUNING_ARMS + tuple(DECOMPOSITIONS)
TASKS = ("movie_reviews", "snli")
SPARSE_ARMS = PRUNING_ARMS[1:]
KD_ARMS = ("pofa", "pofa-qat", "pofa-inter", "pofa-1x4", "oneshot", "downstream", *DECOMPOSITIONS)
# The student stage's intermediate-layer distillation (pofa-inter and the decomposition arms): hidden-state MSE and
# attention KL beside the logits, every layer paired, as ROSITA and KroneckerBERT distil.
INTERMEDIATE = {"distillation.hidden_weight": 1.0, "distillation.attention_weight": 1.0}
# Student variants with their own upstream run (the pofa student's recipe changed): arm -> (changes, description).
STUDENT_VARIANTS = {
    "pofa-inter": (INTERMEDIATE, "pofa student (GMP + KD of logits, hidden states, attention)"),
    "pofa-1x4": ({"pruning.pattern": "1x4"}, "pofa student, 1x4 blocks (GMP + KD)"),
}
# Fine-tuning seconds per arm relative to a plain (no teacher) sparse transfer, for the estimate when an arm has
# no measurement yet: a distilled step also runs the teacher's forward (~1.5x), QAT's fake quantization ~2x.
ARM_COST = {"dense": 1.0, "pofa": 1.5, "pofa-nokd": 1.0, "pofa-qat": 2.0, "pofa-inter": 1.5, "pofa-1x4": 1.5,
            "oneshot": 1.5,
            "oneshot-nokd": 1.0, "downstream": 1.6, "downstream-nokd": 1.1, **{a: 1.4 for a in DECOMPOSITIONS}}


# ---------------------------------------------------------------------------------------------------------------------
# Modes: what each stage is given. The same numbers for every arm; only the method differs.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """The budget of one benchmark mode, and its default selection."""

    name: str
    model: str
    """`embedded:minilm`, or `tiny` (a random 2-layer BERT with a WordPiece vocabulary trained on the corpus)."""
    pretrain: dict[str, Any]
    """Dotted overrides of the quickstart teacher and student recipes (data size, steps, learning rate)."""
    teacher_steps: int
    student_steps: int
    """The pofa arms' upstream budget (optimizer steps of student pruning); `--budgets` adds others for `pofa`."""
    finetune: dict[str, Any]
    """Dotted overrides of every fine-tuning recipe (steps, batch, examples): the same for every arm."""
    local_task_rows: tuple[int, int] | None
    """(training, test) rows of each real task written to local files once per run instead of loading the whole set
    for every fine-tuning run (quick mode: SNLI's 100k pairs take ~3 s to read, each time); None: by name."""
    tasks: tuple[str, ...] = TASKS
    sparsities: tuple[float, ...] = (0.8, 0.9)
    seeds: tuple[int, ...] = (1, 2, 3)
    budgets: tuple[int, ...] = ()
    """Extra pruning budgets (student steps) for the `pofa` arm, beside `student_steps`."""
    threads: int | None = None
    """torch threads (None: torch's default). A tiny model's operations are too small to split: on a busy machine
    2 threads make its steps ~3x slower than 1."""


QUICK = Mode(
    name="quick", model="tiny",
    pretrain={"data.sources": [{"embedded": "python-docs", "max_documents": 60}], "data.max_seq_length": 32,
              "data.eval_fraction": 0.1, "data.max_eval_blocks": 32, "training.per_device_batch_size": 8,
              "training.learning_rate": 2e-3, "training.log_every": 1000},
    teacher_steps=10, student_steps=12,
    finetune={"training.max_steps": 6, "training.per_device_batch_size": 16, "training.learning_rate": 1e-3,
              "training.log_every": 1000, "task.max_seq_length": 32, "task.max_train_examples": 96},
    local_task_rows=(192, 64), seeds=(1, 2), budgets=(6,), threads=1,
)

FULL = Mode(
    name="full", model="embedded:minilm",
    pretrain={},  # the quickstart's own: seq 64, batch 16, lr 1e-4, python-docs, 64 held-out blocks
    teacher_steps=80, student_steps=120,
    # The quickstart's sparse transfer (2 epochs of 2,000 sentences, batch 32) as a step count, for every arm.
    finetune={"training.max_steps": 125, "task.max_eval_examples": 2000, "training.log_every": 1000},
    local_task_rows=None, budgets=(60, 240),
)

MODES = {m.name: m for m in (QUICK, FULL)}


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: the shipped quickstart recipes, changed in code, validated by `recipe_from_dict`
# ---------------------------------------------------------------------------------------------------------------------


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts (creating sections)."""
    *path, last = key.split(".")
    for part in path:
        data = data.setdefault(part, {})
    data[last] = value


def build_recipe(shipped: str, changes: dict[str, Any]):
    """The shipped recipe `shipped` with dotted `changes` applied, validated as its stage's class."""
    from pofa.recipe import load_recipe, recipe_class_for, recipe_from_dict, recipe_to_dict

    cls = recipe_class_for(shipped)
    data = recipe_to_dict(load_recipe(shipped, (), cls))
    for key, value in changes.items():
        set_dotted(data, key, value)
    return recipe_from_dict(cls, data, source=f"{shipped} (bench/quality.py)")


def ramp(steps: int) -> tuple[int, int]:
    """(end_step, frequency) of a sparsity ramp from step 0 over about the first 60% of `steps`, with about nine
    pruning events: end_step is a multiple of frequency, so that an event falls on it and the target is reached
    (events come at start_step + k x frequency only; quickstart: 120 steps -> (72, 8))."""
    frequency = max(1, round(0.6 * steps / 9))
    return frequency * max(1, round(0.6 * steps / frequency)), frequency


def student_schedule(steps: int) -> dict[str, Any]:
    """The quickstart student's schedule scaled to `steps` (quickstart: 120 steps, ramp to 72, every 8, masks
    recomputed until 96): the ramp of `ramp`, masks recomputed until 80% of the steps."""
    end, frequency = ramp(steps)
    return {"training.max_steps": steps, "pruning.end_step": end, "pruning.frequency": frequency,
            "pruning.end_pruning_step": max(end, round(0.8 * steps)),
            "training.eval_every": steps, "training.save_every": steps}


def teacher_recipe(mode: Mode, base: str, out: Path, cache: Path | None):
    """quickstart-teacher (dense MLM on python-docs) from `base`, at the mode's data size and steps."""
    return build_recipe("quickstart-teacher", {
        **mode.pretrain, "model.name_or_path": base, "training.output_dir": str(out),
        "training.max_steps": mode.teacher_steps, "training.eval_every": mode.teacher_steps,
        "training.save_every": mode.teacher_steps, **({"data.cache_dir": str(cache)} if cache else {})})


def student_recipe(mode: Mode, teacher: Path, sparsity: float, steps: int, out: Path, cache: Path | None, *,
                   extra: dict[str, Any] | None = None):
    """quickstart-student (GMP to `sparsity` + KD from the prepared teacher, which it starts from) in `steps`, with
    the dotted `extra` changes (e.g. intermediate-layer distillation)."""
    return build_recipe("quickstart-student", {
        **mode.pretrain, **student_schedule(steps), "model.name_or_path": str(teacher),
        "distillation.teacher": str(teacher), "pruning.target_sparsity": sparsity, "training.output_dir": str(out),
        **({"data.cache_dir": str(cache)} if cache else {}), **(extra or {})})


def decomposition_recipe(mode: Mode, teacher: Path, arm: str, width: int, steps: int, out: Path,
                         cache: Path | None):
    """quickstart-student without pruning: the prepared teacher decomposed at the start (`arm`'s section for hidden
    width `width`) and distilled from itself uncompressed (logits + hidden states + attention) for `steps`."""
    schedule = {k: v for k, v in student_schedule(steps).items() if k.startswith("training.")}
    section = DECOMPOSITIONS[arm][1](width)
    if arm.startswith("rosita"):  # ROSITA's iterative schedule, over the pruning ramp of the pofa student
        end, frequency = ramp(steps)
        section.update(schedule="iterative", start_step=0, end_step=end, frequency=frequency)
    return build_recipe("quickstart-student", {
        **mode.pretrain, **schedule, **INTERMEDIATE, "model.name_or_path": str(teacher),
        "distillation.teacher": str(teacher), "pruning.enabled": False, "decomposition": section,
        "training.output_dir": str(out), **({"data.cache_dir": str(cache)} if cache else {})})


def finetune_recipe(mode: Mode, arm: str, model: Path, task: dict[str, Any], seed: int, out: Path, *,
                    sparsity: float, kd_teacher: Path | None):
    """The fine-tuning recipe of `arm`: quickstart-dense-finetune for `dense`, quickstart-finetune (sparse transfer,
    pattern locked) for the others, with `mode.finetune`'s budget; `pofa-qat` adds quickstart-qat's quantization
    section; `downstream*` add a pruning section from dense to `sparsity` (the ramp of `ramp`)."""
    from pofa.recipe import FinetuneRecipe, load_recipe, recipe_to_dict

    shipped = "quickstart-dense-finetune" if arm == "dense" else "quickstart-finetune"
    changes: dict[str, Any] = {**mode.finetune, "model.name_or_path": str(model), "training.output_dir": str(out),
                               "training.seed": seed, "task.eval_splits": ["test"], "export.compact": False,
                               "export.onnx": False, **{f"task.{k}": v for k, v in task.items()}}
    if arm != "dense":
        changes["distillation.teacher"] = str(kd_teacher) if arm in KD_ARMS else None
    if arm in DECOMPOSITIONS:
        changes["sparsity.masks"] = "none"  # dense factors: nothing to lock
    if arm == "pofa-qat":
        changes["quantization"] = recipe_to_dict(load_recipe("quickstart-qat", (), FinetuneRecipe))["quantization"]
    if arm.startswith("downstream"):
        end, frequency = ramp(mode.finetune["training.max_steps"])
        changes.update({"sparsity.masks": "none", "pruning": {
            "enabled": True, "target_sparsity": sparsity, "start_step": 0, "end_step": end, "frequency": frequency}})
    return build_recipe(shipped, changes)


def downstream_pruning_available() -> bool:
    """Whether fine-tuning recipes have the `pruning:` section the downstream arms need."""
    from pofa.recipe import FinetuneRecipe

    return "pruning" in {f.name for f in dataclasses.fields(FinetuneRecipe)}


def recipe_delta(recipe) -> dict[str, Any]:
    """The recipe's dotted keys whose value differs from its class's default: the whole config, compactly."""
    from pofa.recipe import recipe_to_dict

    def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and value and key not in ("config_overrides", "data_files"):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    mine, default = flat(recipe_to_dict(recipe)), flat(recipe_to_dict(type(recipe)()))
    return {key: portable(value) for key, value in mine.items() if default.get(key, object()) != value}


def portable(value: Any) -> Any:
    """`value` with every path inside the checkout written relative to it (records compare across machines)."""
    if isinstance(value, str) and value.startswith(f"{ROOT}{os.sep}"):
        return os.path.relpath(value, ROOT)
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Models and measurements
# ---------------------------------------------------------------------------------------------------------------------


def tiny_base_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with a 600-word WordPiece vocabulary trained on the embedded corpus: the
    quick mode's model, built locally in about a second."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from pofa.data.corpus import python_docs_documents

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(python_docs_documents()[:120], trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokenizer = BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def oneshot_model(teacher: Path, sparsity: float, out: Path) -> Path:
    """The prepared teacher with every encoder Linear weight magnitude-pruned once to `sparsity` (layer-wise, the
    same targets and masks function as the student stage), saved with its mask file: a sparse transfer input."""
    import torch

    from pofa.artifacts import MASKS_FILE
    from pofa.families import pruning_targets
    from pofa.modeling import load_mlm_model, load_tokenizer
    from pofa.sparsity import MaskStore, magnitude_masks, select_targets

    model = load_mlm_model(str(teacher))
    params = dict(model.named_parameters())
    names = select_targets(params.items(), pruning_targets(model))
    masks = magnitude_masks({n: params[n].detach() for n in names}, sparsity)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    load_tokenizer(str(teacher)).save_pretrained(out)
    MaskStore(masks).save(out / MASKS_FILE)
    return out


def heldout_mlm(model_dir: Path, recipe) -> dict[str, float]:
    """Held-out MLM loss and masked-token accuracy of the MLM model in `model_dir` on `recipe`'s held-out blocks
    (its data section and seed), masked and scored exactly as `pofa.pretrain.train` evaluates (`evaluate`)."""
    import numpy as np

    from pofa.data.mlm import MLMBatcher, build_block_cache, split_blocks
    from pofa.loop import new_accelerator
    from pofa.modeling import MaskedLM, load_config, load_mlm_model, load_tokenizer
    from pofa.pretrain import evaluate

    d, t = recipe.data, recipe.training
    tokenizer = load_tokenizer(str(model_dir), inputs_for=load_config(str(model_dir)))
    blocks = build_block_cache(d.sources, tokenizer, d.max_seq_length, d.cache_dir, log=lambda *_: None)
    split = split_blocks(np.load(blocks, mmap_mode="r"), eval_fraction=d.eval_fraction,
                         max_eval_blocks=d.max_eval_blocks, seed=t.seed)
    batcher = MLMBatcher(split, tokenizer, per_device_batch_size=t.per_device_batch_size, num_processes=1,
                         process_index=0, seed=t.seed, mlm_probability=d.mlm_probability)
    model = MaskedLM(load_mlm_model(str(model_dir)), all_logits=t.mlm_logits == "all")
    return evaluate(model, batcher.eval_batches(t.eval_batches), new_accelerator())


def measured_sparsity(folder: Path) -> dict[str, Any]:
    """Zeros of the encoder Linear weights (the family's pruning targets) in `folder`'s model.safetensors: their
    overall fraction, and per weight (name -> [zeros, numel])."""
    from safetensors.torch import load_file

    from pofa.families import family_of
    from pofa.modeling import load_config
    from pofa.sparsity import select_targets

    weights = load_file(folder / "model.safetensors")
    names = select_targets(weights.items(), family_of(load_config(str(folder))).targets)
    counts = {n: [int((weights[n] == 0).sum()), weights[n].numel()] for n in names}
    zeros, numel = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    return {"sparsity": zeros / numel, "per_weight": counts}


def model_size(folder: Path) -> dict[str, int]:
    """Parameters of the model in `folder` (each stored tensor once), those that are non-zero, and the bytes of its
    model.safetensors (fp32, zeros stored: the decomposition's size on disk; a sparse model's compact file is
    smaller, see the README's size table)."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    parameters = nonzero = 0
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            parameters += tensor.numel()
            nonzero += int((tensor != 0).sum())
    return {"parameters": parameters, "nonzero_parameters": nonzero, "bytes": path.stat().st_size}


def hidden_width(folder: Path) -> int:
    """The hidden size of the model in `folder` (the decomposition levels are fractions of it)."""
    from pofa.modeling import load_config

    config = load_config(str(folder))
    return int(getattr(config, "hidden_size", None) or config.dim)


def is_exact(per_weight: dict[str, list[int]], target: float, block: int = 1) -> bool:
    """Whether every weight holds exactly round(target x numel) zeros (layer-wise magnitude masks), or with blocks
    of `block` weights exactly round(target x blocks) whole blocks."""
    return all(zeros == round(target * numel / block) * block for zeros, numel in per_weight.values())


def block_size(arm: str) -> int:
    """Weights per pruned block of the arm's masks (1: unstructured)."""
    return 4 if arm == "pofa-1x4" else 1


def write_task_files(task: str, folder: Path, train_rows: int, test_rows: int) -> dict[str, str]:
    """`train_rows` training and `test_rows` test examples of the real offline task (its fixed splits,
    `pofa.data.offline`; a fixed seeded sample of each, since the splits keep the source's order, which may be
    sorted by label) as JSON-lines files, for `task.data_files`; returns split -> path."""
    from pofa.data.offline import load_movie_reviews, load_snli

    loaded = {"snli": load_snli, "movie_reviews": load_movie_reviews}[task]()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        data = loaded[split].shuffle(seed=0)
        names = data.features["label"].names
        path = folder / f"{split}.jsonl"
        with open(path, "w") as f:
            for row in data.select(range(min(rows, len(data)))):
                f.write(json.dumps({**{k: v for k, v in row.items() if k != "label"},
                                    "label": names[row["label"]]}) + "\n")
        files[split] = str(path)
    return files


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    arms: tuple[str, ...]
    tasks: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    budgets: tuple[int, ...]
    """Every pruning budget (student steps) of the `pofa` arm; the first is the other pofa arms' (`student_steps`)."""


def student_budgets(selection: Selection) -> tuple[int, ...]:
    """The student runs the selection needs, per sparsity: the main budget when any pofa arm runs, the others when
    the `pofa` arm does (only it is run at every budget)."""
    main = selection.budgets[0]
    pofa_arms = [a for a in selection.arms if a.startswith("pofa") and a not in STUDENT_VARIANTS]  # own students
    return tuple(b for b in selection.budgets if (b == main and pofa_arms) or (b != main and "pofa" in pofa_arms))


def stage_counts(selection: Selection) -> dict[str, int]:
    """How many runs of each stage the selection takes: `teacher`, `student:<steps>`, `finetune:<arm>`."""
    counts: dict[str, int] = {"teacher": 1}
    for steps in student_budgets(selection):
        counts[f"student:{steps}"] = len(selection.sparsities)
    for arm in (a for a in selection.arms if a in STUDENT_VARIANTS):
        counts[f"student-{arm.removeprefix('pofa-')}:{selection.budgets[0]}"] = len(selection.sparsities)
    if decompositions := [a for a in selection.arms if a in DECOMPOSITIONS]:
        counts[f"decompose:{selection.budgets[0]}"] = len(decompositions)
    per_pair = len(selection.tasks) * len(selection.seeds)
    if "dense" in selection.arms or any(a in KD_ARMS for a in selection.arms):
        counts["finetune:dense"] = per_pair
    for arm in (a for a in selection.arms if a != "dense"):
        budgets = len(selection.budgets) if arm == "pofa" else 1
        # A decomposition is dense: once per task and seed, not per sparsity.
        counts[f"finetune:{arm}"] = per_pair * (1 if arm in DECOMPOSITIONS else len(selection.sparsities)) * budgets
    return counts


def estimate_seconds(counts: dict[str, int], seconds: dict[str, float], *, teacher_steps: int,
                     finetune_steps: int) -> float:
    """Wall time of `counts` from measured seconds per optimizer step: `teacher_per_step`, `student_per_step` (also
    for the intermediate-distillation students and the decomposed ones), `finetune_per_step:<arm>` (evaluation
    included; an arm not measured is scaled from the measured ones by ARM_COST)."""
    measured = {k.split(":")[1]: v for k, v in seconds.items() if k.startswith("finetune_per_step:")}
    unit = statistics.mean(v / ARM_COST[a] for a, v in measured.items()) if measured else 0.0
    total = 0.0
    for key, n in counts.items():
        if key == "teacher":
            total += n * teacher_steps * seconds.get("teacher_per_step", 0.0)
        elif key.startswith(("student", "decompose")):
            total += n * int(key.split(":")[1]) * seconds.get("student_per_step", 0.0)
        else:
            arm = key.split(":")[1]
            total += n * finetune_steps * measured.get(arm, unit * ARM_COST[arm])
    return total


# A quickstart run on 2 cores (876 s in all): teacher 80 steps in 108 s, student 120 in 197 s, dense fine-tuning
# 63 steps in 127 s, distilled sparse transfer 125 steps in 272 s. `plan`'s estimate before any record.
QUICKSTART_SECONDS = {"teacher_per_step": 108 / 80, "student_per_step": 197 / 120, "finetune_per_step:dense": 127 / 63,
                      "finetune_per_step:pofa": 272 / 125}


def scaled(mode: Mode, factor: float) -> Mode:
    """`mode` with every method's budget (student steps, pofa budgets, fine-tuning steps) times `factor`, named
    `<mode>-x<factor>`; teacher preparation, the starting point all arms share, keeps its budget."""
    if factor == 1.0:
        return mode
    steps = lambda n: max(2, round(n * factor))  # noqa: E731 - a student needs two steps
    return dataclasses.replace(
        mode, name=f"{mode.name}-x{factor:g}", student_steps=steps(mode.student_steps),
        budgets=tuple(steps(b) for b in mode.budgets),
        finetune={**mode.finetune, "training.max_steps": steps(mode.finetune["training.max_steps"])})


class Recorder:
    """Appends one JSON line per result to the results file (flushed at once, so a killed run keeps its records)."""

    def __init__(self, path: Path, mode: Mode, selection: Selection):
        self.path, self.mode = path, mode
        self.common = {"mode": mode.name, "model": mode.model, "run_id": datetime.now(timezone.utc).strftime(
            "%Y%m%dT%H%M%SZ"), "selection": dataclasses.asdict(selection),
                       "host": {"cpus": os.cpu_count(), "python": platform.python_version()}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        # The load average says whether the seconds were measured on an idle machine or a shared one.
        full = {**record, **self.common, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "load": round(os.getloadavg()[0], 2), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(self.path, "a") as f:
            f.write(json.dumps(full) + "\n")
        return full


def _complete(folder: Path, recipe) -> bool:
    """Whether `folder` holds a final model made by exactly `recipe` (so it can be reused)."""
    from pofa.artifacts import FINAL_DIR, RECIPE_FILE
    from pofa.recipe import load_recipe, recipe_to_dict

    saved = folder / FINAL_DIR / RECIPE_FILE
    if not saved.is_file():
        return False
    return recipe_to_dict(load_recipe(saved, (), type(recipe))) == recipe_to_dict(recipe)


def pretrained(recipe, reuse: bool) -> tuple[Path, float | None]:
    """Run a pre-training stage (or reuse its identical finished run); returns its final folder and seconds."""
    from pofa.artifacts import FINAL_DIR
    from pofa.pretrain import train

    out = Path(recipe.training.output_dir)
    if reuse and _complete(out, recipe):
        print(f"   reusing {out / FINAL_DIR}", flush=True)
        return out / FINAL_DIR, None
    t0 = time.perf_counter()
    result = train(recipe, overwrite=True)
    return result.final_dir, round(time.perf_counter() - t0, 1)


def run(mode: Mode, selection: Selection, work: Path, results: Path, *, reuse: bool = True) -> list[dict[str, Any]]:
    """Run the selection; appends its records to `results` and returns them."""
    import torch

    threads = torch.get_num_threads()
    if mode.threads is not None:
        torch.set_num_threads(mode.threads)
    try:
        return _run(mode, selection, work, Recorder(results, mode, selection), reuse)
    finally:
        torch.set_num_threads(threads)  # a caller (a test session) keeps its own setting


def _run(mode: Mode, selection: Selection, work: Path, recorder: Recorder, reuse: bool) -> list[dict[str, Any]]:
    from pofa.finetune import finetune

    records: list[dict[str, Any]] = []
    cache = work / "cache" if mode.model == "tiny" else None  # tiny vocabulary: its blocks stay with the run
    arms = list(selection.arms)
    if any(a.startswith("downstream") for a in arms) and not downstream_pruning_available():
        print("skip downstream, downstream-nokd: FinetuneRecipe has no `pruning` section yet (downstream gradual "
              "pruning during fine-tuning is being added); the other arms run", flush=True)
        arms = [a for a in arms if not a.startswith("downstream")]
    work.mkdir(parents=True, exist_ok=True)
    base = mode.model
    if base == "tiny":
        base = str(tiny_base_model(work / "base")) if not (work / "base" / "config.json").is_file() else \
            str(work / "base")
    print(f"== quality bench, {mode.name} mode: {base}; arms {', '.join(arms)}; tasks {', '.join(selection.tasks)};"
          f" sparsities {selection.sparsities}; seeds {selection.seeds}; pofa budgets {selection.budgets}", flush=True)

    def upstream(arm: str, folder: Path, sparsity: float, steps: int, seconds: float | None, recipe) -> dict:
        mlm = heldout_mlm(folder, eval_recipe)
        shape = (recipe or eval_recipe).training.per_device_batch_size * (recipe or eval_recipe).data.max_seq_length
        if arm in DECOMPOSITIONS:
            sparse = {"level": DECOMPOSITIONS[arm][0]}
        else:
            sp = measured_sparsity(folder)
            sparse = {"measured_sparsity": sp["sparsity"],
                      "sparsity_exact": is_exact(sp["per_weight"], sparsity, block_size(arm))}
        rec = recorder.write({"kind": "upstream", "arm": arm, "sparsity": sparsity, "budget_steps": steps,
                              "budget_tokens": steps * shape, "mlm_loss": mlm["mlm_loss"],
                              "mlm_accuracy": mlm["mlm_accuracy"], **sparse, **model_size(folder),
                              "seconds": seconds, "config": recipe_delta(recipe) if recipe is not None else {}})
        records.append(rec)
        print(f"   upstream {arm} {sparsity:.0%} @{steps} steps: held-out MLM loss {mlm['mlm_loss']:.3f}", flush=True)
        return rec

    # 1. teacher preparation: the starting point every arm is given.
    recipe = teacher_recipe(mode, base, work / "teacher", cache)
    eval_recipe = recipe  # the held-out blocks every upstream model is scored on (same data section and seed)
    print("\n== teacher preparation", flush=True)
    teacher, seconds = pretrained(recipe, reuse)
    upstream("teacher", teacher, 0.0, mode.teacher_steps, seconds, recipe)

    # 2. upstream sparse models: students (per sparsity and budget) and one-shot pruned teachers.
    sparse_inputs: dict[tuple[str, float, int], Path] = {}
    main = selection.budgets[0]
    for sparsity in selection.sparsities:
        for steps in student_budgets(Selection(tuple(arms), *dataclasses.astuple(selection)[1:])):
            recipe = student_recipe(mode, teacher, sparsity, steps, work / f"student-s{sparsity:g}-b{steps}", cache)
            print(f"\n== student pruning to {sparsity:.0%} in {steps} steps", flush=True)
            folder, seconds = pretrained(recipe, reuse)
            upstream("pofa", folder, sparsity, steps, seconds, recipe)
            sparse_inputs[("pofa", sparsity, steps)] = folder
        for arm in (a for a in arms if a in STUDENT_VARIANTS):
            changes, what = STUDENT_VARIANTS[arm]
            out = work / f"student-s{sparsity:g}-b{main}-{arm.removeprefix('pofa-')}"
            recipe = student_recipe(mode, teacher, sparsity, main, out, cache, extra=changes)
            print(f"\n== {what}: {sparsity:.0%} in {main} steps", flush=True)
            folder, seconds = pretrained(recipe, reuse)
            upstream(arm, folder, sparsity, main, seconds, recipe)
            sparse_inputs[(arm, sparsity, main)] = folder
        if any(a.startswith("oneshot") for a in arms):
            t0 = time.perf_counter()
            folder = oneshot_model(teacher, sparsity, work / f"oneshot-s{sparsity:g}")
            upstream("oneshot", folder, sparsity, 0, round(time.perf_counter() - t0, 1), None)
            sparse_inputs[("oneshot", sparsity, 0)] = folder

    # 2b. decomposed students: each technique's level, distilled from the teacher for the main budget.
    decomposed: dict[str, Path] = {}
    for arm in (a for a in arms if a in DECOMPOSITIONS):
        recipe = decomposition_recipe(mode, teacher, arm, hidden_width(teacher), main, work / f"decomposed-{arm}",
                                      cache)
        print(f"\n== decomposition {arm} ({DECOMPOSITIONS[arm][0]}), distilled for {main} steps", flush=True)
        folder, seconds = pretrained(recipe, reuse)
        upstream(arm, folder, 0.0, main, seconds, recipe)
        decomposed[arm] = folder

    # 3. fine-tuning: dense (baseline and KD teacher), then every sparse arm, per task and seed.
    for task in selection.tasks:
        task_fields: dict[str, Any] = {"name": task}
        if mode.local_task_rows is not None:
            task_fields["data_files"] = write_task_files(task, work / "tasks" / task, *mode.local_task_rows)
        for seed in selection.seeds:
            def tune(arm: str, model: Path, sparsity: float, steps: int, kd: Path | None, out: Path) -> dict:
                recipe = finetune_recipe(mode, arm, model, task_fields, seed, out, sparsity=sparsity, kd_teacher=kd)
                print(f"\n== {task} seed {seed}: {arm}" + (f" {sparsity:.0%}" if arm in SPARSE_ARMS else ""), flush=True)
                result = finetune(recipe, overwrite=True)
                if arm in DECOMPOSITIONS:
                    sparse = {"level": DECOMPOSITIONS[arm][0]}
                else:
                    sp = measured_sparsity(result.final_dir)
                    sparse = {"measured_sparsity": sp["sparsity"],
                              "sparsity_exact": is_exact(sp["per_weight"], sparsity, block_size(arm))}
                rec = recorder.write({
                    "kind": "finetune", "arm": arm, "task": task, "sparsity": sparsity, "seed": seed,
                    "budget_steps": steps, "distillation": recipe.distillation.teacher is not None,
                    "qat": recipe.quantization.enabled, "accuracy": result.metrics["test/accuracy"],
                    "metrics": result.metrics, **sparse, **model_size(result.final_dir),
                    "seconds": round(result.seconds, 1), "finetune_steps": mode.finetune["training.max_steps"],
                    "config": recipe_delta(recipe)})
                records.append(rec)
                return rec

            # The dense arm is also the KD teacher of the distilled arms: reused when only needed as a teacher.
            dense_out = work / "finetune" / task / f"dense-seed{seed}"
            dense_recipe = finetune_recipe(mode, "dense", teacher, task_fields, seed, dense_out, sparsity=0.0,
                                           kd_teacher=None)
            needed = any(a in KD_ARMS for a in arms)
            if "dense" in arms or (needed and not (reuse and _complete(dense_out, dense_recipe))):
                tune("dense", teacher, 0.0, 0, None, dense_out)
            dense = dense_out / "final"
            for sparsity in selection.sparsities:
                for arm in [a for a in arms if a in SPARSE_ARMS]:
                    kd = dense if arm in KD_ARMS else None
                    if arm.startswith("pofa"):
                        source = arm if arm in STUDENT_VARIANTS else "pofa"
                        for steps in (selection.budgets if arm == "pofa" else (main,)):
                            tune(arm, sparse_inputs[(source, sparsity, steps)], sparsity, steps, kd,
                                 work / "finetune" / task / f"{arm}-s{sparsity:g}-b{steps}-seed{seed}")
                    elif arm.startswith("oneshot"):
                        tune(arm, sparse_inputs[("oneshot", sparsity, 0)], sparsity, 0, kd,
                             work / "finetune" / task / f"{arm}-s{sparsity:g}-seed{seed}")
                    else:
                        tune(arm, teacher, sparsity, 0, kd,
                             work / "finetune" / task / f"{arm}-s{sparsity:g}-seed{seed}")
            for arm, folder in decomposed.items():
                tune(arm, folder, 0.0, main, dense, work / "finetune" / task / f"{arm}-seed{seed}")
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The report: bench/RESULTS.md and its PNGs, from the JSON lines only
# ---------------------------------------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the JSON-lines file, in order (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per (kind, mode, arm, task, sparsity, budget, seed): a rerun replaces, never double-counts."""
    keyed: dict[tuple, dict[str, Any]] = {}
    for r in records:
        keyed[(r["kind"], r["mode"], r["arm"], r.get("task"), round(r["sparsity"], 4), r.get("budget_steps"),
               r.get("seed"))] = r
    return list(keyed.values())


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± std (n)`, or `mean (1)` for one value; `-` for none."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} ({len(values)})" if s is not None else f"{m:.{digits}f} (1)"


def at_main_budget(record: dict[str, Any]) -> bool:
    """Whether a record belongs to the accuracy table: every arm but `pofa` at a budget other than its run's first
    (those extra budgets are the retention curve's)."""
    return record["arm"] != "pofa" or record["budget_steps"] == record["selection"]["budgets"][0]


def accuracy_groups(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, str], list[float]]:
    """(arm, sparsity, task) -> test accuracies over seeds; the pofa arm at its main budget only."""
    groups: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == "finetune" and at_main_budget(r):
            groups[(r["arm"], round(r["sparsity"], 4), r["task"])].append(r["accuracy"])
    return groups


def dense_accuracy_by_seed(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(task, seed) -> the dense arm's test accuracy: what each seed's retention is measured against."""
    return {(r["task"], r["seed"]): r["accuracy"] for r in records if r["kind"] == "finetune" and r["arm"] == "dense"}


def retention_groups(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, str], list[float]]:
    """(arm, sparsity, task) -> accuracy / the same seed's dense accuracy, one value per seed (paired: seeds without
    a dense run are left out, so arms run with fewer seeds compare with their own seeds' dense runs); the pofa arm at
    its main budget only."""
    dense = dense_accuracy_by_seed(records)
    groups: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in records:
        base = dense.get((r.get("task"), r.get("seed")))
        if r["kind"] == "finetune" and at_main_budget(r) and base:
            groups[(r["arm"], round(r["sparsity"], 4), r["task"])].append(r["accuracy"] / base)
    return groups


def percent_cell(values: Sequence[float]) -> str:
    """`mean% ± std` of ratios, or `mean%` for one value; `-` for none."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{100 * m:.1f}%" + (f" ± {100 * s:.1f}" if s is not None else "")


def retention_by_budget(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[int, list[float]]]:
    """(task, sparsity) -> pruning budget in student steps (0: one-shot, no upstream training) -> retention of
    dense accuracy per seed (the seed's own dense run)."""
    dense = dense_accuracy_by_seed(records)
    out: dict[tuple[str, float], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] == "finetune" and r["arm"] in ("pofa", "oneshot") and (r["task"], r["seed"]) in dense:
            base = dense[(r["task"], r["seed"])]
            if base > 0:
                out[(r["task"], round(r["sparsity"], 4))][r["budget_steps"]].append(r["accuracy"] / base)
    return out


def stage_seconds(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean measured seconds per optimizer step of each stage kind (`teacher_per_step`, `student_per_step`,
    `finetune_per_step:<arm>`, the latter with its evaluation), from records that trained (reused stages carry no
    time)."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("seconds") is None or (r["kind"] == "upstream" and not r["budget_steps"]):
            continue
        if r["kind"] == "upstream" and r["arm"] in ("teacher", "pofa"):
            buckets[f"{'teacher' if r['arm'] == 'teacher' else 'student'}_per_step"].append(
                r["seconds"] / r["budget_steps"])
        elif r["kind"] == "finetune":
            buckets[f"finetune_per_step:{r['arm']}"].append(r["seconds"] / r["finetune_steps"])
    return {k: statistics.mean(v) for k, v in buckets.items()}


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy against sparsity, one panel per task, one line per method (mean, std as error bars); dense at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = accuracy_groups(records)
    tasks = sorted({t for _, _, t in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        dense = groups.get(("dense", 0.0, task), [])
        for arm in SPARSE_ARMS:
            points = sorted((s, v) for (a, s, t), v in groups.items() if a == arm and t == task)
            if not points:
                continue
            xs = ([0.0] if dense else []) + [s for s, _ in points]
            values = ([dense] if dense else []) + [v for _, v in points]
            ys = [mean_std(v)[0] for v in values]
            errs = [mean_std(v)[1] or 0.0 for v in values]
            ax.errorbar([100 * x for x in xs], ys, yerr=errs, marker="o", capsize=3, label=arm,
                        linestyle="--" if arm.endswith("nokd") else "-")
        ax.set_title(task)
        ax.set_xlabel("encoder sparsity (%)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:  # a dense-only run has no method line to name
        axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retention(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Retention of dense accuracy against the upstream pruning budget (student steps; 0 is one-shot pruning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = retention_by_budget(records)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (task, sparsity), by_budget in sorted(curves.items()):
        budgets = sorted(by_budget)
        ys = [100 * mean_std(by_budget[b])[0] for b in budgets]
        errs = [100 * (mean_std(by_budget[b])[1] or 0.0) for b in budgets]
        ax.errorbar(budgets, ys, yerr=errs, marker="o", capsize=3, label=f"{task} {sparsity:.0%}")
    for target in (97, 90):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("upstream pruning budget (student steps; 0 = one-shot)")
    ax.set_ylabel("retention of dense accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def size_rows(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(arm, what it is, its latest fine-tuning record with sizes) for the size table and plot: dense, each sparse
    arm at its highest sparsity (main budget), each decomposition; only records that carry sizes."""
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "finetune" and "parameters" in r and at_main_budget(r):
            rows[(r["arm"], round(r["sparsity"], 4))] = r
    out = []
    for arm in ARMS:
        for sparsity in sorted({s for a, s in rows if a == arm}):
            r = rows[(arm, sparsity)]
            what = DECOMPOSITIONS[arm][0] if arm in DECOMPOSITIONS else (
                "dense" if arm == "dense" else f"{sparsity:.0%} sparse")
            out.append((arm, what, r))
    return out


def plot_size(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy against non-zero parameters (log scale), one panel per task: dense, pruned and decomposed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records if r["kind"] == "finetune" and "parameters" in r})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for arm, what, _ in size_rows(records):
            mine = [r for r in records if r["kind"] == "finetune" and r["arm"] == arm and r["task"] == task
                    and "parameters" in r and at_main_budget(r)]
            for sparsity in sorted({round(r["sparsity"], 4) for r in mine}):
                group = [r for r in mine if round(r["sparsity"], 4) == sparsity]
                x = statistics.mean(r["nonzero_parameters"] for r in group) / 1e6
                y, err = mean_std([r["accuracy"] for r in group])
                marker = "s" if arm == "dense" else ("o" if arm in SPARSE_ARMS else "^")
                ax.errorbar([x], [y], yerr=[err or 0.0], marker=marker, capsize=3, linestyle="none")
                ax.annotate(f"{arm}" + (f" {sparsity:.0%}" if arm in SPARSE_ARMS else ""), (x, y), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("non-zero parameters (millions, log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decomposition_lines(mode_name: str, records: Sequence[dict[str, Any]], plots: Path, page_dir: Path) -> list[str]:
    """The size table (every arm's parameters, non-zeros, bytes, accuracy) and its accuracy-vs-size plot, when the
    run has decomposition arms."""
    if not any(r["kind"] == "finetune" and r["arm"] in DECOMPOSITIONS for r in records):
        return []
    tasks = sorted({r["task"] for r in records if r["kind"] == "finetune"})
    groups, retention = accuracy_groups(records), retention_groups(records)
    mains = {r["selection"]["budgets"][0] for r in records}  # the main student budget of each run
    mlm = {(r["arm"], round(r["sparsity"], 4)): r["mlm_loss"] for r in records if r["kind"] == "upstream"
           and (r["arm"] not in ("pofa", *STUDENT_VARIANTS) or r["budget_steps"] in mains)}

    def upstream_loss(arm: str, sparsity: float) -> float | None:
        """The held-out MLM loss of the model the arm fine-tuned (downstream pruning starts from the teacher)."""
        source = "teacher" if arm == "dense" or arm.startswith("downstream") else (
            "pofa" if arm in ("pofa", "pofa-nokd", "pofa-qat") else "oneshot" if arm.startswith("oneshot") else arm)
        return mlm.get((source, 0.0 if source in ("teacher", *DECOMPOSITIONS) else sparsity))

    rows = size_rows(records)
    dense_nonzero = next((r["nonzero_parameters"] for arm, _, r in rows if arm == "dense"), None)
    lines = ["", "### Size against accuracy: pruning and decomposition (pofa.decompose)", "",
             "Each decomposition starts from the prepared teacher, is distilled from it uncompressed for the pofa "
             "student's budget (logits, hidden states and attention of every layer), then fine-tuned with the same "
             "budget and KD from `dense` as every arm. Parameters and bytes are the fine-tuned model's "
             "(model.safetensors, fp32, classification head included; a sparse model stores its zeros there, its "
             "compact int8 file is much smaller); MiniLM's word embedding (11.7 M of its 22.7 M parameters) is only "
             "factorized by `lowrank-2`. Latency of each level: `python bench/bench_decompose.py`.", "",
             "| arm | what | parameters | non-zero | compression (non-zero vs dense) | model.safetensors | "
             "its upstream model's MLM loss | " + " | ".join(f"{t} | {t} retention" for t in tasks) + " |",
             "|---|---|---|---|---|---|---|" + "---|---|" * len(tasks)]
    for arm, what, r in rows:
        sparsity = round(r["sparsity"], 4)
        ratio = f"{dense_nonzero / r['nonzero_parameters']:.1f}x" if dense_nonzero else "-"
        loss = upstream_loss(arm, sparsity)
        row = [arm, what, f"{r['parameters'] / 1e6:.2f} M", f"{r['nonzero_parameters'] / 1e6:.2f} M", ratio,
               f"{r['bytes'] / 1e6:.1f} MB", f"{loss:.3f}" if loss is not None else "-"]
        for t in tasks:
            row.append(cell(groups.get((arm, sparsity, t), [])))
            row.append(percent_cell(retention.get((arm, sparsity, t), [])))
        lines.append("| " + " | ".join(row) + " |")
    figure = plots / f"{mode_name}-accuracy-vs-size.png"
    plot_size(records, figure)
    lines += ["", f"![accuracy vs size]({os.path.relpath(figure, page_dir)})"]
    return lines


def mode_section(mode_name: str, records: list[dict[str, Any]], plots: Path, page_dir: Path,
                 timing: Sequence[dict[str, Any]]) -> list[str]:
    """The page's section for one mode: budget, accuracy table, upstream MLM table, retention vs budget, and the time
    per step measured by `timing` (the records of every mode that shares its base: a scaled run reuses the full
    mode's teacher)."""
    ft = [r for r in records if r["kind"] == "finetune"]
    up = [r for r in records if r["kind"] == "upstream"]
    groups = accuracy_groups(records)
    tasks = sorted({t for _, _, t in groups})
    seeds = sorted({r["seed"] for r in ft})
    model = records[0]["model"]
    steps = sorted({r["finetune_steps"] for r in ft})
    teacher = [r for r in up if r["arm"] == "teacher"]
    rows = MODES[mode_name].local_task_rows if mode_name in MODES else None
    lines = [f"## {mode_name} mode: `{model}`", ""]
    if "-x" in mode_name:
        lines += [f"A reduced real run: the {mode_name.split('-x')[0]} mode with every method's budget (student and "
                  f"fine-tuning steps) scaled by {mode_name.split('-x')[1]} (`--scale`), the teacher preparation at "
                  "its full budget.", ""]
    if mode_name == "quick":
        lines += ["A tiny random BERT (2 layers, hidden 32) trained for a few steps: a smoke test of the harness, "
                  "not a result; its accuracies sit at the majority class."
                  + (f" Data: fixed samples of {rows[0]} training and {rows[1]} test rows of each real task." if rows
                     else ""), ""]
    main = sorted({r["budget_steps"] for r in ft if r["arm"] == "pofa" and at_main_budget(r)})
    lines.append(f"Budget per arm: fine-tuning {', '.join(map(str, steps))} optimizer steps (every arm, every seed); "
                 f"teacher preparation {teacher[-1]['budget_steps'] if teacher else '-'} steps; pofa student "
                 f"pruning {', '.join(map(str, main)) or '-'} steps. Seeds: {', '.join(map(str, seeds))}. "
                 f"Tasks: {', '.join(tasks)}. Records: "
                 f"{len(ft)} fine-tuning, {len(up)} upstream, latest run {max(r['time'] for r in records)} "
                 f"(torch {records[-1]['torch']}, {records[-1]['threads']} threads)."
                 + (" One seed: no spread, and differences of a point or two are within seed noise."
                    if len(seeds) == 1 else ""))
    lines += ["", "### Test accuracy (mean ± std over seeds (n)); retention: accuracy / the same seed's dense "
                  "accuracy, mean ± std over seeds", ""]
    lines.append("| arm | sparsity | " + " | ".join(f"{t} | {t} retention" for t in tasks) + " |")
    lines.append("|---|---|" + "---|---|" * len(tasks))
    retention = retention_groups(records)
    for arm in PRUNING_ARMS:
        for sparsity in sorted({s for a, s, _ in groups if a == arm}):
            row = [arm, f"{sparsity:.0%}"]
            for t in tasks:
                row.append(cell(groups.get((arm, sparsity, t), [])))
                row.append(percent_cell(retention.get((arm, sparsity, t), [])))
            lines.append("| " + " | ".join(row) + " |")
    exact = [r for r in ft if r["arm"] in SPARSE_ARMS]
    if exact:
        lines += ["", f"Sparsity measured on every fine-tuned model's encoder Linear weights: "
                      f"{sum(r['sparsity_exact'] for r in exact)} of {len(exact)} sparse runs hold exactly "
                      f"round(s·n) zeros in every weight."]
    missing = [a for a in ARMS if not any(r["arm"] == a for r in ft)]
    if missing:
        lines += ["", f"Not run in this mode: {', '.join(missing)}."]
    figure = os.path.relpath(plots / f"{mode_name}-accuracy-vs-sparsity.png", page_dir)
    lines += ["", f"![accuracy vs sparsity]({figure})"]

    lines += ["", "### Held-out MLM loss of the upstream models (same held-out blocks for all)", "",
              "| upstream model | sparsity | student steps | MLM loss | masked-token accuracy |",
              "|---|---|---|---|---|"]
    for r in sorted(up, key=lambda r: (r["arm"] != "teacher", r["arm"] in DECOMPOSITIONS, r["sparsity"], r["arm"],
                                       r["budget_steps"])):
        name = {"teacher": "prepared teacher (dense)", "pofa": "pofa student (GMP + KD)",
                **{arm: what for arm, (_, what) in STUDENT_VARIANTS.items()},
                "oneshot": "one-shot magnitude pruning"}.get(r["arm"], f"{r['arm']}: {r.get('level', '')}")
        steps_cell = str(r["budget_steps"]) if r["arm"] not in ("teacher", "oneshot") else "-"
        lines.append(f"| {name} | {r['sparsity']:.0%} | {steps_cell} | {r['mlm_loss']:.3f} | "
                     f"{r['mlm_accuracy']:.3f} |")

    lines += decomposition_lines(mode_name, records, plots, page_dir)

    curves = retention_by_budget(records)
    budgets = sorted({b for c in curves.values() for b in c})
    if curves:
        lines += ["", "### Retention of dense accuracy vs upstream pruning budget (pofa arm; 0 = one-shot)", "",
                  "| task | sparsity | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for (task, sparsity), by_budget in sorted(curves.items()):
            lines.append(f"| {task} | {sparsity:.0%} | " + " | ".join(
                f"{100 * mean_std(by_budget[b])[0]:.1f}%" if by_budget.get(b) else "-" for b in budgets) + " |")
        tokens = {r["budget_steps"]: r["budget_tokens"] for r in up if r["arm"] == "pofa"}
        if tokens:
            lines += ["", "Tokens per budget: " + ", ".join(f"{b} steps = {tokens[b]:,} tokens"
                                                            for b in sorted(tokens)) + "."]
        lines += ["", f"![retention vs budget]"
                      f"({os.path.relpath(plots / f'{mode_name}-retention-vs-budget.png', page_dir)})"]

    seconds = stage_seconds(timing)
    if seconds:
        cpus = sorted({r["host"]["cpus"] for r in timing})
        lines += ["", f"### Time ({'/'.join(map(str, cpus))} CPU cores, {records[-1]['threads']} torch threads; "
                      "mean seconds per optimizer step, fine-tuning's evaluation included)", "",
                  "| stage | seconds per step |", "|---|---|"]
        for key in sorted(seconds):
            lines.append(f"| {key} | {seconds[key]:.2f} |")
        loads = [r["load"] for r in timing if "load" in r]
        if loads:
            shared = " (above the core count: the machine was shared, the times are slower)" \
                if max(loads) > max(cpus) else ""
            lines += ["", f"1-minute load average when the records were written: {min(loads):.1f} to "
                          f"{max(loads):.1f}{shared}."]
        base = MODES.get(mode_name.split("-x")[0])
        if base is not None:
            grid = Selection(ARMS, base.tasks, base.sparsities, base.seeds, (base.student_steps, *base.budgets))
            counts = stage_counts(grid)
            minutes = estimate_seconds(counts, seconds, teacher_steps=base.teacher_steps,
                                       finetune_steps=base.finetune["training.max_steps"]) / 60
            lines += ["", f"The whole {base.name} grid (`python bench/quality.py run"
                          f"{' --quick' if base is QUICK else ''}`: {', '.join(base.tasks)}, sparsities "
                          f"{', '.join(f'{s:.0%}' for s in base.sparsities)}, seeds {', '.join(map(str, base.seeds))},"
                          f" pofa budgets {', '.join(map(str, grid.budgets))} steps; {sum(counts.values())} stage "
                          f"runs) takes about {minutes:.{0 if minutes >= 10 else 1}f} minutes of training at these "
                          "speeds."]
    return lines


def report(results: Path, page: Path, plots: Path) -> Path:
    """Write `page` (Markdown tables) and the PNGs in `plots` from the JSON lines in `results`; returns the page."""
    records = latest(load_records(results))
    if not records:
        raise SystemExit(f"no records in {results}: run `python bench/quality.py run --quick` first")
    plots.mkdir(parents=True, exist_ok=True)
    page.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# pofa quality benchmark", "",
             f"Generated by `python bench/quality.py report` from `{os.path.relpath(results, page.parent)}`; do not "
             "edit by hand. What each arm is, and how the budget is shared, is the docstring of "
             "[`bench/quality.py`](quality.py). Accuracy is on each task's test split (movie reviews: the fixed "
             "10% test split, 1,056 sentences; SNLI: the official test set, 2,000 of it per seed in full mode); "
             "the upstream models are trained once and the seeds vary the fine-tuning.", ""]
    # Modes with fine-tuning results, real ones first; a mode that only prepared a teacher has no section.
    order = sorted({r["mode"] for r in records if r["kind"] == "finetune"}, key=lambda m: (m == "quick", m))
    for mode_name in order:
        mine = [r for r in records if r["mode"] == mode_name]
        plot_accuracy(mine, plots / f"{mode_name}-accuracy-vs-sparsity.png")
        if retention_by_budget(mine):
            plot_retention(mine, plots / f"{mode_name}-retention-vs-budget.png")
        timing = [r for r in records if r["mode"].split("-x")[0] == mode_name.split("-x")[0]]
        lines += mode_section(mode_name, mine, plots, page.parent, timing) + [""]
    page.write_text("\n".join(lines))
    return page


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _csv(kind, choices: Sequence[str] | None = None):
    def parse(text: str) -> tuple:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
        unknown = [v for v in values if choices is not None and v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list"
                                             + (f" of {', '.join(choices)}" if choices else ""))
        return values
    return parse


def selection_for(mode: Mode, args: argparse.Namespace) -> Selection:
    """The mode's default grid, narrowed or changed by --arms/--tasks/--sparsities/--seeds/--budgets."""
    budgets = (mode.student_steps, *[b for b in (args.budgets or mode.budgets) if b != mode.student_steps])
    selection = Selection(args.arms or ARMS, args.tasks or mode.tasks, args.sparsities or mode.sparsities,
                          args.seeds or mode.seeds, budgets)
    bad = [s for s in selection.sparsities if not 0.0 < s < 1.0]
    if bad:
        raise SystemExit(f"--sparsities: {bad} not in (0, 1)")
    if any(b < 2 for b in budgets):
        raise SystemExit("--budgets: a student needs at least 2 steps")
    return selection


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "plan"):
        p = sub.add_parser(name, help="run the benchmark" if name == "run" else "count the stage runs, estimate time")
        p.add_argument("--quick", action="store_true", help="tiny random BERT, tiny budget (CI)")
        p.add_argument("--arms", type=_csv(str, ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
        p.add_argument("--tasks", type=_csv(str, TASKS), help="movie_reviews, snli")
        p.add_argument("--sparsities", type=_csv(float), help="e.g. 0.8,0.9")
        p.add_argument("--seeds", type=_csv(int), help="fine-tuning seeds, e.g. 1,2,3")
        p.add_argument("--budgets", type=_csv(int), help="student steps of the pofa arm (besides the mode's own)")
        p.add_argument("--work-dir", type=Path, help="where models are written (default runs/bench-quality/MODE)")
        p.add_argument("--results", type=Path, default=RESULTS, help="JSON lines to append to (%(default)s)")
        p.add_argument("--no-reuse", action="store_true", help="retrain upstream models even if identical ones exist")
        p.add_argument("--scale", type=float, default=1.0,
                       help="multiply every method's budget (student and fine-tuning steps) by this; the records' "
                            "mode becomes MODE-xSCALE")
    r = sub.add_parser("report", help="write bench/RESULTS.md and its PNGs from the JSON lines")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--page", type=Path, default=PAGE)
    r.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args(argv)
    if args.command == "report":
        print(f"wrote {report(args.results, args.page, args.plots)}")
        return 0
    if not 0.0 < args.scale <= 1.0:
        raise SystemExit(f"--scale: {args.scale} not in (0, 1]")
    base = QUICK if args.quick else FULL
    mode = scaled(base, args.scale)
    selection = selection_for(mode, args)
    counts = stage_counts(selection)
    measured = stage_seconds([r for r in latest(load_records(args.results)) if r["mode"].split("-x")[0] == base.name])
    # What no earlier run measured comes from the quickstart (full mode).
    seconds = {**(QUICKSTART_SECONDS if base is FULL else {}), **measured}
    source = "measured in earlier runs" if measured else "the quickstart's stages on 2 cores"
    minutes = estimate_seconds(counts, seconds, teacher_steps=mode.teacher_steps,
                               finetune_steps=mode.finetune["training.max_steps"]) / 60
    estimate = f"; about {minutes:.0f} minutes ({source})" if seconds else ""
    print(f"plan: {sum(counts.values())} stage runs {counts}{estimate}", flush=True)
    if args.command == "plan":
        return 0
    work = args.work_dir or ROOT / "runs" / "bench-quality" / base.name  # a scaled run reuses the teacher
    records = run(mode, selection, work, args.results, reuse=not args.no_reuse)
    print(f"\n{len(records)} records appended to {args.results}; `python bench/quality.py report` writes the page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
