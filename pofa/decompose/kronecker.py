"""Kronecker factorization (KroneckerBERT): W [m, n] ~ sum_t A_t (x) B_t with A_t [m1, n1], B_t [m2, n2],
m = m1 * m2 and n = n1 * n2, initialised by the nearest Kronecker product (Van Loan & Pitsianis, 1993).

Rearranging W into R(W) [m1 * n1, m2 * n2], row (i1, j1) and column (i2, j2) holding W[i1 * m2 + i2, j1 * n2 + j2],
turns a Kronecker product into a rank-one matrix: R(A (x) B) = vec(A) vec(B)^T. The best sum of `terms` products in
Frobenius norm is then the top-`terms` SVD of R(W): A_t = sqrt(s_t) u_t, B_t = sqrt(s_t) v_t, reshaped. It is exact
when W is such a sum.

The forward never forms W: with x viewed as X [n1, n2], (A (x) B) x is A X B^T, two GEMMs for all terms together
(m1 * n1 * n2 + m1 * n2 * m2 multiply-adds per term instead of m * n). Factor shapes are the divisors of m and n
closest to their square roots (m1 n1 ~ m2 n2: the fewest parameters for one term), or given.

    kronecker_(model, KroneckerConfig(terms=4))

The factors are `weight`s of bare modules inside the encoder blocks: pruning targets (masks on the factors) like a
Linear's. QAT does not apply: its fake-quant modules are Linears, and an int8 factor is not an int8 matmul.
"""

from __future__ import annotations

from fractions import Fraction
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.decompose.common import (Factor, FilterFn, base_of, record_, require_selection, selected_linears,
                                   set_submodule)


@dataclass(frozen=True)
class KroneckerConfig:
    """How `kronecker_` factorizes each selected Linear."""

    terms: int = 1
    """Number of Kronecker products summed (the top singular pairs of R(W))."""
    left_shape: tuple[int, int] | None = None
    """(m1, n1) of every A_t; None: per weight, the divisors of its dimensions nearest their square roots."""

    def __post_init__(self) -> None:
        if not isinstance(self.terms, int) or self.terms < 1:
            raise ValueError(f"KroneckerConfig.terms must be an int >= 1, got {self.terms!r}")
        if self.left_shape is not None and (len(self.left_shape) != 2 or min(self.left_shape) < 1):
            raise ValueError(f"KroneckerConfig.left_shape must be two ints >= 1, got {self.left_shape!r}")


