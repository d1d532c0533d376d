"""GPU check: the BERT-Base student step under DDP, DeepSpeed ZeRO-2 and FSDP2, and 2:4 sparse Linears; one JSON line.

    python bench/gpu_check.py                          # one GPU, at most ~8 minutes
    python bench/gpu_check.py --compile --batch 64     # adds a DDP run under torch.compile (accelerate's dynamo)
    python bench/gpu_check.py --smoke                  # CPU, tiny BERT, a few steps: the same path minus CUDA parts

Each backend is the real thing, in its own process: `accelerate launch --config_file launch/<backend>.yaml
--num_processes 1` runs this file's worker, which calls `pofa.pretrain.main` on the shipped `bert-base-sparse90`
recipe with overrides (the paper's pruning, revival, learning-rate rewinding and distillation over all positions;
random BERT-Base weights from transformers' `BertConfig()` defaults, `model.from_scratch`, a teacher of the same shape
in bf16, bf16 autocast; the embedded corpus; the sparsity ramp squeezed into the warm-up steps). The worker only
watches: it reads the throughput the stage logs over the steady-state steps (after warm-up, past the last pruning
event), runs those steps' `micro_step` (forward, backward, gradient masking, clipping, AdamW) under
`torch.cuda.set_sync_debug_mode` and counts every host synchronisation with the line that caused it, and after the run
checks the final model against its masks (`check_masks`, as the stage itself did on every process before writing).

FLOPs per token (an estimate, stated so that it can be checked): every matrix product counts 2 FLOPs per multiply-add;
the student trains (forward + backward = 3 x forward), the teacher runs forward only. Per token, forward: each layer's
Linears 2 x (4 d^2 + 2 d f) plus attention's two products with the sequence 2 x 2 x seq x d; the MLM head
(2 d^2 + 2 d V) at the distilled positions (all of them with `distillation.positions: all`). So 6 x params (+
attention) for the student and 2 x params (+ attention) for the teacher; the pruned weights are still multiplied
(dense kernels). The fraction of peak divides by the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`).

2:4: `pofa.sparsity.semi_structured.to_semi_structured_` on BERT-Base's Linear shapes (4096 tokens) and on the whole
encoder's forward, against dense bf16, timed with CUDA events.

Every part runs in a subprocess with a timeout; a failure lands in the JSON as `error` (with the tail of its output)
and the rest still runs. Parts left when the time budget (`--budget`) runs out are reported `skipped`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "bert-base-sparse90"

BACKENDS: dict[str, str] = {
    "ddp": "launch/ddp.yaml",
    "zero2": "launch/deepspeed-zero2.yaml",
    "fsdp2": "launch/fsdp.yaml",
}
"""Backend name -> accelerate config file (relative to the repository)."""

# Dense bf16 tensor-core peaks (no 2:4 sparsity), TFLOPS, from NVIDIA's data sheets; first match wins, so the more
# specific names come first ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),
    (r"\bH800\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name`` (``torch.cuda.get_device_name()``), None if unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def forward_flops_per_token(config: Any, seq_len: int, head_fraction: float) -> float:
    """Forward FLOPs per token of a BERT MLM model: the encoder's Linears and attention products at every position,
    the MLM head (transform + vocabulary projection) at ``head_fraction`` of the positions."""
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    linears = 2 * (4 * d * d + 2 * d * f)
    attention = 2 * 2 * seq_len * d  # Q K^T and (softmax) V, per token
    head = 2 * (d * d + d * vocab)
    return layers * (linears + attention) + head_fraction * head


def student_step_flops_per_token(config: Any, seq_len: int, head_fraction: float, teacher: bool = True) -> float:
    """FLOPs per token of a student step: the student's forward and backward (3 x forward) and, with a teacher of
    the same shape, its forward."""
    forward = forward_flops_per_token(config, seq_len, head_fraction)
    return 3 * forward + (forward if teacher else 0.0)


def steady_tokens_per_s(log_lines: list[str], after_step: int) -> tuple[float, int] | None:
    """Throughput over the logged windows that start at or after ``after_step``: (tokens/s, steps covered), from
    the stage's `step N: ... tokens_per_s X` lines (each window's rate is over the steps since the previous line)."""
    points = []
    for line in log_lines:
        match = re.match(r"step (\d+): .*\btokens_per_s ([0-9.eE+-]+)", line)
        if match:
            points.append((int(match.group(1)), float(match.group(2))))
    windows = [(step - previous, rate) for (previous, _), (step, rate) in zip(points, points[1:])
               if previous >= after_step]
    if not windows or any(rate <= 0 for _, rate in windows):
        return None
    steps = sum(count for count, _ in windows)
    # Equal tokens per step: the overall rate is the step-weighted harmonic mean of the windows' rates.
    return steps / sum(count / rate for count, rate in windows), steps


# --------------------------------------------------------------------------------------------------------------------
# The run's inputs


@dataclass(frozen=True)
class Sizes:
    """What one check trains: model shape, batch, sequence length and step counts."""

    smoke: bool
    batch: int
    seq_len: int
    warmup_steps: int
    steady_steps: int

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.steady_steps


def model_config(smoke: bool):
    """BERT-Base (transformers' `BertConfig()` defaults), or a tiny BERT for the smoke run."""
    from transformers import BertConfig

    if smoke:
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=128, vocab_size=1000)
    return BertConfig()


