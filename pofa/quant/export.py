"""ONNX export of (QAT) encoders, and a parity check against PyTorch with onnxruntime.

Usage::

    from pofa.artifacts import ONNX_FILE
    from pofa.quant import export_onnx, require_onnx_parity
    export_onnx(model, tokenizer, final_dir / ONNX_FILE, int8=True, parity_batches=batches)

A pofa folder holds one ONNX file, ``pofa.artifacts.ONNX_FILE`` (``model.onnx``), whichever wrote it (fine-tuning's
``export.onnx`` or ``pofa export``): the int8 QDQ graph after QAT, the float graph otherwise. ``check_onnx_parity``
tells them apart by the graph (``quantized_file``). ``parity_batches`` should be real rows of the model's task
(``pofa export`` never checks on synthetic ones).

Exporter choice: torch 2.13 offers the dynamo exporter (``dynamo=True``, the default) and the TorchScript exporter
(``dynamo=False``, deprecated but present). The dynamo exporter needs ``onnxscript`` (not a pofa dependency, not
installed here) and custom ops need onnxscript translation functions. The TorchScript exporter runs with what we
have, and its ``autograd.Function.symbolic`` hook lets our fake-quant Functions emit the QuantizeLinear /
DequantizeLinear pairs directly with the learned scales, with no graph rewriting afterwards. So we use it
(``dynamo=False``, opset 17), and silence its deprecation warning here only.

The int8 graph (QDQ format): every fake-quant Linear becomes
``MatMul(DequantizeLinear(QuantizeLinear(x, s_x, z_x)), DequantizeLinear(W_t int8, s_w per column, 0)) + bias``,
with ``W_t`` a named int8 initializer (``<module>.onnx_qweight_t``); onnxruntime fuses the pattern into integer
MatMul kernels (``MatMulIntegerToFloat``). Mind ``weight_dtype`` on x86 CPUs without VNNI (see ``export_onnx``):
measured here (AVX2), a QDQ MatMul with full-range 8-bit int8 weights is off by whole units of saturation.
Embedding tables quantized in QAT are stored int8 and gathered before scaling. Task heads, LayerNorm and attention
stay float.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pofa.families import family_of, model_type_of
from pofa.quant.qat import FakeQuantLinear, export_mode, is_qat_prepared, qat_modules

__all__ = ["export_onnx", "check_onnx_parity", "require_onnx_parity", "onnx_session", "ONNX_INPUT_NAMES"]

# Model inputs we export, in this order, when the model and the example provide them.
ONNX_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# ModelOutput fields that are not predictions.
_SKIPPED_OUTPUTS = {"loss", "hidden_states", "attentions", "past_key_values", "cross_attentions"}
_EXAMPLE_TEXTS = ["pofa exports this example.", "A second, somewhat longer example sentence for the export."]


class _Positional(nn.Module):
    """Calls an HF model with named inputs given positionally, returns the named outputs as a tuple."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(out[name] for name in self.output_names)


def _example_inputs(model: nn.Module, tokenizer_or_example_inputs: Any) -> dict[str, Tensor]:
    if isinstance(tokenizer_or_example_inputs, Mapping):
        inputs = dict(tokenizer_or_example_inputs)
    elif callable(tokenizer_or_example_inputs):
        inputs = dict(tokenizer_or_example_inputs(_EXAMPLE_TEXTS, padding=True, return_tensors="pt"))
    else:
        raise TypeError(
            "export_onnx: tokenizer_or_example_inputs must be a tokenizer or a mapping of input name -> tensor, "
            f"got {type(tokenizer_or_example_inputs).__name__}"
        )
    if "input_ids" not in inputs:
        raise ValueError(f"export_onnx: the example inputs have no 'input_ids' (keys: {sorted(inputs)})")
    device = next(model.parameters()).device
    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    # RoBERTa's forward accepts token_type_ids but its tokenizers never give them: the family says what is read
    names = family_of(model).input_names if model_type_of(model) is not None else ONNX_INPUT_NAMES
    return {name: inputs[name].to(device) for name in names if name in inputs and name in accepted}


