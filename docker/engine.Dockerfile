# SynerDiff engine: `synerdiff serve` on port 8000 (what DiffusionPool pods run).
#   docker build -f docker/engine.Dockerfile -t synerdiff-engine .
# torch is the CUDA 12.6 build from PyTorch's index, not PyPI's (a CUDA 13 build that needs an
# R580 driver). With this base image the container runtime accepts R535, R550 and R560+ drivers,
# which covers the R535-R570 drivers of managed clusters. Blackwell GPUs need a CUDA 13 build:
#   --build-arg TORCH_CUDA=cu130 --build-arg CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# CUDA runtime base: the torch wheels bring their own CUDA libraries; the base image brings the
# driver interface (and its NVIDIA_REQUIRE_CUDA, which the container runtime checks against the
# node's driver). Ubuntu 24.04's python3 is 3.12, what docker/engine.constraints.txt is locked for.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
# Same version as CI's CPU torch; the lock (docker/engine.constraints.txt) pins this version too.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/engine.constraints.txt ./docker/
COPY server ./server
COPY operator ./operator
# torch first, from the CUDA index (its nvidia-* packages and triton pinned by the wheel itself;
# its other dependencies from PyPI at the lock's versions), then the rest under the lock. The
# check fails the build if any other torch build slipped in.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" --extra-index-url https://pypi.org/simple \
      -c docker/engine.constraints.txt "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
 && pip install -c docker/engine.constraints.txt ".[server,objectstore,fp8]" \
 && python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v == '${TORCH_VERSION}+${TORCH_CUDA}' else f'torch {v} was installed instead of ${TORCH_VERSION}+${TORCH_CUDA}')" \
 && rm -rf /src

# A stable path for the tiny embedded test model (CPU smoke pools: examples/diffusionpool-cpu.yaml).
COPY server/synerdiff/models/embedded/tiny-sd /opt/synerdiff/models/tiny-sd

# Matches the engine pods' securityContext (runAsUser 1000, read-only root, /tmp an emptyDir).
# (Ubuntu 24.04 images ship a user 1000 named ubuntu; replace it with ours.)
RUN (userdel -r ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 synerdiff && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp synerdiff
USER 1000:1000
WORKDIR /tmp
ENV HOME=/tmp HF_HOME=/tmp/hf SYNERDIFF_HOST=0.0.0.0 SYNERDIFF_PORT=8000 OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000
ENTRYPOINT []
CMD ["synerdiff", "serve"]
