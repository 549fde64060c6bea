"""Schemathesis against the served OpenAPI schema: whatever it sends, no 500."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import LiveServer, make_settings
from tests.fake_openai import FakeOpenAI


def test_no_generated_request_makes_the_server_fail(fake: FakeOpenAI) -> None:
    with LiveServer(make_settings(fake, rlm_max_iterations=3, rlm_max_input_bytes=1024 * 1024)) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()
            checked.append(f"{operation.method.upper()} {operation.path}")

            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case: schemathesis.Case) -> None:
                response = case.call(timeout=60)
                assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code}"

            check()
    assert {"POST /process", "GET /health", "GET /api/config"} <= set(checked)
