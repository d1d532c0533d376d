# pofa on NVIDIA GPUs, ready for `accelerate launch` (README.md, "Docker"):
#   docker build -t pofa .
#   docker run --gpus all --ipc=host -e HF_TOKEN -v $PWD/runs:/workspace/runs -v hf-cache:/data/hf pofa \
#     accelerate launch --config_file launch/ddp.yaml pofa/pretrain.py --recipe bert-base-sparse90
# tests/unit/test_dockerfile.py checks this file (pins, user, cache volume, no secret, every COPY source exists).

# Official PyTorch image, pinned by tag and digest: torch 2.13.0+cu126 (the torch version the tests run on here),
# cuDNN 9, Python 3.12 on Ubuntu. CUDA 12.6 runs on drivers >= 560 (A100, H100, L40S, ...); for Blackwell GPUs
# use the cuda13.0 tag of the same torch (driver >= 580), and update launch/docker-constraints.txt with any change
# of torch version. -runtime has no CUDA compiler: see DS_BUILD_OPS below.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4

# The user that runs everything. Give it your own ids (--build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g))
# so that what it writes into a bind-mounted runs/ is yours; an account the base image already has with those ids
# (Ubuntu's `ubuntu`, uid 1000) is replaced.
ARG USER_UID=1000
ARG USER_GID=1000

# HF_HOME: models, data sets and the token file live on a volume (-v hf-cache:/data/hf), shared by runs and kept
# between containers; POFA_CACHE: pofa's tokenized blocks, on the same volume. No HF_TOKEN here: pass it at run
# time (docker run -e HF_TOKEN), never bake it into the image.
# DS_BUILD_OPS=0: DeepSpeed installs as Python only and compiles an op the first time something uses it (JIT, with
# ninja and the CUDA compiler of a -devel image). pofa uses none on GPUs: it brings its own torch AdamW and schedule.
ENV HF_HOME=/data/hf \
    POFA_CACHE=/data/hf/pofa \
    DS_BUILD_OPS=0 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace

# Dependencies first, at the exact versions of launch/docker-constraints.txt (a layer that survives code changes).
# PIP_BREAK_SYSTEM_PACKAGES: where the image's Python is the system one (PEP 668), pip may still install into it, as
# the image itself installed torch there; elsewhere it changes nothing.
COPY launch/docker-constraints.txt launch/docker-constraints.txt
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -r launch/docker-constraints.txt

# pofa from this checkout, with the DeepSpeed extra; the constraints keep every version (torch included) as above.
# Then a check: pofa imports, and torch is still the image's CUDA build.
COPY pyproject.toml README.md ./
COPY pofa/ pofa/
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -c launch/docker-constraints.txt ".[deepspeed]" \
    && python -c "import pofa.pretrain, torch; assert torch.version.cuda and torch.__version__.startswith('2.13.0')" \
    && rm -rf build pofa.egg-info

COPY launch/ launch/

RUN set -eu; \
    user=$(getent passwd "$USER_UID" | cut -d: -f1); \
    if [ -n "$user" ]; then userdel --remove "$user" 2>/dev/null || true; fi; \
    group=$(getent group "$USER_GID" | cut -d: -f1); \
    if [ -n "$group" ]; then groupdel "$group" 2>/dev/null || true; fi; \
    groupadd --gid "$USER_GID" pofa; \
    useradd --uid "$USER_UID" --gid "$USER_GID" --create-home --shell /bin/bash pofa; \
    mkdir -p /data/hf/pofa /workspace/runs; \
    chown -R pofa:pofa /data/hf /workspace/runs

# Declared after the folder is made and owned by pofa: a new named volume starts as a copy of it, writable.
VOLUME ["/data/hf"]

USER pofa

# `docker run ... pofa COMMAND` runs COMMAND here in /workspace; without one it prints the usage.
ENTRYPOINT ["bash", "/workspace/launch/docker-entrypoint.sh"]
CMD ["--help"]
