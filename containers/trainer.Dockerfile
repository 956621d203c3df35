# syntax=docker/dockerfile:1.7
# The fedhpc trainer image: what runs on HPC compute nodes (and cloud GPU sites). It holds
# Python, torch for the site's GPUs, fedhpc (the trainer and its task plugins) and the Globus
# Compute endpoint, whose worker pool runs inside this image:
#   apptainer run --nv IMAGE globus-compute-endpoint python-exec ...process_worker_pool ...
#
# Build context: the repository root (pyproject.toml, README.md and services/ are copied).
#   docker build -f containers/trainer.Dockerfile -t fedhpc/trainer:0.1.0-cuda .
#   docker build -f containers/trainer.Dockerfile --build-arg GPU=rocm -t fedhpc/trainer:0.1.0-rocm .
#   docker run --rm fedhpc/trainer:0.1.0-cuda fedhpc-trainer selftest
#   docker run --rm --gpus all fedhpc/trainer:0.1.0-cuda fedhpc-trainer selftest
# For HPC, convert to SIF on the facility (apptainer build trainer.sif docker://REGISTRY/...),
# or build containers/trainer.def there; see docs/hpc.md.
#
# GPU=cuda (default): NVIDIA (Polaris, Perlmutter). The CUDA user-space libraries come with
#   torch's wheels; the base image adds only the NVIDIA container settings, and the driver comes
#   from the host (apptainer --nv, docker --gpus). CUDA 12.8 needs an R570+ driver, or R525+
#   with CUDA minor-version compatibility.
# GPU=rocm: AMD (Frontier; apptainer --rocm, docker --device /dev/kfd --device /dev/dri).
# Intel GPUs (Aurora) need an XPU build of torch and Intel's user-space driver: not built here.
#
# Pins (kept equal elsewhere, checked by tests/unit/test_containers.py):
# - PYTHON_VERSION: the control plane's Python (containers/control-plane.Dockerfile); the
#   coordinator and the trainer must share the minor version (DESIGN.md: Globus Compute).
# - GLOBUS_COMPUTE_ENDPOINT_VERSION: pyproject.toml's `hpc` extra, and the endpoint installed on
#   the facility's login node (the worker pool speaks to that endpoint's interchange).
# - the same base, uv, Python, torch and endpoint versions in containers/trainer.def.
# TORCH_INDEX_URL overrides the PyTorch wheel index of the GPU variant (e.g. .../whl/cu126 for an
# older driver); the torch version must exist on that index.

ARG GPU=cuda

# ---------------------------------------------------------------------------------------------
FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM nvidia/cuda:12.8.1-base-ubuntu22.04 AS base-cuda
LABEL org.opencontainers.image.base.name="nvidia/cuda:12.8.1-base-ubuntu22.04"
ENV FEDHPC_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM rocm/dev-ubuntu-22.04:6.4.1 AS base-rocm
LABEL org.opencontainers.image.base.name="rocm/dev-ubuntu-22.04:6.4.1"
ENV FEDHPC_TORCH_INDEX_URL=https://download.pytorch.org/whl/rocm6.4

# ---------------------------------------------------------------------------------------------
# GPU selects one of the stages above (base-cuda, base-rocm); any other value fails here.
FROM base-${GPU} AS trainer

ARG GPU
ARG VERSION=0.1.0
ARG PYTHON_VERSION=3.11.14
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG GLOBUS_COMPUTE_ENDPOINT_VERSION=4.19.0

LABEL org.opencontainers.image.title="fedhpc-trainer" \
      org.opencontainers.image.description="fedhpc trainer: federated-learning tasks on HPC compute nodes, with the Globus Compute endpoint worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.authors="fedhpc developers" \
      io.fedhpc.gpu="${GPU}" \
      io.fedhpc.python="${PYTHON_VERSION}" \
      io.fedhpc.torch="${TORCH_VERSION}" \
      io.fedhpc.globus-compute-endpoint="${GLOBUS_COMPUTE_ENDPOINT_VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Python from uv's standalone builds (Ubuntu 22.04 has no maintained 3.11), in a venv under /opt
# that every user can read: apptainer runs the image as the invoking user.
COPY --from=uv /uv /uvx /usr/local/bin/
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/fedhpc/venv \
    PATH=/opt/fedhpc/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONNOUSERSITE=1
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" "${VIRTUAL_ENV}"

RUN uv pip install --index-url "${TORCH_INDEX_URL:-$FEDHPC_TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# fedhpc itself (not editable; the source is removed) with the HPC extra, and the endpoint at
# the coordinator's pin.
COPY pyproject.toml README.md /opt/fedhpc/src/
COPY services /opt/fedhpc/src/services
RUN uv pip install "/opt/fedhpc/src[hpc]" "globus-compute-endpoint==${GLOBUS_COMPUTE_ENDPOINT_VERSION}" \
 && rm -rf /opt/fedhpc/src \
 && chmod -R a+rX /opt/python /opt/fedhpc \
 && fedhpc-trainer --version \
 && globus-compute-endpoint version \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip)"

# Non-root by default (docker, Kubernetes); apptainer ignores USER and runs as the caller.
RUN groupadd --gid 10001 fedhpc \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash fedhpc
USER 10001:10001
WORKDIR /home/fedhpc

# No entrypoint (this clears the base image's, which prints a banner on stdout): the command is
# whatever follows the image name, e.g. `docker run IMAGE fedhpc-trainer selftest` or the
# endpoint's `globus-compute-endpoint python-exec ...`.
ENTRYPOINT []
CMD ["fedhpc-trainer", "selftest"]
