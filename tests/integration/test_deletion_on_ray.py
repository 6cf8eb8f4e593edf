"""Early deletion and the retention controller on a real local Ray cluster and S3 server."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import keys
from storage.deletion import count_versions
from storage.receipts import list_receipts, pending_intents, verify_receipt
from storage.retention import file_person, format_time, parse_time
from storage.state import PersonState, StateStore
from tests.integration.conftest import TEST_CONSENT
from tests.integration.ray_actors import remove_named_actors, wait_for
from tests.integration.state_seed import seed_person

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
PERSON_CLASSES = ("uploads", "derived", "models", "outputs")


@pytest.fixture(scope="module")
def slow_config(base_config):
    """Long fine-tunes (a few hundred tiny steps), so a deletion can land mid-training."""
    return base_config.replace(training=base_config.training.__class__(
        steps=300, rank=4, learning_rate=1e-3, checkpoint_every=5))


@pytest.fixture(scope="module")
def coordinator(ray_cluster, slow_config):
    from cluster.actors import get_or_create_coordinator

    namespace = slow_config.ray.namespace  # where the stack's named actors live (the config says)
    remove_named_actors(ray_cluster, namespace)  # earlier modules' actors run with other configs
    handle = get_or_create_coordinator(slow_config, metrics_port=None)
    from cluster.actors import existing_gpu_workers

    # Actor names register asynchronously: wait for the coordinator's two workers to appear.
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 60, "the GPU workers")
    workers = existing_gpu_workers(namespace)
    assert {ray_cluster.get(w.info.remote())["training_steps"] for w in workers} == {300}, \
        "GPU workers from another module (another config) survived"
    yield handle
    remove_named_actors(ray_cluster, namespace)


@pytest.fixture(scope="module")
def controller(ray_cluster, slow_config, coordinator):
    from cluster.actors import get_or_create_retention_controller

    return get_or_create_retention_controller(slow_config, metrics_port=None)


def test_deleting_a_person_mid_fine_tune_stops_it_and_leaves_nothing(coordinator, controller, slow_config, store):
    import ray

    photos = sorted((EXAMPLES / "grace-hopper").iterdir())[:4]
    manifest = BatchManifest(tenant="acme-del", name="Deletion team", base_model="tiny", styles=["office"],
                             images_per_style=1,
                             persons=[PersonSpec("ada", "Ada Lovelace", "ada@example.com", photos),
                                      PersonSpec("bob", "Bob Keeps", None, photos)], consent=TEST_CONSENT)
    submitted = client.submit_batch(slow_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    states = StateStore(store)
    ada = keys.PersonRef(submitted.tenant, submitted.batch_id, "ada")
    # Wait for a stored checkpoint: the fine-tune is then truly under way (300 steps take far longer).
    wait_for(lambda: count_versions(store, "models", keys.checkpoint_key(ada)) > 0, 120, "ada's first checkpoint")

    result = ray.get(controller.delete.remote(ada.tenant, ada.batch_id, "ada", True, "test-suite"))
    assert result["verification"]["listing_count"] == 0
    # Nothing of Ada in any artifact bucket, any version — also after the batch has finished.
    wait_for(lambda: states.load_batch(ada.tenant, ada.batch_id).state != "running", 300, "the batch to end")
    for artifact in PERSON_CLASSES:
        assert count_versions(store, artifact, ada.prefix) == 0, artifact
    document = store.get_json("state", keys.person_state_key(ada))
    assert document["state"] == "deleted" and document["name"] is None and document["email"] is None
    assert len(store.list_versions("state", keys.person_state_key(ada))) == 1
    # The other person was not touched and finished normally.
    bob = states.load_person(ada.tenant, ada.batch_id, "bob")
    assert bob.state == "done" and bob.headshots
    # Every GPU worker confirmed its purge, and the receipt verifies against a fresh listing.
    receipt = list_receipts(store, tenant=ada.tenant, batch_id=ada.batch_id, person_id="ada")[0]
    assert receipt.receipt_id == result["receipt_id"]
    assert len(receipt.worker_purges) == 2 and all(p["purged"] for p in receipt.worker_purges)
    assert verify_receipt(store, receipt.receipt_id)["verified"]
    assert receipt.keys_destroyed, "the person's data key must be destroyed"
    # It was stopped mid-fine-tune: checkpoints were deleted, but no finished LoRA ever existed.
    deleted_keys = {item["key"] for item in receipt.objects}
    assert keys.checkpoint_key(ada) in deleted_keys and keys.lora_key(ada) not in deleted_keys


def test_a_controller_killed_mid_sweep_is_finished_by_the_next_sweep(controller, base_config, store):
    import ray

    tenant = "acme-kill"
    processed = parse_time("2026-01-05T00:00:00Z")
    for index in range(40):
        ref = keys.PersonRef(tenant, "b1", f"p{index:02d}")
        person = PersonState(tenant=tenant, batch_id="b1", person_id=ref.person_id, name="Someone", state="done",
                             processed_at=format_time(processed))
        for number in range(12):
            person.record_object(store.put("uploads", f"{ref.prefix}uploads/{number:03d}.jpg", b"x" * 256))
            person.record_object(store.put("models", f"{ref.prefix}checkpoints/train-state.pt", b"y" * 256))
        seed_person(store, person)  # as the run that processed it left it
        file_person(store, ref, processed + timedelta(days=30), reason="test")
    now = format_time(processed + timedelta(days=31))

    pid_before = ray.get(controller.ping.remote())["pid"]
    sweep = controller.sweep.remote(now, False)
    wait_for(lambda: any(i["tenant"] == tenant for _, i in pending_intents(store)), 60, "the sweep to start")
    ray.kill(controller, no_restart=False)
    # Ray restarts the actor and retries the call; the restarted controller (its start-up sweep, or the
    # retried one) adopts the dead sweep's intents and finishes them.
    ray.get(sweep, timeout=180)
    summary = ray.get(controller.sweep.remote(now, False), timeout=120)
    assert ray.get(controller.ping.remote())["pid"] != pid_before, "the controller was not really killed"
    assert summary["verification"]["listing_count"] == 0
    for index in range(40):
        prefix = f"{tenant}/b1/p{index:02d}/"
        assert count_versions(store, "uploads", prefix) == 0 and count_versions(store, "models", prefix) == 0
    assert not [i for _, i in pending_intents(store) if i["tenant"] == tenant]
    seen: dict[tuple, int] = {}
    receipts = list_receipts(store, tenant=tenant)
    assert any(receipt.completed_from for receipt in receipts), "no sweep adopted the killed sweep's intents"
    for receipt in receipts:
        assert verify_receipt(store, receipt.receipt_id)["verified"]
        for item in receipt.objects:
            identity = (item["bucket"], item["key"], item["version_id"])
            seen[identity] = seen.get(identity, 0) + 1
    assert len(seen) == 40 * 24 and set(seen.values()) == {1}


def test_cancel_stops_a_running_person_and_retry_runs_it_again(coordinator, slow_config, store):
    import ray

    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:4]
    manifest = BatchManifest(tenant="acme-cancel", name="Cancel team", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("cleo", "Cleo Cancelled", None, photos)])
    submitted = client.submit_batch(slow_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    cleo = keys.PersonRef(submitted.tenant, submitted.batch_id, "cleo")
    wait_for(lambda: count_versions(store, "models", keys.checkpoint_key(cleo)) > 0, 120, "cleo's first checkpoint")
    result = ray.get(coordinator.cancel_persons.remote(
        [{"tenant": cleo.tenant, "batch_id": cleo.batch_id, "person_id": "cleo"}]))
    assert result["cancelled"] == ["cleo"]
    states = StateStore(store)
    assert states.load_person(cleo.tenant, cleo.batch_id, "cleo").state == "cancelled"
    checkpoints = count_versions(store, "models", keys.checkpoint_key(cleo))
    time.sleep(3)  # a fine-tune still running would write a checkpoint every 5 steps (~0.5 s)
    assert count_versions(store, "models", keys.checkpoint_key(cleo)) == checkpoints

    ray.get(coordinator.retry_person.remote(cleo.tenant, cleo.batch_id, "cleo"))
    wait_for(lambda: states.load_batch(cleo.tenant, cleo.batch_id).state == "done", 300, "the retried batch")
    person = states.load_person(cleo.tenant, cleo.batch_id, "cleo")
    assert person.state == "done" and person.train_steps_done == 300 and len(person.headshots) == 1
