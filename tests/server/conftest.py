"""Fixtures for the HTTP tests: one real engine per module, a real uvicorn on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from synerdiff.api import create_app
from synerdiff.contract.config import ServerSettings
from synerdiff.engine import Engine

from .httpkit import Live, make_engine, serve_app


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = make_engine()
    yield eng
    eng.shutdown(0)


@pytest.fixture(scope="module")
def live(engine: Engine) -> Iterator[Live]:
    app = create_app(ServerSettings(admin_token="admin-secret"), engine=engine)
    with serve_app(app) as url:
        yield Live(url, app, engine)
