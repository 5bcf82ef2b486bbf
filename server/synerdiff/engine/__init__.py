"""The engine library: no HTTP, no Kubernetes."""

from .engine import Engine, IterationStats, RequestHandle
from .request import (
    Cancelled,
    EngineError,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestError,
    ShuttingDown,
    TimedOut,
)

__all__ = [
    "Engine",
    "IterationStats",
    "RequestHandle",
    "GenerationRequest",
    "GenerationResult",
    "RequestError",
    "EngineError",
    "Cancelled",
    "QueueFull",
    "ShuttingDown",
    "TimedOut",
]
