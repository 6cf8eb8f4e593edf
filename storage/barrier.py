"""The deletion barrier: once a person's deletion starts, nothing can be written for them, on any path.

S3 has no transactions, so "stop every writer, then delete" cannot be made atomic. Instead every
deletion first writes a *barrier* object for the person, and every writer of that person's data
checks for it *after* its own write:

    writer:   put(object)      then  exists(barrier)?  yes → remove the version it wrote, refuse
    deletion: put(barrier)     then  list + delete every version under the person's prefixes

Single-object reads and listings are strongly consistent (MinIO, SeaweedFS, AWS S3), so one of the
two always sees the other: if the writer's check found no barrier, its write landed before the
barrier and so before the deletion's listing, which deletes it; if the check found the barrier, the
writer removes its own version. A writer that dies between its write and its check leaves a version
behind: the barrier's *audit marker* makes every retention sweep list the person's prefixes again
for ``retention.late_write_audit_s`` after the deletion and remove what it finds (with a receipt).

Keys (state bucket; ids and times only, never names):
    _system/deletions/<tenant>/<batch>/<person>.json         the barrier (create-only, kept for good)
    _system/deletion-audits/<tenant>/<batch>/<person>.json   the audit marker (removed after the window)

The person's data key gets its own barrier in :mod:`storage.crypto`: a destroyed key is replaced by a
tombstone version that create-only key creation can never get past.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

from storage.keys import SYSTEM_PREFIX, PersonRef
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, StoredObject, StoreError, utc_now_iso

logger = logging.getLogger(__name__)

BARRIER_ARTIFACT = "state"
BARRIERS_PREFIX = f"{SYSTEM_PREFIX}/deletions/"
AUDITS_PREFIX = f"{SYSTEM_PREFIX}/deletion-audits/"
BARRIER_FORMAT = "headshots-deletion-barrier/1"


class PersonRevoked(PermissionError):
    """A write for a person whose deletion has started."""


class PersonDeleted(PersonRevoked):
    """A write (or a stage) for a person whose deletion has started; what was written was removed."""

    def __init__(self, person: PersonRef, what: str = ""):
        detail = f" ({what} refused)" if what else ""
        super().__init__(
            f"person {person.prefix} has been deleted (or is being deleted): nothing more can be stored for "
            f"them{detail}; their ids cannot be used again, so add the person to a new batch instead")
        self.person = person
        self.what = what

    def __reduce__(self):
        # Rebuilt from its own arguments, not the message: it crosses Ray from a GPU worker to the
        # coordinator, which must recognise it (a worker that refused a deleted person's stage).
        return type(self), (self.person, self.what)


def barrier_key(person: PersonRef) -> str:
    return f"{BARRIERS_PREFIX}{person.tenant}/{person.batch_id}/{person.person_id}.json"


def audit_key(person: PersonRef) -> str:
    return f"{AUDITS_PREFIX}{person.tenant}/{person.batch_id}/{person.person_id}.json"


@dataclass(frozen=True)
class AuditMarker:
    """A deleted person whose prefixes sweeps keep re-checking for late writes."""

    key: str
    person: PersonRef
    receipt_id: str
    requested_by: str
    include_outputs: bool
    started_at: str
    completed_at: str | None  # None: the deletion that raised the barrier has not finished (or died)

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any]) -> "AuditMarker":
        return cls(key=key, person=PersonRef(data["tenant"], data["batch_id"], data["person_id"]),
                   receipt_id=data["receipt_id"], requested_by=data.get("requested_by", "unknown"),
                   include_outputs=bool(data.get("include_outputs")), started_at=data["started_at"],
                   completed_at=data.get("completed_at"))

    def to_json(self) -> dict[str, Any]:
        return {"format": BARRIER_FORMAT, "tenant": self.person.tenant, "batch_id": self.person.batch_id,
                "person_id": self.person.person_id, "receipt_id": self.receipt_id, "requested_by": self.requested_by,
                "include_outputs": self.include_outputs, "started_at": self.started_at,
                "completed_at": self.completed_at}


def raise_barrier(store: ArtifactStore, person: PersonRef, *, receipt_id: str, requested_by: str,
                  include_outputs: bool) -> dict[str, Any]:
    """Start a person's deletion: from the moment this returns, every write for them is refused.

    Idempotent: a barrier already raised (a repeated request) is kept as it was.

    Returns:
        ``{"key", "raised_at"}`` of the barrier, for the receipt.
    """
    key = barrier_key(person)
    document = {"format": BARRIER_FORMAT, "tenant": person.tenant, "batch_id": person.batch_id,
                "person_id": person.person_id, "receipt_id": receipt_id, "raised_at": utc_now_iso()}
    # The audit marker first: a crash right after the barrier must still leave the sweep a trace.
    marker = AuditMarker(key=audit_key(person), person=person, receipt_id=receipt_id, requested_by=requested_by,
                         include_outputs=include_outputs, started_at=document["raised_at"], completed_at=None)
    store.put_json(BARRIER_ARTIFACT, marker.key, marker.to_json())
    try:
        store.put_json(BARRIER_ARTIFACT, key, document, if_absent=True)
    except ObjectExists:
        try:
            document = store.get_json(BARRIER_ARTIFACT, key)
        except ObjectNotFound:  # pragma: no cover - barriers are never removed
            pass
    return {"key": key, "raised_at": document.get("raised_at")}


def is_deleted(store: ArtifactStore, person: PersonRef) -> bool:
    """Has the person's deletion started? A store failure raises; it is never read as "not deleted"."""
    return store.exists(BARRIER_ARTIFACT, barrier_key(person))


