"""schemathesis against the committed OpenAPI document (docs/openapi.json), on a live server: for
generated requests to every operation, no 5xx, and every answer's status, content type and body match
the document. CI-sized: a bounded number of examples per operation."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                         status_code_conformance)

from tests.integration.api_fixtures import api_config, api_server, new_tenant  # noqa: F401

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
EXAMPLES_PER_OPERATION = 25
REQUEST_TIMEOUT_S = 120
schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def studio_key(store):
    return new_tenant(store)[1]


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_api_matches_its_openapi_document(case, api_server, studio_key):
    # A generous per-request timeout: the first batch creation imports the style presets' modules
    # (torch, diffusers), which on a loaded 2-core machine took 9 s, near schemathesis's default 10 s.
    case.call_and_validate(base_url=api_server.url, headers={"Authorization": f"Bearer {studio_key}"},
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance], timeout=REQUEST_TIMEOUT_S)
