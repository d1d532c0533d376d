"""`pofa quickstart`: the whole pipeline on its embedded default, offline, on CPU.

Stages, each an ordinary recipe shipped in `pofa/recipes/` (run any alone: `pofa pretrain --recipe quickstart-teacher`):

    1 teacher          quickstart-teacher.yaml          MLM on CPython's docs: gives MiniLM its MLM head
    2 student          quickstart-student.yaml          MLM + KD + gradual magnitude pruning to 90%
    3 dense-finetune   quickstart-dense-finetune.yaml   the dense teacher on movie-review sentiment
    4 sparse-finetune  quickstart-finetune.yaml         sparse transfer, pattern locked, KD from 3
    5 qat              quickstart-qat.yaml              8-bit QAT, compact int8 checkpoint, int8 ONNX + parity
    6 publish          (dry run)                        the folder `pofa push` would upload, with its model card

Each stage's inputs are the previous stages' outputs under `--output-dir`. It ends with one table: accuracy (dense,
sparse, sparse + int8), sparsity, size on disk and latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from pofa.artifacts import COMPACT_FILE, FINAL_DIR, ONNX_FILE, RECIPE_FILE
from pofa.recipe import RECIPES_DIR

RECIPES = RECIPES_DIR

FAST_PRETRAIN = ["training.max_steps=4", "training.eval_every=2", "training.save_every=2", "training.log_every=2",
                 "data.max_eval_blocks=8"]
FAST_STUDENT = ["pruning.end_step=2", "pruning.frequency=1", "pruning.end_pruning_step=3"]
FAST_FINETUNE = ["training.max_steps=3", "task.max_train_examples=64", "task.max_eval_examples=64",
                 "training.log_every=1"]


def stage_overrides(out: Path) -> dict[str, list[str]]:
    """Dotted overrides that chain the stages under `out`."""
    teacher, student = out / "teacher" / FINAL_DIR, out / "student" / FINAL_DIR
    dense, sparse = out / "dense-finetune" / FINAL_DIR, out / "sparse-finetune" / FINAL_DIR
    return {
        "teacher": [f"training.output_dir={out / 'teacher'}"],
        "student": [f"training.output_dir={out / 'student'}", f"model.name_or_path={teacher}",
                    f"distillation.teacher={teacher}"],
        "dense-finetune": [f"training.output_dir={out / 'dense-finetune'}", f"model.name_or_path={teacher}"],
        "sparse-finetune": [f"training.output_dir={out / 'sparse-finetune'}", f"model.name_or_path={student}",
                            f"distillation.teacher={dense}"],
        "qat": [f"training.output_dir={out / 'qat'}", f"model.name_or_path={sparse}", f"distillation.teacher={dense}"],
    }


STAGES = [("teacher", "quickstart-teacher.yaml"), ("student", "quickstart-student.yaml"),
          ("dense-finetune", "quickstart-dense-finetune.yaml"), ("sparse-finetune", "quickstart-finetune.yaml"),
          ("qat", "quickstart-qat.yaml")]


def _done(folder: Path) -> bool:
    return (folder / FINAL_DIR / RECIPE_FILE).is_file()


def run(output_dir: Path, *, overwrite: bool = False, resume: bool = False, fast: bool = False,
        latency: bool = True) -> dict:
    """Run every stage under `output_dir`; returns (and writes to summary.json) paths and metrics."""
    from pofa.finetune import finetune
    from pofa.pretrain import train
    from pofa.recipe import FinetuneRecipe, PretrainRecipe, load_recipe

    if output_dir.exists() and any(output_dir.iterdir()) and not (overwrite or resume):
        from pofa.checkpoint import OutputDirError

        raise OutputDirError(f"output dir {output_dir} already holds a quickstart; pass --resume to continue it, "
                             "--overwrite to redo it, or choose another --output-dir")
    if overwrite and output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chained = stage_overrides(output_dir)
    summary: dict = {"output_dir": str(output_dir), "stages": {}}
    started = time.perf_counter()
    for name, file in STAGES:
        pretraining = name in ("teacher", "student")
        fast_overrides = (FAST_PRETRAIN + (FAST_STUDENT if name == "student" else [])) if pretraining else \
            FAST_FINETUNE
        overrides = chained[name] + (fast_overrides if fast else [])
        recipe = load_recipe(RECIPES / file, overrides, PretrainRecipe if pretraining else FinetuneRecipe)
        stage_dir = Path(recipe.training.output_dir)
        print(f"\n== stage {name}: {RECIPES / file} -> {stage_dir}", flush=True)
        t0 = time.perf_counter()
        if resume and _done(stage_dir):
            print(f"   already complete: {stage_dir / FINAL_DIR}")
            summary["stages"][name] = json.loads((output_dir / "summary.json").read_text())["stages"][name]
            continue
        if pretraining:
            result = train(recipe, resume=resume)
            summary["stages"][name] = {"model": str(result.final_dir), "eval_before": result.eval_before,
                                       "eval_after": result.eval_after}
        else:
            result = finetune(recipe, resume=resume)
            summary["stages"][name] = {"model": str(result.final_dir), "metrics": result.metrics,
                                       "sparsity": result.sparsity}
        summary["stages"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    summary["publish"] = str(publish_dry_run(output_dir))
    summary["sizes"] = sizes(output_dir)
    if latency:
        summary["latency"] = latencies(output_dir, repeats=3 if fast else 10)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def publish_dry_run(output_dir: Path) -> Path:
    """Prepare the QAT model's folder for the Hub (model card and all) without uploading it."""
    from pofa.hub import push_to_hub

    # The base model and the data sets come from the recipe chain that made the folder.
    return Path(push_to_hub(output_dir / "qat" / FINAL_DIR, "pofa/minilm-sparse90-movie-reviews-int8", dry_run=True))


