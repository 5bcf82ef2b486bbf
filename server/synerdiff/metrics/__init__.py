"""Prometheus metrics of the SynerDiff server (reference: docs/api.md)."""

from .server import ServerMetrics, current_threshold, outcome

__all__ = ["ServerMetrics", "current_threshold", "outcome"]
