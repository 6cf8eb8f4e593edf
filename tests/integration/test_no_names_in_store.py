"""No person's name or email anywhere in the object store but their state document, and none left after deletion.

A roster whose persons have no ``id`` goes through the real manifest parser, the real coordinator and GPU
workers on a local Ray cluster, the store's ZIP, an early deletion on request (``headshots delete``'s path)
and a retention sweep. Then every key of every version in every bucket, every receipt, the batch manifest
and the ZIP are read: no part of a name or email may appear in any of them, in any case or slug form.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from headshots import client
from headshots.manifest import load_manifest
from pipeline.generate import load_style_presets
from storage import keys
from storage.keys import slugify
from storage.receipts import list_receipts, load_receipt
from storage.retention import RetentionPolicy, file_person, load_policy, parse_time
from storage.scoped import ENCRYPTED_ARTIFACTS
from storage.state import StateStore
from storage.sweep import run_sweep
from tests.integration.ray_actors import remove_named_actors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
BUCKETS = ("uploads", "derived", "models", "outputs", "state", "receipts")
PERSONS = ({"name": "Thaddeus Plimsoll", "email": "t.plimsoll@example.org", "photos": "grace-hopper"},
           {"name": "Ottoline Quarrington", "email": "ottoline.q@example.net", "photos": "eileen-collins"})


def forbidden_fragments() -> set[str]:
    """Each word of each name and email local part, the name's slug and each whole email, lowercased."""
    found = set()
    for person in PERSONS:
        found |= {word.lower() for word in person["name"].split()}
        found.add(slugify(person["name"]))
        found.add(person["email"].lower())
        found |= {part for part in re.split(r"[^a-z0-9]+", person["email"].split("@")[0].lower()) if len(part) > 2}
    return found


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return sorted(fragment for fragment in forbidden_fragments() if fragment in lowered)


@pytest.fixture(scope="module")
def actors(ray_cluster, base_config):
    from cluster.actors import get_or_create_coordinator, get_or_create_retention_controller

    namespace = base_config.ray.namespace
    remove_named_actors(ray_cluster, namespace)  # an earlier module's actors may run with another config
    coordinator = get_or_create_coordinator(base_config, metrics_port=None)
    controller = get_or_create_retention_controller(base_config, metrics_port=None)
    yield coordinator, controller
    remove_named_actors(ray_cluster, namespace)


def test_no_name_or_email_reaches_any_key_receipt_manifest_or_zip(actors, base_config, store, key_store, tenant,
                                                                   tmp_path):
    import ray

    coordinator, controller = actors
    found: list[str] = []  # every leak, so that one run shows all of them

    def check(where: str, text: str) -> None:
        if leaks(text):
            found.append(f"{where} holds {leaks(text)}")

    roster = {"tenant": tenant, "batch": "Privacy check", "base_model": "tiny", "styles": ["office"],
              "images_per_style": 1, "consent": {"collected_by": "test-suite", "given_at": "2026-11-20"},
              "persons": [{"name": p["name"], "email": p["email"], "photos": [str(EXAMPLES / p["photos"])]}
                          for p in PERSONS]}
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(roster, sort_keys=False))
    manifest = load_manifest(path, known_styles=load_style_presets(base_config.generation.styles_file or None))
    for spec in manifest.persons:
        check(f"the person id {spec.person_id!r} of {spec.name!r}", spec.person_id)

    submitted = client.submit_batch(base_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    assert ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 600)) == "done"
    batch_id = submitted.batch_id
    states = StateStore(store)
    by_name = {p.name: p for p in states.load_persons(states.load_batch(tenant, batch_id))}
    assert set(by_name) == {p["name"] for p in PERSONS}, "the names must still be in the state documents"
    assert all(p.state == "done" and p.headshots for p in by_name.values())
    first, second = (by_name[p["name"]].ref for p in PERSONS)

    # What is delivered while everything is there: the batch manifest, the store's ZIP, a local download.
    manifest_key = keys.batch_manifest_key(tenant, batch_id)
    delivered = store.get("outputs", manifest_key).decode()
    assert first.person_id in delivered and second.person_id in delivered
    check("the batch manifest", delivered)
    zip_key, _ = client.batch_zip(base_config, tenant, batch_id, store=store)
    entries = zipfile.ZipFile(io.BytesIO(store.get("outputs", zip_key))).namelist()
    assert entries
    check("the ZIP's entry names", "\n".join(entries))
    downloaded = client.download_batch(base_config, batch_id, tmp_path / "out", tenant=tenant)
    check("the local download's files", "\n".join(downloaded["files"]))

    # The first person asks to be forgotten (headshots included); the second is swept by retention.
    requested = ray.get(controller.delete.remote(tenant, batch_id, first.person_id, True, "test-suite"))
    assert requested["verification"]["listing_count"] == 0
    processed_at = parse_time(states.load_person(tenant, batch_id, second.person_id).processed_at)
    default = load_policy(base_config.retention.policy_file or None)
    # This tenant keeps photos, crops and models for 0 days: due at processing, so a sweep as of now takes
    # this person and no other test's (theirs fall due in 30 days).
    policy = RetentionPolicy(version="no-names-test", max_days=default.max_days, days=default.days,
                             receipts_days=default.receipts_days,
                             tenants={tenant: {"uploads": 0, "derived": 0, "models": 0}})
    file_person(store, second, processed_at, reason="test: due at processing")
    swept = run_sweep(store, policy, now=datetime.now(timezone.utc), key_store=key_store)
    assert {"tenant": tenant, "batch_id": batch_id, "person_id": second.person_id} in swept.receipt.persons
    zip_key, _ = client.batch_zip(base_config, tenant, batch_id, store=store)  # the kept headshots, again

    # Every key of every version and delete marker, in every bucket (other tests' too).
    for artifact in BUCKETS:
        for key, _, _ in store.list_versions(artifact, ""):
            check(f"the key {artifact}:{key}", key)
    # Every version of every object of this tenant that can be read (the encrypted classes are gone).
    for artifact in BUCKETS:
        for key, version_id, is_marker in store.list_versions(artifact, ""):
            if is_marker or tenant not in key:
                continue
            assert artifact not in ENCRYPTED_ARTIFACTS, f"{artifact}:{key} outlived the person's deletion"
            text = store.get(artifact, key, version_id=version_id).decode("latin-1")
            check(f"{artifact}:{key}@{version_id}", text)
    # The kept receipts, and the ZIP's entry names (stored uncompressed, but read them as entries too).
    receipts = list_receipts(store, tenant=tenant, batch_id=batch_id)
    assert {requested["receipt_id"], swept.receipt.receipt_id} <= {r.receipt_id for r in receipts}
    for receipt in receipts:
        text = json.dumps(load_receipt(store, receipt.receipt_id).to_json())
        check(f"receipt {receipt.receipt_id}", text)
    entries = zipfile.ZipFile(io.BytesIO(store.get("outputs", zip_key))).namelist()
    assert any(e.startswith(f"{second.person_id}/") for e in entries)
    check("the ZIP's entry names after the deletions", "\n".join(entries))
    check("the batch manifest after the deletions", store.get("outputs", manifest_key).decode())
    assert not found, f"{len(found)} leaks, the first 30:\n" + "\n".join(found[:30])
