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
logits and the argmax on real rows. Everything else (embeddings, attention, LayerNorm, GELU, heads) is the
transformers model's own torch code. Inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.quant.qat import (
    ActivationQuant,
    FakeQuantEmbedding,
    FakeQuantLinear,
    fake_quantize_weight,
    qat_modules,
    quantize_weight,
)
from pofa.runtime.native import SparseInt8Kernel, sparse_int8_kernel

__all__ = ["PackedSparseInt8", "pack_sparse_int8", "SparseInt8Linear", "sparse_int8_", "without_fake_quant_"]


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


class SparseInt8Linear(nn.Module):
    """``y = x W^T + b`` as the QAT model computes it (static uint8 activation, int8 weight), sparse, on CPU."""

    def __init__(self, packed: PackedSparseInt8, kernel: SparseInt8Kernel | None = None) -> None:
        super().__init__()
        self.packed = packed
        self.in_features = packed.in_features
        self.out_features = packed.row_ptr.numel() - 1
        self.kernel = kernel or sparse_int8_kernel()

    @classmethod
    def from_qat(cls, module: FakeQuantLinear, kernel: SparseInt8Kernel | None = None) -> SparseInt8Linear:
        """The int8 form of a trained fake-quant Linear: its current weight scales and activation observer."""
        if not module.initialized:
            raise ValueError("SparseInt8Linear.from_qat: the activation observer has seen no data; run QAT first")
        c = module.config
        scale = module.weight_scale()
        a_scale, a_zero = module.activation_qparams()
        q = quantize_weight(module.weight, scale, c.weight_bits)
        return cls(pack_sparse_int8(q, scale, ActivationQuant(a_scale, a_zero, c.activation_bits), module.bias), kernel)

    def forward(self, x: Tensor) -> Tensor:
        p = self.packed
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, self.in_features).to(device="cpu", dtype=torch.float32).contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        a = p.activation
        status = self.kernel.linear(
            x2.data_ptr(), x2.shape[0], self.in_features, a.scale, float(a.zero_point), float(2**a.bits - 1),
            p.row_ptr.data_ptr(), p.group.data_ptr(), p.word.data_ptr(), self.out_features,
            p.out_scale.data_ptr(), p.out_offset.data_ptr(), p.bias.data_ptr(), y.data_ptr(),
        )
        if status != 0:
            raise MemoryError(f"SparseInt8Linear: the kernel could not allocate its activation buffer ({tuple(x.shape)})")
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        groups = self.packed.group.numel()
        total = self.out_features * ((self.in_features + 3) // 4)
        return (f"in_features={self.in_features}, out_features={self.out_features}, groups_kept={groups / total:.3f}, "
                f"isa={self.kernel.isa}")


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sparse_int8_(model: nn.Module, kernel: SparseInt8Kernel | None = None) -> nn.Module:
    """Turn a trained QAT model (:func:`pofa.quant.prepare_qat_`) into its sparse int8 runtime in place; return it.

    Every fake-quant Linear becomes a :class:`SparseInt8Linear`; a fake-quant embedding table becomes a plain
    ``nn.Embedding`` holding its quantized values (computed once, not at every call). The model is put in eval mode.
    Raises if the model has no fake-quant Linear or an observer has seen no data.
    """
    modules = qat_modules(model)
    if not any(isinstance(m, FakeQuantLinear) for m in modules.values()):
        raise ValueError("sparse_int8_: the model has no fake-quant Linear; prepare it with pofa.quant.prepare_qat_ "
                         "and run QAT (or load a QAT folder with pofa.runtime.load_sparse_model)")
    kernel = kernel or sparse_int8_kernel()
    for fqn, module in modules.items():
        if isinstance(module, FakeQuantLinear):
            _set_submodule(model, fqn, SparseInt8Linear.from_qat(module, kernel))
        elif isinstance(module, FakeQuantEmbedding):
            table = fake_quantize_weight(module.weight.detach(), module.weight_scale(), module.config.weight_bits)
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                 _weight=table.contiguous(), _freeze=True)
            _set_submodule(model, fqn, plain)
    return model.eval()



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
