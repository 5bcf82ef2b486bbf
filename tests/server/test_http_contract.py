"""The API's small print: what malformed bodies, other methods and loose types get."""

from __future__ import annotations

import httpx
import pytest

from .httpkit import Live

GEN = "/v1/images/generations"
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.mark.parametrize("body", [b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000], ids=["invalid-utf8", "nested-too-deep"])
def test_unparseable_bodies_are_422_naming_the_body(live: Live, body: bytes) -> None:
    r = httpx.post(live.url + GEN, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "body" and r.json()["error"]["code"] == "invalid_value"


def test_probes_answer_head(live: Live) -> None:
    for path in ("/healthz", "/readyz"):
        r = httpx.head(live.url + path)
        assert r.status_code == 200 and r.content == b""


def test_a_405_lists_every_method_of_the_path(live: Live) -> None:
    r = httpx.post(live.url + "/v1/admin/scheduler", headers=ADMIN)
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "PUT"}
    assert r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("field", "value"), [("seed", True), ("n", "2"), ("num_inference_steps", 2.5), ("guidance_scale", "7")])
def test_values_of_the_wrong_type_are_refused_not_coerced(live: Live, field: str, value: object) -> None:
    r = httpx.post(live.url + GEN, json={"prompt": "a red circle", field: value})
    assert r.status_code == 422 and r.json()["error"]["param"] == field


def test_a_float_field_takes_a_json_integer(live: Live) -> None:
    r = httpx.post(live.url + GEN, json={"prompt": "a red circle", "guidance_scale": 7, "num_inference_steps": 2, "size": "64x64"}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_the_admin_api_refuses_non_finite_numbers(live: Live, literal: str) -> None:
    before = httpx.get(live.url + "/v1/admin/scheduler", headers=ADMIN).json()
    body = '{"controller_high_water": ' + literal + "}"
    r = httpx.put(live.url + "/v1/admin/scheduler", content=body, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "controller_high_water"
    assert httpx.get(live.url + "/v1/admin/scheduler", headers=ADMIN).json() == before
