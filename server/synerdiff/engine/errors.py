"""What can go wrong with a request, as kinds the server maps to HTTP (the engine knows no HTTP)."""

from __future__ import annotations

from enum import StrEnum


class RequestError(ValueError):
    """A request the engine refuses before queueing it; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ErrorKind(StrEnum):
    """Why the engine did not serve a request it had accepted (or would not accept one now)."""

    CANCELLED = "cancelled"  # the caller cancelled it
    TIMEOUT = "timeout"  # its deadline passed, queued or running
    QUEUE_FULL = "queue_full"  # refused at submit: try again later
    SHUTTING_DOWN = "shutting_down"  # refused at submit, or stopped by the engine's shutdown
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory in its batch
    ENGINE_FAULT = "engine_fault"  # the device work of its batch raised
    NUMERICAL_FAULT = "numerical_fault"  # its latents became NaN or infinite


class EngineError(RuntimeError):
    """The engine could not serve a request; `kind` says why."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def reason(self) -> str:
        """The kind as a stable string (error codes, metric labels)."""
        return self.kind.value


class Cancelled(EngineError):
    def __init__(self, message: str = "request cancelled"):
        super().__init__(ErrorKind.CANCELLED, message)


class TimedOut(EngineError):
    def __init__(self, message: str):
        super().__init__(ErrorKind.TIMEOUT, message)


class QueueFull(EngineError):
    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(ErrorKind.QUEUE_FULL, message)
        self.retry_after_s = retry_after_s


class ShuttingDown(EngineError):
    def __init__(self, message: str = "engine is shutting down"):
        super().__init__(ErrorKind.SHUTTING_DOWN, message)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or a backend's error that says so (checked without importing torch)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def fault(stage: str, exc: BaseException) -> EngineError:
    """The error a request gets when the device work of its batch raised `exc`."""
    kind = ErrorKind.OUT_OF_MEMORY if is_out_of_memory(exc) else ErrorKind.ENGINE_FAULT
    return EngineError(kind, f"{stage} failed: {type(exc).__name__}: {exc}")
