"""The artifact store and state documents against a real S3 server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from headshots.client import upload_person
from headshots.manifest import PersonSpec
from pipeline.ingest import has_metadata
from storage import keys
from storage.scoped import PersonScope, ScopeViolation
from storage.state import BatchState, PersonState, StateStore
from storage.store import ObjectNotFound
from tests.integration.conftest import TEST_CONSENT, read_version

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


def test_buckets_are_versioned_and_every_version_is_recorded(store, tenant):
    store.ensure_buckets()  # a second call changes nothing
    for artifact in ("uploads", "models", "outputs"):
        assert store.client.get_bucket_versioning(store.bucket(artifact)).status == "Enabled"
    key = f"{tenant}/b1/ada/checkpoints/train-state.pt"
    first = store.put("models", key, b"step-10")
    second = store.put("models", key, b"step-20")
    assert first.version_id and second.version_id and first.version_id != second.version_id
    assert first.sha256 == hashlib.sha256(b"step-10").hexdigest() and first.size == 7
    versions = store.list_versions("models", f"{tenant}/")
    assert {(k, v) for k, v, _ in versions} == {(key, first.version_id), (key, second.version_id)}
    assert store.get("models", key) == b"step-20"
    assert store.get("models", key, version_id=first.version_id) == b"step-10"


def test_missing_object_error_names_bucket_and_key(store, tenant):
    with pytest.raises(ObjectNotFound, match=rf"bucket={store.bucket('outputs')} key={tenant}/nope"):
        store.get("outputs", f"{tenant}/nope")


def test_state_documents_round_trip_and_batches_are_listed(store, tenant):
    states = StateStore(store)
    person = PersonState(tenant=tenant, batch_id="b1", person_id="ada", name="Ada Lovelace", email="ada@x.io")
    person.record_object(store.put("uploads", f"{tenant}/b1/ada/uploads/000.jpg", b"jpeg"))
    states.save_person(person)
    batch = BatchState(tenant=tenant, batch_id="b1", name="Q3", base_model="tiny", styles=["office"],
                       images_per_style=1, person_ids=["ada"])
    states.save_batch(batch)
    loaded = states.load_person(tenant, "b1", "ada")
    assert loaded.name == "Ada Lovelace" and loaded.objects == person.objects
    assert (tenant, "b1") in states.list_batches()
    assert states.list_batches(tenant) == [(tenant, "b1")]
    assert states.find_batch("b1", tenant).name == "Q3"
    with pytest.raises(ObjectNotFound, match="no batch with id 'nope'"):
        states.find_batch("nope")


def test_person_scope_reads_own_artifacts_and_refuses_others(store, tenant):
    store.put("uploads", f"{tenant}/b1/bob/uploads/000.jpg", b"bob's face")
    own = store.put("uploads", f"{tenant}/b1/ada/uploads/000.jpg", b"ada's face")
    scope = PersonScope(store, keys.PersonRef(tenant, "b1", "ada"))
    assert scope.list("uploads", "uploads/") == [own.key]
    assert scope.get("uploads", own.key) == b"ada's face"
    with pytest.raises(ScopeViolation):
        scope.get("uploads", f"{tenant}/b1/bob/uploads/000.jpg")


def test_uploads_are_stored_without_metadata_and_bad_files_recorded(store, key_store, base_config, tenant, tmp_path):
    gps_photo = EXAMPLES / "grace-hopper" / "02-phone-gps.jpg"
    assert has_metadata(gps_photo.read_bytes()), "the demo's GPS photo must carry metadata for this test"
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a photo")
    spec = PersonSpec(person_id="grace", name="Grace Hopper", email=None,
                      photos=[gps_photo, not_an_image], missing=["gone.jpg"])
    one_photo_is_enough = base_config.replace(ingest=base_config.ingest.__class__(min_photos=1))
    person = upload_person(store, one_photo_is_enough, tenant=tenant, batch_id="b1", spec=spec,
                           consent=TEST_CONSENT)
    assert person.state == "queued" and person.photos_accepted == 1
    assert person.consent["given_by"] == "Grace Hopper" and person.consent["collected_by"] == "test-suite"
    assert person.last_upload_at
    reasons = {photo.source: photo.reason for photo in person.photos if not photo.accepted}
    assert reasons == {"gone.jpg": "not_found", "notes.jpg": "decode_failed"}
    (stored,) = person.objects
    data = read_version(store, key_store, "uploads", stored.key, stored.version_id)
    assert not has_metadata(data)
    assert hashlib.sha256(data).hexdigest() == stored.sha256


def test_a_person_with_no_usable_photo_needs_photos(store, base_config, tenant, tmp_path):
    bad = tmp_path / "x.gif"
    bad.write_bytes(b"GIF89a" + b"\0" * 20)
    person = upload_person(store, base_config, tenant=tenant, batch_id="b1",
                           spec=PersonSpec(person_id="bob", name="Bob", email=None, photos=[bad]),
                           consent=TEST_CONSENT)
    assert person.state == "needs_photos" and person.processed_at
    assert person.photos[0].reason in ("format_not_allowed", "decode_failed")
    assert list(store.list_keys("uploads", f"{tenant}/")) == []


def test_without_consent_no_photo_is_stored(store, base_config, tenant):
    photo = EXAMPLES / "grace-hopper" / "01-front.jpg"
    person = upload_person(store, base_config, tenant=tenant, batch_id="b1", consent=None,
                           spec=PersonSpec(person_id="grace", name="Grace Hopper", email=None, photos=[photo]))
    assert person.state == "needs_photos" and person.consent is None
    assert [p.reason for p in person.photos] == ["no_consent"]
    assert list(store.list_keys("uploads", f"{tenant}/")) == []
