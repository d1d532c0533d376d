"""Compact sparse checkpoints: one safetensors file with bitmask + non-zero values for the sparse weights.

Usage::

    from pofa.artifacts import COMPACT_FILE
    from pofa.compact import save_compact, load_compact, load_compact_model, compact_size_report
    save_compact(model, final_dir / COMPACT_FILE, masks=masks)   # int8 automatically after QAT
    state_dict = load_compact(final_dir / COMPACT_FILE)          # dense again, lossless
    model = load_compact_model(final_dir / COMPACT_FILE, final_dir)
    print(compact_size_report(final_dir / COMPACT_FILE))

In a pofa folder the file is ``pofa.artifacts.COMPACT_FILE`` (``compact.safetensors``), beside the ``config.json``
that ``load_compact_model`` builds the model from (a folder or a Hub id).

Layout (format version 2). For each compacted 2-D weight ``W`` (the masked ones, or, without masks, every encoder
Linear weight, plus every weight quantized by QAT):

- ``W/bitmask``: uint8, ``np.packbits`` of the row-major kept-pattern (True = kept), ``ceil(numel / 8)`` bytes,
  compressed with the entry's ``codec`` (``zlib`` by default, or ``lzma``; ``none`` and version-1 files: raw);
- ``W/values``: the kept values in row-major order: the weight's dtype (or ``values_dtype``), or int8 after QAT
  (int8 values are compressed with the ``codec`` too, stored as uint8 bytes; float values never are);
- ``W/scale``: float32 per-row (or single) scale, int8 weights only (symmetric, zero-point 0: ``w = q * scale``).

Why a compressor: at 90% sparsity the bitmask's 1 bit per weight holds about 0.47 bit of information (the binary
entropy of 0.1), more than the 0.8 bit per weight of the int8 values themselves. zlib codes the packed bitmask in
about 0.53-0.55 bit per weight (lzma 0.48, slower to load), and int8 values of trained weights about 10% smaller;
the encoder Linear weights of a 90%-sparse int8 model are then about 23x smaller than fp32 (17x with the raw
bitmask). Version 1 files (raw bitmask) are still read.

Every other tensor is stored as it is under its own name; a tensor that shares storage with another one (tied
weights) is stored once and recorded as an alias. The metadata key ``pofa`` holds JSON: format name and version,
per compacted tensor its shape, dtype and encoding, the aliases, the saved model's class name, and for QAT models
the QAT config, the quantized module names and their activation scale/zero-point (so the file alone is enough to
deploy int8).

Lossless: the float encoding rebuilds every value bitwise; pruned positions come back as +0.0 (a ``-0.0`` left by
masking, equal as a number, loses its sign). The int8 encoding rebuilds ``q * scale``, bitwise equal to the
fake-quantized weight the QAT model computed.
"""

from __future__ import annotations

import json
import lzma
import math
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pofa.families import ENCODER_BLOCK
from pofa.quant.qat import (
    QATConfig,
    QuantizedModule,
    convert_to_int8,
    freeze_observers_,
    is_qat_prepared,
    prepare_qat_,
    qat_modules,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CompactFormatError",
    "save_compact",
    "load_compact",
    "load_compact_model",
    "compact_size_report",
    "default_compact_targets",
    "read_compact_header",
    "model_class_for",
    "CODECS",
]

