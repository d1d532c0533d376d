"""Beyond pruning: low-rank, Kronecker and cross-layer tensor decomposition, and ROSITA's structured pruning, each a
config plus an in-place verb in the shape of `pofa.quant.prepare_qat_`:

    low_rank_(model, LowRankConfig(rank=64 | energy=0.9, embeddings=True), filter_fn)   # pofa.decompose.lowrank
    kronecker_(model, KroneckerConfig(terms=4), filter_fn)                               # pofa.decompose.kronecker
    tensor_(model, TensorConfig(rank=256, bank=None), filter_fn)                         # pofa.decompose.tensor
    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))                       # pofa.decompose.structured
    Decomposer.for_stage(section, model, run)        # ROSITA's iterative schedule, in a stage   # pofa.decompose.schedule

`filter_fn(module, fqn)` (fqn relative to the base model) picks among the plain `nn.Linear`s; default: the model
family's encoder blocks. Each verb records what it built in `model.config.pofa_decomposition`; `save_pretrained`
writes a normal Hugging Face folder (config.json with that entry, safetensors with the factors), and
`load_decomposed(folder)` rebuilds the structure from the config before loading the weights: no custom code in the
folder, no `trust_remote_code`. A plain `from_pretrained` of such a folder would build the dense architecture and
drop the factors, so pofa's loaders (`pofa.modeling.load_mlm_model`, `pofa.finetune.load_task_model`) call
`load_decomposed` whenever the config has the entry. Every module computes with standard ops: `pofa.quant.
export_onnx(..., int8=False)` exports it.

With QAT (`pofa.quant.prepare_qat_`, then `export_onnx(..., int8=True)`): low-rank factors and structurally pruned
Linears are plain `nn.Linear`s in the encoder blocks, fake-quantized and exported as int8 MatMuls like any other
(`tests/unit/decompose`: ONNX parity). Kronecker factors and the tensor decomposition's cores and shared basis are
refused (`check_quantizable`): they are not Linears, so QAT would leave them float while quantizing whatever Linears
remain, a model that is int8 in name only; and int8 does not carry over to them: their forward multiplies reshaped
activations by each factor in turn, so the error of every int8 factor multiplies into W (A (x) B; U S V^T with one
scale for a basis that all layers share), and onnxruntime has no int8 kernel for those reshaped batched products.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pofa.decompose.common import CONFIG_KEY, base_of, decomposition_record, encoder_filter
from pofa.decompose.kronecker import KroneckerConfig, KroneckerLinear, kronecker_, rebuild_kronecker_
from pofa.decompose.lowrank import (LowRankConfig, LowRankDecoder, LowRankEmbedding, LowRankLinear, low_rank_,
                                    rebuild_low_rank_)
from pofa.decompose.schedule import Decomposer
from pofa.decompose.structured import StructuredConfig, prune_structured_, rebuild_structured_
from pofa.decompose.tensor import SharedBasis, TensorConfig, TuckerLinear, rebuild_tensor_, tensor_

__all__ = [
    "CONFIG_KEY",
    "Decomposer",
    "KroneckerConfig",
    "KroneckerLinear",
    "LowRankConfig",
    "LowRankDecoder",
    "LowRankEmbedding",
    "LowRankLinear",
    "SharedBasis",
    "StructuredConfig",
    "TensorConfig",
    "TuckerLinear",
    "apply_recipe_",
    "check_quantizable",
    "decomposition_record",
    "is_decomposed",
    "kronecker_",
    "load_decomposed",
    "low_rank_",
    "parameter_count",
    "prune_structured_",
    "rebuild_",
    "tensor_",
]

# The order in which a record is rebuilt: structured pruning slices plain Linears, which the factorizations replace.
_REBUILD = (("structured", rebuild_structured_), ("lowrank", rebuild_low_rank_), ("kronecker", rebuild_kronecker_),
            ("tensor", rebuild_tensor_))


def rebuild_(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the structure of `record` (a config's `pofa_decomposition`), weights unset."""
    unknown = sorted(set(record) - {kind for kind, _ in _REBUILD})
    if unknown:
        raise ValueError(f"{CONFIG_KEY}: unknown decomposition(s) {unknown}; known: {[k for k, _ in _REBUILD]}")
    for kind, rebuild in _REBUILD:
        if kind in record:
            rebuild(model, record[kind])
    return model


def is_decomposed(folder_or_config: Any) -> bool:
    """Whether a model folder's config.json (or a config object) records a decomposition."""
    if isinstance(folder_or_config, (str, Path)):
        path = Path(folder_or_config) / "config.json"
        return path.is_file() and bool(json.loads(path.read_text()).get(CONFIG_KEY))
    return bool(decomposition_record(folder_or_config))


def _state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(folder / f).items()}
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"load_decomposed: no model.safetensors in {folder}")
    return load_file(folder / "model.safetensors")


