"""The Python API: submit a batch, read its status, download its headshots.

The CLI is a thin layer over these functions; later front ends (the HTTP API) call them too. They
take a config whose store endpoint and Ray address are already resolved (see
:func:`headshots.stack.connect`).
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headshots.manifest import MAX_PHOTOS_PER_PERSON, BatchManifest, Consent, PersonSpec
from pipeline import ingest
from storage import keys
from storage.barrier import PersonDeleted, refuse_if_deleted
from storage.crypto import KeyDestroyed, PersonKeyStore, key_store_for
from storage.retention import RetentionPolicy, file_person, load_policy, parse_time
from storage.scoped import PersonScope
from storage.state import (FINAL_PERSON_STATES, RETRYABLE_PERSON_STATES, BatchState, BatchStatus, PersonState,
                           PersonStatus, PhotoRecord, StateConflict, StateStore)
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, utc_now_iso

UPLOAD_THREADS = 8


@dataclass(frozen=True)
class SubmitResult:
    tenant: str
    batch_id: str
    persons: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "batch_id": self.batch_id, "persons": self.persons}


def store_for(config) -> ArtifactStore:
    return ArtifactStore.from_config(config.store)


def consent_record(consent: Consent, spec: PersonSpec, policy_version: str) -> dict[str, Any]:
    """The person's consent as kept in state: who consented (the person), who collected it, when,
    to which policy version, for which purpose. Receipts name it by ``consent_id`` only."""
    return {"consent_id": "consent-" + secrets.token_hex(8), "given_by": spec.name,
            "collected_by": consent.collected_by, "given_at": spec.consent_given_at or consent.given_at,
            "policy_version": consent.policy_version or policy_version, "purpose": consent.purpose}


def upload_person(store: ArtifactStore, config, *, tenant: str, batch_id: str, spec: PersonSpec,
                  consent: Consent | None, key_store: PersonKeyStore | None = None,
                  policy: RetentionPolicy | None = None, first_index: int = 0) -> PersonState:
    """Sanitize and store one person's photos; returns the person's initial state (not yet saved).

    Metadata is stripped here, at the edge, so the original bytes (with GPS and camera serials) are
    never written anywhere. A bad photo is recorded with its reason; the person's other photos go on.
    With ``security.encrypt_person_artifacts`` (and a master key), the first stored photo creates the
    person's data key and every photo is encrypted with it (crypto-erasure, see storage/crypto.py).

    Args:
        store: the artifact store.
        config: the resolved config.
        tenant: the batch's tenant id.
        batch_id: the batch id.
        spec: the person and their photo files.
        consent: the batch's consent record; without one no photo is stored (the person needs photos).
        key_store: reuse this key store (e.g. one per batch); default: built from ``config``.
        policy: the retention policy (default: the configured one), to file the person for expiry.
        first_index: number the stored photos from here (photos added later continue the numbering).

    Returns:
        The person's state with every stored photo recorded; ``needs_photos`` when too few were usable.

    Raises:
        storage.crypto.MasterKeyError: ``security.master_key`` is set but invalid.
        storage.store.StoreError: a write failed.
    """
    policy = policy or load_policy(config.retention.policy_file or None)
    person = PersonState(tenant=tenant, batch_id=batch_id, person_id=spec.person_id, name=spec.name,
                         email=spec.email)
    ref = person.ref
    if consent is None:
        for path in spec.photos:
            person.photos.append(PhotoRecord(index=-1, source=path.name, accepted=False, reason="no_consent",
                                             message=f"{path.name}: not stored: there is no consent record for "
                                                     "this person (add `consent:` to the manifest)"))
        spec = PersonSpec(spec.person_id, spec.name, spec.email, [], spec.missing)
    else:
        person.consent = consent_record(consent, spec, policy.version)
    if spec.photos:
        # Filed for expiry before the first photo is stored: even if this process dies right after the
        # upload, the sweep will find the photo (due by upload time, if the batch never commits).
        file_person(store, ref, min(policy.due_times(tenant, datetime.now(timezone.utc)).values()),
                    reason="submitted")
    scope = PersonScope(store, ref, key_store=key_store if key_store is not None else key_store_for(config, store))
    index = first_index
    for missing in spec.missing:
        person.photos.append(PhotoRecord(index=-1, source=missing, accepted=False, reason="not_found",
                                         message=f"{missing}: no such file or folder next to the manifest"))
    for path in spec.photos:
        try:
            data = path.read_bytes()
        except OSError as error:
            person.photos.append(PhotoRecord(index=-1, source=path.name, accepted=False, reason="not_found",
                                             message=f"{path.name}: cannot be read ({error.strerror})"))
            continue
        try:
            photo = ingest.sanitize_upload(data, filename=path.name, max_pixels=config.ingest.max_pixels,
                                           max_bytes=config.ingest.max_bytes, min_side=config.ingest.min_side_px)
        except ingest.PhotoRejected as rejected:
            person.photos.append(PhotoRecord(index=-1, source=path.name, accepted=False, reason=rejected.reason,
                                             message=rejected.message))
            continue
        key = keys.upload_key(ref, index, photo.extension)
        stored = scope.put("uploads", key, photo.data, content_type=photo.content_type)
        person.record_object(stored)
        person.photos.append(PhotoRecord(index=index, source=path.name, accepted=True, key=key))
        person.last_upload_at = utc_now_iso()
        index += 1
    if person.photos_accepted < config.ingest.min_photos:
        person.state = PersonStatus.NEEDS_PHOTOS
        person.error = (f"{person.photos_accepted} usable photo(s); at least {config.ingest.min_photos} needed: "
                        "add photos and retry")
        person.processed_at = utc_now_iso()
    return person


def batch_state_from_manifest(manifest: BatchManifest, batch_id: str, persons: list[PersonState], *,
                              state: str) -> BatchState:
    """The batch document for ``manifest``: the one place that maps a manifest's fields onto it, for
    the CLI's submit and the HTTP API's create alike (a field mapped in only one of them was lost in the
    other: batches created over the API used to drop their webhooks)."""
    return BatchState(tenant=manifest.tenant, batch_id=batch_id, name=manifest.name, base_model=manifest.base_model,
                      styles=list(manifest.styles), images_per_style=manifest.images_per_style,
                      person_ids=[person.person_id for person in persons], priority=manifest.priority,
                      webhooks=list(manifest.webhooks), state=state)


def submit_batch(config, manifest: BatchManifest, *, start: bool = True) -> SubmitResult:
    """Store the batch's photos and state, then hand the batch to the coordinator.

    The batch state document is written last: it is the commit point. A crash before it leaves only
    uploads under a batch id nobody knows, which the retention sweep removes.
    """
    store = store_for(config)
    store.ensure_buckets()
    states = StateStore(store)
    batch_id = keys.new_batch_id(manifest.name)
    key_store = key_store_for(config, store)
    policy = load_policy(config.retention.policy_file or None)

    def upload(spec: PersonSpec) -> PersonState:
        return upload_person(store, config, tenant=manifest.tenant, batch_id=batch_id, spec=spec,
                             consent=manifest.consent, key_store=key_store, policy=policy)

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        persons = list(pool.map(upload, manifest.persons))
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(states.save_person, persons))
    batch = batch_state_from_manifest(manifest, batch_id, persons, state=BatchStatus.RUNNING)
    states.save_batch(batch)
    if start:
        start_batch(config, manifest.tenant, batch_id)
    return SubmitResult(tenant=manifest.tenant, batch_id=batch_id,
                        persons=[{"person_id": p.person_id, "state": p.state, "photos_accepted": p.photos_accepted,
                                  "photos_rejected": [{"file": ph.source, "reason": ph.reason, "message": ph.message}
                                                      for ph in p.photos if not ph.accepted]}
                                 for p in persons])


# Photos can be added to persons a retry runs again (storage/state.py), then they are retried.
ADD_PHOTOS_STATES = RETRYABLE_PERSON_STATES
MAX_PHOTO_WRITE_ATTEMPTS = 20


class BatchLimitReached(ValueError):
    """The tenant already has as many open (created or running) batches as it may."""


def _person_result(person: PersonState) -> dict[str, Any]:
    return {"person_id": person.person_id, "state": person.state, "photos_accepted": person.photos_accepted,
            "photos_rejected": [{"file": ph.source, "reason": ph.reason, "message": ph.message}
                                for ph in person.photos if not ph.accepted]}


def open_batches(store: ArtifactStore, tenant: str, *, limit: int | None = None) -> int:
    """The tenant's batches that are created (not yet started) or running, from the open-batch index
    (:meth:`storage.state.StateStore.count_open_batches`): the cost grows with the tenant's open batches,
    not with every batch it ever made.

    Args:
        limit: the caller compares the count with this limit: under it, the index's listing alone
            answers (one request); at or over it, each open batch's state is checked.
    """
    return StateStore(store).count_open_batches(tenant, trust_below=limit, threads=UPLOAD_THREADS)


def create_batch(config, manifest: BatchManifest, *, batch_id: str | None = None,
                 store: ArtifactStore | None = None) -> SubmitResult:
    """Create a batch whose photos arrive later, one at a time (:func:`add_photo_bytes`), and which starts
    only when asked (:func:`begin_batch`). The HTTP API's way in; nothing runs until then.

    Persons wait in ``queued`` with no photos; the batch is ``created`` (the coordinator resumes only
    ``running`` batches, so a restart does not start it early). The batch document is written last,
    create-only: it is the commit point, and a ``batch_id`` chosen in advance (idempotent requests)
    cannot be created twice.

    Raises:
        storage.state.StateConflict: a batch with this id exists.
    """
    store = store or store_for(config)
    states = StateStore(store)
    batch_id = batch_id or keys.new_batch_id(manifest.name)
    policy = load_policy(config.retention.policy_file or None)
    persons = []
    for spec in manifest.persons:
        person = PersonState(tenant=manifest.tenant, batch_id=batch_id, person_id=spec.person_id, name=spec.name,
                             email=spec.email)
        person.consent = consent_record(manifest.consent, spec, policy.version) if manifest.consent else None
        persons.append(person)
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(states.save_person, persons))
    batch = batch_state_from_manifest(manifest, batch_id, persons, state=BatchStatus.CREATED)
    states.create_batch(batch)
    return SubmitResult(tenant=manifest.tenant, batch_id=batch_id, persons=[_person_result(p) for p in persons])


def photo_refusal(batch: BatchState, person: PersonState) -> str | None:
    """Why ``person`` cannot take a photo now (a sentence saying when it can), or None if it can."""
    waiting = batch.state == "created" and person.state == "queued"
    if not waiting and person.state not in ADD_PHOTOS_STATES:
        return (f"person {person.person_id!r} is {person.state}; photos can be added before the batch starts, or "
                f"to persons in {', '.join(ADD_PHOTOS_STATES)} (then retry them)")
    if not person.consent:
        return f"person {person.person_id!r} has no consent record, so no photo of theirs can be stored"
    return None


def add_photo_bytes(config, *, tenant: str, batch_id: str, person_id: str, filename: str, data: bytes,
                    store: ArtifactStore | None = None) -> dict[str, Any]:
    """Store one photo, given as bytes, for a person of a batch that is not yet started, or one waiting
    for photos (then :func:`begin_batch` or a retry). The same checks and metadata stripping as at submit.

    Idempotent by file name: the same name with the same content again is the photo already stored;
    the same name with other content is refused (the name is how the photo is reported).

    Returns:
        ``{person_id, file, index, stored: bool, photos_accepted}`` (``stored`` false on a repeat).

    Raises:
        ValueError: the person cannot take photos now, has no consent record, or the name is taken.
        pipeline.ingest.PhotoRejected: the photo failed a check (reason and message say which).
        storage.store.ObjectNotFound: no such batch or person.
    """
    store = store or store_for(config)
    states = StateStore(store)
    batch = states.load_batch(tenant, batch_id)
    if person_id not in batch.person_ids:
        raise ObjectNotFound(f"batch {batch_id!r} has no person {person_id!r}", bucket=store.bucket("state"),
                             key=keys.batch_state_key(tenant, batch_id))
    try:
        return _add_photo_bytes(config, store, states, batch, person_id=person_id, filename=filename, data=data)
    except PersonDeleted as deleted:
        # Raised by the deletion barrier, before or after our write (which was then removed again).
        raise ValueError(str(deleted)) from None
    except KeyDestroyed:
        # The first photo's key creation met the destroyed key's tombstone: a deletion got there first.
        raise ValueError(str(PersonDeleted(keys.PersonRef(tenant, batch_id, person_id), "photo"))) from None


def _add_photo_bytes(config, store: ArtifactStore, states: StateStore, batch: BatchState, *, person_id: str,
                     filename: str, data: bytes) -> dict[str, Any]:
    tenant, batch_id = batch.tenant, batch.batch_id
    refuse_if_deleted(store, keys.PersonRef(tenant, batch_id, person_id), "photo")
    photo = ingest.sanitize_upload(data, filename=filename, max_pixels=config.ingest.max_pixels,
                                   max_bytes=config.ingest.max_bytes, min_side=config.ingest.min_side_px)
    digest = hashlib.sha256(photo.data).hexdigest()
    ref = keys.PersonRef(tenant, batch_id, person_id)
    policy = load_policy(config.retention.policy_file or None)
    scope = PersonScope(store, ref, key_store=key_store_for(config, store))
    stored = None
    for _ in range(MAX_PHOTO_WRITE_ATTEMPTS):
        person = states.load_person(tenant, batch_id, person_id)
        refusal = photo_refusal(batch, person)
        if refusal is not None:
            raise ValueError(refusal)
        same_name = [p for p in person.photos if p.accepted and p.source == filename]
        if same_name:
            known = {o.key: o.sha256 for o in person.objects}
            if known.get(same_name[0].key) == digest:
                return {"person_id": person_id, "file": filename, "index": same_name[0].index, "stored": False,
                        "photos_accepted": person.photos_accepted}
            raise ValueError(f"person {person_id!r} already has a different photo named {filename!r}; "
                             "upload this one under another file name")
        if len(person.photos) >= MAX_PHOTOS_PER_PERSON:
            raise ValueError(f"person {person_id!r} has {len(person.photos)} photos; at most "
                             f"{MAX_PHOTOS_PER_PERSON} per person")
        if stored is None:
            # Filed for expiry before the photo is stored, as at submit: a photo is never unfiled.
            file_person(store, ref, min(policy.due_times(tenant, datetime.now(timezone.utc)).values()),
                        reason="submitted")
            index = max((p.index for p in person.photos if p.index >= 0), default=-1) + 1
            while stored is None:
                key = keys.upload_key(ref, index, photo.extension)
                try:  # create-only: two uploads racing for one index cannot overwrite each other
                    stored = scope.put("uploads", key, photo.data, content_type=photo.content_type, if_absent=True)
                except ObjectExists:
                    index += 1
        person.record_object(stored)
        person.photos.append(PhotoRecord(index=index, source=filename, accepted=True, key=stored.key))
        person.last_upload_at = utc_now_iso()
        try:
            states.save_person(person)
        except StateConflict:
            continue  # another upload saved first: record ours on top of what it stored
        return {"person_id": person_id, "file": filename, "index": index, "stored": True,
                "photos_accepted": person.photos_accepted}
    raise RuntimeError(f"person {person_id!r} kept changing while a photo was added; upload it again")


# Conflicting writes of one person's state a start rides out (each means another writer got through).
START_CONFLICT_RETRIES = 5


def begin_batch(config, tenant: str, batch_id: str, *, store: ArtifactStore | None = None) -> dict[str, Any]:
    """Start a ``created`` batch: persons with too few photos go to ``needs_photos`` (as at submit),
    the batch becomes ``running`` and the coordinator takes it. Starting a running batch again is a
    no-op that returns the same answer, and so is a start that loses a race with another: only the
    one that moved the batch to ``running`` submits it.

    Raises:
        ValueError: the batch is finished, cancelled or deleted.
        StateConflict: a person's state kept changing under the start (retry the start).
    """
    store = store or store_for(config)
    states = StateStore(store)
    batch = states.load_batch(tenant, batch_id)
    if batch.state not in (BatchStatus.CREATED, BatchStatus.RUNNING):
        raise ValueError(f"batch {batch_id!r} is {batch.state}; only a created batch can be started")
    if batch.state == "created":
        for person in states.load_persons(batch):
            for attempt in range(START_CONFLICT_RETRIES + 1):
                if not (person.state == "queued" and person.photos_accepted < config.ingest.min_photos):
                    break
                person.state = PersonStatus.NEEDS_PHOTOS
                person.error = (f"{person.photos_accepted} usable photo(s); at least {config.ingest.min_photos} "
                                "needed: add photos and retry")
                person.processed_at = utc_now_iso()
                try:
                    states.save_person(person)
                    break
                except PersonDeleted:
                    break  # deleted while the batch starts: the deletion owns the person, the rest start
                except StateConflict:
                    if attempt == START_CONFLICT_RETRIES:
                        raise
                    # A concurrent start did it first, or a photo arrived: decide again on what is stored.
                    person = states.load_person(tenant, batch_id, person.person_id)
        batch.state = BatchStatus.RUNNING
        try:
            states.save_batch(batch)
        except StateConflict:
            batch = states.load_batch(tenant, batch_id)  # a concurrent start (fine) or a cancel (refused)
            if batch.state != "running":
                raise ValueError(f"batch {batch_id!r} became {batch.state} while it was started") from None
            # A concurrent start won: it hands the batch to the coordinator, so it is submitted once.
            return {"tenant": tenant, "batch_id": batch_id, "state": "running"}
    start_batch(config, tenant, batch_id)
    return {"tenant": tenant, "batch_id": batch_id, "state": "running"}


def add_photos(config, *, tenant: str, batch_id: str, person_id: str, files: list[Path]) -> dict[str, Any]:
    """Add photos to a person waiting for them (then `retry`). Same checks as at submit.

    Raises:
        ValueError: the person is being processed or has no consent record.
    """
    store = store_for(config)
    states = StateStore(store)
    person = states.load_person(tenant, batch_id, person_id)
    if person.state not in ADD_PHOTOS_STATES:
        raise ValueError(f"person {person_id!r} is {person.state}; photos can be added to persons in "
                         f"{', '.join(ADD_PHOTOS_STATES)} (then `headshots retry`)")
    if not person.consent:
        raise ValueError(f"person {person_id!r} has no consent record, so no photo of theirs can be stored")
    consent = Consent(collected_by=person.consent["collected_by"], given_at=person.consent["given_at"],
                      purpose=person.consent["purpose"], policy_version=person.consent["policy_version"])
    spec = PersonSpec(person_id, person.name or person_id, person.email, list(files))
    first_index = max((photo.index for photo in person.photos if photo.index >= 0), default=-1) + 1
    try:
        refuse_if_deleted(store, person.ref, "photo")
        added = upload_person(store, config, tenant=tenant, batch_id=batch_id, spec=spec, consent=consent,
                              first_index=first_index)
        person.photos.extend(added.photos)
        for stored in added.objects:
            person.record_object(stored)
        person.last_upload_at = added.last_upload_at or person.last_upload_at
        states.save_person(person)
    except PersonDeleted as deleted:
        # Refused by the deletion barrier (a photo that had landed was removed again).
        raise ValueError(str(deleted)) from None
    except KeyDestroyed:
        raise ValueError(str(PersonDeleted(person.ref, "photo"))) from None
    return {"person_id": person_id, "photos_added": added.photos_accepted, "photos_accepted": person.photos_accepted,
            "photos_rejected": [{"file": p.source, "reason": p.reason, "message": p.message}
                                for p in added.photos if not p.accepted]}


def start_batch(config, tenant: str, batch_id: str) -> None:
    import ray

    from cluster.actors import get_or_create_coordinator
    from headshots.stack import connect_ray, load_info

    connect_ray(config)
    info = load_info(config)
    metrics_port = (info.metrics_port if info else 0) or config.metrics.port or None
    coordinator = get_or_create_coordinator(config, metrics_port=metrics_port)
    ray.get(coordinator.submit.remote(tenant, batch_id))


# The coordinator writes a running batch's progress at least every 30 s (PROGRESS_HEARTBEAT_S in
# cluster/coordinator.py); four heartbeats missed and the batch is reported stalled, not "ETA 3s".
STALLED_AFTER_S = 120.0
STALLED_HINT = ("the coordinator has stopped reporting: run `headshots up` (it restarts what is missing on the "
                "local stack), or on Kubernetes check the Ray head pod (`kubectl get pods -l "
                "app.kubernetes.io/component=head`); the batch resumes from the store")


def stall_of(batch: BatchState, progress: dict[str, Any] | None, *, now: datetime | None = None) -> str | None:
    """Since when a running batch has had no word from the coordinator (ISO-8601), or None if it is live.

    Judged by the progress document's ``updated_at`` (or, before the first one, the batch document's),
    so a batch whose coordinator died never shows an old ETA as if it were live.
    """
    if batch.state != "running":
        return None
    last = (progress or {}).get("updated_at") or batch.updated_at
    if not last:
        return None
    now = now or datetime.now(timezone.utc)
    return last if (now - parse_time(last)).total_seconds() > STALLED_AFTER_S else None


def batch_status(config, batch_id: str, *, tenant: str | None = None,
                 store: ArtifactStore | None = None) -> dict[str, Any]:
    """``{tenant, batch_id, state, eta_seconds, stalled_since, hint, persons: [{person_id, state, stage,
    headshots, error, eta_seconds}]}``; a stalled batch (see :func:`stall_of`) shows no ETA."""
    store = store or store_for(config)
    states = StateStore(store)
    batch = states.find_batch(batch_id, tenant)
    summary = states.batch_summary(batch)
    progress = batch_progress(config, batch.tenant, batch.batch_id, store=store) or {}
    stalled_since = stall_of(batch, progress)
    live = batch.state == "running" and stalled_since is None
    etas = progress.get("eta_seconds_by_person", {})
    summary["eta_seconds"] = progress.get("eta_seconds") if live else None
    summary["stalled_since"] = stalled_since
    summary["hint"] = STALLED_HINT if stalled_since else None
    for person in summary["persons"]:
        final = person["state"] in FINAL_PERSON_STATES
        person["eta_seconds"] = None if final or not live else etas.get(person["person_id"])
    return summary


def batch_progress(config, tenant: str, batch_id: str, *, store: ArtifactStore | None = None
                   ) -> dict[str, Any] | None:
    """The coordinator's latest progress document for a batch (ETAs per person and for the batch), or None
    before it wrote one. Written every few seconds while the batch runs."""
    try:
        return (store or store_for(config)).get_json("state", keys.batch_progress_key(tenant, batch_id))
    except ObjectNotFound:
        return None


def list_batches(config, *, tenant: str | None = None) -> list[dict[str, Any]]:
    store = store_for(config)
    states = StateStore(store)
    rows = []
    for found_tenant, batch_id in states.list_batches(tenant):
        row = batch_row(config, store, found_tenant, batch_id)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda row: row["created_at"])


def batch_row(config, store: ArtifactStore, tenant: str, batch_id: str) -> dict[str, Any] | None:
    """One batch as `status` lists it, or None when its index is written but its state is not (or gone)."""
    try:
        batch = StateStore(store).load_batch(tenant, batch_id)
    except ObjectNotFound:
        return None
    row = {"tenant": batch.tenant, "batch_id": batch.batch_id, "name": batch.name, "state": batch.state,
           "persons": len(batch.person_ids), "created_at": batch.created_at, "priority": batch.priority,
           "persons_by_state": None, "eta_seconds": None, "stalled_since": None}
    if batch.state == "running":
        # Running batches show their progress side by side (counts and ETA from the coordinator).
        progress = batch_progress(config, batch.tenant, batch.batch_id, store=store) or {}
        row["persons_by_state"] = progress.get("persons_by_state")
        row["stalled_since"] = stall_of(batch, progress)
        row["eta_seconds"] = None if row["stalled_since"] else progress.get("eta_seconds")
    return row


def list_batch_page(config, *, tenant: str, limit: int, after: str | None = None,
                    store: ArtifactStore | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a tenant's batches in batch id order (a stable cursor: ``after`` = the last id seen).

    Only the page's batches are read, so a page costs the same however many batches the tenant has.

    Returns:
        (rows, the cursor for the next page or None at the end).
    """
    store = store or store_for(config)
    ids = [batch_id for _, batch_id in StateStore(store).list_batches(tenant) if after is None or batch_id > after]
    page_ids = ids[:limit]
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        rows = [row for row in pool.map(lambda b: batch_row(config, store, tenant, b), page_ids) if row is not None]
    return rows, (page_ids[-1] if len(ids) > limit else None)


