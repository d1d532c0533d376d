"""Every shipped recipe, as it is on disk, runs two optimizer steps through its real stage.

Each file in pofa/recipes/ is loaded unchanged with `load_recipe` and only these dotted overrides, so that everything
else it sets (bf16, tensorboard, lr_rewind, distillation weights and positions, QAT, ONNX / compact export, sequence
lengths, batch sizes) is exercised as the recipe has it:

    model.name_or_path      a tiny random model of the same family (DistilBERT for distilbert recipes, else BERT),
                            sharing one small WordPiece tokenizer; for sparse transfer (sparsity.masks other than
                            none) a 90% sparse one, so the pattern lock has something to lock
    distillation.teacher    a tiny model of the same family (pre-training), or a tiny task model (fine-tuning)
    data.sources            each Hub or `files:` source replaced by a small local file of the same kind (Wikipedia:
                            JSON lines with id / url / title / text; BookCorpus: Parquet with text; a folder of
                            text files: a folder of text files); embedded sources are offline already and are kept
    data.cache_dir          a folder of this test session (the tokenized blocks are not written to ~/.cache)
    task.data_files         small local files with the task's columns and every split it evaluates
    training.output_dir     tmp_path
    training.max_steps      2, with the pruning steps scaled to fit (see `scaled_pruning`)
    training.per_device_batch_size   pre-training only: at most 8 (full-length packed blocks cost CPU time)

The tiny models have 512 positions, so no sequence length needs reducing; fine-tuning batches are padded per
batch, so its short local examples keep the runs fast at the recipes' own batch sizes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pofa.recipe import FinetuneRecipe, PretrainRecipe, load_recipe, recipe_class_for, shipped_recipes
from pofa.sparsity import DEFAULT_TARGETS, POOLER_TARGET, MaskStore, magnitude_masks, select_targets

pytestmark = pytest.mark.slow

RECIPES = list(shipped_recipes().values())
STEPS = 2
SPARSITY = 0.9  # of the tiny sparse model that sparse-transfer recipes start from
PRETRAIN_BATCH = 8  # at most, sequences per pre-training micro-step (see `overrides_for`)
WORDS = ("the value of an object is returned by the method when the class list holds a true number and an error "
         "is raised if the name is not found in the module").split()


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models, built once per session
# ---------------------------------------------------------------------------------------------------------------------


def family(raw: dict[str, Any], path: Path) -> str:
    """The model family a recipe trains: DistilBERT when the file or its model says so, else BERT."""
    return "distilbert" if "distilbert" in f"{path.name} {raw['model']['name_or_path']}".lower() else "bert"


def build_tiny_mlm(folder: Path, tokenizer_dir: Path, kind: str) -> Path:
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig,
                              DistilBertForMaskedLM)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=512)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=512))
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as distilbert-base-uncased's tokenizer
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_sparse(dense: Path, folder: Path, *, mask_file: bool) -> Path:
    """`dense` with SPARSITY of every encoder Linear weight and of the pooler zeroed by magnitude, as the authors
    pruned (and as `pruning.pooler` does), and its masks.safetensors."""
    from transformers import AutoTokenizer

    from pofa.modeling import load_mlm_model

    model = load_mlm_model(str(dense), keep_pooler=True)  # a pooler for the families that have one
    params = dict(model.named_parameters())
    targets = select_targets(params.items(), [*DEFAULT_TARGETS, POOLER_TARGET])
    masks = magnitude_masks({n: params[n].detach() for n in targets}, SPARSITY)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(dense).save_pretrained(folder)
    if mask_file:
        MaskStore(masks).save(folder / "masks.safetensors")
    return folder


class TinyModels:
    """Tiny model folders by role, built on first use and kept for the session."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir, self.folders = root, tokenizer_dir, {}

    def _get(self, key: str, build) -> Path:
        if key not in self.folders:
            self.folders[key] = build(self.root / key)
        return self.folders[key]

    def dense(self, kind: str) -> Path:
        return self._get(kind, lambda f: build_tiny_mlm(f, self.tokenizer_dir, kind))

    def sparse(self, kind: str, *, mask_file: bool) -> Path:
        """A sparse pre-trained model: from `pofa pretrain` (with masks.safetensors), or published (zeros only)."""
        return self._get(f"sparse-{kind}-{mask_file}", lambda f: build_sparse(self.dense(kind), f, mask_file=mask_file))

    def task_teacher(self, spec, kind: str) -> Path:
        """A dense tiny model with the task's head: what a dense fine-tuning (the task teacher) leaves."""
        def build(folder: Path) -> Path:
            from transformers import AutoTokenizer

            from pofa.finetune import load_task_model

            torch.manual_seed(1)
            load_task_model(str(self.dense(kind)), spec).save_pretrained(folder)
            AutoTokenizer.from_pretrained(self.dense(kind)).save_pretrained(folder)
            return folder

        return self._get(f"teacher-{kind}-{spec.name}", build)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("recipe_models"), tiny_tokenizer_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Small local data with the real sources' schemas
