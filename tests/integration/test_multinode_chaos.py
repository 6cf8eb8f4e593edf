"""The head lost, and chaos, on a real multi-node Ray cluster (issue #12); then every person is counted.

The cluster (tests/integration/multinode.py): a head without GPUs, two worker hosts with one fake GPU
each, the S3 server on a host of its own. A head whose raylet is killed is restarted the way Kubernetes
restarts a head pod without GCS fault tolerance (:func:`multinode.restart_head`): a new GCS that knows
no node and no actor, the worker raylets refused by it and their hosts started again. The stack is then
created again by whoever created it (here a driver on the head host, as ``headshots up`` does in the
head pod's controllers container), and the coordinator resumes the running batch from the store.

The chaos test is seeded: ``HEADSHOTS_MULTINODE_CHAOS_SEED`` replays a run's schedule (the seed and each
fault applied, with its time and target, are printed as they happen). Which host a fault hits depends
on where the stages run at that moment, so a replay repeats the kinds, order and pauses exactly and the
targets as far as the run goes the same way.

Select with ``-m multinode``; run in CI by default (as root, with iproute2; skipped otherwise). The
longest multi-node module: a few minutes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import secrets
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from headshots import client
from headshots.manifest import BatchManifest, PersonSpec
from storage import keys
from storage.keys import PersonRef
from storage.state import StateStore
from tests.integration import multinode
from tests.integration.multinode_fixtures import config, key_store, store  # noqa: F401
from tests.integration.batch_counts import assert_every_person_exactly_once, checkpoint_steps, checkpoint_versions
from tests.integration.conftest import TEST_CONSENT
from tests.integration.ray_actors import wait_for

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(multinode.require_root_and_iproute() is not None,
                       reason=f"multi-node cluster: {multinode.require_root_and_iproute()}"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
WORKER_HOSTS = 2
# Tiny fine-tunes with a checkpoint every 3 steps (a fault mid-training has one to resume from) and
# generation slow enough (one image per call, a few more denoising steps) that faults land in it too.
TRAINING = {"steps": 24, "rank": 4, "learning_rate": 1e-3, "checkpoint_every": 3}
GENERATION = {"batch_size": 1, "steps_override": 10}
PHOTOS = 2
CHAOS_PERSONS = 10
CHAOS_IMAGES = 2
CHAOS_WORKER_KILLS = 3
CHAOS_PARTITIONS = 1
CHAOS_HEAD_KILLS = 1
# Actor SIGKILLs: GPU workers, the coordinator and the retention controller (at least two each).
CHAOS_ACTOR_KILLS = {"gpu": 6, "coordinator": 2, "retention": 2}
SEED = int(os.environ.get("HEADSHOTS_MULTINODE_CHAOS_SEED", "20261203"))


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    # A short root: Ray's unix socket paths under it must stay under ~107 characters.
    root = Path("/tmp") / f"hsq-{secrets.token_hex(3)}"
    failed_before = request.session.testsfailed
    started = multinode.up(root, workers=WORKER_HOSTS)
    yield started
    try:
        multinode.down(started)
    finally:
        if request.session.testsfailed > failed_before:
            kept = multinode.copy_logs(started, tmp_path_factory.mktemp("multinode-chaos-logs"))
            print(f"multi-node cluster logs kept in {kept}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def settings(cluster, tmp_path_factory) -> dict:
    """The stack's config on this cluster (a dict: the driver builds the same Config from it)."""
    suffix = uuid.uuid4().hex[:6]
    return {
        "home": str(tmp_path_factory.mktemp("multinode-chaos-home")),
        "store": {**cluster.store_settings(),
                  **{f"bucket_{a}": f"mq-{suffix}-{a}" for a in
                     ("uploads", "derived", "models", "outputs", "state", "receipts")}},
        "training": TRAINING,
        "generation": GENERATION,
        "ingest": {"min_photos": PHOTOS},
        # As the chart sets it: a coordinator created while the worker nodes are still joining creates
        # its workers anyway (they wait for a GPU) instead of counting the GPUs present.
        "workers": {"gpu_workers": WORKER_HOSTS},
        "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
        "ray": {"address": cluster.ray_address, "namespace": f"mq-{suffix}"},
    }


