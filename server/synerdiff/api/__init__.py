"""The HTTP front door: OpenAI-compatible images API, health, metrics and admin."""

from .app import create_app

__all__ = ["create_app"]
