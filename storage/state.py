"""Batch and person state documents, kept in the ``state`` bucket.

The store is the source of truth: a coordinator that restarts reads these back and carries on. Names
and emails live here and only here (never in keys, logs or metrics).

Compare-and-swap: a document loaded from the store remembers the ETag it was read at (``etag``, never
written into the document). Saving it sends ``If-Match`` with that ETag, so when two writers loaded the
same version only the first save lands; the second gets :class:`StateConflict` and must reload and
apply its change again. A document with no ETag (made in memory, or a copy) is written unconditionally.

A person's deletion barrier (:mod:`storage.barrier`) wins over every save: a person save checks it
after writing and raises :class:`storage.barrier.PersonDeleted` (the deletion's tombstone replaces
whatever landed); an unconditional save, which could overwrite a tombstone, checks before writing too.

The states and the moves between them are defined here and nowhere else (:class:`PersonStatus`,
:class:`BatchStatus`, :data:`PERSON_TRANSITIONS`, :data:`BATCH_TRANSITIONS`). Every save checks its move
from the state the copy was loaded or last saved with (``stored_state``, remembered like ``etag``) and
refuses one the table does not allow with :class:`ForbiddenTransition`, before anything is written; a
new document may start only in an initial state. The deletion's tombstone, written past this class
(:func:`storage.deletion.replace_with_tombstone`), is checked against the same table.
"""

from __future__ import annotations

import enum
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from storage import barrier, keys
from storage.store import (ArtifactStore, ObjectExists, ObjectNotFound, StoreError, StoredObject, WriteConflict,
                           utc_now_iso)

logger = logging.getLogger(__name__)

class PersonStatus(enum.StrEnum):
    """A person's state. The values are what state documents store (and JSON shows)."""

    QUEUED = "queued"
    INGESTING = "ingesting"
    TRAINING = "training"
    GENERATING = "generating"
    PACKAGING = "packaging"
    DONE = "done"
    NEEDS_PHOTOS = "needs_photos"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DELETED = "deleted"


class BatchStatus(enum.StrEnum):
    """A batch's state. The values are what state documents store (and JSON shows)."""

    # Made over the HTTP API, waiting for its photos and an explicit start (the coordinator resumes
    # only running batches, so a restart never starts one early).
    CREATED = "created"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    DELETED = "deleted"


_P, _B = PersonStatus, BatchStatus
PERSON_STATES = tuple(PersonStatus)
FINAL_PERSON_STATES = frozenset({_P.DONE, _P.NEEDS_PHOTOS, _P.FAILED, _P.CANCELLED, _P.DELETED})
# Final states a retry runs again from the start (photos can be added to persons in them, then retried).
RETRYABLE_PERSON_STATES = (_P.NEEDS_PHOTOS, _P.FAILED, _P.CANCELLED)
BATCH_STATES = tuple(BatchStatus)
# What counts against a tenant's limit of concurrent batches; kept in the open-batch index (save_batch).
OPEN_BATCH_STATES = frozenset({_B.CREATED, _B.RUNNING})
STAGES = ("ingest", "train", "generate", "package")
STAGE_OF_STATE = {_P.INGESTING: "ingest", _P.TRAINING: "train", _P.GENERATING: "generate", _P.PACKAGING: "package"}

# The states a new document may be written in: a person is submitted queued (photos to be ingested, or
# to come over the API), or needs_photos (submitted with too few usable ones); a batch is created (API)
# or running (CLI submit).
INITIAL_PERSON_STATES = frozenset({_P.QUEUED, _P.NEEDS_PHOTOS})
INITIAL_BATCH_STATES = frozenset({_B.CREATED, _B.RUNNING})


def _with_stay_and_deletion(moves: Mapping[Any, set], deleted: Any) -> dict[Any, frozenset]:
    """Every state may also be saved again as it is (objects recorded, photos added, a coordinator that
    restarted resumes the stage it had reached) and may be deleted; deleted is the end."""
    table = {state: frozenset(targets | {state, deleted}) for state, targets in moves.items()}
    table[deleted] = frozenset({deleted})
    return table