def refuse_if_deleted(store: ArtifactStore, person: PersonRef, what: str = "") -> None:
    """Raises:
        PersonDeleted: the person's barrier is up.
    """
    if is_deleted(store, person):
        raise PersonDeleted(person, what)


def confirm_write(store: ArtifactStore, person: PersonRef, artifact: str, written: StoredObject) -> StoredObject:
    """The check every writer makes *after* its write: if the barrier is up, remove what was written.

    Raises:
        PersonDeleted: the person's deletion had started; the version written was removed (or, if even
            that failed, is left for the sweep's late-write audit to remove).
    """
    if not is_deleted(store, person):
        return written
    try:
        store.remove_version(artifact, written.key, version_id=written.version_id or "null")
    except StoreError as error:
        logger.warning("a late write for deleted person %s could not be undone (%s); the next sweep's "
                       "late-write audit removes it", person.prefix, type(error).__name__)
    raise PersonDeleted(person, f"{artifact}:{written.key}")


def audit_markers(store: ArtifactStore) -> Iterator[AuditMarker]:
    """Every person whose deletion is still watched for late writes (or was never finished)."""
    for key in store.list_keys(BARRIER_ARTIFACT, AUDITS_PREFIX):
        try:
            yield AuditMarker.from_json(key, store.get_json(BARRIER_ARTIFACT, key))
        except ObjectNotFound:
            continue  # removed by a concurrent sweep


def complete_audit_marker(store: ArtifactStore, person: PersonRef, *, receipt_id: str) -> None:
    """The deletion finished with this receipt: from now on, sweeps only audit for late writes."""
    key = audit_key(person)
    try:
        data = store.get_json(BARRIER_ARTIFACT, key)
    except ObjectNotFound:
        return
    marker = AuditMarker.from_json(key, data)
    store.put_json(BARRIER_ARTIFACT, key, {**marker.to_json(), "receipt_id": receipt_id,
                                           "completed_at": utc_now_iso()})


def drop_audit_marker(store: ArtifactStore, marker: AuditMarker) -> None:
    """The late-write window has passed: stop auditing (every version of the marker is removed)."""
    for found, version_id, _ in store.list_versions(BARRIER_ARTIFACT, marker.key):
        if found == marker.key:
            store.remove_version(BARRIER_ARTIFACT, found, version_id=version_id or "null")