def _grown(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same inputs with one more row and one more (padding) position, to see which output axes follow them."""
    out = {}
    for name, t in inputs.items():
        t = torch.cat([t, t[:1]], dim=0)
        out[name] = torch.cat([t, torch.zeros_like(t[:, :1])], dim=1)
    return out


def _output_axes(model: nn.Module, inputs: Mapping[str, Tensor]) -> dict[str, dict[int, str]]:
    """Output names and their dynamic axes, found by running the model at two input shapes."""
    with torch.no_grad():
        a = model(**inputs, return_dict=True)
        b = model(**_grown(inputs), return_dict=True)
    batch, seq = inputs["input_ids"].shape
    axes: dict[str, dict[int, str]] = {}
    for name, value in a.items():
        if name in _SKIPPED_OUTPUTS or not isinstance(value, Tensor):
            continue
        dims: dict[int, str] = {}
        for i, (n_a, n_b) in enumerate(zip(value.shape, b[name].shape)):
            if n_a != n_b:
                dims[i] = "batch" if (n_a, n_b) == (batch, batch + 1) else "sequence"
        axes[name] = dims
    return axes


def export_onnx(
    model: nn.Module,
    tokenizer_or_example_inputs: Any,
    path: str | Path,
    *,
    int8: bool,
    opset: int = 17,
    weight_dtype: Literal["int8", "uint8"] = "int8",
    parity_batches: Iterable[Mapping[str, Tensor]] | None = None,
    min_agreement: float = 0.99,
) -> Path:
    """Export an HF encoder model (any head) to an ONNX file that onnxruntime runs; return the path.

    ``int8=True`` needs a model prepared with :func:`pofa.quant.prepare_qat_` (and trained, so the activation
    observers have data) and writes a QDQ graph with int8 weight initializers and the learned scales.
    ``int8=False`` writes a float graph (for a QAT model: the float model, fake-quant switched off).
    ``weight_dtype``: how the int8 Linear weights are stored. ``"int8"`` (zero-point 0): onnxruntime runs its
    U8S8 kernels, the fastest, exact on x86 CPUs with VNNI; on x86 CPUs with AVX2 only (as here), their
    16-bit intermediate sums saturate with 8-bit weights, so there train with ``QATConfig(weight_bits=7)``
    (exact: 2 x 255 x 63 fits in int16) or export ``"uint8"``: the same values stored as ``q + 128`` with
    zero-point 128, which runs U8U8 kernels, exact everywhere but ~3x slower per MatMul on AVX2.
    Inputs: ``input_ids`` and, when given by the example, ``attention_mask`` and ``token_type_ids``, int64 with
    dynamic ``batch`` and ``sequence`` axes; outputs: the model's prediction fields by name (``logits``;
    ``start_logits``/``end_logits``; ``last_hidden_state``...). With ``parity_batches``, runs
    :func:`require_onnx_parity` on the written file. The model's training mode is restored on return.
    """
    if int8 and not is_qat_prepared(model):
        raise ValueError(
            "export_onnx(int8=True): the model was not prepared for quantization-aware training, so it has no "
            "learned int8 scales. Run the QAT stage first (pofa.quant.prepare_qat_(model, QATConfig()) and "
            "fine-tune), or export float with int8=False."
        )
    if int8:
        for name, module in qat_modules(model).items():
            if isinstance(module, FakeQuantLinear) and module.config.activation_bits != 8:
                raise ValueError(
                    f"export_onnx(int8=True): {name!r} quantizes activations to {module.config.activation_bits} bits; "
                    "ONNX QuantizeLinear is 8-bit (uint8), so export needs QATConfig(activation_bits=8)"
                )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        inputs = _example_inputs(model, tokenizer_or_example_inputs)
        mode = "int8" if int8 else "float"
        with export_mode(model, mode, weight_dtype=weight_dtype):
            axes = _output_axes(model, inputs)
            wrapper = _Positional(model, list(inputs), list(axes)).eval()
            dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in inputs} | axes
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated (see the module docstring for why we use it), and tracing
                # warns on every Python bool/float taken from a tensor (our scales become constants on purpose).
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*Converting a tensor to a Python.*")
                # transformers' attention-mask construction indexes with positions, which are never negative.
                warnings.filterwarnings("ignore", message=".*Exporting aten::index operator.*")
                # DeBERTa-v2 builds its attention scale with torch.tensor(size) while traced: a constant, as wanted.
                warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")
                torch.onnx.export(
                    wrapper,
                    tuple(inputs.values()),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(inputs),
                    output_names=list(axes),
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
    finally:
        model.train(was_training)
    _strip_wrapper_prefix(path)
    if parity_batches is not None:
        was_training = model.training
        try:
            require_onnx_parity(model, path, parity_batches, min_agreement=min_agreement)
        finally:
            model.train(was_training)
    return path


def _strip_wrapper_prefix(path: Path) -> None:
    """Rename initializers ``model.<param>`` (named after our wrapper) to the model's own ``<param>`` names."""
    import onnx

    proto = onnx.load(str(path))
    prefix = "model."
    renamed = {i.name: i.name[len(prefix):] for i in proto.graph.initializer if i.name.startswith(prefix)}
    taken = {i.name for i in proto.graph.initializer} | {n for node in proto.graph.node for n in node.output}
    if not renamed or set(renamed.values()) & taken:
        return  # nothing to do, or a clash we will not risk
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
    onnx.save(proto, str(path))