FORMAT_NAME = "pofa-compact"
FORMAT_VERSION = 2
_SUPPORTED_VERSIONS = (1, 2)
CODECS = ("zlib", "lzma", "none")
"""Compressors of the bitmask and int8 values (:func:`save_compact`'s ``codec``), all in Python's standard library."""
# 2-D `.weight` tensors of any registered family's encoder blocks (pofa.families) are its Linear weights.
_ENCODER_LINEAR_WEIGHT = re.compile(rf"(?:{ENCODER_BLOCK.pattern}).*\.weight$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CompactFormatError(ValueError):
    """A compact checkpoint that cannot be read: corrupt, truncated, not ours, or an unknown format version."""


def default_compact_targets(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The 2-D ``.weight`` tensors inside the encoder blocks of any registered family (`pofa.families`)."""
    return [k for k, v in state_dict.items() if v.dim() == 2 and _ENCODER_LINEAR_WEIGHT.search(k)]


def _storage_key(t: Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dedupe(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors sharing storage (tied weights) kept once: (unique tensors, alias -> kept name)."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if "/" in name:
            raise ValueError(f"save_compact: tensor name {name!r} contains '/', which the compact format reserves")
        key = _storage_key(tensor) if tensor.numel() else (name,)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach()
    return unique, aliases


def _packed(kept: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(kept.reshape(-1).cpu().numpy().astype(np.bool_)))


def _compress(data: Tensor, codec: str) -> Tensor:
    """The bytes of ``data`` compressed with ``codec``, as a uint8 tensor (``none``: the tensor itself)."""
    if codec == "none":
        return data
    raw = data.contiguous().numpy().tobytes()
    packed = zlib.compress(raw, 9) if codec == "zlib" else lzma.compress(raw)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def _decompress(data: Tensor, codec: str, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_compress`; raises :class:`zlib.error` / :class:`lzma.LZMAError` on corrupt bytes."""
    if codec == "none":
        return data
    raw = zlib.decompress(data.numpy().tobytes()) if codec == "zlib" else lzma.decompress(data.numpy().tobytes())
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _resolve_int8(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], int8: bool | Mapping[str, QuantizedModule] | None
) -> dict[str, QuantizedModule]:
    if isinstance(int8, Mapping):
        return dict(int8)
    is_model = isinstance(model_or_state_dict, nn.Module)
    prepared = is_model and is_qat_prepared(model_or_state_dict)  # type: ignore[arg-type]
    if int8 is None:
        return convert_to_int8(model_or_state_dict) if prepared else {}  # type: ignore[arg-type]
    if not int8:
        return {}
    if not prepared:
        raise ValueError(
            "save_compact(int8=True) needs a model prepared for QAT (pofa.quant.prepare_qat_ and a QAT run), or "
            "int8=pofa.quant.convert_to_int8(qat_model) when saving a state dict; use int8=False for float values"
        )
    return convert_to_int8(model_or_state_dict)  # type: ignore[arg-type]


def save_compact(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | Path,
    *,
    masks: Mapping[str, Tensor] | None = None,
    int8: bool | Mapping[str, QuantizedModule] | None = None,
    values_dtype: torch.dtype | None = None,
    codec: str = "zlib",
) -> Path:
    """Write the compact checkpoint of a model or state dict to ``path`` (one safetensors file); return the path.

    Compacted: the weights named in ``masks`` (bool, True = kept), or without masks every encoder Linear weight
    (kept = non-zero), plus every weight that ``int8`` quantizes. ``int8``: None = int8 when the model is prepared
    for QAT; True = require that; False = float values; or the mapping from :func:`pofa.quant.convert_to_int8`.
    ``values_dtype`` (e.g. ``torch.float16``) stores float values narrower, lossy; default: the weight's dtype.
    ``codec`` compresses the bitmasks and int8 values (one of :data:`CODECS`; lossless; see the module docstring).
    Raises if a mask does not match its weight, if a weight is non-zero where its mask is False, or on an unknown
    codec.
    """
    if codec not in CODECS:
        raise ValueError(f"save_compact: codec must be one of {list(CODECS)}, got {codec!r}")
    path = Path(path)
    is_model = isinstance(model_or_state_dict, nn.Module)
    quantized = _resolve_int8(model_or_state_dict, int8)
    state = model_or_state_dict.state_dict() if is_model else dict(model_or_state_dict)  # type: ignore[union-attr]
    unique, aliases = _dedupe(state)

    def canonical(name: str, what: str) -> str:
        name = aliases.get(name, name)
        if name not in unique:
            raise ValueError(f"save_compact: {what} names {name!r}, which is not in the state dict")
        return name

    masks = {canonical(k, "masks"): v for k, v in (masks or {}).items()}
    int8_weights = {canonical(f"{m}.weight", "int8"): q for m, q in quantized.items()}
    targets = list(masks) if masks else default_compact_targets(unique)
    targets += [k for k in int8_weights if k not in targets]

    tensors: dict[str, Tensor] = {}
    compact: dict[str, dict[str, Any]] = {}
    for name, tensor in unique.items():
        if name not in targets:
            tensors[name] = tensor.contiguous().cpu()
            continue
        if tensor.dim() != 2:
            raise ValueError(f"save_compact: {name!r} has shape {tuple(tensor.shape)}; only 2-D weights are compacted")
        entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        q = int8_weights.get(name)
        values_source = tensor.cpu() if q is None else q.weight.q.cpu()
        if name in masks:
            kept = masks[name].to(device="cpu", dtype=torch.bool)
            if kept.shape != tensor.shape:
                raise ValueError(
                    f"save_compact: mask of {name!r} has shape {tuple(kept.shape)}, its weight {tuple(tensor.shape)}"
                )
            outside = int(torch.count_nonzero(values_source[~kept]))
            if outside:
                raise ValueError(
                    f"save_compact: {name!r} has {outside} non-zero values where its mask is False; apply the masks "
                    "to the weights first (pruned weights must be exactly 0)"
                )
        else:
            kept = values_source != 0
        tensors[f"{name}/bitmask"] = _compress(_packed(kept), codec)
        entry["codec"] = codec
        if q is None:
            entry["encoding"] = "bitmask"
            tensors[f"{name}/values"] = values_source[kept].to(values_dtype or tensor.dtype).contiguous()
        else:
            entry["encoding"] = "bitmask_int8"
            entry["bits"] = q.weight.bits
            tensors[f"{name}/values"] = _compress(values_source[kept].contiguous(), codec)
            tensors[f"{name}/scale"] = q.weight.scale.detach().float().cpu().contiguous()
        entry["n_kept"] = int(kept.sum())
        compact[name] = entry

    header: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "compact": compact,
                              "aliases": aliases}
    if quantized:
        header["int8"] = {
            "modules": {
                m: None if q.activation is None else {
                    "act_scale": q.activation.scale, "act_zero_point": q.activation.zero_point,
                    "act_bits": q.activation.bits,
                }
                for m, q in quantized.items()
            }
        }
    if is_model:
        header["model_class"] = type(model_or_state_dict).__name__
    if is_model and is_qat_prepared(model_or_state_dict):  # type: ignore[arg-type]
        modules = qat_modules(model_or_state_dict)  # type: ignore[arg-type]
        header["qat"] = {"config": next(iter(modules.values())).config.to_dict(), "modules": list(modules)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT_NAME, "pofa": json.dumps(header)})
    return path


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a corrupt or truncated file
        raise CompactFormatError(f"{path}: not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    if metadata.get("format") != FORMAT_NAME or "pofa" not in metadata:
        raise CompactFormatError(f"{path}: not a pofa compact checkpoint (metadata format={metadata.get('format')!r})")
    try:
        header = json.loads(metadata["pofa"])
    except json.JSONDecodeError as exc:
        raise CompactFormatError(f"{path}: corrupt pofa metadata: {exc}") from exc
    version = header.get("format_version")
    if version not in _SUPPORTED_VERSIONS:
        raise CompactFormatError(
            f"{path}: unknown compact format version {version!r}; this pofa reads versions {list(_SUPPORTED_VERSIONS)} "
            "(upgrade pofa to read newer files)"
        )
    return header


def read_compact_header(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a compact checkpoint (``"int8"`` present: a QAT model's); raises
    :class:`CompactFormatError` as :func:`load_compact` does."""
    return _read_header(Path(path))


def _rebuild(path: Path, name: str, entry: Mapping[str, Any], parts: Mapping[str, Tensor]) -> Tensor:
    shape = tuple(entry["shape"])
    numel = math.prod(shape)
    dtype = getattr(torch, entry["dtype"])
    codec = entry.get("codec", "none")  # version 1: raw
    if codec not in CODECS:
        raise CompactFormatError(f"{path}: {name}: unknown codec {codec!r}")
    values_codec = codec if entry["encoding"] == "bitmask_int8" else "none"
    try:
        bitmask = _decompress(parts["bitmask"], codec, torch.uint8)
        values = _decompress(parts["values"], values_codec, torch.int8)
    except (zlib.error, lzma.LZMAError) as exc:
        raise CompactFormatError(f"{path}: {name}: corrupt {codec} data: {exc}") from exc
    if bitmask.numel() != (numel + 7) // 8:
        raise CompactFormatError(
            f"{path}: {name}: bitmask has {bitmask.numel()} bytes, shape {shape} needs {(numel + 7) // 8}"
        )
    kept = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=numel).astype(np.bool_))
    n_kept = int(kept.sum())
    if n_kept != values.numel() or n_kept != entry.get("n_kept", n_kept):
        raise CompactFormatError(f"{path}: {name}: bitmask keeps {n_kept} values but the file holds {values.numel()}")
    if entry["encoding"] == "bitmask":
        dense = torch.zeros(numel, dtype=dtype)
        dense[kept] = values.to(dtype)
        return dense.reshape(shape)
    if entry["encoding"] == "bitmask_int8":
        q = torch.zeros(numel, dtype=torch.int8)
        q[kept] = values
        scale = parts.get("scale")
        if scale is None or scale.numel() not in (1, shape[0]):
            raise CompactFormatError(f"{path}: {name}: missing or mis-shaped int8 scale")
        return (q.reshape(shape).float() * scale.float().reshape(-1, 1)).to(dtype)
    raise CompactFormatError(f"{path}: {name}: unknown encoding {entry['encoding']!r}")


def load_compact(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict stored in a compact checkpoint (tied names share one tensor).

    Raises :class:`CompactFormatError` naming the file if it is corrupt, truncated, not a pofa compact file, or of
    an unknown format version.
    """
    path = Path(path)
    header = _read_header(path)
    compact: dict[str, dict[str, Any]] = header.get("compact", {})
    state: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in compact}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                base, sep, part = key.rpartition("/")
                if sep and base in parts:
                    parts[base][part] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key)
    except Exception as exc:
        raise CompactFormatError(f"{path}: cannot read tensors (corrupt or truncated?): {exc}") from exc
    for name, entry in compact.items():
        missing = {"bitmask", "values"} - set(parts[name])
        if missing:
            raise CompactFormatError(f"{path}: {name}: missing part(s) {sorted(missing)}")
        state[name] = _rebuild(path, name, entry, parts[name])
    for alias, target in header.get("aliases", {}).items():
        if target not in state:
            raise CompactFormatError(f"{path}: alias {alias!r} points to {target!r}, which the file does not hold")
        state[alias] = state[target]
    return state


def model_class_for(config: Any, saved_name: str | None) -> type[nn.Module]:
    """The transformers class named ``saved_name`` if it has one, else ``config.architectures[0]``'s, else
    ``AutoModel``."""
    import transformers

    for name in [saved_name, *(getattr(config, "architectures", None) or [])]:
        cls = getattr(transformers, name, None) if name else None
        if cls is not None:
            return cls
    return transformers.AutoModel  # type: ignore[return-value]


def load_compact_model(
    path: str | Path, config_dir: str | Path, *, model_class: type[nn.Module] | None = None
) -> nn.Module:
    """The HF model of ``config_dir`` with the weights of a compact checkpoint, in eval mode.

    The class is ``model_class``, else the class the checkpoint was saved from (recorded when a model, not a state
    dict, was saved) if transformers has it, else ``config.architectures[0]``, else ``AutoModel``.

    A checkpoint of a QAT model comes back prepared for QAT the same way (same modules, config and observer
    state), observers frozen, so it exports to int8 ONNX directly. Raises if the file does not match the model.
    """
    from transformers import AutoConfig

    path = Path(path)
    header = _read_header(path)
    state = load_compact(path)
    config = AutoConfig.from_pretrained(str(config_dir))
    cls = model_class or model_class_for(config, header.get("model_class"))
    model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    qat = header.get("qat")
    if qat:
        names = set(qat["modules"])
        prepare_qat_(model, QATConfig.from_dict(qat["config"]), filter_fn=lambda module, fqn: fqn in names)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {cls.__name__} built from {config_dir}: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    if qat:
        freeze_observers_(model)
    return model.eval()


def compact_size_report(path: str | Path) -> dict[str, Any]:
    """Sizes of a compact checkpoint against the same model as dense fp32 safetensors (header only is read).

    Returns ``encoder_linear_weights`` (the 2-D ``.weight`` tensors of encoder blocks) and ``model`` (all tensors,
    tied ones once), each with ``dense_fp32_bytes``, ``compact_bytes`` and ``ratio`` (dense / compact); the
    encoder entry also has ``n_weights`` and ``kept_fraction``; plus ``file_bytes``.
    Non-float tensors (int buffers, flags) count at their own size on both sides.
    """
    path = Path(path)
    header = _read_header(path)
    compact: dict[str, dict[str, Any]] = header.get("compact", {})
    stored: dict[str, int] = {}
    dense: dict[str, int] = {}
    ndim: dict[str, int] = {name: len(entry["shape"]) for name, entry in compact.items()}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            dtype, shape = piece.get_dtype(), piece.get_shape()
            size = math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
            base, sep, _ = key.rpartition("/")
            name = base if sep and base in compact else key
            stored[name] = stored.get(name, 0) + size
            if name == key:
                ndim[name] = len(shape)
                is_float = dtype in ("F64", "F32", "F16", "BF16")
                dense[name] = math.prod(shape) * (4 if is_float else _DTYPE_BYTES.get(dtype, 4))
    for name, entry in compact.items():
        dense[name] = math.prod(entry["shape"]) * 4

    def summary(names: list[str]) -> dict[str, Any]:
        d, c = sum(dense[n] for n in names), sum(stored[n] for n in names)
        ratio = d / c if c else float("nan")
        return {"n_tensors": len(names), "dense_fp32_bytes": d, "compact_bytes": c, "ratio": ratio}

    encoder = [n for n in dense if ndim[n] == 2 and _ENCODER_LINEAR_WEIGHT.search(n)]
    enc = summary(encoder)
    n_weights = sum(dense[n] // 4 for n in encoder)
    n_kept = sum(compact[n]["n_kept"] if n in compact else dense[n] // 4 for n in encoder)
    enc.update(n_weights=n_weights, kept_fraction=n_kept / n_weights if n_weights else float("nan"))
    model = summary(list(dense))
    return {"file": str(path), "file_bytes": path.stat().st_size, "encoder_linear_weights": enc, "model": model}

