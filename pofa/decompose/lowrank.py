"""Low-rank factorization: a Linear's weight W [out, in] becomes two Linears, W ~ second.weight @ first.weight, of
rank r, initialised by truncated SVD (the best rank-r approximation in Frobenius norm, Eckart-Young); the word
embedding E [vocab, hidden] becomes E ~ A @ B (A [vocab, r] an embedding table, B [r, hidden] a projection), and a
masked-LM decoder tied to E computes logits as (h @ B^T) @ A^T, without materialising E.

    low_rank_(model, LowRankConfig(rank=64))                 # every encoder Linear at rank 64
    low_rank_(model, LowRankConfig(energy=0.9, embeddings=True))  # per module: the smallest rank keeping 90% of
                                                             # the squared singular values; the embedding too

The factors are plain `nn.Linear`s inside the encoder blocks, so they are pruning targets (masks on the factors),
fake-quantized by QAT and exported to ONNX like any Linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pofa.decompose.common import (FilterFn, Swap, base_of, record_, require_selection, selected_linears,
                                   set_submodule)


@dataclass(frozen=True)
class LowRankConfig:
    """How `low_rank_` chooses each module's rank: a fixed `rank`, or the kept `energy` (exactly one)."""

    rank: int | None = None
    """Rank of every factorized Linear (capped at min(out, in))."""
    energy: float | None = None
    """Per module, the smallest rank whose singular values keep this fraction of sum(s^2) (0 < energy <= 1)."""
    embeddings: bool = False
    """Also factorize the word embedding (and a decoder tied to it)."""
    embedding_rank: int | None = None
    """Rank of the word embedding's factors; None: chosen as for the Linears (`rank` or `energy`)."""

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError(f"LowRankConfig: give exactly one of rank and energy (got rank={self.rank!r}, "
                             f"energy={self.energy!r})")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRankConfig.rank must be an int >= 1, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"LowRankConfig.energy must be in (0, 1], got {self.energy!r}")
        if self.embedding_rank is not None and self.embedding_rank < 1:
            raise ValueError(f"LowRankConfig.embedding_rank must be >= 1, got {self.embedding_rank!r}")


def choose_rank(singular_values: Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """`rank` capped at the number of singular values, or the smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    if rank is not None:
        return max(1, min(rank, singular_values.numel()))
    power = singular_values.double().square()
    kept = power.cumsum(0) / power.sum().clamp(min=torch.finfo(torch.float64).tiny)
    # a tolerance so that energy=1.0 stops at the numerical rank, not at the last (round-off) singular value
    return int((kept < energy - 1e-12).sum().item()) + 1


def svd_factors(weight: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """(left [rows, r], right [r, cols]) with left @ right the best rank-r approximation of `weight`; the singular
    values are split evenly (sqrt on each side) so both factors have the same scale for the optimizer."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(weight.dtype), (root[:, None] * vh[:r]).to(weight.dtype)


class LowRankLinear(nn.Module):
    """y = second(first(x)): `first` [r, in] without bias, `second` [out, r] with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
        left, right = svd_factors(linear.weight, rank, energy)
        module = cls(linear.in_features, linear.out_features, left.shape[1], linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            module.first.weight.copy_(right)
            module.second.weight.copy_(left)
            if linear.bias is not None:
                module.second.bias.copy_(linear.bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


class LowRankEmbedding(nn.Module):
    """E ~ A @ B: `embed` (A, [vocab, r]) looks the ids up, `project` (B as a Linear r -> hidden) widens them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = (num_embeddings, embedding_dim, rank,
                                                                                padding_idx)
        self.embed = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, dtype=dtype, device=device)
        self.project = nn.Linear(rank, embedding_dim, bias=False, dtype=dtype, device=device)

    def forward(self, ids: Tensor) -> Tensor:
        return self.project(self.embed(ids))


class LowRankDecoder(nn.Module):
    """A masked-LM decoder tied to a `LowRankEmbedding`: logits = (h @ B^T) @ A^T + bias, never forming E.

    The embedding is held by reference (not a submodule): its factors are saved once, under the embedding's names."""

    def __init__(self, embedding: LowRankEmbedding, bias: nn.Parameter | None, owns_bias: bool) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered, so the factors are not listed twice
        if owns_bias:
            self.bias = bias
        else:
            self._bias = (bias,)

    @property
    def embedding(self) -> LowRankEmbedding:
        return self._embedding[0]

    def forward(self, hidden: Tensor) -> Tensor:
        e = self.embedding
        logits = (hidden @ e.project.weight) @ e.embed.weight.t()
        bias = self.bias if "bias" in self._parameters else self._bias[0]
        return logits if bias is None else logits + bias


def _decoder_fqn(model: nn.Module) -> str | None:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:
        return None
    return next((fqn for fqn, m in model.named_modules() if m is output), None)


