"""The committed OpenAPI document is the one the app serves (regenerate it with the command below)."""

import json
from pathlib import Path

from headshots.api.app import openapi_document

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = ".venv/bin/python -m headshots.api.app > docs/openapi.json"


def test_committed_openapi_document_matches_the_app():
    committed = json.loads(SPEC.read_text())
    generated = json.loads(json.dumps(openapi_document()))
    assert committed == generated, f"docs/openapi.json is stale: regenerate it with `{REGENERATE}`"


def test_every_operation_is_versioned_and_documents_json_errors():
    document = openapi_document()
    for path, operations in document["paths"].items():
        assert path.startswith("/v1/"), path
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("401", "404", "422"):
                assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), \
                    (method, path, status)