def build_tokenizer(folder: Path, vocab_size: int):
    """A WordPiece tokenizer trained on the embedded corpus (offline, seconds): token ids only need to exist."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    from pofa.data.corpus import python_docs_documents

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(python_docs_documents(), trainer)
    fast = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=512)
    fast.save_pretrained(folder)
    return fast


def prepare_model_folder(folder: Path, smoke: bool) -> tuple[Any, int]:
    """Random weights of the check's BERT (seed 0) with a tokenizer, as a model folder: the teacher, and the config
    the student is built from (`model.from_scratch`). Returns the config and the number of parameters."""
    import torch
    from transformers import BertForMaskedLM

    config = model_config(smoke)
    build_tokenizer(folder, vocab_size=min(4096, config.vocab_size))
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    model.save_pretrained(folder)
    return config, sum(param.numel() for param in model.parameters())


def recipe_overrides(sizes: Sizes, model_dir: Path, out_dir: Path, cache_dir: Path, pattern: str) -> list[str]:
    """Dotted overrides of the shipped student recipe: this model and corpus, these sizes, and a pruning ramp that
    ends before the warm-up does, so the steady-state steps are plain student steps with fixed masks."""
    ramp_end = max(1, sizes.warmup_steps - 2)
    overrides = [
        f"model.name_or_path={model_dir}", "model.from_scratch=true",
        "data.sources=[{embedded: python-docs}]", f"data.max_seq_length={sizes.seq_len}",
        "data.eval_fraction=0.05", "data.max_eval_blocks=64", "data.preprocessing_workers=1",
        f"data.cache_dir={cache_dir}",
        f"training.output_dir={out_dir}", f"training.max_steps={sizes.max_steps}",
        f"training.per_device_batch_size={sizes.batch}", "training.gradient_accumulation_steps=1",
        "training.warmup_steps=1", f"training.log_every={sizes.warmup_steps}", "training.eval_every=1000000",
        "training.save_every=1000000", "training.eval_batches=1", "training.keep_last=1", "training.trackers=[]",
        f"training.mixed_precision={'no' if sizes.smoke else 'bf16'}",
        "pruning.start_step=0", f"pruning.end_step={ramp_end}", f"pruning.end_pruning_step={ramp_end}",
        f"pruning.frequency={max(1, ramp_end // 4)}", f"pruning.pattern={pattern}",
        f"distillation.teacher={model_dir}", "distillation.teacher_dtype=bfloat16",
    ]
    if pattern != "unstructured":
        from pofa.sparsity import pattern_sparsity

        overrides.append(f"pruning.target_sparsity={pattern_sparsity(pattern)}")
    return overrides


# --------------------------------------------------------------------------------------------------------------------
# Subprocesses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_isolated(command: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` in its own process group; kill the whole group (launcher and its workers) on timeout.
    Returns rc, seconds, timed_out and the tail of its combined output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    return {"rc": process.returncode, "seconds": round(time.perf_counter() - started, 1), "timed_out": timed_out,
            "tail": (output or "")[-3000:]}


def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU path, also on a machine that has a GPU
    return env


def accelerate_command(backend: str, compiled: bool, worker_args: list[str]) -> list[str]:
    """`accelerate launch` of this file's worker with the backend's launch/ config, on one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / BACKENDS[backend]),
               "--num_processes", "1", "--num_machines", "1", "--machine_rank", "0",
               "--main_process_port", str(free_port())]
    if compiled:
        command += ["--dynamo_backend", "inductor"]
    return command + [str(Path(__file__).resolve()), "--worker", *worker_args]


