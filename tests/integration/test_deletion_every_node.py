"""Early deletion reaches every node (issue #12), on one machine: a GPU worker that does not answer its
purge costs the deletion one bound and is accounted for in the receipt, and a worker that starts wipes
the person files its node holds from before. (Across real nodes, partitioned and returning:
tests/integration/test_multinode.py.)

The worker that does not answer is a real one, stopped (SIGSTOP): its process and its place in Ray
stay, it simply says nothing, as a hung worker or a node behind a silent partition does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from pathlib import Path

import pytest

from cluster.worker import GpuWorker, claim_person_folder
from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import barrier, keys
from storage.receipts import list_receipts, verify_receipt
from tests.integration.conftest import TEST_CONSENT
from tests.integration.ray_actors import remove_named_actors, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
PURGE_BOUND_S = 5


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(scope="module")
def config(base_config, node_cache):
    return base_config.replace(
        workers=dataclasses.replace(base_config.workers, cache_dir=str(node_cache)),
        retention=dataclasses.replace(base_config.retention, worker_purge_timeout_s=PURGE_BOUND_S))


@pytest.fixture(scope="module")
def stack(ray_cluster, config):
    from cluster.actors import existing_gpu_workers, get_or_create_coordinator, get_or_create_retention_controller

    namespace = config.ray.namespace
    remove_named_actors(ray_cluster, namespace)  # earlier modules' actors run with other configs
    get_or_create_coordinator(config, metrics_port=None)
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 60, "the GPU workers")
    controller = get_or_create_retention_controller(config, metrics_port=None)
    workers = existing_gpu_workers(namespace)
    assert {ray_cluster.get(w.info.remote())["start_wipe"]["persons_dir"] for w in workers} == \
        {str(Path(config.workers.cache_dir) / "persons")}, "GPU workers from another module (another config) survived"
    yield controller, workers
    remove_named_actors(ray_cluster, namespace)


def _person(config, tenant: str) -> keys.PersonRef:
    photos = sorted((EXAMPLES / "grace-hopper").iterdir())[:4]
    manifest = BatchManifest(tenant=tenant, name="Every node", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec("ada", "Ada Lovelace", None, photos)])
    submitted = client.submit_batch(config, manifest, start=False)
    return keys.PersonRef(submitted.tenant, submitted.batch_id, "ada")


def _plant(folder: Path, name: str = "lora.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    planted = folder / name
    planted.write_bytes(b"a person's LoRA, as a worker would keep it")
    return planted


def test_a_worker_that_does_not_answer_costs_one_bound_and_the_receipt_says_how_its_node_is_covered(
        ray_cluster, stack, config, node_cache, store, tenant):
    controller, workers = stack
    person = _person(config, tenant)
    planted = _plant(node_cache / "persons" / person.prefix)
    infos = ray_cluster.get([worker.info.remote() for worker in workers])
    silent, answering = infos[1], infos[0]
    os.kill(silent["pid"], signal.SIGSTOP)
    try:
        # Without its own bound per worker, the deletion would wait for the stopped worker for good
        # (or fail when a single wait for all of them ran out).
        result = ray_cluster.get(controller.delete.remote(person.tenant, person.batch_id, "ada", True, "test-suite"),
                                 timeout=300)
    finally:
        os.kill(silent["pid"], signal.SIGCONT)
    assert result["verification"]["listing_count"] == 0
    receipt = list_receipts(store, tenant=person.tenant, batch_id=person.batch_id, person_id="ada")[0]
    assert receipt.receipt_id == result["receipt_id"]
    assert verify_receipt(store, receipt.receipt_id)["verified"]

    by_worker = {entry["worker_id"]: entry for entry in receipt.worker_purges}
    assert set(by_worker) == {silent["worker_id"], answering["worker_id"]}
    assert by_worker[answering["worker_id"]]["outcome"] == "confirmed" and by_worker[answering["worker_id"]]["purged"]
    assert by_worker[answering["worker_id"]]["local_files_removed"] == 1 and not planted.exists()
    assert by_worker[silent["worker_id"]]["outcome"] == "timed_out" and not by_worker[silent["worker_id"]]["purged"]

    # Both workers share this machine's one Ray node: the node did not confirm, and says how it is covered.
    [node] = receipt.nodes
    assert node["node_id"] == answering["node_id"] == silent["node_id"] and node["state"] == "alive"
    assert node["confirmed"] is False and node["outcome"] == "timed_out"
    assert {(w["worker_id"], w["outcome"]) for w in node["workers"]} == {
        (answering["worker_id"], "confirmed"), (silent["worker_id"], "timed_out")}
    assert node["coverage"]["barriers_in_store"] is True and barrier.is_deleted(store, person)
    assert node["coverage"]["mechanisms"] == ["deletion_barrier", "person_files_wiped_at_worker_start",
                                              "purge_call_still_queued"]
    assert node["coverage"]["explanation"]
    assert receipt.summary()["nodes"]["not_confirmed"][0]["outcome"] == "timed_out"
    assert result["nodes"]["confirmed"] == 0 and len(result["nodes"]["not_confirmed"]) == 1

    # The purge was left queued, not withdrawn: the worker, running again, refuses the person.
    silent_worker = workers[1]
    wait_for(lambda: ray_cluster.get(silent_worker.is_revoked.remote(person), timeout=30), 120,
             "the stopped worker to run its queued purge")


def test_a_worker_that_starts_wipes_person_files_nobody_holds_and_keeps_base_models(base_config, tmp_path):
    cache = tmp_path / "node-cache"
    persons = cache / "persons"
    config = base_config.replace(workers=dataclasses.replace(base_config.workers, cache_dir=str(cache)))
    # Left by a worker of an older layout, and by a worker process that died (its folder's lock is free).
    bare = _plant(persons / "acme" / "b1" / "ada")
    dead_folder, dead_lock = claim_person_folder(persons)
    from_dead_worker = _plant(dead_folder / "acme" / "b1" / "bob")
    os.close(dead_lock)  # what the process's exit does, however it ends
    # Base models: the rest of the node cache, not person data.
    base_models = [_plant(cache / "base-models" / "models" / "sd15" / "version-1", "model_index.json"),
                   _plant(cache / "models" / "_system" / "base-models" / "sd15", "model_index.json")]

    first = GpuWorker(config, "gpu-first")
    assert not bare.exists() and not from_dead_worker.exists() and not dead_folder.exists()
    assert first.start_wipe["folders_removed"] == 2 and first.start_wipe["files_removed"] == 2
    assert all(path.exists() for path in base_models)
    # A worker that starts beside a running one (two slots on a node) leaves the running one's files.
    in_use = _plant(first._person_scratch(keys.PersonRef("acme", "b1", "cy")))
    second = GpuWorker(config, "gpu-second")
    assert in_use.exists() and second.start_wipe["kept_in_use"] == 1
    assert second.start_wipe["folders_removed"] == 0
    # And a purge on either worker removes a person's files wherever on the node they are.
    purged = second.purge(["acme/b1/cy/"])
    assert purged["purged"] and purged["local_files_removed"] == 1 and not in_use.exists()
    with contextlib.suppress(OSError):
        os.close(first._scratch_lock)
