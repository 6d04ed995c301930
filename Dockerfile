# syntax=docker/dockerfile:1
#
# Story Studio RunPod serverless worker: Z-Image-Turbo images + Wan2.2-S2V videos.
# The same image serves the self-hosted HTTP API: `docker run IMAGE http` or docker compose.
#
#   docker build -t storystudio .                          # models come from the network volume
#   docker build --build-arg BAKE_MODELS=1 -t storystudio:baked .   # ~67 GB of weights inside the image
#   (with BAKE_MODELS=1, an HF token can be given as a build secret:
#    --secret id=hf_token,env=HF_TOKEN; it never lands in a layer)
#
# The version ARGs below must agree with the base image: the build checks them
# against the real image before installing anything, and tests/test_deployment.py
# checks them statically. torch 2.11 + CUDA 13.0 is what every GPU figure in
# bench/RESULTS.md was measured with. No flash-attn: no official wheel exists for
# torch 2.11 (github.com/Dao-AILab/flash-attention releases stop at torch 2.8), so
# attention runs on torch SDPA (its flash / cuDNN kernels), the benchmarked path.

ARG TORCH_VERSION=2.11.0
ARG CUDA_VERSION=13.0
ARG CUDNN_VERSION=9
ARG PYTHON_VERSION=3.11
# 0: read the models from the network volume (/runpod-volume/models); 1: bake them into /models
ARG BAKE_MODELS=0

FROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn${CUDNN_VERSION}-runtime AS base
ARG TORCH_VERSION
ARG CUDA_VERSION
ARG PYTHON_VERSION

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# apt versions are not pinned: the base image fixes the Ubuntu release, and exact
# Debian revisions disappear from the archive, which would break later builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Fail fast, with the reason, if the base image is not what the ARGs say; then
# pin its torch so no later pip install can replace it.
RUN python - <<'EOF'
import importlib.metadata, os, sys, torch
e = os.environ
py = f"{sys.version_info.major}.{sys.version_info.minor}"
torch_release = torch.__version__.split("+")[0]
cuda = torch.version.cuda or ""
problems = []
if py != e["PYTHON_VERSION"]:
    problems.append(f"python is {py}, PYTHON_VERSION says {e['PYTHON_VERSION']}")
if torch_release != e["TORCH_VERSION"]:
    problems.append(f"torch is {torch.__version__}, TORCH_VERSION says {e['TORCH_VERSION']}")
if not cuda.startswith(e["CUDA_VERSION"]):
    problems.append(f"torch is built for CUDA {cuda!r}, CUDA_VERSION says {e['CUDA_VERSION']}")
if problems:
    sys.exit("base image does not match the Dockerfile ARGs: " + "; ".join(problems))
# pip matches the distribution's version (e.g. "2.8.0" or "2.8.0+cu128"), not torch.__version__
with open("/etc/pip-constraints.txt", "w") as f:
    f.write(f"torch=={importlib.metadata.version('torch')}\n")
print(f"base image OK: python {py}, torch {torch.__version__}, CUDA {cuda}")
EOF

WORKDIR /app

# Dependencies first (a layer that only changes with the requirements files).
# requirements.txt has no torch on purpose: the constraint keeps the base image's.
# wan22 pins flash_attn/torchvision/opencv/dashscope in its metadata, hence --no-deps
# (storystudio/patches/wan22.py replaces what it would have needed them for).
COPY requirements.txt requirements-wan.txt ./
RUN pip install -c /etc/pip-constraints.txt -r requirements.txt \
    && pip install --no-deps -r requirements-wan.txt

# The project itself.
COPY pyproject.toml README.md handler.py ./
COPY storystudio ./storystudio
RUN pip install --no-deps . \
    && python -c "import importlib.metadata, torch, handler, storystudio.download; \
pinned = open('/etc/pip-constraints.txt').read().split('==')[1].strip(); \
now = importlib.metadata.version('torch'); \
assert now == pinned, f'torch {now} replaced the base image torch {pinned}'; \
print('worker imports OK, torch', torch.__version__)" \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin worker \
    && mkdir -p /app/output \
    && chown -R 10001:10001 /app

# Smoke test: the main job (a two-scene story, tiny random checkpoints, images then
# videos through the real worker) on the CPU, CUDA hidden, offline. A broken image
# fails here, at build time, instead of at its first job. Nothing stays in the layer.
RUN CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 python -m storystudio.demo \
        --models-dir /tmp/smoke/models --output /tmp/smoke/output \
    && rm -rf /tmp/smoke

ENV STORYSTUDIO_MODELS_DIR=/runpod-volume/models \
    HF_HOME=/home/worker/.cache/huggingface

# ---- models: from the network volume (default) or baked in (BAKE_MODELS=1) ----
FROM base AS models-0

FROM base AS models-1
ARG BAKE_MODELS
RUN --mount=type=secret,id=hf_token,required=false \
    if [ "$BAKE_MODELS" = "1" ]; then \
        if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
        HF_HUB_OFFLINE=0 HF_HOME=/tmp/hf storystudio-download --models-dir /models && rm -rf /tmp/hf; \
    fi
ENV STORYSTUDIO_MODELS_DIR=/models

# ---- the worker ----
# Not an image but the stage of this file that BAKE_MODELS selects (DL3006 wants a tag).
# hadolint ignore=DL3006
FROM models-${BAKE_MODELS} AS worker
# Everything is local at run time: never reach for the Hugging Face Hub.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1
# One image, two modes: RunPod serverless (default) or the self-hosted HTTP service
# (`http` as the first argument or STORYSTUDIO_MODE=http, see docker-compose.yml).
COPY docker/entrypoint.sh /app/docker/entrypoint.sh
USER 10001:10001
ENTRYPOINT ["/bin/sh", "/app/docker/entrypoint.sh"]
CMD []
