"""The elastic GPU pool on a real local Ray cluster: it grows while work queues and shrinks when idle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from tests.integration.conftest import TEST_CONSENT
from tests.integration.ray_actors import remove_named_actors, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


@pytest.fixture(scope="module")
def elastic_config(base_config):
    # Fine-tunes long enough (150 tiny steps each, four persons on one worker) that the work outlasts a
    # second worker's start many times over, even on a loaded 2-core machine: with the suite's 6 steps
    # the batch could finish before the new worker got anything to do.
    return base_config.replace(
        workers=dataclasses.replace(base_config.workers, autoscale=True, gpu_workers=2, min_gpu_workers=1,
                                    scale_down_idle_s=2),
        training=dataclasses.replace(base_config.training, steps=150, checkpoint_every=50))


def _requested_gpu_bundles(ray) -> int | None:
    """What the pool last asked the autoscaler for (Ray keeps the standing request in its KV store)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(b"autoscaler_resource_request")
    if not raw:
        return None
    payload = json.loads(raw)  # Ray 2.60 stores the bundle list itself
    bundles = payload if isinstance(payload, list) else payload.get("bundles", [])
    return sum(1 for bundle in bundles if bundle.get("GPU"))


def test_the_pool_grows_while_work_queues_and_shrinks_when_idle(ray_cluster, elastic_config, store):
    import ray

    from cluster.actors import existing_gpu_workers, get_or_create_coordinator

    namespace = elastic_config.ray.namespace
    remove_named_actors(ray, namespace)
    coordinator = get_or_create_coordinator(elastic_config, metrics_port=None)
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 1, 60, "the one minimum worker")

    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:4]
    manifest = BatchManifest(tenant="elastic-co", name="Elastic team", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec(f"p{i}", f"Person {i}", None, photos) for i in range(4)])
    submitted = client.submit_batch(elastic_config, manifest, start=False)
    ray.get(coordinator.submit.remote(submitted.tenant, submitted.batch_id))
    # Four persons queue for one worker: the pool asks for a second GPU and starts a second worker.
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 120, "the pool to grow to two workers")
    assert _requested_gpu_bundles(ray) == 2
    assert ray.get(coordinator.wait.remote(submitted.tenant, submitted.batch_id, 600)) == "done"
    # The second worker served stages before the pool shrank again.
    second = ray.get_actor("headshots-gpu-1", namespace=namespace)
    assert ray.get(second.info.remote())["busy_s"] > 0

    # Idle for scale_down_idle_s: back to the minimum, and the standing request shrinks with it.
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 1, 60, "the pool to shrink to one worker")
    wait_for(lambda: _requested_gpu_bundles(ray) == 1, 30, "the autoscaler request to shrink")
    remove_named_actors(ray, namespace)


def test_two_slots_per_gpu_pack_two_workers_onto_one_gpu(ray_cluster, base_config, store):
    import ray

    from cluster.actors import start_gpu_workers

    config = base_config.replace(workers=dataclasses.replace(base_config.workers, gpu_workers=1, slots_per_gpu=2))
    namespace = config.ray.namespace
    remove_named_actors(ray, namespace)
    workers = start_gpu_workers(config, namespace=namespace)
    infos = ray.get([worker.info.remote() for worker in workers], timeout=120)
    assert [info["worker_id"] for info in infos] == ["gpu-0", "gpu-1"]
    # Both run at once on the same (fake) GPU, each holding half of it.
    assert len({info["pid"] for info in infos}) == 2
    assert infos[0]["gpu_ids"] == infos[1]["gpu_ids"] and len(infos[0]["gpu_ids"]) == 1
    remove_named_actors(ray, namespace)
