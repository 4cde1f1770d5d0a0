# The image the clusters run (cluster launcher and KubeRay): Python 3.11 with the project and its pinned stack.
# First version: torch 2.14.1's wheel carries its own CUDA 13 runtime libraries, so a slim Python base suffices for
# GPUs (the host provides the NVIDIA driver through the container toolkit). DeepSpeed JIT-compiles its ops on first
# use; g++ is installed for that. The [cluster] issue finishes this image (CUDA toolkit for prebuilt GPU ops).
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make ninja-build libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ray
WORKDIR /home/ray/app

COPY --chown=ray:ray pyproject.toml README.md ./
COPY --chown=ray:ray reid_core ./reid_core
RUN pip install .

COPY --chown=ray:ray jobs ./jobs
COPY --chown=ray:ray configs ./configs

USER ray
# No credentials are baked in: S3 access comes from the instance role / IRSA, MLflow from MLFLOW_TRACKING_URI.
CMD ["bash"]
