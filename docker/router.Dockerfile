# SynerDiff router (`synerdiff route`): no torch, no engine. Of the server it imports only
# synerdiff.contract; its own dependencies are httpx, starlette, uvicorn and prometheus-client.
#   docker build -f docker/router.Dockerfile -t synerdiff-router .
# A DiffusionPool uses it with `router.image`; by default the router runs from the engine image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/router.constraints.txt ./docker/
COPY server ./server
COPY operator ./operator
RUN pip install -c docker/router.constraints.txt ".[router]" && rm -rf /src \
 && synerdiff route --help >/dev/null \
 && python -c "import synerdiff.router.server" \
 && ! python -c "import torch" 2>/dev/null

RUN groupadd --gid 1000 synerdiff && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp synerdiff
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["synerdiff", "route"]
