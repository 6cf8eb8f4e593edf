"""A stalled batch is reported as stalled, never with a stale ETA (issue #12), against the real S3 server.

The reported failure: the Ray node died, the coordinator stopped, and `headshots status` kept saying
"running, ETA 3s" for 20 minutes, because it showed the last progress document as if it were live.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from cluster import coordinator as coordinator_module
from cluster.coordinator import Coordinator
from headshots import client
from storage import keys
from storage.retention import format_time
from storage.state import BatchState, PersonState, StateStore
from tests.integration.state_seed import seed_person


def _running_batch(store, tenant: str) -> BatchState:
    states = StateStore(store)
    seed_person(store, PersonState(tenant=tenant, batch_id="b1", person_id="p1", name="X", state="training"))
    batch = BatchState(tenant=tenant, batch_id="b1", name="stall", base_model="tiny", styles=["office"],
                       images_per_style=1, person_ids=["p1"], state="running")
    states.save_batch(batch)
    return batch


def _progress(store, tenant: str, *, updated_at: datetime) -> None:
    store.put_json("state", keys.batch_progress_key(tenant, "b1"), {
        "tenant": tenant, "batch_id": "b1", "epoch": 1, "updated_at": format_time(updated_at),
        "persons_by_state": {"training": 1}, "eta_seconds": 3.0, "eta_seconds_by_person": {"p1": 3.0}})


def test_a_batch_whose_coordinator_went_quiet_shows_a_stall_not_its_last_eta(base_config, store, tenant):
    _running_batch(store, tenant)
    now = datetime.now(timezone.utc)
    quiet_since = now - timedelta(minutes=20)
    _progress(store, tenant, updated_at=quiet_since)

    summary = client.batch_status(base_config, "b1", tenant=tenant, store=store)
    assert summary["state"] == "running"
    assert summary["eta_seconds"] is None and summary["persons"][0]["eta_seconds"] is None
    assert summary["stalled_since"] == format_time(quiet_since)
    assert "headshots up" in summary["hint"]
    (row,) = [r for r in client.list_batches(base_config, tenant=tenant)]
    assert row["stalled_since"] == format_time(quiet_since) and row["eta_seconds"] is None

    # The coordinator reports again: live, with its ETA.
    _progress(store, tenant, updated_at=now)
    summary = client.batch_status(base_config, "b1", tenant=tenant, store=store)
    assert summary["stalled_since"] is None and summary["hint"] is None
    assert summary["eta_seconds"] == 3.0 and summary["persons"][0]["eta_seconds"] == 3.0


def test_a_running_batch_without_any_progress_document_is_judged_by_its_own_age(base_config, store, tenant):
    batch = _running_batch(store, tenant)
    assert client.stall_of(batch, None) is None  # just written: not stalled
    later = datetime.now(timezone.utc) + timedelta(seconds=client.STALLED_AFTER_S + 1)
    assert client.stall_of(batch, None, now=later) == batch.updated_at
    finished = BatchState(**{**vars(batch), "state": "done"})
    assert client.stall_of(finished, None, now=later) is None  # only a running batch can stall


class _QuietPool:
    """Nothing changes between rounds: the progress document would never be rewritten without a heartbeat."""

    def eta_seconds(self, tenant, batch_id):
        return 30.0

    def eta_persons_seconds(self, tenant, batch_id):
        return {}


@pytest.mark.parametrize("heartbeat_s, expected_versions", [(0.0, 3), (3600.0, 1)])
def test_the_coordinator_rewrites_unchanged_progress_on_its_heartbeat(base_config, store, tenant, monkeypatch,
                                                                      heartbeat_s, expected_versions):
    monkeypatch.setattr(coordinator_module, "PROGRESS_HEARTBEAT_S", heartbeat_s)
    coordinator = Coordinator(base_config, _QuietPool())

    async def three_rounds() -> None:
        for _ in range(3):
            await coordinator._write_progress(tenant, "b1")

    asyncio.run(three_rounds())
    versions = store.list_versions("state", keys.batch_progress_key(tenant, "b1"))
    assert len(versions) == expected_versions
