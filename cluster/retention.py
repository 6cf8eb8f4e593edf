"""The retention controller: sweeps expired uploads, derived data and models on a timer, and serves
early deletion requests — down to the copies GPU workers hold.

Actor: ``headshots-retention`` (named, detached, restarted forever; see :mod:`cluster.actors`).
On start (and so on every restart) it sweeps once, so downtime never skips a sweep; then every
``retention.sweep_interval_s``. A sweep that dies half-way leaves intents in the receipts bucket that
the next sweep finishes (:mod:`storage.sweep`). ``sweep`` and ``delete`` are idempotent: repeating
either deletes nothing twice and leaves the store in the same state.

It serves its own /metrics (``retention_*``, ``deletion_*``), separate from the coordinator's, so the
privacy SLO stays visible even when the batch pipeline is down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from cluster.webhooks import WebhookDispatcher, deletion_events
from monitoring.metrics import create_retention_metrics, create_webhook_metrics, serve_metrics
from storage import keys
from storage.retention import RetentionPolicy, load_policy, parse_time
from storage.store import ArtifactStore
from storage.sweep import DeletionHooks, SweepResult, delete_on_request, overdue_objects, resolve_persons, run_sweep

logger = logging.getLogger(__name__)


class RetentionController:
    """Plain class (unit-testable without Ray); :mod:`cluster.actors` makes it an actor.

    Args:
        config: the system config.
        hooks: how deletion reaches the coordinator and the GPU workers.
        metrics_port: serve /metrics on ``config.metrics.host:metrics_port`` (None: do not serve).
        clock: the current time (tests and ``--now`` inject their own).
        key_store: destroys per-person data keys (crypto-erasure); None when encryption is off.
    """

    def __init__(self, config, *, hooks: DeletionHooks | None = None, metrics_port: int | None = None,
                 clock: Callable[[], datetime] | None = None, key_store=None):
        self.config = config
        self.store = ArtifactStore.from_config(config.store)
        self.policy: RetentionPolicy = load_policy(config.retention.policy_file or None)
        self.hooks = hooks or DeletionHooks()
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.key_store = key_store
        self.registry = CollectorRegistry()
        self.metrics = create_retention_metrics(self.registry)
        self.metrics_port = serve_metrics(self.registry, host=config.metrics.host, port=metrics_port) \
            if metrics_port is not None else None
        self.metrics.sweep_interval_seconds.set(config.retention.sweep_interval_s)
        # Requests received and not yet finished (monotonic start times), including those waiting for
        # a running sweep: the alert on the oldest one catches a request stuck behind anything.
        self._pending_requests: dict[int, float] = {}
        self._pending_lock = threading.Lock()
        self.metrics.deletion_oldest_pending_request_age_seconds.set_function(self._oldest_pending_request_age_s)
        # Sweeps and deletions never overlap: both walk the same persons and receipts.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.last_sweep: dict[str, Any] | None = None
        # `deletion.completed` webhooks, delivered from threads of their own (cluster/webhooks.py).
        self.webhooks = WebhookDispatcher(self.store, config.webhooks, source="retention",
                                          metrics=create_webhook_metrics(self.registry))

    # --- timer ------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Sweep once now, then keep sweeping every ``sweep_interval_s`` in a background thread."""
        self.webhooks.start()  # picks up deliveries a previous controller left pending
        if self._loop is None:
            self._loop = threading.Thread(target=self._run_forever, name="retention-sweeps", daemon=True)
            self._loop.start()
        return {"metrics_port": self.metrics_port, "sweep_interval_s": self.config.retention.sweep_interval_s}

    def _run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # logged and retried at the next tick; the overdue gauge shows the gap
                logger.exception("retention sweep failed; retrying in %s s", self.config.retention.sweep_interval_s)
            self._stop.wait(self.config.retention.sweep_interval_s)

    def stop(self) -> None:
        self._stop.set()
        self.webhooks.stop()

    # --- calls ------------------------------------------------------------------------------------

    def sweep(self, now: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """One sweep as of ``now`` (ISO-8601; default: the clock). Returns the sweep's summary."""
        as_of = parse_time(now) if now else self.clock()
        with self._lock:
            started = time.perf_counter()
            result: SweepResult = run_sweep(self.store, self.policy, now=as_of, key_store=self.key_store,
                                            hooks=self.hooks, dry_run=dry_run,
                                            late_write_audit_s=self.config.retention.late_write_audit_s)
            if not dry_run:
                self._count_deleted(result.receipt.objects)
                self.metrics.sweep_duration_seconds.observe(time.perf_counter() - started)
                self.metrics.last_success_timestamp_seconds.set(time.time())
            self._update_overdue(as_of)
        summary = result.to_json()
        if not dry_run:
            for event in deletion_events(result.receipt):
                self.webhooks.emit(event)
            self.last_sweep = summary
            logger.info("retention sweep %s: %d versions of %d persons deleted", summary["receipt_id"],
                        summary["objects"], summary["persons"])
        else:
            summary["would_delete"] = [
                {k: item[k] for k in ("artifact", "bucket", "key", "version_id", "size", "due")}
                for item in result.receipt.objects]
        return summary

    def delete(self, tenant: str, batch_id: str | None = None, person_id: str | None = None,
               include_outputs: bool = False, requested_by: str = "operator") -> dict[str, Any]:
        """Early deletion of a person, a batch or a whole tenant. Returns the receipt's summary."""
        started = time.perf_counter()
        request_token = object()
        with self._pending_lock:
            self._pending_requests[id(request_token)] = time.monotonic()
        try:
            with self._lock:
                persons = resolve_persons(self.store, tenant=tenant, batch_id=batch_id, person_id=person_id)
                receipt = delete_on_request(
                    self.store, self.policy, persons, include_outputs=include_outputs, requested_by=requested_by,
                    key_store=self.key_store, hooks=self.hooks,
                    scope={"tenant": tenant, "batch_id": batch_id, "person_id": person_id})
                self._count_deleted(receipt.objects)
                if person_id is None:  # a whole batch or tenant
                    self._mark_batches_deleted(persons)
        except Exception:
            self.metrics.deletion_requests_total.labels(status="failed").inc()
            raise
        finally:
            with self._pending_lock:
                del self._pending_requests[id(request_token)]
        seconds = time.perf_counter() - started
        for event in deletion_events(receipt):
            self.webhooks.emit(event)
        self.metrics.deletion_requests_total.labels(status="succeeded").inc()
        self.metrics.deletion_request_duration_seconds.observe(seconds)
        summary = receipt.summary()
        return {"request_id": receipt.receipt_id, "receipt_id": receipt.receipt_id,
                "objects_deleted": summary["objects_deleted"], "persons": summary["persons"],
                "seconds": round(seconds, 3), "verification": receipt.verification, "nodes": summary["nodes"]}

    def overdue(self, now: str | None = None) -> dict[str, int]:
        return self._update_overdue(parse_time(now) if now else self.clock())

    def ping(self) -> dict[str, Any]:
        return {"metrics_port": self.metrics_port, "pid": os.getpid(), "last_sweep": self.last_sweep}

    # --- helpers ----------------------------------------------------------------------------------

    def _oldest_pending_request_age_s(self) -> float:
        with self._pending_lock:
            oldest = min(self._pending_requests.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def _count_deleted(self, objects: list[dict[str, Any]]) -> None:
        for item in objects:
            self.metrics.objects_deleted_total.labels(artifact=item["artifact"]).inc()
            self.metrics.bytes_deleted_total.labels(artifact=item["artifact"]).inc(int(item.get("size") or 0))

    def _update_overdue(self, now: datetime) -> dict[str, int]:
        overdue = overdue_objects(self.store, self.policy, now=now)
        for artifact, count in overdue.items():
            self.metrics.overdue_objects.labels(artifact=artifact).set(count)
        return overdue

    def _mark_batches_deleted(self, persons: list[keys.PersonRef]) -> None:
        from storage.state import BatchStatus, StateStore

        states = StateStore(self.store)
        for tenant, batch_id in sorted({(p.tenant, p.batch_id) for p in persons}):
            batch = states.load_batch(tenant, batch_id)
            batch.state = BatchStatus.DELETED
            states.save_batch(batch)
