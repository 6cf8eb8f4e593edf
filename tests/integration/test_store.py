"""The artifact store and state documents against a real S3 server."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest
from minio.sse import SseCustomerKey

from headshots.client import upload_person
from headshots.manifest import PersonSpec
from pipeline.ingest import has_metadata
from storage import keys
from storage.scoped import PersonScope, ScopeViolation
from storage.state import BatchState, PersonState, StateConflict, StateStore
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, WriteConflict
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


def test_put_if_match_is_compare_and_swap(store, tenant):
    key = f"{tenant}/b1/doc.json"
    first = store.put("state", key, b"v1", content_type="application/json")
    data, etag = store.get_with_etag("state", key)
    assert data == b"v1" and etag == first.etag
    second = store.put("state", key, b"v2", if_match=etag)
    assert second.etag not in (None, first.etag) and second.version_id != first.version_id
    with pytest.raises(WriteConflict, match="no longer ETag") as caught:
        store.put("state", key, b"v3", if_match=first.etag)
    assert not isinstance(caught.value, ObjectExists) and caught.value.code == "PreconditionFailed"
    assert store.get_with_etag("state", key) == (b"v2", second.etag)
    with pytest.raises(ObjectExists):
        store.put("state", key, b"v4", if_absent=True)
    assert len(store.list_versions("state", key)) == 2  # the losers added no version


def test_if_match_works_on_server_encrypted_and_customer_key_objects(store, tenant):
    encrypted = ArtifactStore(store.client, store.buckets, server_side_encryption=True)
    key = f"{tenant}/b1/sse-s3.json"
    first = encrypted.put("state", key, b"a")
    assert encrypted.get_with_etag("state", key)[1] == first.etag
    encrypted.put("state", key, b"b", if_match=first.etag)
    with pytest.raises(WriteConflict):
        encrypted.put("state", key, b"c", if_match=first.etag)
    ssec = SseCustomerKey(secrets.token_bytes(32))
    key = f"{tenant}/b1/ada/uploads/000.jpg"
    first = store.put("uploads", key, b"a", ssec=ssec)
    assert store.get_with_etag("uploads", key, ssec=ssec) == (b"a", first.etag)
    store.put("uploads", key, b"b", ssec=ssec, if_match=first.etag)
    with pytest.raises(WriteConflict):
        store.put("uploads", key, b"c", ssec=ssec, if_match=first.etag)


def test_two_writers_of_one_person_state_the_first_wins(store, tenant):
    states = StateStore(store)
    created = PersonState(tenant=tenant, batch_id="b1", person_id="ada", name="Ada Lovelace")
    states.save_person(created)  # no etag: an unconditional write, as before
    assert created.etag
    first, second = states.load_person(tenant, "b1", "ada"), states.load_person(tenant, "b1", "ada")
    assert first.etag == second.etag == created.etag
    first.state, second.state = "ingesting", "cancelled"
    states.save_person(first)
    with pytest.raises(StateConflict, match=rf"state of person {tenant}/b1/ada was changed by another writer"):
        states.save_person(second)
    stored_document = store.get_json("state", keys.person_state_key(first.ref))
    assert stored_document["state"] == "ingesting" and "etag" not in stored_document
    # The loser reloads and applies its change again.
    second = states.load_person(tenant, "b1", "ada")
    second.state = "cancelled"
    states.save_person(second)
    with pytest.raises(StateConflict):
        states.save_person(first)  # now the first holds a stale copy
    assert states.load_person(tenant, "b1", "ada").state == "cancelled"
    # A snapshot carries the live copy's etag through a save (what the coordinator does).
    live = states.load_person(tenant, "b1", "ada")
    snapshot = PersonState.from_json(live.to_json())
    assert snapshot.etag is None
    snapshot.etag = live.etag
    states.save_person(snapshot)
    live.etag = snapshot.etag
    live.error = "x"
    states.save_person(live)
    with pytest.raises(StateConflict, match="already exists"):
        states.create_person(PersonState(tenant=tenant, batch_id="b1", person_id="ada", name="Ada Lovelace"))
    states.create_person(PersonState(tenant=tenant, batch_id="b1", person_id="bob", name="Bob"))


def test_two_writers_of_one_batch_state_the_first_wins(store, tenant):
    states = StateStore(store)
    states.create_batch(BatchState(tenant=tenant, batch_id="b1", name="Q3", base_model="tiny", styles=["office"],
                                   images_per_style=1, person_ids=["ada"]))
    first, second = states.load_batch(tenant, "b1"), states.load_batch(tenant, "b1")
    first.state, second.state = "done", "cancelled"
    states.save_batch(first)
    with pytest.raises(StateConflict, match=rf"state of batch {tenant}/b1 was changed by another writer"):
        states.save_batch(second)
    assert states.load_batch(tenant, "b1").state == "done"
    assert states.list_batches(tenant) == [(tenant, "b1")]