def balanced_divisor(n: int) -> int:
    """The divisor of `n` nearest sqrt(n) (the smaller one on a tie)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    # distance in log scale, as an exact fraction (d^2 / n or n / d^2): a float log would break ties by round-off
    return min(divisors, key=lambda d: (Fraction(max(d * d, n), min(d * d, n)), d))


def factor_shapes(m: int, n: int, left_shape: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """(m1, n1, m2, n2) for a weight [m, n]."""
    m1, n1 = left_shape if left_shape is not None else (balanced_divisor(m), balanced_divisor(n))
    if m % m1 or n % n1:
        raise ValueError(f"Kronecker factor shape {(m1, n1)} does not divide the weight's shape {(m, n)}")
    return m1, n1, m // m1, n // n1


def rearrange(weight: Tensor, m1: int, n1: int) -> Tensor:
    """Van Loan's R(W) [m1 * n1, m2 * n2]."""
    m, n = weight.shape
    return weight.reshape(m1, m // m1, n1, n // n1).permute(0, 2, 1, 3).reshape(m1 * n1, -1)


def nearest_kronecker(weight: Tensor, m1: int, n1: int, terms: int) -> tuple[Tensor, Tensor]:
    """(A [terms, m1, n1], B [terms, m2, n2]) minimising ||W - sum_t A_t (x) B_t||_F."""
    m, n = weight.shape
    u, s, vh = torch.linalg.svd(rearrange(weight.detach().double(), m1, n1), full_matrices=False)
    t = min(terms, s.numel())
    root = s[:t].sqrt()
    a = (u[:, :t] * root).t().reshape(t, m1, n1)
    b = (root[:, None] * vh[:t]).reshape(t, m // m1, n // n1)
    return a.to(weight.dtype), b.to(weight.dtype)


def kronecker_matrix(a: Tensor, b: Tensor) -> Tensor:
    """sum_t A_t (x) B_t as a dense matrix (for checks; the forward never builds it)."""
    return sum(torch.kron(a[t], b[t]) for t in range(a.shape[0]))


class KroneckerLinear(nn.Module):
    """y = sum_t A_t X B_t^T + bias, X the input viewed as [n1, n2]; `left.weight` A [terms, m1, n1], `right.weight`
    B [terms, m2, n2]."""

    def __init__(self, shapes: tuple[int, int, int, int], terms: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        m1, n1, m2, n2 = shapes
        self.shapes, self.terms = tuple(shapes), terms
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.left = Factor(torch.zeros(terms, m1, n1, dtype=dtype, device=device))
        self.right = Factor(torch.zeros(terms, m2, n2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(m1 * m2, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: KroneckerConfig) -> KroneckerLinear:
        shapes = factor_shapes(linear.out_features, linear.in_features, config.left_shape)
        a, b = nearest_kronecker(linear.weight, shapes[0], shapes[1], config.terms)
        module = cls(shapes, a.shape[0], linear.bias is not None, dtype=linear.weight.dtype,
                     device=linear.weight.device)
        with torch.no_grad():
            module.left.weight.copy_(a)
            module.right.weight.copy_(b)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        # Two plain GEMMs (one per factor, all terms at once) and one permute, instead of many small batched
        # matmuls: H[(N, k), (t, i1)] = sum_j X[N, j, k] A_t[i1, j], then Y[(N, i1), i2] = sum_(t, k) H B_t[i2, k],
        # which also sums the terms.
        m1, n1, m2, n2 = self.shapes
        t, lead = self.terms, x.shape[:-1]
        grid = x.reshape(-1, n1, n2)
        count = grid.shape[0]
        h = grid.transpose(1, 2).reshape(count * n2, n1) @ self.left.weight.reshape(t * m1, n1).t()
        h = h.reshape(count, n2, t, m1).permute(0, 3, 2, 1).reshape(count * m1, t * n2)
        y = (h @ self.right.weight.transpose(1, 2).reshape(t * n2, m2)).reshape(*lead, m1 * m2)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, terms={self.terms}, " \
               f"shapes={self.shapes}"


def kronecker_(model: nn.Module, config: KroneckerConfig | None = None, filter_fn: FilterFn | None = None
               ) -> nn.Module:
    """Swap the selected Linears (default: every Linear in the model family's encoder blocks) for
    `KroneckerLinear`s initialised by the nearest Kronecker product; in place, returns `model`. Records each
    module's factor shapes and terms in `model.config.pofa_decomposition["kronecker"]`."""
    config = config or KroneckerConfig()
    targets = selected_linears(model, filter_fn)
    require_selection(targets, "kronecker_")
    base = base_of(model)
    table = {}
    for fqn, linear in targets:
        swapped = KroneckerLinear.from_linear(linear, config)
        set_submodule(base, fqn, swapped)
        table[fqn] = [*swapped.shapes, swapped.terms]
    record_(model, "kronecker", {"modules": table})
    return model


def rebuild_kronecker_(model: nn.Module, entry: dict) -> None:
    base = base_of(model)
    for fqn, (m1, n1, m2, n2, terms) in entry.get("modules", {}).items():
        linear = base.get_submodule(fqn)
        set_submodule(base, fqn, KroneckerLinear((m1, n1, m2, n2), terms, linear.bias is not None,
                                                 dtype=linear.weight.dtype, device=linear.weight.device))
