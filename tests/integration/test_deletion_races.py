"""Deletion wins every race (issue #17): uploads, worker writes and state saves racing an early
deletion, over many seeds, against the real S3 server; then every bucket and the key store are
audited. Nothing of the person may be left, the key can never come back, and receipts verify.

The races are ordered by conditions (how many uploads had landed when the deletion started, drawn
from the seed), never by sleeps, so every seed exercises a different interleaving and the outcome
asserted is the same for all of them.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import pytest
from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import barrier, keys
from storage.crypto import KeyDestroyed, PersonKeyStore
from storage.deletion import count_versions
from storage.receipts import list_receipts, verify_receipt
from storage.retention import load_policy
from storage.scoped import PersonRevoked, PersonScope
from storage.state import StateConflict, StateStore
from storage.sweep import delete_on_request, run_sweep
from tests.integration.conftest import TEST_CONSENT
from tests.integration.deletion_audit import assert_erased, make_photo

SEEDS = range(12)
# Below the 50 photos a person may have: the racing uploader never hits that limit instead of the barrier.
MAX_RACING_UPLOADS = 40
BYSTANDER_UPLOADS = 8


def _new_batch(config, store, tenant: str):
    manifest = BatchManifest(tenant=tenant, name="Race team", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("target", "Tess Target", "tess@example.com", []),
                                      PersonSpec("bystander", "Bea Bystander", None, [])])
    created = client.create_batch(config, manifest, store=store)
    return (keys.PersonRef(tenant, created.batch_id, "target"), keys.PersonRef(tenant, created.batch_id, "bystander"))


@pytest.mark.parametrize("seed", SEEDS)
def test_deletion_wins_against_uploads_worker_writes_and_state_saves(seed, base_config, store, key_store, tenant):
    rng = random.Random(seed)
    target, bystander = _new_batch(base_config, store, tenant)
    states = StateStore(store)
    photos = [make_photo(rng) for _ in range(MAX_RACING_UPLOADS + 1)]
    uploads_landed = threading.Semaphore(0)
    deletion_done = threading.Event()
    start_deleting_after = rng.randrange(0, 6)  # uploads stored before the deletion begins
    outcomes: dict[str, list[str]] = {"uploads": [], "worker": [], "state": [], "bystander": []}
    errors: list[BaseException] = []

    def race(name: str, step, max_steps: int) -> None:
        """Run ``step(n)`` until it is refused; a racer that never was (the deletion came late) tries once
        more after the deletion, and that try must be refused."""
        try:
            for number in range(max_steps):
                outcome = step(number)
                outcomes[name].append(outcome)
                if outcome == "refused":
                    return
            assert deletion_done.wait(timeout=300), "the deletion never finished"
            outcomes[name].append(step(max_steps))
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    def upload(person: keys.PersonRef, number: int) -> str:
        try:
            result = client.add_photo_bytes(base_config, tenant=person.tenant, batch_id=person.batch_id,
                                            person_id=person.person_id, filename=f"{number:02d}.jpg",
                                            data=photos[number], store=store)
            return "stored" if result["stored"] else "repeat"
        except ValueError as refused:
            assert "deleted" in str(refused), refused
            return "refused"
        finally:
            if person == target:
                uploads_landed.release()

    # Another process, with its own key cache: what a GPU worker holding the person's key looks like.
    worker_scope = PersonScope(store, target, key_store=PersonKeyStore(store, key_store.master))

    def worker_write(number: int) -> str:
        try:
            worker_scope.put("models", keys.checkpoint_key(target), b"checkpoint %d" % number)
            worker_scope.put("outputs", keys.headshot_key(target, "office", 0, number), b"png %d" % number)
            return "stored"
        except PersonRevoked:
            return "refused"
        except KeyDestroyed:
            # No key yet (the first upload makes it) or no key any more (the deletion destroyed it).
            return "refused" if barrier.is_deleted(store, target) else "no-key"

    def state_save(number: int) -> str:
        person = states.load_person(target.tenant, target.batch_id, target.person_id)
        if person.state == "deleted":
            return "refused"  # the tombstone: nothing to save on top of
        person.timings_s["race"] = float(number)
        try:
            states.save_person(person)
            return "saved"
        except StateConflict:
            return "conflict"
        except barrier.PersonDeleted:
            return "refused"

    receipts = []

    def delete() -> None:
        try:
            for _ in range(start_deleting_after):
                uploads_landed.acquire()
            receipts.append(delete_on_request(store, load_policy(None), [target], include_outputs=True,
                                              requested_by="race-test", key_store=key_store))
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
        finally:
            deletion_done.set()

    threads = [threading.Thread(target=run) for run in (
        lambda: race("uploads", lambda n: upload(target, n), MAX_RACING_UPLOADS),
        lambda: race("bystander", lambda n: upload(bystander, n), BYSTANDER_UPLOADS - 1),
        lambda: race("worker", worker_write, 400), lambda: race("state", state_save, 400), delete)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a racer hung"
    assert not errors, errors

    # Every racer of the target ends refused: once the barrier was up, nothing got through...
    for name in ("uploads", "worker", "state"):
        assert outcomes[name][-1] == "refused", (name, outcomes[name])
    assert outcomes["uploads"].count("stored") >= start_deleting_after
    # ...and nothing that got through before it was left behind.
    assert_erased(store, target)
    (receipt,) = receipts
    assert verify_receipt(store, receipt.receipt_id)["verified"]
    assert receipt.barriers and receipt.barriers[0]["key"] == barrier.barrier_key(target)

    # Whatever comes later is refused too, by every path, and makes nothing.
    with pytest.raises(ValueError, match="deleted"):
        client.add_photo_bytes(base_config, tenant=target.tenant, batch_id=target.batch_id, person_id="target",
                               filename="late.jpg", data=photos[0], store=store)
    with pytest.raises(KeyDestroyed):
        PersonKeyStore(store, key_store.master).key_for(target, create=True)
    with pytest.raises(PersonRevoked):
        PersonScope(store, target).put("outputs", keys.person_contact_sheet_key(target), b"late sheet")
    assert_erased(store, target)

    # The bystander lost nothing: every photo it was told was stored is there, readable with its key.
    assert outcomes["bystander"] == ["stored"] * BYSTANDER_UPLOADS, outcomes["bystander"]
    bystander_state = states.load_person(bystander.tenant, bystander.batch_id, "bystander")
    assert bystander_state.photos_accepted == BYSTANDER_UPLOADS and bystander_state.state == "queued"
    scope = PersonScope(store, bystander, key_store=key_store)
    assert len(scope.list("uploads", "uploads/")) == BYSTANDER_UPLOADS
    assert scope.get("uploads", bystander_state.photos[0].key)


def test_a_writer_that_died_before_its_barrier_check_is_cleaned_up_by_the_sweep(base_config, store, key_store,
                                                                             tenant):
    rng = random.Random(99)
    target, _ = _new_batch(base_config, store, tenant)
    client.add_photo_bytes(base_config, tenant=tenant, batch_id=target.batch_id, person_id="target",
                           filename="a.jpg", data=make_photo(rng), store=store)
    policy = load_policy(None)
    delete_on_request(store, policy, [target], include_outputs=True, requested_by="test", key_store=key_store)
    # A worker wrote (with a key it had cached) and died before it could look at the barrier: its
    # version bypassed every check. Only the sweep's late-write audit can find it.
    late = store.put("models", keys.lora_key(target), b"a LoRA written too late")
    now = datetime.now(timezone.utc)
    summary = run_sweep(store, policy, now=now, key_store=key_store, late_write_audit_s=3600)
    late_entries = [item for item in summary.receipt.objects if item.get("late_write")]
    assert [(item["key"], item["version_id"]) for item in late_entries] == [(late.key, late.version_id)]
    assert verify_receipt(store, summary.receipt.receipt_id)["verified"]
    assert_erased(store, target)
    # Audited for the window, then no longer: the marker goes once it has passed.
    assert any(marker.person == target for marker in barrier.audit_markers(store))
    run_sweep(store, policy, now=now + timedelta(seconds=3601), key_store=key_store, late_write_audit_s=3600)
    assert not any(marker.person == target for marker in barrier.audit_markers(store))
    assert barrier.is_deleted(store, target), "the barrier itself stays for good"


def test_a_deletion_that_died_right_after_its_barrier_is_finished_by_the_next_sweep(base_config, store, key_store,
                                                                                tenant):
    rng = random.Random(7)
    target, bystander = _new_batch(base_config, store, tenant)
    for name in ("a.jpg", "b.jpg"):
        client.add_photo_bytes(base_config, tenant=tenant, batch_id=target.batch_id, person_id="target",
                               filename=name, data=make_photo(rng), store=store)
    # The deletion raised the barrier and died: no intent, no receipt, nothing deleted yet.
    barrier.raise_barrier(store, target, receipt_id="request-20261202T000000-deadbeef", requested_by="operator",
                          include_outputs=True)
    assert count_versions(store, "uploads", target.prefix) == 2
    with pytest.raises(ValueError, match="deleted"):  # the barrier alone already stops every writer
        client.add_photo_bytes(base_config, tenant=tenant, batch_id=target.batch_id, person_id="target",
                               filename="c.jpg", data=make_photo(rng), store=store)
    summary = run_sweep(store, load_policy(None), key_store=key_store)
    assert summary.receipt.completed_from, "the sweep did not finish the dead deletion"
    assert_erased(store, target)
    finished = [r for r in list_receipts(store, tenant=tenant, batch_id=target.batch_id, person_id="target")
                if r.kind == "request"]
    assert len(finished) == 1 and verify_receipt(store, finished[0].receipt_id)["verified"]
    assert finished[0].scope["completes"] == "request-20261202T000000-deadbeef"
    assert count_versions(store, "uploads", bystander.prefix) == 0  # the bystander never had photos here
    assert StateStore(store).load_person(tenant, target.batch_id, "bystander").state == "queued"
