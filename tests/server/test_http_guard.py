"""The request guard over real HTTP: tokens fail closed, bodies are bounded before they are read."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import ValidationError

from synerdiff.api import create_app
from synerdiff.contract.config import ServerSettings
from synerdiff.engine import Engine

from .httpkit import serve_app

GEN = "/v1/images/generations"
BODY = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 1}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("")
    return path


@pytest.fixture
def file_guarded(engine: Engine, token_file: Path) -> Iterator[str]:
    with serve_app(create_app(ServerSettings(api_token_file=str(token_file)), engine=engine)) as url:
        yield url


@pytest.mark.parametrize("content", ["", "  \n", "\n\n"])
def test_an_empty_token_file_fails_closed_and_a_rewritten_one_applies_at_once(file_guarded: str, token_file: Path, content: str, caplog) -> None:
    token_file.write_text(content)
    for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Basic abc"}):
        for r in (httpx.get(file_guarded + "/v1/models", headers=headers), httpx.post(file_guarded + GEN, json=BODY, headers=headers)):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "auth_unavailable"
    assert any("cannot read the API token" in rec.getMessage() for rec in caplog.records)
    token_file.write_text("s3cret\n")  # re-read per request: no restart needed
    assert httpx.get(file_guarded + "/v1/models").status_code == 401
    assert httpx.get(file_guarded + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    token_file.unlink()  # a missing file fails closed the same way
    assert httpx.get(file_guarded + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 503


@pytest.mark.parametrize("field", ["api_token", "api_token_file", "admin_token"])
def test_a_blank_token_setting_is_refused_at_start(field: str) -> None:
    with pytest.raises(ValidationError, match="set but empty"):
        ServerSettings(**{field: "  "})


def test_the_auth_mode_is_stated(token_file: Path) -> None:
    assert "open" in ServerSettings().auth_mode()
    assert str(token_file) in ServerSettings(api_token_file=str(token_file)).auth_mode()
    assert "SYNERDIFF_API_TOKEN" in ServerSettings(api_token="t").auth_mode()


@pytest.fixture(scope="module")
def guarded(engine: Engine) -> Iterator[str]:
    with serve_app(create_app(ServerSettings(api_token="tok", max_body_bytes=64 * 1024), engine=engine)) as url:
        yield url


def _raw(url: str, head: str, body_chunks: Iterator[bytes], deadline_s: float = 10.0) -> tuple[int, dict, int]:
    """Send `head` then body chunks until the server answers; (status, error body, bytes of body sent)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=deadline_s)
    sent = 0
    try:
        sock.sendall(head.encode())
        end = time.monotonic() + deadline_s
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0] or time.monotonic() > end:
                break  # the server answered (or gave up on us): stop sending
            try:
                sock.sendall(chunk)
            except OSError:  # it closed the connection on us
                break
            sent += len(chunk)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}"), sent


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _megabytes(n: int) -> Iterator[bytes]:
    chunk = b"x" * (1024 * 1024)
    for _ in range(n):
        yield chunk


def test_a_300_mb_body_without_a_token_is_refused_before_it_is_read(guarded: str) -> None:
    t0 = time.monotonic()
    head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n"
    status, body, sent = _raw(guarded, head, _megabytes(300))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert sent < 64 * 1024 * 1024 and time.monotonic() - t0 < 5.0  # socket buffers, not the body


def test_a_declared_oversized_body_gets_413_naming_the_limit(guarded: str) -> None:
    head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: application/json\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n"
    status, body, sent = _raw(guarded, head, _megabytes(300))
    assert status == 413 and body["error"]["code"] == "body_too_large" and "65536" in body["error"]["message"]
    assert sent < 64 * 1024 * 1024


def test_a_chunked_body_is_read_only_up_to_the_limit(guarded: str) -> None:
    def chunked() -> Iterator[bytes]:
        for chunk in _megabytes(300):
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)

    head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, body, sent = _raw(guarded, head, chunked())
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert sent < 64 * 1024 * 1024


def test_bodies_within_the_limit_still_serve(guarded: str) -> None:
    r = httpx.post(guarded + GEN, json=BODY, headers={"Authorization": "Bearer tok"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = httpx.post(guarded + GEN, json={**BODY, "prompt": "x" * 70_000}, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 413


def test_the_api_docs_need_the_token_when_one_is_set(guarded: str, engine: Engine) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(guarded + path).status_code == 401
        assert httpx.get(guarded + path, headers={"Authorization": "Bearer tok"}).status_code == 200
    assert httpx.get(guarded + "/healthz").status_code == 200  # probes stay open
    with serve_app(create_app(ServerSettings(api_docs=False), engine=engine)) as url:
        assert httpx.get(url + "/openapi.json").status_code == 404
        assert httpx.get(url + "/v1/models").status_code == 200


def test_a_refused_request_with_a_body_closes_the_connection(guarded: str) -> None:
    """Else the server would go on reading, and discarding, whatever an unauthenticated client sends."""
    r = httpx.post(guarded + GEN, json=BODY)
    assert r.status_code == 401 and r.headers["connection"] == "close"
    assert httpx.get(guarded + "/v1/models").headers.get("connection") != "close"  # nothing to drain: keep-alive


def test_the_guard_sees_the_path_the_routes_see_under_a_root_path(engine: Engine) -> None:
    import threading

    import uvicorn

    app = create_app(ServerSettings(api_token="tok"), engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", root_path="/api")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        for path in ("/openapi.json", "/docs", "/v1/models"):
            assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer tok"}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_head_probes_stay_out_of_the_schema(guarded: str) -> None:
    schema = httpx.get(guarded + "/openapi.json", headers={"Authorization": "Bearer tok"}).json()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert set(schema["paths"]["/healthz"]) == {"get"}
