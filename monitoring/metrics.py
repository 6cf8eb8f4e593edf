"""Every metric the system exports, defined once.

Names are exactly what Prometheus scrapes (prometheus-client, not ``ray.util.metrics``, which renames
them), and follow Prometheus' naming conventions: every name starts with ``headshots_``; a quantity with a
unit names its base unit last (``_seconds``, ``_bytes``; ``_ratio`` for a 0-1 fraction); counters end in
``_total``; counts (persons, objects, stages) and pure numbers (the epoch, a face-embedding distance) have
no unit suffix. Only the exported names carry the prefix; the attribute names here do not.
Labels carry ids of bounded sets only: stage, state, worker — never a person, a name or an email.
Functions take a ``registry`` so tests can use a fresh one and read values back.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGE_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ARTIFACT_CLASSES = ("uploads", "derived", "models", "outputs", "state", "receipts")
IDENTITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0)
SWEEP_BUCKETS_S = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
DELETION_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


@dataclass(frozen=True)
class PipelineMetrics:
    persons: Gauge
    stage_duration_seconds: Histogram
    training_steps_total: Counter
    images_generated_total: Counter
    stage_errors_total: Counter
    photos_rejected_total: Counter
    batches_submitted_total: Counter
    upload_checks_total: Counter
    identity_distance: Histogram
    outputs_regenerated_total: Counter
    persons_needing_photos: Gauge
    queue_depth: Gauge
    gpu_busy_ratio: Gauge
    stage_retries_total: Counter
    worker_restarts_total: Counter
    eta_seconds: Gauge
    stage_attempts_exhausted_total: Counter
    coordinator_epoch: Gauge
    gpu_utilization_ratio: Gauge
    gpu_memory_used_bytes: Gauge
    gpu_memory_total_bytes: Gauge
    batch_persons: Gauge
    batch_last_progress_timestamp_seconds: Gauge
    persons_finished_total: Counter


def create_pipeline_metrics(registry: CollectorRegistry) -> PipelineMetrics:
    """Register the batch-pipeline metrics on ``registry``."""
    return PipelineMetrics(
        persons=Gauge("headshots_persons", "Persons of the batches in flight, by state.",
                      ["state"], registry=registry),
        stage_duration_seconds=Histogram(
            "headshots_stage_duration_seconds", "Wall time of one person's stage.", ["stage"],
            buckets=STAGE_BUCKETS_S, registry=registry),
        training_steps_total=Counter("headshots_training_steps_total", "LoRA optimisation steps run.",
                                     registry=registry),
        images_generated_total=Counter("headshots_images_generated_total", "Headshot images generated.",
                                       ["style"], registry=registry),
        stage_errors_total=Counter("headshots_stage_errors_total", "Stage failures, by stage.", ["stage"],
                                   registry=registry),
        photos_rejected_total=Counter("headshots_photos_rejected_total", "Uploaded photos rejected, by reason.",
                                      ["reason"], registry=registry),
        batches_submitted_total=Counter("headshots_batches_submitted_total", "Batches submitted.",
                                        registry=registry),
        upload_checks_total=Counter("headshots_upload_checks_total", "Uploaded photos checked by the identity gate.",
                                    ["result", "reason"], registry=registry),
        # A distance between face embeddings is a pure number, so the name has no unit suffix (the
        # "ratio" suffix would claim a 0-1 fraction, which it is not: it can exceed 1).
        identity_distance=Histogram(
            "headshots_identity_distance",
            "Euclidean distance between the dlib face embedding of a generated headshot and the medoid of the "
            "person's photos; dimensionless (same person below about 0.6).",
            buckets=IDENTITY_BUCKETS, registry=registry),
        outputs_regenerated_total=Counter("headshots_outputs_regenerated_total",
                                          "Extra images generated because candidates failed the identity check.",
                                          registry=registry),
        persons_needing_photos=Gauge("headshots_persons_needing_photos", "Persons waiting for more usable photos.",
                                     registry=registry),
        # The GPU pool. Tenant and batch labels exist only for work in flight: series of a finished
        # batch are removed, so the label sets stay bounded by the batches running and the pool size.
        queue_depth=Gauge("headshots_queue_depth", "GPU stages waiting for a worker, by tenant and stage.",
                          ["tenant", "stage"], registry=registry),
        gpu_busy_ratio=Gauge("headshots_gpu_busy_ratio", "Share of the last minute a GPU worker spent running stages.",
                             ["worker"], registry=registry),
        stage_retries_total=Counter("headshots_stage_retries_total",
                                    "Stages run again after a failure (worker lost, store outage, error).",
                                    ["stage"], registry=registry),
        worker_restarts_total=Counter("headshots_worker_restarts_total",
                                      "GPU worker processes that died and were restarted by Ray.",
                                      registry=registry),
        eta_seconds=Gauge("headshots_eta_seconds", "Estimated seconds until a running batch's GPU work is done.",
                          ["tenant", "batch"], registry=registry),
        stage_attempts_exhausted_total=Counter(
            "headshots_stage_attempts_exhausted_total",
            "Persons failed because one stage kept failing (poison input), by stage.", ["stage"],
            registry=registry),
        coordinator_epoch=Gauge("headshots_coordinator_epoch",
                                "Fencing epoch of the running coordinator (rises by one at every restart).",
                                registry=registry),
        # Per GPU worker, sampled from the device (NVML or torch.cuda) while CUDA is present; a worker
        # without CUDA has no series. Bounded by the pool size.
        gpu_utilization_ratio=Gauge("headshots_gpu_utilization_ratio",
                                    "Share of the last sample period the worker's GPU was computing (0-1).",
                                    ["worker"], registry=registry),
        gpu_memory_used_bytes=Gauge("headshots_gpu_memory_used_bytes", "GPU memory in use on the worker's device.",
                                    ["worker"], registry=registry),
        gpu_memory_total_bytes=Gauge("headshots_gpu_memory_total_bytes", "GPU memory of the worker's device.",
                                     ["worker"], registry=registry),
        # Per running batch; like headshots_eta_seconds, a finished batch's series are removed.
        batch_persons=Gauge("headshots_batch_persons", "Persons of a running batch, by state.",
                            ["tenant", "batch", "state"], registry=registry),
        batch_last_progress_timestamp_seconds=Gauge(
            "headshots_batch_last_progress_timestamp_seconds",
            "Unix time a running batch last made progress (a person changed state or a stage finished).",
            ["tenant", "batch"], registry=registry),
        # headshots_persons counts persons of batches in flight (finished batches leave memory); this
        # counts every person reaching a final state, for rates and totals.
        persons_finished_total=Counter("headshots_persons_finished_total",
                                       "Persons that reached a final state, by that state.", ["state"],
                                       registry=registry),
    )


@dataclass(frozen=True)
class RetentionMetrics:
    objects_deleted_total: Counter
    bytes_deleted_total: Counter
    overdue_objects: Gauge
    sweep_duration_seconds: Histogram
    last_success_timestamp_seconds: Gauge
    deletion_requests_total: Counter
    deletion_request_duration_seconds: Histogram
    deletion_oldest_pending_request_age_seconds: Gauge
    sweep_interval_seconds: Gauge


def create_retention_metrics(registry: CollectorRegistry) -> RetentionMetrics:
    """The privacy promises, measured: what retention deleted, and what is overdue (should be 0)."""
    metrics = RetentionMetrics(
        objects_deleted_total=Counter("headshots_retention_objects_deleted_total",
                                      "Object versions and delete markers deleted by retention and requests.",
                                      ["artifact"], registry=registry),
        # The unit goes last, before a counter's _total: deleted_bytes_total, not bytes_deleted_total.
        bytes_deleted_total=Counter("headshots_retention_deleted_bytes_total", "Bytes of object versions deleted.",
                                    ["artifact"], registry=registry),
        overdue_objects=Gauge("headshots_retention_overdue_objects",
                              "Object versions past their retention and still present (privacy SLO: 0).",
                              ["artifact"], registry=registry),
        sweep_duration_seconds=Histogram("headshots_retention_sweep_duration_seconds",
                                         "Wall time of one retention sweep.", buckets=SWEEP_BUCKETS_S,
                                         registry=registry),
        last_success_timestamp_seconds=Gauge("headshots_retention_last_success_timestamp_seconds",
                                             "Unix time the last sweep finished successfully.", registry=registry),
        deletion_requests_total=Counter("headshots_deletion_requests_total", "Early deletion requests, by outcome.",
                                        ["status"], registry=registry),
        deletion_request_duration_seconds=Histogram("headshots_deletion_request_duration_seconds",
                                                    "Wall time from request to receipt.",
                                                    buckets=DELETION_BUCKETS_S, registry=registry),
        # A gauge, not a histogram: a request stuck for hours shows here while it is stuck, not after.
        deletion_oldest_pending_request_age_seconds=Gauge(
            "headshots_deletion_oldest_pending_request_age_seconds",
            "Age of the oldest early-deletion request received and not yet finished (0: none pending).",
            registry=registry),
        # Exported so that alerts can say "no successful sweep for two intervals" whatever the interval.
        sweep_interval_seconds=Gauge("headshots_retention_sweep_interval_seconds",
                                     "Configured time between retention sweeps.", registry=registry),
    )
    # Known label values exist from the start, so dashboards show 0 rather than "no data".
    for artifact in ARTIFACT_CLASSES:
        metrics.objects_deleted_total.labels(artifact=artifact)
        metrics.bytes_deleted_total.labels(artifact=artifact)
        metrics.overdue_objects.labels(artifact=artifact).set(0)
    for status in ("succeeded", "failed"):
        metrics.deletion_requests_total.labels(status=status)
    return metrics


WEBHOOK_EVENTS = ("batch.completed", "person.needs_photos", "person.failed", "deletion.completed")
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")


@dataclass(frozen=True)
class WebhookMetrics:
    deliveries_total: Counter


def create_webhook_metrics(registry: CollectorRegistry) -> WebhookMetrics:
    """Webhook delivery attempts, by event type and outcome: ``delivered`` (2xx), ``retried`` (an attempt
    failed, another is scheduled), ``failed`` (given up). Registered by each process that emits events."""
    metrics = WebhookMetrics(
        deliveries_total=Counter("headshots_webhook_deliveries_total",
                                 "Webhook delivery attempts, by event type and outcome (delivered|retried|failed).",
                                 ["event", "outcome"], registry=registry))
    for event in WEBHOOK_EVENTS:
        for outcome in WEBHOOK_OUTCOMES:
            metrics.deliveries_total.labels(event=event, outcome=outcome)
    return metrics


def serve_metrics(registry: CollectorRegistry, *, host: str, port: int) -> int:
    """Expose ``registry`` on http://host:port/metrics; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
