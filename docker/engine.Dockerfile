# SynerDiff engine: `synerdiff serve` on port 8000 (what DiffusionPool pods run).
#   docker build -f docker/engine.Dockerfile -t synerdiff-engine .
# CUDA runtime base: the torch wheels bring their own CUDA libraries; the base image brings the
# driver interface. Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY operator ./operator
RUN pip install --upgrade pip && pip install ".[server,objectstore]" && rm -rf /src

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
