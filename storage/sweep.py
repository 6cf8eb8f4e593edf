"""The retention sweep and early deletion: find what is due, destroy keys, delete every version, prove it.

Plain functions over the store; the cluster layer supplies the hooks that reach running processes
(stop a person's in-flight stage, make every GPU worker purge its local copies). The Ray actor that
runs sweeps on a timer is :mod:`cluster.retention`.

Both paths follow the same order for a person (an early deletion raises the person's deletion
barrier before anything else, :mod:`storage.barrier`, so no write for them can succeed from then on):
1. an intent is written to the receipts bucket (so a crash half-way is finished by the next sweep);
2. the person's data key is destroyed first (crypto-erasure: escaped copies become unreadable);
3. every version and delete marker under the person's prefix is deleted, class by class;
4. GPU workers drop their local copies and confirm, each waited for within one bound; the receipt
   says which nodes confirmed and how the others are covered (:mod:`cluster.purge`);
5. the state document is replaced by a tombstone (ids, times, receipt ids; no names) and its older
   versions — which hold names — are deleted;
6. the prefixes are purged once more (a write that landed just before the barrier was seen), then
   the receipt is written with the verification listing, and the intent removed.

Every sweep also audits recent early deletions: a deletion that died before its first intent is run
again, and for ``late_write_audit_s`` after one finished its person's prefixes are listed again so
that a writer that died between its write and its barrier check leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Protocol

from storage import barrier, keys
from storage.deletion import (count_versions, list_all_versions, purge_prefix, recorded_index,
                              replace_with_tombstone)
from storage.receipts import (RECEIPTS_PREFIX, Receipt, new_receipt_id, pending_intents, receipt_exists, remove_keys,
                              save_receipt, write_intent)
from storage.retention import (EXPIRING_CLASSES, RECHECK_UNPROCESSED, RetentionPolicy, clock_start, due_entries,
                               file_person, format_time, parse_time, read_person_document, remove_entry)
from storage.crypto import key_material_versions, key_object_key
from storage.store import ArtifactStore, utc_now_iso

ENCRYPTED_CLASSES = ("uploads", "derived", "models")
SWEEP_THREADS = 8
DEFAULT_LATE_WRITE_AUDIT_S = 24 * 3600.0


class KeyDestroyer(Protocol):
    def destroy(self, person: keys.PersonRef) -> dict[str, Any]: ...

    def forget(self, person: keys.PersonRef) -> int: ...


@dataclass
class DeletionHooks:
    """How deletion reaches running processes. Defaults do nothing (nothing is running)."""

    stop_persons: Callable[[list[keys.PersonRef]], None] = lambda persons: None
    # Returns {"workers": [one confirmation per GPU worker], "nodes": [one entry per node]} (a plain list
    # is read as the workers' confirmations alone).
    purge_workers: Callable[[list[keys.PersonRef]], dict[str, list[dict[str, Any]]] | list[dict[str, Any]]] = \
        lambda persons: {"workers": [], "nodes": []}
    repackage_batch: Callable[[str, str], None] = lambda tenant, batch_id: None
    # Called after each person of a sweep is done (tests use it to kill the sweep half-way).
    after_person: Callable[[int], None] = lambda count: None


@dataclass
class SweepResult:
    receipt: Receipt
    seconds: float
    overdue: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        summary = self.receipt.summary()
        return {"receipt_id": None if self.receipt.dry_run else self.receipt.receipt_id,
                "dry_run": self.receipt.dry_run, "as_of": self.receipt.as_of, "persons": summary["persons"],
                "objects": summary["objects_deleted"], "by_artifact": summary["by_artifact"],
                "bytes": summary["bytes"], "seconds": round(self.seconds, 3),
                "verification": self.receipt.verification, "completed_from": self.receipt.completed_from}


def _record_purges(receipt: Receipt, answer) -> None:
    """What ``hooks.purge_workers`` answered, into the receipt: per worker, and per node."""
    if isinstance(answer, dict):
        receipt.worker_purges.extend(answer.get("workers", []))
        receipt.nodes.extend(answer.get("nodes", []))
    else:
        receipt.worker_purges.extend(answer)


def _person_json(person: keys.PersonRef) -> dict[str, str]:
    return {"tenant": person.tenant, "batch_id": person.batch_id, "person_id": person.person_id}


def _delete_person(store: ArtifactStore, person: keys.PersonRef, *, classes: list[str], receipt: Receipt,
                   document: dict[str, Any] | None, due: dict[str, str], key_store: KeyDestroyer | None,
                   destroy_key: bool, dry_run: bool, intent_keys: list[str] | None = None,
                   planned: list[dict[str, Any]] | None = None,
                   lock: threading.Lock | None = None) -> list[dict[str, Any]]:
    """Delete one person's classes; returns receipt entries for every version removed.

    Before anything is deleted, the full list of versions is written as an intent. If the process dies
    half-way, the next sweep finds the intent, deletes what is left, and records every planned version
    in its receipt (``planned`` carries an old intent's list), so no deletion goes unreceipted.
    """
    recorded = recorded_index((document or {}).get("objects", []))
    planned = list(planned or [])
    listings = {}
    for artifact in classes:
        listings[artifact] = list_all_versions(store, artifact, person.prefix)
        bucket = store.bucket(artifact)
        planned.extend(_planned_entry(artifact, bucket, version, recorded, due.get(artifact))
                       for version in listings[artifact])
    if dry_run:
        return planned
    lock = lock or threading.Lock()
    if intent_keys is not None:
        intent_key = write_intent(store, receipt.receipt_id, person, {
            **_person_json(person), "receipt_id": receipt.receipt_id, "kind": receipt.kind, "classes": classes,
            "due": due, "destroy_key": destroy_key, "versions": planned})
        with lock:
            intent_keys.append(intent_key)
    if destroy_key and key_store is not None:
        # Keys first: if anything below fails half-way, what remains is already unreadable.
        destroyed = {**_person_json(person), **key_store.destroy(person)}
        with lock:
            receipt.keys_destroyed.append(destroyed)
    entries: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for artifact in classes:
        # purge_prefix deletes what was listed, then lists again until nothing is left.
        removed, _ = purge_prefix(store, artifact, person.prefix, recorded=recorded, due=due.get(artifact),
                                  listed=listings[artifact])
        for item in removed:
            entries[(item.bucket, item.key, item.version_id)] = item.to_json()
    now = utc_now_iso()
    for item in planned:  # listed before, gone now (verified below): deleted by this or the dead run
        entries.setdefault((item["bucket"], item["key"], item["version_id"]), {**item, "deleted_at": now})
    return list(entries.values())


def _planned_entry(artifact: str, bucket: str, version, recorded, due: str | None) -> dict[str, Any]:
    key, version_id, is_marker, size = version
    record = recorded.get((bucket, key, version_id))
    return {"artifact": artifact, "bucket": bucket, "key": key, "version_id": version_id,
            "delete_marker": is_marker, "size": int(record["size"]) if record else size,
            "sha256": record["sha256"] if record else None, "due": due, "deleted_at": ""}


def _verify(store: ArtifactStore, persons_classes: Iterable[tuple[keys.PersonRef, list[str]]]) -> dict[str, Any]:
    """List every deleted prefix again, after everything: the count must be 0."""
    listings = [(artifact, person.prefix) for person, classes in persons_classes for artifact in classes]
    with ThreadPoolExecutor(max_workers=SWEEP_THREADS) as pool:
        remaining = sum(pool.map(lambda item: count_versions(store, *item), listings))
    return {"listing_count": remaining, "prefixes_listed": len(listings), "verified_at": utc_now_iso()}


def _record_retention(document: dict[str, Any], classes: list[str], receipt_id: str, now: datetime) -> dict[str, Any]:
    retention = dict(document.get("retention") or {})
    deleted = sorted(set(retention.get("deleted_classes", [])) | set(classes))
    retention["deleted_classes"] = deleted
    retention.setdefault("deleted_at", {})
    for artifact in classes:
        retention["deleted_at"][artifact] = format_time(now)
    document = dict(document)
    document["retention"] = retention
    if not document.get("processed_at"):
        document["processed_at"] = format_time(now)
    return document


def run_sweep(store: ArtifactStore, policy: RetentionPolicy, *, now: datetime | None = None,
              key_store: KeyDestroyer | None = None, hooks: DeletionHooks | None = None, dry_run: bool = False,
              requested_by: str = "retention-controller", threads: int = SWEEP_THREADS,
              late_write_audit_s: float = DEFAULT_LATE_WRITE_AUDIT_S) -> SweepResult:
    """One sweep as of ``now`` (the controller's injectable clock). Idempotent; safe to repeat.

    Args:
        late_write_audit_s: how long after an early deletion its person's prefixes are audited for
            late writes (see the module docstring).

    Returns:
        The receipt (saved unless ``dry_run``) and timing.
    """
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    hooks = hooks or DeletionHooks()
    receipt = Receipt(receipt_id=new_receipt_id("sweep"), kind="sweep", requested_by=requested_by,
                      policy=policy.to_json(), started_at=utc_now_iso(), as_of=format_time(now), dry_run=dry_run)
    touched: list[tuple[keys.PersonRef, list[str]]] = []
    intent_keys: list[str] = []
    finished_requests: list[keys.PersonRef] = []
    count = 0

    # 1. Intents left by a sweep or request that died half-way: finish them first.
    if not dry_run:
        for intent_key, intent in pending_intents(store):
            if receipt_exists(store, intent["receipt_id"]):
                # Its run finished and wrote the receipt but died before tidying up: nothing to redo.
                remove_keys(store, "receipts", [intent_key])
                continue
            person = keys.PersonRef(intent["tenant"], intent["batch_id"], intent["person_id"])
            # Adopt it under this sweep's id first, so that if this sweep saves its receipt and dies
            # before tidying up, the next one sees the intent as done (never receipted twice).
            adopted_from = intent["receipt_id"]
            intent_keys.append(write_intent(store, receipt.receipt_id, person,
                                            {**intent, "receipt_id": receipt.receipt_id, "adopted_from": adopted_from}))
            remove_keys(store, "receipts", [intent_key])
            document = read_person_document(store, person)
            classes = intent["classes"]
            deleted = _delete_person(store, person, classes=classes, receipt=receipt, document=document,
                                     due=intent.get("due", {}), key_store=key_store,
                                     destroy_key=intent.get("destroy_key", False), dry_run=False,
                                     planned=intent.get("versions", []))
            receipt.objects.extend(deleted)
            receipt.persons.append(_person_json(person))
            receipt.completed_from.append(adopted_from)
            if document is not None:
                updated = _record_retention(document, classes, receipt.receipt_id, now)
                if intent.get("kind") == "request":
                    replace_with_tombstone(store, person, updated, receipt_id=receipt.receipt_id, state="deleted",
                                           keep_outputs="outputs" not in classes)
                else:
                    replace_with_tombstone(store, person, updated, receipt_id=receipt.receipt_id)
            if intent.get("kind") == "request":
                finished_requests.append(person)
            touched.append((person, classes))

    # 1b. Early deletions: finish those that died before their first intent, audit recent ones.
    if not dry_run:
        _audit_deletions(store, policy, receipt, touched, now=now, key_store=key_store, hooks=hooks,
                         finished=finished_requests, late_write_audit_s=late_write_audit_s)

    # 2. Everything the index says is due by now, several persons at a time (deletion is I/O-bound).
    lock = threading.Lock()
    swept: list[keys.PersonRef] = []

    def sweep_entry(entry) -> None:
        nonlocal count
        person = entry.person
        document = read_person_document(store, person)
        if document is None:
            # Uploads whose batch was never committed (a crashed submit): due by the entry's own date.
            entry_document = store.get_json("state", entry.key)
            if parse_time(entry_document["due"]) > now:
                return
            classes = [a for a in EXPIRING_CLASSES if count_versions(store, a, person.prefix)]
            due = {a: entry_document["due"] for a in classes}
            document, pending = {}, []
        else:
            start = clock_start(document)
            if start is None:
                if not dry_run:
                    file_person(store, person, now + RECHECK_UNPROCESSED, reason="not processed yet")
                    remove_entry(store, entry.key)
                return
            due_times = policy.due_times(person.tenant, start)
            already = set((document.get("retention") or {}).get("deleted_classes", []))
            classes = [a for a, t in due_times.items() if t <= now and a not in already]
            due = {a: format_time(due_times[a]) for a in classes}
            pending = [t for a, t in due_times.items() if a not in already and a not in classes]
        if classes:
            remaining_encrypted = set(ENCRYPTED_CLASSES) - set(classes) - set(
                (document.get("retention") or {}).get("deleted_classes", []))
            deleted = _delete_person(store, person, classes=classes, receipt=receipt, document=document, due=due,
                                     key_store=key_store, destroy_key=not remaining_encrypted, dry_run=dry_run,
                                     intent_keys=intent_keys, lock=lock)
            with lock:
                receipt.objects.extend(deleted)
                receipt.persons.append(_person_json(person))
                touched.append((person, classes))
                swept.append(person)
            if not dry_run and document:
                updated = _record_retention(document, classes, receipt.receipt_id, now)
                replace_with_tombstone(store, person, updated, receipt_id=receipt.receipt_id)
        if not dry_run:
            next_due = min(pending) if pending else None
            if next_due is not None:
                new_key = file_person(store, person, next_due, reason="next class due")
                if new_key != entry.key:
                    remove_entry(store, entry.key)
            else:
                remove_entry(store, entry.key)
        with lock:
            count += 1
            done = count
        hooks.after_person(done)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = [pool.submit(sweep_entry, entry) for entry in due_entries(store, now)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # Stop taking on persons; those already started finish or leave intents for the next sweep.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if swept and not dry_run:
        # Every GPU worker drops whatever it still holds of these persons, and confirms.
        _record_purges(receipt, hooks.purge_workers(swept))

    # 3. Receipts past their own retention (they hold ids only, but they do not live forever).
    if not dry_run:
        _expire_receipts(store, policy, now, receipt)

    receipt.verification = _verify(store, touched) if not dry_run else {"listing_count": None, "dry_run": True}
    if not dry_run:
        save_receipt(store, receipt)
        for person in finished_requests:
            barrier.complete_audit_marker(store, person, receipt_id=receipt.receipt_id)
        remove_keys(store, "receipts", intent_keys)
    return SweepResult(receipt=receipt, seconds=time.perf_counter() - started)


def _purge_undelivered_outputs(store: ArtifactStore, person: keys.PersonRef, tombstone: dict[str, Any]
                               ) -> list[dict[str, Any]]:
    """Headshots stay downloadable after an early deletion, but only those delivered: images a stage
    wrote without ever recording them (cut short by the deletion) are removed, every version."""
    delivered = {record.get("key") for record in tombstone.get("headshots", [])}
    delivered.add(keys.person_contact_sheet_key(person))
    undelivered = [version for version in list_all_versions(store, "outputs", person.prefix)
                   if version[0] not in delivered]
    if not undelivered:
        return []
    removed, _ = purge_prefix(store, "outputs", person.prefix, exclude=frozenset(delivered), listed=undelivered)
    return [item.to_json() for item in removed]


def _audit_deletions(store: ArtifactStore, policy: RetentionPolicy, receipt: Receipt,
                     touched: list[tuple[keys.PersonRef, list[str]]], *, now: datetime,
                     key_store: KeyDestroyer | None, hooks: DeletionHooks, finished: list[keys.PersonRef],
                     late_write_audit_s: float) -> None:
    """Step 1b of a sweep: every early deletion whose audit marker is still there."""
    just_finished = set(finished)
    for marker in list(barrier.audit_markers(store)):
        person = marker.person
        if person in just_finished:
            continue  # completed from its intents in step 1 of this very sweep
        if marker.completed_at is None:
            if receipt_exists(store, marker.receipt_id):
                # It finished and saved its receipt, but died before saying so.
                barrier.complete_audit_marker(store, person, receipt_id=marker.receipt_id)
                continue
            # Died before its first intent (or before anything was deleted): run it again, whole.
            redone = delete_on_request(store, policy, [person], include_outputs=marker.include_outputs,
                                       requested_by=f"{marker.requested_by} (finished by a sweep)",
                                       key_store=key_store, hooks=hooks, scope={"completes": marker.receipt_id})
            receipt.completed_from.append(redone.receipt_id)
            continue
        classes = list(ENCRYPTED_CLASSES) + (["outputs"] if marker.include_outputs else [])
        late: list[dict[str, Any]] = []
        for artifact in classes:
            removed, _ = purge_prefix(store, artifact, person.prefix)
            late.extend({**item.to_json(), "late_write": True} for item in removed)
        if key_store is not None and key_material_versions(store, key_object_key(person)):
            receipt.keys_destroyed.append({**_person_json(person), **key_store.destroy(person), "late_write": True})
        if late:
            receipt.objects.extend(late)
            receipt.persons.append(_person_json(person))
            touched.append((person, classes))
        if parse_time(marker.completed_at) + timedelta(seconds=late_write_audit_s) <= now:
            barrier.drop_audit_marker(store, marker)


def _expire_receipts(store: ArtifactStore, policy: RetentionPolicy, now: datetime, receipt: Receipt) -> None:
    cutoff = f"{now - timedelta(days=policy.receipts_days):%Y-%m-%d}"
    for folder in store.list_subprefixes("receipts", RECEIPTS_PREFIX):
        day = folder[len(RECEIPTS_PREFIX):].rstrip("/")
        if day[:4].isdigit() and day < cutoff:
            for key, version_id, is_marker, size in _versions(store, folder):
                store.remove_version("receipts", key, version_id=version_id)
                receipt.objects.append({"artifact": "receipts", "bucket": store.bucket("receipts"), "key": key,
                                        "version_id": version_id, "delete_marker": is_marker, "size": size,
                                        "sha256": None, "due": None, "deleted_at": utc_now_iso()})


def _versions(store: ArtifactStore, prefix: str):
    from storage.deletion import list_all_versions

    return list_all_versions(store, "receipts", prefix)


def overdue_objects(store: ArtifactStore, policy: RetentionPolicy, *, now: datetime | None = None
                    ) -> dict[str, int]:
    """Versions past due and still present, per artifact class (the privacy SLO: should be 0)."""
    now = now or datetime.now(timezone.utc)
    overdue = dict.fromkeys(EXPIRING_CLASSES, 0)
    for entry in due_entries(store, now):
        document = read_person_document(store, entry.person)
        if document is None:
            continue
        start = clock_start(document)
        if start is None:
            continue
        already = set((document.get("retention") or {}).get("deleted_classes", []))
        for artifact, due in policy.due_times(entry.tenant, start).items():
            if due <= now and artifact not in already:
                overdue[artifact] += count_versions(store, artifact, entry.person.prefix)
    return overdue


# --- early deletion on request ------------------------------------------------------------------


def resolve_persons(store: ArtifactStore, *, tenant: str, batch_id: str | None = None,
                    person_id: str | None = None) -> list[keys.PersonRef]:
    """The persons a deletion request names (validated ids; a batch or tenant expands to its persons)."""
    from storage.state import StateStore

    keys.validate_id(tenant, field="tenant")
    if person_id and not batch_id:
        raise ValueError("--person needs --batch: person ids are unique only within a batch")
    states = StateStore(store)
    batches = [batch_id] if batch_id else [b for _, b in states.list_batches(tenant)]
    persons = []
    for found_batch in batches:
        batch = states.load_batch(tenant, found_batch)
        for found_person in batch.person_ids:
            if person_id is None or found_person == person_id:
                persons.append(keys.PersonRef(tenant, found_batch, found_person))
    if person_id and not persons:
        raise ValueError(f"batch {batch_id!r} of tenant {tenant!r} has no person {person_id!r}")
    return persons


def delete_on_request(store: ArtifactStore, policy: RetentionPolicy, persons: list[keys.PersonRef], *,
                      include_outputs: bool, requested_by: str, key_store: KeyDestroyer | None = None,
                      hooks: DeletionHooks | None = None, scope: dict[str, Any] | None = None) -> Receipt:
    """Delete these persons' photos, derived data and models now (and headshots with ``include_outputs``)."""
    hooks = hooks or DeletionHooks()
    now = datetime.now(timezone.utc)
    receipt = Receipt(receipt_id=new_receipt_id("request"), kind="request", requested_by=requested_by,
                      policy=policy.to_json(), started_at=utc_now_iso(), as_of=format_time(now),
                      scope=dict(scope or {}, include_outputs=include_outputs))
    classes = list(ENCRYPTED_CLASSES) + (["outputs"] if include_outputs else [])
    # The barrier before anything else: from here on no write for these persons can succeed, on any
    # path, even in a process the stop below never reaches (storage/barrier.py).
    for person in persons:
        raised = barrier.raise_barrier(store, person, receipt_id=receipt.receipt_id, requested_by=requested_by,
                                       include_outputs=include_outputs)
        receipt.barriers.append({**_person_json(person), **raised})
    # Then stop what runs: after this returns no stage of these persons is still working.
    hooks.stop_persons(persons)
    intent_keys: list[str] = []
    documents = {}
    for person in persons:
        documents[person] = read_person_document(store, person)
        deleted = _delete_person(store, person, classes=classes, receipt=receipt, document=documents[person],
                                 due={a: format_time(now) for a in classes}, key_store=key_store, destroy_key=True,
                                 dry_run=False, intent_keys=intent_keys)
        receipt.objects.extend(deleted)
        receipt.persons.append(_person_json(person))
    _record_purges(receipt, hooks.purge_workers(persons))
    for person in persons:
        # Read again: writes that landed before the barrier are in the newest version, not the first read.
        document = read_person_document(store, person) or documents[person]
        if document is not None:
            updated = _record_retention(document, classes, receipt.receipt_id, now)
            kept, _ = replace_with_tombstone(store, person, updated, receipt_id=receipt.receipt_id, state="deleted",
                                             keep_outputs=not include_outputs)
            if not include_outputs:
                receipt.objects.extend(_purge_undelivered_outputs(store, person, kept))
    if include_outputs:
        # Batch contact sheets and manifests show the deleted persons too: rebuild them without.
        for tenant, batch_id in sorted({(p.tenant, p.batch_id) for p in persons}):
            purged, _ = purge_prefix(store, "outputs", f"{keys.batch_prefix(tenant, batch_id)}{keys.BATCH_PREFIX}/")
            receipt.objects.extend(item.to_json() for item in purged)
            hooks.repackage_batch(tenant, batch_id)
    # A write that had already landed when its writer saw the barrier may not be undone yet: purge
    # once more, so the verification below lists what is truly left.
    for person in persons:
        for artifact in classes:
            removed, _ = purge_prefix(store, artifact, person.prefix, recorded=recorded_index(
                (documents[person] or {}).get("objects", [])))
            receipt.objects.extend({**item.to_json(), "late_write": True} for item in removed)
    receipt.verification = _verify(store, [(p, classes) for p in persons])
    save_receipt(store, receipt)
    for person in persons:
        barrier.complete_audit_marker(store, person, receipt_id=receipt.receipt_id)
    remove_keys(store, "receipts", intent_keys)
    return receipt