def onnx_session(path: str | Path, *, threads: int | None = None):  # noqa: ANN201 (onnxruntime.InferenceSession)
    """An onnxruntime CPU session for ``path`` (all graph optimizations; ``threads`` intra-op threads if given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_feed(session, batch: Mapping[str, Tensor]) -> dict[str, np.ndarray]:  # noqa: ANN001
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"the ONNX model needs inputs {missing} that the batch does not have (keys: {sorted(batch)})")
    return {n: batch[n].detach().cpu().numpy().astype(np.int64) for n in names}


def check_onnx_parity(
    model: nn.Module, onnx_path: str | Path, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, Any]:
    """Compare onnxruntime on ``onnx_path`` with ``model`` in eval mode on ``batches``.

    The PyTorch side is the fake-quantized model for an int8 (QDQ) file, and the float model (fake-quant off)
    for a float file. Returns ``agreement`` (fraction of argmax predictions over the last axis that agree, over
    all outputs; token-level outputs count only positions where ``attention_mask`` is 1), ``n_predictions``,
    ``max_abs_diff``, ``mean_abs_diff`` (over all output values) and ``per_output`` with the same per output name.
    The model is left in eval mode.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    quantized_file = any(node.op_type == "QuantizeLinear" for node in graph.node)
    session = onnx_session(onnx_path)
    output_names = [o.name for o in session.get_outputs()]
    model.eval()
    stats = {
        name: {"agree": 0, "total": 0, "max_abs_diff": 0.0, "abs_sum": 0.0, "n_values": 0} for name in output_names
    }
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            feed = _ort_feed(session, batch)
            ort_out = session.run(output_names, feed)
            torch_in = {n: torch.from_numpy(v).to(device) for n, v in feed.items()}
            # A float file is compared with the float model: fake-quant switched off (a no-op without QAT).
            with export_mode(model, "float") if not quantized_file else nullcontext():
                ref = model(**torch_in, return_dict=True)
            mask = feed.get("attention_mask")
            for name, got in zip(output_names, ort_out):
                want = ref[name].detach().cpu().float().numpy()
                if got.shape != want.shape:
                    raise ValueError(
                        f"check_onnx_parity: output {name!r} has shape {got.shape} in onnxruntime but {want.shape} "
                        "in PyTorch"
                    )
                s = stats[name]
                diff = np.abs(got.astype(np.float64) - want)
                s["max_abs_diff"] = max(s["max_abs_diff"], float(diff.max(initial=0.0)))
                s["abs_sum"] += float(diff.sum())
                s["n_values"] += diff.size
                same = got.argmax(-1) == want.argmax(-1)
                if mask is not None and same.ndim == 2 and same.shape == mask.shape and got.ndim == 3:
                    same = same[mask.astype(bool)]
                s["agree"] += int(same.sum())
                s["total"] += int(same.size)
    per_output = {
        name: {
            "agreement": s["agree"] / s["total"] if s["total"] else float("nan"),
            "n_predictions": s["total"],
            "max_abs_diff": s["max_abs_diff"],
            "mean_abs_diff": s["abs_sum"] / s["n_values"] if s["n_values"] else float("nan"),
        }
        for name, s in stats.items()
    }
    total = sum(s["total"] for s in stats.values())
    n_values = sum(s["n_values"] for s in stats.values())
    if total == 0:
        raise ValueError("check_onnx_parity: no batches were given")
    return {
        "agreement": sum(s["agree"] for s in stats.values()) / total,
        "n_predictions": total,
        "max_abs_diff": max(s["max_abs_diff"] for s in stats.values()),
        "mean_abs_diff": sum(s["abs_sum"] for s in stats.values()) / n_values,
        "per_output": per_output,
        "quantized_file": quantized_file,
    }


def require_onnx_parity(
    model: nn.Module,
    onnx_path: str | Path,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    min_agreement: float = 0.99,
) -> dict[str, Any]:
    """:func:`check_onnx_parity`, raising ``ValueError`` (with the numbers) if agreement < ``min_agreement``."""
    report = check_onnx_parity(model, onnx_path, batches)
    if report["agreement"] < min_agreement:
        raise ValueError(
            f"ONNX parity check failed for {onnx_path}: argmax agreement {report['agreement']:.4f} < {min_agreement} "
            f"over {report['n_predictions']} predictions (max |logit diff| {report['max_abs_diff']:.4g}, mean "
            f"{report['mean_abs_diff']:.4g}); per output: {report['per_output']}"
        )
    return report