# The moves each writer makes, besides staying and being deleted.
PERSON_TRANSITIONS: Mapping[PersonStatus, frozenset[PersonStatus]] = _with_stay_and_deletion({
    # The coordinator starts ingest; a start with too few photos waits for more; cancel.
    _P.QUEUED: {_P.INGESTING, _P.NEEDS_PHOTOS, _P.CANCELLED},
    # Each stage leads to the next, or fails (attempts or worker losses used up), or is cancelled;
    # ingest finds too few usable photos.
    _P.INGESTING: {_P.TRAINING, _P.NEEDS_PHOTOS, _P.FAILED, _P.CANCELLED},
    _P.TRAINING: {_P.GENERATING, _P.FAILED, _P.CANCELLED},
    _P.GENERATING: {_P.PACKAGING, _P.FAILED, _P.CANCELLED},
    _P.PACKAGING: {_P.DONE, _P.FAILED, _P.CANCELLED},
    # `headshots more`: generate again from the stored LoRA.
    _P.DONE: {_P.GENERATING},
    # `headshots retry`: from the start.
    **{state: {_P.QUEUED} for state in RETRYABLE_PERSON_STATES},
    _P.DELETED: set(),
}, _P.DELETED)

BATCH_TRANSITIONS: Mapping[BatchStatus, frozenset[BatchStatus]] = _with_stay_and_deletion({
    # Started (begin_batch), or cancelled before it started.
    _B.CREATED: {_B.RUNNING, _B.CANCELLED},
    # The coordinator finishes it, or an operator cancels it.
    _B.RUNNING: {_B.DONE, _B.CANCELLED},
    # A person retried or given more headshots after the batch's run ended runs the batch again.
    _B.DONE: {_B.RUNNING},
    _B.CANCELLED: {_B.RUNNING},
    _B.DELETED: set(),
}, _B.DELETED)


class ForbiddenTransition(ValueError):
    """A save would move a person or batch along a transition the state machine does not allow.

    Attributes:
        what: which document ("person t/b/p", "batch t/b"; ids only, never a name).
        from_state: the state the copy was loaded or last saved with (None: a new document).
        to_state: the state it was to be saved with.
        allowed: the states it may be saved with.
    """

    def __init__(self, what: str, from_state: str | None, to_state: str, allowed: Iterable[str]):
        self.what, self.from_state, self.to_state = what, from_state, to_state
        self.allowed = tuple(allowed)
        if from_state is None:
            message = (f"{what} is a new document and may start only in {', '.join(self.allowed)}, "
                       f"but its state is {to_state}")
        else:
            message = (f"{what} cannot go from {from_state} to {to_state}; from {from_state} it may be saved "
                       f"as {', '.join(self.allowed)}")
        super().__init__(message)


def _check(what: str, status: type[enum.StrEnum], table: Mapping[Any, frozenset], initial: frozenset,
           from_state: str | None, to_state: str) -> enum.StrEnum:
    to_status = _parse(status, to_state, what)
    if from_state is None:
        allowed = initial
    else:
        allowed = table[_parse(status, from_state, what)]
    if to_status not in allowed:
        # Listed in the enum's order, so the message reads the same every time.
        raise ForbiddenTransition(what, from_state and str(from_state), str(to_status),
                                  [str(state) for state in status if state in allowed])
    return to_status


def _parse(status: type[enum.StrEnum], value: Any, what: str) -> enum.StrEnum:
    try:
        return status(value)
    except ValueError:
        raise ValueError(f"state of {what} must be one of {', '.join(status)} but is {value!r}") from None


def check_person_transition(what: str, from_state: str | None, to_state: str) -> PersonStatus:
    """The person state ``to_state``, if a copy loaded (or last saved) in ``from_state`` may be saved in it.

    Args:
        what: the document, for the error ("person t/b/p").
        from_state: None for a new document (it may start only in :data:`INITIAL_PERSON_STATES`).

    Raises:
        ForbiddenTransition: :data:`PERSON_TRANSITIONS` does not allow the move.
        ValueError: a state is not a person state.
    """
    return _check(what, PersonStatus, PERSON_TRANSITIONS, INITIAL_PERSON_STATES, from_state, to_state)


