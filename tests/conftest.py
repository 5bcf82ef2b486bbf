"""Fixtures shared by every test folder. Keep this small: folder-specific ones live in
each folder's conftest.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

# As `synerdiff serve` does, before torch loads: idle OpenMP threads sleep rather than spin,
# so engines in this process and the servers it starts share 2 cores without starving.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _free_port() -> int:
    # The kernel picks a port nobody listens on; the race until the server binds is harmless here.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a loopback port that is free right now."""
    return _free_port