class Stack:
    """The stack's creator on the head host: a driver that creates the coordinator and the retention
    controller (the coordinator creates the GPU workers). A head restarted whole takes the driver and
    every actor with it; :meth:`restart_head` restarts it and creates the stack again, as the head
    pod's controllers container does."""

    def __init__(self, cluster: multinode.Cluster, settings: dict):
        self.cluster = cluster
        self.settings = settings
        self.driver: multinode.Driver | None = None
        self.epochs: list[int] = []  # the coordinator's epoch after each creation

    def create(self) -> list[dict]:
        self.driver = multinode.Driver(self.cluster, namespace=self.settings["ray"]["namespace"])
        self.epochs.append(self.driver.call("start_stack", self.settings)["epoch"])
        return self.driver.call("wait_gpu_workers", WORKER_HOSTS)

    def call(self, function: str, *args, **kwargs):
        return self.driver.call(function, *args, **kwargs)

    def restart_head(self) -> dict[str, float]:
        """Restart the head whole (and the worker hosts, once their raylets exited), then the stack.
        Returns seconds until each worker host's old raylet exited."""
        exited_after_s = multinode.restart_head(self.cluster)
        self.driver.close()  # it was stopped with the head
        self.create()
        return exited_after_s

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.call("remove_stack", timeout_s=120)
            self.driver.close()


@pytest.fixture(scope="module")
def stack(cluster, settings, store):
    created = Stack(cluster, settings)
    workers = created.create()
    assert sorted(info["node_ip"] for info in workers) == sorted(host.address for host in cluster.workers)
    yield created
    created.close()


def _submit(config, tenant: str, count: int, images_per_style: int):
    photos = sorted((EXAMPLES / "eileen-collins").iterdir())[:PHOTOS]
    manifest = BatchManifest(tenant=tenant, name="Multi-node chaos team", base_model="tiny", styles=["office"],
                             images_per_style=images_per_style, consent=TEST_CONSENT,
                             persons=[PersonSpec(f"p{index:02d}", f"Person {index}", None, photos)
                                      for index in range(count)])
    return client.submit_batch(config, manifest, start=False)


def _gpu_stages(stack: Stack) -> list[tuple[str, PersonRef, dict]]:
    """(stage, person, worker info) of every GPU stage running now."""
    running = []
    for info in stack.call("gpu_workers"):
        stage, _, prefix = (info.get("running") or "").partition(" ")
        if stage in ("train", "generate"):
            running.append((stage, PersonRef(*prefix.strip("/").split("/")), info))
    return running


def _wait_done(store, tenant: str, batch_id: str, timeout_s: float) -> None:
    states = StateStore(store)
    wait_for(lambda: states.load_batch(tenant, batch_id).state != "running", timeout_s,
             "the batch to finish", poll_s=1.0)


def _host_at(cluster, address: str) -> multinode.Host:
    return next(host for host in cluster.ray_hosts if host.address == address)


