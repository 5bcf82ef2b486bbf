"""`synerdiff route`: the pool's front door. Torch-free: it imports only `synerdiff.contract`,
httpx, starlette, uvicorn and prometheus-client (an import contract in pyproject.toml checks it).

- decide.py     the pure decision: request cost (rows x n x steps), engine loads, the pick
- upstreams.py  discovery (--upstream URLs, a headless Service's DNS), readiness and load polling
- app.py        the ASGI app: cost-aware routing, retries of refusals that never started,
                buffering while no engine is ready, streaming pass-through, metrics, probes
- server.py     uvicorn with a SIGTERM drain
"""

from .decide import Choice, Defaults, EngineState, ModelCost, RequestCost, choose, request_cost, retryable

__all__ = ["Choice", "Defaults", "EngineState", "ModelCost", "RequestCost", "choose", "request_cost", "retryable"]
