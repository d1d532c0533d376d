"""Quantization: 8-bit QAT (:mod:`pofa.quant.qat`) and ONNX export with a parity check (:mod:`pofa.quant.export`)."""

from pofa.quant.export import check_onnx_parity, export_onnx, onnx_session, require_onnx_parity
from pofa.quant.qat import (
    ActivationQuant,
    FakeQuantEmbedding,
    FakeQuantLinear,
    Int8Weight,
    QATConfig,
    QuantizedModule,
    convert_to_int8,
    default_qat_filter,
    freeze_observers_,
    is_qat_prepared,
    prepare_qat_,
    qat_modules,
    qat_step_,
)

__all__ = [
    "ActivationQuant",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "Int8Weight",
    "QATConfig",
    "QuantizedModule",
    "check_onnx_parity",
    "convert_to_int8",
    "default_qat_filter",
    "export_onnx",
    "freeze_observers_",
    "is_qat_prepared",
    "onnx_session",
    "prepare_qat_",
    "qat_modules",
    "qat_step_",
    "require_onnx_parity",
]