@pytest.mark.timeout(900)
def test_the_head_raylet_killed_mid_fine_tune_the_batch_finishes_once_the_head_is_back(
        cluster, stack, config, store, key_store, tenant):
    """The head's raylet, agents and workers SIGKILLed while a fine-tune runs on a worker node; the
    GCS survives but declares the head dead, and nothing can restart the singletons (only the head has
    their resource). The head restarts whole, the worker nodes follow, the stack is created again: the
    new coordinator claims a newer epoch, resumes the batch from the store and the fine-tune from its
    last checkpoint; every person is done exactly once."""
    from cluster.actors import COORDINATOR_NAME, RETENTION_NAME

    submitted = _submit(config, tenant, 3, images_per_style=1)
    stack.call("submit", submitted.tenant, submitted.batch_id)
    victim: dict = {}

    def training_with_a_checkpoint() -> bool:
        for stage, person, _ in _gpu_stages(stack):
            # Listings only (cheap): a checkpoint stored, the LoRA not yet.
            if stage == "train" and checkpoint_versions(store, person) \
                    and not store.list_versions("models", keys.lora_key(person)):
                victim["person"] = person
                return True
        return False

    wait_for(training_with_a_checkpoint, 300, "a fine-tune with a checkpoint stored", poll_s=0.1)
    singletons = stack.call("actor_nodes")
    versions_before = checkpoint_versions(store, victim["person"])
    killed = multinode.kill_head_raylet(cluster)
    assert {singletons[COORDINATOR_NAME]["pid"], singletons[RETENTION_NAME]["pid"]} <= killed, singletons
    # What Ray 2.x does with the GCS still up: the head node is declared dead, the worker nodes live on.
    multinode.wait_for_nodes(cluster, {cluster.head.address}, alive=False)
    multinode.wait_for_nodes(cluster, {host.address for host in cluster.workers})

    exited_after_s = stack.restart_head()
    _wait_done(store, submitted.tenant, submitted.batch_id, timeout_s=600)
    assert_every_person_exactly_once(store, submitted.batch_id, submitted.tenant, count=3, images=1,
                                     steps=TRAINING["steps"])
    # Resumed from its last checkpoint: every checkpoint step was written once (a fine-tune started
    # again from scratch, or from an older checkpoint, would have written some step twice).
    steps = checkpoint_steps(store, key_store, victim["person"])
    steps_before = checkpoint_steps(store, key_store, victim["person"], versions_before)
    print(f"head raylet killed at checkpoint steps {sorted(steps_before)} of {victim['person'].person_id}; "
          f"all checkpoints: {sorted(steps)}; worker raylets exited {exited_after_s} s after the head restarted")
    assert len(steps) == len(set(steps)), sorted(steps)
    assert set(steps_before) < set(steps)
    # A new coordinator (a new GCS knows no actor) that took over from the store with a newer epoch,
    # its singletons on the new head and its workers on the worker hosts.
    assert stack.epochs[-1] > stack.epochs[0], stack.epochs
    placed = stack.call("actor_nodes")
    assert placed[COORDINATOR_NAME]["node_ip"] == placed[RETENTION_NAME]["node_ip"] == cluster.head.address
    workers = stack.call("wait_gpu_workers", WORKER_HOSTS)
    assert sorted(info["node_ip"] for info in workers) == sorted(host.address for host in cluster.workers)


# --- chaos ---------------------------------------------------------------------------------------

@dataclass
class Fault:
    at_s: float  # since the chaos started
    kind: str
    target: str
    detail: str = ""
    batch_running: bool = True

    def __str__(self) -> str:
        return f"{self.at_s:7.1f} s  {self.kind:18s} {self.target:22s} {self.detail}"


