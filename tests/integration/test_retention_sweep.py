"""Retention sweeps against the real S3 server (no Ray): what is due goes, every version; nothing else."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import keys
from storage.deletion import count_versions
from storage.receipts import list_receipts, load_receipt, pending_intents, verify_receipt
from storage.retention import (RetentionPolicy, due_entries, file_person, format_time, load_policy)
from storage.state import PersonState, StateStore
from storage.sweep import DeletionHooks, run_sweep
from tests.integration.state_seed import seed_person

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)
DAY = timedelta(days=1)
POLICY = load_policy()
PERSON_CLASSES = ("uploads", "derived", "models", "outputs")


def make_person(store, tenant: str, person_id: str, *, processed_at: datetime | None, state: str = "done",
                versions: int = 2, batch_id: str = "b1", delete_marker: bool = True,
                policy: RetentionPolicy = POLICY) -> PersonState:
    """A person with several versions in every artifact class, a delete marker, and two state versions."""
    ref = keys.PersonRef(tenant, batch_id, person_id)
    person = PersonState(tenant=tenant, batch_id=batch_id, person_id=person_id, name="Ada Secret-Name",
                         email="ada@secret.example", state=state,
                         processed_at=format_time(processed_at) if processed_at else None)
    layout = {"uploads": keys.upload_key(ref, 0, ".jpg"), "derived": keys.crop_key(ref, 0),
              "models": keys.checkpoint_key(ref), "outputs": keys.headshot_key(ref, "office", 0, 42)}
    for artifact, key in layout.items():
        for version in range(versions):
            person.record_object(store.put(artifact, key, f"{artifact}-{version}-{uuid.uuid4()}".encode()))
    if delete_marker:
        store.client.remove_object(store.bucket("models"), keys.lora_key(ref))  # a bare delete marker
        store.put("models", keys.lora_key(ref) + ".tmp", b"x")  # a version nobody recorded
    seed_person(store, person)  # as the run that processed it left it
    StateStore(store).save_person(person)  # older versions of the state document hold the name too
    if processed_at is not None:
        # Filed as the coordinator files a processed person: under its first due day.
        file_person(store, ref, min(policy.due_times(tenant, processed_at).values()), reason="processed")
    else:
        file_person(store, ref, T0, reason="submitted")
    return person


def versions_of(store, person: PersonState) -> dict[str, int]:
    return {artifact: count_versions(store, artifact, person.ref.prefix) for artifact in PERSON_CLASSES}


def test_nothing_goes_before_due_and_everything_but_outputs_goes_after(store, tenant):
    person = make_person(store, tenant, "ada", processed_at=T0)
    before = versions_of(store, person)
    early = run_sweep(store, POLICY, now=T0 + 29 * DAY)
    assert versions_of(store, person) == before
    assert all(o["key"].startswith(tenant) is False for o in early.receipt.objects)

    result = run_sweep(store, POLICY, now=T0 + 30 * DAY + timedelta(minutes=1))
    after = versions_of(store, person)
    assert after["uploads"] == after["derived"] == after["models"] == 0
    assert after["outputs"] == before["outputs"] == 2
    mine = [o for o in result.receipt.objects if o["key"].startswith(person.ref.prefix)]
    assert len(mine) == before["uploads"] + before["derived"] + before["models"]
    recorded = {(o.bucket, o.key, o.version_id): o.sha256 for o in person.objects}
    for item in mine:
        if item["delete_marker"] or item["key"].endswith(".tmp"):
            assert item["sha256"] is None  # never recorded: the receipt says so rather than invent one
        else:
            assert item["sha256"] == recorded[(item["bucket"], item["key"], item["version_id"])]
        assert item["due"] == format_time(T0 + 30 * DAY) and item["deleted_at"]
    assert result.receipt.verification["listing_count"] == 0


def test_the_state_document_becomes_a_tombstone_without_names_in_any_version(store, tenant):
    person = make_person(store, tenant, "ada", processed_at=T0)
    result = run_sweep(store, POLICY, now=T0 + 31 * DAY)
    state_key = keys.person_state_key(person.ref)
    versions = store.list_versions("state", state_key)
    assert len(versions) == 1, "older state versions (with names) must be deleted"
    document = store.get_json("state", state_key)
    text = json.dumps(document)
    assert "Secret-Name" not in text and "secret.example" not in text
    assert document["state"] == "done" and result.receipt.receipt_id in document["receipt_ids"]
    assert set(document["retention"]["deleted_classes"]) == {"uploads", "derived", "models"}
    receipt_text = json.dumps(load_receipt(store, result.receipt.receipt_id).to_json())
    assert "Secret-Name" not in receipt_text and "secret.example" not in receipt_text


def test_repeated_sweeps_are_harmless(store, tenant):
    person = make_person(store, tenant, "ada", processed_at=T0)
    now = T0 + 31 * DAY
    run_sweep(store, POLICY, now=now)
    after_first = versions_of(store, person)
    second = run_sweep(store, POLICY, now=now)
    assert versions_of(store, person) == after_first
    assert not [o for o in second.receipt.objects if o["key"].startswith(person.ref.prefix)]
    assert not [e for e in due_entries(store, now) if e.tenant == tenant], "the index entry must be gone"


def test_dry_run_lists_and_deletes_nothing(store, tenant):
    person = make_person(store, tenant, "ada", processed_at=T0)
    before = versions_of(store, person)
    result = run_sweep(store, POLICY, now=T0 + 31 * DAY, dry_run=True)
    assert versions_of(store, person) == before
    mine = [o for o in result.receipt.objects if o["key"].startswith(person.ref.prefix)]
    assert len(mine) == before["uploads"] + before["derived"] + before["models"]
    assert result.to_json()["receipt_id"] is None


def test_an_unprocessed_person_is_refiled_not_deleted(store, tenant):
    person = make_person(store, tenant, "busy", processed_at=None, state="training")
    now = T0 + 400 * DAY
    run_sweep(store, POLICY, now=now)
    assert versions_of(store, person)["uploads"] == 2
    filed = [e for e in due_entries(store, now + 2 * DAY) if e.tenant == tenant]
    assert [e.day for e in filed] == [f"{now + DAY:%Y-%m-%d}"]


def test_uploads_of_a_submit_that_never_committed_expire(store, tenant):
    ref = keys.PersonRef(tenant, "crashed", "ada")
    store.put("uploads", keys.upload_key(ref, 0, ".jpg"), b"photo")
    file_person(store, ref, T0 + 30 * DAY, reason="submitted")
    run_sweep(store, POLICY, now=T0 + 29 * DAY)
    assert count_versions(store, "uploads", ref.prefix) == 1
    run_sweep(store, POLICY, now=T0 + 31 * DAY)
    assert count_versions(store, "uploads", ref.prefix) == 0


def test_tenant_override_and_outputs_retention(store, tenant):
    policy = RetentionPolicy.from_mapping({**POLICY.to_json(), "tenants": {tenant: {"uploads": 3, "outputs": 60}}})
    person = make_person(store, tenant, "ada", processed_at=T0, policy=policy)
    run_sweep(store, policy, now=T0 + 4 * DAY)
    assert versions_of(store, person) == {"uploads": 0, "derived": 2, "models": 3 + 1, "outputs": 2}
    run_sweep(store, policy, now=T0 + 31 * DAY)
    assert versions_of(store, person)["models"] == 0 and versions_of(store, person)["outputs"] == 2
    run_sweep(store, policy, now=T0 + 61 * DAY)
    assert versions_of(store, person)["outputs"] == 0


def test_a_sweep_killed_half_way_is_finished_by_the_next_and_receipted_once(store, tenant):
    persons = [make_person(store, tenant, f"p{i}", processed_at=T0) for i in range(3)]
    now = T0 + 31 * DAY

    class Killed(BaseException):
        pass

    def die_after_first(count: int) -> None:
        if count == 1:
            raise Killed()

    with pytest.raises(Killed):
        run_sweep(store, POLICY, now=now, hooks=DeletionHooks(after_person=die_after_first))
    assert any(i["tenant"] == tenant for _, i in pending_intents(store)), "the dead sweep must leave an intent"
    result = run_sweep(store, POLICY, now=now)
    assert result.receipt.completed_from
    for person in persons:
        assert versions_of(store, person)["uploads"] == 0
    assert not [i for _, i in pending_intents(store) if i["tenant"] == tenant]
    # Every deleted version of these persons appears in exactly one finished receipt.
    seen: dict[tuple, int] = {}
    for receipt in list_receipts(store, tenant=tenant):
        for item in receipt.objects:
            identity = (item["bucket"], item["key"], item["version_id"])
            seen[identity] = seen.get(identity, 0) + 1
    expected = sum(2 + 2 + 3 + 1 for _ in persons)  # uploads, derived, models (+tmp), delete marker
    assert len(seen) == expected and set(seen.values()) == {1}
    assert verify_receipt(store, result.receipt.receipt_id)["verified"]


def test_verify_notices_a_version_that_is_still_there(store, tenant):
    person = make_person(store, tenant, "ada", processed_at=T0)
    result = run_sweep(store, POLICY, now=T0 + 31 * DAY)
    receipt = load_receipt(store, result.receipt.receipt_id)
    assert verify_receipt(store, receipt.receipt_id)["verified"]
    # A receipt that claimed an output version was deleted would be caught by the re-listing.
    output = next(o for o in person.objects if o.artifact == "outputs")
    receipt.objects.append({"artifact": "outputs", "bucket": output.bucket, "key": output.key,
                            "version_id": output.version_id})
    from storage.receipts import save_receipt

    save_receipt(store, receipt)
    check = verify_receipt(store, receipt.receipt_id)
    assert not check["verified"] and check["still_present"][0]["key"] == output.key


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(persons=st.lists(st.tuples(st.integers(min_value=0, max_value=60),   # processed days before "now"
                                  st.integers(min_value=1, max_value=3),    # versions per object
                                  st.sampled_from(["done", "failed", "needs_photos", "training"])),
                        min_size=1, max_size=4),
       upload_days=st.integers(min_value=0, max_value=45))
def test_property_a_sweep_deletes_exactly_what_is_expired(store, persons, upload_days):
    tenant = "p" + uuid.uuid4().hex[:10]  # a fresh prefix per example
    policy = RetentionPolicy.from_mapping({**POLICY.to_json(), "tenants": {tenant: {"uploads": upload_days}}})
    now = T0 + 100 * DAY
    made = []
    for index, (age_days, versions, state) in enumerate(persons):
        processed = now - timedelta(days=age_days, minutes=1) if state != "training" else None
        person = make_person(store, tenant, f"x{index}", processed_at=processed, state=state, versions=versions,
                             delete_marker=False, policy=policy)
        made.append((person, processed, versions))
    run_sweep(store, policy, now=now)
    for person, processed, versions in made:
        counts = versions_of(store, person)
        assert counts["outputs"] == versions, "outputs are kept by this policy"
        for artifact in ("uploads", "derived", "models"):
            expired = processed is not None and processed + timedelta(days=policy.days_for(tenant, artifact)) <= now
            assert counts[artifact] == (0 if expired else versions), (artifact, processed, counts)


def test_receipts_expire_after_their_own_retention(store, tenant):
    from storage.receipts import Receipt, new_receipt_id, receipt_exists, save_receipt

    old_id = new_receipt_id("request", now=T0 - timedelta(days=POLICY.receipts_days + 2))
    recent_id = new_receipt_id("request", now=T0 - timedelta(days=POLICY.receipts_days - 2))
    for receipt_id in (old_id, recent_id):
        save_receipt(store, Receipt(receipt_id=receipt_id, kind="request", requested_by="test", policy={},
                                    started_at=format_time(T0), as_of=format_time(T0),
                                    persons=[{"tenant": tenant, "batch_id": "b1", "person_id": "ada"}]))
    result = run_sweep(store, POLICY, now=T0)
    assert not receipt_exists(store, old_id) and receipt_exists(store, recent_id)
    assert any(item["artifact"] == "receipts" and old_id in item["key"] for item in result.receipt.objects)
