# SynerDiff operator (kopf). No torch: of the engine it imports only synerdiff.contract (pydantic models, names).
#   docker build -f docker/operator.Dockerfile -t synerdiff-operator .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/operator.constraints.txt ./docker/
COPY server ./server
COPY operator ./operator
# `.[operator]` = the base deps (pydantic) + kopf and the Kubernetes client; no engine extras.
RUN pip install -c docker/operator.constraints.txt ".[operator]" && rm -rf /src \
 && python -c "import synerdiff_operator.handlers" \
 && ! python -c "import torch" 2>/dev/null

RUN groupadd --gid 1000 operator && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp operator
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "synerdiff_operator"]