def _architecture(config) -> type[nn.Module]:
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names or not hasattr(transformers, names[0]):
        raise ValueError(f"load_decomposed: the config names no known architecture ({names!r}); pass auto_class")
    return getattr(transformers, names[0])


def load_decomposed(folder: str | Path, auto_class: Any = None, *, dtype: torch.dtype | None = None,
                    **config_kwargs: Any) -> nn.Module:
    """A model saved after decomposition: its config (with `config_kwargs`, e.g. `num_labels`), the architecture of
    `auto_class` (an `AutoModelFor...` or a model class; default: the config's `architectures[0]`), the recorded
    structure, then the folder's weights, in eval mode.

    As `from_pretrained`, a head the checkpoint lacks (a task head on a masked-LM student) keeps its fresh weights,
    and a base-model prefix is added or removed as the class needs. Raises ValueError naming the weights of the base
    model (encoder, factors, embeddings) that the folder lacks."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    record = decomposition_record(config)
    if not record:
        raise ValueError(f"load_decomposed: {folder}/config.json has no {CONFIG_KEY} entry; load it with "
                         "from_pretrained")
    cls = auto_class or _architecture(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    rebuild_(model, record)
    saved = _state_dict_of(folder)
    own = model.state_dict()
    prefix = f"{model.base_model_prefix}."
    base_only = base_of(model) is model

    def mapped(name: str) -> str:
        if base_only:
            return name.removeprefix(prefix)
        return name if name in own or name.startswith(prefix) else prefix + name

    state = {mapped(k): v for k, v in saved.items()}
    state = {k: v for k, v in state.items() if k in own}
    base_names = [k for k, _ in base_of(model).named_parameters()]
    base_keys = {(k if base_only else prefix + k) for k in base_names}
    missing = sorted(k for k in base_keys if k not in state and ".pooler." not in f".{k}")
    if missing:
        raise ValueError(f"load_decomposed: {folder} lacks {len(missing)} weight(s) of the decomposed model: "
                         f"{', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_quantizable(model: nn.Module) -> None:
    """Raise ValueError if `model` holds Kronecker or tensor factors, which int8 QAT cannot serve (module docstring)."""
    from pofa.decompose.kronecker import KroneckerLinear
    from pofa.decompose.tensor import TuckerLinear

    found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (KroneckerLinear, TuckerLinear))})
    if found:
        raise ValueError(f"int8 QAT: the model holds {' and '.join(found)} modules (decomposition "
                         f"{sorted(decomposition_record(model))}); their factors are not Linears, so QAT would leave "
                         "them float, and int8 factors of a Kronecker or shared-basis product multiply their errors "
                         "and get no int8 kernel in onnxruntime. Quantize a low-rank (or structurally pruned) model, "
                         "or export this one as float (int8=False)")


def apply_recipe_(model: nn.Module, section: Any) -> str | None:
    """Apply a recipe's `decomposition` section (`pofa.recipe.DecompositionConfig`) to `model` in place: first the
    structured pruning it asks for (`heads`, `ffn` < 1), then its `method`'s factorization of the selected Linears.
    With `schedule: iterative` nothing changes now (the model starts uncompressed; `Decomposer` compresses it at the
    schedule's events). Returns a line for the console, or None when the section asks for nothing."""
    structured = section.heads < 1.0 or section.ffn < 1.0
    if section.method == "none" and not structured:
        return None
    if section.schedule == "iterative":
        targets = [f"{name} {getattr(section, name):g}" for name in ("heads", "ffn") if getattr(section, name) < 1.0]
        if section.method == "lowrank":
            targets.append(f"rank {section.rank}" if section.rank is not None else f"energy {section.energy:g}")
            if section.embeddings:
                targets.append(f"embedding rank {section.embedding_rank or section.rank or 'by energy'}")
        return (f"decomposition: iterative (ROSITA), from the dense model to {', '.join(targets)} at events every "
                f"{section.frequency} steps from step {section.start_step} to {section.end_step}")
    before = parameter_count(model)
    if structured:
        prune_structured_(model, StructuredConfig(heads=section.heads, ffn=section.ffn))
    select = encoder_filter(model, section.include, section.exclude)
    if section.method == "lowrank":
        low_rank_(model, LowRankConfig(rank=section.rank, energy=section.energy, embeddings=section.embeddings,
                                       embedding_rank=section.embedding_rank), select)
    elif section.method == "kronecker":
        kronecker_(model, KroneckerConfig(terms=section.terms), select)
    elif section.method == "tensor":
        tensor_(model, TensorConfig(rank=section.rank, bank=section.bank), select)
    after = parameter_count(model)
    done = ", ".join(decomposition_record(model))
    return f"decomposition ({done}): {before / 1e6:.2f} M -> {after / 1e6:.2f} M parameters ({before / after:.1f}x)"
