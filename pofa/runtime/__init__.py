"""Sparse CPU execution of pruned encoders, and a latency benchmark against what a user would run instead.

Usage::

    from pofa.runtime import load_sparse_model, benchmark_latency
    model = load_sparse_model("runs/quickstart/qat/final")      # QAT folder: sparse int8 kernels
    logits = model(**batch).logits                              # called as the transformers model
    rows = benchmark_latency(float_model, qat_model=qat_model)  # six variants, alternated, as ratios

Two sparse paths, each a module swapped for the encoder Linears; attention, LayerNorm, embeddings and heads stay
the transformers model's torch code:

- sparse int8 (:mod:`pofa.runtime.int8`, C kernel in ``sparse_int8.c`` compiled on first use by
  :mod:`pofa.runtime.native`): a QAT model's Linears with its own static activation quantization fused into the
  kernel, int8 non-zeros in groups of 4 input features, exact int32 accumulation (AVX-512 VNNI, AVX2, or
  portable C), dequantization, bias and the feed-forward GELU fused on output; attention's query, key and value
  in one call. Needs a C compiler.
- sparse fp32 (:mod:`pofa.runtime.csr`): CSR x dense, torch's ``sparse.addmm`` or our numba kernel.

:func:`benchmark_latency` (:mod:`pofa.runtime.bench`) times them with dense torch and onnxruntime in one process.
"""

from pofa.runtime.bench import VARIANTS, benchmark_latency
from pofa.runtime.csr import (
    CSRLinear,
    NumbaCSRLinear,
    SparseRuntimeConfig,
    default_sparse_filter,
    numba_available,
    sparsify_,
)
from pofa.runtime.int8 import (
    PackedSparseInt8,
    SparseInt8Linear,
    pack_sparse_int8,
    sparse_int8_,
    without_fake_quant_,
)
from pofa.runtime.load import family_runtime_spec, load_sparse_model
from pofa.runtime.native import NativeKernelError, compiler_available, sparse_int8_kernel

__all__ = [
    "VARIANTS",
    "CSRLinear",
    "NativeKernelError",
    "NumbaCSRLinear",
    "PackedSparseInt8",
    "SparseInt8Linear",
    "SparseRuntimeConfig",
    "benchmark_latency",
    "compiler_available",
    "default_sparse_filter",
    "family_runtime_spec",
    "load_sparse_model",
    "numba_available",
    "pack_sparse_int8",
    "sparse_int8_",
    "sparse_int8_kernel",
    "sparsify_",
    "without_fake_quant_",
]
