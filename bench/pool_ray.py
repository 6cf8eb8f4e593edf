"""Benchmark: the real coordinator and GPU pool on Ray, with simulated GPU workers on fake GPUs.

    python bench/pool_ray.py [--gpus 8] [--persons 200] [--small 10] [--scale 100] [--repeats 1] [--json]

What is real: :class:`cluster.coordinator.Coordinator` (in this process, in an asyncio loop), every
state document it reads and writes (an embedded SeaweedFS server started here), the
:class:`cluster.actors.RayWorkerPool` (its :class:`cluster.scheduler.FairScheduler`, its dispatch,
Ray actor calls), and a local Ray cluster (``num_cpus=2``, ``num_gpus=--gpus``) whose worker actors
each hold one fake GPU. The workers are :class:`cluster.worker.GpuWorker` with their model work
replaced by sleeping: fencing, revocation, the epoch check and the one-stage-at-a-time lock
(``_forgets_person_key``) are the real code.

What is simulated:
- GPU stages sleep for the GPU baseline in docs/measured-facts.md divided by ``--scale``: fine-tune 100 s,
  40 images 26 s, a base-model switch 5 s (assumed, as in ``bench/scheduler_sim.py``). No object is
  written by a stage; the generate stage returns 40 headshot records, so state documents have their
  real size.
- CPU stages (ingest, packaging) return at once, in this process: the real ingest (dlib) and
  packaging are measured in ``bench/upload_checks.py`` and ``bench/demo_batch.py``; here they would
  only add Ray task start-up on two cores to what is measured. ``--cpu-stages ray`` runs them as tiny
  Ray tasks instead (``num_cpus=1``, like ``cluster.actors``).
- The scheduler's priors (100 s / 26 s) and its affinity slack (120 s) are divided by ``--scale`` too,
  so it starts from the same relative estimates as on real GPUs.

Workload (the issue's): a ``studio`` batch of ``--persons - --small`` persons submitted at t=0 and a
``corp`` batch of ``--small`` persons ``--corp-at`` s later, each person 4 accepted photos, two
styles × 20 images; the tenants use different base models unless ``--corp-model`` equals
``--studio-model``. Each repeat runs it under two policies, one after the other on the same Ray
cluster and S3 server:
- ``fair``: ``RayWorkerPool`` as shipped (FairScheduler, equal tenant weights).
- ``fifo``: the same pool with the scheduler replaced by ``bench/scheduler_sim.py``'s ``NaiveFifoPool``
  (the pool before fair share: requests in arrival order, the worker idle longest): the baseline.

Figures (per policy; medians over repeats):
- GPU utilisation: busy seconds of all workers (stages and model switches, measured inside the
  actors) / (GPUs × time from the first submit to the last GPU stage's end). Also over the steady
  part: from when every worker has started its first stage until the first worker ran its last.
- Scheduler overhead per GPU task: perf_counter time inside the scheduler's ``submit``,
  ``next_assignment`` and ``complete`` (all calls, empty ones too) / GPU tasks; per decision (a
  ``next_assignment`` that returned work) median and p99; and time in ``RayWorkerPool._dispatch``.
- Dispatch latency: on each worker, from a stage's end to the start of its next stage (both taken in
  the actor), when work was queued as the stage completed: Ray's reply, the coordinator's event loop,
  the scheduler, the actor call. Split into return (actor end → pool ``complete``) and send (pool
  decision → actor start).
- Fair-share error: while both tenants have persons outstanding (submitted, GPU stages not done),
  the corp tenant's GPU-seconds against its weighted max-min share of the GPUs (capped by its
  outstanding persons), in share points.
- Small batch: corp submit → its first person's generate done (first headshots), → its last
  person's generate done, → the coordinator reports the batch done (after packaging).
- Coordinator writes to the state bucket per person (person documents, expiry index, batch and
  progress documents), and the store's write latency as the coordinator sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ray
from scheduler_sim import NaiveFifoPool, water_fill

from cluster.actors import RayWorkerPool
from cluster.coordinator import Coordinator
from cluster.jobs import PersonJob, StageResult
from cluster.scheduler import (
    DEFAULT_AFFINITY_SLACK_S,
    DEFAULT_STAGE_PRIOR_S,
    FairScheduler,
)
from cluster.worker import GpuWorker, StaleJob, _forgets_person_key
from headshots.config import Config
from storage import keys
from storage.seaweed import start_embedded_s3
from storage.state import BatchState, PersonState, PhotoRecord, StateStore
from storage.store import ArtifactStore

TRAIN_S = 100.0  # GPU baseline (docs/measured-facts.md): an 800-step LoRA fine-tune
GENERATE_S = 26.0  # 40 images
LOAD_S = 5.0  # a base-model switch: assumed, as in bench/scheduler_sim.py
STYLES = ("corporate-grey", "office")
IMAGES_PER_STYLE = 20
PHOTOS_PER_PERSON = 4
TRAIN_STEPS = 800
SCHEDULER_OVERHEAD_GOAL_S = 0.005
UTILISATION_GOAL = 0.90
TENANTS = ("studio", "corp")


# --- simulated GPU worker ----------------------------------------------------------------------

class SimGpuWorker(GpuWorker):
    """A :class:`GpuWorker` that sleeps instead of running models; records its busy intervals.

    Everything but the model work is the base class's: ``fence``, ``revoke``, ``allow``, ``purge``,
    ``info`` and the stage lock and epoch check of ``_forgets_person_key``. No torch, no store.
    """

    def __init__(self, config, worker_id: str, *, train_s: float, generate_s: float, load_s: float):
        self.config = config
        self.worker_id = worker_id
        self.store = None
        self.key_store = None  # nothing is encrypted or written
        self.report_objects = lambda job, objects: None
        self.device, self.dtype = "cpu", "simulated"
        self._base_model: str | None = None
        self._pipe = None
        self.pipeline_loads = 0
        self.busy_s = 0.0
        self._cache_dir = Path(tempfile.gettempdir()) / f"pool-ray-{os.getpid()}"
        self._revoked: dict[str, float] = {}
        self._stage_lock = threading.Lock()
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self.pid = os.getpid()
        self.started_at = time.time()
        self._train_s, self._generate_s, self._load_s = train_s, generate_s, load_s
        self._intervals: list[tuple] = []

    def _pipeline(self, base_model: str):
        if self._base_model != base_model:
            time.sleep(self._load_s)
            self._base_model = base_model
            self.pipeline_loads += 1

    def _work(self, job: PersonJob, seconds: float) -> None:
        """Sleep ``seconds`` in steps, stopping like a real stage when revoked or fenced."""
        until = time.perf_counter() + seconds
        while (left := until - time.perf_counter()) > 0:
            if self.is_stale(job):
                raise StaleJob(f"job for {job.ref.prefix} fenced by epoch {self._epoch}")
            if self.is_revoked(job.ref):
                raise PermissionError(f"{job.ref.prefix} is revoked")
            time.sleep(min(left, 0.1))

    def _record(self, job: PersonJob, stage: str, started: float, loads_before: int) -> float:
        ended = time.time()
        self._intervals.append((job.tenant, job.person_id, stage, started, ended,
                                self.pipeline_loads - loads_before))
        self.busy_s += ended - started
        return ended - started

    @_forgets_person_key
    def train(self, job: PersonJob, *, should_stop=None) -> StageResult:
        started, loads = time.time(), self.pipeline_loads
        self._pipeline(job.base_model)
        self._work(job, self._train_s)
        seconds = self._record(job, "train", started, loads)
        return StageResult(seconds=seconds, training_steps=TRAIN_STEPS,
                           details={"steps": TRAIN_STEPS, "resumed_from": 0, "final_loss": 0.0,
                                    "worker": self.worker_id})

    @_forgets_person_key
    def generate(self, job: PersonJob) -> StageResult:
        started, loads = time.time(), self.pipeline_loads
        self._pipeline(job.base_model)
        self._work(job, self._generate_s)
        count = sum(job.images_per_style + dict(job.extra_by_style).get(style, 0) for style in job.styles)
        records = []
        for style in job.styles:
            for index in range(job.images_per_style + dict(job.extra_by_style).get(style, 0)):
                seed = 1000 + index
                records.append({"style": style, "index": index, "seed": seed,
                                "key": keys.headshot_key(job.ref, style, index, seed),
                                "prompt": f"a professional headshot of sks person, {style}",
                                "negative_prompt": "blurry, distorted", "seconds": self._generate_s / max(1, count),
                                "quality": {"status": "not_applicable"}})
        seconds = self._record(job, "generate", started, loads)
        by_style = {style: sum(1 for r in records if r["style"] == style) for style in job.styles}
        return StageResult(seconds=seconds, images_by_style=by_style,
                           details={"headshots": records, "worker": self.worker_id, "identity_distances": [],
                                    "regenerated": 0, "identity_flag": None})

    def arrived(self) -> float:
        """When a call reached the actor (for the bare actor-call baseline)."""
        return time.time()

    def take_intervals(self) -> list[tuple]:
        """The busy intervals recorded since the last call; the resident model is dropped too, so the
        next run starts from empty GPUs."""
        intervals, self._intervals = self._intervals, []
        self._base_model = None
        return intervals


# --- CPU stages as Ray tasks (--cpu-stages ray) -------------------------------------------------

@ray.remote(num_cpus=1, max_retries=2)
def _ingest_task(job: PersonJob) -> StageResult:
    return StageResult(details={"accepted": list(job.upload_keys), "checks": [], "rejected": []})


@ray.remote(num_cpus=1, max_retries=2)
def _package_task(*_args: Any) -> StageResult:
    return StageResult()


# --- the pool under test -------------------------------------------------------------------------

class FifoScheduler(NaiveFifoPool):
    """The pool before fair share (``bench/scheduler_sim.py``), with the views the coordinator reads."""

    def add_worker(self, worker_id: str, **_: Any) -> None:
        super().add_worker(worker_id)

    def complete(self, worker_id, task, duration_s, *, failed: bool = False) -> None:
        super().complete(worker_id, task, duration_s)

    def cancel(self, predicate) -> list:
        dropped = [task for task in self._requests if predicate(task)]
        for task in dropped:
            self._requests.remove(task)
        return dropped

    def queue_depth(self) -> dict[tuple[str, str], int]:
        depth: dict[tuple[str, str], int] = {}
        for task in self._requests:
            depth[(task.tenant, task.stage)] = depth.get((task.tenant, task.stage), 0) + 1
        return depth

    def busy_ratio(self, worker_id: str, window_s: float | None = None) -> float:
        return 0.0

    def eta_person_seconds(self, tenant: str, batch_id: str, person_id: str) -> None:
        return None

    def eta_persons_seconds(self, tenant: str, batch_id: str) -> dict[str, float]:
        return {}  # the FIFO baseline makes no estimates


class SchedulerTimer:
    """perf_counter accumulators around the scheduler calls the pool makes."""

    def __init__(self, scheduler, queued: callable):
        self.seconds = {"submit": 0.0, "next_assignment": 0.0, "complete": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        self.decisions: list[float] = []  # next_assignment calls that returned work
        self.assigned: dict[str, list[float]] = {}  # worker -> wall times it was given a task
        self.completed: dict[str, list[tuple[float, int]]] = {}  # worker -> (wall time, queued after)
        self.submitted: dict[tuple, float] = {}  # task key -> wall time of its first submit
        self.tasks = 0
        for name in self.seconds:
            setattr(scheduler, name, self._wrap(name, getattr(scheduler, name)))
        self._queued = queued

    def _wrap(self, name: str, call):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            value = call(*args, **kwargs)
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed
            self.calls[name] += 1
            if name == "submit":
                self.tasks += 1
                self.submitted.setdefault(args[0].key, time.time())
            elif name == "next_assignment" and value is not None:
                self.decisions.append(elapsed)
                self.assigned.setdefault(value[0], []).append(time.time())
            elif name == "complete":
                self.completed.setdefault(args[0], []).append((time.time(), self._queued()))
            return value
        return timed


class SimPool(RayWorkerPool):
    """``RayWorkerPool`` as shipped, with instant CPU stages and (``fifo``) the old scheduler."""

    def __init__(self, config, workers: list, *, policy: str, scale: float, cpu_stages: str):
        super().__init__(config, workers)  # no namespace: the pool never grows
        if policy == "fair":
            # The same arguments as RayWorkerPool's, with the time constants scaled like the stages.
            slots = config.workers.slots_per_gpu
            self.scheduler = FairScheduler(
                tenant_weights=config.workers.tenant_weights,
                tenant_quota={t: q * slots for t, q in config.workers.tenant_quota.items()},
                stage_prior_s={stage: prior / scale for stage, prior in DEFAULT_STAGE_PRIOR_S.items()},
                affinity_slack_s=DEFAULT_AFFINITY_SLACK_S / scale)
            queued = lambda: sum(self.scheduler.queue_depth().values())
        else:
            self.scheduler = FifoScheduler()
            queued = lambda: len(self.scheduler._requests)
        for worker_id in self._handles:
            self.scheduler.add_worker(worker_id)
        self.timer = SchedulerTimer(self.scheduler, queued)
        self.dispatch_s = 0.0
        self.cpu_stages = cpu_stages

    def _dispatch(self) -> None:
        started = time.perf_counter()
        super()._dispatch()
        self.dispatch_s += time.perf_counter() - started

    async def ingest(self, job: PersonJob) -> StageResult:
        if self.cpu_stages == "ray":
            return await _ingest_task.remote(job)
        return StageResult(details={"accepted": list(job.upload_keys), "checks": [], "rejected": []})

    async def package_person(self, job: PersonJob, headshots: list[dict[str, Any]]) -> StageResult:
        if self.cpu_stages == "ray":
            return await _package_task.remote(job.person_id, len(headshots))
        return StageResult()

    async def package_batch(self, **fields: Any) -> StageResult:
        if self.cpu_stages == "ray":
            return await _package_task.remote(fields["batch_id"], len(fields["persons"]))
        return StageResult()


class WriteCounter:
    """Counts the coordinator's writes to the store (by bucket and kind) and times them."""

    def __init__(self, store: ArtifactStore):
        self.by_kind: dict[str, int] = {}
        self.seconds: list[float] = []
        self._lock = threading.Lock()
        put = store.put

        def counted(artifact, key, *args, **kwargs):
            started = time.perf_counter()
            try:
                return put(artifact, key, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                kind = f"{artifact}:{_write_kind(key)}"
                with self._lock:
                    self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
                    self.seconds.append(elapsed)

        store.put = counted


def _write_kind(key: str) -> str:
    from storage.retention import EXPIRY_PREFIX

    if key.endswith(f"/{keys.BATCH_PREFIX}/progress.json"):
        return "progress"
    if key.endswith(f"/{keys.BATCH_PREFIX}/state.json") or key.startswith((f"{keys.SYSTEM_PREFIX}/batches/",
                                                                           f"{keys.SYSTEM_PREFIX}/open-batches/")):
        return "batch"
    if key.startswith(EXPIRY_PREFIX):
        return "expiry index"
    if key.startswith(keys.COORDINATOR_EPOCH_PREFIX):
        return "epoch"
    return "person" if key.endswith("/state.json") else "other"


# --- one run ---------------------------------------------------------------------------------------

def make_batch(states: StateStore, tenant: str, batch_id: str, persons: int, base_model: str) -> BatchState:
    person_ids = [f"p{index:04d}" for index in range(persons)]

    def save(person_id: str) -> None:
        ref = keys.PersonRef(tenant, batch_id, person_id)
        photos = [PhotoRecord(index=i, source=f"{i}.jpg", accepted=True, key=keys.upload_key(ref, i, ".jpg"))
                  for i in range(PHOTOS_PER_PERSON)]
        states.save_person(PersonState(tenant=tenant, batch_id=batch_id, person_id=person_id,
                                       name=f"Person {person_id}", photos=photos))

    with ThreadPoolExecutor(max_workers=8) as threads:
        list(threads.map(save, person_ids))
    batch = BatchState(tenant=tenant, batch_id=batch_id, name=f"bench {tenant}", base_model=base_model,
                       styles=list(STYLES), images_per_style=IMAGES_PER_STYLE, person_ids=person_ids)
    states.save_batch(batch)
    return batch


async def _loop_lag(samples: list[float], interval_s: float = 0.002) -> None:
    """How late the coordinator's event loop wakes a 2 ms sleep: time it is busy with other work."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        samples.append(loop.time() - started - interval_s)


def actor_call_baseline(workers: list, calls: int = 200) -> dict:
    """Bare Ray actor calls from an asyncio loop in this process, one at a time, on the idle pool: the
    floor under the send part of the dispatch latency (driver call → method running in the actor)."""

    async def measure() -> tuple[list[float], list[float]]:
        sends, rounds = [], []
        for index in range(calls):
            worker = workers[index % len(workers)]
            started = time.time()
            arrived = await worker.arrived.remote()
            sends.append(arrived - started)
            rounds.append(time.time() - started)
        return sorted(sends), sorted(rounds)

    sends, rounds = asyncio.run(measure())
    return {"actor_send_median_ms": _percentile(sends, 0.5) * 1e3, "actor_send_p99_ms": _percentile(sends, 0.99) * 1e3,
            "actor_round_trip_median_ms": _percentile(rounds, 0.5) * 1e3,
            "actor_round_trip_p99_ms": _percentile(rounds, 0.99) * 1e3}


def run_once(config: Config, workers: list, args, policy: str, run_index: int) -> dict:
    store = ArtifactStore.from_config(config.store)
    states = StateStore(store)
    suffix = f"{policy}-{run_index}-{uuid.uuid4().hex[:6]}"
    pool = SimPool(config, workers, policy=policy, scale=args.scale, cpu_stages=args.cpu_stages)
    batches = {}

    async def drive() -> dict:
        coordinator = Coordinator(config, pool)
        # progress() runs in the event loop (monitor rounds); time how long it holds the loop.
        progress_calls: list[tuple[float, float]] = []
        progress = coordinator.progress

        def timed_progress(*args, **kwargs):
            started = time.perf_counter()
            try:
                return progress(*args, **kwargs)
            finally:
                progress_calls.append((time.time(), time.perf_counter() - started))

        coordinator.progress = timed_progress
        # Claims an epoch and fences the workers: not part of the run. Started before the batches are
        # written, since start() resumes every batch whose state says "running".
        await coordinator.start()
        batches["studio"] = await asyncio.to_thread(make_batch, states, "studio", f"studio-{suffix}",
                                                    args.persons - args.small, args.studio_model)
        batches["corp"] = await asyncio.to_thread(make_batch, states, "corp", f"corp-{suffix}", args.small,
                                                  args.corp_model)
        studio, corp = batches["studio"], batches["corp"]
        writes = WriteCounter(coordinator.store)
        lag: list[float] = []
        probe = asyncio.get_running_loop().create_task(_loop_lag(lag))
        t0 = time.time()
        await coordinator.submit("studio", studio.batch_id)
        await asyncio.sleep(args.corp_at)
        corp_at = time.time()
        await coordinator.submit("corp", corp.batch_id)
        corp_state = await coordinator.wait("corp", corp.batch_id, timeout_s=args.timeout_s)
        corp_done = time.time()
        studio_state = await coordinator.wait("studio", studio.batch_id, timeout_s=args.timeout_s)
        all_done = time.time()
        coordinator._monitor.cancel()
        probe.cancel()
        return {"lag": lag, "progress_calls": progress_calls, "t0": t0, "corp_at": corp_at, "corp_done": corp_done, "all_done": all_done,
                "states": {"studio": studio_state, "corp": corp_state}, "writes": writes}

    outcome = asyncio.run(drive())
    intervals = {f"gpu-{i}": items for i, items in enumerate(ray.get([w.take_intervals.remote() for w in workers]))}
    persons = {tenant: states.load_persons(batch) for tenant, batch in batches.items()}
    if args.trace:
        with open(args.trace, "a") as trace:
            trace.write(json.dumps({"policy": policy, "run": run_index, "t0": outcome["t0"],
                                    "corp_at": outcome["corp_at"], "intervals": intervals}) + "\n")
    return {**summarise(args, policy, pool, outcome, intervals, persons), **actor_call_baseline(workers)}


def summarise(args, policy: str, pool: SimPool, outcome: dict, intervals: dict, persons: dict) -> dict:
    gpus = args.gpus
    t0, corp_at = outcome["t0"], outcome["corp_at"]
    flat = [item for items in intervals.values() for item in items]
    end = max(item[4] for item in flat)
    busy = sum(item[4] - item[3] for item in flat)
    wall = end - t0
    # Steady part: every worker has started, none has run its last stage yet.
    steady_from = max(items[0][3] for items in intervals.values() if items)
    steady_to = min(items[-1][4] for items in intervals.values() if items)
    steady_busy = sum(max(0.0, min(e, steady_to) - max(s, steady_from)) for _, _, _, s, e, _ in flat)
    steady_util = steady_busy / (gpus * (steady_to - steady_from)) if steady_to > steady_from else None

    timer = pool.timer
    gpu_tasks = len(flat)
    decisions = sorted(timer.decisions)

    # Dispatch latency per worker: stage end → next stage start, when work was queued at completion.
    gaps, gaps_all, returns, sends = [], [], [], []
    aligned = True
    for worker_id, items in intervals.items():
        completed = timer.completed.get(worker_id, [])
        assigned = timer.assigned.get(worker_id, [])
        if len(completed) != len(items) or len(assigned) != len(items):
            aligned = False
            continue
        for k in range(len(items) - 1):
            gap = items[k + 1][3] - items[k][4]
            gaps_all.append(gap)
            if completed[k][1] > 0:
                gaps.append(gap)
                returns.append(completed[k][0] - items[k][4])
                sends.append(items[k + 1][3] - assigned[k + 1])

    # Fair share. User view: a person counts from its batch's submit until its generate ends.
    # Scheduler view: from its first GPU task's submit to the scheduler until its generate ends.
    done_at = {}
    for tenant, person_id, stage, _, ended, _ in flat:
        if stage == "generate":
            done_at[(tenant, person_id)] = ended
    submits = {"studio": t0, "corp": corp_at}
    weights = {tenant: float(args.corp_weight if tenant == "corp" else 1.0) for tenant in TENANTS}
    user_view = {(tenant, p.person_id): (submits[tenant], done_at.get((tenant, p.person_id), float("inf")))
                 for tenant in TENANTS for p in persons[tenant]}
    first_task = {}
    for key, at in timer.submitted.items():
        first_task[key[0], key[2]] = min(at, first_task.get((key[0], key[2]), float("inf")))
    scheduler_view = {key: (first_task.get(key, float("inf")), ended) for key, (_, ended) in user_view.items()}
    fair_user = fair_share(flat, user_view, weights, gpus)
    fair_scheduler = fair_share(flat, scheduler_view, weights, gpus)
    corp_first_task = min((at for (tenant, _), at in first_task.items() if tenant == "corp"), default=None)

    # Where idle GPU time went: before each worker's first stage, between stages, after its last.
    first_start = min(item[3] for item in flat)
    idle_ramp = sum(items[0][3] - t0 for items in intervals.values() if items)
    idle_between = sum(b[3] - a[4] for items in intervals.values() for a, b in itertools.pairwise(items))
    idle_tail = sum(end - items[-1][4] for items in intervals.values() if items)
    progress_s = sorted(d for _, d in outcome["progress_calls"])

    corp_ends = sorted(done_at[k] for k in done_at if k[0] == "corp")
    writes = outcome["writes"]
    state_writes = sum(n for kind, n in writes.by_kind.items() if kind.startswith("state:"))
    person_writes = writes.by_kind.get("state:person", 0)
    person_count = sum(len(p) for p in persons.values())
    write_s = sorted(writes.seconds)
    final = {tenant: sum(p.state == "done" for p in persons[tenant]) for tenant in TENANTS}
    return {
        "policy": policy,
        "persons_done": final, "batch_states": outcome["states"],
        "gpu_phase_wall_s": wall, "all_done_s": outcome["all_done"] - t0,
        "gpu_busy_s": busy, "gpu_utilisation": busy / (gpus * wall),
        "steady_window_s": steady_to - steady_from, "steady_utilisation": steady_util,
        "ideal_wall_s": busy / gpus,
        "model_loads": sum(i[5] for i in flat),
        "gpu_tasks": gpu_tasks, "scheduler_submits": timer.tasks,
        "scheduler_calls": dict(timer.calls),
        "scheduler_per_task_us": sum(timer.seconds.values()) / max(1, timer.tasks) * 1e6,
        "decision_median_us": _percentile(decisions, 0.5) * 1e6,
        "decision_p99_us": _percentile(decisions, 0.99) * 1e6,
        "pool_dispatch_per_task_us": pool.dispatch_s / max(1, timer.tasks) * 1e6,
        "dispatch_aligned": aligned,
        "dispatch_gaps": len(gaps),
        "dispatch_latency_median_ms": _percentile(sorted(gaps), 0.5) * 1e3,
        "dispatch_latency_p99_ms": _percentile(sorted(gaps), 0.99) * 1e3,
        "dispatch_latency_max_ms": max(gaps, default=float("nan")) * 1e3,
        "dispatch_return_median_ms": _percentile(sorted(returns), 0.5) * 1e3,
        "dispatch_send_median_ms": _percentile(sorted(sends), 0.5) * 1e3,
        "idle_gap_all_median_ms": _percentile(sorted(gaps_all), 0.5) * 1e3,
        "idle_gap_all_p99_ms": _percentile(sorted(gaps_all), 0.99) * 1e3,
        "first_gpu_stage_s": first_start - t0,
        "idle_ramp_gpu_s": idle_ramp, "idle_between_gpu_s": idle_between, "idle_tail_gpu_s": idle_tail,
        **{f"{name}_user_view": value for name, value in fair_user.items()},
        **{f"{name}_scheduler_view": value for name, value in fair_scheduler.items()},
        "corp_first_task_s": None if corp_first_task is None else corp_first_task - corp_at,
        "corp_first_headshot_s": corp_ends[0] - corp_at if corp_ends else None,
        "corp_gpu_done_s": corp_ends[-1] - corp_at if corp_ends else None,
        "corp_batch_done_s": outcome["corp_done"] - corp_at,
        "state_writes_per_person": state_writes / person_count,
        "person_doc_writes_per_person": person_writes / person_count,
        "writes_by_kind": dict(sorted(writes.by_kind.items())),
        "progress_calls": len(progress_s),
        "progress_median_ms": _percentile(progress_s, 0.5) * 1e3,
        "progress_max_ms": max(progress_s, default=float("nan")) * 1e3,
        "loop_lag_max_ms": max(outcome["lag"], default=float("nan")) * 1e3,
        "loop_lag_median_ms": _percentile(sorted(outcome["lag"]), 0.5) * 1e3,
        "loop_lag_p99_ms": _percentile(sorted(outcome["lag"]), 0.99) * 1e3,
        "store_write_median_ms": _percentile(write_s, 0.5) * 1e3,
        "store_write_p99_ms": _percentile(write_s, 0.99) * 1e3,
    }


def fair_share(flat: list[tuple], active: dict[tuple, tuple[float, float]], weights: dict[str, float],
               gpus: int) -> dict:
    """Each tenant's GPU time against its weighted max-min share of the GPUs (capped by its active
    persons), integrated while both tenants have an active person; ``active``: person → [from, to)."""
    cuts = sorted({*(i[3] for i in flat), *(i[4] for i in flat),
                   *(t for span in active.values() for t in span if t != float("inf"))})
    received = dict.fromkeys(TENANTS, 0.0)
    entitled = dict.fromkeys(TENANTS, 0.0)
    window = 0.0
    for left, right in itertools.pairwise(cuts):
        middle = (left + right) / 2
        counts = {tenant: sum(1 for (t, _), (start, end) in active.items() if t == tenant and start <= middle < end)
                  for tenant in TENANTS}
        if not all(counts.values()):
            continue
        span = right - left
        shares = water_fill(float(gpus), weights, {t: float(n) for t, n in counts.items()})
        for tenant in TENANTS:
            received[tenant] += span * sum(1 for i in flat if i[0] == tenant and i[3] <= middle < i[4])
            entitled[tenant] += span * shares[tenant]
        window += span
    capacity = gpus * window
    if not capacity:
        return {"fair_window_s": 0.0, "corp_share_received": None, "corp_share_entitled": None,
                "studio_share_received": None, "studio_share_entitled": None, "fair_share_error_pts": None}
    return {"fair_window_s": window,
            "corp_share_received": received["corp"] / capacity, "corp_share_entitled": entitled["corp"] / capacity,
            "studio_share_received": received["studio"] / capacity,
            "studio_share_entitled": entitled["studio"] / capacity,
            "fair_share_error_pts": abs(received["corp"] - entitled["corp"]) / capacity * 100}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


# --- set-up, repeats, report -----------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="fake GPUs, one worker actor each")
    parser.add_argument("--persons", type=int, default=200, help="persons in all (both tenants)")
    parser.add_argument("--small", type=int, default=10, help="persons in the small (corp) batch")
    parser.add_argument("--corp-at", type=float, default=1.0, help="seconds after the studio batch the corp one comes")
    parser.add_argument("--corp-weight", type=float, default=1.0, help="corp tenant's weight (studio: 1)")
    parser.add_argument("--studio-model", default="sdxl")
    parser.add_argument("--corp-model", default="sd15", help="same as --studio-model: one base model for all")
    parser.add_argument("--scale", type=float, default=100.0, help="GPU stage costs are divided by this")
    parser.add_argument("--repeats", type=int, default=1, help="runs per policy; figures are medians")
    parser.add_argument("--policies", default="fair,fifo", help="comma-separated: fair, fifo")
    parser.add_argument("--cpu-stages", choices=("inline", "ray"), default="inline",
                        help="ingest/package: return at once in the coordinator's process, or as tiny Ray tasks")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up on a batch after this long")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--trace", default="", help="append each run's busy intervals to this JSON-lines file")
    args = parser.parse_args()
    if args.gpus < 1 or args.small < 1 or args.persons <= args.small or args.repeats < 1 or args.scale <= 0:
        parser.error("need --gpus >= 1, 1 <= --small < --persons, --repeats >= 1, --scale > 0")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or set(policies) - {"fair", "fifo"}:
        parser.error(f"--policies must list fair and/or fifo but is {args.policies!r}")

    workdir = Path(tempfile.mkdtemp(prefix="pool-ray-"))
    server = start_embedded_s3(workdir / "s3", access_key="bench" + secrets.token_hex(4),
                               secret_key=secrets.token_urlsafe(24))
    try:
        suffix = uuid.uuid4().hex[:6]
        config = Config.from_dict({
            "home": str(workdir / "home"),
            "store": {"endpoint": server.endpoint, "access_key": server.access_key, "secret_key": server.secret_key,
                      **{f"bucket_{a}": f"bench-{suffix}-{a}" for a in
                         ("uploads", "derived", "models", "outputs", "state", "receipts")}},
            "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
            "workers": {"tenant_weights": {"corp": args.corp_weight}} if args.corp_weight != 1.0 else {},
        })
        ArtifactStore.from_config(config.store).ensure_buckets()
        started = time.perf_counter()
        ray.init(address="local", num_cpus=2, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        actor = ray.remote(num_gpus=1, num_cpus=0, max_concurrency=4)(SimGpuWorker)
        workers = [actor.remote(config, f"gpu-{i}", train_s=TRAIN_S / args.scale,
                                generate_s=GENERATE_S / args.scale, load_s=LOAD_S / args.scale)
                   for i in range(args.gpus)]
        ray.get([w.info.remote() for w in workers])
        startup_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {policy: [] for policy in policies}
        for repeat in range(args.repeats):
            for policy in policies:
                row = run_once(config, workers, args, policy, repeat)
                runs[policy].append(row)
                print(f"run {repeat} {policy}: GPU phase {row['gpu_phase_wall_s']:.1f} s, utilisation "
                      f"{row['gpu_utilisation']:.1%}", file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {policy: _medians(rows) for policy, rows in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                         f"{platform.python_version()}, ray {ray.__version__}",
              "args": vars(args), "ray_startup_s": startup_s, "medians": medians, "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_table(report, args)
    return 0


def _medians(rows: list[dict]) -> dict:
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [row[key] for row in rows if row.get(key) is not None]
            out[key] = statistics.median(values) if values else None
        else:
            out[key] = value
    return out


def print_table(report: dict, args) -> None:
    medians = report["medians"]
    policies = list(medians)

    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        return "—" if value is None else format(value, spec)

    lines = [
        ("GPU phase: first submit → last GPU stage, s", "gpu_phase_wall_s", ".2f"),
        ("  busy GPU-s / GPUs (the floor), s", "ideal_wall_s", ".2f"),
        ("GPU utilisation (goal ≥ 90%)", "gpu_utilisation", ".1%"),
        ("GPU utilisation, steady part", "steady_utilisation", ".1%"),
        ("base-model loads, first load per GPU included", "model_loads", ".0f"),
        ("scheduler calls per GPU task, µs (goal ≤ 5000)", "scheduler_per_task_us", ".1f"),
        ("  per decision median / p99, µs", None, None),
        ("  pool _dispatch per GPU task, µs", "pool_dispatch_per_task_us", ".1f"),
        ("dispatch latency median / p99, ms", None, None),
        ("  return (actor end → complete), median ms", "dispatch_return_median_ms", ".1f"),
        ("  send (decision → actor start), median ms", "dispatch_send_median_ms", ".1f"),
        ("bare actor call, idle pool: send / round trip, median ms", None, None),
        ("idle GPU-s: before first / between / after last stage", None, None),
        ("first GPU stage after first submit, s", "first_gpu_stage_s", ".2f"),
        ("corp share received (entitled), from batch submit", "share_user", None),
        ("fair-share error from batch submit, points", "fair_share_error_pts_user_view", ".1f"),
        ("corp share received (entitled), from 1st GPU task", "share_scheduler", None),
        ("fair-share error from 1st GPU task, points", "fair_share_error_pts_scheduler_view", ".1f"),
        ("corp: first GPU task reaches scheduler after submit, s", "corp_first_task_s", ".2f"),
        ("corp: first headshot after submit, s", "corp_first_headshot_s", ".2f"),
        ("corp: last GPU stage after submit, s", "corp_gpu_done_s", ".2f"),
        ("corp: batch done after submit, s", "corp_batch_done_s", ".2f"),
        ("both batches done after first submit, s", "all_done_s", ".2f"),
        ("state writes per person (person documents)", None, None),
        ("store write median / p99, ms", None, None),
        ("coordinator event-loop lag median / p99 / max, ms", None, None),
        ("  Coordinator.progress() calls; median / max ms", None, None),
    ]
    width = max(len(label) for label, _, _ in lines)
    a = report["args"]
    print(f"{report['machine']}; {a['gpus']} fake GPUs; studio {a['persons'] - a['small']} persons ({a['studio_model']}), "
          f"corp {a['small']} ({a['corp_model']}) {a['corp_at']:g} s later; train {TRAIN_S / a['scale']:g} s, "
          f"generate {GENERATE_S / a['scale']:g} s, switch {LOAD_S / a['scale']:g} s; CPU stages {a['cpu_stages']}; "
          f"medians of {a['repeats']} run(s)")
    print(f"{'':{width}}  " + "  ".join(f"{p:>20}" for p in policies))
    for label, key, spec in lines:
        cells = []
        for policy in policies:
            row = medians[policy]
            if key is not None and key.startswith("share_"):
                view = "user_view" if key == "share_user" else "scheduler_view"
                cells.append(f"{cell(row, 'corp_share_received_' + view, '.1%')} "
                             f"({cell(row, 'corp_share_entitled_' + view, '.1%')})")
            elif key is not None:
                cells.append(cell(row, key, spec))
            elif label.startswith("idle GPU-s"):
                cells.append(f"{cell(row, 'idle_ramp_gpu_s', '.1f')} / {cell(row, 'idle_between_gpu_s', '.1f')} / "
                             f"{cell(row, 'idle_tail_gpu_s', '.1f')}")
            elif label.startswith("  per decision"):
                cells.append(f"{cell(row, 'decision_median_us', '.1f')} / {cell(row, 'decision_p99_us', '.1f')}")
            elif label.startswith("dispatch"):
                cells.append(f"{cell(row, 'dispatch_latency_median_ms', '.1f')} / "
                             f"{cell(row, 'dispatch_latency_p99_ms', '.1f')}")
            elif label.startswith("state writes"):
                cells.append(f"{cell(row, 'state_writes_per_person', '.2f')} "
                             f"({cell(row, 'person_doc_writes_per_person', '.2f')})")
            elif label.startswith("bare actor"):
                cells.append(f"{cell(row, 'actor_send_median_ms', '.1f')} / "
                             f"{cell(row, 'actor_round_trip_median_ms', '.1f')}")
            elif label.startswith("store"):
                cells.append(f"{cell(row, 'store_write_median_ms', '.1f')} / {cell(row, 'store_write_p99_ms', '.1f')}")
            elif label.startswith("coordinator event-loop"):
                cells.append(f"{cell(row, 'loop_lag_median_ms', '.1f')} / {cell(row, 'loop_lag_p99_ms', '.1f')} / "
                             f"{cell(row, 'loop_lag_max_ms', '.0f')}")
            else:
                cells.append(f"{cell(row, 'progress_calls', '.0f')}; {cell(row, 'progress_median_ms', '.1f')} / "
                             f"{cell(row, 'progress_max_ms', '.1f')}")
        print(f"{label:{width}}  " + "  ".join(f"{c:>20}" for c in cells))
    if "fair" in medians:
        fair = medians["fair"]
        verdicts = [
            ("GPU utilisation ≥ 90%", fair["gpu_utilisation"] >= UTILISATION_GOAL),
            ("scheduler overhead per task ≤ 5 ms", fair["scheduler_per_task_us"] <= SCHEDULER_OVERHEAD_GOAL_S * 1e6),
        ]
        print("goals (fair policy): " + "; ".join(f"{name}: {'MET' if ok else 'NOT MET'}" for name, ok in verdicts)
              + f"; end-to-end dispatch latency median {fair['dispatch_latency_median_ms']:.1f} ms "
              f"({'≤' if fair['dispatch_latency_median_ms'] <= 5 else '>'} 5 ms)")
    for policy in policies:
        rows = report["runs"][policy]
        states = {tuple(sorted(r["batch_states"].items())) for r in rows}
        done = [r["persons_done"] for r in rows]
        print(f"{policy}: batch states {states}, persons done per run {done}; "
              f"writes by kind (run 0) {rows[0]['writes_by_kind']}")


if __name__ == "__main__":
    sys.exit(main())
