"""2:4 Linears on GPU sparse tensor cores: torch's semi-structured sparse tensors, for inference.

A model pruned with ``pruning.pattern: 2:4`` keeps at most 2 of every 4 consecutive weights along each Linear's input
dimension, the layout NVIDIA's sparse tensor cores (Ampere and later) read. :func:`to_semi_structured_` swaps those
weights for ``torch.sparse.to_sparse_semi_structured`` tensors (the non-zeros plus 2-bit indices), so that
``F.linear`` runs the cuSPARSELt / CUTLASS sparse kernels; everything else runs as before::

    store = MaskStore.load(folder / "masks.safetensors")        # pattern "2:4" (or any mask that is 2:4: 1:4, 1:2)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    converted = to_semi_structured_(model, store)               # names of the converted Linear modules

Inference only: torch gives these tensors no optimizer path, so the converted weights are frozen. They need a CUDA
device and fp16/bf16 weights (the dtypes of torch's 2:4 kernels), and torch's minimum shapes (BERT's 768/3072 fit).
``bench/gpu_check.py`` measures the speedup over dense bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pofa.sparsity.masks import MaskStore, MaskViolationError, bind_masks, nm_violations

__all__ = ["SEMI_STRUCTURED_DTYPES", "semi_structured_linears", "to_semi_structured_"]

SEMI_STRUCTURED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Weight dtypes whose 2:4 kernels torch provides (float32 would need a 1:2 pattern, int8 a separate path)."""

_TWO_FOUR = (2, 4)


def _is_two_four(mask: Tensor) -> bool:
    return mask.dim() == 2 and mask.shape[-1] % 4 == 0 and nm_violations(mask, _TWO_FOUR) == 0


def semi_structured_linears(model: nn.Module, store: MaskStore) -> dict[str, nn.Linear]:
    """Module name -> ``nn.Linear`` of ``model`` whose weight has a mask in ``store`` that is 2:4 (at most 2 kept in
    every 4 along the input dimension), in ``model.named_modules()`` order.

    Whatever the store's declared pattern, each mask is tested itself: a 1:4 or 1:2 mask is 2:4 as well, and an
    unstructured mask that happens to be 2:4 qualifies too. Masks of non-Linear parameters are ignored.

    Raises:
        ValueError: if the masks do not bind to ``model`` (see :func:`pofa.sparsity.masks.bind_masks`).
    """
    mask_of = {id(param): store[name] for name, param in bind_masks(model, store).items()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in mask_of and _is_two_four(mask_of[id(module.weight)])
    }


def to_semi_structured_(model: nn.Module, store: MaskStore) -> list[str]:
    """Replace, in place, the weight of every 2:4 Linear of ``model`` (:func:`semi_structured_linears`) by a frozen
    ``torch.sparse.SparseSemiStructuredTensor`` parameter; return the converted module names.

    Every weight is checked first, so that nothing is converted unless everything can be: each one's non-zeros must
    be 2:4 (pruned positions exactly zero), on a CUDA device, in fp16 or bf16.

    Raises:
        ValueError: if no Linear of ``model`` has a 2:4 mask, or a weight is not on CUDA or not fp16/bf16 (naming
            the module, its device and dtype).
        MaskViolationError: if a weight has more than 2 non-zeros in some group of 4 (naming the module).
        RuntimeError: from torch when it rejects a shape (naming the module).
    """
    from torch.sparse import to_sparse_semi_structured

    linears = semi_structured_linears(model, store)
    if not linears:
        raise ValueError(f"no Linear of {type(model).__name__} has a 2:4 mask in the store (pattern "
                         f"{store.pattern!r}); prune with pruning.pattern: 2:4")
    for name, module in linears.items():
        weight = module.weight
        if weight.device.type != "cuda" or weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(f"{name}.weight is {weight.dtype} on {weight.device}; semi-structured sparse kernels "
                             "need a CUDA device and float16 or bfloat16 weights (model.to('cuda', torch.bfloat16))")
        violations = nm_violations(weight.detach() != 0, _TWO_FOUR, f"{name}.weight")
        if violations:
            raise MaskViolationError(f"{name}.weight has more than 2 non-zeros in {violations} groups of 4; "
                                     "zero the pruned weights first (check_masks)")
    for name, module in linears.items():
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except RuntimeError as error:
            raise RuntimeError(f"{name}.weight {tuple(module.weight.shape)}: {error}") from error
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return list(linears)
