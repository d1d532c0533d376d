"""The `pofa` command (also `python -m pofa`): one sub-command per pipeline stage, the offline quickstart, and the
recipes.

    pofa quickstart [--output-dir runs/quickstart] [--fast]   the embedded default, offline, on CPU
    pofa pretrain --recipe R [KEY=VALUE ...]                   teacher preparation / student pruning
    pofa finetune --recipe R [KEY=VALUE ...]                   sparse transfer (and QAT)
    pofa export DIR [--int8]                                   ONNX export with a parity check
    pofa push DIR [REPO_ID] [--dry-run]                        publish with a generated model card
    pofa bench-inference DIR [--onnx FILE]                     latency ratios against dense fp32
    pofa recipes [NAME]                                        the shipped recipes (R: a name, or a YAML file)
    pofa recipe-keys [--stage S] [PREFIX]                      every recipe key: type, default, documentation
    pofa --version

`pofa pretrain` and `pofa finetune` are also modules that `accelerate launch` runs (`accelerate launch -m
pofa.pretrain --recipe ...`; from a checkout also `accelerate launch pofa/pretrain.py ...`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {
    "quickstart": ("pofa.quickstart", "run the embedded-default pipeline offline on CPU"),
    "pretrain": ("pofa.pretrain", "teacher preparation or student pruning (MLM [+ distillation] [+ pruning])"),
    "finetune": ("pofa.finetune", "sparse transfer to a downstream task with the zero pattern locked [+ QAT]"),
    "export": ("pofa.commands:export_main", "ONNX export of a model folder (int8 QDQ after QAT)"),
    "push": ("pofa.commands:push_main", "publish a model folder to the Hugging Face Hub (--dry-run to prepare only)"),
    "bench-inference": ("pofa.commands:bench_main", "latency of dense, sparse and int8 execution, as ratios"),
    "recipes": ("pofa.commands:recipes_main", "list the shipped recipes (--recipe NAME), or print one"),
    "recipe-keys": ("pofa.commands:recipe_keys_main", "every recipe key with its type, default and documentation"),
}


def usage() -> str:
    lines = ["usage: pofa [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`pofa COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from pofa import __version__

        print(f"pofa {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"pofa: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    try:
        return getattr(importlib.import_module(module_name), function or "main")(rest)
    except BrokenPipeError:  # `pofa recipes | head`: the reader has gone, which is no error of the command
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