def batch_zip(config, tenant: str, batch_id: str, *, store: ArtifactStore | None = None) -> tuple[str, int] | None:
    """The batch's delivered files as one ZIP in the outputs bucket (the layout of :func:`download_batch`),
    made on first request and kept under a name that digests its contents, so a new headshot makes a new
    ZIP and a repeated request reuses the stored one. Under ``_batch/``: deleting the batch's outputs
    deletes it too.

    Returns:
        (the ZIP's key, the number of files in it), or None when there is nothing to deliver yet.
    """
    from cluster.stages import download_path

    store = store or store_for(config)
    states = StateStore(store)
    batch = states.load_batch(tenant, batch_id)
    persons = states.load_persons(batch)
    entries: list[tuple[str, str]] = []
    for person in persons:
        for record in person.headshots:
            entries.append((record.key, download_path(person.person_id, record.key)))
    if not entries:
        return None
    for person in persons:
        contact = keys.person_contact_sheet_key(person.ref)
        if person.headshots and store.exists("outputs", contact):
            entries.append((contact, f"{person.person_id}/contact-sheet.png"))
    for key, relative in ((keys.batch_contact_sheet_key(tenant, batch_id), "contact-sheet.png"),
                          (keys.batch_manifest_key(tenant, batch_id), "manifest.json")):
        if store.exists("outputs", key):
            entries.append((key, relative))
    fingerprint = hashlib.sha256("\n".join(f"{k}={r}" for k, r in sorted(entries)).encode()).hexdigest()[:32]
    zip_key = keys.batch_download_zip_key(tenant, batch_id, fingerprint)
    if store.exists("outputs", zip_key):
        return zip_key, len(entries)
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        contents = list(pool.map(lambda entry: store.get("outputs", entry[0]), entries))
    buffer = io.BytesIO()
    # PNGs are compressed already: stored, not deflated again.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for (_, relative), data in zip(entries, contents):
            archive.writestr(relative, data)
    store.put("outputs", zip_key, buffer.getvalue(), content_type="application/zip")
    return zip_key, len(entries)


