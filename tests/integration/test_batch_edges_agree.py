"""The CLI's submit and the HTTP API's create store the same batch for the same manifest (a field
mapped by only one of them is lost by the other: batches created over the API used to drop their
webhooks, so a studio never heard from them)."""

from __future__ import annotations

from headshots import client
from headshots.manifest import parse_manifest
from pipeline.generate import load_style_presets
from storage.state import StateStore
from tests.integration.api_fixtures import api_client, api_config, api_server, new_tenant  # noqa: F401

# What differs between two batches of one manifest by design.
PER_BATCH = {"batch_id", "state", "created_at", "updated_at", "finished_at"}
PER_PERSON = {"batch_id", "created_at", "updated_at", "consent"}


def _document(tenant: str) -> dict:
    return {"tenant": tenant, "batch": "Edges agree", "base_model": "tiny", "styles": ["office", "outdoor"],
            "images_per_style": 2, "priority": 3,
            "consent": {"collected_by": "hr@studio.example", "given_at": "2026-11-20"},
            "webhooks": [{"url": "https://hooks.studio.example/headshots", "events": ["batch.completed"]}],
            "persons": [{"name": "Ada Lovelace", "id": "emp-1815", "email": "ada@studio.example"},
                        {"name": "Grace Hopper", "id": "emp-1906"}]}


def test_the_api_and_the_cli_store_the_same_batch_for_one_manifest(api_config, api_server, store, tmp_path):  # noqa: F811
    tenant, api_key = new_tenant(store)
    document = _document(tenant)
    manifest = parse_manifest(dict(document), base_dir=tmp_path, source="team.yaml",
                              known_styles=load_style_presets())
    from_cli = client.submit_batch(api_config, manifest, start=False)
    with api_client(api_server, api_key) as http:
        created = http.post("/v1/batches", json={k: v for k, v in document.items() if k != "tenant"})
        assert created.status_code == 201, created.text
    from_api_id = created.json()["batch_id"]

    states = StateStore(store)
    cli_batch, api_batch = states.load_batch(tenant, from_cli.batch_id), states.load_batch(tenant, from_api_id)
    assert cli_batch.webhooks == document["webhooks"]  # the field that used to be lost
    assert ({k: v for k, v in api_batch.to_json().items() if k not in PER_BATCH}
            == {k: v for k, v in cli_batch.to_json().items() if k not in PER_BATCH})
    # No photos in either (the API's arrive later; the CLI's manifest listed none), so the persons are
    # the same too, down to their consent (its id is per record).
    for cli_person, api_person in zip(states.load_persons(cli_batch), states.load_persons(api_batch), strict=True):
        assert ({k: v for k, v in api_person.to_json().items() if k not in PER_PERSON | {"state", "error", "processed_at"}}
                == {k: v for k, v in cli_person.to_json().items() if k not in PER_PERSON | {"state", "error", "processed_at"}})
        assert ({k: v for k, v in api_person.consent.items() if k != "consent_id"}
                == {k: v for k, v in cli_person.consent.items() if k != "consent_id"})
