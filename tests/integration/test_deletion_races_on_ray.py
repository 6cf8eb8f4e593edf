"""Deletion wins on the real stack (issue #17): a person deleted mid-fine-tune while the coordinator is
killed during the deletion and operators fire retries, `more` and photo uploads at them; a done person
deleted while `more` runs. Real local Ray cluster, real S3 server, the stack's own actors.

The coordinator is killed once the deletion's barrier is in the store, so the restarted coordinator
knows nothing of the deletion from memory: only the store's barrier can stop it from running the
person again. Which racer fires first is drawn from the seed.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import barrier, keys
from storage.deletion import count_versions
from storage.receipts import list_receipts, verify_receipt
from storage.state import StateStore
from tests.integration.conftest import TEST_CONSENT
from tests.integration.deletion_audit import assert_erased
from tests.integration.ray_actors import remove_named_actors, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


@pytest.fixture(scope="module")
def slow_config(base_config):
    """Long fine-tunes (a few hundred tiny steps), so a deletion lands mid-training."""
    return base_config.replace(training=base_config.training.__class__(
        steps=120, rank=4, learning_rate=1e-3, checkpoint_every=5))


@pytest.fixture(scope="module")
def stack(ray_cluster, slow_config):
    from cluster.actors import existing_gpu_workers, get_or_create_coordinator, get_or_create_retention_controller

    namespace = slow_config.ray.namespace
    remove_named_actors(ray_cluster, namespace)  # earlier modules' actors run with other configs
    coordinator = get_or_create_coordinator(slow_config, metrics_port=None)
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 60, "the GPU workers")
    workers = existing_gpu_workers(namespace)
    assert {ray_cluster.get(w.info.remote())["training_steps"] for w in workers} == {120}, \
        "GPU workers from another module (another config) survived"
    controller = get_or_create_retention_controller(slow_config, metrics_port=None)
    yield coordinator, controller
    remove_named_actors(ray_cluster, namespace)


def _call_all(calls: list, outcomes: dict[str, str]) -> None:
    """Each call's answer: accepted, refused (a ValueError: the caller's request, refused as asked), or
    the unexpected error itself (the test fails on it)."""
    import ray

    for name, call in calls:
        try:
            ray.get(call(), timeout=120)
            outcomes[name] = "accepted"
        except ray.exceptions.RayTaskError as error:
            outcomes[name] = "refused" if isinstance(error.cause, ValueError) else repr(error.cause)


# One seed in CI (each run trains a batch); the S3-level races in test_deletion_races.py cover many.
@pytest.mark.parametrize("seed", [1])
def test_deletion_mid_fine_tune_survives_a_coordinator_restart_and_racing_operators(seed, stack, slow_config,
                                                                                  store, tenant):
    import ray

    rng = random.Random(seed)
    coordinator, controller = stack
    photos = sorted((EXAMPLES / "grace-hopper").iterdir())[:4]
    manifest = BatchManifest(tenant=tenant, name="Race on Ray", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("target", "Tess Target", None, photos),
                                      PersonSpec("bystander", "Bea Bystander", None, photos)])
    submitted = client.submit_batch(slow_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    target = keys.PersonRef(tenant, submitted.batch_id, "target")
    states = StateStore(store)
    wait_for(lambda: count_versions(store, "models", keys.checkpoint_key(target)) > 0, 180,
             "the target's first checkpoint")
    pid_before = ray.get(coordinator.ping.remote())["pid"]

    deletion = controller.delete.remote(tenant, submitted.batch_id, "target", True, "race-test")
    wait_for(lambda: barrier.is_deleted(store, target), 60, "the deletion's barrier")
    # Operators race the deletion, in an order drawn from the seed; the coordinator dies under them.
    person_args = (tenant, submitted.batch_id, "target")
    racers = [("retry", lambda: coordinator.retry_person.remote(*person_args)),
              ("more", lambda: coordinator.more_headshots.remote(*person_args, 2, None)),
              ("cancel", lambda: coordinator.cancel_persons.remote(
                  [dict(zip(("tenant", "batch_id", "person_id"), person_args))]))]
    rng.shuffle(racers)
    outcomes: dict[str, str] = {}
    operator = threading.Thread(target=_call_all, args=(racers[:2], outcomes))
    operator.start()
    ray.kill(coordinator, no_restart=False)
    operator.join(timeout=300)
    result = ray.get(deletion, timeout=300)
    _call_all(racers[2:], outcomes)
    with pytest.raises(ValueError, match="deleted"):
        client.add_photo_bytes(slow_config, tenant=tenant, batch_id=submitted.batch_id, person_id="target",
                               filename="late.jpg", data=photos[0].read_bytes(), store=store)

    # The restarted coordinator resumes the batch, finishes the bystander, and never runs the target again.
    wait_for(lambda: ray.get(coordinator.ping.remote())["pid"] != pid_before, 60, "the coordinator's restart")
    wait_for(lambda: states.load_batch(tenant, submitted.batch_id).state != "running", 300, "the batch to end")
    # Retry and `more` of a person being deleted are refused; a cancel may answer, but undoes nothing.
    assert outcomes["retry"] == outcomes["more"] == "refused", outcomes
    assert outcomes["cancel"] in ("accepted", "refused"), outcomes
    assert result["verification"]["listing_count"] == 0
    assert_erased(store, target)
    receipts = list_receipts(store, tenant=tenant, batch_id=submitted.batch_id, person_id="target")
    assert receipts and all(verify_receipt(store, r.receipt_id)["verified"] for r in receipts)
    bystander = states.load_person(tenant, submitted.batch_id, "bystander")
    assert bystander.state == "done" and bystander.headshots and bystander.train_steps_done == 120


def test_more_racing_the_deletion_of_a_done_person_stores_nothing_after_it(stack, slow_config, store, tenant):
    import ray

    coordinator, controller = stack
    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:4]
    manifest = BatchManifest(tenant=tenant, name="More race", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("done-one", "Dora Done", None, photos)])
    submitted = client.submit_batch(slow_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    states = StateStore(store)
    wait_for(lambda: states.load_batch(tenant, submitted.batch_id).state == "done", 300, "the batch")
    person = keys.PersonRef(tenant, submitted.batch_id, "done-one")
    before = {key for key, _, _ in store.list_versions("outputs", person.prefix)}

    more = coordinator.more_headshots.remote(tenant, submitted.batch_id, "done-one", 3, None)
    wait_for(lambda: states.load_person(tenant, submitted.batch_id, "done-one").state == "generating", 60,
             "`more` to start")
    # Headshots stay downloadable (outputs kept); everything learnt from the face goes.
    result = ray.get(controller.delete.remote(tenant, submitted.batch_id, "done-one", False, "race-test"),
                     timeout=300)
    try:
        ray.get(more, timeout=300)
    except ray.exceptions.RayTaskError:
        pass  # `more` may end either way; what it may not do is store anything after the barrier
    wait_for(lambda: states.load_batch(tenant, submitted.batch_id).state != "running", 300, "the batch to end")
    assert result["verification"]["listing_count"] == 0
    assert_erased(store, person, include_outputs=False)
    tombstone = store.get_json("state", keys.person_state_key(person))
    recorded = {record["key"] for record in tombstone["headshots"]}
    after = {key for key, _, _ in store.list_versions("outputs", person.prefix)}
    # What is left in outputs is the delivery the tombstone records (and its contact sheet): no headshot
    # that `more` wrote once the deletion had begun, nor one it wrote and never delivered.
    assert before and recorded and recorded <= after
    assert after <= recorded | {keys.person_contact_sheet_key(person)}, after - recorded