def factorize_embeddings_(model: nn.Module, rank: int | None = None, energy: float | None = None,
                          *, initialise: bool = True) -> int:
    """Swap the word embedding for a `LowRankEmbedding` (SVD-initialised unless `initialise` is False: a skeleton to
    load weights into), and the masked-LM decoder, when the model has one, for a `LowRankDecoder` tied to it; the
    config then says the word embeddings are not tied (there is no dense E to tie to). Returns the rank."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"factorize_embeddings_: the input embedding is a {type(embedding).__name__}, not an "
                         "nn.Embedding (already factorized?)")
    if initialise:
        left, right = svd_factors(embedding.weight, rank, energy)
        r = left.shape[1]
    else:
        r = rank
    module = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, r, embedding.padding_idx,
                              dtype=embedding.weight.dtype, device=embedding.weight.device)
    if initialise:
        with torch.no_grad():
            module.embed.weight.copy_(left)
            module.project.weight.copy_(right.t())
    decoder_fqn = _decoder_fqn(model)
    model.set_input_embeddings(module)
    if decoder_fqn is not None:
        old = model.get_submodule(decoder_fqn)
        # The decoder's bias is usually the head's (BERT: cls.predictions.bias, RoBERTa: lm_head.bias): use the head's
        # own Parameter, decided by structure rather than by identity, because a model rebuilt from a config that
        # says the embeddings are not tied (`load_decomposed`) has an untied copy in the decoder, which the saved
        # weights do not hold.
        parent = model.get_submodule(decoder_fqn.rpartition(".")[0]) if "." in decoder_fqn else model
        head_bias = getattr(parent, "bias", None)
        shared = (isinstance(head_bias, nn.Parameter) and old.bias is not None
                  and head_bias.shape == old.bias.shape)
        bias = head_bias if shared else old.bias
        set_submodule(model, decoder_fqn, LowRankDecoder(module, bias, owns_bias=not shared))
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5: ties by names, recomputed from the config
        model.all_tied_weights_keys = {k: v for k, v in model.all_tied_weights_keys.items()
                                       if not k.endswith("decoder.weight")}
    return r


def low_rank_(model: nn.Module, config: LowRankConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the selected Linears (default: every Linear in the model family's encoder blocks) for SVD-initialised
    `LowRankLinear`s, and with `config.embeddings` the word embedding for a `LowRankEmbedding`; in place, returns
    `model`. Records each module's rank in `model.config.pofa_decomposition["lowrank"]` for `load_decomposed`.

    A module whose chosen rank would not save parameters (r * (in + out) >= in * out) is still factorized when a
    `rank` is given (the caller asked for it) and kept dense with `energy` (nothing to gain)."""
    targets = selected_linears(model, filter_fn)
    require_selection(targets, "low_rank_")
    base = base_of(model)
    ranks: dict[str, int] = {}
    for fqn, linear in targets:
        swapped = LowRankLinear.from_linear(linear, config.rank, config.energy)
        if config.energy is not None and swapped.rank * (linear.in_features + linear.out_features) >= linear.weight.numel():
            continue
        set_submodule(base, fqn, swapped)
        ranks[fqn] = swapped.rank
    entry: dict = {"modules": ranks}
    if config.embeddings:
        entry["embedding_rank"] = factorize_embeddings_(model, config.embedding_rank or config.rank,
                                                        None if config.embedding_rank else config.energy)
    record_(model, "lowrank", entry)
    return model


def rebuild_low_rank_(model: nn.Module, entry: dict) -> None:
    """The structure `low_rank_` recorded, with uninitialised factors (the weights are loaded next)."""
    base = base_of(model)
    for fqn, rank in entry.get("modules", {}).items():
        linear = base.get_submodule(fqn)
        set_submodule(base, fqn, LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                                               dtype=linear.weight.dtype, device=linear.weight.device))
    if entry.get("embedding_rank"):
        factorize_embeddings_(model, entry["embedding_rank"], initialise=False)


# --- shrinking during training (the iterative schedule, `pofa.decompose.schedule`) ------------------------------------


def refactor(left: Tensor, right: Tensor, rank: int | None = None, energy: float | None = None
             ) -> tuple[Tensor, Tensor]:
    """`svd_factors(left @ right, rank, energy)` without forming the product: with left = Q1 R1 and right^T = Q2 R2,
    left @ right = Q1 (R1 R2^T) Q2^T, so the SVD of the small r x r core gives the product's (exact, O((m + n) r^2))."""
    q1, r1 = torch.linalg.qr(left.detach().double())
    q2, r2 = torch.linalg.qr(right.detach().double().t())
    u, s, vh = torch.linalg.svd(r1 @ r2.t())
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    return ((q1 @ u[:, :r]) * root).to(left.dtype), (root[:, None] * (vh[:r] @ q2.t())).to(right.dtype)


def _fresh(old: Tensor, new_modules: list[nn.Module]) -> list[Swap]:
    return [Swap(old, m.weight) for m in new_modules]


