"""One function per stage: read a person's inputs from the store, call pipeline/, write results back.

These are plain functions so they run the same inside a Ray worker, a test, or a benchmark. Ingest and
packaging need only a CPU; training and generation run in :mod:`cluster.worker` next to a resident
base model.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from PIL import Image

from cluster.jobs import PersonJob, StageResult
from pipeline import ingest, package
from storage import keys
from storage.crypto import PersonKeyStore
from storage.scoped import PersonScope
from storage.store import ArtifactStore, utc_now_iso

CROP_RESOLUTION_PX = 512


def crop_resolution(training_resolution: int) -> int:
    """Crops are stored once at a size every supported model can train from (resized down as needed)."""
    return max(training_resolution, CROP_RESOLUTION_PX)


def run_ingest(store: ArtifactStore, job: PersonJob, *, training_resolution: int,
               key_store: PersonKeyStore | None = None) -> StageResult:
    """Make training crops from a person's (already sanitized) uploads.

    Uploads were stripped of metadata at the edge, before they were stored; here each is decoded
    again (a stored object is still untrusted input) and cropped square.

    Args:
        store: the artifact store.
        job: the person.
        training_resolution: the fine-tune's resolution (0: native); crops are at least this size.
        key_store: the person's data keys, when person artifacts are encrypted
            (:func:`storage.crypto.key_store_for`); uploads are read and crops written with their key.

    Returns:
        StageResult whose ``details`` has ``accepted`` (upload keys used) and ``rejected``
        (``{key, reason, message}`` for uploads that failed).
    """
    started = time.perf_counter()
    scope = PersonScope(store, job.ref, key_store=key_store)
    result = StageResult()
    accepted: list[str] = []
    rejected: list[dict[str, str]] = []
    size = crop_resolution(training_resolution)
    for index, upload_key in enumerate(job.upload_keys):
        data = scope.get("uploads", upload_key)
        try:
            image = ingest.open_sanitized(data)
        except Exception as error:  # a damaged stored object must not stop the person's other photos
            rejected.append({"key": upload_key, "reason": "decode_failed",
                             "message": f"stored photo {index + 1} could not be decoded: {error}"})
            continue
        # Face-aware checks (one face, sharp, lit, same person) and aligned crops plug in here.
        crop = ingest.training_crop(image, size)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        result.objects.append(scope.put("derived", keys.crop_key(job.ref, index), buffer.getvalue(),
                                        content_type="image/png"))
        accepted.append(upload_key)
    result.details = {"accepted": accepted, "rejected": rejected}
    result.seconds = time.perf_counter() - started
    return result


def load_crops(scope: PersonScope) -> list[Image.Image]:
    crops = []
    for key in scope.list("derived", "crops/"):
        crops.append(Image.open(io.BytesIO(scope.get("derived", key))).convert("RGB"))
    return crops


def run_package_person(store: ArtifactStore, job: PersonJob, headshots: list[dict[str, Any]], *,
                       key_store: PersonKeyStore | None = None) -> StageResult:
    """The person's contact sheet, from the headshots as stored.

    Args:
        key_store: the person's data keys when encryption is on; outputs are not encrypted with it today
            (customers download them), but the scope gets it so that changing that stays one line.
    """
    started = time.perf_counter()
    scope = PersonScope(store, job.ref, key_store=key_store)
    result = StageResult()
    tiles = []
    for record in sorted(headshots, key=lambda h: (h["style"], h["index"])):
        image = Image.open(io.BytesIO(scope.get("outputs", record["key"]))).convert("RGB")
        tiles.append((image, f"{record['style']} #{record['index']} seed {record['seed']}"))
    if tiles:
        sheet = package.contact_sheet(tiles, columns=max(1, min(4, len(tiles))), title=job.person_id)
        result.objects.append(scope.put("outputs", keys.person_contact_sheet_key(job.ref), _png(sheet),
                                        content_type="image/png"))
    result.seconds = time.perf_counter() - started
    return result


def run_package_batch(store: ArtifactStore, *, tenant: str, batch_id: str, batch_name: str, base_model: str,
                      persons: list[dict[str, Any]]) -> StageResult:
    """The batch contact sheet (first headshot of each person) and the batch manifest.

    Args:
        persons: ``{person_id, state, headshots: [record...]}`` per person (ids only, no names).
    """
    started = time.perf_counter()
    result = StageResult()
    tiles = []
    manifest_persons = []
    for person in persons:
        images = []
        for record in sorted(person["headshots"], key=lambda h: (h["style"], h["index"])):
            images.append({
                "person": person["person_id"], "style": record["style"], "prompt": record["prompt"],
                "negative_prompt": record["negative_prompt"], "seed": record["seed"], "model": base_model,
                "key": record["key"], "file": download_path(person["person_id"], record["key"]),
                "timings": {"generate_s": round(record["seconds"], 4)},
            })
        if person["headshots"]:
            first = sorted(person["headshots"], key=lambda h: (h["style"], h["index"]))[0]
            image = Image.open(io.BytesIO(store.get("outputs", first["key"]))).convert("RGB")
            tiles.append((image, person["person_id"]))
        manifest_persons.append({"person_id": person["person_id"], "state": person["state"], "images": images,
                                 "timings": person.get("timings_s", {})})
    manifest = package.build_batch_manifest(tenant=tenant, batch_id=batch_id, batch_name=batch_name,
                                            base_model=base_model, persons=manifest_persons,
                                            generated_at=utc_now_iso())
    result.objects.append(store.put("outputs", keys.batch_manifest_key(tenant, batch_id),
                                    json.dumps(manifest, indent=1).encode(), content_type="application/json"))
    if tiles:
        sheet = package.contact_sheet(tiles, columns=max(1, min(6, len(tiles))), title=batch_name)
        result.objects.append(store.put("outputs", keys.batch_contact_sheet_key(tenant, batch_id), _png(sheet),
                                        content_type="image/png"))
    result.seconds = time.perf_counter() - started
    return result


def download_path(person_id: str, key: str) -> str:
    """Where `headshots download` puts a headshot: ``<person>/<style>/<index>-<seed>.<ext>``."""
    style, filename = key.split("/headshots/", 1)[1].split("/", 1)
    return f"{person_id}/{style}/{filename}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