def sizes(output_dir: Path) -> dict:
    from pofa.compact import compact_size_report

    qat = output_dir / "qat" / FINAL_DIR
    report = compact_size_report(qat / COMPACT_FILE)
    return {"dense_fp32_safetensors_bytes": (output_dir / "dense-finetune" / FINAL_DIR / "model.safetensors").stat().st_size,
            "compact_int8_bytes": report["file_bytes"],
            "compact_fp32_bytes": (output_dir / "sparse-finetune" / FINAL_DIR / COMPACT_FILE).stat().st_size, "encoder_linear_ratio": report["encoder_linear_weights"]["ratio"],
            "model_ratio": report["model"]["ratio"],
            "onnx_int8_bytes": (qat / ONNX_FILE).stat().st_size if (qat / ONNX_FILE).exists() else None}


def latencies(output_dir: Path, repeats: int) -> list[dict]:
    from pofa.runtime import benchmark_latency, compiler_available

    qat = output_dir / "qat" / FINAL_DIR
    onnx = qat / ONNX_FILE
    # pofa_sparse_int8 runs the QAT model on the sparse int8 kernel, compiled on first use: only with a C compiler.
    return benchmark_latency(output_dir / "sparse-finetune" / FINAL_DIR, batch_sizes=(1, 8), seq_len=64,
                             qat_model=qat if compiler_available() else None,
                             onnx_int8_path=onnx if onnx.exists() else None, repeats=repeats, warmup=1)


def format_table(summary: dict) -> str:
    stages = summary["stages"]

    def accuracy(stage: str) -> str:
        metrics = stages.get(stage, {}).get("metrics", {})
        value = metrics.get("test/accuracy", metrics.get("validation/accuracy"))
        return f"{value:.4f}" if value is not None else "-"

    lines = ["", "== pofa quickstart: all-MiniLM-L6-v2 on movie-review sentiment ==", ""]
    t = stages["teacher"]
    lines.append(f"teacher MLM loss (held out): {t['eval_before']['mlm_loss']:.3f} -> {t['eval_after']['mlm_loss']:.3f}"
                 f";  student at 90%: {stages['student']['eval_after']['mlm_loss']:.3f}")
    rows = [("dense fp32", accuracy("dense-finetune"), "0%", summary["sizes"]["dense_fp32_safetensors_bytes"]),
            ("sparse fp32", accuracy("sparse-finetune"), f"{stages['sparse-finetune']['sparsity']:.1%}",
             summary["sizes"]["compact_fp32_bytes"]),
            ("sparse + int8 (QAT)", accuracy("qat"), f"{stages['qat']['sparsity']:.1%}",
             summary["sizes"]["compact_int8_bytes"])]
    lines.append(f"{'model':<22}{'test accuracy':>14}{'encoder sparsity':>18}{'size on disk':>16}")
    for name, acc, sparsity, size in rows:
        lines.append(f"{name:<22}{acc:>14}{sparsity:>18}{(f'{size / 1e6:.1f} MB' if size else '-'):>16}")
    s = summary["sizes"]
    lines.append(f"compact int8 vs dense fp32: encoder Linear weights {s['encoder_linear_ratio']:.1f}x smaller, whole "
                 f"model {s['model_ratio']:.1f}x")
    for row in summary.get("latency", []):
        lines.append(f"latency batch {row['batch_size']} seq {row['seq_len']}: {row['variant']:<14} "
                     f"{row['latency_ms']:8.1f} ms  ({row['speedup_vs_dense']:.2f}x vs dense fp32)")
    lines += ["", f"models: {summary['output_dir']}/<stage>/final   publication (dry run): {summary['publish']}",
              f"summary: {summary['output_dir']}/summary.json ({summary['seconds']} s)",
              # The table is a demo's: a reader comparing methods needs the longer runs and their baselines.
              "These accuracies come from a short run (each stage a minute or two); longer runs, beside baselines and "
              "over several seeds: bench/RESULTS.md (python bench/quality.py)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pofa quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/quickstart", help="where every stage writes (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier quickstart results")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (a smoke test, not a result)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    args = parser.parse_args(argv)
    from pofa.checkpoint import OutputDirError
    from pofa.data.corpus import CorpusError
    from pofa.modeling import ModelLoadError
    from pofa.recipe import RecipeError

    try:
        summary = run(Path(args.output_dir), overwrite=args.overwrite, resume=args.resume, fast=args.fast,
                      latency=not args.no_latency)
    except (RecipeError, CorpusError, ModelLoadError, OutputDirError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
