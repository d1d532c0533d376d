"""What differs between model families, in one place: a registry keyed by ``config.model_type``.

Pruning, masks, QAT, the compact format, ONNX export, the sparse runtime and the model card read a
:class:`ModelFamily` instead of carrying their own parameter-name patterns:

    family = family_of(model)                    # by model.config.model_type; unknown -> UnknownFamilyError
    family.targets                               # regexes of the encoder Linear weights to prune (all of them)
    family.masked_logits(mlm_model, hidden)      # vocabulary logits of selected hidden states
    family.input_names                           # what the tokenizer gives and the model reads (ONNX inputs)
    family.is_encoder_linear(fqn)                # QAT, compact and the sparse runtime act on these modules
    family.feed_forward_activation, .bert_blocks # what the sparse int8 runtime may fuse

Adding a family is one entry in ``FAMILIES`` plus its model type in tests/_tiny_families.py (``MODEL_TYPES``, and
``tiny_config`` if its config needs more than the common sizes) and its Linear count per block in
tests/unit/test_families.py. Those tests then check, on a tiny random config, that the targets are exactly the Linear
layers of the encoder blocks, that the masked logits equal the model's own, which inputs it reads, what QAT
quantizes, the pooler, what the sparse int8 runtime fuses, and the whole pipeline end to end
(tests/integration/test_families.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "FamilyError",
    "ModelFamily",
    "UnknownFamilyError",
    "ENCODER_BLOCK",
    "encoder_linear_weights",
    "family_of",
    "is_encoder_linear",
    "model_type_of",
    "pruning_targets",
]

# `(^|\.)` lets a pattern match `bert.encoder...`, a bare `encoder...` and wrapped names (`module.bert.encoder...`).
_BERT_BLOCKS = r"(^|\.)encoder\.layer\.\d+\."
_POOLER = r"(^|\.)pooler\.dense\.weight$"
_WITH_SEGMENTS = ("input_ids", "attention_mask", "token_type_ids")
_WITHOUT_SEGMENTS = ("input_ids", "attention_mask")


class FamilyError(ValueError):
    """A model, or a recipe's target set for it, that pofa's family registry cannot serve; the message says why."""


class UnknownFamilyError(FamilyError):
    """A model whose ``config.model_type`` has no entry in :data:`FAMILIES`."""


def _modules(*path: str) -> Callable[[nn.Module, Tensor], Tensor]:
    """Masked logits by applying the masked-LM model's submodules ``path`` in order (the head after the encoder)."""

    def masked_logits(model: nn.Module, hidden: Tensor) -> Tensor:
        for name in path:
            hidden = getattr(model, name)(hidden)
        return hidden

    masked_logits.__qualname__ = f"apply({', '.join(path)})"
    return masked_logits


def _deberta_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    # DeBERTa-v2/v3's current head reads the word embeddings as an argument (its decoder is tied to them); the
    # `legacy` head is an ordinary module.
    if getattr(model, "legacy", True) or not hasattr(model, "lm_predictions"):
        return model.cls(hidden)
    return model.lm_predictions(hidden, getattr(model, model.base_model_prefix).embeddings.word_embeddings)


@dataclass(frozen=True)
class ModelFamily:
    """Everything pofa must know about one architecture; see the module docstring for who reads what."""

    name: str
    """Display name, as the family writes itself (model card, tables)."""
    model_types: tuple[str, ...]
    """The ``config.model_type`` values of this family."""
    blocks: str
    """Regex (``re.search``) matching the qualified-name prefix of one encoder block; every ``nn.Linear`` under it is
    an encoder Linear: a pruning target, fake-quantized by QAT, stored sparse by the compact format and executed
    sparse by the runtime."""
    masked_logits: Callable[[nn.Module, Tensor], Tensor]
    """``masked_logits(mlm_model, hidden)``: vocabulary logits of hidden states ``[n, hidden]`` taken from the base
    model's output, so that only the positions that need them pay for the vocabulary projection."""
    input_names: tuple[str, ...] = _WITH_SEGMENTS
    """The model inputs the family's tokenizers produce and its models read, in ONNX input order."""
    pooler: str | None = _POOLER
    """Regex of the pre-trained pooler's weight (pruned with ``pruning.pooler``); None: the family has no pooler."""
    embeddings: str = r"(^|\.)embeddings\."
    """Regex of the embedding tables that QAT may fake-quantize (``quantization.quantize_embeddings``)."""
    feed_forward_activation: tuple[str, str] | None = ("intermediate.dense", "intermediate.intermediate_act_fn")
    """(Linear, activation module), by name inside a block, where the model applies the activation to that Linear's
    output and to nothing else: the sparse int8 runtime computes the activation in the Linear's kernel call (GELU)
    and drops the module. None: the family has no such pair (a gated feed-forward)."""
    bert_blocks: bool = False
    """Whether each block computes exactly BERT's post-LayerNorm layer under BERT's module names (attention.self.
    query/key/value, scaled dot-product attention, attention.output.dense + residual -> attention.output.LayerNorm,
    intermediate.dense + activation, output.dense + residual -> output.LayerNorm): the sparse int8 runtime then runs
    the block as one short function of its modules instead of the model's own forward (fewer calls)."""
    notes: str = ""
    """What differs from BERT, for the reader of the family table."""

    @cached_property
    def block_pattern(self) -> re.Pattern[str]:
        return re.compile(self.blocks)

    @property
    def targets(self) -> tuple[str, ...]:
        """Regexes of the pruning targets: every 2-D weight inside an encoder block (the blocks hold no 2-D weight
        but Linear ones in any registered family; tests/unit/test_families.py checks it per family)."""
        return (self.blocks + r".*\.weight$",)

    def is_encoder_linear(self, fqn: str) -> bool:
        """Whether the module at qualified name ``fqn`` lies inside an encoder block."""
        return self.block_pattern.search(fqn) is not None


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("BERT", ("bert",), _BERT_BLOCKS, _modules("cls"), bert_blocks=True),
    ModelFamily("RoBERTa", ("roberta", "xlm-roberta", "camembert"), _BERT_BLOCKS, _modules("lm_head"),
                input_names=_WITHOUT_SEGMENTS, bert_blocks=True,
                notes="one segment type: its tokenizers give no token_type_ids"),
    ModelFamily("DistilBERT", ("distilbert",), r"(^|\.)transformer\.layer\.\d+\.",
                _modules("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
                input_names=_WITHOUT_SEGMENTS, pooler=None, feed_forward_activation=("ffn.lin1", "ffn.activation"),
                notes="attention q_lin/k_lin/v_lin/out_lin, feed-forward lin1/lin2; no segments, no pooler"),
    ModelFamily("ELECTRA", ("electra",), _BERT_BLOCKS, _modules("generator_predictions", "generator_lm_head"),
                pooler=None, bert_blocks=True,
                notes="embeddings_project (embedding size to hidden size) is not in a block: dense"),
    ModelFamily("DeBERTa-v2", ("deberta-v2",), _BERT_BLOCKS, _deberta_logits, pooler=None,
                notes="query_proj/key_proj/value_proj (and pos_*_proj when attention keys are not shared); "
                      "the relative-position embeddings are not in a block: dense; the pooler belongs to the task "
                      "head, not the pre-trained model"),
    ModelFamily("ModernBERT", ("modernbert",), r"(^|\.)layers\.\d+\.", _modules("head", "decoder"),
                input_names=_WITHOUT_SEGMENTS, pooler=None, feed_forward_activation=None,
                notes="fused attention Wqkv (one target, pruned as one matrix) and gated Wi; no segments, no pooler"),
    ModelFamily("MPNet", ("mpnet",), _BERT_BLOCKS, _modules("lm_head"), input_names=_WITHOUT_SEGMENTS,
                notes="attention q/k/v/o; the relative attention bias is not in a block: dense; no segments"),
)
"""The registered families; a ``model_type`` belongs to at most one."""

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