def check_batch_transition(what: str, from_state: str | None, to_state: str) -> BatchStatus:
    """As :func:`check_person_transition`, for batch states (:data:`BATCH_TRANSITIONS`)."""
    return _check(what, BatchStatus, BATCH_TRANSITIONS, INITIAL_BATCH_STATES, from_state, to_state)


SCHEMA_VERSION = 1
# What a loaded copy remembers about the version it came from; never written into the document.
IN_MEMORY_FIELDS = ("etag", "stored_state")


class StateConflict(WriteConflict):
    """A state document changed in the store since this copy was loaded (or, on create, already
    existed): another writer won. Reload it, apply the change again, and save."""


@dataclass
class PhotoRecord:
    """One submitted photo and the verdict on it."""

    index: int
    source: str  # the file name as submitted (state only)
    accepted: bool
    reason: str | None = None
    message: str | None = None
    key: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PhotoRecord":
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})


@dataclass
class HeadshotRecord:
    style: str
    index: int
    seed: int
    key: str
    prompt: str
    negative_prompt: str
    seconds: float
    # The output check: {status: pass|fail|not_applicable, identity_distance, sharpness, ...}.
    quality: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "HeadshotRecord":
        values = {name: data.get(name) for name in cls.__dataclass_fields__ if name in data}
        values["quality"] = dict(data.get("quality") or {})
        return cls(**values)


@dataclass
class PersonState:
    tenant: str
    batch_id: str
    person_id: str
    name: str | None  # None once the state is a tombstone
    email: str | None = None
    state: PersonStatus = PersonStatus.QUEUED
    stage: str | None = None
    error: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    photos: list[PhotoRecord] = field(default_factory=list)
    objects: list[StoredObject] = field(default_factory=list)
    headshots: list[HeadshotRecord] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    train_steps_done: int = 0
    # Delivered with a caveat, e.g. the identity budget ran out before enough candidates passed.
    flags: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=utc_now_iso)
    updated_at: str = field(default_factory=utc_now_iso)
    # When the person reached a final state: the retention clock starts here, never from object times.
    processed_at: str | None = None
    # A person waiting for photos expires counting from its last upload.
    last_upload_at: str | None = None
    # Who consented, when, to which policy version and purpose (photos are accepted only with one).
    consent: dict[str, Any] | None = None
    # What retention has already deleted (classes, times), and the receipts that prove it.
    retention: dict[str, Any] = field(default_factory=dict)
    receipt_ids: list[str] = field(default_factory=list)
    tombstoned_at: str | None = None
    # Headshots per style beyond the batch's images_per_style, asked for with `headshots more`.
    extra_images: dict[str, int] = field(default_factory=dict)
    # The ETag this copy was loaded or last saved at (compare-and-swap); not part of the document.
    etag: str | None = field(default=None, compare=False, repr=False)
    # The state it was loaded or last saved with: a save is checked as a move from it (None: new).
    stored_state: PersonStatus | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.state not in PERSON_STATES:
            raise ValueError(f"state must be one of {', '.join(PERSON_STATES)} but is {self.state!r}")
        self.state = PersonStatus(self.state)

    @property
    def ref(self) -> keys.PersonRef:
        return keys.PersonRef(self.tenant, self.batch_id, self.person_id)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_PERSON_STATES

    @property
    def photos_accepted(self) -> int:
        return sum(1 for photo in self.photos if photo.accepted)

    def record_object(self, stored: StoredObject) -> None:
        """Remember every version written (a rewrite of the same key adds a version, not a replacement)."""
        self.objects.append(stored)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        for name in IN_MEMORY_FIELDS:
            del document[name]
        document["schema_version"] = SCHEMA_VERSION
        document["objects"] = [item.to_json() for item in self.objects]
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PersonState":
        """The document as a state; ``etag`` and ``stored_state`` stay None (the store's loaders set them)."""
        values = {name: data.get(name) for name in cls.__dataclass_fields__
                  if name in data and name not in IN_MEMORY_FIELDS}
        values["photos"] = [PhotoRecord.from_json(p) for p in data.get("photos", [])]
        values["objects"] = [StoredObject.from_json(o) for o in data.get("objects", [])]
        values["headshots"] = [HeadshotRecord.from_json(h) for h in data.get("headshots", [])]
        values["attempts"] = dict(data.get("attempts") or {})
        values["retention"] = dict(data.get("retention") or {})
        values["receipt_ids"] = list(data.get("receipt_ids") or [])
        values["flags"] = list(data.get("flags") or [])
        values["timings_s"] = dict(data.get("timings_s") or {})
        values["extra_images"] = dict(data.get("extra_images") or {})
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """What `status --json` shows: ids and progress, no names."""
        return {"person_id": self.person_id, "state": self.state, "stage": self.stage,
                "headshots": len(self.headshots), "photos_accepted": self.photos_accepted,
                "error": self.error, "flags": list(self.flags),
                "photos_rejected": [{"index": p.index, "file": p.source, "reason": p.reason, "message": p.message}
                                    for p in self.photos if not p.accepted]}