def _factorize(base: nn.Module, fqn: str, linear: nn.Linear, rank: int | None, energy: float | None
               ) -> tuple[int, list[Swap]]:
    swapped = LowRankLinear.from_linear(linear, rank, energy)
    set_submodule(base, fqn, swapped)
    swaps = _fresh(linear.weight, [swapped.first, swapped.second])
    if linear.bias is not None:
        swaps.append(Swap(linear.bias, swapped.second.bias, (0, torch.arange(linear.bias.numel()))))
    return swapped.rank, swaps


def _truncate(module: LowRankLinear, rank: int | None, energy: float | None) -> list[Swap]:
    left, right = refactor(module.second.weight, module.first.weight, rank, energy)
    first = nn.Linear(module.in_features, left.shape[1], bias=False, dtype=left.dtype, device=left.device)
    second = nn.Linear(left.shape[1], module.out_features, bias=False, dtype=left.dtype, device=left.device)
    with torch.no_grad():
        first.weight.copy_(right)
        second.weight.copy_(left)
    second.bias = module.second.bias  # unchanged: the same Parameter, its optimizer state stays
    swaps = _fresh(module.first.weight, [first]) + _fresh(module.second.weight, [second])
    module.first, module.second, module.rank = first, second, left.shape[1]
    return swaps


def low_rank_targets(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """The selected plain Linears and the `LowRankLinear`s made from selected ones (not their inner factors)."""
    from pofa.decompose.common import encoder_filter

    select = filter_fn or encoder_filter(model)
    found, inside = [], set()
    for fqn, module in base_of(model).named_modules():
        if fqn.rpartition(".")[0] in inside:
            continue
        if isinstance(module, LowRankLinear) and select(module, fqn):
            found.append((fqn, module))
            inside.add(fqn)
        elif type(module) is nn.Linear and select(module, fqn):
            found.append((fqn, module))
    return found


def shrink_low_rank(model: nn.Module, filter_fn: FilterFn | None, *, rank: Callable[[int], int] | None = None,
                    energy: float | None = None, final: bool = False) -> list[Swap]:
    """One event of an iterative low-rank schedule; returns the parameter swaps for the optimizer.

    Each selected module goes to rank `rank(full)` (full = min(in, out), the rank it has while dense), or to the
    smallest rank keeping `energy` of its current product's squared singular values, and never grows: a plain Linear
    is factorized (SVD) once its factors would be smaller than it, or at the `final` event whatever the size (the
    rank asked for is then the one it ends with, as with `low_rank_`); a `LowRankLinear` above the rank is truncated
    to the best approximation of its current product (`refactor`: its trained factors are no longer SVD-ordered, so
    slicing them, as ROSITA's code slices its embedding factors, would not be the best approximation)."""
    base = base_of(model)
    ranks: dict[str, int] = {}
    swaps: list[Swap] = []
    for fqn, module in low_rank_targets(model, filter_fn):
        if isinstance(module, LowRankLinear):
            want = (min(module.rank, rank(min(module.in_features, module.out_features))) if rank is not None
                    else min(module.rank, choose_rank(torch.linalg.svdvals(
                        (module.second.weight @ module.first.weight).detach().double()), energy=energy)))
            if want < module.rank:
                swaps += _truncate(module, want, None)
                ranks[fqn] = module.rank
            continue
        full = min(module.in_features, module.out_features)
        want = (rank(full) if rank is not None
                else choose_rank(torch.linalg.svdvals(module.weight.detach().double()), energy=energy))
        pays = want * (module.in_features + module.out_features) < module.weight.numel()
        if want < full and (pays or final):
            ranks[fqn], more = _factorize(base, fqn, module, want, None)
            swaps += more
    if ranks:
        record_(model, "lowrank", {"modules": ranks})
    return swaps


def shrink_embedding(model: nn.Module, rank: int | None = None, energy: float | None = None) -> list[Swap]:
    """One event for the word embedding: factorized (with its tied decoder) at `rank`, or at the smallest rank
    keeping `energy`, if still dense and smaller than that; else truncated when above it."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, LowRankEmbedding):
        left, right = refactor(embedding.embed.weight, embedding.project.weight.t(), rank, energy)
        if left.shape[1] >= embedding.rank:
            return []
        r = left.shape[1]
        embed = nn.Embedding(embedding.num_embeddings, r, padding_idx=embedding.padding_idx, dtype=left.dtype,
                             device=left.device)
        project = nn.Linear(r, embedding.embedding_dim, bias=False, dtype=left.dtype, device=left.device)
        with torch.no_grad():
            embed.weight.copy_(left)
            project.weight.copy_(right.t())
        swaps = _fresh(embedding.embed.weight, [embed]) + _fresh(embedding.project.weight, [project])
        embedding.embed, embedding.project, embedding.rank = embed, project, r
    else:
        full = min(embedding.weight.shape)
        want = rank if rank is not None else choose_rank(torch.linalg.svdvals(embedding.weight.detach().double()),
                                                         energy=energy)
        if want >= full:
            return []
        old = embedding.weight
        r = factorize_embeddings_(model, want)
        embedding = model.get_input_embeddings()
        swaps = _fresh(old, [embedding.embed, embedding.project])
    record_(model, "lowrank", {"embedding_rank": r})
    return swaps
