"""A whole batch through the real coordinator and GPU-worker actors, on a real local Ray cluster and S3 server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from pipeline.package import TRAINED_ALGORITHMIC_MEDIA, read_digital_source_type
from storage import keys
from storage.state import StateStore
from tests.integration.conftest import TEST_CONSENT, read_version

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
STYLES = ["corporate-grey", "office"]
IMAGES_PER_STYLE = 2
# Person ids as the system makes them for a roster without ids: random, never from the name.
GRACE, EILEEN, NOBODY = "p-0000000000a1", "p-0000000000b2", "p-0000000000c3"


@pytest.fixture(scope="module")
def coordinator(ray_cluster, base_config):
    from cluster.actors import get_or_create_coordinator

    return get_or_create_coordinator(base_config, metrics_port=None)


@pytest.fixture(scope="module")
def finished_batch(coordinator, base_config, store, tmp_path_factory):
    """Submit a three-person batch (one person with only an unusable file) and wait for it."""
    import ray

    junk = tmp_path_factory.mktemp("junk") / "scan.gif"
    junk.write_bytes(b"GIF89a" + b"\0" * 64)
    grace = sorted((EXAMPLES / "grace-hopper").iterdir())
    eileen = sorted((EXAMPLES / "eileen-collins").iterdir())
    manifest = BatchManifest(
        tenant="acme-it", name="Integration team", base_model="tiny", styles=STYLES,
        images_per_style=IMAGES_PER_STYLE,
        # Grace's set includes one photo of Eileen: the identity gate must turn it away.
        persons=[PersonSpec(GRACE, "Grace Hopper", "grace@example.com", grace + eileen[1:2]),
                 PersonSpec(EILEEN, "Eileen Collins", None, eileen[:4] + [junk]),
                 PersonSpec(NOBODY, "No Photos", None, [junk])], consent=TEST_CONSENT)
    submitted = client.submit_batch(base_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    final_state = ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 600))
    return submitted, final_state


def eileen_photo_name() -> str:
    return sorted((EXAMPLES / "eileen-collins").iterdir())[1].name


def test_batch_finishes_with_every_person_in_a_final_state(finished_batch, base_config):
    submitted, final_state = finished_batch
    assert final_state == "done"
    status = client.batch_status(base_config, submitted.batch_id)
    by_person = {p["person_id"]: p for p in status["persons"]}
    assert by_person[GRACE]["state"] == "done"
    assert by_person[EILEEN]["state"] == "done"
    assert by_person[NOBODY]["state"] == "needs_photos"
    assert by_person[GRACE]["headshots"] == len(STYLES) * IMAGES_PER_STYLE
    assert "photo" in by_person[NOBODY]["error"]
    rejected = {r["file"]: r["reason"] for r in by_person[GRACE]["photos_rejected"]}
    assert rejected == {eileen_photo_name(): "different_person"}
    assert by_person[GRACE]["photos_accepted"] == 6


def test_every_expected_object_is_stored_under_the_key_layout(finished_batch, store):
    submitted, _ = finished_batch
    states = StateStore(store)
    batch = states.load_batch(submitted.tenant, submitted.batch_id)
    for person in states.load_persons(batch):
        if person.state != "done":
            assert list(store.list_keys("outputs", person.ref.prefix)) == []
            continue
        expected = {keys.headshot_key(person.ref, h.style, h.index, h.seed) for h in person.headshots}
        assert {(h.style, h.index) for h in person.headshots} == {
            (style, index) for style in STYLES for index in range(IMAGES_PER_STYLE)}
        stored_outputs = set(store.list_keys("outputs", person.ref.prefix))
        assert stored_outputs == expected | {keys.person_contact_sheet_key(person.ref)}
        # Listed, not read: models are encrypted with the person's key (a bare HEAD is refused).
        assert keys.lora_key(person.ref) in set(store.list_keys("models", person.ref.prefix))
        assert list(store.list_keys("derived", person.ref.prefix + "crops/"))
        for key in expected:
            assert read_digital_source_type(store.get("outputs", key)) == TRAINED_ALGORITHMIC_MEDIA
    assert store.exists("outputs", keys.batch_manifest_key(batch.tenant, batch.batch_id))
    assert store.exists("outputs", keys.batch_contact_sheet_key(batch.tenant, batch.batch_id))


def test_state_records_every_stored_version_with_its_checksum(finished_batch, store, key_store):
    submitted, _ = finished_batch
    states = StateStore(store)
    batch = states.load_batch(submitted.tenant, submitted.batch_id)
    person = states.load_person(batch.tenant, batch.batch_id, GRACE)
    recorded = {(o.bucket, o.key, o.version_id): o for o in person.objects}
    # Everything of the person in the artifact buckets, every version, must be in the state.
    for artifact in ("uploads", "derived", "models", "outputs"):
        for key, version_id, is_marker in store.list_versions(artifact, person.ref.prefix):
            assert not is_marker
            entry = recorded.get((store.bucket(artifact), key, version_id))
            assert entry is not None, f"{artifact}:{key}@{version_id} was written but not recorded in state"
            data = read_version(store, key_store, artifact, key, version_id)
            assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.size
    # Two checkpoints (every 3 of 6 steps) were written as versions of one key.
    checkpoints = [o for o in person.objects if o.key == keys.checkpoint_key(person.ref)]
    assert len(checkpoints) == 2


def test_names_and_emails_stay_in_state_documents(finished_batch, store):
    submitted, _ = finished_batch
    words = ("grace", "hopper", "eileen", "collins", "example.com")  # any case, so slugs too
    for artifact in ("uploads", "derived", "models", "outputs"):
        for key in store.list_keys(artifact, f"{submitted.tenant}/{submitted.batch_id}/"):
            assert not [word for word in words if word in key.lower()], key
    # The batch manifest holds ids only.
    document = store.get("outputs", keys.batch_manifest_key(submitted.tenant, submitted.batch_id)).decode()
    assert GRACE in document and EILEEN in document
    assert not [word for word in words if word in document.lower()]


def test_download_writes_per_person_folders(finished_batch, base_config, tmp_path):
    submitted, _ = finished_batch
    result = client.download_batch(base_config, submitted.batch_id, tmp_path / "out", as_zip=True)
    out = Path(result["output_dir"])
    assert (out / "manifest.json").is_file() and (out / "contact-sheet.png").is_file()
    assert (out / GRACE / "contact-sheet.png").is_file()
    assert len(list((out / GRACE).glob("*/*.png"))) == len(STYLES) * IMAGES_PER_STYLE
    assert not (out / NOBODY).exists()
    assert Path(result["zip"]).is_file()


def test_a_killed_coordinator_restarts_and_finishes_the_batch(coordinator, base_config, store):
    """Kill the coordinator mid-batch: Ray restarts it, it reads the state back and carries on."""
    import time

    import ray

    from storage.state import StateStore

    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:4]
    manifest = BatchManifest(tenant="acme-restart", name="Restart team", base_model="tiny", styles=["office"],
                             images_per_style=1,
                             persons=[PersonSpec(f"p{i}", f"Person {i}", None, photos) for i in range(3)],
                             consent=TEST_CONSENT)
    submitted = client.submit_batch(base_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    states = StateStore(store)
    batch = states.load_batch(submitted.tenant, submitted.batch_id)
    deadline = time.monotonic() + 120
    while not any(p.state in ("training", "generating") for p in states.load_persons(batch)):
        assert time.monotonic() < deadline, "no person reached training"
        time.sleep(0.3)
    pid_before = ray.get(coordinator.ping.remote())["pid"]
    ray.kill(coordinator, no_restart=False)

    deadline = time.monotonic() + 300
    while states.load_batch(submitted.tenant, submitted.batch_id).state == "running":
        assert time.monotonic() < deadline, "the restarted coordinator did not finish the batch"
        time.sleep(1)
    persons = states.load_persons(batch)
    assert [p.state for p in persons] == ["done"] * 3, [(p.person_id, p.state, p.error) for p in persons]
    for person in persons:
        assert len(person.headshots) == 1
        assert set(store.list_keys("outputs", person.ref.prefix + "headshots/")) == {person.headshots[0].key}
    # It really was a new process that finished the batch, answering under the same name.
    after = ray.get(coordinator.ping.remote())
    assert after["pid"] != pid_before and after["batches_running"] == 0


def test_a_person_short_of_photos_gets_more_and_is_retried(coordinator, base_config, store):
    import time

    import ray

    from storage.state import StateStore

    photos = sorted((EXAMPLES / "eileen-collins").iterdir())
    manifest = BatchManifest(tenant="acme-retry", name="Retry team", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("short", "Short Of Photos", None, photos[:2]),
                                      PersonSpec("full", "Has Enough", None, photos)])
    submitted = client.submit_batch(base_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    assert ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 300)) == "done"
    states = StateStore(store)
    assert states.load_person(submitted.tenant, submitted.batch_id, "short").state == "needs_photos"

    added = client.add_photos(base_config, tenant=submitted.tenant, batch_id=submitted.batch_id,
                              person_id="short", files=photos[2:])
    assert added["photos_added"] == 4 and added["photos_accepted"] == 6
    ray.get(coordinator.retry_person.remote(submitted.tenant, submitted.batch_id, "short"))
    deadline = time.monotonic() + 300
    while states.load_batch(submitted.tenant, submitted.batch_id).state != "done":
        assert time.monotonic() < deadline, "the retried person did not finish"
        time.sleep(0.5)
    person = states.load_person(submitted.tenant, submitted.batch_id, "short")
    assert person.state == "done" and len(person.headshots) == 1 and person.photos_accepted == 6
    with pytest.raises(ray.exceptions.RayTaskError, match="only needs_photos, failed, cancelled"):
        ray.get(coordinator.retry_person.remote(submitted.tenant, submitted.batch_id, "full"))


def test_more_headshots_come_from_the_stored_model_without_retraining(coordinator, base_config, store):
    import ray

    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:4]
    manifest = BatchManifest(tenant="acme-more", name="More team", base_model="tiny", styles=STYLES,
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("ana", "Ana", None, photos)])
    submitted = client.submit_batch(base_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    assert ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 300)) == "done"
    states = StateStore(store)
    before = states.load_person(submitted.tenant, submitted.batch_id, "ana")
    lora_versions = store.list_versions("models", keys.lora_key(before.ref))
    manifest_versions = store.list_versions("outputs", keys.batch_manifest_key(submitted.tenant, submitted.batch_id))

    result = ray.get(coordinator.more_headshots.remote(submitted.tenant, submitted.batch_id, "ana", 2, "office"))
    assert result["added_per_style"] == {"office": 2}
    assert ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 300)) == "done"
    after = states.load_person(submitted.tenant, submitted.batch_id, "ana")
    assert after.state == "done"
    assert sorted((h.style, h.index) for h in after.headshots) == [
        ("corporate-grey", 0), ("office", 0), ("office", 1), ("office", 2)]
    # No retraining: the LoRA has the same single version; the retention clock did not restart.
    assert store.list_versions("models", keys.lora_key(after.ref)) == lora_versions
    assert after.processed_at == before.processed_at
    # The batch was packaged again, with the new headshots in its manifest.
    assert len(store.list_versions("outputs", keys.batch_manifest_key(submitted.tenant, submitted.batch_id))) == \
        len(manifest_versions) + 1
    stored = set(store.list_keys("outputs", after.ref.prefix + "headshots/office/"))
    assert stored == {h.key for h in after.headshots if h.style == "office"}

    with pytest.raises(ray.exceptions.RayTaskError, match="not one of batch"):
        ray.get(coordinator.more_headshots.remote(submitted.tenant, submitted.batch_id, "ana", 1, "beach"))
    with pytest.raises(ray.exceptions.RayTaskError, match="count must be an integer from 1 to 64"):
        ray.get(coordinator.more_headshots.remote(submitted.tenant, submitted.batch_id, "ana", 0, None))
