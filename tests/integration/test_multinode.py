"""A real multi-node Ray cluster on one machine (issue #12): hosts in network namespaces on a bridge
(tests/integration/multinode.py), the S3 server on a host of its own, and nodes lost or cut off.

The coordinator and the retention controller run on the head (created by a driver on the head host,
with their soft affinity to it; the head declares no GPU), GPU workers on the two worker hosts (one fake
GPU each). The test process stays in the root namespace: it reaches the S3 server over the bridge and
drives Ray through :class:`multinode.Driver`.

Select with ``-m multinode``; they run in CI by default (as root, with iproute2; skipped otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import time
import uuid
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import keys
from storage.keys import PersonRef
from storage.state import StateStore
from tests.integration import multinode
from tests.integration.multinode_fixtures import config, key_store, store  # noqa: F401
from tests.integration.batch_counts import assert_every_person_exactly_once
from tests.integration.batch_counts import checkpoint_steps as _checkpoint_steps
from tests.integration.batch_counts import checkpoint_versions as _checkpoint_versions
from tests.integration.conftest import TEST_CONSENT
from tests.integration.ray_actors import wait_for

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(multinode.require_root_and_iproute() is not None,
                       reason=f"multi-node cluster: {multinode.require_root_and_iproute()}"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
# Fine-tunes long enough that a node can be killed mid-way (a checkpoint every 5 tiny steps), and
# generation slow enough (more denoising steps, one image per call) that a partition lands mid-way.
TRAINING = {"steps": 30, "rank": 4, "learning_rate": 1e-3, "checkpoint_every": 3}
GENERATION = {"batch_size": 1, "steps_override": 12}
PHOTOS = 2

@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    # A short root: Ray's unix socket paths under it must stay under ~107 characters.
    root = Path("/tmp") / f"hsc-{secrets.token_hex(3)}"
    failed_before = request.session.testsfailed
    started = multinode.up(root)
    yield started
    try:
        multinode.down(started)
    finally:
        if request.session.testsfailed > failed_before:
            # Keep the logs of a failing run (Ray's session logs, the S3 server's, the drivers').
            keep = tmp_path_factory.mktemp("multinode-logs")
            shutil.copytree(root, keep / root.name, ignore=shutil.ignore_patterns("*.sock", "sockets", "*.dat",
                                                                                  "*.idx", "*.ecx", "*.crt", "*.key"),
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
            print(f"multi-node cluster logs kept in {keep / root.name}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def settings(cluster, tmp_path_factory) -> dict:
    """The stack's config on this cluster (as a dict: the driver builds the same Config from it)."""
    suffix = uuid.uuid4().hex[:6]
    return {
        "home": str(tmp_path_factory.mktemp("multinode-home")),
        "store": {**cluster.store_settings(),
                  **{f"bucket_{a}": f"mn-{suffix}-{a}" for a in
                     ("uploads", "derived", "models", "outputs", "state", "receipts")}},
        "training": TRAINING,
        "generation": GENERATION,
        "ingest": {"min_photos": PHOTOS},
        "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
        "ray": {"address": cluster.ray_address, "namespace": f"mn-{suffix}"},
    }


@pytest.fixture(scope="module")
def driver(cluster, config):
    handle = multinode.Driver(cluster, namespace=config.ray.namespace)
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def stack(cluster, driver, settings, store):
    """The coordinator and retention controller (created from the head host) and two GPU workers."""
    driver.call("start_stack", settings)
    workers = driver.call("wait_gpu_workers", 2)
    yield workers
    with contextlib.suppress(Exception):
        driver.call("remove_stack", timeout_s=120)


def _submit(config, tenant: str, count: int, images_per_style: int):
    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:PHOTOS]
    manifest = BatchManifest(tenant=tenant, name="Multi-node team", base_model="tiny", styles=["office"],
                             images_per_style=images_per_style, consent=TEST_CONSENT,
                             persons=[PersonSpec(f"p{index}", f"Person {index}", None, photos)
                                      for index in range(count)])
    return client.submit_batch(config, manifest, start=False)


def _all_versions(store, prefix: str) -> set[tuple[str, str, str]]:
    """(artifact, key, version id) of every version under ``prefix`` in the classes stages write."""
    return {(artifact, key, version) for artifact in ("derived", "models", "outputs")
            for key, version, marker in store.list_versions(artifact, prefix) if not marker}


