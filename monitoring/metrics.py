"""Every metric the system exports, defined once.

Names are exactly what Prometheus scrapes (prometheus-client, not ``ray.util.metrics``, which renames
them). Labels carry ids of bounded sets only: stage, state, worker — never a person, a name or an email.
Functions take a ``registry`` so tests can use a fresh one and read values back.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGE_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PERSON_STATES = ("queued", "ingesting", "training", "generating", "packaging",
                 "done", "needs_photos", "failed", "cancelled")


@dataclass(frozen=True)
class PipelineMetrics:
    persons: Gauge
    stage_duration_seconds: Histogram
    training_steps_total: Counter
    images_generated_total: Counter
    stage_errors_total: Counter
    photos_rejected_total: Counter
    batches_submitted_total: Counter


def create_pipeline_metrics(registry: CollectorRegistry) -> PipelineMetrics:
    """Register the batch-pipeline metrics on ``registry``."""
    return PipelineMetrics(
        persons=Gauge("headshots_persons", "Persons in batches this coordinator tracks, by state.",
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
    )


def serve_metrics(registry: CollectorRegistry, *, host: str, port: int) -> int:
    """Expose ``registry`` on http://host:port/metrics; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
