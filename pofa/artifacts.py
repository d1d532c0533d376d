"""Every file name a pofa folder may hold, in one place.

A `final/` folder written by `pofa pretrain` or `pofa finetune` (and a checkpoint folder) is a normal Hugging Face
model folder plus the files below. Writers (the stages, `pofa export`, the QAT export), readers (the model card,
`pofa push`, `load_compact_model`, the runtime, the quickstart) and the tests name them through these constants,
so a renamed file cannot leave a reader behind.
"""

from __future__ import annotations

RECIPE_FILE = "recipe.yaml"
"""The resolved recipe that made the folder (every field, defaults included)."""

MASKS_FILE = "masks.safetensors"
"""The bit-packed MaskStore of a sparse model (True = kept)."""

PRUNED_VALUES_FILE = "pruned_values.safetensors"
"""Inside a student's checkpoint with `pruning.revive`: the values pruned weights had when pruned (PrunedValues)."""

SPARSITY_FILE = "sparsity.json"
"""Per-layer sparsity report of the masked weights."""

COMPACT_FILE = "compact.safetensors"
"""The compact format: bitmask plus non-zero values (int8 with scales after QAT)."""

ONNX_FILE = "model.onnx"
"""ONNX export of the model: float for a plain model, int8 QDQ for a model trained with QAT."""

EVAL_RESULTS_FILE = "eval_results.json"
"""A fine-tuned model's task, data set and evaluation metrics."""

TRAIN_RESULTS_FILE = "train_results.json"
"""A pre-trained model's held-out MLM metrics before and after its stage."""

TRAINER_STATE_FILE = "trainer_state.json"
"""Inside a checkpoint: the step and counters; written last, so its presence marks a complete checkpoint."""

DECOMPOSITION_FILE = "decomposition.json"
"""Inside a checkpoint of an iterative decomposition run: the model's structure at that step (its config's
`pofa_decomposition`), rebuilt on resume before the weights load."""

SEEDS_FILE = "seeds.json"
"""Beside the per-seed runs of `pofa finetune --seeds`: each seed's metrics and their mean and spread."""

CARD_FILE = "README.md"
"""The generated model card."""

FINAL_DIR = "final"
"""Sub-folder of a run's output folder that holds its final model."""

CHECKPOINTS_DIR = "checkpoints"
"""Sub-folder of a run's output folder that holds its resumable checkpoints."""
