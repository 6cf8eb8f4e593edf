"""The coordinator: moves every person of every running batch through ingest → train → generate → package.

It holds no state of its own that matters: batch and person state documents in the store are the
truth, written at every transition. If the actor dies, Ray restarts it (``max_restarts``), and
``start()`` reads every batch still ``running`` back from the store and carries each person on from
the stage it had reached. Stages are idempotent (see :mod:`cluster.worker`), so a stage that was
running when the coordinator died is simply run again.

Fencing: each coordinator that starts claims the next *epoch* with a create-only write to the store
(of two racing claims exactly one wins), tells every GPU worker, and waits until stages sent by its
predecessors have stopped. Jobs carry the epoch; a worker refuses any job older than the newest epoch
it has seen, and a running stale stage stops at its next step or write. So after a restart no stage
ever runs twice at once, and output keys being deterministic, a re-run overwrites nothing twice.

Failures: a stage that raises counts against ``workers.max_stage_attempts`` (poison input: the person
fails, the batch goes on); a worker process lost mid-stage (:class:`cluster.jobs.WorkerLost`) counts
against the larger ``workers.max_worker_losses``, since a preempted pod says nothing about the person.

Idempotent calls: ``start``, ``submit`` (a batch already running is not started twice),
``record_objects`` (a version already recorded is ignored).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from cluster.jobs import PersonJob, StageResult, WorkerLost
from cluster.webhooks import (PERSON_EVENT_STATES, WebhookDispatcher, batch_completed_event, person_event,
                              submitted_person_events)
from monitoring.metrics import create_pipeline_metrics, create_webhook_metrics, serve_metrics
from storage import keys
from storage.barrier import PersonDeleted, is_deleted
from storage.retention import file_person, load_policy, parse_time
from storage.state import (PERSON_STATES, RETRYABLE_PERSON_STATES, STAGE_OF_STATE, BatchState, HeadshotRecord,
                           PersonState, StateConflict, StateStore)
from storage.store import ArtifactStore, ObjectExists, StoredObject, utc_now_iso

logger = logging.getLogger(__name__)

# How often the monitor loop refreshes pool metrics, progress documents and the elastic pool.
MONITOR_INTERVAL_S = 5.0
# A running batch's progress document is written when it changes and at least this often, so that
# `headshots status` can tell a quiet batch from a coordinator that stopped (headshots.client).
PROGRESS_HEARTBEAT_S = 30.0
# Most images `headshots more` adds per style in one call.
MORE_MAX_IMAGES = 64
# A person whose state keeps being changed under the coordinator is left to the other writer after this
# many conflicts (something is wrong; the person stays as that writer left it).
MAX_STATE_CONFLICTS = 5
# Threads for blocking store calls: state writes of a large batch come in bursts, and the event loop's
# default pool (cores + 4) would queue every person's next transition behind the whole burst.
STORE_THREADS = 32
# The states and the moves between them are defined once, in storage/state.py (every save is checked there).
RETRYABLE_STATES = RETRYABLE_PERSON_STATES
STAGE_BY_STATE = STAGE_OF_STATE


class WorkerPool(Protocol):
    """Where stages run: Ray actors and tasks in production (:mod:`cluster.pool`)."""

    async def ingest(self, job: PersonJob) -> StageResult: ...
    async def train(self, job: PersonJob) -> StageResult: ...
    async def generate(self, job: PersonJob) -> StageResult: ...
    async def package_person(self, job: PersonJob, headshots: list[dict[str, Any]]) -> StageResult: ...
    async def package_batch(self, **fields: Any) -> StageResult: ...
    async def revoke(self, prefixes: list[str]) -> list[dict[str, Any]]: ...
    async def allow(self, prefixes: list[str]) -> list[dict[str, Any]]: ...
    async def fence(self, epoch: int) -> list[dict[str, Any]]: ...


class PermanentStageError(Exception):
    """A stage failed in a way a retry cannot fix (bad input, not a crashed worker)."""


class StateSuperseded(Exception):
    """Another writer changed the person's state since the coordinator read it: the coordinator's run
    of that person yields (its compare-and-swap write lost) and carries on from the stored document."""


class Coordinator:
    """Drives batches. See the module docstring for restart behaviour.

    Args:
        config: the system config.
        pool: where stages run.
        metrics_port: serve /metrics on config.metrics.host:metrics_port (None: do not serve).
    """

    def __init__(self, config, pool: WorkerPool, *, metrics_port: int | None = None):
        self.config = config
        self.pool = pool
        self.store = ArtifactStore.from_config(config.store)
        self.states = StateStore(self.store)
        self.registry = CollectorRegistry()
        self.metrics = create_pipeline_metrics(self.registry)
        self.metrics_port = None
        if metrics_port is not None:
            self.metrics_port = serve_metrics(self.registry, host=config.metrics.host, port=metrics_port)
        self._batches: dict[tuple[str, str], asyncio.Task] = {}
        self._persons: dict[tuple[str, str, str], PersonState] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._person_tasks: dict[tuple[str, str, str], asyncio.Task] = {}
        # Persons being deleted: nothing more is run or written for them.
        self._stopped: set[tuple[str, str, str]] = set()
        self.policy = load_policy(config.retention.policy_file or None)
        self.epoch = 0
        self._started: asyncio.Future | None = None
        self._monitor: asyncio.Task | None = None
        # Label sets of per-batch and per-tenant series, so finished batches' series can be removed.
        self._eta_series: set[tuple[str, str]] = set()
        self._queue_series: set[tuple[str, str]] = set()
        self._progress_written: dict[tuple[str, str], tuple[dict, float]] = {}  # (document, monotonic time)
        self._batch_person_series: set[tuple[str, str, str]] = set()
        # Batch webhooks, delivered from threads of their own: emit() only queues (cluster/webhooks.py).
        self.webhooks = WebhookDispatcher(self.store, config.webhooks, source="coordinator",
                                          metrics=create_webhook_metrics(self.registry))

    # --- public calls ----------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Claim an epoch, fence stale stages, resume every batch the store says is running (idempotent)."""
        await self._ensure_started()
        return {"metrics_port": self.metrics_port, "epoch": self.epoch,
                "running": [f"{t}/{b}" for (t, b), task in self._batches.items() if not task.done()]}

    async def _ensure_started(self) -> None:
        failed = self._started is not None and self._started.done() and self._started.exception() is not None
        if self._started is None or failed:
            # A start that failed (the store unreachable past its tolerance) is tried again by the next call.
            self._started = asyncio.get_running_loop().create_task(self._start_once())
        await asyncio.shield(self._started)

    async def _start_once(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store"))
        self.epoch = await asyncio.to_thread(claim_epoch, self.store)
        self.metrics.coordinator_epoch.set(self.epoch)
        self.webhooks.start()  # picks up deliveries a previous coordinator left pending
        fenced = await self.pool.fence(self.epoch)
        stale = [f for f in fenced if isinstance(f, dict) and not f.get("drained", True)]
        if stale:
            logger.warning("epoch %d: %d worker(s) still running an older stage after the fence timeout",
                           self.epoch, len(stale))
        logger.info("coordinator epoch %d started (pid %d)", self.epoch, os.getpid())
        batches = await asyncio.to_thread(self.states.list_batches)
        for tenant, batch_id in batches:
            batch = await asyncio.to_thread(self.states.load_batch, tenant, batch_id)
            if batch.state == "running":
                logger.info("resuming batch %s/%s", tenant, batch_id)
                self._launch(tenant, batch_id)
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop(), name="monitor")

    async def submit(self, tenant: str, batch_id: str) -> dict[str, Any]:
        """Start processing a batch whose state the client has already written (idempotent)."""
        await self._ensure_started()
        self.metrics.batches_submitted_total.inc()
        self._launch(tenant, batch_id)
        self.webhooks.emit_from(lambda: submitted_person_events(self.store, tenant, batch_id))
        return {"tenant": tenant, "batch_id": batch_id}

    async def wait(self, tenant: str, batch_id: str, timeout_s: float | None = None) -> str:
        """Wait until the batch's run ends; returns its final state (for tests and scripts)."""
        task = self._batches.get((tenant, batch_id))
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        batch = await asyncio.to_thread(self.states.load_batch, tenant, batch_id)
        return batch.state

    async def record_objects(self, job: dict[str, Any], objects: list[dict[str, Any]]) -> None:
        """A worker wrote these versions: remember them in the person's state right away."""
        key = (job["tenant"], job["batch_id"], job["person_id"])
        person = self._persons.get(key)
        if person is None or person.is_final or key in self._stopped:
            # Not ours, already final (its state may be a tombstone by now), or being deleted.
            return
        if self._add_objects(person, [StoredObject.from_json(o) for o in objects]):
            try:
                await self._save_person(person)
            except StateSuperseded:
                pass  # the person's run notices at its next save and adopts the stored document

    async def stop_persons(self, persons: list[dict[str, str]], timeout_s: float = 45.0) -> dict[str, Any]:
        """Stop these persons for deletion: no stage of theirs runs or writes anything after this returns.

        Workers are told first (their next write or training step refuses), then the persons' runs
        are awaited, so any write already in flight has landed before the caller lists and deletes.
        """
        wanted = [(p["tenant"], p["batch_id"], p["person_id"]) for p in persons]
        self._stopped.update(wanted)
        confirmations = await self.pool.revoke([f"{t}/{b}/{p}/" for t, b, p in wanted])
        running = [self._person_tasks[key] for key in wanted
                   if key in self._person_tasks and not self._person_tasks[key].done()]
        if running:
            await asyncio.wait(running, timeout=timeout_s)
        still_running = sum(not task.done() for task in running)
        return {"stopped": len(wanted), "were_running": len(running), "still_running": still_running,
                "workers": confirmations}

    async def cancel_persons(self, persons: list[dict[str, str]], timeout_s: float = 45.0) -> dict[str, Any]:
        """Cancel persons that are not final yet: their stages stop, their state becomes ``cancelled``
        (final: the retention clock starts). Persons already final are left as they are. Idempotent."""
        wanted = [(p["tenant"], p["batch_id"], p["person_id"]) for p in persons]
        stopped = await self.stop_persons(persons, timeout_s=timeout_s)
        cancelled = []
        for key in wanted:
            for _ in range(MAX_STATE_CONFLICTS + 1):
                person = await asyncio.to_thread(self.states.load_person, *key)
                if person.is_final:
                    break
                person.state, person.stage, person.processed_at = "cancelled", None, utc_now_iso()
                person.error = "cancelled by an operator"
                await asyncio.to_thread(index_processed_person, self.store, self.policy, person)
                try:
                    await asyncio.to_thread(self.states.save_person, person)
                except StateConflict:
                    continue  # the person's run (or a deletion's tombstone) wrote first: decide again
                except PersonDeleted:
                    break  # a deletion started meanwhile: it owns this person now
                if key in self._persons:
                    self._persons[key] = person
                cancelled.append(key[2])
                break
        # Stopped only for the cancellation: a retry may run them again (unless a deletion raced it).
        allowed = [key for key in wanted
                   if not await asyncio.to_thread(is_deleted, self.store, keys.PersonRef(*key))]
        self._stopped.difference_update(allowed)
        await self.pool.allow([f"{t}/{b}/{p}/" for t, b, p in allowed])
        self._update_person_gauge()
        return {"cancelled": cancelled, "were_running": stopped["were_running"]}

    async def retry_person(self, tenant: str, batch_id: str, person_id: str) -> dict[str, Any]:
        """Run a person in ``needs_photos``, ``failed`` or ``cancelled`` again from the start.

        Raises:
            ValueError: the person is in another state (naming it and the states that can be retried).
        """
        await self._ensure_started()
        key = (tenant, batch_id, person_id)
        if key in self._person_tasks and not self._person_tasks[key].done():
            raise ValueError(f"person {person_id!r} is being processed; nothing to retry")
        person = await asyncio.to_thread(self.states.load_person, tenant, batch_id, person_id)
        if person.state not in RETRYABLE_STATES:
            raise ValueError(f"person {person_id!r} is {person.state}; only {', '.join(RETRYABLE_STATES)} "
                             "persons can be retried")
        person.state, person.stage, person.error, person.processed_at = "queued", None, None, None
        person.attempts = {}
        await self._save_refusing_deleted(person)
        self._stopped.discard(key)
        await self.pool.allow([f"{tenant}/{batch_id}/{person_id}/"])
        batch = await asyncio.to_thread(self.states.load_batch, tenant, batch_id)
        await self._join_or_relaunch(batch, person)
        return {"tenant": tenant, "batch_id": batch_id, "person_id": person_id, "state": "queued"}

    async def more_headshots(self, tenant: str, batch_id: str, person_id: str, count: int,
                             style: str | None = None) -> dict[str, Any]:
        """Generate ``count`` more headshots per style (or of one ``style``) from the person's stored LoRA,
        without training again; then the person's and the batch's contact sheets and manifest are
        made again. Only while the person's model is retained.

        Raises:
            ValueError: the person is not ``done``, its model has been deleted or is past its retention,
                the style is not one of the batch's, or ``count`` is out of range (each message says which).
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MORE_MAX_IMAGES:
            raise ValueError(f"count must be an integer from 1 to {MORE_MAX_IMAGES} but is {count!r}")
        await self._ensure_started()
        key = (tenant, batch_id, person_id)
        if key in self._person_tasks and not self._person_tasks[key].done():
            raise ValueError(f"person {person_id!r} is being processed; wait until it is done")
        batch = await asyncio.to_thread(self.states.load_batch, tenant, batch_id)
        if style is not None and style not in batch.styles:
            raise ValueError(f"style {style!r} is not one of batch {batch_id!r}'s styles: {', '.join(batch.styles)}")
        person = await asyncio.to_thread(self.states.load_person, tenant, batch_id, person_id)
        if person.state != "done":
            raise ValueError(f"person {person_id!r} is {person.state}; more headshots can be made only for a "
                             "person that is done (its model trained)")
        deleted = set(person.retention.get("deleted_classes", []))
        due = self.policy.due_times(tenant, parse_time(person.processed_at)).get("models") \
            if person.processed_at else None
        if "models" in deleted or (due is not None and due <= parse_time(utc_now_iso())):
            raise ValueError(f"person {person_id!r}'s model is no longer retained (retention deletes models "
                             f"{self.policy.days_for(tenant, 'models')} days after processing); submit the "
                             "person again with new photos to train a new one")
        for name in ([style] if style else batch.styles):
            person.extra_images[name] = person.extra_images.get(name, 0) + count
        person.state, person.stage, person.error = "generating", "generate", None
        person.attempts = {}
        await self._save_refusing_deleted(person)
        self._stopped.discard(key)
        await self._join_or_relaunch(batch, person)
        return {"tenant": tenant, "batch_id": batch_id, "person_id": person_id, "state": person.state,
                "added_per_style": {name: count for name in ([style] if style else batch.styles)}}

    async def _join_or_relaunch(self, batch: BatchState, person: PersonState) -> None:
        """Run a person again: within its batch's run if that still goes on, else by re-running the batch
        (which packages the batch again when its persons are done)."""
        batch_task = self._batches.get((batch.tenant, batch.batch_id))
        if batch_task is not None and not batch_task.done():
            self._start_person(batch, person)
        else:
            batch.state, batch.finished_at = "running", None
            await asyncio.to_thread(self.states.save_batch, batch)
            self._launch(batch.tenant, batch.batch_id)
        self._update_person_gauge()

    def eta(self, tenant: str, batch_id: str) -> float | None:
        """Seconds until the batch's GPU work is done, from measured stage times (None: unknown)."""
        eta = getattr(self.pool, "eta_seconds", None)
        return eta(tenant, batch_id) if eta else None

    def progress(self, tenant: str, batch_id: str) -> dict[str, Any]:
        """The batch's live progress: persons by state, and ETAs (seconds) per person and for the batch."""
        persons = {k[2]: p for k, p in self._persons.items() if k[:2] == (tenant, batch_id)}
        # One pass over the schedule for the whole batch (it runs on the event loop every few seconds).
        all_etas = getattr(self.pool, "eta_persons_seconds", None)
        pending = all_etas(tenant, batch_id) if all_etas else {}
        etas = {}
        for person_id, person in persons.items():
            if person.is_final:
                etas[person_id] = 0.0
            elif person_id in pending:
                etas[person_id] = round(pending[person_id], 1)
        counts: dict[str, int] = {}
        for person in persons.values():
            counts[person.state] = counts.get(person.state, 0) + 1
        batch_eta = self.eta(tenant, batch_id)
        return {"tenant": tenant, "batch_id": batch_id, "epoch": self.epoch, "updated_at": utc_now_iso(),
                "persons_by_state": counts, "eta_seconds": None if batch_eta is None else round(batch_eta, 1),
                "eta_seconds_by_person": etas}

    def worker_restarted(self, worker_id: str) -> None:
        """A GPU worker's process was started again by Ray (reported by the worker at start-up)."""
        logger.warning("GPU worker %s restarted", worker_id)
        self.metrics.worker_restarts_total.inc()

    def ping(self) -> dict[str, Any]:
        return {"metrics_port": self.metrics_port, "pid": os.getpid(),
                "batches_running": sum(not t.done() for t in self._batches.values())}

    # --- batch and person flow -------------------------------------------------------------------

    def _launch(self, tenant: str, batch_id: str) -> None:
        existing = self._batches.get((tenant, batch_id))
        if existing is not None and not existing.done():
            return
        self._batches[(tenant, batch_id)] = asyncio.get_running_loop().create_task(
            self._run_batch(tenant, batch_id), name=f"batch-{tenant}-{batch_id}")

    async def _run_batch(self, tenant: str, batch_id: str) -> None:
        try:
            batch = await asyncio.to_thread(self.states.load_batch, tenant, batch_id)
            persons = await asyncio.to_thread(self.states.load_persons, batch)
            for person in persons:
                self._persons[(tenant, batch_id, person.person_id)] = person
            if persons:
                self._mark_progress(persons[0])  # the batch (re)starts: a stall is measured from here
            self._update_person_gauge()
            for person in persons:
                self._start_person(batch, person)
            # Persons retried while the batch runs join it, so wait until none of its persons runs.
            while pending := [task for (t, b, _), task in self._person_tasks.items()
                              if (t, b) == (tenant, batch_id) and not task.done()]:
                await asyncio.gather(*pending)
            await self._finish_batch(batch)
        except Exception:
            logger.exception("batch %s/%s stopped on an unexpected error; it resumes on restart", tenant, batch_id)
            raise

    def _start_person(self, batch: BatchState, person: PersonState) -> asyncio.Task:
        key = (person.tenant, person.batch_id, person.person_id)
        self._persons[key] = person
        task = asyncio.get_running_loop().create_task(self._run_person(batch, person))
        self._person_tasks[key] = task
        return task

    async def _run_person(self, batch: BatchState, person: PersonState) -> None:
        try:
            await self._drive_person(batch, person)
        except StateSuperseded:
            await self._adopt_stored(batch, person)

    async def _adopt_stored(self, batch: BatchState, person: PersonState) -> None:
        """Our write lost to another writer's: carry on from what that writer stored (plus the object
        versions we recorded meanwhile, which are facts either way), unless it ended the person."""
        key = (person.tenant, person.batch_id, person.person_id)
        stored = await asyncio.to_thread(self.states.load_person, *key)
        conflicts = person.attempts.get("state_conflicts", 0) + 1
        logger.warning("state of %s was changed by another writer (now %s); conflict %d", person.ref.prefix,
                       stored.state, conflicts)
        if stored.is_final or key in self._stopped or conflicts > MAX_STATE_CONFLICTS:
            if key in self._persons:
                self._persons[key] = stored
            self._update_person_gauge()
            return
        self._add_objects(stored, person.objects)
        stored.attempts["state_conflicts"] = conflicts
        self._start_person(batch, stored)

    async def _drive_person(self, batch: BatchState, person: PersonState) -> None:
        key = (person.tenant, person.batch_id, person.person_id)
        limits = self.config.workers
        while not person.is_final and key not in self._stopped:
            if await self._is_deleted(key):
                return  # its deletion started: the deletion owns the person (even after our restart)
            if person.state == "queued":
                await self._transition(person, "ingesting")
                continue
            stage = STAGE_BY_STATE[person.state]
            # attempts[stage] counts failures, recorded when they happen: a coordinator restarted
            # mid-stage runs the stage again without it counting against the person.
            attempt = person.attempts.get(stage, 0) + 1
            try:
                started = time.perf_counter()
                next_state = await self._run_stage(batch, person, stage)
                elapsed = time.perf_counter() - started
                person.timings_s[stage] = round(person.timings_s.get(stage, 0.0) + elapsed, 4)
                self.metrics.stage_duration_seconds.labels(stage=stage).observe(elapsed)
                await self._transition(person, next_state)
            except Exception as error:
                if isinstance(error, StateSuperseded):
                    raise
                if isinstance(_root_cause(error), PersonDeleted):
                    self._stopped.add(key)
                if key in self._stopped:
                    return  # deleted mid-stage: the worker refused to go on, as asked
                cause = _root_cause(error)
                if isinstance(error, WorkerLost) or isinstance(cause, WorkerLost):
                    # Not the person's fault: counted apart from the attempts.
                    lost_key = f"{stage}:worker_lost"
                    person.attempts[lost_key] = losses = person.attempts.get(lost_key, 0) + 1
                    logger.warning("stage %s of %s lost its worker (%d so far); running it again", stage,
                                   person.ref.prefix, losses)
                    if losses >= limits.max_worker_losses:
                        person.error = (f"{stage} lost its worker {losses} times (workers.max_worker_losses); "
                                        "check the GPU nodes, then `headshots retry`")
                        await self._transition(person, "failed")
                        continue
                    self.metrics.stage_retries_total.labels(stage=stage).inc()
                    await asyncio.sleep(random.uniform(0.5, 2.0))
                    continue
                self.metrics.stage_errors_total.labels(stage=stage).inc()
                person.attempts[stage] = attempt
                permanent = isinstance(cause, (PermanentStageError, ValueError, PermissionError))
                # Log ids and the error class only: messages can quote user input.
                logger.warning("stage %s failed for %s (attempt %d): %s", stage, person.ref.prefix, attempt,
                               type(cause).__name__)
                if permanent or attempt >= limits.max_stage_attempts:
                    if not permanent:
                        self.metrics.stage_attempts_exhausted_total.labels(stage=stage).inc()
                    person.error = f"{stage} failed after {attempt} attempt(s): {type(cause).__name__}: {cause}"
                    await self._transition(person, "failed")
                else:
                    self.metrics.stage_retries_total.labels(stage=stage).inc()
                    # Exponential backoff with jitter, so persons failing together do not retry in step.
                    await asyncio.sleep(random.uniform(0.5, 1.0) * min(2.0 ** attempt * 0.25, 10.0))

    async def _run_stage(self, batch: BatchState, person: PersonState, stage: str) -> str:
        job = PersonJob(tenant=person.tenant, batch_id=person.batch_id, person_id=person.person_id,
                        base_model=batch.base_model, styles=tuple(batch.styles),
                        images_per_style=batch.images_per_style,
                        upload_keys=tuple(photo.key for photo in person.photos if photo.accepted and photo.key),
                        upload_names=tuple(photo.source for photo in person.photos if photo.accepted and photo.key),
                        priority=batch.priority, queue_position=_queue_position(batch, person.person_id),
                        epoch=self.epoch, extra_by_style=tuple(sorted(person.extra_images.items())))
        if stage == "ingest":
            result = await self.pool.ingest(job)
            # Counted once the ingest succeeded, so a retried ingest does not count photos twice. Photos
            # turned away at the edge (unreadable, wrong format) count as checks too.
            for photo in person.photos:
                if not photo.accepted and photo.reason:
                    self.metrics.upload_checks_total.labels(result="rejected", reason=photo.reason).inc()
            self._add_objects(person, result.objects)
            for check in result.details.get("checks", []):
                self.metrics.upload_checks_total.labels(
                    result="accepted" if check["accepted"] else "rejected", reason=check["reason"] or "").inc()
            for rejected in result.details.get("rejected", []):
                for photo in person.photos:
                    if photo.key == rejected["key"]:
                        photo.accepted, photo.reason, photo.message = False, rejected["reason"], rejected["message"]
                        self.metrics.photos_rejected_total.labels(reason=rejected["reason"]).inc()
            if len(result.details.get("accepted", [])) < self.config.ingest.min_photos:
                person.error = (f"{person.photos_accepted} usable photo(s); at least {self.config.ingest.min_photos} "
                                "needed: add photos and retry (each photo's reason is in the status)")
                return "needs_photos"
            return "training"
        if stage == "train":
            result = await self.pool.train(job)
            self._add_objects(person, result.objects)
            person.train_steps_done = result.details.get("steps", 0)
            self.metrics.training_steps_total.inc(result.training_steps)
            return "generating"
        if stage == "generate":
            result = await self.pool.generate(job)
            self._add_objects(person, result.objects)
            person.headshots = [HeadshotRecord.from_json(record) for record in sorted(
                result.details["headshots"], key=lambda r: (batch.styles.index(r["style"]), r["index"]))]
            for style, count in result.images_by_style.items():
                self.metrics.images_generated_total.labels(style=style).inc(count)
            for distance in result.details.get("identity_distances", []):
                self.metrics.identity_distance.observe(distance)
            self.metrics.outputs_regenerated_total.inc(result.details.get("regenerated", 0))
            if result.details.get("identity_flag"):
                person.flags = sorted(set(person.flags) | {result.details["identity_flag"]})
            return "packaging"
        if stage == "package":
            result = await self.pool.package_person(job, [vars(h) for h in person.headshots])
            self._add_objects(person, result.objects)
            return "done"
        raise AssertionError(f"unknown stage {stage}")

    async def _finish_batch(self, batch: BatchState) -> None:
        batch = await asyncio.to_thread(self.states.load_batch, batch.tenant, batch.batch_id)
        if batch.state != "running":
            return  # cancelled or deleted while we worked
        # Read back from the store: persons deleted meanwhile are tombstones now.
        persons = await asyncio.to_thread(self.states.load_persons, batch)
        await self.pool.package_batch(
            tenant=batch.tenant, batch_id=batch.batch_id, batch_name=batch.name, base_model=batch.base_model,
            persons=[{"person_id": p.person_id, "state": p.state, "headshots": [vars(h) for h in p.headshots],
                      "timings_s": p.timings_s, "flags": p.flags} for p in persons])
        batch.state = "done"
        batch.finished_at = utc_now_iso()
        try:
            await asyncio.to_thread(self.states.save_batch, batch)
        except StateConflict:
            # Cancelled or retried while it was packaged: that writer's word stands; a retried person
            # finishes the batch again when it is done.
            logger.info("batch %s/%s changed while finishing; left as the other writer set it",
                        batch.tenant, batch.batch_id)
            return
        self.webhooks.emit(batch_completed_event(batch, _count_states(persons)), batch.webhooks)
        await self._write_progress(batch.tenant, batch.batch_id, final=True)
        self._forget_batch(batch.tenant, batch.batch_id)
        logger.info("batch %s/%s done", batch.tenant, batch.batch_id)

    def _forget_batch(self, tenant: str, batch_id: str) -> None:
        """Drop a finished batch from memory and from the metrics: the store has all of it."""
        for key in [k for k in self._persons if k[:2] == (tenant, batch_id)]:
            task = self._person_tasks.get(key)
            if task is not None and not task.done():
                continue  # retried meanwhile: still ours
            self._persons.pop(key, None)
            self._person_tasks.pop(key, None)
            self._locks.pop(key, None)
        if (tenant, batch_id) in self._eta_series:
            self.metrics.eta_seconds.remove(tenant, batch_id)
            self._eta_series.discard((tenant, batch_id))
        try:
            self.metrics.batch_last_progress_timestamp_seconds.remove(tenant, batch_id)
        except KeyError:
            pass  # no series: the batch made no progress in this process
        self._progress_written.pop((tenant, batch_id), None)
        self._update_person_gauge()

    async def _transition(self, person: PersonState, state: str) -> None:
        if (person.tenant, person.batch_id, person.person_id) in self._stopped:
            return
        person.state = state
        person.stage = STAGE_BY_STATE.get(state)
        if person.is_final:
            # The retention clock starts at the first processing: `headshots more` does not restart it.
            person.processed_at = person.processed_at or utc_now_iso()
            # File the person in the expiry index before the state says "processed": a crash between
            # the two leaves an entry the sweep re-files, never a processed person nobody will expire.
            await asyncio.to_thread(index_processed_person, self.store, self.policy, person)
        if state == "done":
            person.error = None
        await self._save_person(person)
        if person.is_final:
            self.metrics.persons_finished_total.labels(state=state).inc()
        if state in PERSON_EVENT_STATES:
            self.webhooks.emit(person_event(person))
        self._mark_progress(person)
        self._update_person_gauge()

    async def _save_person(self, person: PersonState) -> None:
        key = (person.tenant, person.batch_id, person.person_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._stopped:
                return  # the deletion owns this person's state now
            # Snapshot inside the lock so two saves can never land out of order.
            snapshot = PersonState.from_json(person.to_json())
            snapshot.etag, snapshot.stored_state = person.etag, person.stored_state
            try:
                # Compare-and-swap on the version we last read or wrote: a deletion's tombstone, an
                # operator's cancel or a stale coordinator's write in between makes ours lose.
                await asyncio.to_thread(self.states.save_person, snapshot)
            except StateConflict:
                raise StateSuperseded(person.ref.prefix) from None
            except PersonDeleted:
                # Its deletion started: stop here (the deletion's tombstone replaces what we wrote).
                self._stopped.add(key)
                return
            person.etag, person.stored_state = snapshot.etag, snapshot.stored_state

    async def _is_deleted(self, key: tuple[str, str, str]) -> bool:
        """Has the person's deletion started? The store's barrier is asked, not only this process's
        memory, so a coordinator restarted during a deletion never runs the person again."""
        if key in self._stopped:
            return True
        if await asyncio.to_thread(is_deleted, self.store, keys.PersonRef(*key)):
            self._stopped.add(key)
            return True
        return False

    async def _save_refusing_deleted(self, person: PersonState) -> None:
        """Save an operator's change (retry, more); a person being deleted refuses it as the caller's error."""
        try:
            await asyncio.to_thread(self.states.save_person, person)
        except PersonDeleted as error:
            self._stopped.add((person.tenant, person.batch_id, person.person_id))
            raise ValueError(str(error)) from None

    def _add_objects(self, person: PersonState, objects: list[StoredObject]) -> bool:
        known = {(o.bucket, o.key, o.version_id) for o in person.objects}
        added = False
        for stored in objects:
            if (stored.bucket, stored.key, stored.version_id) not in known:
                person.record_object(stored)
                known.add((stored.bucket, stored.key, stored.version_id))
                added = True
        return added

    # --- monitoring ------------------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        """Refresh pool metrics and progress documents, and let the elastic pool grow or shrink."""
        while True:
            try:
                await self._monitor_once()
            except Exception:  # a metrics hiccup must never stop the coordinator
                logger.exception("monitor round failed; trying again in %.0f s", MONITOR_INTERVAL_S)
            await asyncio.sleep(MONITOR_INTERVAL_S)

    async def _monitor_once(self) -> None:
        pool = self.pool
        if hasattr(pool, "queue_depth"):
            depth = pool.queue_depth()
            for series in self._queue_series - set(depth):
                self.metrics.queue_depth.remove(*series)
            for (tenant, stage), count in depth.items():
                self.metrics.queue_depth.labels(tenant=tenant, stage=stage).set(count)
            self._queue_series = set(depth)
        if hasattr(pool, "busy_ratios"):
            for worker_id, ratio in pool.busy_ratios().items():
                self.metrics.gpu_busy_ratio.labels(worker=worker_id).set(round(ratio, 4))
        if hasattr(pool, "worker_info"):
            for worker_id, info in (await pool.worker_info()).items():
                for name in ("gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_memory_total_bytes"):
                    gauge = getattr(self.metrics, name, None)
                    if gauge is not None and name in info:
                        gauge.labels(worker=worker_id).set(info[name])
        if hasattr(pool, "autoscale"):
            pool.autoscale()
        running = {(t, b) for (t, b), task in self._batches.items() if not task.done()}
        for tenant, batch_id in running:
            eta = self.eta(tenant, batch_id)
            if eta is not None:
                self.metrics.eta_seconds.labels(tenant=tenant, batch=batch_id).set(round(eta, 1))
                self._eta_series.add((tenant, batch_id))
            await self._write_progress(tenant, batch_id)

    async def _write_progress(self, tenant: str, batch_id: str, *, final: bool = False) -> None:
        """Store the batch's progress (ids, counts and ETAs only) for `headshots status`, when it changed
        or ``PROGRESS_HEARTBEAT_S`` after the last write (the heartbeat a stall is judged by)."""
        document = self.progress(tenant, batch_id)
        if final:
            document["eta_seconds"] = 0.0
        comparable = {k: v for k, v in document.items() if k != "updated_at"}
        written = self._progress_written.get((tenant, batch_id))
        if written is not None and written[0] == comparable and time.monotonic() - written[1] < PROGRESS_HEARTBEAT_S:
            return
        await asyncio.to_thread(self.store.put_json, "state", keys.batch_progress_key(tenant, batch_id), document)
        self._progress_written[(tenant, batch_id)] = (comparable, time.monotonic())

    def _update_person_gauge(self) -> None:
        counts = dict.fromkeys(PERSON_STATES, 0)
        by_batch: dict[tuple[str, str, str], int] = {}
        for (tenant, batch_id, _), person in self._persons.items():
            counts[person.state] += 1
            series = (tenant, batch_id, person.state)
            by_batch[series] = by_batch.get(series, 0) + 1
        for state, count in counts.items():
            self.metrics.persons.labels(state=state).set(count)
        self.metrics.persons_needing_photos.set(counts["needs_photos"])
        for series in self._batch_person_series - set(by_batch):
            self.metrics.batch_persons.remove(*series)
        for (tenant, batch_id, state), count in by_batch.items():
            self.metrics.batch_persons.labels(tenant=tenant, batch=batch_id, state=state).set(count)
        self._batch_person_series = set(by_batch)

    def _mark_progress(self, person: PersonState) -> None:
        self.metrics.batch_last_progress_timestamp_seconds.labels(
            tenant=person.tenant, batch=person.batch_id).set(time.time())


def index_processed_person(store: ArtifactStore, policy, person: PersonState) -> None:
    """File a processed person under the day its first artifact class falls due."""
    clock = person.last_upload_at if person.state == "needs_photos" and person.last_upload_at else person.processed_at
    due = policy.due_times(person.tenant, parse_time(clock))
    if due:
        file_person(store, person.ref, min(due.values()), reason=f"processed: {person.state}")


def claim_epoch(store: ArtifactStore) -> int:
    """The next coordinator epoch, claimed with a create-only write (of two claimants exactly one wins
    each number; the loser takes the next)."""
    existing = [key for key in store.list_keys("state", keys.COORDINATOR_EPOCH_PREFIX)]
    epoch = max((int(key[len(keys.COORDINATOR_EPOCH_PREFIX):]) for key in existing
                 if key[len(keys.COORDINATOR_EPOCH_PREFIX):].isdigit()), default=0)
    while True:
        epoch += 1
        try:
            store.put("state", keys.coordinator_epoch_key(epoch),
                      f'{{"pid": {os.getpid()}, "claimed_at": "{utc_now_iso()}"}}'.encode(),
                      content_type="application/json", if_absent=True)
            return epoch
        except ObjectExists:
            continue


def _queue_position(batch: BatchState, person_id: str) -> float:
    """A person's place in line: when the batch was submitted, then roster order (stable across restarts)."""
    return parse_time(batch.created_at).timestamp() + batch.person_ids.index(person_id) * 0.001


def _count_states(persons: list[PersonState]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for person in persons:
        counts[person.state] = counts.get(person.state, 0) + 1
    return counts


def _root_cause(error: BaseException) -> BaseException:
    """Ray wraps a task's exception; the original tells whether a retry can help."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
