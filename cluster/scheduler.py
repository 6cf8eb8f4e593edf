"""Which GPU stage runs next, and on which worker: weighted fair share between tenants.

Pure and synchronous: no Ray, no S3, no asyncio, no threads, no I/O. **Not thread-safe by contract**:
one owner (the coordinator's event loop) calls it, and every call returns without awaiting, so calls
never interleave. The coordinator turns its decisions into actor calls (see "Integration" below).

A unit of work is one :class:`Task`: one person, one GPU stage (``train`` or ``generate``) — never
one image. The scheduler decides in three steps, each cheap enough to run at every freed slot:

1. **Tenant** — weighted fair queuing on GPU time (start-time fair queuing, charged per task).
   Each tenant carries ``used``, its weighted GPU-seconds: at dispatch it is charged the task's
   estimated duration / weight, and at completion the estimate is replaced by the measured duration.
   The tenant with the least ``used`` among those with queued work and quota headroom goes next. A
   tenant that becomes active (nothing queued or running before this submit) starts at
   ``max(used, V)``, where V, the virtual time, is the least GPU time actually received so far
   (running tasks counted by the time they have run) by an active tenant below its quota. So idle
   time earns no credit, work dispatched before a newcomer arrived is not held against it, and a
   newcomer is not stuck behind work queued before it: a 5-person batch submitted a minute after a
   500-person one takes the next freed slots until its charged time catches up with what the big
   one has actually received, then shares by weight.
2. **Task within the tenant** — batch priority (higher first), then ``submitted_at`` (FIFO), then
   later stages first, then submission order. The coordinator passes a person's original submit
   time for *every* stage, so a person's ``generate`` keeps that person's place in line and goes
   ahead of trains of persons behind them: persons finish depth-first, and the first headshots
   come early.
3. **Worker** — a free slot on a worker whose resident base model matches (a LoRA swap), else an
   empty worker, else an idle worker whose model is least wanted by the queue (a pipeline reload).
   A worker with ``slots`` > 1 runs several tasks of its one resident model; it takes a task for
   another model only when fully idle, and its free slots are offered to each tenant's next task
   only (order within a tenant is strict: no backfill from behind a tenant's head). If the fair
   tenant's task would force a reload, a tenant whose ``used`` is within ``affinity_slack_s`` of it
   and whose task fits a resident model goes instead (delay scheduling for model affinity):
   fairness bends by at most the slack, and reloads stay rare.

Quota: ``tenant_quota[t]`` caps the GPUs a tenant holds at once; a task on a worker with ``slots=n``
holds 1/n of a GPU.

Estimates per (base_model, stage) are exponentially weighted moving averages of measured durations;
before the first measurement the stage prior (:data:`DEFAULT_STAGE_PRIOR_S`) is used, and a task's own
``cost_estimate_s`` beats both.

Decision cost: O(T log T + F) for T tenants with queued work and F workers with a free slot — the
queue length does not enter (per-tenant heaps). Submit and complete are O(log n) (a submit that
makes a tenant active also scans the tenants and their running tasks once).

Integration (asyncio): the pool owns one instance. Its GPU call submits a Task, parks an
``asyncio.Future`` under ``task.key`` and runs ``dispatch()``; ``dispatch()`` loops
``while (a := scheduler.next_assignment()) is not None`` and resolves each future with its worker id.
The call then awaits the actor, and in ``finally`` calls ``complete`` (``failed=True`` on error)
and ``dispatch()`` again. ``cancel`` drops queued work of deleted persons (running stages are
revoked as today); ``remove_worker`` drops a dead actor and returns its tasks for re-submission.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

__all__ = ["DEFAULT_STAGE_PRIOR_S", "STAGES", "FairScheduler", "Task", "TaskKey"]

# GPU stages of one person, in the order they run.
STAGES: tuple[str, ...] = ("train", "generate")
_STAGE_INDEX = {stage: index for index, stage in enumerate(STAGES)}
# Prior durations before any measurement, seconds per person on one GPU: the cost model
# (an 800-step LoRA fine-tune ≈ 100 s; 40 images ≈ 26 s).
DEFAULT_STAGE_PRIOR_S: Mapping[str, float] = MappingProxyType({"train": 100.0, "generate": 26.0})
DEFAULT_EWMA_ALPHA = 0.2
# How far (weighted GPU-seconds) a tenant may get ahead of its fair turn to avoid a pipeline reload.
DEFAULT_AFFINITY_SLACK_S = 120.0
DEFAULT_BUSY_WINDOW_S = 600.0
_EPS = 1e-9

TaskKey = tuple[str, str, str, str]  # (tenant, batch_id, person_id, stage)


def _require_name(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{field_name}` must be a non-empty string but is {value!r}")


def _require_finite(field_name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{field_name}` must be a finite number but is {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"`{field_name}` must be {relation} {minimum} but is {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class Task:
    """One GPU stage of one person.

    Args:
        tenant, batch_id, person_id: who the work is for (ids, never names).
        stage: ``"train"`` or ``"generate"``.
        base_model: the base model the stage needs resident on the GPU.
        priority: the batch's priority; higher runs first within the tenant.
        submitted_at: the person's place in line, in seconds. Only its order among tasks matters (it
            is never compared with the scheduler's clock), so a stored wall-clock submit time that
            survives a coordinator restart serves as well as a monotonic one, as long as every task
            uses the same kind. Pass the same value for every stage and every retry of a person
            (e.g. batch submit time + roster index × 1 ms): ties are broken by submission order, so a
            retried task given its batch's time goes behind its batch-mates.
        cost_estimate_s: the caller's estimate of the stage's GPU seconds; None: use the measured
            average for (base_model, stage), or its prior.

    Raises:
        ValueError: a field is empty, not finite, or not one of its allowed values.
    """

    tenant: str
    batch_id: str
    person_id: str
    stage: str
    base_model: str
    priority: int = 0
    submitted_at: float
    cost_estimate_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("tenant", "batch_id", "person_id", "base_model"):
            _require_name(name, getattr(self, name))
        if self.stage not in _STAGE_INDEX:
            allowed = ", ".join(repr(stage) for stage in STAGES)
            raise ValueError(f"`stage` must be one of {allowed} but is {self.stage!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"`priority` must be an integer but is {self.priority!r}")
        _require_finite("submitted_at", self.submitted_at)
        if self.cost_estimate_s is not None:
            _require_finite("cost_estimate_s", self.cost_estimate_s, minimum=0.0, strict=True)

    @property
    def key(self) -> TaskKey:
        """(tenant, batch_id, person_id, stage): at most one such task is queued or running at a time."""
        return (self.tenant, self.batch_id, self.person_id, self.stage)

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.batch_id}/{self.person_id}:{self.stage}"


@dataclass(eq=False)
class _Running:
    task: Task
    worker: _Worker
    charged_s: float  # unweighted seconds charged at dispatch
    started_at: float  # clock time


@dataclass(eq=False)
class _Worker:
    worker_id: str
    slots: int
    model: str | None
    added_at: float
    running: dict[TaskKey, _Running] = field(default_factory=dict)
    # Finished busy intervals (start, end) within the busy window, oldest first.
    intervals: deque = field(default_factory=deque)


@dataclass(eq=False)
class _Tenant:
    name: str
    weight: float
    quota: int | None
    used: float = 0.0
    # Heap of (-priority, submitted_at, -stage index, sequence, key).
    queue: list = field(default_factory=list)
    running: dict[TaskKey, _Running] = field(default_factory=dict)
    gpus_in_use: float = 0.0

    @property
    def headroom(self) -> float:
        return math.inf if self.quota is None else self.quota - self.gpus_in_use


class FairScheduler:
    """Weighted fair scheduling of GPU stages over a pool of workers (see the module docstring).

    Not thread-safe: call it from one thread (the coordinator's event loop) only.

    Args:
        tenant_weights: weight per tenant (share of GPU time is proportional to weight while tenants
            compete); tenants not listed get ``default_weight``.
        default_weight: weight of unlisted tenants.
        tenant_quota: at most this many GPUs in use at once per listed tenant (unlisted: no cap).
        clock: monotonic seconds, for running times (ETA, busy ratio, catch-up); the callers measure
            ``duration_s`` themselves.
        stage_prior_s: duration per stage before any measurement (default
            :data:`DEFAULT_STAGE_PRIOR_S`); must cover every stage in :data:`STAGES`.
        ewma_alpha: weight of each new measurement in the per-(base_model, stage) average, in (0, 1].
        affinity_slack_s: how many weighted GPU-seconds a tenant may be served ahead of its fair turn
            so that a free worker keeps its resident model (0: strict fairness, reload when needed).
        busy_window_s: the longest window :meth:`busy_ratio` can look back over.

    Raises:
        ValueError: a weight is not > 0, a quota is not an integer >= 1, or another argument is out of
            its range (the message names it).
    """

    def __init__(self, *, tenant_weights: Mapping[str, float] | None = None, default_weight: float = 1.0,
                 tenant_quota: Mapping[str, int] | None = None, clock: Callable[[], float] = time.monotonic,
                 stage_prior_s: Mapping[str, float] | None = None, ewma_alpha: float = DEFAULT_EWMA_ALPHA,
                 affinity_slack_s: float = DEFAULT_AFFINITY_SLACK_S,
                 busy_window_s: float = DEFAULT_BUSY_WINDOW_S) -> None:
        self._default_weight = _require_finite("default_weight", default_weight, minimum=0.0, strict=True)
        self._weights: dict[str, float] = {}
        for tenant, weight in (tenant_weights or {}).items():
            _require_name("tenant_weights key", tenant)
            self._weights[tenant] = _require_finite(f"tenant_weights[{tenant!r}]", weight, minimum=0.0, strict=True)
        self._quotas: dict[str, int] = {}
        for tenant, quota in (tenant_quota or {}).items():
            _require_name("tenant_quota key", tenant)
            if isinstance(quota, bool) or not isinstance(quota, int) or quota < 1:
                raise ValueError(f"`tenant_quota[{tenant!r}]` must be an integer >= 1 (GPUs) but is {quota!r}")
            self._quotas[tenant] = quota
        priors = dict(DEFAULT_STAGE_PRIOR_S if stage_prior_s is None else stage_prior_s)
        for stage in STAGES:
            if stage not in priors:
                raise ValueError(f"`stage_prior_s` must give a duration for every stage {STAGES} but lacks {stage!r}")
            priors[stage] = _require_finite(f"stage_prior_s[{stage!r}]", priors[stage], minimum=0.0, strict=True)
        unknown = set(priors) - set(STAGES)
        if unknown:
            raise ValueError(f"`stage_prior_s` keys must be among {STAGES} but include {sorted(unknown)}")
        self._prior_s = priors
        alpha = _require_finite("ewma_alpha", ewma_alpha, minimum=0.0, strict=True)
        if alpha > 1:
            raise ValueError(f"`ewma_alpha` must be in (0, 1] but is {ewma_alpha!r}")
        self._alpha = alpha
        self._slack = _require_finite("affinity_slack_s", affinity_slack_s, minimum=0.0)
        self._busy_window_s = _require_finite("busy_window_s", busy_window_s, minimum=0.0, strict=True)
        self._clock = clock

        self._tenants: dict[str, _Tenant] = {}
        self._backlogged: dict[str, _Tenant] = {}  # tenants with at least one queued task
        self._queued: dict[TaskKey, Task] = {}
        self._running: dict[TaskKey, _Running] = {}
        self._depth: dict[tuple[str, str], int] = {}
        self._queued_by_model: dict[str, int] = {}
        self._workers: dict[str, _Worker] = {}
        # Workers with a free slot, by resident model (None: never loaded one); fully idle workers.
        self._free_by_model: dict[str | None, dict[str, _Worker]] = {}
        self._idle: dict[str, _Worker] = {}
        self._ewma_s: dict[tuple[str, str], float] = {}
        self._vtime = 0.0
        self._sequence = 0
        self.model_switches = 0  # dispatches that replaced a worker's resident model (pipeline reloads)

    # --- workers ---------------------------------------------------------------------------------

    def add_worker(self, worker_id: str, *, slots: int = 1, resident_model: str | None = None) -> None:
        """Register a worker (one GPU).

        Args:
            worker_id: a stable, unique name (e.g. the actor's name).
            slots: how many tasks it runs at once (all of one resident base model).
            resident_model: the base model it already holds (after a coordinator restart), or None.

        Raises:
            ValueError: the id is empty or already registered, or ``slots`` is not an integer >= 1.
        """
        _require_name("worker_id", worker_id)
        if worker_id in self._workers:
            raise ValueError(f"`worker_id` {worker_id!r} is already registered")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"`slots` must be an integer >= 1 but is {slots!r}")
        if resident_model is not None:
            _require_name("resident_model", resident_model)
        worker = _Worker(worker_id, slots, resident_model, self._clock())
        self._workers[worker_id] = worker
        self._reindex(worker, previous_model=resident_model)

    def remove_worker(self, worker_id: str) -> list[Task]:
        """Forget a worker (its actor is gone for good).

        The tenants are charged the time its running tasks had run so far.

        Returns:
            The tasks it was running, now known to the scheduler no more: submit them again to retry.

        Raises:
            KeyError: no such worker.
        """
        worker = self._worker(worker_id)
        now = self._clock()
        orphans = []
        for run in list(worker.running.values()):
            self._finish(run, max(0.0, now - run.started_at))
            orphans.append(run.task)
        self._free_by_model.get(worker.model, {}).pop(worker_id, None)
        self._idle.pop(worker_id, None)
        del self._workers[worker_id]
        return orphans

    # --- tasks -----------------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task.

        Raises:
            TypeError: ``task`` is not a :class:`Task`.
            ValueError: a task with the same (tenant, batch_id, person_id, stage) is queued or running.
        """
        if not isinstance(task, Task):
            raise TypeError(f"`task` must be a Task but is {type(task).__name__}")
        key = task.key
        if key in self._queued or key in self._running:
            raise ValueError(f"task {task.label} is already queued or running")
        tenant = self._tenant(task.tenant)
        if not tenant.queue and not tenant.running:
            # Becoming active: no credit for the time it had nothing to run.
            tenant.used = max(tenant.used, self._virtual_time())
        self._sequence += 1
        heapq.heappush(tenant.queue, (-task.priority, task.submitted_at, -_STAGE_INDEX[task.stage],
                                      self._sequence, key))
        self._backlogged[tenant.name] = tenant
        self._queued[key] = task
        depth_key = (task.tenant, task.stage)
        self._depth[depth_key] = self._depth.get(depth_key, 0) + 1
        self._queued_by_model[task.base_model] = self._queued_by_model.get(task.base_model, 0) + 1

    def cancel(self, predicate: Callable[[Task], bool] | None = None, *, tenant: str | None = None,
               batch_id: str | None = None, person_id: str | None = None) -> list[Task]:
        """Remove queued tasks that match every criterion given (running tasks are left alone).

        Args:
            predicate: a function of a task; True removes it.
            tenant, batch_id, person_id: equality filters (combined with ``predicate`` by AND).

        Returns:
            The removed tasks, in no particular order.

        Raises:
            ValueError: no criterion was given (cancelling everything must be explicit:
                ``cancel(lambda task: True)``).
            TypeError: ``predicate`` is not callable.
        """
        if predicate is None and tenant is None and batch_id is None and person_id is None:
            raise ValueError("cancel needs `predicate`, `tenant`, `batch_id` or `person_id`")
        if predicate is not None and not callable(predicate):
            raise TypeError(f"`predicate` must be callable but is {type(predicate).__name__}")

        def matches(task: Task) -> bool:
            return ((tenant is None or task.tenant == tenant) and (batch_id is None or task.batch_id == batch_id)
                    and (person_id is None or task.person_id == person_id)
                    and (predicate is None or bool(predicate(task))))

        if tenant is None:
            candidates = list(self._queued.values())
        else:
            state = self._tenants.get(tenant)
            candidates = [self._queued[entry[-1]] for entry in state.queue] if state is not None else []
        removed = [task for task in candidates if matches(task)]
        touched = set()
        for task in removed:
            del self._queued[task.key]
            self._count_down(task)
            touched.add(task.tenant)
        for name in touched:
            state = self._tenants[name]
            state.queue = [entry for entry in state.queue if entry[-1] in self._queued]
            heapq.heapify(state.queue)
            if not state.queue:
                self._backlogged.pop(name, None)
        return removed

    def next_assignment(self) -> tuple[str, Task] | None:
        """Pick the next task and the worker slot it runs on, and mark it running.

        Call repeatedly until it returns None; each returned task must later be passed to
        :meth:`complete` (or come back from :meth:`remove_worker`).

        Returns:
            (worker_id, task), or None when no queued task can start now (no free slot, nothing queued,
            or every tenant with queued work is at its quota).
        """
        if not self._backlogged or not any(self._free_by_model.values()):
            return None
        fallback: tuple[_Tenant, Task, _Worker] | None = None
        for tenant in sorted(self._backlogged.values(), key=_fair_order):
            if fallback is not None and tenant.used > fallback[0].used + self._slack:
                break
            headroom = tenant.headroom
            if headroom < _EPS:
                continue
            task = self._queued[tenant.queue[0][-1]]
            worker = self._resident_worker(task.base_model, headroom)
            if worker is not None:
                return self._dispatch(tenant, task, worker)
            if fallback is None:
                worker = self._reload_worker(headroom)
                if worker is not None:
                    fallback = (tenant, task, worker)
        if fallback is not None:
            return self._dispatch(*fallback)
        return None

    def complete(self, worker_id: str, task: Task, duration_s: float, *, failed: bool = False) -> None:
        """A task's stage returned: free its slot, charge the measured time, learn the stage's duration.

        Args:
            worker_id: the worker it was assigned to.
            task: the task exactly as :meth:`next_assignment` returned it.
            duration_s: GPU seconds the stage took (wall time of the worker call).
            failed: the stage raised; the time is charged, but not learned as a stage duration.
                Submit the task again to retry it.

        Raises:
            KeyError: no such worker.
            ValueError: the task is not running on that worker, or ``duration_s`` is negative/not finite.
        """
        duration_s = _require_finite("duration_s", duration_s, minimum=0.0)
        worker = self._worker(worker_id)
        run = worker.running.get(task.key) if isinstance(task, Task) else None
        if run is None or run.task != task:
            label = task.label if isinstance(task, Task) else repr(task)
            raise ValueError(f"task {label} is not running on worker {worker_id!r}")
        self._finish(run, duration_s)
        if not failed and duration_s > 0:
            key = (task.base_model, task.stage)
            previous = self._ewma_s.get(key)
            self._ewma_s[key] = duration_s if previous is None else (
                self._alpha * duration_s + (1 - self._alpha) * previous)

    # --- estimates and views ------------------------------------------------------------------

    def stage_estimate_s(self, base_model: str, stage: str) -> float:
        """Expected seconds of ``stage`` with ``base_model``: the measured moving average, else the prior.

        Raises:
            ValueError: unknown stage.
        """
        if stage not in _STAGE_INDEX:
            raise ValueError(f"`stage` must be one of {', '.join(map(repr, STAGES))} but is {stage!r}")
        return self._ewma_s.get((base_model, stage), self._prior_s[stage])

    def eta_seconds(self, tenant: str, batch_id: str) -> float | None:
        """Seconds from now until the batch's GPU stages are all done, by the model below.

        Model (a snapshot, recomputed at each call): each active tenant gets a share of the slots by
        weighted max-min water-filling, capped by its quota and by how many of its persons have work
        (a person's stages run one after another). Within the tenant, whole persons are list-scheduled
        in queue order onto ``round(share)`` slots running at ``share / round(share)`` speed: persons
        already running finish first on their own slots, each next person starts on the slot that
        frees first. A person's remaining work = the rest of its running stage's estimate, its queued
        stages' estimates, and every later GPU stage (not yet submitted). Other tenants' future
        arrivals and departures are not foreseen.

        Returns:
            Seconds (>= 0), or None when the scheduler holds no queued or running task of the batch, or
            there are no workers.
        """
        finishes = self._person_finishes(tenant)
        if finishes is None:
            return None
        times = [finish for (batch, _), finish in finishes.items() if batch == batch_id]
        return max(times) if times else None

    def eta_person_seconds(self, tenant: str, batch_id: str, person_id: str) -> float | None:
        """Seconds from now until this person's GPU stages are done (see :meth:`eta_seconds`).

        Returns:
            Seconds (>= 0), or None when no task of the person is queued or running, or no workers.
        """
        finishes = self._person_finishes(tenant)
        return None if finishes is None else finishes.get((batch_id, person_id))

    def eta_persons_seconds(self, tenant: str, batch_id: str) -> dict[str, float]:
        """Every person of the batch with queued or running GPU work → seconds until its GPU stages are
        done; one pass over the tenant's schedule (asking :meth:`eta_person_seconds` per person would
        recompute it for each)."""
        finishes = self._person_finishes(tenant) or {}
        return {person: finish for (batch, person), finish in finishes.items() if batch == batch_id}

    def queue_depth(self) -> dict[tuple[str, str], int]:
        """Queued (not running) tasks per (tenant, stage); pairs with none are left out."""
        return {key: count for key, count in self._depth.items() if count}

    def running(self) -> dict[str, tuple[Task, ...]]:
        """The tasks running on each registered worker (empty tuple: idle)."""
        return {worker_id: tuple(run.task for run in worker.running.values())
                for worker_id, worker in self._workers.items()}

    def resident_model(self, worker_id: str) -> str | None:
        """The base model the worker holds (as far as the scheduler placed it), or None.

        Raises:
            KeyError: no such worker.
        """
        return self._worker(worker_id).model

    def tenant_usage_s(self) -> dict[str, float]:
        """Weighted GPU-seconds charged per tenant (the fair-share clock; running tasks by estimate)."""
        return {name: tenant.used for name, tenant in self._tenants.items()}

    def busy_ratio(self, worker_id: str, window_s: float | None = None) -> float:
        """Fraction of the worker's slot-time that was busy over the last ``window_s`` seconds.

        Args:
            worker_id: a registered worker.
            window_s: look-back window; None or larger than ``busy_window_s``: ``busy_window_s``. A
                worker added more recently is measured since it was added.

        Returns:
            A ratio in [0, 1].

        Raises:
            KeyError: no such worker.
            ValueError: ``window_s`` is not > 0.
        """
        worker = self._worker(worker_id)
        window = self._busy_window_s if window_s is None else min(
            _require_finite("window_s", window_s, minimum=0.0, strict=True), self._busy_window_s)
        now = self._clock()
        since = max(now - window, worker.added_at)
        if now <= since:
            return 0.0
        busy = sum(max(0.0, end - max(start, since)) for start, end in worker.intervals if end > since)
        busy += sum(now - max(run.started_at, since) for run in worker.running.values())
        return min(1.0, busy / ((now - since) * worker.slots))

    # --- internals -------------------------------------------------------------------------------

    def _tenant(self, name: str) -> _Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = _Tenant(name, self._weights.get(name, self._default_weight), self._quotas.get(name))
            self._tenants[name] = tenant
        return tenant

    def _worker(self, worker_id: str) -> _Worker:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise KeyError(f"no worker {worker_id!r} is registered") from None

    def _estimate_s(self, task: Task) -> float:
        if task.cost_estimate_s is not None:
            return task.cost_estimate_s
        return self._ewma_s.get((task.base_model, task.stage), self._prior_s[task.stage])

    def _virtual_time(self) -> float:
        """The fair-share clock a tenant joins at: the least service received by an active tenant.

        Service received = ``used`` less what is charged for running tasks but not yet run (each
        running task counts the time it has run so far, up to its estimate): the work a tenant has
        actually had, not work dispatched before the newcomer arrived. Tenants at their quota are left
        out (their lag is the quota's doing; counting it would let every newcomer jump ahead of the
        uncapped tenants by that lag). With no active tenant: the most any tenant has used, so an idle
        system carries no credit forward. Never decreases.
        """
        now = self._clock()
        received = []
        active = False
        for tenant in self._tenants.values():
            if not tenant.queue and not tenant.running:
                continue
            active = True
            if tenant.headroom < _EPS:
                continue
            ahead = sum(max(0.0, run.charged_s - (now - run.started_at)) for run in tenant.running.values())
            received.append(tenant.used - ahead / tenant.weight)
        if received:
            self._vtime = max(self._vtime, min(received))
        elif not active and self._tenants:
            self._vtime = max(self._vtime, max(tenant.used for tenant in self._tenants.values()))
        return self._vtime

    def _resident_worker(self, model: str, headroom: float) -> _Worker | None:
        """A free slot without a reload: a worker holding ``model`` (least loaded first), else an empty one."""
        best = None
        for worker in self._free_by_model.get(model, {}).values():
            if 1.0 / worker.slots > headroom + _EPS:
                continue
            if not worker.running:
                return worker
            if best is None or len(worker.running) < len(best.running):
                best = worker
        if best is not None:
            return best
        for worker in self._free_by_model.get(None, {}).values():
            if 1.0 / worker.slots <= headroom + _EPS:
                return worker
        return None

    def _reload_worker(self, headroom: float) -> _Worker | None:
        """An idle worker to load another model on: the one whose model the queue wants least."""
        best, best_demand = None, math.inf
        for worker in self._idle.values():
            if 1.0 / worker.slots > headroom + _EPS:
                continue
            demand = self._queued_by_model.get(worker.model, 0) if worker.model is not None else -1
            if demand < best_demand:
                best, best_demand = worker, demand
                if demand <= 0:
                    break
        return best

    def _dispatch(self, tenant: _Tenant, task: Task, worker: _Worker) -> tuple[str, Task]:
        heapq.heappop(tenant.queue)
        if not tenant.queue:
            del self._backlogged[tenant.name]
        del self._queued[task.key]
        self._count_down(task)
        previous_model = worker.model
        if previous_model != task.base_model:
            if previous_model is not None:
                self.model_switches += 1
            worker.model = task.base_model
        charged = self._estimate_s(task)
        run = _Running(task, worker, charged, self._clock())
        tenant.used += charged / tenant.weight
        tenant.running[task.key] = run
        tenant.gpus_in_use += 1.0 / worker.slots
        worker.running[task.key] = run
        self._running[task.key] = run
        self._reindex(worker, previous_model)
        return worker.worker_id, task

    def _finish(self, run: _Running, duration_s: float) -> None:
        """Free the run's slot and replace its estimated charge with ``duration_s``."""
        task, worker = run.task, run.worker
        tenant = self._tenants[task.tenant]
        tenant.used += (duration_s - run.charged_s) / tenant.weight
        del tenant.running[task.key]
        tenant.gpus_in_use = tenant.gpus_in_use - 1.0 / worker.slots if tenant.running else 0.0
        del worker.running[task.key]
        del self._running[task.key]
        now = self._clock()
        worker.intervals.append((run.started_at, now))
        horizon = now - self._busy_window_s
        while worker.intervals and worker.intervals[0][1] < horizon:
            worker.intervals.popleft()
        self._reindex(worker, worker.model)

    def _reindex(self, worker: _Worker, previous_model: str | None) -> None:
        self._free_by_model.get(previous_model, {}).pop(worker.worker_id, None)
        self._idle.pop(worker.worker_id, None)
        if len(worker.running) < worker.slots:
            # Re-inserted at the end: among equals, the worker free the longest is found first.
            self._free_by_model.setdefault(worker.model, {})[worker.worker_id] = worker
        if not worker.running:
            self._idle[worker.worker_id] = worker

    def _count_down(self, task: Task) -> None:
        self._depth[(task.tenant, task.stage)] -= 1
        self._queued_by_model[task.base_model] -= 1

    def _person_finishes(self, tenant_name: str) -> dict[tuple[str, str], float] | None:
        """Estimated seconds until each person of the tenant with held work is done (see eta_seconds)."""
        tenant = self._tenants.get(tenant_name)
        if tenant is None or not self._workers or (not tenant.queue and not tenant.running):
            return None
        now = self._clock()
        persons: dict[tuple[str, str], list] = {}  # (batch, person) -> [order, remaining_s, last stage, model]

        def hold(task: Task, order: tuple, remaining_s: float) -> None:
            entry = persons.setdefault((task.batch_id, task.person_id), [order, 0.0, -1, task.base_model])
            entry[0] = min(entry[0], order)
            entry[1] += remaining_s
            if _STAGE_INDEX[task.stage] > entry[2]:
                entry[2], entry[3] = _STAGE_INDEX[task.stage], task.base_model

        for run in tenant.running.values():
            hold(run.task, (0, run.started_at), max(0.0, run.charged_s - (now - run.started_at)))
        for entry in tenant.queue:
            task = self._queued[entry[-1]]
            hold(task, (1,) + entry[:4], self._estimate_s(task))
        for entry in persons.values():
            entry[1] += sum(self.stage_estimate_s(entry[3], stage) for stage in STAGES[entry[2] + 1:])

        share = self._capacity_shares().get(tenant_name, 0.0)
        if share <= _EPS:
            return None
        # List scheduling of whole persons (depth-first order) on the tenant's share: k slots, each
        # running at share/k of a GPU. A person already running keeps its slot until it is done; if it
        # holds more slots than its share, the first ones to free up go to other tenants.
        slot_count = max(1, round(share))
        speed = share / slot_count
        finishes: dict[tuple[str, str], float] = {}
        ordered = sorted(persons.items(), key=lambda item: item[1][0])
        busy_until = []
        for key, (order, remaining_s, _, _) in ordered:
            if order[0] == 0:
                finishes[key] = remaining_s
                busy_until.append(remaining_s)
        busy_until.sort()
        slots = busy_until[-slot_count:] if len(busy_until) > slot_count else (
            busy_until + [0.0] * (slot_count - len(busy_until)))
        heapq.heapify(slots)
        for key, (order, remaining_s, _, _) in ordered:
            if order[0] == 0:
                continue
            finish = heapq.heappop(slots) + remaining_s / speed
            finishes[key] = finish
            heapq.heappush(slots, finish)
        return finishes

    def _capacity_shares(self) -> dict[str, float]:
        """Slots per active tenant: weighted max-min water-filling, capped by quota and persons with work."""
        total_slots = sum(worker.slots for worker in self._workers.values())
        slots_per_gpu = total_slots / len(self._workers)
        caps: dict[str, float] = {}
        for tenant in self._tenants.values():
            if not tenant.queue and not tenant.running:
                continue
            persons = {key[:3] for key in tenant.running} | {entry[-1][:3] for entry in tenant.queue}
            cap = float(len(persons))
            if tenant.quota is not None:
                cap = min(cap, tenant.quota * slots_per_gpu)
            caps[tenant.name] = cap
        return _water_fill(float(total_slots), {name: self._tenants[name].weight for name in caps}, caps)


def _fair_order(tenant: _Tenant) -> tuple:
    # Least weighted use first; ties go to the head task with higher priority, then earlier submit.
    return (tenant.used, tenant.queue[0])


def _water_fill(total: float, weights: Mapping[str, float], caps: Mapping[str, float]) -> dict[str, float]:
    """Split ``total`` in proportion to ``weights``, never giving anyone more than its cap (max-min)."""
    shares: dict[str, float] = {}
    remaining, weight_left = total, sum(weights.values())
    for name in sorted(caps, key=lambda n: caps[n] / weights[n]):
        fair = remaining * weights[name] / weight_left if weight_left > 0 else 0.0
        shares[name] = min(caps[name], fair)
        remaining -= shares[name]
        weight_left -= weights[name]
    return shares
