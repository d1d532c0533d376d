#!/usr/bin/env bash
# Entry point of the Docker image (Dockerfile): runs the command it is given (`accelerate launch ...`, `pofa ...`,
# `bash`) in /workspace, which holds the checkout's pofa/ (recipes in pofa/recipes/) and launch/; given none (or --help), it says how
# to use the image.
set -euo pipefail

if [ "$#" -gt 0 ] && [ "$1" != "--help" ] && [ "$1" != "-h" ]; then
  exec "$@"
fi

versions=$(python - 2>/dev/null <<'PY' || echo "pofa (versions unavailable)"
import importlib.metadata as metadata
import torch
print(f"pofa {metadata.version('pofa')}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {metadata.version('deepspeed')}")
PY
)
token="HF_TOKEN is not set (public models and data only)"
if [ -n "${HF_TOKEN:-}" ]; then token="HF_TOKEN is set"; fi

cat <<EOF
$versions; working directory $(pwd); Hugging Face cache HF_HOME=${HF_HOME:-unset}; $token.

usage: docker run --gpus all --ipc=host -e HF_TOKEN -v \$PWD/runs:/workspace/runs -v hf-cache:/data/hf \\
         pofa COMMAND

  accelerate launch --config_file launch/ddp.yaml pofa/pretrain.py --recipe bert-base-teacher
  accelerate launch --config_file launch/ddp.yaml pofa/pretrain.py --recipe bert-base-sparse90
  pofa finetune --recipe glue-sst2-bert-base-sparse90
  bash                                     (a shell in the image; add -it to docker run)

Results go to runs/ (mount it, as above, or they are lost with the container). DeepSpeed's ops are not
pre-compiled (DS_BUILD_OPS=0): pofa needs none of them on GPUs (it uses torch's AdamW); an op that some other
configuration needs is compiled at its first use, which needs the CUDA compiler of a -devel base image.

launch configurations: $(cd launch && ls ./*.yaml | sed 's|^\./||' | tr '\n' ' ')
recipes (--recipe NAME; \`pofa recipes\` describes them): $(cd pofa/recipes && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' | tr '\n' ' ')
EOF
