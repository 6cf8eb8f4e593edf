"""The Python API: submit a batch, read its status, download its headshots.

The CLI is a thin layer over these functions; later front ends (the HTTP API) call them too. They
take a config whose store endpoint and Ray address are already resolved (see
:func:`headshots.stack.connect`).
"""

from __future__ import annotations

import json
import secrets
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headshots.manifest import BatchManifest, Consent, PersonSpec
from pipeline import ingest
from storage import keys
from storage.crypto import PersonKeyStore, key_store_for
from storage.retention import RetentionPolicy, file_person, load_policy
from storage.scoped import PersonScope
from storage.state import BatchState, PersonState, PhotoRecord, StateStore
from storage.store import ArtifactStore, ObjectNotFound, utc_now_iso

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
        person.state = "needs_photos"
        person.error = (f"{person.photos_accepted} usable photo(s); at least {config.ingest.min_photos} needed: "
                        "add photos and retry")
        person.processed_at = utc_now_iso()
    return person


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
    batch = BatchState(tenant=manifest.tenant, batch_id=batch_id, name=manifest.name,
                       base_model=manifest.base_model, styles=list(manifest.styles),
                       images_per_style=manifest.images_per_style, person_ids=[p.person_id for p in persons],
                       priority=manifest.priority)
    states.save_batch(batch)
    if start:
        start_batch(config, manifest.tenant, batch_id)
    return SubmitResult(tenant=manifest.tenant, batch_id=batch_id,
                        persons=[{"person_id": p.person_id, "state": p.state, "photos_accepted": p.photos_accepted,
                                  "photos_rejected": [{"file": ph.source, "reason": ph.reason, "message": ph.message}
                                                      for ph in p.photos if not ph.accepted]}
                                 for p in persons])


ADD_PHOTOS_STATES = ("needs_photos", "failed", "cancelled")


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
    added = upload_person(store, config, tenant=tenant, batch_id=batch_id, spec=spec, consent=consent,
                          first_index=first_index)
    person.photos.extend(added.photos)
    for stored in added.objects:
        person.record_object(stored)
    person.last_upload_at = added.last_upload_at or person.last_upload_at
    states.save_person(person)
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


def batch_status(config, batch_id: str, *, tenant: str | None = None) -> dict[str, Any]:
    """``{tenant, batch_id, state, persons: [{person_id, state, stage, headshots, error}]}``."""
    store = store_for(config)
    states = StateStore(store)
    batch = states.find_batch(batch_id, tenant)
    summary = states.batch_summary(batch)
    progress = batch_progress(config, batch.tenant, batch.batch_id, store=store) or {}
    etas = progress.get("eta_seconds_by_person", {})
    summary["eta_seconds"] = progress.get("eta_seconds") if batch.state == "running" else None
    for person in summary["persons"]:
        final = person["state"] in ("done", "needs_photos", "failed", "cancelled", "deleted")
        person["eta_seconds"] = None if final or batch.state != "running" else etas.get(person["person_id"])
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
        try:
            batch = states.load_batch(found_tenant, batch_id)
        except ObjectNotFound:
            continue  # index written, state not yet (or deleted)
        row = {"tenant": batch.tenant, "batch_id": batch.batch_id, "name": batch.name, "state": batch.state,
               "persons": len(batch.person_ids), "created_at": batch.created_at, "priority": batch.priority,
               "persons_by_state": None, "eta_seconds": None}
        if batch.state == "running":
            # Running batches show their progress side by side (counts and ETA from the coordinator).
            progress = batch_progress(config, batch.tenant, batch.batch_id, store=store) or {}
            row["persons_by_state"] = progress.get("persons_by_state")
            row["eta_seconds"] = progress.get("eta_seconds")
        rows.append(row)
    return sorted(rows, key=lambda row: row["created_at"])


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