ENCODER_BLOCK: re.Pattern[str] = re.compile("|".join(sorted({f"(?:{f.blocks})" for f in FAMILIES})))
"""Any registered family's encoder block, for code that sees names only (a state dict, a mask file)."""


def model_type_of(model_or_config: Any) -> str | None:
    """``config.model_type`` of a config, a model, or a wrapper around one (DDP, ``MaskedLM``); None if none."""
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if config is None and isinstance(model_or_config, nn.Module):
        config = next((m.config for m in model_or_config.modules() if hasattr(m, "config")), None)
    if config is None and hasattr(model_or_config, "model_type"):
        config = model_or_config
    return getattr(config, "model_type", None) if config is not None else None


def family_of(model_or_config: Any) -> ModelFamily:
    """The family of a model, its config, or a ``model_type`` string.

    Raises:
        UnknownFamilyError: naming the model type and what an entry needs.
    """
    model_type = model_type_of(model_or_config)
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnknownFamilyError(
            f"model_type {model_type!r} is not a model family pofa knows (known: {known}). To add it, append a "
            "ModelFamily to FAMILIES in pofa/families.py (the regex of its encoder blocks, its masked-LM head, its "
            "input names, its pooler) and its model type to tests/_tiny_families.py and tests/unit/test_families.py, "
            "which check the entry on a tiny random config"
        )
    return family


def is_encoder_linear(fqn: str) -> bool:
    """Whether the module at ``fqn`` lies in an encoder block of any registered family (for code that sees names
    only; with a model at hand, ``family_of(model).is_encoder_linear``)."""
    return ENCODER_BLOCK.search(fqn) is not None


def encoder_linear_weights(model: nn.Module) -> list[str]:
    """Parameter names of the weights of every ``nn.Linear`` (or subclass) inside the model's encoder blocks."""
    family = family_of(model)
    return [f"{fqn}.weight" for fqn, module in model.named_modules()
            if isinstance(module, nn.Linear) and family.is_encoder_linear(fqn)]


def pruning_targets(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = (), *,
                    pooler: bool = False, section: str = "pruning") -> list[str]:
    """Include regexes for the model's pruning targets: the recipe's ``include`` or the family's encoder Linears,
    plus the pooler with ``pooler``.

    Raises:
        UnknownFamilyError: for a model of no registered family.
        FamilyError: naming ``{section}.pooler`` when the family has no pooler, or ``{section}.include`` with every
            encoder Linear weight that the patterns leave out and ``{section}.exclude`` does not name: a Linear left
            dense must be excluded on purpose, never by a pattern that forgot it.
    """
    from pofa.sparsity.masks import select_targets

    family = family_of(model)
    patterns = list(include) or list(family.targets)
    if pooler:
        if family.pooler is None:
            raise FamilyError(f"{section}.pooler: {family.name} models have no pre-trained pooler; set it to false")
        patterns.append(family.pooler)
    params = list(model.named_parameters())
    selected = set(select_targets(params, patterns, exclude))
    excluded = {name for name, _ in params if any(re.search(p, name) for p in exclude)}
    left_out = [name for name in encoder_linear_weights(model) if name not in selected and name not in excluded]
    if left_out:
        shown = ", ".join(left_out[:8]) + (f", ... ({len(left_out)} in all)" if len(left_out) > 8 else "")
        raise FamilyError(
            f"{section}.include leaves encoder Linear weights of this {family.name} model dense: {shown}. Add "
            f"patterns for them to {section}.include, or list them in {section}.exclude to keep them dense on "
            "purpose"
        )
    return patterns
