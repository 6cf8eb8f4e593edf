"""The retention controller's gauges behind the privacy alerts, against a real S3 server (no Ray):
the age of the oldest pending deletion request (alert: older than 15 minutes) and the sweep interval
(alert: no successful sweep for two intervals)."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.retention import RetentionController
from storage.store import ObjectNotFound

AGE = "headshots_deletion_oldest_pending_request_age_seconds"


@pytest.fixture
def controller(base_config, key_store):
    return RetentionController(base_config, metrics_port=None, key_store=key_store)


def test_the_sweep_interval_is_exported(controller, base_config):
    assert controller.registry.get_sample_value("headshots_retention_sweep_interval_seconds") == \
        base_config.retention.sweep_interval_s


def test_a_request_waiting_behind_a_sweep_shows_its_age_until_it_finishes(controller, tenant):
    assert controller.registry.get_sample_value(AGE) == 0
    outcome: dict[str, object] = {}

    def request() -> None:
        outcome["summary"] = controller.delete(tenant)

    # A sweep holds the controller's lock; the request must wait for it, and its wait must show.
    with controller._lock:
        worker = threading.Thread(target=request)
        worker.start()
        deadline = time.monotonic() + 10
        while controller.registry.get_sample_value(AGE) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        waited = controller.registry.get_sample_value(AGE)
    worker.join(timeout=60)
    assert not worker.is_alive() and "summary" in outcome
    assert waited >= 0.2
    assert controller.registry.get_sample_value(AGE) == 0
    assert controller.registry.get_sample_value("headshots_deletion_requests_total", {"status": "succeeded"}) == 1


def test_a_failed_request_is_no_longer_pending(controller, tenant):
    with pytest.raises(ObjectNotFound, match="no-such-batch"):
        controller.delete(tenant, batch_id="no-such-batch", person_id="nobody")
    assert controller.registry.get_sample_value(AGE) == 0
    assert controller.registry.get_sample_value("headshots_deletion_requests_total", {"status": "failed"}) == 1
