"""The one module that turns plain classes into Ray actors and tasks: names, restarts, resources.

- ``headshots-coordinator``: detached, restarted forever; async (one event loop drives all batches).
- ``headshots-gpu-<i>``: one per GPU (``num_gpus=1``), detached so a coordinator restart finds them;
  restarted forever. Control calls (fence, revoke, purge, info) are retried by Ray; stage calls are not
  (``max_task_retries=0``): a worker lost mid-stage fails the call at once, the pool takes the worker
  out of rotation until it answers again, and the coordinator runs the stage on another worker (a
  retry inside Ray would wait for the same actor, which never comes back when its node is gone).
- ingest and packaging: plain tasks on CPU slots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray

from cluster.coordinator import Coordinator
from cluster.jobs import PersonJob, StageResult, WorkerLost
from cluster.lease import HeadLease, NodeCutOff, lease_from_health_checks
from cluster.purge import CONFIRMED, INCOMPLETE, NODE_DEAD, TIMED_OUT, UNREACHABLE, WorkerPurge, node_entries
from cluster.retention import RetentionController
from cluster.scheduler import FairScheduler, Task
from cluster.worker import GpuWorker
from storage import barrier
from storage.crypto import key_store_for
from storage.store import ArtifactStore
from storage.sweep import DeletionHooks

COORDINATOR_NAME = "headshots-coordinator"
RETENTION_NAME = "headshots-retention"
GPU_WORKER_PREFIX = "headshots-gpu-"
ACTOR_TASK_RETRIES = 2
# After a GPU worker was lost mid-stage: how long to wait at most for Ray to say whether the process
# that ran the stage is gone (or for it to answer, if only the call's answer was lost), and how often
# a worker out of rotation is asked whether it is back.
SETTLE_TIMEOUT_S = 300.0
REJOIN_POLL_S = 2.0
# A fence call waits this long for a worker (whose own drain waits up to 120 s) before the worker is
# taken out of rotation; a worker whose node is gone fails the call at once.
FENCE_CALL_TIMEOUT_S = 150.0
CONTROL_CALL_TIMEOUT_S = 30.0
# Only the head node has this resource: the stack's singletons ask for a sliver of it.
HEAD_NODE_RESOURCE = "node:__internal_head__"
logger = logging.getLogger(__name__)


# --- CPU stages ----------------------------------------------------------------------------------

@ray.remote(num_cpus=1, max_retries=2)
def ingest_task(config, job: PersonJob) -> StageResult:
    from cluster.stages import gate_config, run_ingest
    from storage.store import ArtifactStore

    store = ArtifactStore.from_config(config.store)
    return run_ingest(store, job, training_resolution=config.training.resolution,
                      key_store=key_store_for(config, store), gate=gate_config(config))


@ray.remote(num_cpus=1, max_retries=2)
def package_person_task(config, job: PersonJob, headshots: list[dict[str, Any]]) -> StageResult:
    from cluster.stages import run_package_person
    from storage.store import ArtifactStore

    return run_package_person(ArtifactStore.from_config(config.store), job, headshots)


@ray.remote(num_cpus=1, max_retries=2)
def package_batch_task(config, fields: dict[str, Any]) -> StageResult:
    from cluster.stages import run_package_batch
    from storage.store import ArtifactStore

    return run_package_batch(ArtifactStore.from_config(config.store), **fields)


# --- GPU workers ---------------------------------------------------------------------------------

class GpuWorkerActor(GpuWorker):
    """A :class:`GpuWorker` that reports each write to the coordinator as it happens."""

    def __init__(self, config, worker_id: str, namespace: str):
        self._namespace = namespace
        self._coordinator = None
        self._node_id = ray.get_runtime_context().get_node_id()
        super().__init__(config, worker_id, report_objects=self._report, lease=_head_lease(self._node_id))
        if ray.get_runtime_context().was_current_actor_reconstructed:
            try:  # for worker_restarts_total; a coordinator that is itself restarting misses one
                ray.get_actor(COORDINATOR_NAME, namespace=namespace).worker_restarted.remote(worker_id)
            except Exception:
                pass

    def info(self) -> dict:
        # The GPU ids Ray assigned: workers sharing a GPU (workers.slots_per_gpu > 1) report the same one.
        return {**super().info(), "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "node_id": self._node_id,
                "node_ip": ray.util.get_node_ip_address()}

    def purge(self, prefixes: list[str]) -> dict:
        # Which node purged: the deletion receipt accounts for every node.
        return {**super().purge(prefixes), "node_id": self._node_id, "node_ip": ray.util.get_node_ip_address()}

    def _report(self, job: PersonJob, objects) -> None:
        try:
            if self._coordinator is None:
                self._coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self._namespace)
            # Fire and forget: the stage result carries the same records again.
            self._coordinator.record_objects.remote(job.to_json(), [o.to_json() for o in objects])
        except Exception:  # the coordinator restarting must not fail a fine-tune
            self._coordinator = None


def _head_lease(node_id: str) -> HeadLease:
    """This node's lease (:mod:`cluster.lease`): the GCS's word that the node is alive, asked for the
    node's own id; sized from Ray's health-check settings (the same on every node of a cluster)."""
    from ray._raylet import NodeID

    config = ray._config
    lease_s, interval_s = lease_from_health_checks(config.health_check_period_ms(), config.health_check_timeout_ms(),
                                                   config.health_check_failure_threshold())
    node = NodeID.from_hex(node_id)

    def probe(timeout_s: float) -> bool:
        gcs = ray._private.worker.global_worker.gcs_client
        return bool(gcs.check_alive([node], timeout=timeout_s)[0])

    return HeadLease(probe, lease_s=lease_s, interval_s=interval_s).start()


def _actor_node(handle) -> str | None:
    """The id of the node a live actor runs on, from Ray's actor table; None unless it is ALIVE: while
    an actor restarts, the table names the node Ray is trying to place it on (one whose GPU may still
    be taken), not the one it ran on."""
    from ray._private.state import actors

    try:
        record = actors(handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - the GCS is busy or away: unknown
        return None
    if (record or {}).get("State") != "ALIVE":
        return None
    node_id = (record.get("Address") or {}).get("NodeID") or ""
    return node_id if node_id.strip("0f") else None  # an unset id reads as all zeros or all f's


def _node_table() -> dict[str, dict[str, Any]]:
    """Ray's node table: node id → {address, alive, gpus}; empty if the GCS does not answer."""
    try:
        return {node["NodeID"]: {"address": node.get("NodeManagerAddress"), "alive": bool(node.get("Alive")),
                                 "gpus": float((node.get("Resources") or {}).get("GPU", 0))} for node in ray.nodes()}
    except Exception:  # noqa: BLE001 - the receipt then says "unknown" for every node
        return {}