# ---------------------------------------------------------------------------------------------------------------------


def documents() -> list[str]:
    from pofa.data.corpus import python_docs_documents

    # About 15k tokens with the tiny tokenizer (over 100 blocks of 128): many batches, and a held-out block.
    return python_docs_documents()[:40]


def corpus_stand_in(source: dict[str, Any], root: Path) -> dict[str, Any]:
    """A local source with the schema of `source`: Wikipedia -> JSON lines, other Hub sets -> Parquet, files -> files.

    Written once per kind under `root`: the same files (path, size, mtime) hit the tokenized-block cache next time.
    """
    field = source.get("text_field", "text")
    kind = "wikipedia" if "wiki" in source.get("hub", "") else source.get("hub", "files").replace("/", "_")
    folder = root / f"{kind}-{field}"
    kept = {k: v for k, v in source.items() if k in ("text_field", "max_documents", "streaming")}
    if folder.is_dir():
        return {**kept, "files": [str(next(folder.iterdir()))]}
    docs = documents()
    folder.mkdir(parents=True)
    if kind == "wikipedia":
        path = folder / "wikipedia.jsonl"
        path.write_text("\n".join(json.dumps({"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}",
                                              "title": f"Article {i}", field: doc}) for i, doc in enumerate(docs)))
    elif "hub" in source:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / f"{kind}.parquet"
        pq.write_table(pa.table({field: docs}), path)
    else:  # `files:` sources: a folder of plain text files
        path = folder / "text_files"
        path.mkdir(exist_ok=True)
        for i in range(0, len(docs), 40):
            (path / f"part-{i}.txt").write_text("\n\n".join(docs[i : i + 40]))
    return {**kept, "files": [str(path)]}


