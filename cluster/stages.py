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


def gate_config(config):
    """The identity gate's thresholds from the system config."""
    from pipeline.faces import GateConfig

    return GateConfig(min_photos=config.ingest.min_photos,
                      max_identity_distance=config.ingest.max_identity_distance)


def run_ingest(store: ArtifactStore, job: PersonJob, *, training_resolution: int,
               key_store: PersonKeyStore | None = None, gate=None) -> StageResult:
    """The identity gate, before any GPU time: check a person's photos as a set, crop the accepted ones.

    Uploads were stripped of metadata at the edge, before they were stored; here each is decoded
    again (a stored object is still untrusted input), checked (one clear, well-lit face; no
    near-duplicates; the same person as the rest) and cropped face-aligned, head and shoulders. The
    accepted photos' face embeddings are kept (as derived data, so retention deletes them) to judge
    the generated headshots against.

    Args:
        store: the artifact store.
        job: the person (``upload_names`` gives the names operators know the photos by).
        training_resolution: the fine-tune's resolution (0: native); crops are at least this size.
        key_store: the person's data keys, when person artifacts are encrypted
            (:func:`storage.crypto.key_store_for`); uploads are read and crops written with their key.
        gate: :class:`pipeline.faces.GateConfig` thresholds (default: its defaults).

    Returns:
        StageResult whose ``details`` has ``accepted`` (upload keys used), ``rejected``
        (``{key, reason, message}``) and ``checks`` (``{key, accepted, reason, scores}`` per photo).
    """
    from pipeline import faces

    started = time.perf_counter()
    scope = PersonScope(store, job.ref, key_store=key_store)
    result = StageResult()
    rejected: list[dict[str, Any]] = []
    names = dict(zip(job.upload_keys, job.upload_names or job.upload_keys))
    decoded: list[tuple[str, Image.Image]] = []
    for index, upload_key in enumerate(job.upload_keys):
        data = scope.get("uploads", upload_key)
        try:
            decoded.append((upload_key, ingest.open_sanitized(data)))
        except Exception:  # a damaged stored object must not stop the person's other photos
            rejected.append({"key": upload_key, "reason": "decode_failed", "scores": {},
                             "message": f"{names[upload_key]}: the stored photo could not be decoded; upload it again"})
    models = faces.load_face_models()  # once per process
    verdicts = faces.check_person_photos([(names[key], image) for key, image in decoded], models, gate)
    size = crop_resolution(training_resolution)
    accepted: list[str] = []
    checks = []
    for (upload_key, image), verdict in zip(decoded, verdicts):
        checks.append({"key": upload_key, "accepted": verdict.accepted, "reason": verdict.reason,
                       "scores": verdict.scores})
        if not verdict.accepted:
            rejected.append({"key": upload_key, "reason": verdict.reason, "message": verdict.message,
                             "scores": verdict.scores})
            continue
        crop = faces.aligned_crop(image, verdict.observation, size)
        index = job.upload_keys.index(upload_key)
        result.objects.append(scope.put("derived", keys.crop_key(job.ref, index), _png(crop),
                                        content_type="image/png"))
        accepted.append(upload_key)
    checks += [{"key": r["key"], "accepted": False, "reason": r["reason"], "scores": {}}
               for r in rejected if r["reason"] == "decode_failed"]
    references = faces.reference_embeddings(verdicts)
    if references:
        result.objects.append(scope.put("derived", keys.identity_reference_key(job.ref),
                                        json.dumps({"embeddings": references}).encode(),
                                        content_type="application/json"))
    result.details = {"accepted": accepted, "rejected": rejected, "checks": checks}
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
        tiles.append((image, f"{record['style']} #{record['index']} {_quality_caption(record.get('quality'))}"))
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
                "quality": record.get("quality") or {},
            })
        if person["headshots"]:
            first = sorted(person["headshots"], key=lambda h: (h["style"], h["index"]))[0]
            image = Image.open(io.BytesIO(store.get("outputs", first["key"]))).convert("RGB")
            tiles.append((image, person["person_id"]))
        manifest_persons.append({"person_id": person["person_id"], "state": person["state"], "images": images,
                                 "timings": person.get("timings_s", {}), "flags": person.get("flags", [])})
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


def _quality_caption(quality: dict | None) -> str:
    """What a contact sheet says under each image: the identity check's verdict and distance."""
    if not quality or quality.get("status") == "not_applicable":
        return "id n/a"
    distance = quality.get("identity_distance")
    verdict = "ok" if quality.get("status") == "pass" else "FAIL"
    return f"id {verdict} {distance:.2f}" if distance is not None else f"id {verdict}"


def download_path(person_id: str, key: str) -> str:
    """Where `headshots download` puts a headshot: ``<person>/<style>/<index>-<seed>.<ext>``."""
    style, filename = key.split("/headshots/", 1)[1].split("/", 1)
    return f"{person_id}/{style}/{filename}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
