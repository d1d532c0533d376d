"""The `pofa` command: one sub-command per pipeline stage, plus the offline quickstart.

    pofa quickstart [--output-dir runs/quickstart]     the embedded default, offline, on CPU
    pofa pretrain --recipe R.yaml [KEY=VALUE ...]       teacher preparation / student pruning
    pofa finetune --recipe R.yaml [KEY=VALUE ...]       sparse transfer (and QAT)
    pofa export DIR [--int8]                            ONNX export with a parity check
    pofa push DIR REPO_ID [--dry-run]                   publish with a generated model card
    pofa bench-inference DIR [--onnx FILE]              latency ratios against dense fp32

Each sub-command is also a module that `accelerate launch` can run (`accelerate launch pofa/pretrain.py ...`).
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
}


def usage() -> str:
    lines = ["usage: pofa COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`pofa COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pofa: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module_name), function or "main")(rest)


if __name__ == "__main__":
    sys.exit(main())
