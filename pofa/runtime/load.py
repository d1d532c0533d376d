"""Load a pofa model folder straight into the sparse CPU runtime: int8 after QAT, fp32 CSR otherwise."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from torch import nn

from pofa.runtime.csr import SparseRuntimeConfig, sparsify_
from pofa.runtime.int8 import sparse_int8_, without_fake_quant_

__all__ = ["family_runtime_spec", "load_sparse_model"]

_DEFAULT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def family_runtime_spec(model: nn.Module) -> tuple[Callable[[nn.Module, str], bool], tuple[str, ...]]:
    """All the runtime must know of a model's family (:mod:`pofa.families`): which Linears it may run sparse (those
    in encoder blocks) and which inputs the model reads (the benchmark's random batches).

    A model of no registered family: Linears in any registered family's encoder blocks, and the inputs its
    ``forward`` accepts among ``input_ids``, ``attention_mask``, ``token_type_ids``.
    """
    from pofa.families import family_of, is_encoder_linear, model_type_of

    family = family_of(model) if model_type_of(model) is not None else None

    def encoder_linear(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        return family.is_encoder_linear(fqn) if family is not None else is_encoder_linear(fqn)

    if family is not None:
        return encoder_linear, tuple(family.input_names)
    accepted = inspect.signature(model.forward).parameters
    return encoder_linear, tuple(name for name in _DEFAULT_INPUTS if name in accepted)


def load_sparse_model(
    folder: str | Path,
    *,
    int8: bool | None = None,
    config: SparseRuntimeConfig | None = None,
    model_class: type[nn.Module] | None = None,
) -> nn.Module:
    """The model of a pofa folder, in eval mode, with its sparse encoder Linears on the sparse CPU runtime.

    ``int8``: None = int8 when the folder's compact checkpoint (:data:`pofa.artifacts.COMPACT_FILE`) is a QAT one
    (sparse int8 kernels, :func:`pofa.runtime.sparse_int8_`), else fp32 CSR (:func:`pofa.runtime.sparsify_` with
    ``config``, on the encoder Linears); True = require int8; False = fp32 CSR (a QAT folder then runs its
    quantized weights in float, activations unquantized). The folder is read from its compact checkpoint when it
    has one, else as a Hugging Face folder. The model is called as the transformers one (``outputs.logits``).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: ``int8=True`` for a folder without a QAT compact checkpoint, or no sparse Linear to run.
    """
    from pofa.artifacts import COMPACT_FILE
    from pofa.compact import load_compact_model, model_class_for, read_compact_header
    from pofa.quant.qat import is_qat_prepared

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_sparse_model: no model folder at {folder}")
    compact = folder / COMPACT_FILE
    quantized = compact.is_file() and "int8" in read_compact_header(compact)
    if int8 and not quantized:
        raise ValueError(f"load_sparse_model(int8=True): {folder} holds no QAT compact checkpoint ({COMPACT_FILE} "
                         "with int8 weights); run the QAT stage and its export first")
    if compact.is_file():
        model = load_compact_model(compact, folder, model_class=model_class)
    else:
        from transformers import AutoConfig

        cls = model_class or model_class_for(AutoConfig.from_pretrained(str(folder)), None)
        model = cls.from_pretrained(str(folder)).eval()
    if quantized and int8 is not False:
        return sparse_int8_(model)
    if is_qat_prepared(model):
        without_fake_quant_(model)
    encoder_linear, _ = family_runtime_spec(model)
    return sparsify_(model.eval(), config, filter_fn=encoder_linear)
