"""Cross-layer tensor decomposition, after "Exploring Extreme Parameter Compression for Pre-trained Language Models"
(Ren, Wang et al., ICLR 2022).

The paper cuts every weight of the Transformer layers into D x D matrices (D the hidden size: Q, K, V and the
attention output are one each; the FFN's D x 4D matrices four each, 12 per BERT layer), stacks them into a tensor
[N, D, D], and compares: (II) each matrix factorized on its own, W_i ~ U_i S_i V_i^T; (III) U and V shared by all
N matrices, W_i ~ U S_i V^T with a small d x d core S_i per matrix; (IV) a Tucker decomposition, whose cores are
themselves mixtures of a "matrix bank" of l shared d x d matrices, S_i = sum_k P[i, k] C_k, so that the parameter
count hardly grows with depth. Their protocol initialises the factors from the pre-trained weights by decomposition,
computes a layer's output without reconstructing W (h U S V^T evaluated right to left as narrow products), and
recovers the accuracy by knowledge distillation from the uncompressed model.

Built here: III, and IV with `bank` set. Initialisation (closed form, no iterative Tucker-ALS): U = the top-d
eigenvectors of sum_i W_i W_i^T, V = those of sum_i W_i^T W_i (the leading left / right singular subspaces of the
matrices laid side by side / stacked), S_i = U^T W_i V; with a bank, [P, C] = the top-l SVD of the cores flattened
to [N, d^2]. Exact when every W_i lies in shared rank-d row and column spaces (and the cores span <= l dimensions).

    tensor_(model, TensorConfig(rank=256))            # III: BERT-base encoder ~1/9 of its parameters
    tensor_(model, TensorConfig(rank=256, bank=48))   # IV

U, V (and the bank) live once, on the base model (`<base>.pofa_shared_basis`, outside the encoder blocks: dense);
each Linear keeps its cores (`core.weight` [m, n, d, d], or `mix.weight` [m, n, l]) and its bias, inside its block:
the pruning targets when masks are wanted. QAT does not apply (the fake-quant modules are Linears).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.decompose.common import (Factor, FilterFn, base_of, record_, require_selection, selected_linears,
                                   set_submodule)

SHARED = "pofa_shared_basis"
"""Attribute of the base model holding the shared factors."""


@dataclass(frozen=True)
class TensorConfig:
    """The shared basis width and, for the paper's method IV, the size of the matrix bank."""

    rank: int
    """d: width of the shared U and V (d <= hidden size)."""
    bank: int | None = None
    """l: number of shared d x d core matrices (method IV); None: one core per D x D slice (method III)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"TensorConfig.rank must be an int >= 1, got {self.rank!r}")
        if self.bank is not None and (not isinstance(self.bank, int) or self.bank < 1):
            raise ValueError(f"TensorConfig.bank must be None or an int >= 1, got {self.bank!r}")


def slices(weight: Tensor, width: int) -> Tensor:
    """W [m * D, n * D] as its blocks [m, n, D, D] (block (i, j) = rows i*D.., columns j*D..)."""
    rows, cols = weight.shape
    return weight.reshape(rows // width, width, cols // width, width).permute(0, 2, 1, 3)


def shared_bases(blocks: list[Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """(U [D, d], V [D, d]): the top-d eigenvectors of sum_i W_i W_i^T and of sum_i W_i^T W_i, in float64."""
    left = sum((b @ b.transpose(-1, -2)).sum(dim=(0, 1)) for b in blocks)
    right = sum((b.transpose(-1, -2) @ b).sum(dim=(0, 1)) for b in blocks)
    return (torch.linalg.eigh(left).eigenvectors.flip(-1)[:, :rank],
            torch.linalg.eigh(right).eigenvectors.flip(-1)[:, :rank])


def bank_factors(cores: Tensor, bank: int) -> tuple[Tensor, Tensor]:
    """(P [N, l], C [l, d, d]) with P @ C.flatten(1) the best rank-l approximation of the cores [N, d, d]."""
    n, d, _ = cores.shape
    u, s, vh = torch.linalg.svd(cores.reshape(n, d * d), full_matrices=False)
    l = min(bank, s.numel())
    return u[:, :l] * s[:l], vh[:l].reshape(l, d, d)


class SharedBasis(nn.Module):
    """The factors every `TuckerLinear` of the model shares: `u.weight` [D, d], `v.weight` [D, d], and with a bank
    `bank.weight` [l, d, d]."""

    def __init__(self, width: int, rank: int, bank: int | None, dtype=None, device=None) -> None:
        super().__init__()
        self.u = Factor(torch.zeros(width, rank, dtype=dtype, device=device))
        self.v = Factor(torch.zeros(width, rank, dtype=dtype, device=device))
        self.bank = Factor(torch.zeros(bank, rank, rank, dtype=dtype, device=device)) if bank else None


class TuckerLinear(nn.Module):
    """y = x W^T + bias with W's D x D block (i, j) = U S_ij V^T, computed as ((x V) K) U^T: K [n*d, m*d] holds the
    cores S_ij (or sum_k P[i, j, k] C_k); W is never formed."""

    def __init__(self, basis: SharedBasis, blocks: tuple[int, int], bias: bool = True, dtype=None, device=None
                 ) -> None:
        super().__init__()
        self._basis = (basis,)  # by reference: the shared factors are saved once, under the base model
        width, rank = basis.u.weight.shape
        self.blocks = tuple(blocks)
        m, n = blocks
        self.in_features, self.out_features = n * width, m * width
        if basis.bank is None:
            self.core = Factor(torch.zeros(m, n, rank, rank, dtype=dtype, device=device))
        else:
            self.mix = Factor(torch.zeros(m, n, basis.bank.weight.shape[0], dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(m * width, dtype=dtype, device=device)) if bias else None

    @property
    def basis(self) -> SharedBasis:
        return self._basis[0]

    def cores(self) -> Tensor:
        """S [m, n, d, d]."""
        if self.basis.bank is None:
            return self.core.weight
        return torch.einsum("ijk,kab->ijab", self.mix.weight, self.basis.bank.weight)

    def forward(self, x: Tensor) -> Tensor:
        m, n = self.blocks
        u, v = self.basis.u.weight, self.basis.v.weight
        width, rank = u.shape
        lead = x.shape[:-1]
        xv = (x.reshape(*lead, n, width) @ v).reshape(*lead, n * rank)           # [..., n*d]
        k = self.cores().permute(1, 3, 0, 2).reshape(n * rank, m * rank)          # K[(j, b), (i, a)] = S_ij[a, b]
        y = ((xv @ k).reshape(*lead, m, rank) @ u.t()).reshape(*lead, m * width)  # [..., m*D]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}"


def tensor_(model: nn.Module, config: TensorConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Decompose the selected Linears (default: every Linear in the model family's encoder blocks; each dimension a
    multiple of the hidden size) jointly, with shared U, V (and bank); in place, returns `model`. Records the basis
    and each module's block grid in `model.config.pofa_decomposition["tensor"]`."""
    base = base_of(model)
    if hasattr(base, SHARED):
        raise ValueError("tensor_: the model already has a shared basis (decomposed twice?)")
    width = model.config.hidden_size
    if config.rank > width:
        raise ValueError(f"TensorConfig.rank {config.rank} exceeds the hidden size {width}")
    targets = selected_linears(model, filter_fn)
    require_selection(targets, "tensor_")
    odd = [fqn for fqn, lin in targets if lin.in_features % width or lin.out_features % width]
    if odd:
        raise ValueError(f"tensor_: {odd[:3]} have a dimension that is not a multiple of the hidden size {width}; "
                         "exclude them")
    blocks = [slices(lin.weight.detach().double(), width) for _, lin in targets]
    u, v = shared_bases(blocks, config.rank)
    cores = [u.t() @ b @ v for b in blocks]                                     # each [m, n, d, d]
    like = targets[0][1].weight
    basis = SharedBasis(width, config.rank, config.bank, dtype=like.dtype, device=like.device)
    mixes = None
    if config.bank is not None:
        flat = torch.cat([c.reshape(-1, config.rank, config.rank) for c in cores])
        p, bank = bank_factors(flat, config.bank)
        if bank.shape[0] < config.bank:  # fewer slices than bank entries: the surplus stays zero
            bank = torch.cat([bank, bank.new_zeros(config.bank - bank.shape[0], *bank.shape[1:])])
            p = torch.cat([p, p.new_zeros(p.shape[0], config.bank - p.shape[1])], dim=1)
        mixes = p.split([c.shape[0] * c.shape[1] for c in cores])
    with torch.no_grad():
        basis.u.weight.copy_(u)
        basis.v.weight.copy_(v)
        if config.bank is not None:
            basis.bank.weight.copy_(bank)
    base.add_module(SHARED, basis)
    table = {}
    for index, (fqn, linear) in enumerate(targets):
        grid = cores[index].shape[:2]
        swapped = TuckerLinear(basis, grid, linear.bias is not None, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            if mixes is None:
                swapped.core.weight.copy_(cores[index])
            else:
                swapped.mix.weight.copy_(mixes[index].reshape(*grid, -1))
            if linear.bias is not None:
                swapped.bias.copy_(linear.bias)
        set_submodule(base, fqn, swapped)
        table[fqn] = list(grid)
    record_(model, "tensor", {"rank": config.rank, "bank": config.bank, "modules": table})
    return model


def rebuild_tensor_(model: nn.Module, entry: dict) -> None:
    base = base_of(model)
    like = next(base.parameters())
    basis = SharedBasis(model.config.hidden_size, entry["rank"], entry.get("bank"), dtype=like.dtype,
                        device=like.device)
    base.add_module(SHARED, basis)
    for fqn, grid in entry.get("modules", {}).items():
        linear = base.get_submodule(fqn)
        set_submodule(base, fqn, TuckerLinear(basis, tuple(grid), linear.bias is not None, dtype=like.dtype,
                                              device=like.device))
