"""`pofa quickstart`: the whole pipeline on its embedded default, offline, on CPU.

Runs the `recipes/quickstart-*.yaml` stages in order, each output feeding the next, and prints where the results
are. Every stage is an ordinary recipe: run it alone with `pofa pretrain --recipe recipes/quickstart-teacher.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run(output_dir: Path, *, overwrite: bool = False, resume: bool = False, fast: bool = False) -> dict:
    """Run the quickstart stages under `output_dir`; returns a summary (paths and metrics)."""
    from pofa.pretrain import train
    from pofa.recipe import PretrainRecipe, load_recipe

    summary: dict = {"output_dir": str(output_dir), "stages": {}}
    shrink = ["training.max_steps=4", "training.eval_every=2", "training.save_every=2", "training.log_every=2",
              "data.max_eval_blocks=8"] if fast else []
    started = time.perf_counter()
    teacher = load_recipe(RECIPES / "quickstart-teacher.yaml",
                          [f"training.output_dir={output_dir / 'teacher'}", *shrink], PretrainRecipe)
    result = train(teacher, resume=resume, overwrite=overwrite)
    summary["stages"]["teacher"] = {"model": str(result.final_dir), "eval_before": result.eval_before,
                                    "eval_after": result.eval_after}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pofa quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/quickstart", help="where every stage writes (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier quickstart results")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (a smoke test, not a result)")
    args = parser.parse_args(argv)
    from pofa.checkpoint import OutputDirError
    from pofa.data.corpus import CorpusError
    from pofa.modeling import ModelLoadError
    from pofa.recipe import RecipeError

    try:
        summary = run(Path(args.output_dir), overwrite=args.overwrite, resume=args.resume, fast=args.fast)
    except (RecipeError, CorpusError, ModelLoadError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    teacher = summary["stages"]["teacher"]
    print("\n== pofa quickstart ==")
    print(f"teacher (dense MLM):  held-out MLM loss {teacher['eval_before']['mlm_loss']:.3f} -> "
          f"{teacher['eval_after']['mlm_loss']:.3f}, accuracy {teacher['eval_after']['mlm_accuracy']:.3f}")
    print(f"  model: {teacher['model']}")
    print(f"summary: {Path(args.output_dir) / 'summary.json'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