def read_result(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The worker's JSON result, or an error entry naming what went wrong with the tail of the output."""
    if run["timed_out"]:
        return {"error": f"timed out after {run['seconds']} s", "tail": run["tail"]}
    if path.is_file():
        result = json.loads(path.read_text())
        if run["rc"] != 0 or "error" in result:
            result.setdefault("error", f"exit status {run['rc']}")
            result["tail"] = run["tail"]
        result["seconds"] = run["seconds"]
        return result
    return {"error": f"exit status {run['rc']} without a result", "tail": run["tail"]}


# --------------------------------------------------------------------------------------------------------------------
# The worker (inside `accelerate launch`)


class StepProbe:
    """Wraps `pofa.pretrain.micro_step`: records the run's set-up at the first call and, after ``warmup`` calls, runs
    each under CUDA sync debug mode (``"warn"``: count each host synchronisation by the line that caused it;
    ``"error"``: fail at the first)."""

    def __init__(self, inner: Callable[..., Any], warmup: int, mode: str) -> None:
        self.inner, self.warmup, self.mode = inner, warmup, mode
        self.calls = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self.setup: dict[str, Any] = {}

    def __call__(self, run: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        self.calls += 1
        if self.calls == 1:
            self.setup = describe_run(run, module)
        if self.calls <= self.warmup or self.mode == "off" or not torch.cuda.is_available():
            return self.inner(run, module, *args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(self.mode)
            try:
                return self.inner(run, module, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                for warning in caught:
                    if "synchroniz" in str(warning.message):
                        self.sites[f"{_short(warning.filename)}:{warning.lineno}"] += 1


def _short(filename: str) -> str:
    """A file name relative to the repository or to site-packages, so the sites read at a glance."""
    for anchor in (str(ROOT) + os.sep, "site-packages" + os.sep):
        if anchor in filename:
            return filename.split(anchor, 1)[1]
    return filename


def describe_run(run: Any, module: Any) -> dict[str, Any]:
    """The backend, optimizer and attention the stage actually set up."""
    from pofa.sparsity.masks import unwrap_model

    optimizer = run.optimizer
    while getattr(optimizer, "optimizer", None) is not None:  # accelerate / DeepSpeed wrappers
        optimizer = optimizer.optimizer
    inner = unwrap_model(module)
    config = getattr(getattr(inner, "model", inner), "config", None)
    return {
        "distributed_type": str(run.accelerator.distributed_type),
        "mixed_precision": run.accelerator.mixed_precision,
        "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
        "attention": getattr(config, "_attn_implementation", None),
        "compiled": hasattr(module, "_orig_mod"),  # torch.compile's OptimizedModule wraps the module it compiles
    }


class Tee(io.StringIO):
    """Keeps what is written and passes it on to ``stream``."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def text(self) -> str:
        return self.getvalue()


class LogTap(logging.Handler):
    """Keeps the stage's console lines (the `pofa` logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def worker(args: argparse.Namespace) -> int:
    """Run `pofa.pretrain.main` on the shipped student recipe with the check's overrides, watched; write the result."""
    import torch

    import pofa.pretrain as pretrain
    from pofa.artifacts import FINAL_DIR, MASKS_FILE
    from pofa.modeling import load_mlm_model
    from pofa.sparsity import MaskStore, check_masks, sparsity_report

    result: dict[str, Any] = {}
    sizes = Sizes(args.smoke, args.batch, args.seq_len, args.warmup_steps, args.steady_steps)
    out_dir = Path(args.out_dir)
    probe = StepProbe(pretrain.micro_step, warmup=sizes.warmup_steps, mode=args.sync_debug)
    pretrain.micro_step = probe  # the loop looks it up at every step
    tap = LogTap()
    logging.getLogger("pofa").addHandler(tap)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        errors = Tee(sys.stderr)
        with contextlib.redirect_stderr(errors):  # main prints its `error: ...` line there
            status = pretrain.main(["--recipe", RECIPE, "--overwrite",
                                    *recipe_overrides(sizes, Path(args.model_dir), out_dir, Path(args.cache_dir),
                                                      args.pattern)])
        if status != 0:
            said = [line for line in errors.text().splitlines() if line.startswith("error: ")]
            raise RuntimeError(f"pofa.pretrain.main returned {status}" + (f": {said[-1]}" if said else ""))
        rank = int(os.environ.get("RANK", "0"))
        steady = steady_tokens_per_s(tap.lines, after_step=sizes.warmup_steps)
        result.update(probe.setup)
        result["tokens_per_s"] = round(steady[0], 1) if steady else None
        result["steady_steps"] = steady[1] if steady else 0
        steady_micro_steps = max(0, probe.calls - sizes.warmup_steps)
        if torch.cuda.is_available() and args.sync_debug != "off":
            total = sum(probe.sites.values())
            result["host_syncs"] = {"mode": args.sync_debug, "steps": steady_micro_steps, "count": total,
                                    "per_step": round(total / max(1, steady_micro_steps), 2),
                                    "sites": dict(probe.sites.most_common(8))}
        else:
            result["host_syncs"] = {"skipped": "CUDA sync debug mode needs a CUDA device"}
        if torch.cuda.is_available():
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if rank == 0:
            # The stage ran check_masks on every process before writing final/; read the written model back too.
            final = out_dir / FINAL_DIR
            model = load_mlm_model(str(final))
            store = MaskStore.load(final / MASKS_FILE)
            check_masks(model, store)
            report = sparsity_report(model, store)
            result["masks"] = {"checked": True, "pattern": store.pattern, "weights": len(store),
                               "sparsity": round(report["targets"]["sparsity"], 4)}
        result["events"] = [line for line in tap.lines if "pruning event" in line][-1:]
    except BaseException as error:  # noqa: BLE001 - everything goes into the JSON, the driver carries on
        result["error"] = f"{type(error).__name__}: {error}"[-2000:]
        if probe.sites:
            result["host_syncs"] = {"mode": args.sync_debug, "sites": dict(probe.sites.most_common(8))}
        result["log"] = tap.lines[-6:]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# --------------------------------------------------------------------------------------------------------------------
# 2:4 semi-structured Linears (its own subprocess: a CUDA error must not take the training runs with it)


def cuda_ms(fn: Callable[[], Any], iterations: int = 50, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``fn`` (CUDA events, after a warm-up)."""
    import statistics

    import torch

    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iterations)
    return statistics.median(times)


def two_four_model(smoke: bool):
    """A random BERT encoder (eval mode) with its encoder Linears pruned 2:4 by magnitude, and its masks."""
    import torch
    from transformers import BertModel

    from pofa.sparsity import MaskGuard, MaskStore

    torch.manual_seed(0)
    model = BertModel(model_config(smoke), add_pooling_layer=False).eval()
    store = MaskStore.dense(model.named_parameters())
    with MaskGuard(model, store) as guard:
        guard.prune_(0.5, pattern="2:4")
    store.pattern = "2:4"
    return model, store


def semi_structured_check(smoke: bool) -> dict[str, Any]:
    """Speedup of 2:4 semi-structured sparse Linears over dense bf16: BERT-Base's Linear shapes on 4096 tokens, and
    the encoder's forward at batch 32 x 128. Without CUDA only the masks and the choice of Linears run."""
    import torch
    import torch.nn.functional as F

    from pofa.sparsity import check_masks, nm_masks
    from pofa.sparsity.semi_structured import semi_structured_linears, to_semi_structured_

    model, store = two_four_model(smoke)
    check_masks(model, store)
    result: dict[str, Any] = {"two_four_linears": len(semi_structured_linears(model, store))}
    if not torch.cuda.is_available():
        result["skipped"] = "semi-structured sparse kernels need CUDA"
        return result
    from torch.sparse import to_sparse_semi_structured

    result["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    tokens = 4096
    shapes = {"intermediate 3072x768": (3072, 768), "output 768x3072": (768, 3072), "attention 768x768": (768, 768)}
    linears = {}
    with torch.inference_mode():
        for label, (rows, cols) in shapes.items():
            weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            weight = weight * nm_masks({"w": weight}, 0.5, (2, 4))["w"]
            x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
            sparse = to_sparse_semi_structured(weight)
            dense_ms = cuda_ms(lambda: F.linear(x, weight))
            sparse_ms = cuda_ms(lambda: F.linear(x, sparse))
            error = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
            linears[label] = {"dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
                              "speedup": round(dense_ms / sparse_ms, 3), "max_abs_diff": round(error, 4)}
    result["linear_4096_tokens"] = linears
    model = model.to("cuda", torch.bfloat16)
    inputs = torch.randint(0, model.config.vocab_size, (32, 128), device="cuda")
    with torch.inference_mode():
        dense_out = model(input_ids=inputs).last_hidden_state
        dense_ms = cuda_ms(lambda: model(input_ids=inputs), iterations=20)
    # Outside inference mode: the new weights are ordinary (frozen) parameters, not inference tensors.
    with torch.no_grad():
        converted = to_semi_structured_(model, store)
    with torch.inference_mode():
        sparse_out = model(input_ids=inputs).last_hidden_state
        sparse_ms = cuda_ms(lambda: model(input_ids=inputs), iterations=20)
    result["encoder_forward_32x128"] = {
        "linears": len(converted), "dense_ms": round(dense_ms, 3), "sparse_ms": round(sparse_ms, 3),
        "speedup": round(dense_ms / sparse_ms, 3),
        "max_abs_diff": round((sparse_out.float() - dense_out.float()).abs().max().item(), 4),
    }
    return result


def semi_worker(args: argparse.Namespace) -> int:
    try:
        result = semi_structured_check(args.smoke)
    except BaseException as error:  # noqa: BLE001 - into the JSON
        result = {"error": f"{type(error).__name__}: {error}"[-2000:]}
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# --------------------------------------------------------------------------------------------------------------------
# The driver


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(device=name, peak_bf16_tflops=peak_bf16_tflops(name))
    else:
        info.update(device="cpu", peak_bf16_tflops=None)
    return info


def add_efficiency(entry: dict[str, Any], flops_per_token: float, peak: float | None) -> None:
    """Achieved TFLOPS and the fraction of the bf16 peak, from the entry's tokens/s."""
    rate = entry.get("tokens_per_s")
    if not rate:
        return
    achieved = rate * flops_per_token / 1e12
    entry["tflops"] = round(achieved, 2)
    entry["peak_fraction"] = round(achieved / peak, 4) if peak else None


def plan(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(label, backend, compiled) for each training run, in order."""
    runs = [(backend, backend, False) for backend in args.backends]
    if args.compile:
        runs.append(("ddp+compile", "ddp", True))
    return runs


def drive(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    deadline = started + args.budget
    info = device_info()
    sizes = Sizes(args.smoke, args.batch, args.seq_len, args.warmup_steps, args.steady_steps)
    report: dict[str, Any] = {"check": "pofa gpu_check", "smoke": args.smoke, **info}
    work = Path(tempfile.mkdtemp(prefix="pofa-gpu-check-", dir=args.work_dir))
    model_dir, cache_dir = work / "bert", work / "cache"
    config, params = prepare_model_folder(model_dir, args.smoke)
    head_fraction = 1.0  # the recipe distils over all positions: both models project every position
    flops = student_step_flops_per_token(config, sizes.seq_len, head_fraction)
    report["model"] = {"config": "tiny BERT" if args.smoke else "BertConfig() defaults (BERT-Base)",
                       "parameters": params, "batch": sizes.batch, "seq_len": sizes.seq_len,
                       "warmup_steps": sizes.warmup_steps, "steady_steps": sizes.steady_steps,
                       "recipe": RECIPE, "pattern": args.pattern, "flops_per_token": round(flops)}
    env = child_env(args.smoke)
    runs: dict[str, Any] = {}
    for label, backend, compiled in plan(args):
        remaining = deadline - time.perf_counter()
        if args.smoke and backend == "fsdp2":
            runs[label] = {"skipped": "accelerate turns FSDP on only for GPU processes (MULTI_CPU stays plain); "
                                      "the GPU check runs pofa/pretrain.py under FSDP2"}
            continue
        if remaining < 30:
            runs[label] = {"skipped": f"out of time budget ({args.budget} s)"}
            continue
        result_path = work / f"{label}.json"
        worker_args = ["--result", str(result_path), "--model-dir", str(model_dir), "--cache-dir", str(cache_dir),
                       "--out-dir", str(work / f"run-{label}"), "--batch", str(sizes.batch),
                       "--seq-len", str(sizes.seq_len), "--warmup-steps", str(sizes.warmup_steps),
                       "--steady-steps", str(sizes.steady_steps), "--sync-debug", args.sync_debug,
                       "--pattern", args.pattern] + (["--smoke"] if args.smoke else [])
        run = run_isolated(accelerate_command(backend, compiled, worker_args), min(args.timeout, remaining), env)
        entry = read_result(result_path, run)
        add_efficiency(entry, flops, info["peak_bf16_tflops"])
        runs[label] = entry
    report["backends"] = runs
    remaining = deadline - time.perf_counter()
    if args.skip_semi:
        report["semi_structured_2_4"] = {"skipped": "--skip-semi"}
    elif remaining < 20:
        report["semi_structured_2_4"] = {"skipped": f"out of time budget ({args.budget} s)"}
    else:
        result_path = work / "semi.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--semi-worker", "--result", str(result_path)]
        run = run_isolated(command + (["--smoke"] if args.smoke else []), min(args.timeout, remaining), env)
        report["semi_structured_2_4"] = read_result(result_path, run)
    trained = [entry for entry in runs.values() if "skipped" not in entry]
    report["ok"] = bool(trained) and all("error" not in entry and entry.get("masks", {}).get("checked")
                                         for entry in trained) and "error" not in report["semi_structured_2_4"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny BERT, a few steps (what the tests run)")
    parser.add_argument("--backends", type=lambda text: text.split(","), default=list(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--compile", action="store_true", help="add a DDP run under torch.compile (inductor)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; smoke 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128; smoke 32")
    parser.add_argument("--warmup-steps", type=int, default=None, help="not measured; pruning ends in them (10)")
    parser.add_argument("--steady-steps", type=int, default=None, help="measured steps, a multiple of the warm-up")
    parser.add_argument("--pattern", default="unstructured", help="pruning.pattern of the student (e.g. 2:4)")
    parser.add_argument("--sync-debug", choices=["warn", "error", "off"], default="warn",
                        help="CUDA sync debug mode over the measured steps: warn counts syncs by site, error fails")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per part")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
    parser.add_argument("--skip-semi", action="store_true", help="leave out the 2:4 semi-structured measurement")
    parser.add_argument("--work-dir", default=None, help="where the temporary run folders go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    # internal: the roles this file plays inside its subprocesses
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--semi-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--result", "--model-dir", "--cache-dir", "--out-dir"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = dict(batch=4, seq_len=32, warmup_steps=2, steady_steps=2) if args.smoke else \
        dict(batch=32, seq_len=128, warmup_steps=10, steady_steps=40)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [name for name in args.backends if name not in BACKENDS]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {', '.join(BACKENDS)}")
    if args.warmup_steps < 2 or args.steady_steps < 1 or args.steady_steps % args.warmup_steps:
        raise SystemExit(f"--warmup-steps must be >= 2 and --steady-steps a positive multiple of it (the stage logs "
                         f"every warm-up's worth of steps); got {args.warmup_steps} and {args.steady_steps}")
    return args


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 to 2 meanwhile, so that stdout carries the JSON line alone
    (libraries print notices to stdout through handlers that hold the stream object, which redirect_stdout misses)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.semi_worker:
        return semi_worker(args)
    with stdout_to_stderr():
        try:
            report = drive(args)
        except Exception as error:  # noqa: BLE001 - the check always ends with its JSON line
            import traceback

            traceback.print_exc()
            report = {"check": "pofa gpu_check", "smoke": args.smoke, "ok": False,
                      "error": f"{type(error).__name__}: {error}"[-2000:]}
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