@dataclass
class BatchState:
    tenant: str
    batch_id: str
    name: str
    base_model: str
    styles: list[str]
    images_per_style: int
    person_ids: list[str]
    state: BatchStatus = BatchStatus.RUNNING
    created_at: str = field(default_factory=utc_now_iso)
    updated_at: str = field(default_factory=utc_now_iso)
    finished_at: str | None = None
    # Within a tenant, higher-priority batches get the GPUs first (from the manifest's `priority`).
    priority: int = 0
    # Where the batch's events are delivered: [{url, events}] (validated at submit; cluster/webhooks.py).
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    # The ETag this copy was loaded or last saved at (compare-and-swap); not part of the document.
    etag: str | None = field(default=None, compare=False, repr=False)
    # The state it was loaded or last saved with: a save is checked as a move from it (None: new).
    stored_state: BatchStatus | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.state not in BATCH_STATES:
            raise ValueError(f"batch state must be one of {', '.join(BATCH_STATES)} but is {self.state!r}")
        self.state = BatchStatus(self.state)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        for name in IN_MEMORY_FIELDS:
            del document[name]
        document["schema_version"] = SCHEMA_VERSION
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BatchState":
        """The document as a state; ``etag`` and ``stored_state`` stay None (the store's loaders set them)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__
                      if name in data and name not in IN_MEMORY_FIELDS})


class StateStore:
    """Reads and writes state documents. Only the coordinator writes person state while a batch runs.

    Saves are compare-and-swap when the document carries an ETag (see the module docstring).
    """

    def __init__(self, store: ArtifactStore):
        self.store = store

    def save_batch(self, batch: BatchState, *, if_absent: bool = False) -> StoredObject:
        """Write the batch document (If-Match ``batch.etag`` when set) and its index marker.

        Args:
            if_absent: create only; fails if the batch document already exists.

        Returns:
            The version written; ``batch.etag`` is updated to its ETag.

        Raises:
            ForbiddenTransition: :data:`BATCH_TRANSITIONS` allows no move from the state ``batch`` was
                loaded with to its state now; nothing is written.
            StateConflict: the document changed since ``batch`` was loaded (or exists, with ``if_absent``).
        """
        key = keys.batch_state_key(batch.tenant, batch.batch_id)
        what = f"batch {batch.tenant}/{batch.batch_id}"
        batch.state = check_batch_transition(what, self._stored_state(key, batch, what), batch.state)
        batch.updated_at = utc_now_iso()
        is_open = batch.state in OPEN_BATCH_STATES
        if is_open:
            # Marked before the document is written: a crash in between leaves a marker of a batch that
            # is not open (not counted, see count_open_batches), never an open batch without a marker.
            self._mark_open(batch.tenant, batch.batch_id)
        stored = self._save(key, batch.to_json(), etag=batch.etag, if_absent=if_absent, what=what)
        batch.etag, batch.stored_state = stored.etag, batch.state
        # An index marker per batch: listing batches never walks per-person objects.
        index_key = keys.batch_index_key(batch.tenant, batch.batch_id)
        if not self.store.exists("state", index_key):
            self.store.put("state", index_key, b"", content_type="text/plain")
        if is_open:
            # Again after the write: a count that saw the old, final state may have dropped the marker.
            self._mark_open(batch.tenant, batch.batch_id)
        else:
            self.drop_open_marker(batch.tenant, batch.batch_id)
        return stored

    def create_batch(self, batch: BatchState) -> StoredObject:
        """Write a new batch document; StateConflict if one already exists."""
        return self.save_batch(batch, if_absent=True)

    def load_batch(self, tenant: str, batch_id: str) -> BatchState:
        document, etag = self._load(keys.batch_state_key(tenant, batch_id))
        batch = BatchState.from_json(document)
        batch.etag, batch.stored_state = etag, batch.state
        return batch

    def save_person(self, person: PersonState, *, if_absent: bool = False) -> StoredObject:
        """Write the person document, If-Match ``person.etag`` when it is set (else unconditionally).

        Args:
            if_absent: create only; fails if the person document already exists.

        Returns:
            The version written; ``person.etag`` is updated to its ETag.

        Raises:
            ForbiddenTransition: :data:`PERSON_TRANSITIONS` allows no move from the state ``person`` was
                loaded or last saved with to its state now; nothing is written.
            StateConflict: the document changed since ``person`` was loaded or last saved (or exists,
                with ``if_absent``); ``person.etag`` is left as it was.
            storage.barrier.PersonDeleted: the person's deletion has started; their state belongs to
                the deletion, and the caller must stop working on them.
        """
        ref = person.ref
        key = keys.person_state_key(ref)
        what = f"person {ref.prefix.rstrip('/')}"
        person.state = check_person_transition(what, self._stored_state(key, person, what), person.state)
        if person.etag is None and not if_absent:
            barrier.refuse_if_deleted(self.store, ref, "state")
        person.updated_at = utc_now_iso()
        stored = self._save(key, person.to_json(), etag=person.etag, if_absent=if_absent, what=what)
        person.etag, person.stored_state = stored.etag, person.state
        barrier.refuse_if_deleted(self.store, ref, "state")
        return stored

    def create_person(self, person: PersonState) -> StoredObject:
        """Write a new person document; StateConflict if one already exists."""
        return self.save_person(person, if_absent=True)

    def load_person(self, tenant: str, batch_id: str, person_id: str) -> PersonState:
        document, etag = self._load(keys.person_state_key(keys.PersonRef(tenant, batch_id, person_id)))
        person = PersonState.from_json(document)
        person.etag, person.stored_state = etag, person.state
        return person

    def load_persons(self, batch: BatchState, *, threads: int = 8) -> list[PersonState]:
        def load(person_id: str) -> PersonState:
            return self.load_person(batch.tenant, batch.batch_id, person_id)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(load, batch.person_ids))

    def _stored_state(self, key: str, document: "PersonState | BatchState", what: str) -> str | None:
        """The state a save of ``document`` moves from: the one it was loaded or last saved with; for a
        copy that carries only the ETag (``from_json`` of a loaded one), the stored version's at that
        ETag (read once). None: a new document.

        Raises:
            StateConflict: the stored version is no longer the copy's (its If-Match would fail too).
        """
        if document.stored_state is not None or document.etag is None:
            return document.stored_state
        stored, etag = self._load(key)
        if etag.strip('"') != document.etag.strip('"'):
            raise StateConflict(f"state of {what} was changed by another writer since it was loaded: reload it "
                                "and apply the change again", bucket=self.store.bucket("state"), key=key)
        return stored.get("state")

    def _load(self, key: str) -> tuple[Any, str]:
        data, etag = self.store.get_with_etag("state", key)
        return json.loads(data), etag

    def _save(self, key: str, document: Mapping[str, Any], *, etag: str | None, if_absent: bool,
              what: str) -> StoredObject:
        if if_absent and etag is not None:
            raise ValueError(f"{what} was loaded from the store (it has an etag); save it without if_absent")
        try:
            return self.store.put_json("state", key, document, if_match=etag, if_absent=if_absent)
        except WriteConflict as error:
            change = "already exists" if if_absent else "was changed by another writer since it was loaded"
            raise StateConflict(f"state of {what} {change}: reload it and apply the change again",
                                bucket=error.bucket, key=error.key, request_id=error.request_id,
                                code=error.code) from None

    def count_open_batches(self, tenant: str, *, trust_below: int | None = None, threads: int = 8) -> int:
        """The tenant's open (created or running) batches, from the open-batch index.

        Every open batch has a marker (save_batch writes it before the document); a marker can outlive
        its batch's last open state (a crash, or a writer not allowed to delete it), so markers are
        checked against the batch documents, and those of final batches are dropped.

        Args:
            trust_below: when there are fewer markers than this, return their number unchecked (one
                listing): a caller that compares with a limit needs no more. Default: always check.
            threads: batch documents read at once while checking.

        Returns:
            The number of open batches (with ``trust_below``, an upper bound when under it).
        """
        prefix = keys.open_batch_prefix(tenant)
        batch_ids = [key[len(prefix):] for key in self.store.list_keys("state", prefix)]
        if trust_below is not None and len(batch_ids) < trust_below:
            return len(batch_ids)

        def still_open(batch_id: str) -> bool:
            try:
                state = self.load_batch(tenant, batch_id).state
            except ObjectNotFound:
                # Being created this moment, or a crash before its document was written: not open. Left
                # in place, since the two cannot be told apart here.
                return False
            if state in OPEN_BATCH_STATES:
                return True
            self.drop_open_marker(tenant, batch_id)
            return False

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return sum(pool.map(still_open, batch_ids))

    def drop_open_marker(self, tenant: str, batch_id: str) -> None:
        """Remove a batch's open-batch marker (every version: nothing is left in the versioned bucket).

        Best effort: an identity that may not delete it (see README, HTTP API) leaves it, and the count
        skips it. If the batch became open again meanwhile, the marker is put back.
        """
        key = keys.open_batch_key(tenant, batch_id)
        try:
            if not self.store.exists("state", key):
                return
            for found, version_id, _ in self.store.list_versions("state", key):
                if found == key:
                    self.store.remove_version("state", key, version_id=version_id)
        except StoreError as error:
            logger.warning("open-batch marker of %s/%s left in place (%s); counts check it against the batch",
                           tenant, batch_id, error)
            return
        try:
            reopened = self.load_batch(tenant, batch_id).state in OPEN_BATCH_STATES
        except ObjectNotFound:
            return
        if reopened:  # a concurrent save made it open between its own marking and our removal
            self._mark_open(tenant, batch_id)

    def _mark_open(self, tenant: str, batch_id: str) -> None:
        try:  # create-only: one version per marker, however many writers mark it
            self.store.put("state", keys.open_batch_key(tenant, batch_id), b"", content_type="text/plain",
                           if_absent=True)
        except ObjectExists:
            pass

    def list_batches(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """(tenant, batch_id) of every batch, optionally of one tenant."""
        prefix = keys.batch_index_prefix(tenant)
        found = []
        for key in self.store.list_keys("state", prefix):
            parts = key[len(keys.batch_index_prefix()):].split("/")
            if len(parts) == 2:
                found.append((parts[0], parts[1]))
        return sorted(found)

    def find_batch(self, batch_id: str, tenant: str | None = None) -> BatchState:
        """Find a batch by id alone (ids are unique) or with its tenant.

        Raises:
            ObjectNotFound: no such batch.
        """
        if tenant:
            return self.load_batch(tenant, batch_id)
        for found_tenant, found_batch in self.list_batches():
            if found_batch == batch_id:
                return self.load_batch(found_tenant, found_batch)
        raise ObjectNotFound(f"no batch with id {batch_id!r}; `headshots status` lists batches",
                             bucket=self.store.bucket("state"), key=keys.batch_index_prefix())

    def batch_summary(self, batch: BatchState, persons: Iterable[PersonState] | None = None) -> dict[str, Any]:
        persons = list(persons) if persons is not None else self.load_persons(batch)
        return {"tenant": batch.tenant, "batch_id": batch.batch_id, "name": batch.name, "state": batch.state,
                "created_at": batch.created_at, "finished_at": batch.finished_at,
                "persons": [person.summary() for person in persons]}


def is_missing(error: Exception) -> bool:
    return isinstance(error, ObjectNotFound)
