"""Crypto-erasure against the real S3 server: per-person SSE-C keys, destroying them, SSE-S3, revocation."""

from __future__ import annotations

import base64
import dataclasses
import secrets
import threading
from pathlib import Path

import pytest
from minio.commonconfig import CopySource
from minio.error import S3Error
from minio.sse import SseCustomerKey

from cluster.jobs import PersonJob
from cluster.stages import run_ingest, run_package_person
from cluster.worker import GpuWorker
from headshots.client import upload_person
from tests.integration.conftest import TEST_CONSENT
from headshots.config import SecurityConfig
from headshots.manifest import PersonSpec
from pipeline import models
from storage import keys
from storage.crypto import (KeyDestroyed, MasterKey, PersonKeyStore, key_material_versions, key_object_key,
                            key_store_for)
from storage.keys import PersonRef
from storage.scoped import ENCRYPTED_ARTIFACTS, PersonRevoked, PersonScope
from storage.store import ARTIFACT_CLASSES, ArtifactStore, StoreError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


@pytest.fixture(scope="module")
def secure_config(base_config):
    """The suite's config with crypto-erasure fully on (the local stack fills the key in the same way)."""
    master_key = base64.b64encode(secrets.token_bytes(32)).decode()
    return base_config.replace(security=SecurityConfig(master_key=master_key, encrypt_person_artifacts=True))


@pytest.fixture
def key_store(secure_config, store) -> PersonKeyStore:
    built = key_store_for(secure_config, store)
    assert built is not None
    return built


def _fresh_key_store(secure_config) -> PersonKeyStore:
    """What another process would have: its own client, its own (empty) cache, the same master key."""
    return PersonKeyStore(ArtifactStore.from_config(secure_config.store),
                          MasterKey.from_base64(secure_config.security.master_key))


def _error_code(call) -> str:
    """The S3 error code ``call`` fails with (through the store or the raw client)."""
    with pytest.raises((StoreError, S3Error)) as caught:
        call()
    return caught.value.code


def _all_versions(store: ArtifactStore, prefix: str) -> dict[str, list]:
    return {artifact: store.list_versions(artifact, prefix) for artifact in ARTIFACT_CLASSES}


def test_person_artifacts_are_readable_only_with_the_persons_key(store, key_store, tenant):
    person = PersonRef(tenant, "b1", "ada")
    scope = PersonScope(store, person, key_store=key_store)
    written = {
        "uploads": scope.put("uploads", keys.upload_key(person, 0, ".jpg"), b"ada's face"),
        "derived": scope.put("derived", keys.crop_key(person, 0), b"ada's crop"),
        "models": scope.put("models", keys.lora_key(person), b"ada's lora"),
    }
    assert set(written) == set(ENCRYPTED_ARTIFACTS)
    own_key = key_store.key_for(person)
    for artifact, stored in written.items():
        assert _error_code(lambda: store.get(artifact, stored.key)) == "InvalidArgument"
        wrong = SseCustomerKey(secrets.token_bytes(32))
        assert _error_code(lambda: store.get(artifact, stored.key, ssec=wrong)) == "AccessDenied"
        assert store.get(artifact, stored.key, ssec=own_key) == scope.get(artifact, stored.key)
        assert store.get(artifact, stored.key, version_id=stored.version_id, ssec=own_key).startswith(b"ada's ")
        assert scope.exists(artifact, stored.key)
    # Outputs are the customer's download: server-side encryption only, readable with S3 credentials.
    headshot = scope.put("outputs", keys.headshot_key(person, "office", 0, 7), b"png")
    assert store.get("outputs", headshot.key) == b"png"