@dataclass
class ChaosSchedule:
    """The seeded plan: node-level faults in a random order, two actor SIGKILLs after each, random pauses."""
    seed: int
    steps: list[tuple[str, str]] = field(default_factory=list)  # (kind, actor kind or "") in order
    pauses_s: list[float] = field(default_factory=list)

    @classmethod
    def plan(cls, seed: int) -> "ChaosSchedule":
        rng = random.Random(seed)
        node_faults = (["worker-node-kill"] * CHAOS_WORKER_KILLS + ["partition"] * CHAOS_PARTITIONS
                       + ["head-raylet-kill"] * CHAOS_HEAD_KILLS)
        rng.shuffle(node_faults)
        actors = [kind for kind, count in CHAOS_ACTOR_KILLS.items() for _ in range(count)]
        rng.shuffle(actors)
        per_fault = -(-len(actors) // len(node_faults))
        schedule = cls(seed)
        for index, node_fault in enumerate(node_faults):
            schedule.steps.append((node_fault, ""))
            schedule.steps += [("actor-kill", kind) for kind in actors[index * per_fault:(index + 1) * per_fault]]
        schedule.pauses_s = [round(rng.uniform(0.5, 3.0), 2) for _ in schedule.steps]
        return schedule


class Chaos:
    """Applies a :class:`ChaosSchedule` to the cluster while a batch runs, one fault at a time (each
    node fault recovered before the next: a node killed is restarted, a partition healed and its node
    restarted once its raylet exited, the head restarted whole)."""

    def __init__(self, cluster: multinode.Cluster, stack: Stack, store, batch: tuple[str, str], seed: int):
        self.cluster = cluster
        self.stack = stack
        self.store = store
        self.batch = batch
        self.seed = seed
        self.rng = random.Random(seed ^ 0x5EED)  # targets: drawn apart from the plan, so the plan stays fixed
        self.started = time.monotonic()
        self.applied: list[Fault] = []

    def _running(self) -> bool:
        return StateStore(self.store).load_batch(*self.batch).state == "running"

    def _log(self, kind: str, target: str, detail: str = "", *, batch_running: bool) -> Fault:
        fault = Fault(round(time.monotonic() - self.started, 1), kind, target, detail, batch_running)
        self.applied.append(fault)
        print(f"chaos seed {self.seed}: {fault}", flush=True)
        return fault

    def _busy_worker_host(self, timeout_s: float = 60.0) -> tuple[multinode.Host, str]:
        """A worker host running a GPU stage (waits for one, up to ``timeout_s``), else any worker host."""
        found: list = []

        def busy() -> bool:
            found[:] = _gpu_stages(self.stack)
            return bool(found)

        with contextlib.suppress(AssertionError):
            wait_for(busy, timeout_s, "a GPU stage to run", poll_s=0.2)
        if not found:
            return self.rng.choice(self.cluster.workers), "idle"
        stage, person, info = self.rng.choice(found)
        return _host_at(self.cluster, info["node_ip"]), f"mid-{stage} of {person.person_id}"

    def worker_node_kill(self) -> None:
        host, during = self._busy_worker_host()
        running = self._running()
        killed = multinode.kill(self.cluster, host.name)
        self._log("worker-node-kill", host.name, f"{during}, {len(killed)} processes", batch_running=running)
        multinode.restart_node(self.cluster, host.name)

    def partition(self) -> None:
        host, during = self._busy_worker_host()
        mode = self.rng.choice(["link", "ray"])
        running = self._running()
        multinode.partition(self.cluster, host.name, mode=mode)
        self._log("partition", host.name, f"{mode}, {during}", batch_running=running)
        multinode.wait_for_nodes(self.cluster, {host.address}, alive=False)
        multinode.heal(self.cluster, host.name)
        # Healed, the node hears it was declared dead: its raylet exits with the stale workers.
        wait_for(lambda: not multinode.raylet_pids(self.cluster, host.name), 120,
                 f"the raylet of {host.name} to exit after the heal")
        self._log("heal", host.name, "its raylet exited; restarting it", batch_running=self._running())
        multinode.restart_node(self.cluster, host.name)

    def head_raylet_kill(self) -> None:
        _, during = self._busy_worker_host()
        running = self._running()
        killed = multinode.kill_head_raylet(self.cluster)
        self._log("head-raylet-kill", multinode.HEAD, f"{during}, {len(killed)} processes", batch_running=running)
        exited_after_s = self.stack.restart_head()
        self._log("head-restarted", multinode.HEAD, f"worker raylets exited after {exited_after_s} s",
                  batch_running=self._running())

    def actor_kill(self, actor_kind: str) -> None:
        from cluster.actors import COORDINATOR_NAME, GPU_WORKER_PREFIX, RETENTION_NAME

        chosen: dict = {}

        def a_live_target() -> bool:
            actors = self.stack.call("actor_nodes")
            if actor_kind == "gpu":
                names = sorted(name for name in actors if name.startswith(GPU_WORKER_PREFIX))
            else:
                names = [COORDINATOR_NAME if actor_kind == "coordinator" else RETENTION_NAME]
            live = [name for name in names if actors[name]["state"] == "ALIVE" and actors[name]["pid"]
                    and actors[name]["node_ip"]]
            if not live:
                return False
            name = self.rng.choice(live)
            host = _host_at(self.cluster, actors[name]["node_ip"])
            # The table's pid must still be that actor's process on its host (not a pid reused since).
            if actors[name]["pid"] not in multinode.host_processes(self.cluster, host.name):
                return False
            chosen.update(name=name, pid=actors[name]["pid"], host=host.name)
            return True

        wait_for(a_live_target, 120, f"a live {actor_kind} actor to kill", poll_s=0.5)
        running = self._running()
        os.kill(chosen["pid"], signal.SIGKILL)
        self._log("actor-kill", chosen["name"], f"pid {chosen['pid']} on {chosen['host']}", batch_running=running)

    def run(self, schedule: ChaosSchedule) -> None:
        for (kind, actor_kind), pause_s in zip(schedule.steps, schedule.pauses_s):
            # The schedule's own pacing (where in the stages a fault lands), not a wait for a condition.
            time.sleep(pause_s)
            if kind == "actor-kill":
                self.actor_kill(actor_kind)
            else:
                getattr(self, kind.replace("-", "_"))()

    def count(self, kind: str) -> int:
        return sum(fault.kind == kind for fault in self.applied)


@pytest.mark.timeout(1500)
def test_a_batch_under_seeded_chaos_on_the_cluster_finishes_every_person_exactly_once(
        cluster, stack, config, store, tenant):
    schedule = ChaosSchedule.plan(SEED)
    print(f"chaos seed {SEED} (replay: HEADSHOTS_MULTINODE_CHAOS_SEED={SEED}); plan: "
          f"{[kind if not actor else f'{kind}:{actor}' for kind, actor in schedule.steps]}", flush=True)
    submitted = _submit(config, tenant, CHAOS_PERSONS, images_per_style=CHAOS_IMAGES)
    stack.call("submit", submitted.tenant, submitted.batch_id)
    # The first fault lands once fine-tunes have started.
    wait_for(lambda: any(stage == "train" for stage, _, _ in _gpu_stages(stack)), 300, "a fine-tune", poll_s=0.2)

    chaos = Chaos(cluster, stack, store, (submitted.tenant, submitted.batch_id), SEED)
    try:
        chaos.run(schedule)
        _wait_done(store, submitted.tenant, submitted.batch_id, timeout_s=900)
    finally:
        print(f"chaos seed {SEED}: {len(chaos.applied)} faults applied:\n" + "\n".join(map(str, chaos.applied)))
    finished_s = time.monotonic() - chaos.started

    persons = assert_every_person_exactly_once(store, submitted.batch_id, submitted.tenant, count=CHAOS_PERSONS,
                                               images=CHAOS_IMAGES, steps=TRAINING["steps"])
    print(f"chaos seed {SEED}: the batch finished {finished_s:.0f} s after the first fault; "
          f"attempts {[p.attempts for p in persons]}")
    assert chaos.count("worker-node-kill") >= 3 and chaos.count("partition") >= 1 and chaos.count("heal") >= 1
    assert chaos.count("head-raylet-kill") >= 1 and chaos.count("head-restarted") >= 1
    kills = [fault for fault in chaos.applied if fault.kind == "actor-kill"]
    assert len(kills) >= 10, kills
    assert any(fault.target.startswith("headshots-gpu-") for fault in kills)
    assert {"headshots-coordinator", "headshots-retention"} <= {fault.target for fault in kills}
    # Every fault hit a running batch (a fault after the batch finished would count for nothing).
    late = [str(fault) for fault in chaos.applied if not fault.batch_running]
    assert not late, f"faults applied after the batch had finished (make the batch longer): {late}"
    # Each head restart brought a new coordinator with a newer epoch.
    assert stack.epochs == sorted(stack.epochs) and len(set(stack.epochs)) == len(stack.epochs), stack.epochs
    workers = stack.call("wait_gpu_workers", WORKER_HOSTS)
    assert sorted(info["node_ip"] for info in workers) == sorted(host.address for host in cluster.workers)
