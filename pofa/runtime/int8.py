"""Sparse int8 execution of a QAT model's encoder Linears on CPUs, with the arithmetic of the QAT model.

Usage::

    from pofa.runtime import load_sparse_model, sparse_int8_
    model = load_sparse_model("runs/quickstart/qat/final")   # compact int8 checkpoint -> sparse int8 Linears
    logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    sparse_int8_(qat_model.eval())                            # or convert a QAT model in memory

Each :class:`~pofa.quant.qat.FakeQuantLinear` becomes a :class:`SparseInt8Linear` that runs the C kernel of
``sparse_int8.c``: the input is quantized with the layer's static activation scale and zero point (what the QAT
model's observer learned; uint8, per tensor), multiplied by the int8 weight's non-zeros with exact int32
accumulation, and dequantized with the per-channel weight scales, bias added, in one call. The QAT model computes
the same quantized values in float (fake-quant), so the two differ by float rounding only; the tests check the
logits and the argmax on real rows. The fusions of ``sparse_int8_(..., fuse=True)`` (the default) save passes over
the activations and Python calls: attention's query, key and value, which quantize the same input alike, run as
one call (:class:`SharedInputLinears`); the feed-forward GELU runs in its Linear's call; blocks of BERT's layout
run as one short function (:mod:`pofa.runtime.blocks`, residuals added in the kernel calls). Everything else
(embeddings, attention, LayerNorm, heads) is the transformers model's own torch code. Inference only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pofa.quant.qat import (
    ActivationQuant,
    FakeQuantEmbedding,
    FakeQuantLinear,
    fake_quantize_weight,
    qat_modules,
    quantize_weight,
)
from pofa.runtime.native import LinearParams, SparseInt8Kernel, sparse_int8_kernel

__all__ = ["PackedSparseInt8", "SharedInputLinears", "SparseInt8Linear", "concat_packed", "pack_qat", "pack_sparse_int8",
           "sparse_int8_", "without_fake_quant_"]


@dataclass(frozen=True)
class PackedSparseInt8:
    """An int8 weight ``[R, K]`` in the kernel's layout, with the dequantization folded per output row.

    The input features are taken in groups of 4 (``K`` padded to a multiple of 4 with zero weights); row ``r``
    keeps its non-zero groups ``row_ptr[r]:row_ptr[r+1]`` as ``group`` (the group index) and ``word`` (its 4 int8
    weights, feature ``4g + i`` in byte ``i``, little-endian). ``y[:, r] = (acc - out_offset[r]) * out_scale[r] +
    bias[r]`` turns the integer sum over uint8 activations back into the Linear's output.
    """

    row_ptr: Tensor
    """int64 ``[R + 1]``."""
    group: Tensor
    """int32 ``[n]``."""
    word: Tensor
    """int32 ``[n]``."""
    out_scale: Tensor
    """float32 ``[R]``: activation scale x weight scale of the row."""
    out_offset: Tensor
    """int32 ``[R]``: activation zero point x the row's sum of int8 weights (the zero point's share of ``acc``)."""
    bias: Tensor
    """float32 ``[R]`` (zeros for a Linear without bias)."""
    in_features: int
    activation: ActivationQuant


def pack_sparse_int8(
    q: Tensor, weight_scale: Tensor, activation: ActivationQuant, bias: Tensor | None = None
) -> PackedSparseInt8:
    """Pack an int8 weight (symmetric, ``w = q * weight_scale`` per row or per tensor) for the kernel.

    Raises if ``q`` is not a 2-D int8 tensor, a scale has the wrong size, or the activation is wider than 8 bits.
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_sparse_int8: expected a 2-D int8 weight, got {q.dtype} of shape {tuple(q.shape)}")
    rows, in_features = q.shape
    scale = weight_scale.detach().float().reshape(-1)
    if scale.numel() not in (1, rows):
        raise ValueError(f"pack_sparse_int8: {scale.numel()} weight scales for {rows} rows (need 1 or {rows})")
    if not 1 <= activation.bits <= 8:
        raise ValueError(f"pack_sparse_int8: activations of {activation.bits} bits; the kernel reads uint8")
    padded = torch.zeros(rows, (in_features + 3) // 4 * 4, dtype=torch.int8)
    padded[:, :in_features] = q.detach().cpu()
    words = padded.view(torch.int32)  # 4 consecutive int8 weights per int32 (byte i = feature 4g + i)
    kept = words != 0
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = kept.sum(1).cumsum(0)
    group = kept.nonzero()[:, 1].to(torch.int32)  # row-major: rows in order, groups ascending in each row
    row_sum = q.detach().cpu().to(torch.int64).sum(1)
    # float32 product, as the QAT model's dequantized activation times dequantized weight would be scaled.
    out_scale = torch.tensor(activation.scale, dtype=torch.float32) * scale.expand(rows)
    out_bias = torch.zeros(rows) if bias is None else bias.detach().float().cpu()
    return PackedSparseInt8(
        row_ptr=row_ptr, group=group.contiguous(), word=words[kept].contiguous(), out_scale=out_scale.contiguous(),
        out_offset=(activation.zero_point * row_sum).to(torch.int32), bias=out_bias.contiguous(),
        in_features=in_features, activation=activation,
    )


def concat_packed(parts: list[PackedSparseInt8]) -> PackedSparseInt8:
    """The rows of ``parts`` stacked into one packed weight (same input width and activation quantization), as the
    packing of their concatenated int8 weights would be: the kernel then computes all of them in one call.

    Raises if the parts read different input widths or quantize their input differently.
    """
    first = parts[0]
    for part in parts[1:]:
        if part.in_features != first.in_features or part.activation != first.activation:
            raise ValueError("concat_packed: the parts must read the same input width and activation quantization, "
                             f"got {part.in_features} / {part.activation} and {first.in_features} / {first.activation}")
    offsets = torch.tensor([0] + [int(part.row_ptr[-1]) for part in parts]).cumsum(0)
    return PackedSparseInt8(
        row_ptr=torch.cat([first.row_ptr[:1]] + [part.row_ptr[1:] + offsets[i] for i, part in enumerate(parts)]),
        group=torch.cat([part.group for part in parts]), word=torch.cat([part.word for part in parts]),
        out_scale=torch.cat([part.out_scale for part in parts]),
        out_offset=torch.cat([part.out_offset for part in parts]),
        bias=torch.cat([part.bias for part in parts]), in_features=first.in_features, activation=first.activation,
    )


ACTIVATIONS = {None: 0, "gelu": 1}
"""Activations the kernel can apply on its output (``gelu``: the erf form, as ``torch.nn.functional.gelu``)."""


class SparseInt8Linear(nn.Module):
    """``y = x W^T + b`` as the QAT model computes it (static uint8 activation, int8 weight), sparse, on CPU.

    ``rows`` selects this Linear's rows of ``packed`` when several Linears share one packed matrix
    (:class:`SharedInputLinears`); ``activation`` (``"gelu"``) is applied to the output in the same call.
    """

    def __init__(self, packed: PackedSparseInt8, kernel: SparseInt8Kernel | None = None, *,
                 rows: tuple[int, int] | None = None, activation: str | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"SparseInt8Linear: activation {activation!r} is not one the kernel applies "
                             f"(choose from {sorted(a for a in ACTIVATIONS if a)} or None)")
        self.packed = packed
        self.rows = rows or (0, packed.row_ptr.numel() - 1)
        self.activation = activation
        self.in_features = packed.in_features
        self.out_features = self.rows[1] - self.rows[0]
        self.kernel = kernel or sparse_int8_kernel()
        self.shared: SharedInputLinears | None = None
        self._params = _KernelParams(rows=self.rows, activation=activation)

    @classmethod
    def from_qat(cls, module: FakeQuantLinear, kernel: SparseInt8Kernel | None = None) -> SparseInt8Linear:
        """The int8 form of a trained fake-quant Linear: its current weight scales and activation observer."""
        return cls(pack_qat(module), kernel)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The Linear of ``x`` (then its fused activation); ``residual`` (the output's shape) added in the same call."""
        if self.shared is not None:
            if residual is not None:
                raise ValueError("SparseInt8Linear: a Linear that shares its input computes no residual")
            return self.shared(self, x)
        return run_sparse_int8(self.kernel, self._params.of(self.packed), x, self.in_features, self.out_features,
                               residual)

    @property
    def groups(self) -> int:
        """How many 4-feature groups of this Linear's rows the kernel multiplies (those holding a non-zero)."""
        r0, r1 = self.rows
        return int(self.packed.row_ptr[r1] - self.packed.row_ptr[r0])

    def extra_repr(self) -> str:
        groups = self.groups
        total = self.out_features * ((self.in_features + 3) // 4)
        fused = f", activation={self.activation}" if self.activation else ""
        shared = f", shares its input with {len(self.shared.members) - 1} more" if self.shared is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, groups_kept={groups / total:.3f}, "
                f"isa={self.kernel.isa}{fused}{shared}")


def pack_qat(module: FakeQuantLinear) -> PackedSparseInt8:
    """A trained fake-quant Linear packed for the kernel: its current weight scales and activation observer."""
    if not module.initialized:
        raise ValueError("the fake-quant Linear's activation observer has seen no data; run QAT first")
    c = module.config
    scale = module.weight_scale()
    a_scale, a_zero = module.activation_qparams()
    q = quantize_weight(module.weight, scale, c.weight_bits)
    return pack_sparse_int8(q, scale, ActivationQuant(a_scale, a_zero, c.activation_bits), module.bias)


class _KernelParams:
    """The C struct of rows ``[r0, r1)`` of a packed weight, built once: it holds raw pointers into the packed
    tensors, so it is rebuilt whenever they are not the tensors it was built from (a deep copy of the model)."""

    def __init__(self, rows: tuple[int, int], activation: str | None) -> None:
        self.rows, self.activation = rows, activation
        self._struct: LinearParams | None = None
        self._tensors: tuple[Tensor, ...] = ()

    def of(self, packed: PackedSparseInt8) -> LinearParams:
        tensors = (packed.row_ptr, packed.group, packed.word, packed.out_scale, packed.out_offset, packed.bias)
        if self._struct is None or any(a is not b for a, b in zip(tensors, self._tensors)):
            (r0, r1), a = self.rows, packed.activation
            self._struct = LinearParams(
                row_ptr=packed.row_ptr.data_ptr() + 8 * r0, group=packed.group.data_ptr(),
                word=packed.word.data_ptr(), out_scale=packed.out_scale.data_ptr() + 4 * r0,
                out_offset=packed.out_offset.data_ptr() + 4 * r0, bias=packed.bias.data_ptr() + 4 * r0,
                rows=r1 - r0, in_features=packed.in_features, scale=a.scale, zero_point=float(a.zero_point),
                qmax=float(2**a.bits - 1), activation=ACTIVATIONS[self.activation],
            )
            self._tensors = tensors
        return self._struct

    def __reduce__(self) -> tuple:
        return _KernelParams, (self.rows, self.activation)  # copies and pickles leave the pointers behind


def run_sparse_int8(kernel: SparseInt8Kernel, params: LinearParams, x: Tensor, in_features: int,
                    out_features: int, residual: Tensor | None = None) -> Tensor:
    """One kernel call: ``x [..., in_features]`` (any float dtype or device) -> ``[..., out_features]``, x's dtype;
    ``residual`` (same shape as the output) is added in the call."""
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, in_features)
    if x2.dtype != torch.float32 or x2.device.type != "cpu" or not x2.is_contiguous():
        x2 = x2.to(device="cpu", dtype=torch.float32).contiguous()
    skip = None
    if residual is not None:
        if residual.shape != (*lead, out_features):
            raise ValueError(f"SparseInt8Linear: residual of shape {tuple(residual.shape)} for an output of shape "
                             f"{(*lead, out_features)}")
        skip = residual.detach().reshape(-1, out_features).to(device="cpu", dtype=torch.float32).contiguous()
    y = torch.empty(x2.shape[0], out_features)
    status = kernel.linear(x2.data_ptr(), x2.shape[0], ctypes.byref(params), None if skip is None else skip.data_ptr(),
                           y.data_ptr())
    if status != 0:
        raise MemoryError(f"SparseInt8Linear: the kernel could not allocate its activation buffer ({tuple(x.shape)})")
    y = y.reshape(*lead, out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class SharedInputLinears:
    """Linears that read the same tensor and quantize it alike (attention's query, key and value: their observers
    saw the same inputs), computed by one kernel call on their stacked rows: the input is quantized once and the
    call's fixed cost paid once.

    The first member called with a tensor computes every member's output and keeps the others' until they are
    called with that same tensor object (unchanged since: its version counter, outside inference mode); a member
    called with anything else computes its own rows alone, so the result never depends on the call order.
    """

    def __init__(self, members: list[SparseInt8Linear]) -> None:
        self.members = members
        self.rows = (members[0].rows[0], members[-1].rows[1])
        self._params = _KernelParams(self.rows, None)
        # (input, its version, outputs not handed out yet by member position): one attribute, read once per call,
        # so that a call from another thread replacing it cannot pair one input with another's outputs
        self._pending: tuple[Tensor | None, int, dict[int, Tensor]] = (None, 0, {})

    def stacked(self, x: Tensor) -> Tensor:
        """Every member's output of ``x``, side by side in member order: ``[..., sum of out_features]``."""
        first = self.members[0]
        return run_sparse_int8(first.kernel, self._params.of(first.packed), x, first.in_features,
                               self.rows[1] - self.rows[0])

    def __call__(self, member: SparseInt8Linear, x: Tensor) -> Tensor:
        position = next(i for i, m in enumerate(self.members) if m is member)
        last_input, version, outputs = self._pending
        if x is last_input and version == _version(x):
            out = outputs.pop(position, None)
            if out is not None:
                if not outputs:
                    self._pending = (None, 0, {})  # every output handed out: hold no tensor until the next call
                return out
        y = self.stacked(x)
        outputs = {i: y[..., m.rows[0] - self.rows[0]:m.rows[1] - self.rows[0]] for i, m in enumerate(self.members)}
        out = outputs.pop(position)
        self._pending = (x, _version(x), outputs)
        return out


def _version(x: Tensor) -> int:
    # inference tensors keep no version counter
    return -1 if x.is_inference() else x._version


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sparse_int8_(model: nn.Module, kernel: SparseInt8Kernel | None = None, *, fuse: bool = True) -> nn.Module:
    """Turn a trained QAT model (:func:`pofa.quant.prepare_qat_`) into its sparse int8 runtime in place; return it.

    Every fake-quant Linear becomes a :class:`SparseInt8Linear`; a fake-quant embedding table becomes a plain
    ``nn.Embedding`` holding its quantized values (computed once, not at every call). The model is put in eval mode.
    ``fuse`` (default): Linears of one module that quantize their input alike (attention's query, key and value)
    run as one :class:`SharedInputLinears`, and the feed-forward GELU of the model's family
    (:attr:`pofa.families.ModelFamily.feed_forward_activation`, erf GELU only) is computed in its Linear's call,
    the activation module replaced by ``nn.Identity``; blocks of BERT's layout then run as one short function
    (:mod:`pofa.runtime.blocks`, residuals added in the kernel calls). All compute what the unfused modules do.
    Raises if the model has no fake-quant Linear or an observer has seen no data.
    """
    modules = qat_modules(model)
    if not any(isinstance(m, FakeQuantLinear) for m in modules.values()):
        raise ValueError("sparse_int8_: the model has no fake-quant Linear; prepare it with pofa.quant.prepare_qat_ "
                         "and run QAT (or load a QAT folder with pofa.runtime.load_sparse_model)")
    kernel = kernel or sparse_int8_kernel()
    packs = {}
    for fqn, module in modules.items():
        if isinstance(module, FakeQuantLinear):
            try:
                packs[fqn] = pack_qat(module)
            except ValueError as exc:
                raise ValueError(f"sparse_int8_: {fqn}: {exc}") from exc
    activations = _fusable_activations(model, packs) if fuse else {}
    for group in (_shared_input_groups(packs, activations) if fuse else []):
        packed, start, members = concat_packed([packs.pop(fqn) for fqn in group]), 0, []
        for fqn in group:
            rows = modules[fqn].out_features
            members.append(SparseInt8Linear(packed, kernel, rows=(start, start + rows)))
            _set_submodule(model, fqn, members[-1])
            start += rows
        shared = SharedInputLinears(members)
        for member in members:
            member.shared = shared
    for fqn, packed in packs.items():
        activation = activations.get(fqn)
        _set_submodule(model, fqn, SparseInt8Linear(packed, kernel, activation=activation and activation[1]))
        if activation:
            _set_submodule(model, activation[0], nn.Identity())
    for fqn, module in modules.items():
        if isinstance(module, FakeQuantEmbedding):
            table = fake_quantize_weight(module.weight.detach(), module.weight_scale(), module.config.weight_bits)
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                 _weight=table.contiguous(), _freeze=True)
            _set_submodule(model, fqn, plain)
    if fuse:
        from pofa.runtime.blocks import short_bert_blocks_

        short_bert_blocks_(model.eval())
    return model.eval()


def _fusable_activations(model: nn.Module, linears: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Linear name -> (activation module name, kernel activation) for the family's feed-forward pairs whose
    activation is the erf GELU; nothing for a model of no registered family."""
    from transformers.activations import GELUActivation

    from pofa.families import UnknownFamilyError, family_of

    try:
        pair = family_of(model).feed_forward_activation
    except UnknownFamilyError:  # no registered family: no fusion, the modules run as they are
        return {}
    if pair is None:
        return {}
    linear_name, activation_name = pair
    fused = {}
    for fqn in linears:
        if not fqn.endswith("." + linear_name):
            continue
        activation_fqn = fqn[: -len(linear_name)] + activation_name
        try:
            activation = model.get_submodule(activation_fqn)
        except AttributeError:
            continue
        erf_gelu = (isinstance(activation, nn.GELU) and activation.approximate == "none") or (
            isinstance(activation, GELUActivation) and activation.act in (F.gelu, activation._gelu_python))
        if erf_gelu:
            fused[fqn] = (activation_fqn, "gelu")
    return fused


def _shared_input_groups(packs: Mapping[str, PackedSparseInt8], activations: Mapping[str, object]) -> list[list[str]]:
    """Names of the Linears to run as one call: siblings (same parent module) with the same input width and
    activation quantization and no fused activation, in model order; groups of two or more."""
    groups: dict[tuple, list[str]] = {}
    for fqn, packed in packs.items():
        if fqn not in activations:
            a = packed.activation
            key = (fqn.rpartition(".")[0], packed.in_features, a.scale, a.zero_point, a.bits)
            groups.setdefault(key, []).append(fqn)
    return [group for group in groups.values() if len(group) > 1]


def without_fake_quant_(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module of ``model`` for the plain ``nn.Linear`` / ``nn.Embedding`` holding the same
    Parameter objects, in place; return ``model``. The float model QAT started from (for a model loaded from an int8
    compact checkpoint, its weights are the dequantized int8 values)."""
    for fqn, module in qat_modules(model).items():
        if isinstance(module, FakeQuantLinear):
            plain: nn.Module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                         device="meta")
            plain.weight, plain.bias = module.weight, module.bias
        else:
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                 device="meta")
            plain.weight = module.weight
        _set_submodule(model, fqn, plain)
    return model