def test_destroying_the_key_makes_every_escaped_copy_unreadable(store, key_store, secure_config, tenant):
    person, bystander = PersonRef(tenant, "b1", "ada"), PersonRef(tenant, "b1", "bob")
    photo = b"ada's face " + secrets.token_bytes(256)
    original = PersonScope(store, person, key_store=key_store).put(
        "uploads", keys.upload_key(person, 0, ".jpg"), photo, content_type="image/jpeg")
    bystander_upload = PersonScope(store, bystander, key_store=key_store).put(
        "uploads", keys.upload_key(bystander, 0, ".jpg"), b"bob's face")

    # An escaped replica: a server-side copy to another bucket and key, still SSE-C under Ada's key, as a
    # backup job or a misconfigured replication rule would leave it.
    ada_key = key_store.key_for(person)
    escaped_bucket, escaped_key = store.bucket("outputs"), f"_escaped/{tenant}/replica-000.jpg"
    store.client.copy_object(escaped_bucket, escaped_key, CopySource(original.bucket, original.key, ssec=ada_key),
                             sse=ada_key)
    assert store.client.get_object(escaped_bucket, escaped_key, ssec=ada_key).read() == photo  # it is a real copy
    before = _all_versions(store, f"{tenant}/")

    receipt = key_store.destroy(person)

    left = store.list_versions("state", key_object_key(person))
    assert receipt == {"bucket": store.bucket("state"), "key": key_object_key(person), "versions_destroyed": 1,
                       "tombstone_version_id": left[0][1]}
    # Only the tombstone is left, and it holds no key material: nothing wrapped, nothing to unwrap.
    assert len(left) == 1 and key_material_versions(store, key_object_key(person)) == []
    assert b"wrapped_key" not in store.get("state", key_object_key(person))
    with pytest.raises(KeyDestroyed, match="unrecoverable by design"):
        key_store.key_for(person)
    with pytest.raises(KeyDestroyed):
        _fresh_key_store(secure_config).key_for(person)  # no other process can rebuild it either
    with pytest.raises(KeyDestroyed):
        # Nor make a new one: the tombstone defeats every create-only key creation on the real server.
        _fresh_key_store(secure_config).key_for(person, create=True)
    assert key_material_versions(store, key_object_key(person)) == []

    def read_escaped(**kwargs) -> bytes:
        return store.client.get_object(escaped_bucket, escaped_key, **kwargs).read()

    assert _error_code(read_escaped) == "InvalidArgument"
    for _ in range(3):
        guess = SseCustomerKey(secrets.token_bytes(32))
        assert _error_code(lambda: read_escaped(ssec=guess)) == "AccessDenied"
        assert _error_code(lambda: store.get("uploads", original.key, ssec=guess)) == "AccessDenied"
    with pytest.raises(KeyDestroyed):
        PersonScope(store, person, key_store=key_store).get("uploads", original.key)

    # Nothing else changed: the ciphertexts are still stored (only the key went), and the bystander's
    # key and photo are untouched.
    assert _all_versions(store, f"{tenant}/") == before
    assert escaped_key in {item.object_name for item in store.client.list_objects(escaped_bucket, prefix="_escaped/",
                                                                                   recursive=True)}
    assert PersonScope(store, bystander, key_store=_fresh_key_store(secure_config)).get(
        "uploads", bystander_upload.key) == b"bob's face"