def download_batch(config, batch_id: str, output_dir: str | Path, *, tenant: str | None = None,
                   as_zip: bool = False) -> dict[str, Any]:
    """Write ``DIR/<person>/<style>/<index>-<seed>.png``, per-person and batch contact sheets, manifest.json.

    Returns:
        ``{output_dir, files, zip}`` (zip is the archive path when ``as_zip``).
    """
    store = store_for(config)
    states = StateStore(store)
    batch = states.find_batch(batch_id, tenant)
    persons = states.load_persons(batch)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def fetch(artifact: str, key: str, relative: str) -> None:
        target = output / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(artifact, key))
        written.append(relative)

    from cluster.stages import download_path

    jobs = []
    for person in persons:
        for record in person.headshots:
            jobs.append(("outputs", record.key, download_path(person.person_id, record.key)))
        contact = keys.person_contact_sheet_key(person.ref)
        if person.headshots and store.exists("outputs", contact):
            jobs.append(("outputs", contact, f"{person.person_id}/contact-sheet.png"))
    for key, relative in ((keys.batch_contact_sheet_key(batch.tenant, batch.batch_id), "contact-sheet.png"),
                          (keys.batch_manifest_key(batch.tenant, batch.batch_id), "manifest.json")):
        if store.exists("outputs", key):
            jobs.append(("outputs", key, relative))
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(lambda job: fetch(*job), jobs))
    archive = None
    if as_zip:
        archive = str(shutil.make_archive(str(output), "zip", root_dir=output))
        with zipfile.ZipFile(archive) as check:
            if check.testzip() is not None:
                raise RuntimeError(f"the archive {archive} is corrupt; download again")
    return {"output_dir": str(output), "files": sorted(written), "zip": archive}


def read_manifest(config, batch_id: str, *, tenant: str | None = None) -> dict[str, Any]:
    store = store_for(config)
    batch = StateStore(store).find_batch(batch_id, tenant)
    return json.loads(store.get("outputs", keys.batch_manifest_key(batch.tenant, batch.batch_id)))