def _actor_instance(handle) -> tuple[str, int, int | None] | None:
    """(state, restarts, pid) of an actor in Ray's actor table; None if the table cannot be read."""
    from ray._private.state import actors

    try:
        record = actors(handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - the GCS is busy or away: the caller asks again
        return None
    if not record:
        return None
    return record.get("State"), record.get("NumRestarts") or 0, record.get("Pid")


class RayWorkerPool:
    """Runs stages on Ray: GPU stages on a worker actor chosen by the fair-share scheduler
    (:mod:`cluster.scheduler`), CPU stages as tasks.

    Every GPU stage waits in the scheduler until it hands the stage a worker: the tenant with the
    least weighted GPU time goes next, and a worker already holding the base model is preferred.
    With ``workers.autoscale`` the pool grows while work queues (new worker actors ask Ray for GPUs,
    and ``request_resources`` tells the KubeRay autoscaler to add nodes) and shrinks back to
    ``workers.min_gpu_workers`` after ``workers.scale_down_idle_s`` without queued work.

    Args:
        config: the system config.
        workers: worker actor handles already running (their ids are ``gpu-<index>``).
        namespace: where to create more workers (elastic pool); None: the pool never grows.
    """

    def __init__(self, config, workers: list, *, namespace: str | None = None):
        self.config = config
        self.namespace = namespace
        slots = config.workers.slots_per_gpu
        self.scheduler = FairScheduler(
            tenant_weights=config.workers.tenant_weights,
            # Quotas are in GPUs; with several slots per GPU each slot is a worker of its own.
            tenant_quota={tenant: quota * slots for tenant, quota in config.workers.tenant_quota.items()})
        self._handles: dict[str, Any] = {}
        for index, worker in enumerate(workers):
            self._add(f"gpu-{index}", worker)
        self._waiting: dict[tuple, asyncio.Future] = {}
        # Workers lost mid-stage or not answering a fence, out of the scheduler until they answer again
        # (their re-join probes).
        self._out: dict[str, asyncio.Task] = {}
        self._epoch = 0  # the epoch of the last fence: a worker that re-joins is fenced with it first
        self._idle_since: float | None = None
        self._starting: dict[str, asyncio.Task] = {}
        self.resources_requested = 0  # GPU bundles last asked of the autoscaler

    @property
    def workers(self) -> list:
        """Handles of the workers in rotation (not those lost and not back yet: a call to one whose node
        is gone would wait for a restart that may never come)."""
        return [handle for worker_id, handle in self._handles.items() if worker_id not in self._out]

    def _add(self, worker_id: str, handle) -> None:
        self._handles[worker_id] = handle
        self.scheduler.add_worker(worker_id)

    def _dispatch(self) -> None:
        while (assignment := self.scheduler.next_assignment()) is not None:
            worker_id, task = assignment
            future = self._waiting.pop(task.key, None)
            if future is None or future.done():
                # Its caller went away (cancelled): give the slot straight back.
                self.scheduler.complete(worker_id, task, 0.0, failed=True)
                continue
            future.set_result(worker_id)

    async def _on_gpu(self, method: str, job: PersonJob) -> StageResult:
        loop = asyncio.get_running_loop()
        task = Task(tenant=job.tenant, batch_id=job.batch_id, person_id=job.person_id, stage=method,
                    base_model=job.base_model, priority=job.priority, submitted_at=job.queue_position)
        future = loop.create_future()
        self._waiting[task.key] = future
        self.scheduler.submit(task)
        self._dispatch()
        self.autoscale()
        try:
            worker_id = await future
        except asyncio.CancelledError:
            self._waiting.pop(task.key, None)
            self.scheduler.cancel(lambda queued: queued.key == task.key)
            raise
        handle = self._handles[worker_id]
        # Which process runs the stage, so that after a loss we can tell when it is gone.
        instance = await asyncio.to_thread(_actor_instance, handle)
        started = loop.time()
        try:
            result = await getattr(handle, method).options(max_task_retries=0).remote(job)
        except BaseException as error:
            if worker_id in self._handles and worker_id not in self._out:
                self.scheduler.complete(worker_id, task, loop.time() - started, failed=True)
            if _is_worker_loss(error):
                await self._worker_lost(worker_id, handle, instance, job)
                raise WorkerLost(f"GPU worker {worker_id} was lost during {method} of {job.ref.prefix}: "
                                 f"{type(error).__name__}") from error
            raise
        else:
            if worker_id in self._handles:
                self.scheduler.complete(worker_id, task, loop.time() - started)
        finally:
            self._dispatch()
        return result

    # --- workers lost mid-stage ------------------------------------------------------------------

    async def _worker_lost(self, worker_id: str, handle, instance, job: PersonJob) -> None:
        """Take the worker out of rotation (until it answers again), then return once the process that
        ran the lost call cannot still be running it, so the stage may run elsewhere."""
        self._take_out(worker_id, handle, "lost mid-stage")
        outcome = await self._settle(handle, instance, job)
        logger.info("GPU worker %s: the lost call's process is %s", worker_id, outcome)

    async def _settle(self, handle, instance, job: PersonJob) -> str:
        """Until Ray's actor table shows the instance that ran the call replaced or dead (its node
        declared dead or its process gone; a live process on a node declared dead stops by its lease),
        or the instance answers a fence for the job's epoch (alive, only the answer was lost: the
        fence returns once its stage stopped). "gone", "drained", or "unknown" after SETTLE_TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT_S
        fence = None
        while True:
            now = await asyncio.to_thread(_actor_instance, handle)
            if now is not None and (now[0] != "ALIVE" or (instance is not None and now[1:] != instance[1:])):
                return "gone"
            if fence is None:
                fence = asyncio.wrap_future(handle.fence.options(max_task_retries=0).remote(job.epoch).future())
                # Read its error even when no one waits for it any more (a call left hanging on a gone node).
                fence.add_done_callback(lambda done: done.cancelled() or done.exception())
            if fence.done():
                try:
                    answer = fence.result()
                except Exception:  # noqa: BLE001 - unreachable or restarting: ask the table again
                    answer = None
                if answer is not None:
                    if instance is not None and answer.get("pid") != instance[2]:
                        return "gone"  # another process answers for the worker now
                    if answer.get("drained"):
                        return "drained"
                fence = None
            if loop.time() >= deadline:
                logger.warning("could not tell within %.0f s whether a lost GPU worker still runs its stage",
                               SETTLE_TIMEOUT_S)
                return "unknown"
            await asyncio.sleep(0.5)

    def _take_out(self, worker_id: str, handle, why: str) -> None:
        if worker_id in self._handles and worker_id not in self._out:
            self.scheduler.remove_worker(worker_id)
            self._out[worker_id] = asyncio.get_running_loop().create_task(self._rejoin(worker_id, handle))
            logger.warning("GPU worker %s %s; out of rotation until it answers again", worker_id, why)

    async def _rejoin(self, worker_id: str, handle) -> None:
        """Ask a lost worker every REJOIN_POLL_S whether it is back (Ray restarted it on a node with a
        free GPU, or the node came back); then it takes stages again."""
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.wrap_future(
                        handle.info.options(max_task_retries=0).remote().future()), timeout=30)
                    # Back: first make sure it runs nothing of an older epoch (and knows the current one).
                    await asyncio.wait_for(asyncio.wrap_future(
                        handle.fence.options(max_task_retries=0).remote(self._epoch).future()),
                        timeout=FENCE_CALL_TIMEOUT_S)
                    break
                except Exception:  # noqa: BLE001 - restarting, pending (no GPU free) or unreachable
                    await asyncio.sleep(REJOIN_POLL_S)
            if self._handles.get(worker_id) is handle:
                self.scheduler.add_worker(worker_id)
                logger.info("GPU worker %s is back in rotation", worker_id)
        finally:
            self._out.pop(worker_id, None)
        self._dispatch()

    # --- views for metrics and status ------------------------------------------------------------

    def eta_seconds(self, tenant: str, batch_id: str) -> float | None:
        return self.scheduler.eta_seconds(tenant, batch_id)

    def eta_person_seconds(self, tenant: str, batch_id: str, person_id: str) -> float | None:
        return self.scheduler.eta_person_seconds(tenant, batch_id, person_id)

    def eta_persons_seconds(self, tenant: str, batch_id: str) -> dict[str, float]:
        return self.scheduler.eta_persons_seconds(tenant, batch_id)

    def queue_depth(self) -> dict[tuple[str, str], int]:
        return self.scheduler.queue_depth()

    def busy_ratios(self, window_s: float = 60.0) -> dict[str, float]:
        return {worker_id: self.scheduler.busy_ratio(worker_id, window_s) for worker_id in self._handles
                if worker_id not in self._out}

    async def worker_info(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
        """Each worker's ``info()`` (pid, GPU memory and utilisation); workers that do not answer in time
        (restarting, busy starting up) are left out."""
        ids = [worker_id for worker_id in self._handles if worker_id not in self._out]
        refs = [self._handles[worker_id].info.remote() for worker_id in ids]
        ready, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        found = {}
        for worker_id, ref in zip(ids, refs):
            if ref in ready_set:
                try:
                    found[worker_id] = await ref
                except Exception:  # died between answering and reading: next round
                    continue
        return found

    # --- fencing and deletion ---------------------------------------------------------------------

    async def fence(self, epoch: int) -> list[dict[str, Any]]:
        """Tell every worker a coordinator of ``epoch`` took over; returns once stale stages stopped.

        A worker that cannot be reached (restarting, its node gone or cut off, or still draining after
        FENCE_CALL_TIMEOUT_S) is taken out of rotation and fenced when it answers again; a cut-off one
        stops its stage by its lease (:mod:`cluster.lease`)."""
        self._epoch = max(self._epoch, epoch)
        ids = [worker_id for worker_id in self._handles if worker_id not in self._out]

        async def fence_one(worker_id: str) -> dict[str, Any]:
            handle = self._handles[worker_id]
            try:
                return await asyncio.wait_for(asyncio.wrap_future(
                    handle.fence.options(max_task_retries=0).remote(epoch).future()), timeout=FENCE_CALL_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - reported, and the worker waits out of rotation
                self._take_out(worker_id, handle, f"did not answer the epoch {epoch} fence")
                return {"worker_id": worker_id, "drained": False, "unreachable": type(error).__name__}

        return list(await asyncio.gather(*(fence_one(worker_id) for worker_id in ids)))

    async def ingest(self, job: PersonJob) -> StageResult:
        return await _cpu_stage(ingest_task.remote(self.config, job), "ingest", job)

    async def train(self, job: PersonJob) -> StageResult:
        return await self._on_gpu("train", job)

    async def generate(self, job: PersonJob) -> StageResult:
        return await self._on_gpu("generate", job)

    async def package_person(self, job: PersonJob, headshots: list[dict[str, Any]]) -> StageResult:
        return await _cpu_stage(package_person_task.remote(self.config, job, headshots), "package", job)

    async def package_batch(self, **fields: Any) -> StageResult:
        return await package_batch_task.remote(self.config, fields)

    async def revoke(self, prefixes: list[str]) -> list[dict[str, Any]]:
        """Tell every worker (busy or not) to refuse any further step or write for these persons."""
        return await self._tell_all("revoke", prefixes)

    async def allow(self, prefixes: list[str]) -> list[dict[str, Any]]:
        """Lift a revocation made for a cancellation (never called for a deletion)."""
        return await self._tell_all("allow", prefixes)

    async def _tell_all(self, method: str, prefixes: list[str]) -> list[dict[str, Any]]:
        """Call ``method`` on every worker in rotation at once, without Ray's retries: a worker that is
        restarting comes back empty (and asks the store's barrier before every stage), one whose node
        is gone or cut off stops by its lease; either is reported as unreachable instead of waited for."""
        ids = [worker_id for worker_id in self._handles if worker_id not in self._out]

        async def tell(worker_id: str) -> dict[str, Any]:
            call = getattr(self._handles[worker_id], method).options(max_task_retries=0).remote(prefixes)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(call.future()), timeout=CONTROL_CALL_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - see above
                return {"worker_id": worker_id, "unreachable": type(error).__name__}

        return list(await asyncio.gather(*(tell(worker_id) for worker_id in ids)))

    # --- elastic pool ----------------------------------------------------------------------------

    def autoscale(self) -> None:
        """Grow toward the queued demand, or shrink after a quiet spell (``workers.autoscale`` only).

        Called whenever a GPU stage is queued and by the coordinator's monitor loop. Growing creates
        worker actors right away: each asks Ray for its share of a GPU, and on KubeRay the pending
        actors plus ``request_resources`` make the autoscaler add GPU pods; a new worker joins the
        scheduler once it answers. Shrinking kills idle workers from the highest index down, then tells
        the autoscaler the smaller demand so it can release the nodes.
        """
        workers = self.config.workers
        if not workers.autoscale or self.namespace is None:
            return
        slots = workers.slots_per_gpu
        most = (workers.gpu_workers or 1) * slots
        least = workers.min_gpu_workers * slots
        queued = sum(self.scheduler.queue_depth().values())
        busy = sum(len(tasks) for tasks in self.scheduler.running().values())
        present = len(self._handles) + len(self._starting)
        now = time.monotonic()
        if queued:
            self._idle_since = None
            wanted = min(most, max(least, busy + queued))
            for index in range(present, wanted):
                worker_id = f"gpu-{index}"
                if worker_id not in self._handles and worker_id not in self._starting:
                    self._starting[worker_id] = asyncio.get_running_loop().create_task(self._grow(index))
            self._request_gpus(max(wanted, present))
            return
        if busy:
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
            return
        if now - self._idle_since < workers.scale_down_idle_s or len(self._handles) <= least:
            return
        for index in sorted((int(w.split("-")[1]) for w in self._handles), reverse=True):
            if len(self._handles) <= least:
                break
            worker_id = f"gpu-{index}"
            rejoin = self._out.pop(worker_id, None)
            if rejoin is not None:
                rejoin.cancel()
            else:
                self.scheduler.remove_worker(worker_id)
            handle = self._handles.pop(worker_id)
            ray.kill(handle, no_restart=True)
            logger.info("elastic pool: released idle worker %s", worker_id)
        self._request_gpus(len(self._handles))

    async def _grow(self, index: int) -> None:
        worker_id = f"gpu-{index}"
        try:
            handle = _create_gpu_worker(self.config, index, self.namespace)
            # A worker joins the scheduler only once it runs: a pending actor (no GPU yet) holds no slot.
            await handle.info.remote()
            self._add(worker_id, handle)
            logger.info("elastic pool: worker %s joined", worker_id)
            self._dispatch()
        except Exception:
            logger.exception("elastic pool: worker %s did not start", worker_id)
        finally:
            self._starting.pop(worker_id, None)

    def _request_gpus(self, workers: int) -> None:
        if workers == self.resources_requested:
            return
        from ray.autoscaler.sdk import request_resources

        gpu_share = 1.0 / self.config.workers.slots_per_gpu
        # A standing request: the autoscaler keeps this much capacity until the next call replaces it.
        request_resources(bundles=[{"GPU": gpu_share}] * workers)
        self.resources_requested = workers


async def _cpu_stage(ref, stage: str, job: PersonJob) -> StageResult:
    try:
        return await ref
    except Exception as error:
        if _is_worker_loss(error):
            raise WorkerLost(f"the CPU worker running {stage} of {job.ref.prefix} was lost: "
                             f"{type(error).__name__}") from error
        raise


def _is_worker_loss(error: BaseException) -> bool:
    """Ray's own failures (a process or node gone), as opposed to an exception the stage raised."""
    from ray import exceptions

    if isinstance(error, exceptions.RayTaskError):
        # The stage's code raised: the person's input or the code is at fault, unless it stopped
        # because its node was declared dead (the stage belongs to another worker now).
        return isinstance(getattr(error, "cause", None), NodeCutOff)
    return isinstance(error, (exceptions.RayActorError, exceptions.WorkerCrashedError,
                              exceptions.ObjectLostError, exceptions.NodeDiedError,
                              getattr(exceptions, "ActorUnavailableError", exceptions.RayActorError)))


def _create_gpu_worker(config, index: int, namespace: str):
    slots = config.workers.slots_per_gpu
    return ray.remote(GpuWorkerActor).options(
        name=f"{GPU_WORKER_PREFIX}{index}", namespace=namespace, lifetime="detached", get_if_exists=True,
        # Several slots per GPU: each worker asks for its share, so Ray packs them onto one GPU.
        num_gpus=1.0 / slots, num_cpus=0, max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES,
        # >1: revoke/purge/fence must reach a worker while it is busy with a stage (the pool never
        # gives one worker two stages at once).
        max_concurrency=4,
    ).remote(config, f"gpu-{index}", namespace)


def start_gpu_workers(config, *, namespace: str) -> list:
    """Get or create the worker actors (names make this idempotent across coordinator restarts).

    Without autoscaling: ``workers.gpu_workers`` GPUs (0: every GPU the cluster reports) times
    ``workers.slots_per_gpu``. With it: ``workers.min_gpu_workers`` GPUs' worth to start with, plus any
    that are still running from before a restart.
    """
    slots = config.workers.slots_per_gpu
    if config.workers.autoscale:
        count = max(config.workers.min_gpu_workers * slots, len(existing_gpu_workers(namespace)))
    else:
        gpus = config.workers.gpu_workers or int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("the Ray cluster reports no GPUs; set ray.num_gpus (local) or workers.gpu_workers")
        count = gpus * slots
    return [_create_gpu_worker(config, index, namespace) for index in range(count)]


def existing_gpu_workers(namespace: str) -> list:
    """Handles of every GPU worker actor that exists (named ``headshots-gpu-0``, ``-1``, ...)."""
    workers = []
    index = 0
    while True:
        try:
            workers.append(ray.get_actor(f"{GPU_WORKER_PREFIX}{index}", namespace=namespace))
        except ValueError:
            return workers
        index += 1


class CoordinatorActor(Coordinator):
    """The coordinator, with its pool of Ray workers built inside the actor."""

    def __init__(self, config, metrics_port: int | None, namespace: str):
        pool = RayWorkerPool(config, start_gpu_workers(config, namespace=namespace), namespace=namespace)
        super().__init__(config, pool, metrics_port=metrics_port)
        # After a crash Ray re-runs __init__ but calls nothing else: resume running batches ourselves.
        # (A thread, because __init__ has no event loop; start() is idempotent.)
        own_handle = ray.get_runtime_context().current_actor
        threading.Thread(target=lambda: own_handle.start.remote(), daemon=True).start()


class RetentionControllerActor(RetentionController):
    """The retention controller, reaching the coordinator and the GPU workers through Ray."""

    def __init__(self, config, metrics_port: int | None, namespace: str):
        self._namespace = namespace
        # Worker id → the node it was last seen on: a worker whose node is gone is restarting with no
        # node in Ray's actor table, and the receipt must still name the node that held its files.
        self._worker_nodes: dict[str, str] = {}
        hooks = DeletionHooks(stop_persons=self._stop_persons, purge_workers=self._purge_workers,
                              repackage_batch=self._repackage_batch)
        store = ArtifactStore.from_config(config.store)
        super().__init__(config, hooks=hooks, metrics_port=metrics_port, key_store=key_store_for(config, store))
        # Sweep at start-up and after every restart (Ray re-runs only __init__).
        own_handle = ray.get_runtime_context().current_actor
        threading.Thread(target=lambda: own_handle.start.remote(), daemon=True).start()

    def _stop_persons(self, persons) -> None:
        # Where every worker is as the deletion starts: a node lost during it (the stop below can take
        # a while) may already be gone from Ray's actor table when the workers are asked to purge.
        self._note_worker_nodes(existing_gpu_workers(self._namespace))
        try:
            coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self._namespace)
        except ValueError:
            return  # no coordinator: nothing is running
        ray.get(coordinator.stop_persons.remote(
            [{"tenant": p.tenant, "batch_id": p.batch_id, "person_id": p.person_id} for p in persons]))

    def _note_worker_nodes(self, workers: list) -> dict[str, Any]:
        """Remember the node Ray's actor table places each worker on; returns worker id → handle."""
        handles = {f"gpu-{index}": handle for index, handle in enumerate(workers)}
        for worker_id, handle in handles.items():
            node_id = _actor_node(handle)
            if node_id is not None:
                self._worker_nodes[worker_id] = node_id
        return handles

    def _purge_workers(self, persons) -> dict[str, list[dict[str, Any]]]:
        """Every GPU worker purges these persons, all asked at once and waited for together at most
        ``retention.worker_purge_timeout_s``: a worker on a node that is down, cut off or hung costs the
        deletion that bound, never more, and never fails it. The answer accounts for every node that
        hosts or hosted GPU workers (:mod:`cluster.purge`), confirmed or covered otherwise.

        Returns:
            ``{"workers": [one entry per worker], "nodes": [one entry per node]}`` for the receipt.
        """
        prefixes = [p.prefix for p in persons]
        handles = self._note_worker_nodes(existing_gpu_workers(self._namespace))
        # Ray's retries stay on: a worker that dies mid-purge purges again once restarted. An unanswered
        # call is not withdrawn either: a worker that was only slow runs it when it gets to it.
        calls = {worker_id: handle.purge.remote(prefixes) for worker_id, handle in handles.items()}
        ready = set()
        if calls:
            ready, _ = ray.wait(list(calls.values()), num_returns=len(calls),
                                timeout=self.config.retention.worker_purge_timeout_s)
            ready = set(ready)
        nodes = _node_table()
        purges = []
        for worker_id, call in calls.items():
            answer, error, outcome = None, None, TIMED_OUT
            if call in ready:
                try:
                    answer = ray.get(call)
                    outcome = CONFIRMED if answer.get("purged") else INCOMPLETE
                    if answer.get("node_id"):
                        self._worker_nodes[worker_id] = answer["node_id"]
                except Exception as failure:  # noqa: BLE001 - recorded: the worker died or cannot be reached
                    outcome, error = UNREACHABLE, type(failure).__name__
            node_id = self._worker_nodes.get(worker_id)
            if outcome != CONFIRMED and node_id in nodes and not nodes[node_id]["alive"]:
                outcome = NODE_DEAD
            purges.append(WorkerPurge(worker_id=worker_id, node_id=node_id, outcome=outcome, answer=answer,
                                      error=error))
            if outcome != CONFIRMED:
                logger.warning("GPU worker %s (node %s) did not confirm its purge: %s%s", worker_id, node_id,
                               outcome, f" ({error})" if error else "")
        # Dead nodes that offered GPUs and whose host has not come back (no live node at its address):
        # they may hold files of anyone, though no worker is placed there now (a restarted controller
        # has no memory of where workers were).
        live_addresses = {node["address"] for node in nodes.values() if node["alive"]}
        lost_gpu_nodes = [node_id for node_id, node in nodes.items()
                          if not node["alive"] and node["gpus"] > 0 and node["address"] not in live_addresses]
        barriers_in_store = bool(persons) and all(barrier.is_deleted(self.store, person) for person in persons)
        return {"workers": [purge.to_json() for purge in purges],
                "nodes": node_entries(purges, nodes, gpu_nodes=lost_gpu_nodes, barriers_in_store=barriers_in_store)}

    def _repackage_batch(self, tenant: str, batch_id: str) -> None:
        from storage.state import StateStore

        states = StateStore(self.store)
        batch = states.load_batch(tenant, batch_id)
        persons = [p for p in states.load_persons(batch) if p.headshots]
        if persons:
            ray.get(package_batch_task.remote(self.config, {
                "tenant": tenant, "batch_id": batch_id, "batch_name": batch.name, "base_model": batch.base_model,
                "persons": [{"person_id": p.person_id, "state": p.state, "headshots": [vars(h) for h in p.headshots],
                             "timings_s": p.timings_s, "flags": p.flags} for p in persons]}))


def _get_or_create_singleton(actor_class, name: str, config, metrics_port: int | None, *, max_concurrency: int):
    """A named, detached, forever-restarted actor of the stack (created on first use), on the head node."""
    namespace = config.ray.namespace
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return ray.remote(actor_class).options(
            name=name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
            max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES, max_concurrency=max_concurrency,
            # On the head node, where the metrics Service points and which no GPU node's loss takes
            # down. (A soft NodeAffinity to the creating node does not hold in Ray 2.60: measured on a
            # three-node cluster, half of such detached actors landed on other nodes.) A head that is
            # replaced (GCS fault tolerance, a restarted head pod) has the resource again.
            resources={HEAD_NODE_RESOURCE: 0.001},
        ).remote(config, metrics_port, namespace)


def get_or_create_retention_controller(config, *, metrics_port: int | None):
    """The running retention controller, created if absent. Call after ``ray.init``."""
    handle = _get_or_create_singleton(RetentionControllerActor, RETENTION_NAME, config, metrics_port,
                                      max_concurrency=4)
    ray.get(handle.ping.remote())
    return handle


def get_or_create_coordinator(config, *, metrics_port: int | None):
    """The running coordinator, created (and started) if absent. Call after ``ray.init``."""
    # Async actor: one event loop drives every batch, so it takes many calls at once.
    handle = _get_or_create_singleton(CoordinatorActor, COORDINATOR_NAME, config, metrics_port,
                                      max_concurrency=1000)
    ray.get(handle.start.remote())
    return handle
