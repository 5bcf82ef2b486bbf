"""Schemathesis over the app's own OpenAPI schema: no generated input may produce a 5xx.

Valid and invalid inputs (positive and negative generation) for every operation, admin
included. Limits are tight so that every accepted generation is tiny and the pass stays
well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from synerdiff.api import create_app
from synerdiff.contract.config import ServerSettings

from .httpkit import make_engine

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 100


@pytest.fixture(scope="module")
def fuzz_app() -> Iterator:
    eng = make_engine(max_side=64, max_steps=3, max_n=2, max_prompt_chars=64, request_timeout_s=20)
    app = create_app(ServerSettings(api_token=TOKEN), engine=eng)
    yield app
    eng.shutdown(0)


@pytest.mark.timeout(200)
def test_no_generated_input_causes_a_server_error(fuzz_app):
    engine = fuzz_app.state.synerdiff.engine
    original = engine.config.scheduler
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers=AUTH)  # the docs are behind the token
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/v1/images/edits", "/v1/admin/scheduler", "/readyz", "/metrics"}
    seen: dict[str, set[int]] = {}
    try:
        for op in operations:
            # The schema's own examples first: they must succeed, and they reach the engine.
            for strategy in schema.get_strategies_from_examples(op):

                @settings(max_examples=5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def example(case):
                    response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
                    # Called within this iteration, so `op` is still the operation under test.
                    seen.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)  # noqa: B023

                example()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,  # nothing written into the repository
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
                    # Called within this iteration, so `op` is still the operation under test.
                    seen.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)  # noqa: B023
                    if response.status_code >= 400:
                        # Every refusal is OpenAI-shaped and says why.
                        assert response.json()["error"]["message"], response.text

                try:
                    check()
                except Unsatisfiable:
                    # Nothing can be invalid about an operation without inputs (GET /healthz).
                    if mode is GenerationMode.POSITIVE:
                        raise
    finally:
        engine.apply_scheduler_config(original)
    # The fuzzer got past validation too, not only into 4xx.
    assert 200 in seen["POST /v1/images/generations"]
    assert 422 in seen["POST /v1/images/generations"]
    assert any(400 <= code < 500 for code in seen["POST /v1/images/edits"]), seen["POST /v1/images/edits"]
    assert 200 in seen["PUT /v1/admin/scheduler"]
