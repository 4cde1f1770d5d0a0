# The image the clusters run (Ray cluster launcher and KubeRay): Python 3.11, the project and its pinned stack from
# pyproject.toml, and DeepSpeed's FusedAdam op compiled ahead of time for the GPUs we deploy on.
#
#   docker build -t deep-compact-reid:0.1.0 .
#
# CUDA: torch 2.14.1's PyPI wheel is built for CUDA 13.0 (torch.version.cuda) and brings its own CUDA runtime, cuDNN
# and NCCL as pip packages; the host only provides the NVIDIA driver (>= 580 for CUDA 13) through the container
# toolkit. The toolkit version below must match torch's CUDA major.minor exactly: DeepSpeed refuses to compile ops
# against a different CUDA 13 minor (its op builder only lists tolerated minors for CUDA 10-12).
#
# DeepSpeed ops: built ahead of time in the `build` stage (DS_BUILD_FUSED_ADAM=1) for sm_80 (A100, p4d), sm_86 (A10G,
# g5) and sm_90 (H100, p5), so that no GPU worker compiles anything at start-up and the runtime image needs no nvcc.
# The GPU config uses DeepSpeed's "Adam" (= FusedAdam on CUDA); every other op would be JIT-compiled, which needs the
# CUDA toolkit: use the `build` stage as the image (`--target build`) if you enable such an op.
#
# No credentials are baked in: S3 access comes from the instance profile (launcher) or IRSA (KubeRay), MLflow from
# MLFLOW_TRACKING_URI set on the nodes.

ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

ARG TORCH_VERSION=2.14.1
ARG DEEPSPEED_VERSION=0.19.8
# GPU architectures to compile DeepSpeed's ops for: 8.0 = A100 (p4d), 8.6 = A10G (g5), 9.0 = H100 (p5).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (Ubuntu 24.04 ships 3.12): the deadsnakes PPA. Package versions come from the pinned base image's
# release and its security updates, so they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

# torch first, then DeepSpeed compiled against it: from source (DS_BUILD_* only act in setup.py, never on a wheel),
# without build isolation (so that setup.py sees this torch), and with DS_ACCELERATOR=cuda because the build has no GPU
# to detect.
RUN pip install torch==${TORCH_VERSION} setuptools==84.2.1 wheel==0.46.3 ninja==1.13.2 packaging==26.3 \
        psutil==7.2.2 py-cpuinfo==9.0.0
# A layer of its own, so that changing the DeepSpeed build does not re-download torch.
# hadolint ignore=DL3059
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
        pip install --no-build-isolation --no-binary deepspeed deepspeed==${DEEPSPEED_VERSION}

# The rest of the pinned dependencies, read from pyproject.toml (one source of truth), in a layer that only changes
# when pyproject.toml does. DeepSpeed and torch are already there at the pinned versions, so pip keeps them.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY reid_core ./reid_core
RUN pip install --no-deps . \
    && pip check \
    && DS_ACCELERATOR=cuda python -c "from deepspeed.git_version_info import installed_ops; \
import sys; sys.exit(0 if installed_ops.get('fused_adam') else 'FusedAdam was not prebuilt: check DS_BUILD_FUSED_ADAM')"


FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS runtime

LABEL org.opencontainers.image.title="deep-compact-reid" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Face-guided DC-GAN + ID-CondenseNet re-ID on Ray Train, DeepSpeed, MLflow"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The same Python 3.11 as in `build` (the venv points at /usr/bin/python3.11). g++ lets DeepSpeed JIT-build its small
# CPU op when the image runs the CPU path (smoke tests); openssh-client and rsync are what the cluster launcher's
# autoscaler on the head uses to reach and set up worker nodes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 g++ openssh-client rsync \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04 images carry a user `ubuntu` with uid 1000; our non-root user takes that uid (KubeRay's and Ray's own
# images run as uid 1000 too).
RUN if id ubuntu &>/dev/null; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray

COPY --from=build /opt/venv /opt/venv

# HOME matters to the cluster launcher: it copies its bootstrap files to the HOME of the image's environment.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/ray \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    RAY_USAGE_STATS_ENABLED=0

# The job drivers and recipes (`python jobs/train_gan.py --config configs/gan.yaml` from here); the library itself is
# installed in the venv. `ray job submit --working-dir .` overrides both with your checkout.
WORKDIR /home/ray/app
COPY --chown=1000:1000 jobs ./jobs
COPY --chown=1000:1000 configs ./configs

USER 1000:1000
CMD ["bash"]
