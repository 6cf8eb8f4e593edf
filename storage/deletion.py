"""Deleting for real in versioned buckets: every version, every delete marker, then proof.

Traps this module exists to avoid (measured, see docs/measured-facts.md): a DeleteObjects call without
version ids only adds delete markers and keeps all data; deleting while paging ListObjectVersions
skips versions. So: list everything under the prefix first, delete by (key, version id) in batches of
at most 1,000, then list again until nothing is left.

Every call goes through the store's outage retries: a listing is complete or an error (an outage
restarts it), a batch delete that is retried after a lost answer re-sends version ids that may be gone
already, which the store counts as removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from storage import keys
from storage.state import check_person_transition
from storage.store import REMOVE_BATCH, ArtifactStore, StoredObject, StoreError, utc_now_iso

DELETE_BATCH = REMOVE_BATCH
VERIFY_ROUNDS = 5


class DeletionIncomplete(StoreError):
    """Versions were still listed after every retry: the caller must not report success."""


@dataclass(frozen=True)
class DeletedVersion:
    """One version (or delete marker) removed, with the checksum recorded when it was written."""

    artifact: str
    bucket: str
    key: str
    version_id: str | None
    delete_marker: bool
    size: int
    sha256: str | None  # None: the version was never recorded in state (e.g. a crashed write)
    due: str | None
    deleted_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recorded_index(objects: Iterable[StoredObject | Mapping[str, Any]]) -> dict[tuple[str, str, str | None], dict]:
    """(bucket, key, version id) → the write record, from a person's state."""
    index = {}
    for item in objects:
        record = item.to_json() if isinstance(item, StoredObject) else dict(item)
        index[(record["bucket"], record["key"], record.get("version_id"))] = record
    return index


def list_all_versions(store: ArtifactStore, artifact: str, prefix: str) -> list[tuple[str, str | None, bool, int]]:
    """(key, version id, is delete marker, size) of everything under ``prefix``, fully listed before use."""
    return store.list_all_versions(artifact, prefix)


def purge_prefix(store: ArtifactStore, artifact: str, prefix: str, *,
                 recorded: Mapping[tuple[str, str, str | None], Mapping[str, Any]] | None = None,
                 due: str | None = None, dry_run: bool = False, exclude: frozenset[str] = frozenset(),
                 listed: list[tuple[str, str | None, bool, int]] | None = None) -> tuple[list[DeletedVersion], int]:
    """Delete every version and delete marker under ``prefix`` in one artifact bucket.

    Args:
        prefix: must end with '/' and start with a tenant id (refuses to purge a whole bucket).
        recorded: write records (see :func:`recorded_index`) that give each version's sha256.
        due: when these versions fell due (for the receipt).
        dry_run: list what would go, delete nothing.
        exclude: keys to leave alone (e.g. the tombstone being kept).
        listed: a complete listing the caller just made (saves the first listing round).

    Returns:
        (what was deleted, versions still listed afterwards — 0 unless dry_run).

    Raises:
        DeletionIncomplete: versions remained after repeated delete-and-list rounds.
    """
    if not prefix.endswith("/") or not keys.ID_PATTERN.fullmatch(prefix.split("/", 1)[0]):
        raise ValueError(f"refusing to purge prefix {prefix!r}: it must be '<tenant>/...' ending with '/'")
    bucket = store.bucket(artifact)
    recorded = recorded or {}
    deleted: list[DeletedVersion] = []
    for round_number in range(VERIFY_ROUNDS):
        if round_number == 0 and listed is not None:
            versions = [v for v in listed if v[0] not in exclude]
        else:
            # After deleting, this listing is the verification: the loop ends only when it is empty.
            versions = [v for v in list_all_versions(store, artifact, prefix) if v[0] not in exclude]
        if not versions:
            return deleted, 0
        if dry_run:
            return [_deleted(artifact, bucket, v, recorded, due, deleted_at="") for v in versions], len(versions)
        for start in range(0, len(versions), DELETE_BATCH):
            chunk = versions[start:start + DELETE_BATCH]
            failures = store.remove_versions(artifact, [(key, version_id) for key, version_id, _, _ in chunk])
            failed = {(failure.key, failure.version_id) for failure in failures}
            now = utc_now_iso()
            deleted.extend(_deleted(artifact, bucket, v, recorded, due, deleted_at=now)
                           for v in chunk if (v[0], v[1]) not in failed)
    remaining = len([v for v in list_all_versions(store, artifact, prefix) if v[0] not in exclude])
    if remaining:
        raise DeletionIncomplete(f"{remaining} version(s) still listed after {VERIFY_ROUNDS} delete rounds",
                                 bucket=bucket, key=prefix)
    return deleted, 0