def _assert_every_person_exactly_once(store, batch_id: str, tenant: str, *, count: int, images: int) -> list:
    return assert_every_person_exactly_once(store, batch_id, tenant, count=count, images=images,
                                            steps=TRAINING["steps"])


def _wait_done(store, tenant: str, batch_id: str, timeout_s: float = 600) -> None:
    states = StateStore(store)
    wait_for(lambda: states.load_batch(tenant, batch_id).state != "running", timeout_s,
             "the batch to finish", poll_s=1.0)


def _host_at(cluster, address: str):
    return next(host for host in cluster.workers if host.address == address)


def test_cluster_has_a_head_without_gpus_and_two_gpu_workers_on_their_own_hosts(cluster, driver):
    nodes = {node["address"]: node for node in driver.call("nodes") if node["alive"]}
    worker_addresses = {host.address for host in cluster.workers}
    assert set(nodes) == {cluster.head.address} | worker_addresses
    assert nodes[cluster.head.address]["resources"].get("GPU", 0) == 0
    assert all(nodes[address]["resources"].get("GPU") == 1 for address in worker_addresses)
    # The driver itself is on the head host, at its address.
    assert driver.call("ping")["node_ip"] == cluster.head.address
    # A task asking for a GPU can only land on a worker host; two of them take both.
    placed = driver.call("gpu_task_nodes", 2)
    assert sorted(task["node_ip"] for task in placed) == sorted(worker_addresses)
    # Every host's processes live in its own namespace.
    for host in cluster.ray_hosts:
        assert multinode.netns_pids(host.netns), host.name


