"""The S3 server goes away for 30 s in the middle of a deletion and comes back (issue #12).

An early deletion and a retention sweep both wait the outage out and finish: every version of the
person is gone, each listed exactly once in one receipt, and the receipt verifies.

The outage starts on a condition, never after a sleep: the deletion's store runs on a client that,
when the first batch delete of the test's persons is about to be sent, takes the session's server down
(``restart_after`` returns once it is stopped) and only then lets the request go out. So that request,
and whatever else the deletion sends in the next 30 s, meets a server that is not there.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import barrier, keys
from storage.crypto import key_material_versions, key_object_key, key_store_for
from storage.deletion import count_versions
from storage.receipts import list_receipts, pending_intents, verify_receipt
from storage.retention import RetentionPolicy, file_person, format_time, load_policy
from storage.scoped import PersonScope
from storage.seaweed import READY_TIMEOUT_S, STOP_GRACE_S
from storage.state import PersonState, StateStore
from storage.store import ArtifactStore
from storage.sweep import delete_on_request, run_sweep
from tests.integration.conftest import TEST_CONSENT
from tests.integration.deletion_audit import PERSON_CLASSES, assert_erased, make_photo
from tests.integration.state_seed import seed_person

DOWN_S = 30.0
# Generous: the deletion waits out DOWN_S plus the server's stop and start; this only bounds a hang.
FINISH_TIMEOUT_S = 600.0


class OutageBeforeFirstDelete:
    """A minio client (wrapping a real one) that takes the S3 server down for ``down_s`` just before the
    first DeleteObjects request naming a key under ``prefix``, then sends that request anyway."""

    def __init__(self, real_client, s3_server, *, prefix: str, down_s: float):
        self._client, self._server, self._prefix, self._down_s = real_client, s3_server, prefix, down_s
        self._lock = threading.Lock()
        self.outage: Future | None = None
        self.began = threading.Event()
        self.began_at: float | None = None

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def remove_objects(self, bucket_name, delete_object_list, *args, **kwargs):
        objects = list(delete_object_list)
        with self._lock:
            if self.outage is None and any(item.name.startswith(self._prefix) for item in objects):
                self.outage = self._server.restart_after(self._down_s)  # returns with the server stopped
                self.began_at = time.monotonic()
                self.began.set()
        return self._client.remove_objects(bucket_name, objects, *args, **kwargs)


def _outage_store(store: ArtifactStore, s3_server, prefix: str) -> tuple[ArtifactStore, OutageBeforeFirstDelete]:
    faulty = OutageBeforeFirstDelete(store.client, s3_server, prefix=prefix, down_s=DOWN_S)
    # A call may have started just before the server began to stop: it waits for the stop, the
    # outage and the start.
    assert store.outage_tolerance_s >= DOWN_S + STOP_GRACE_S + READY_TIMEOUT_S, store.outage_tolerance_s
    return ArtifactStore(faulty, store.buckets, server_side_encryption=store.server_side_encryption,
                         outage_tolerance_s=store.outage_tolerance_s), faulty


def _write_versions(store, key_store, person: PersonState, versions: int = 3) -> None:
    """Several versions of a crop, a checkpoint and a headshot, a delete marker and a version nobody
    recorded; every recorded version goes into the person's state."""
    ref = person.ref
    scope = PersonScope(store, ref, key_store=key_store)
    for artifact, key in (("derived", keys.crop_key(ref, 0)), ("models", keys.checkpoint_key(ref)),
                          ("outputs", keys.headshot_key(ref, "office", 0, 42))):
        for version in range(versions):
            person.record_object(scope.put(artifact, key, f"{artifact} {version}".encode()))
    store.client.remove_object(store.bucket("models"), keys.lora_key(ref))  # a bare delete marker
    scope.put("models", keys.lora_key(ref) + ".tmp", b"never recorded")


def _all_versions(store, ref: keys.PersonRef) -> set[tuple[str, str, str | None]]:
    return {(store.bucket(artifact), key, version_id) for artifact in PERSON_CLASSES
            for key, version_id, _ in store.list_versions(artifact, ref.prefix)}


