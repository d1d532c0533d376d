"""8-bit quantization-aware training (QAT) with small fake-quant modules of our own.

Usage::

    from pofa.quant import QATConfig, prepare_qat_, qat_step_, convert_to_int8

    config = QATConfig(freeze_observers_after_step=2_000)
    prepare_qat_(model, config)          # encoder Linears -> FakeQuantLinear, same Parameter objects
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        qat_step_(model, step, config)   # freezes the activation observers at the configured step
    int8 = convert_to_int8(model)        # int8 weights + scales + activation scale/zero-point per layer

Why our own modules and not a library:

- ``torch.ao.quantization`` announces its deprecation; we do not build on it.
- torchao 0.18 (the newest on PyPI) imports on torch 2.13 CPU, but its compiled extensions fail to load (they are
  built against another torch; an install that fixes that would pull another torch). Its QAT fake-quantizes
  activations *dynamically* (per token, scales computed at run time); it has no moving-average observer giving one
  static activation scale per layer (Q8BERT), and its convert step targets torchao's own kernels, not ONNX.
  We need static scales, because the deployment target is a static QDQ graph for onnxruntime, and a compact
  int8 checkpoint.
- What we need is ~200 lines: a weight fake-quant, an activation fake-quant with an EMA min/max observer, a
  straight-through estimator, and the same ops emitted as ONNX QuantizeLinear/DequantizeLinear at export. Owning
  them lets us guarantee the two properties the sparse pipeline relies on: the swapped module keeps the *same*
  ``weight``/``bias`` Parameter objects (masks, optimizer state and gradient hooks keep applying), and a weight
  that is exactly 0 stays exactly 0 (symmetric weights, zero-point 0).

The quantization scheme, and why it maps onto ONNX QDQ and onnxruntime's x86 integer kernels:

- Weights: symmetric signed integers, zero-point 0, ``q = clamp(round(w / s), -qmax, qmax)`` with
  ``qmax = 2**(bits-1) - 1`` (127 for 8 bits; -128 is never used, so the range is symmetric), one scale per output
  channel (``s = max|w_row| / qmax``). Scales follow the weights at every step (no observer needed).
- Activations (the input of each quantized Linear): *asymmetric uint8* with a zero-point, range from a
  moving-average min/max observer updated in training mode until frozen. uint8 activations x int8 weights (U8S8)
  is the layout of onnxruntime's x86 integer GEMM (MLAS), and the one its quantization tool recommends for x86
  CPUs; an asymmetric range also spends no code on the near-empty negative side of GELU outputs (the input of
  each FFN output Linear). On x86 CPUs without VNNI (AVX2 only) the U8S8 kernel saturates its int16
  intermediates with full-range 8-bit weights (measured here); onnxruntime's answer is 7-bit weights
  (``QATConfig(weight_bits=7)``), or export them as uint8 (``export_onnx(..., weight_dtype="uint8")``).
- Gradients: a straight-through estimator. Weights: identity. Activations: identity inside the representable
  range, zero outside it (the clipped STE of Jacob et al. 2018).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pofa.families import family_of, is_encoder_linear, model_type_of

__all__ = [
    "QATConfig",
    "FakeQuantLinear",
    "FakeQuantEmbedding",
    "Int8Weight",
    "ActivationQuant",
    "QuantizedModule",
    "default_qat_filter",
    "prepare_qat_",
    "freeze_observers_",
    "qat_step_",
    "convert_to_int8",
    "qat_modules",
    "is_qat_prepared",
    "weight_scale",
    "quantize_weight",
    "fake_quantize_weight",
    "activation_qparams",
    "fake_quantize_activation",
]

# Embedding tables of the `embeddings` block (word, position, token type) in every registered family.
_EMBEDDINGS = re.compile(r"(^|\.)embeddings\.")


@dataclass(frozen=True)
class QATConfig:
    """How :func:`prepare_qat_` fake-quantizes a model."""

    weight_bits: int = 8
    """Bits of the symmetric weight integers (2..8); 7 avoids int16 saturation on x86 CPUs without VNNI."""
    per_channel: bool = True
    """One weight scale per output channel (row); False: one scale per tensor."""
    activation_bits: int = 8
    """Bits of the asymmetric unsigned activation integers (2..8); ONNX export needs 8."""
    activation_observer_momentum: float = 0.9
    """EMA momentum of the activation min/max observer: ``running = m * running + (1 - m) * batch``."""
    freeze_observers_after_step: int | None = None
    """Optimizer step after which :func:`qat_step_` freezes the activation observers; None: never."""
    quantize_embeddings: bool = False
    """Also fake-quantize the embedding tables (symmetric, one scale per row); activations are not quantized."""

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"QATConfig.{name} must be an int in 2..8, got {bits!r}")
        if not 0.0 <= self.activation_observer_momentum < 1.0:
            raise ValueError(
                "QATConfig.activation_observer_momentum must be in [0, 1), "
                f"got {self.activation_observer_momentum!r}"
            )
        step = self.freeze_observers_after_step
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ValueError(f"QATConfig.freeze_observers_after_step must be None or an int >= 0, got {step!r}")

    def to_dict(self) -> dict[str, object]:
        """The fields as plain JSON-able values (saved beside checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> QATConfig:
        """Inverse of :meth:`to_dict`; an unknown key raises naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"QATConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Pure quantization arithmetic. Fake-quant, int8 conversion and the compact format all call these, so a
# dequantized int8 weight is bitwise equal to the fake-quantized weight seen in training.
# --------------------------------------------------------------------------------------------------------------


def _weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _rows(scale: Tensor, like: Tensor) -> Tensor:
    """View a per-row (or single) scale so that it broadcasts over the rows of ``like``."""
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def weight_scale(weight: Tensor, bits: int = 8, per_channel: bool = True) -> Tensor:
    """Symmetric scale(s) mapping ``max|w|`` onto ``2**(bits-1) - 1``: float32 of shape ``[rows]`` or ``[1]``.

    An all-zero row (fully pruned) gets scale 1.0: any positive scale maps its zeros to zero, and a scale of 0
    would divide by zero.
    """
    w = weight.detach().float()
    if per_channel:
        amax = w.abs().amax(dim=tuple(range(1, w.dim()))) if w.dim() > 1 else w.abs()
    else:
        amax = w.abs().amax().reshape(1)
    scale = amax / _weight_qmax(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight(weight: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """``clamp(round(w / s), -qmax, qmax)`` as int8; an exact 0 gives 0."""
    qmax = _weight_qmax(bits)
    return torch.round(weight.detach().float() / _rows(scale, weight)).clamp_(-qmax, qmax).to(torch.int8)


def fake_quantize_weight(weight: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """``quantize_weight(w) * s`` in float32 without the int8 round trip (bitwise equal to it); 0 stays 0."""
    qmax = _weight_qmax(bits)
    rows = _rows(scale, weight)
    return torch.round(weight / rows).clamp(-qmax, qmax) * rows


def _activation_qparams_tensors(min_val: Tensor, max_val: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """:func:`activation_qparams` as two 0-d float32 tensors on the device of ``min_val``, with no host read.

    Training calls this at every forward of every Linear; turning the scale into a Python number there would make
    the host wait for the device each time, so the fallback below is a ``torch.where``, not an ``if``.
    """
    qmax = 2**bits - 1
    lo = torch.clamp(min_val.detach().float(), max=0.0)
    hi = torch.clamp(max_val.detach().float(), min=0.0)
    scale = (hi - lo) / qmax
    # An all-zero activation (or a non-finite range): scale 1, zero-point 0; any scale represents zeros.
    usable = torch.isfinite(scale) & (scale > 0)
    scale = torch.where(usable, scale, torch.ones_like(scale))
    zero_point = torch.where(usable, torch.clamp(torch.round(-lo / scale), 0, qmax), torch.zeros_like(scale))
    return scale, zero_point


def activation_qparams(min_val: Tensor, max_val: Tensor, bits: int = 8) -> tuple[float, int]:
    """Asymmetric ``(scale, zero_point)`` covering ``[min(min_val, 0), max(max_val, 0)]`` with ``2**bits`` levels.

    The range always contains 0 so that 0 (padding, ReLU/GELU zeros) is exactly representable. Computed in float32,
    the dtype of the ONNX scale, so PyTorch and onnxruntime divide by the same number. An all-zero (or non-finite)
    range gives ``(1.0, 0)``. Python numbers, read from the device: for export and inspection, not the training step.
    """
    scale, zero_point = _activation_qparams_tensors(min_val, max_val, bits)
    return float(scale), int(zero_point)


def fake_quantize_activation(x: Tensor, scale: float, zero_point: int, bits: int = 8) -> Tensor:
    """``(clamp(round(x / s) + z, 0, 2**bits - 1) - z) * s``, the arithmetic of ONNX QuantizeLinear/DequantizeLinear."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


class _WeightSTE(torch.autograd.Function):
    """Fake-quantized weight forward, identity backward (the scale spans max|w|, so nothing is clipped)."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        return fake_quantize_weight(weight, scale, bits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


class _ActivationQDQ(torch.autograd.Function):
    """Fake-quantized activation; clipped STE backward; exported as an ONNX QuantizeLinear/DequantizeLinear pair.

    ``scale``/``zero_point`` are 0-d float32 tensors on the device of ``x`` in training (see
    :func:`_activation_qparams_tensors`), and Python numbers at ONNX export, where ``symbolic`` makes them constants.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, scale: Tensor | float, zero_point: Tensor | int, bits: int
    ) -> Tensor:
        qmax = 2**bits - 1
        # At least float32: a bf16/fp16 activation (autocast) would otherwise meet a scale tensor rounded to its own
        # dtype on GPUs, not the float32 scale that export writes. float32 input: no copy, the ONNX arithmetic.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        unclamped = torch.round(xf / scale) + zero_point
        ctx.save_for_backward((unclamped >= 0) & (unclamped <= qmax))
        return ((torch.clamp(unclamped, 0, qmax) - zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, bits: int):  # noqa: ANN001, ANN205 (TorchScript graph values)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _DequantizeTransposedWeight(torch.autograd.Function):
    """Integer weight stored transposed ``[in, out]`` -> float; exported as ONNX DequantizeLinear over axis 1.

    The transposed layout lets the exported graph read ``MatMul(DQ(Q(x)), DQ(W_t))`` with no Transpose between the
    DequantizeLinear and the MatMul, the pattern onnxruntime fuses into an integer MatMul. ``q_t`` is int8 with
    zero-point 0, or the same values stored as uint8 + 128 with zero-point 128 (see ``export_mode``).
    """

    @staticmethod
    def forward(ctx, q_t: Tensor, scale: Tensor, zero_point: int) -> Tensor:  # type: ignore[override]
        # scale: [out] broadcasts over the last axis, or a 0-d per-tensor scale.
        return (q_t.float() - zero_point) * scale if zero_point else q_t.float() * scale

    @staticmethod
    def symbolic(g, q_t, scale, zero_point: int):  # noqa: ANN001, ANN205
        dtype = torch.uint8 if zero_point else torch.int8
        zero = torch.full(scale.type().sizes() or [], zero_point, dtype=dtype)
        z = g.op("Constant", value_t=zero)
        if zero.dim() == 0:
            return g.op("DequantizeLinear", q_t, scale, z)
        return g.op("DequantizeLinear", q_t, scale, z, axis_i=1)


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

ExportMode = Literal["int8", "float"]


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose input activation and weight are fake-quantized (see the module docstring).

    It holds the wrapped Linear's ``weight``/``bias`` Parameter *objects* (not copies), so parameter names, masks,
    optimizer state and gradient hooks registered on them keep applying. It subclasses ``nn.Linear`` so that code
    selecting Linears by type still finds it. Observer state lives in buffers (saved in the state dict):
    ``act_min``, ``act_max``, ``observer_initialized``, ``observer_frozen``. Until the observer has seen a batch
    (training mode), the activation passes through unquantized.

    ``initialized`` and ``frozen`` are plain-bool copies of the two flag buffers, and the ones ``forward`` reads:
    reading a device tensor as a bool waits for the device (a host sync), at every Linear of every step.
    ``_observe``, :func:`freeze_observers_` and loading a state dict keep the two in step; code that writes the flag
    buffers directly must reload the state dict (or set the attributes) after.
    """

    def __init__(self, linear: nn.Linear, config: QATConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate new parameters
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.config = config
        self._export_mode: ExportMode | None = None
        device = linear.weight.device
        self.register_buffer("act_min", torch.zeros((), device=device))
        self.register_buffer("act_max", torch.zeros((), device=device))
        self.register_buffer("observer_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("observer_frozen", torch.zeros((), dtype=torch.bool, device=device))
        self.initialized = False
        self.frozen = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (nn.Module's signature)
        super()._load_from_state_dict(*args, **kwargs)
        # Resume (accelerate's load_state calls load_state_dict): one host read per load, none per step.
        self.initialized = bool(self.observer_initialized)
        self.frozen = bool(self.observer_frozen)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if self.initialized:
            m = self.config.activation_observer_momentum
            lo = m * self.act_min + (1.0 - m) * lo
            hi = m * self.act_max + (1.0 - m) * hi
        self.act_min.copy_(lo)
        self.act_max.copy_(hi)
        self.observer_initialized.fill_(True)
        self.initialized = True

    def activation_qparams(self) -> tuple[float, int]:
        """The current ``(scale, zero_point)`` of the input activation."""
        return activation_qparams(self.act_min, self.act_max, self.config.activation_bits)

    def weight_scale(self) -> Tensor:
        """The current weight scale(s), from the current weights."""
        return weight_scale(self.weight, self.config.weight_bits, self.config.per_channel)

    def forward(self, x: Tensor) -> Tensor:
        if self._export_mode == "float":
            return F.linear(x, self.weight, self.bias)
        if self.training and not self.frozen:
            self._observe(x)
        if self.initialized:
            bits = self.config.activation_bits
            if self._export_mode == "int8" or torch.onnx.is_in_onnx_export():
                scale, zero_point = self.activation_qparams()  # constants of the exported graph
            else:
                scale, zero_point = _activation_qparams_tensors(self.act_min, self.act_max, bits)
            x = _ActivationQDQ.apply(x, scale, zero_point, bits)
        if self._export_mode == "int8":
            zero_point = 128 if self.onnx_qweight_t.dtype == torch.uint8 else 0
            w_t = _DequantizeTransposedWeight.apply(self.onnx_qweight_t, self.onnx_wscale, zero_point)
            y = torch.matmul(x, w_t)
            return y if self.bias is None else y + self.bias
        w = _WeightSTE.apply(self.weight, self.weight_scale(), self.config.weight_bits)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, weight=int{c.weight_bits}{' per-channel' if c.per_channel else ''} symmetric, "
            f"activation=uint{c.activation_bits} asymmetric"
        )


class FakeQuantEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table is fake-quantized (symmetric, one scale per row); same Parameter object."""

    def __init__(self, embedding: nn.Embedding, config: QATConfig) -> None:
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self.config = config
        self._export_mode: ExportMode | None = None

    def weight_scale(self) -> Tensor:
        """The current per-row (or per-tensor) scale(s) of the table."""
        return weight_scale(self.weight, self.config.weight_bits, self.config.per_channel)

    def forward(self, ids: Tensor) -> Tensor:
        if self._export_mode == "float":
            return F.embedding(ids, self.weight, self.padding_idx)
        if self._export_mode == "int8":
            # Gather int8 rows, then scale them: the table stays int8 in the file and nothing dequantizes it whole.
            q = F.embedding(ids, self.onnx_qweight)
            s = self.onnx_wscale
            s = F.embedding(ids, s.reshape(-1, 1)) if s.numel() > 1 else s
            return q.float() * s
        w = _WeightSTE.apply(self.weight, self.weight_scale(), self.config.weight_bits)
        return F.embedding(ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


_FakeQuant = (FakeQuantLinear, FakeQuantEmbedding)


# --------------------------------------------------------------------------------------------------------------
# Model-level verbs
# --------------------------------------------------------------------------------------------------------------


def default_qat_filter(module: nn.Module, fqn: str) -> bool:
    """Every Linear inside an encoder block of a registered family (`pofa.families`) and every Embedding of an
    ``embeddings`` block; task heads and the pooler stay float."""
    if isinstance(module, nn.Linear):
        return is_encoder_linear(fqn)
    if isinstance(module, nn.Embedding):
        return _EMBEDDINGS.search(fqn) is not None
    return False


def family_qat_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """:func:`default_qat_filter` narrowed to ``model``'s own family: its encoder blocks and its embedding tables."""
    family = family_of(model)
    embeddings = re.compile(family.embeddings)

    def select(module: nn.Module, fqn: str) -> bool:
        if isinstance(module, nn.Linear):
            return family.is_encoder_linear(fqn)
        if isinstance(module, nn.Embedding):
            return embeddings.search(fqn) is not None
        return False

    return select


def qat_modules(model: nn.Module) -> dict[str, FakeQuantLinear | FakeQuantEmbedding]:
    """The fake-quant modules of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _FakeQuant)}


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one :class:`FakeQuantLinear`."""
    return any(isinstance(m, FakeQuantLinear) for m in model.modules())


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_qat_(
    model: nn.Module,
    config: QATConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap the selected Linears for :class:`FakeQuantLinear` (and, with ``config.quantize_embeddings``, the
    selected Embeddings for :class:`FakeQuantEmbedding`) in place; return ``model``.

    ``filter_fn(module, fqn)`` selects among ``nn.Linear`` (and ``nn.Embedding``) modules; default: the model's
    family's (:func:`family_qat_filter`) when it has a ``config`` of a registered family, else
    :func:`default_qat_filter`. Parameter names and Parameter objects are unchanged. Forward hooks registered on a
    swapped module are not carried over. Raises if ``model`` is already prepared or nothing was selected, and for a
    model holding Kronecker or tensor-decomposition factors (:func:`pofa.decompose.check_quantizable`).
    """
    from pofa.decompose import check_quantizable

    check_quantizable(model)  # Kronecker / tensor factors: refused, with the reason (pofa.decompose's docstring)
    config = config or QATConfig()
    select = filter_fn or (family_qat_filter(model) if model_type_of(model) is not None else default_qat_filter)
    already = next(iter(qat_modules(model)), None)
    if already is not None:
        raise ValueError(f"prepare_qat_: the model is already prepared for QAT (a fake-quant module is at {already!r})")
    targets: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if type(module) is nn.Linear and select(module, fqn):
            targets.append((fqn, FakeQuantLinear(module, config)))
        elif type(module) is nn.Embedding and config.quantize_embeddings and select(module, fqn):
            targets.append((fqn, FakeQuantEmbedding(module, config)))
    if not any(isinstance(m, FakeQuantLinear) for _, m in targets):
        raise ValueError(
            "prepare_qat_: no nn.Linear was selected; the default filter selects the Linears in the encoder blocks "
            "of the families in pofa.families (pass filter_fn for other architectures, or register the family)"
        )
    for fqn, module in targets:
        _set_submodule(model, fqn, module)
    return model


def freeze_observers_(model: nn.Module) -> nn.Module:
    """Stop every activation observer of ``model`` from updating (scales stay fixed from now on); return it."""
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            module.observer_frozen.fill_(True)
            module.frozen = True
    return model


def qat_step_(model: nn.Module, step: int, config: QATConfig) -> bool:
    """Call after optimizer step ``step`` (1-based); freezes the observers once ``step >= freeze_observers_after_step``.

    Returns whether the observers are frozen after the call (from the modules' Python flags: no device read).
    """
    freeze_at = config.freeze_observers_after_step
    if freeze_at is not None and step >= freeze_at:
        freeze_observers_(model)
    return all(m.frozen for m in model.modules() if isinstance(m, FakeQuantLinear))


# --------------------------------------------------------------------------------------------------------------
# Real integer representation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Weight:
    """A symmetric integer weight: ``value = q * scale`` per row, zero-point 0."""

    q: Tensor
    """int8, the shape of the float weight; values in ``[-qmax, qmax]``."""
    scale: Tensor
    """float32, ``[rows]`` (per channel) or ``[1]`` (per tensor)."""
    bits: int

    def dequantize(self) -> Tensor:
        """The float32 weight; bitwise equal to the fake-quantized weight used in training."""
        return self.q.float() * _rows(self.scale, self.q)


@dataclass(frozen=True)
class ActivationQuant:
    """Asymmetric unsigned activation quantization: ``x ~ (q - zero_point) * scale``, ``q`` in ``[0, 2**bits - 1]``."""

    scale: float
    zero_point: int
    bits: int


@dataclass(frozen=True)
class QuantizedModule:
    """The integer form of one fake-quant module; ``activation`` is None for embeddings."""

    weight: Int8Weight
    bias: Tensor | None
    activation: ActivationQuant | None


def convert_to_int8(model: nn.Module) -> dict[str, QuantizedModule]:
    """The int8 representation of every fake-quant module of ``model``, keyed by module name
    (its weight parameter is ``f"{name}.weight"``).

    Raises if ``model`` is not prepared for QAT, or if an activation observer has seen no data.
    """
    modules = qat_modules(model)
    if not modules:
        raise ValueError("convert_to_int8: the model has no fake-quant modules; run pofa.quant.prepare_qat_ and QAT")
    out: dict[str, QuantizedModule] = {}
    for name, module in modules.items():
        bits = module.config.weight_bits
        scale = module.weight_scale()
        weight = Int8Weight(q=quantize_weight(module.weight, scale, bits), scale=scale, bits=bits)
        if isinstance(module, FakeQuantEmbedding):
            out[name] = QuantizedModule(weight=weight, bias=None, activation=None)
            continue
        if not bool(module.observer_initialized):
            raise ValueError(
                f"convert_to_int8: the activation observer of {name!r} has seen no data; run QAT training steps "
                "(forward passes in model.train() mode) before converting"
            )
        a_scale, a_zero = module.activation_qparams()
        bias = None if module.bias is None else module.bias.detach().clone()
        out[name] = QuantizedModule(
            weight=weight, bias=bias, activation=ActivationQuant(a_scale, a_zero, module.config.activation_bits)
        )
    return out


@contextmanager
def export_mode(
    model: nn.Module, mode: ExportMode, *, weight_dtype: Literal["int8", "uint8"] = "int8"
) -> Iterator[nn.Module]:
    """Within the context, fake-quant modules run as ONNX export wants them; restored on exit.

    ``"int8"``: integer weights (temporary buffers ``onnx_qweight_t``/``onnx_qweight`` and ``onnx_wscale``, so they
    become named initializers) dequantized by DequantizeLinear, activations as QuantizeLinear/DequantizeLinear.
    ``weight_dtype="uint8"`` stores the Linear weights as ``q + 128`` with zero-point 128: the same values, but
    onnxruntime then runs U8U8 kernels instead of U8S8 (see :func:`pofa.quant.export_onnx`). Embedding tables stay
    int8 (they are gathered, not multiplied).
    ``"float"``: plain float modules (the model before quantization).
    """
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"export_mode: weight_dtype must be 'int8' or 'uint8', got {weight_dtype!r}")
    modules = qat_modules(model)
    if mode == "int8":
        for name, quantized in convert_to_int8(model).items():
            module = modules[name]
            scale = quantized.weight.scale
            if isinstance(module, FakeQuantLinear):
                if not module.config.per_channel:
                    scale = scale.reshape(())
                q_t = quantized.weight.q.t().contiguous()
                if weight_dtype == "uint8":
                    q_t = (q_t.to(torch.int16) + 128).to(torch.uint8)
                module.register_buffer("onnx_qweight_t", q_t)
            else:
                module.register_buffer("onnx_qweight", quantized.weight.q)
            module.register_buffer("onnx_wscale", scale)
    try:
        for module in modules.values():
            module._export_mode = mode
        yield model
    finally:
        for module in modules.values():
            module._export_mode = None
            for buffer in ("onnx_qweight_t", "onnx_qweight", "onnx_wscale"):
                if buffer in module._buffers:
                    del module._buffers[buffer]
