"""Latency of a sparse model under pofa's runtimes and under what a user would pick instead, in one process.

The variants (:data:`VARIANTS`), named so that none can be mistaken for another:

- ``torch_fp32_dense``: the float model in PyTorch, dense kernels (zeros multiplied): the baseline of every ratio;
- ``ort_fp32_dense``: the same float model exported to ONNX, onnxruntime;
- ``ort_int8_dense``: that ONNX file quantized by onnxruntime's own tool (``quantize_dynamic``, its defaults: int8
  weights per tensor, uint8 activations quantized at run time), what a user gets without pofa; zeros multiplied;
- ``pofa_int8_onnx``: pofa's int8 QDQ export of the QAT model (static activation scales), onnxruntime, dense;
- ``pofa_sparse_fp32``: the float model with its encoder Linears on pofa's CSR kernels (numba when importable);
- ``pofa_sparse_int8``: the QAT model with its encoder Linears on pofa's sparse int8 kernels.

Runs alternate between variants (the order rotates every repeat) so that load from other processes hits all of them
alike; medians are reported. onnxruntime runs with the same thread count as torch and without spin-waiting (its
spinning threads would otherwise steal the cores from the variant timed next).
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pofa.runtime.csr import SparseRuntimeConfig, sparsify_
from pofa.runtime.int8 import sparse_int8_, without_fake_quant_
from pofa.runtime.load import family_runtime_spec

__all__ = ["VARIANTS", "benchmark_latency"]

VARIANTS = ("torch_fp32_dense", "ort_fp32_dense", "ort_int8_dense", "pofa_int8_onnx", "pofa_sparse_fp32",
            "pofa_sparse_int8")
_BASELINE = "torch_fp32_dense"
_USER_INT8 = "ort_int8_dense"

Run = Callable[[Mapping[str, Tensor]], Any]


def _load_models(
    model_dir_or_model: str | Path | nn.Module, qat_model: str | Path | nn.Module | None
) -> tuple[nn.Module, nn.Module | None]:
    """(float model, QAT model or None), in eval mode. A folder whose compact checkpoint is a QAT one gives both:
    the QAT model and its float twin (fake-quant off, the dequantized weights)."""
    from pofa.artifacts import COMPACT_FILE
    from pofa.compact import load_compact_model, read_compact_header

    def load(folder: Path) -> nn.Module:
        compact = folder / COMPACT_FILE
        if compact.is_file():
            return load_compact_model(compact, folder)
        from transformers import AutoConfig

        from pofa.compact import model_class_for

        return model_class_for(AutoConfig.from_pretrained(str(folder)), None).from_pretrained(str(folder)).eval()

    if isinstance(qat_model, (str, Path)):
        qat_model = load(Path(qat_model))
    if isinstance(model_dir_or_model, nn.Module):
        return model_dir_or_model.eval(), qat_model
    folder = Path(model_dir_or_model)
    compact = folder / COMPACT_FILE
    if qat_model is None and compact.is_file() and "int8" in read_compact_header(compact):
        qat_model = load(folder)
        return without_fake_quant_(copy.deepcopy(qat_model)).eval(), qat_model.eval()
    return load(folder).eval(), qat_model


def _random_inputs(vocab_size: int, names: Sequence[str], batch_size: int, seq_len: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return {name: inputs[name] for name in names if name in inputs}


def _ort_run(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(None, {n: batch[n].numpy() for n in names})


def _ort_int8_of(fp32_onnx: Path, out: Path) -> Path:
    """onnxruntime's dynamic quantization of a float ONNX file, as its documentation shows it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its "consider pre-processing"
    quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8)
    return out