def _receipted_once(store, tenant: str, expected: set[tuple[str, str, str | None]]) -> None:
    """Across every receipt naming the tenant, each expected version appears exactly once."""
    seen: dict[tuple[str, str, str | None], int] = {}
    for receipt in list_receipts(store, tenant=tenant):
        for item in receipt.objects:
            identity = (item["bucket"], item["key"], item["version_id"])
            if identity in expected:
                seen[identity] = seen.get(identity, 0) + 1
    assert set(seen) == expected, sorted(expected - set(seen))
    assert set(seen.values()) == {1}, {identity: n for identity, n in seen.items() if n != 1}


def _run_with_outage(call, faulty: OutageBeforeFirstDelete, s3_server):
    """Run ``call`` in a thread; once it has taken the server down, wait for it to come back, then for
    ``call`` to finish. Returns (its result, seconds from the outage's start to the end of ``call``,
    seconds ``call`` took in all)."""
    old_pid = s3_server.pid
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(call)
        while not faulty.began.wait(timeout=1.0):
            assert not running.done(), f"finished without deleting anything: {running.exception()!r}"
        back = s3_server.wait_until_back(timeout_s=DOWN_S + STOP_GRACE_S + READY_TIMEOUT_S + 30)
        assert back.pid != old_pid, "the server did not restart"
        result = running.result(timeout=FINISH_TIMEOUT_S)
        finished = time.monotonic()
    return result, finished - faulty.began_at, finished - started


def test_an_early_deletion_waits_out_a_30_s_outage_and_leaves_nothing(s3_server, base_config, store, tenant,
                                                                     caplog):
    rng = random.Random(12)
    manifest = BatchManifest(tenant=tenant, name="Outage team", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("target", "Tess Target", "tess@example.com", []),
                                      PersonSpec("bystander", "Bea Bystander", None, [])])
    created = client.create_batch(base_config, manifest, store=store)
    target = keys.PersonRef(tenant, created.batch_id, "target")
    bystander = keys.PersonRef(tenant, created.batch_id, "bystander")
    setup_keys = key_store_for(base_config, store)
    for number in range(3):
        for person in (target, bystander):
            client.add_photo_bytes(base_config, tenant=tenant, batch_id=created.batch_id,
                                   person_id=person.person_id, filename=f"{number}.jpg", data=make_photo(rng),
                                   store=store)
    states = StateStore(store)
    person = states.load_person(tenant, created.batch_id, "target")
    _write_versions(store, setup_keys, person)
    states.save_person(person)
    before = _all_versions(store, target)
    assert len(before) >= 3 + 3 + 3 + 2 + 3  # uploads, derived, models (+ marker, .tmp), outputs
    bystander_before = _all_versions(store, bystander)

    outage_store, faulty = _outage_store(store, s3_server, target.prefix)
    deleting_keys = key_store_for(base_config, outage_store)
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        receipt, finished_s, total_s = _run_with_outage(
            lambda: delete_on_request(outage_store, load_policy(None), [target], include_outputs=True,
                                      requested_by="outage-test", key_store=deleting_keys),
            faulty, s3_server)
    print(f"early deletion took {total_s:.1f} s; it finished {finished_s:.1f} s after the server went down "
          f"for {DOWN_S:.0f} s")
    assert any("retrying" in record.getMessage() for record in caplog.records), "it never met the outage"

    assert barrier.is_deleted(store, target)
    assert_erased(store, target)
    check = verify_receipt(store, receipt.receipt_id)
    assert check["verified"] and check["objects_checked"] == len(receipt.objects), check
    mine = [item for item in receipt.objects if item["key"].startswith(target.prefix)]
    assert {(item["bucket"], item["key"], item["version_id"]) for item in mine} == before
    assert len(mine) == len(before), "a version is listed twice"
    _receipted_once(store, tenant, before)
    assert [item["key"] for item in receipt.keys_destroyed] == [key_object_key(target)]
    assert not [intent for _, intent in pending_intents(store) if intent["tenant"] == tenant]
    # The bystander in the same batch lost nothing.
    assert _all_versions(store, bystander) == bystander_before