def _deleted(artifact: str, bucket: str, version: tuple[str, str | None, bool, int],
             recorded: Mapping[tuple[str, str, str | None], Mapping[str, Any]], due: str | None,
             *, deleted_at: str) -> DeletedVersion:
    key, version_id, is_marker, size = version
    record = recorded.get((bucket, key, version_id))
    return DeletedVersion(artifact=artifact, bucket=bucket, key=key, version_id=version_id, delete_marker=is_marker,
                          size=int(record["size"]) if record else size,
                          sha256=record["sha256"] if record else None, due=due, deleted_at=deleted_at)


def count_versions(store: ArtifactStore, artifact: str, prefix: str) -> int:
    return len(list_all_versions(store, artifact, prefix))


# --- state documents ------------------------------------------------------------------------------

PERSONAL_FIELDS = ("name", "email")


def tombstone(document: Mapping[str, Any], *, receipt_id: str, state: str | None = None,
              keep_outputs: bool = True) -> dict[str, Any]:
    """A person state with everything personal removed: ids, times, receipt ids, and (if kept) the
    headshot records so outputs stay downloadable."""
    stripped = {key: value for key, value in document.items() if key not in PERSONAL_FIELDS}
    stripped["name"] = None
    stripped["email"] = None
    stripped["photos"] = [{"index": p.get("index"), "accepted": p.get("accepted"), "reason": p.get("reason")}
                          for p in document.get("photos", [])]
    consent = document.get("consent")
    if consent:
        stripped["consent"] = {k: v for k, v in consent.items() if k not in ("given_by", "collected_by")}
    if not keep_outputs:
        stripped["headshots"] = []
    stripped["error"] = None if state == "deleted" else document.get("error")
    if state:
        stripped["state"] = state
        stripped["stage"] = None
    stripped["receipt_ids"] = list(document.get("receipt_ids", [])) + [receipt_id]
    stripped["tombstoned_at"] = utc_now_iso()
    return stripped


def replace_with_tombstone(store: ArtifactStore, person: keys.PersonRef, document: Mapping[str, Any], *,
                           receipt_id: str, state: str | None = None, keep_outputs: bool = True
                           ) -> tuple[dict[str, Any], list[DeletedVersion]]:
    """Write the tombstone, then delete every older version of the state document (they hold names).

    Raises:
        storage.state.ForbiddenTransition: the person's state machine allows no move from the
            document's state to ``state`` (nothing is written).
    """
    state_key = keys.person_state_key(person)
    new_document = tombstone(document, receipt_id=receipt_id, state=state, keep_outputs=keep_outputs)
    # Written past StateStore (unconditionally: the deletion wins every race), so checked here.
    check_person_transition(f"person {person.prefix.rstrip('/')}", document.get("state"), new_document["state"])
    written = store.put_json("state", state_key, new_document)
    bucket = store.bucket("state")
    deleted = []
    for _ in range(VERIFY_ROUNDS):
        # Listed again after each round: an older version left behind still holds the person's name.
        older = [v for v in list_all_versions(store, "state", state_key)
                 if v[0] == state_key and v[1] != written.version_id]
        if not older:
            return new_document, deleted
        now = utc_now_iso()
        for start in range(0, len(older), DELETE_BATCH):
            chunk = older[start:start + DELETE_BATCH]
            failed = {(f.key, f.version_id) for f in store.remove_versions("state", [(k, v) for k, v, _, _ in chunk])}
            deleted.extend(_deleted("state", bucket, v, {}, None, deleted_at=now) for v in chunk
                           if (v[0], v[1]) not in failed)
    raise DeletionIncomplete(f"older versions of the state document (they hold names) were still listed after "
                             f"{VERIFY_ROUNDS} rounds; run the deletion again", bucket=bucket, key=state_key)