def test_two_processes_creating_a_key_at_once_agree_on_one(store, secure_config, tenant):
    racers = 4
    for index in range(5):
        person = PersonRef(tenant, "b1", f"racer-{index}")
        stores = [_fresh_key_store(secure_config) for _ in range(racers)]
        start = threading.Barrier(racers)
        got: list[SseCustomerKey | Exception] = [None] * racers  # type: ignore[list-item]

        def create(slot: int) -> None:
            start.wait()
            try:
                got[slot] = stores[slot].key_for(person, create=True)
            except Exception as error:  # reported below with the others
                got[slot] = error

        threads = [threading.Thread(target=create, args=(slot,)) for slot in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not [g for g in got if isinstance(g, Exception)], got
        fingerprints = {g.headers()["X-Amz-Server-Side-Encryption-Customer-Key-MD5"] for g in got}
        assert len(fingerprints) == 1, f"{len(fingerprints)} different keys were created for one person"
        assert len(store.list_versions("state", key_object_key(person))) == 1
        # What one wrote, the other reads.
        written = PersonScope(store, person, key_store=stores[0]).put("uploads", keys.upload_key(person, 0, ".jpg"),
                                                                      b"photo")
        assert PersonScope(store, person, key_store=stores[-1]).get("uploads", written.key) == b"photo"


def test_server_side_encryption_is_requested_for_every_other_write(base_config, store, tenant):
    encrypting = ArtifactStore.from_config(dataclasses.replace(base_config.store, server_side_encryption=True))
    assert encrypting.server_side_encryption
    output_key, state_key = f"{tenant}/b1/ada/contact-sheet.png", f"{tenant}/b1/ada/state.json"
    encrypting.put("outputs", output_key, b"sheet")
    encrypting.put_json("state", state_key, {"state": "done"})
    for artifact, key in (("outputs", output_key), ("state", state_key)):
        metadata = store.client.stat_object(store.bucket(artifact), key).metadata
        assert metadata.get("x-amz-server-side-encryption") == "AES256", dict(metadata)
    assert encrypting.get("outputs", output_key) == b"sheet"
    assert encrypting.get_json("state", state_key) == {"state": "done"}
    # The control: the same write without the switch carries no such header.
    store.put("outputs", output_key, b"sheet")
    assert "x-amz-server-side-encryption" not in store.client.stat_object(store.bucket("outputs"), output_key).metadata
    # A person's own key takes precedence over SSE-S3.
    customer_key = SseCustomerKey(secrets.token_bytes(32))
    encrypting.put("uploads", f"{tenant}/b1/ada/uploads/000.jpg", b"face", ssec=customer_key)
    metadata = store.client.stat_object(store.bucket("uploads"), f"{tenant}/b1/ada/uploads/000.jpg",
                                        ssec=customer_key).metadata
    assert metadata.get("x-amz-server-side-encryption-customer-algorithm") == "AES256"
    assert "x-amz-server-side-encryption" not in metadata


def test_a_revoked_person_gets_nothing_written(store, key_store, tenant):
    person = PersonRef(tenant, "b1", "leaving")
    scope = PersonScope(store, person, key_store=key_store, revoked=lambda: True)
    for artifact, key in (("uploads", keys.upload_key(person, 0, ".jpg")), ("derived", keys.crop_key(person, 0)),
                          ("models", keys.lora_key(person)), ("outputs", keys.person_contact_sheet_key(person))):
        with pytest.raises(PersonRevoked, match="being deleted"):
            scope.put(artifact, key, b"must not be stored")
    assert all(versions == [] for versions in _all_versions(store, person.prefix).values())
    assert store.list_versions("state", key_object_key(person)) == []  # not even a data key was made
    with pytest.raises(KeyDestroyed):
        key_store.key_for(person)


def test_the_pipeline_stages_run_encrypted_and_stop_once_the_key_is_destroyed(store, secure_config, key_store,
                                                                               tenant):
    photos = sorted((EXAMPLES / "grace-hopper").iterdir())[:4]
    person = upload_person(store, secure_config, tenant=tenant, batch_id="b1",
                           spec=PersonSpec("grace", "Grace Hopper", None, photos), consent=TEST_CONSENT)
    job = PersonJob(tenant=tenant, batch_id="b1", person_id="grace", base_model=models.TINY_MODEL,
                    styles=("office",), images_per_style=1,
                    upload_keys=tuple(p.key for p in person.photos if p.accepted))
    assert len(job.upload_keys) == 4
    ingested = run_ingest(store, job, training_resolution=0, key_store=key_store)
    worker = GpuWorker(secure_config, "crypto-worker")
    assert worker.key_store is not None
    trained = worker.train(job)
    generated = worker.generate(job)
    package = run_package_person(store, job, generated.details["headshots"], key_store=key_store)

    encrypted = person.objects + ingested.objects + trained.objects
    assert {o.artifact for o in encrypted} == {"uploads", "derived", "models"}
    own_key = key_store.key_for(job.ref)
    for stored in encrypted:
        assert _error_code(lambda: store.get(stored.artifact, stored.key, version_id=stored.version_id)) \
            == "InvalidArgument", f"{stored.artifact}:{stored.key} was stored without the person's key"
        assert len(store.get(stored.artifact, stored.key, version_id=stored.version_id, ssec=own_key)) == stored.size
    for stored in generated.objects + package.objects:
        assert store.get("outputs", stored.key).startswith(b"\x89PNG")

    key_store.destroy(job.ref)
    # The worker kept no key between calls, so a retried stage finds the key gone instead of writing on.
    with pytest.raises(KeyDestroyed):
        worker.train(job)
    with pytest.raises(KeyDestroyed):
        run_ingest(store, job, training_resolution=0, key_store=_fresh_key_store(secure_config))