def task_row(spec, rng: random.Random, i: int) -> dict[str, Any]:
    """One local example with `spec`'s columns: texts and a class id (cycling through the classes), a score in
    [0, 5] (regression), or a word list with a tag per word (token classification)."""
    if spec.kind == "token_classification":
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        names = spec.label_names or ("O", "B-X", "I-X")
        return {spec.text_fields[0]: words, spec.label_field: [names[(i + k) % len(names)] for k in range(len(words))]}
    label = round(rng.uniform(0, 5), 2) if spec.kind == "regression" else i % max(spec.num_labels, 2)
    return {**{f: " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for f in spec.text_fields},
            spec.label_field: label}


def task_stand_in(spec, root: Path, *, n_train: int = 40, n_eval: int = 12) -> dict[str, str]:
    """Local files for every split of `spec`: JSON lines with its columns, or the SQuAD v1.1 JSON layout.

    Written once per task under `root` (recipes of one task then reuse the `datasets` cache of the same files).
    40 training rows: one batch of the recipes' largest (32); the rows are short, so padded batches stay small.
    """
    folder = root / spec.name
    if folder.is_dir():
        return {split: str(next(folder.glob(f"{split}.json*"))) for split in spec.splits}
    folder.mkdir(parents=True)
    rng = random.Random(0)
    files = {}
    for split in spec.splits:
        n = n_train if split == "train" else n_eval
        if spec.kind == "question_answering":
            paragraphs = []
            for c in range(max(1, n // 4)):
                context = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
                answer = context.split()[-2]
                start = context.rindex(f" {answer} ") + 1
                qas = [{"id": f"{split}-{c}-{q}", "question": f"what is {' '.join(rng.choices(WORDS, k=3))}",
                        "answers": [{"text": answer, "answer_start": start}]} for q in range(4)]
                paragraphs.append({"context": context, "qas": qas})
            path = folder / f"{split}.json"
            path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
        else:
            path = folder / f"{split}.jsonl"
            rows = [task_row(spec, rng, i) for i in range(n)]
            path.write_text("\n".join(json.dumps(r) for r in rows))
        files[split] = str(path)
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------------------


PRUNING_STEPS = ("start_step", "end_step", "frequency", "end_pruning_step")


def scaled_pruning(pruning: dict[str, Any], max_steps: int, steps: int) -> dict[str, int]:
    """The pruning step fields of a recipe with `max_steps` scaled to a run of `steps`, keeping the schedule's shape.

    Each field (the recipe's, else PruningConfig's default) is multiplied by `steps / max_steps` and rounded, then
    held inside what a recipe may say: the ramp starts before the last step and lasts at least one step
    (start < end <= steps), masks are recomputed at least every step (frequency >= 1), and recomputation stops
    between the end of the ramp and the end of the run. The paper's 0 / 50k / every 1k / until 80k of 100k steps
    becomes 0 / 1 / every 1 / until 2 of 2 steps: pruning events at step 0 (the initial sparsity), 1 (the target)
    and 2, as the full schedule ramps, then holds while still recomputing, then stops.
    """
    from pofa.recipe import PruningConfig

    given = {k: pruning.get(k, getattr(PruningConfig(), k)) for k in PRUNING_STEPS}
    scale = steps / max_steps
    start = min(round(given["start_step"] * scale), steps - 1)
    end = min(max(round(given["end_step"] * scale), start + 1), steps)
    scaled = {"start_step": start, "end_step": end, "frequency": max(1, round(given["frequency"] * scale))}
    if given["end_pruning_step"] is not None:
        scaled["end_pruning_step"] = min(max(round(given["end_pruning_step"] * scale), end), steps)
    return scaled


def test_scaled_pruning_keeps_the_schedule_shape():
    paper = {"start_step": 0, "end_step": 50000, "frequency": 1000, "end_pruning_step": 80000}
    assert scaled_pruning(paper, 100000, 2) == {"start_step": 0, "end_step": 1, "frequency": 1, "end_pruning_step": 2}
    assert scaled_pruning(paper, 100000, 100) == {"start_step": 0, "end_step": 50, "frequency": 1,
                                                  "end_pruning_step": 80}
    late = {"start_step": 90, "end_step": 100, "frequency": 5}
    assert scaled_pruning(late, 100, 2) == {"start_step": 1, "end_step": 2, "frequency": 1}


def overrides_for(path: Path, raw: dict[str, Any], tiny: TinyModels, tmp_path: Path, data_root: Path) -> list[str]:
    """The dotted overrides that shrink `path`'s recipe to tiny models, local data and two steps."""
    values: dict[str, Any] = {"training.output_dir": str(tmp_path / "out"), "training.max_steps": STEPS}
    kind = family(raw, path)
    if recipe_class_for(path) is PretrainRecipe:
        values["model.name_or_path"] = str(tiny.dense(kind))
        sources = raw.get("data", {}).get("sources") or [{"embedded": "python-docs"}]
        values["data.sources"] = [source if "embedded" in source else
                                  corpus_stand_in(source, data_root / "corpus")
                                  for source in sources]
        values["data.cache_dir"] = str(data_root / "blocks")
        # Packed blocks are full length, so a CPU step costs in proportion to the batch (32 x 128 tokens: about a
        # second per forward and backward here, student and teacher). 8 sequences go through the same code (masking,
        # distillation at every position, pruning); accumulation and the sequence length stay the recipe's.
        training = {**dataclasses.asdict(PretrainRecipe().training), **raw.get("training", {})}
        values["training.per_device_batch_size"] = min(training["per_device_batch_size"], PRETRAIN_BATCH)
        if raw.get("distillation", {}).get("teacher"):
            values["distillation.teacher"] = str(tiny.dense(kind))
        if raw.get("pruning"):
            values.update({f"pruning.{k}": v for k, v in scaled_pruning(raw["pruning"], training["max_steps"],
                                                                        STEPS).items()})
    else:
        from pofa.data.tasks import recipe_task_spec

        spec = recipe_task_spec(load_recipe(path, (), FinetuneRecipe).task)
        sparse = raw.get("sparsity", {}).get("masks", "auto") != "none"
        # A model of a former pofa stage (runs/...) has masks.safetensors; a published sparse model only its zeros.
        from_pofa = raw["model"]["name_or_path"].startswith("runs/")
        values["model.name_or_path"] = str(tiny.sparse(kind, mask_file=from_pofa) if sparse else tiny.dense(kind))
        values["task.data_files"] = task_stand_in(spec, data_root / "tasks")
        if raw.get("distillation", {}).get("teacher"):
            values["distillation.teacher"] = str(tiny.task_teacher(spec, kind))
    if raw.get("model", {}).get("tokenizer"):
        values["model.tokenizer"] = values["model.name_or_path"]
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON is YAML: paths stay strings


# ---------------------------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------------------------


def encoder_zeros(folder: Path) -> dict[str, torch.Tensor]:
    """Encoder Linear weight name (from `encoder.` on) -> where it is exactly zero."""
    weights = load_file(folder / "model.safetensors")
    return {n.split("encoder.", 1)[1]: weights[n] == 0 for n in select_targets(weights.items(), DEFAULT_TARGETS)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Local stand-in data (`corpus/`, `tasks/`) and the tokenized-block cache (`blocks/`), shared by the recipes."""
    return tmp_path_factory.mktemp("recipe_data")


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 20, RECIPES
    assert {recipe_class_for(p) for p in RECIPES} == {PretrainRecipe, FinetuneRecipe}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps(path, tiny, data_root, tmp_path):
    from pofa.checkpoint import complete_checkpoints

    raw = yaml.safe_load(path.read_text())
    cls = recipe_class_for(path)
    recipe = load_recipe(path, overrides_for(path, raw, tiny, tmp_path, data_root), cls)
    if cls is PretrainRecipe:
        from pofa.pretrain import train

        result = train(recipe)
        assert result.steps == STEPS
        assert json.loads((result.final_dir / "train_results.json").read_text())["step"] == STEPS
    else:
        from pofa.finetune import finetune

        result = finetune(recipe)
    out = Path(recipe.training.output_dir)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")][-1] == f"step-{STEPS:08d}"
    final = result.final_dir
    assert final == out / "final" and (final / "config.json").is_file() and (final / "recipe.yaml").is_file()
    weights = load_file(final / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    if recipe.training.trackers:
        assert list(out.rglob("events.out.tfevents.*")), "trackers: [tensorboard] wrote no event file"

    if cls is PretrainRecipe and recipe.pruning.enabled:  # student: masks saved, the target reached, zeros kept
        masks = MaskStore.load(final / "masks.safetensors")
        assert masks.sparsity() == pytest.approx(recipe.pruning.target_sparsity, abs=0.01)
        for name, mask in masks.items():
            assert torch.equal(weights[name] != 0, mask), name
    elif cls is PretrainRecipe:
        assert not (final / "masks.safetensors").exists()
    else:
        from pofa.data.tasks import metric_keys, recipe_task_spec

        spec = recipe_task_spec(recipe.task)
        evaluation = json.loads((final / "eval_results.json").read_text())
        assert set(evaluation["metrics"]) == set(metric_keys(spec))
        if recipe.sparsity.masks == "none":
            assert result.sparsity is None and not (final / "masks.safetensors").exists()
        else:  # sparse transfer: the input's zero pattern, exactly
            assert result.sparsity == pytest.approx(SPARSITY, abs=0.01)
            assert (final / "masks.safetensors").is_file()
            before, after = encoder_zeros(Path(recipe.model.name_or_path)), encoder_zeros(final)
            assert before.keys() == after.keys() and before
            assert all(torch.equal(before[n], after[n]) for n in before)
        assert (final / "compact.safetensors").is_file() == recipe.export.compact
        assert (final / "model.onnx").is_file() == recipe.export.onnx