def test_ray_refuses_a_driver_without_the_cluster_token(cluster):
    import subprocess
    import sys

    script = ("import ray\n"
              f"ray.init(address={cluster.ray_address!r}, _node_ip_address={cluster.head.address!r})\n"
              "print('connected')\n")
    environment = {key: value for key, value in cluster.ray_environment().items() if key != "RAY_AUTH_TOKEN_PATH"}
    completed = subprocess.run(["ip", "netns", "exec", cluster.head.netns, sys.executable, "-c", script],
                               env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home", **environment},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "connected" not in completed.stdout, completed.stdout
    assert "token" in completed.stderr.lower(), completed.stderr[-2000:]


def test_the_stack_runs_its_singletons_on_the_head_and_gpu_workers_on_the_worker_hosts(cluster, driver, stack):
    from cluster.actors import COORDINATOR_NAME, RETENTION_NAME

    placed = driver.call("actor_nodes")
    assert placed[COORDINATOR_NAME]["node_ip"] == cluster.head.address, placed
    assert placed[RETENTION_NAME]["node_ip"] == cluster.head.address, placed
    assert sorted(info["node_ip"] for info in stack) == sorted(host.address for host in cluster.workers)
    assert all(info["head_lease"]["valid"] for info in stack), stack

def test_a_worker_node_killed_mid_fine_tune_the_batch_finishes_on_the_other_node(cluster, driver, stack, config,
                                                                               store, key_store, tenant):
    submitted = _submit(config, tenant, 2, images_per_style=1)
    driver.call("submit", submitted.tenant, submitted.batch_id)
    victim: dict = {}

    def training_with_a_checkpoint() -> bool:
        for info in driver.call("gpu_workers"):
            stage, _, prefix = (info.get("running") or "").partition(" ")
            if stage != "train":
                continue
            person = PersonRef(*prefix.strip("/").split("/"))
            # Listings only (cheap): a checkpoint stored, the LoRA not yet.
            if _checkpoint_versions(store, person) and not store.list_versions("models", keys.lora_key(person)):
                victim.update(info=info, person=person)
                return True
        return False

    wait_for(training_with_a_checkpoint, 300, "a fine-tune with a checkpoint stored", poll_s=0.1)
    host = _host_at(cluster, victim["info"]["node_ip"])
    versions_before = _checkpoint_versions(store, victim["person"])
    killed = multinode.kill(cluster, host.name)
    assert victim["info"]["pid"] in killed

    _wait_done(store, submitted.tenant, submitted.batch_id)
    # Finished by the other node alone: nothing of the killed one came back meanwhile.
    assert not multinode.host_processes(cluster, host.name)
    _assert_every_person_exactly_once(store, submitted.batch_id, submitted.tenant, count=2, images=1)
    # Resumed from its last checkpoint: every checkpoint step was written once (a fine-tune started
    # again from scratch, or from an older checkpoint, would have written some step twice).
    steps = _checkpoint_steps(store, key_store, victim["person"])
    steps_before = _checkpoint_steps(store, key_store, victim["person"], versions_before)
    print(f"killed {host.name} at checkpoint steps {sorted(steps_before)}; all checkpoints: {sorted(steps)}")
    assert len(steps) == len(set(steps)), sorted(steps)
    assert set(steps_before) < set(steps)
    assert max(steps) > max(steps_before)

    # The node comes back (a new raylet): the worker Ray could not place meanwhile starts there again.
    multinode.restart_node(cluster, host.name)
    workers = driver.call("wait_gpu_workers", 2)
    assert sorted(info["node_ip"] for info in workers) == sorted(h.address for h in cluster.workers)


# Images per person in the partition test. A worker generates all of a person's images, then stores
# them: the node is cut off while it generates, so its first write comes after the cut.
GENERATED = 3


# link: the node's veth down (it reaches nothing); ray: blackholed to the head and the other worker but
# still reaching S3, the hard case for fencing.
@pytest.mark.parametrize("mode", ["link", "ray"])
def test_a_worker_node_cut_off_mid_generation_finishes_elsewhere_and_writes_nothing_when_it_returns(
        mode, cluster, driver, stack, config, store, tenant):
    """The cut-off node's worker goes on generating; at its first write its lease has lapsed and it
    waits. Ray declares the node dead and the other node generates the person's images (adopting any
    the cut-off one stored in time). Healed, the node hears it was declared dead: its raylet exits and
    takes the stale worker with it, writing nothing. Then it is started again and takes work."""
    submitted = _submit(config, tenant, 2, images_per_style=GENERATED)
    driver.call("submit", submitted.tenant, submitted.batch_id)
    victim: dict = {}

    def generating() -> bool:
        for info in driver.call("gpu_workers"):
            stage, _, prefix = (info.get("running") or "").partition(" ")
            if stage == "generate":
                victim.update(info=info, person=PersonRef(*prefix.strip("/").split("/")))
                return True
        return False

    wait_for(generating, 300, "a generation", poll_s=0.1)
    host = _host_at(cluster, victim["info"]["node_ip"])
    multinode.partition(cluster, host.name, mode=mode)
    cut_at = time.time()
    stored_at_cut = len(store.list_versions("outputs", victim["person"].prefix + "headshots/"))
    multinode.wait_for_nodes(cluster, {host.address}, alive=False)
    declared_dead_after_s = time.time() - cut_at
    _wait_done(store, submitted.tenant, submitted.batch_id)
    batch_prefix = f"{submitted.tenant}/{submitted.batch_id}/"
    before_heal = _all_versions(store, batch_prefix)
    # The stale worker is still alive, cut off: it paused once its lease lapsed.
    assert victim["info"]["pid"] in multinode.host_processes(cluster, host.name)

    multinode.heal(cluster, host.name)
    wait_for(lambda: victim["info"]["pid"] not in multinode.host_processes(cluster, host.name), 120,
             "the stale worker to exit once its node hears it was declared dead")
    assert _all_versions(store, batch_prefix) == before_heal, "the node wrote something when it came back"

    persons = _assert_every_person_exactly_once(store, submitted.batch_id, submitted.tenant, count=2,
                                                images=GENERATED)
    for person in persons:
        # Every version of the stages' classes is in the person's state: what the cut-off worker
        # stored before its lease lapsed was adopted by the run that finished the person.
        recorded = {(o.artifact, o.key, o.version_id) for o in person.objects}
        assert _all_versions(store, person.ref.prefix) <= recorded, person.person_id
    worker_logs = "".join(path.read_text(errors="replace") for path in
                          Path(host.temp_dir).glob("session_*/logs/worker-*.err"))
    print(f"cut off {host.name} ({mode}) generating {victim['person'].person_id} ({stored_at_cut} of {GENERATED} stored); "
          f"declared dead after {declared_dead_after_s:.1f} s; the cut-off worker's lease lapsed: "
          f"{'head lease lapsed' in worker_logs}")
    multinode.restart_node(cluster, host.name)
    workers = driver.call("wait_gpu_workers", 2)
    assert sorted(info["node_ip"] for info in workers) == sorted(h.address for h in cluster.workers)

def _person_files(node_cache: Path, person: PersonRef) -> list[Path]:
    """Files of this person anywhere under a node's persons/ folder (any worker's folder, or bare)."""
    persons = node_cache / "persons"
    return [path for path in persons.rglob("*") if path.is_file()
            and person.prefix.rstrip("/") in path.relative_to(persons).as_posix()] if persons.exists() else []


def test_an_early_deletion_while_a_worker_node_is_cut_off_completes_and_the_node_returns_without_the_person(
        cluster, driver, stack, config, store, tenant):
    """The deletion does not wait for the cut-off node: the other node confirms its purge, the cut-off
    one is recorded as not confirmed with how it is covered. Healed, its stale worker exits; restarted,
    its new worker wipes the person's files from the node's disk at start and refuses the person."""
    from storage.receipts import load_receipt, verify_receipt

    submitted = _submit(config, tenant, 1, images_per_style=1)
    person = PersonRef(submitted.tenant, submitted.batch_id, "p0")
    workers = {info["node_ip"]: info for info in driver.call("wait_gpu_workers", 2)}
    victim, other = cluster.workers[0], cluster.workers[1]
    # A copy of the person on each node's disk, where a worker keeps person files.
    planted = {}
    for host in (victim, other):
        folder = Path(cluster.root) / "node-cache" / host.name / "persons" / person.prefix
        folder.mkdir(parents=True, exist_ok=True)
        planted[host.name] = folder / "lora.safetensors"
        planted[host.name].write_bytes(b"a person's LoRA, as a worker would keep it")

    multinode.partition(cluster, victim.name, mode="ray")
    result = driver.call("delete_person", person.tenant, person.batch_id, person.person_id, True)
    multinode.wait_for_nodes(cluster, {victim.address}, alive=False)
    assert result["verification"]["listing_count"] == 0
    receipt = load_receipt(store, result["receipt_id"])
    assert verify_receipt(store, receipt.receipt_id)["verified"]
    print(f"receipt nodes: {receipt.nodes}")
    nodes = {node["node_id"]: node for node in receipt.nodes}
    confirmed = nodes[workers[other.address]["node_id"]]
    assert confirmed["confirmed"] and confirmed["outcome"] == "confirmed" and confirmed["coverage"] is None
    assert [(w["worker_id"], w["purged"], w["local_files_removed"]) for w in confirmed["workers"]] == [
        (workers[other.address]["worker_id"], True, 1)]
    assert not planted[other.name].exists()
    cut_off = nodes[workers[victim.address]["node_id"]]
    assert cut_off["address"] == victim.address and cut_off["confirmed"] is False
    assert cut_off["outcome"] == "node_dead" and cut_off["state"] == "dead"
    assert [(w["worker_id"], w["purged"]) for w in cut_off["workers"]] == [(workers[victim.address]["worker_id"], False)]
    assert cut_off["coverage"]["barriers_in_store"] is True
    assert cut_off["coverage"]["mechanisms"] == ["deletion_barrier", "person_files_wiped_at_worker_start",
                                                 "cut_off_worker_self_fences", "raylet_exits_when_node_returns"]
    assert [n["address"] for n in result["nodes"]["not_confirmed"]] == [victim.address]
    # The cut-off node could not be told: its copy is still on its disk.
    assert planted[victim.name].exists()

    multinode.heal(cluster, victim.name)
    stale_pid = workers[victim.address]["pid"]
    wait_for(lambda: stale_pid not in multinode.host_processes(cluster, victim.name), 120,
             "the stale worker to exit once its node hears it was declared dead")
    multinode.restart_node(cluster, victim.name)
    back = {info["node_ip"]: info for info in driver.call("wait_gpu_workers", 2)}
    assert sorted(back) == sorted(host.address for host in cluster.workers)
    returned = back[victim.address]
    assert returned["pid"] != stale_pid and returned["start_wipe"]["folders_removed"] >= 1, returned
    assert _person_files(Path(cluster.root) / "node-cache" / victim.name, person) == []
    # The returned node's worker asks the store before any stage: the person is deleted.
    assert driver.call("train_on_node", victim.address, person.tenant, person.batch_id, person.person_id) == {
        "ran": False, "error": "PersonDeleted", "worker_id": returned["worker_id"]}
    for artifact in ("uploads", "derived", "models", "outputs"):
        assert not store.list_versions(artifact, person.prefix), artifact
    assert store.get_json("state", keys.person_state_key(person))["state"] == "deleted"


def test_down_stops_every_process_and_removes_namespaces_and_links(cluster):
    """Last in this module: the cluster goes away completely (the fixture's own down is then a no-op)."""
    multinode.down(cluster)
    assert multinode.links_left(cluster) == []
    for name in cluster.hosts:
        assert not multinode.host_processes(cluster, name), name