def _build_variants(
    wanted: Sequence[str], dense: nn.Module, qat: nn.Module | None, onnx_int8_path: str | Path | None,
    example: Mapping[str, Tensor], sparse_config: SparseRuntimeConfig, threads: int,
) -> dict[str, Run]:
    from pofa.quant.export import export_onnx

    encoder_linear, _ = family_runtime_spec(dense)
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory() as tmp:  # sessions read their file when created
        fp32_onnx = Path(tmp) / "fp32.onnx"
        if {"ort_fp32_dense", "ort_int8_dense"} & set(wanted):
            export_onnx(dense, example, fp32_onnx, int8=False)
        for name in wanted:
            if name == "torch_fp32_dense":
                runs[name] = lambda b: dense(**b)
            elif name == "ort_fp32_dense":
                runs[name] = _ort_run(fp32_onnx, threads)
            elif name == "ort_int8_dense":
                runs[name] = _ort_run(_ort_int8_of(fp32_onnx, Path(tmp) / "ort_int8.onnx"), threads)
            elif name == "pofa_int8_onnx":
                path = onnx_int8_path or export_onnx(qat, example, Path(tmp) / "pofa_int8.onnx", int8=True)
                runs[name] = _ort_run(Path(path), threads)
            elif name == "pofa_sparse_fp32":
                sparse = sparsify_(copy.deepcopy(dense), sparse_config, filter_fn=encoder_linear)
                runs[name] = lambda b, m=sparse: m(**b)
            elif name == "pofa_sparse_int8":
                runtime = sparse_int8_(copy.deepcopy(qat))
                runs[name] = lambda b, m=runtime: m(**b)
    return runs


def _time_alternating(runs: Mapping[str, Run], batch: Mapping[str, Tensor], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant; the order rotates every repeat."""
    for run in runs.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            runs[name](batch)
            times[name].append(time.perf_counter() - start)
    return times


def benchmark_latency(
    model_dir_or_model: str | Path | nn.Module,
    *,
    qat_model: str | Path | nn.Module | None = None,
    onnx_int8_path: str | Path | None = None,
    variants: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    min_sparsity: float = 0.7,
    sparse_backend: Literal["torch", "numba", "auto"] = "auto",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the :data:`VARIANTS` of one sparse model in this process, on random token ids.

    ``model_dir_or_model``: the float model (a module, or a pofa / Hugging Face folder; a QAT folder gives the
    QAT model too). ``qat_model``: the QAT model (a trained, QAT-prepared module, or a QAT folder), for
    ``pofa_sparse_int8`` and, exported when ``onnx_int8_path`` is not given, ``pofa_int8_onnx``. ``variants``:
    default every variant that the given models allow. ``sparse_backend`` / ``min_sparsity``: for
    ``pofa_sparse_fp32`` (:class:`pofa.runtime.SparseRuntimeConfig`).

    One row per (batch size, variant): ``variant``, ``batch_size``, ``seq_len``, ``latency_ms`` (median),
    ``min_ms``, ``speedup_vs_dense`` (``torch_fp32_dense`` median / variant median; > 1 is faster),
    ``speedup_vs_ort_int8_dense`` (the same against ``ort_int8_dense``, when timed), ``repeats``, ``threads``.
    Outputs are not compared here: the tests do that.

    Raises:
        ValueError: an unknown variant, a variant that needs the QAT model without one, or bad counts.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"benchmark_latency: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dense, qat = _load_models(model_dir_or_model, qat_model)
    needs_qat = {"pofa_sparse_int8"} | (set() if onnx_int8_path is not None else {"pofa_int8_onnx"})
    if variants is None:
        variants = [v for v in VARIANTS if qat is not None or v not in needs_qat]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"benchmark_latency: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if qat is None and needs_qat & set(variants):
        raise ValueError(f"benchmark_latency: {sorted(needs_qat & set(variants))} need the QAT model (qat_model=, "
                         "or a QAT folder)")
    _, input_names = family_runtime_spec(dense)
    vocab_size = int(getattr(getattr(dense, "config", None), "vocab_size", 1000))
    threads = torch.get_num_threads()
    example = _random_inputs(vocab_size, input_names, 2, min(seq_len, 16), seed)
    config = SparseRuntimeConfig(backend=sparse_backend, min_sparsity=min_sparsity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecations and tracer notices: not the user's to act on
        runs = _build_variants(variants, dense, qat, onnx_int8_path, example, config, threads)

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch_size in batch_sizes:
            batch = _random_inputs(vocab_size, input_names, batch_size, seq_len, seed)
            times = _time_alternating(runs, batch, repeats, warmup)
            medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            for name, ts in times.items():
                row = {"variant": name, "batch_size": batch_size, "seq_len": seq_len, "latency_ms": medians[name],
                       "min_ms": min(ts) * 1e3, "repeats": repeats, "threads": threads}
                for key, base in (("speedup_vs_dense", _BASELINE), ("speedup_vs_ort_int8_dense", _USER_INT8)):
                    if base in medians:
                        row[key] = medians[base] / medians[name]
                rows.append(row)
    return rows
