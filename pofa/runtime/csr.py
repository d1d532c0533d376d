"""Sparse fp32 CPU execution of pruned encoders: CSR x dense Linears.

Usage::

    from pofa.runtime import SparseRuntimeConfig, sparsify_
    sparsify_(model.eval(), SparseRuntimeConfig(backend="auto"))   # sparse Linears -> CSR x dense modules

Two backends (speed-ups over dense fp32 torch: BERT-base encoder Linears 90% unstructured sparse, seq 128, 2 cores):

- ``"torch"``: ``torch.sparse.addmm`` with a CSR weight, always available (1.7x / 1.1x dense at batch 1 / 8).
- ``"numba"``: our CSR x dense kernel, when numba is importable (the ``sparse-runtime`` extra; 2.35x / 1.85x).
  It runs ``prange`` over weight rows with a per-row local accumulator over the tokens and 1-D row views of the
  transposed activations, so the inner loop is a contiguous axpy that LLVM vectorizes. (Accumulating straight
  into the 2-D output compiles to scalar code and is slower than dense.)

Both compute ``y = x W^T + b`` exactly as a dense Linear up to float summation order. They are inference-only
(no autograd through the sparse weight); the swapped modules hold copies of the weights, so train on the dense
model and sparsify a copy for serving.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "SparseRuntimeConfig",
    "CSRLinear",
    "NumbaCSRLinear",
    "numba_available",
    "default_sparse_filter",
    "sparsify_",
]

Backend = Literal["torch", "numba", "auto"]


def numba_available() -> bool:
    """Whether numba can be imported (``pip install 'pofa[sparse-runtime]'``)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SparseRuntimeConfig:
    """How :func:`sparsify_` swaps Linears for sparse modules."""

    backend: Backend = "auto"
    """``"torch"`` (torch CSR), ``"numba"`` (our kernel; raises without numba), ``"auto"`` (numba if importable)."""
    min_sparsity: float = 0.7
    """Only Linears with at least this fraction of exact zeros are swapped: below ~70% CSR loses to dense GEMM."""

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "numba", "auto"):
            raise ValueError(f"SparseRuntimeConfig.backend must be 'torch', 'numba' or 'auto', got {self.backend!r}")
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"SparseRuntimeConfig.min_sparsity must be in [0, 1], got {self.min_sparsity!r}")
        if self.backend == "numba" and not numba_available():
            raise ValueError("SparseRuntimeConfig(backend='numba') needs numba: pip install 'pofa[sparse-runtime]'")

    def resolved_backend(self) -> Literal["torch", "numba"]:
        """The backend ``"auto"`` stands for here."""
        if self.backend == "auto":
            return "numba" if numba_available() else "torch"
        return self.backend


def _to_csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():
        # torch warns that CSR support is "beta" on every conversion; we rely only on to_sparse_csr and addmm.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return weight.to_sparse_csr()


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a torch CSR tensor (``torch.sparse.addmm``); inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        self.weight_csr = _to_csr(weight)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias_column = bias.reshape(-1, 1).clone()
        self.nnz = int(weight.count_nonzero())

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        # (W @ x^T + b)^T = x W^T + b: CSR must be the left operand of addmm.
        y_t = torch.sparse.addmm(self.bias_column, self.weight_csr, x.reshape(-1, self.in_features).t())
        return y_t.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, backend=torch"


@functools.cache  # compile once per process, on first use (compiling takes seconds); not configuration
def _numba_kernel() -> Callable[..., None]:
    """The CSR x dense kernel: ``out_t[r, :] = bias[r] + sum_k data[k] * x_t[indices[k], :]`` over row ``r``."""
    import numba

    @numba.njit(parallel=True, cache=False, fastmath=False)
    def csr_matmul_t(indptr, indices, data, x_t, bias, out_t):  # noqa: ANN001, ANN202
        n_tokens = x_t.shape[1]
        for r in numba.prange(indptr.shape[0] - 1):
            acc = np.empty(n_tokens, dtype=np.float32)  # per-row local accumulator
            acc[:] = bias[r]
            for k in range(indptr[r], indptr[r + 1]):
                v = data[k]
                x_row = x_t[indices[k]]  # 1-D contiguous view: the inner loop vectorizes
                for j in range(n_tokens):
                    acc[j] += v * x_row[j]
            out_t[r, :] = acc

    return csr_matmul_t


class NumbaCSRLinear(nn.Module):
    """``y = x W^T + b`` with our numba CSR x dense kernel (see the module docstring); inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        csr = _to_csr(linear.weight.detach().float())
        self.indptr = csr.crow_indices().to(torch.int64).numpy().copy()
        self.indices = csr.col_indices().to(torch.int64).numpy().copy()
        self.data = csr.values().numpy().astype(np.float32).copy()
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = bias.numpy().copy()
        self.nnz = int(self.data.size)
        self._kernel = _numba_kernel()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x_t = x.detach().reshape(-1, self.in_features).float().t().contiguous().numpy()
        out_t = np.empty((self.out_features, x_t.shape[1]), dtype=np.float32)
        self._kernel(self.indptr, self.indices, self.data, x_t, self.bias, out_t)
        return torch.from_numpy(out_t).t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, backend=numba"


def default_sparse_filter(module: nn.Module, fqn: str) -> bool:
    """Every ``nn.Linear`` (the sparsity threshold of :class:`SparseRuntimeConfig` does the real selection)."""
    return type(module) is nn.Linear


def _sparsity(linear: nn.Linear) -> float:
    w = linear.weight.detach()
    return 1.0 - int(w.count_nonzero()) / w.numel()


def sparsify_(
    model: nn.Module,
    config: SparseRuntimeConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap every selected Linear with at least ``config.min_sparsity`` zeros for a CSR module in place; return
    ``model``. Inference only: call on an eval copy of the trained model. Raises if nothing was swapped."""
    config = config or SparseRuntimeConfig()
    select = filter_fn or default_sparse_filter
    module_cls = NumbaCSRLinear if config.resolved_backend() == "numba" else CSRLinear
    targets = [
        (fqn, m) for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear) and select(m, fqn) and _sparsity(m) >= config.min_sparsity
    ]
    if not targets:
        raise ValueError(
            f"sparsify_: no Linear has >= {config.min_sparsity:.0%} zeros; prune the model first (or lower "
            "SparseRuntimeConfig.min_sparsity)"
        )
    for fqn, linear in targets:
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module_cls(linear))
    return model