# Processed long before anything else in the session's buckets is due: a sweep as of SWEEP_NOW finds
# only this test's persons in the expiry index.
PROCESSED_AT = datetime(2024, 1, 10, 8, 0, tzinfo=timezone.utc)
SWEEP_NOW = PROCESSED_AT + timedelta(days=30, minutes=5)


def test_a_retention_sweep_waits_out_a_30_s_outage_and_receipts_every_version_once(s3_server, base_config, store,
                                                                                  tenant, caplog):
    base = load_policy(None)
    # Everything of this tenant falls due after 30 days, outputs too: nothing of them may be left.
    policy = RetentionPolicy.from_mapping({**base.to_json(), "tenants": {tenant: {"outputs": 30}}})
    setup_keys = key_store_for(base_config, store)
    states = StateStore(store)
    persons = []
    for index in range(3):
        person = PersonState(tenant=tenant, batch_id="b1", person_id=f"p{index}", name="Ada Secret-Name",
                             email="ada@secret.example", state="done", processed_at=format_time(PROCESSED_AT))
        scope = PersonScope(store, person.ref, key_store=setup_keys)
        for number in range(2):
            person.record_object(scope.put("uploads", keys.upload_key(person.ref, 0, ".jpg"), b"photo %d" % number))
        _write_versions(store, setup_keys, person)
        seed_person(store, person)  # as the run that processed it left it
        states.save_person(person)  # older state versions hold the name too
        file_person(store, person.ref, min(policy.due_times(tenant, PROCESSED_AT).values()), reason="processed")
        persons.append(person)
    before = {person.person_id: _all_versions(store, person.ref) for person in persons}
    expected = set().union(*before.values())

    outage_store, faulty = _outage_store(store, s3_server, f"{tenant}/")
    sweeping_keys = key_store_for(base_config, outage_store)
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        result, finished_s, total_s = _run_with_outage(
            lambda: run_sweep(outage_store, policy, now=SWEEP_NOW, key_store=sweeping_keys), faulty, s3_server)
    print(f"sweep of {len(persons)} persons took {total_s:.1f} s; it finished {finished_s:.1f} s after the "
          f"server went down for {DOWN_S:.0f} s")
    assert any("retrying" in record.getMessage() for record in caplog.records), "it never met the outage"

    receipt = result.receipt
    assert receipt.verification["listing_count"] == 0
    check = verify_receipt(store, receipt.receipt_id)
    assert check["verified"] and check["objects_checked"] == len(receipt.objects), check
    mine = [item for item in receipt.objects if item["key"].startswith(f"{tenant}/")]
    assert {(item["bucket"], item["key"], item["version_id"]) for item in mine} == expected
    assert len(mine) == len(expected), "a version is listed twice"
    _receipted_once(store, tenant, expected)
    recorded = {(o.bucket, o.key, o.version_id): o.sha256 for person in persons for o in person.objects}
    for item in mine:
        assert item["sha256"] == recorded.get((item["bucket"], item["key"], item["version_id"]))
    assert sorted(item["key"] for item in receipt.keys_destroyed if item["tenant"] == tenant) == sorted(
        key_object_key(person.ref) for person in persons)
    for person in persons:
        for artifact in PERSON_CLASSES:
            assert count_versions(store, artifact, person.ref.prefix) == 0, (person.person_id, artifact)
        state_key = keys.person_state_key(person.ref)
        assert [key for key, _, _ in store.list_versions("state", person.ref.prefix)] == [state_key]
        text = json.dumps(store.get_json("state", state_key))
        assert "Secret-Name" not in text and "secret.example" not in text
        assert key_material_versions(store, key_object_key(person.ref)) == []
    assert not [intent for _, intent in pending_intents(store) if intent["tenant"] == tenant]
