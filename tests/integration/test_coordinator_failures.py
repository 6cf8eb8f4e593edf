"""The coordinator's failure handling, against the real S3 server with an in-process pool (no Ray):
poison input, lost workers, epochs, progress documents and the memory it keeps."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from prometheus_client import CollectorRegistry

from cluster.coordinator import Coordinator, claim_epoch
from cluster.jobs import WorkerLost
from headshots import client
from storage import keys
from storage.state import BatchState, PersonState, PhotoRecord, StateStore
from tests.integration.scripted_pool import ScriptedPool


def _batch(store, tenant: str, person_ids: list[str]) -> BatchState:
    states = StateStore(store)
    for person_id in person_ids:
        photos = [PhotoRecord(index=i, source=f"{i}.jpg", accepted=True, key=keys.upload_key(
            keys.PersonRef(tenant, "b1", person_id), i, ".jpg")) for i in range(4)]
        states.save_person(PersonState(tenant=tenant, batch_id="b1", person_id=person_id, name="X", photos=photos))
    batch = BatchState(tenant=tenant, batch_id="b1", name="failures", base_model="tiny", styles=["office"],
                       images_per_style=2, person_ids=person_ids)
    states.save_batch(batch)
    return batch


def _run(config, pool, tenant: str) -> tuple[str, Coordinator]:
    async def go():
        coordinator = Coordinator(config, pool)
        await coordinator.submit(tenant, "b1")
        return await coordinator.wait(tenant, "b1", timeout_s=120), coordinator

    return asyncio.run(go())


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def config(base_config):
    # Two attempts for poison input, three worker losses: small numbers keep the test short.
    return base_config.replace(workers=dataclasses.replace(base_config.workers, max_stage_attempts=2,
                                                           max_worker_losses=3))


def test_poison_input_fails_its_person_after_k_attempts_and_the_batch_goes_on(config, store, tenant):
    _batch(store, tenant, ["poison", "healthy"])
    pool = ScriptedPool({("poison", "train"): [RuntimeError("CUDA error: illegal memory access")] * 10})
    final, coordinator = _run(config, pool, tenant)
    assert final == "done"
    states = StateStore(store)
    poison = states.load_person(tenant, "b1", "poison")
    healthy = states.load_person(tenant, "b1", "healthy")
    assert poison.state == "failed" and healthy.state == "done"
    assert poison.error.startswith("train failed after 2 attempt(s): RuntimeError: CUDA error")
    assert [c for c in pool.calls if c[:2] == ("poison", "train")] == [("poison", "train", coordinator.epoch)] * 2
    assert not any(c[0] == "poison" and c[1] == "generate" for c in pool.calls)
    assert _value(coordinator.registry, "headshots_stage_attempts_exhausted_total", stage="train") == 1
    assert _value(coordinator.registry, "headshots_stage_retries_total", stage="train") == 1


def test_lost_workers_do_not_count_as_attempts(config, store, tenant):
    # Two losses in training and one in generation: more than max_stage_attempts (2) in all, fewer
    # than max_worker_losses (3) per stage. The person must finish.
    _batch(store, tenant, ["preempted"])
    pool = ScriptedPool({("preempted", "train"): [WorkerLost("pod evicted")] * 2,
                         ("preempted", "generate"): [WorkerLost("spot node reclaimed")]})
    final, coordinator = _run(config, pool, tenant)
    person = StateStore(store).load_person(tenant, "b1", "preempted")
    assert final == "done" and person.state == "done" and person.error is None
    assert "train" not in person.attempts and person.attempts["train:worker_lost"] == 2
    assert person.attempts["generate:worker_lost"] == 1
    assert _value(coordinator.registry, "headshots_stage_retries_total", stage="train") == 2
    assert _value(coordinator.registry, "headshots_stage_attempts_exhausted_total", stage="train") == 0


def test_too_many_lost_workers_fail_the_person_with_a_hint(config, store, tenant):
    _batch(store, tenant, ["cursed"])
    pool = ScriptedPool({("cursed", "train"): [WorkerLost("OOM killed")] * 10})
    final, _ = _run(config, pool, tenant)
    person = StateStore(store).load_person(tenant, "b1", "cursed")
    assert person.state == "failed" and "lost its worker 3 times" in person.error
    assert "headshots retry" in person.error


def test_finished_batches_leave_memory_and_progress_says_done(config, store, tenant):
    _batch(store, tenant, ["a", "b"])
    pool = ScriptedPool()
    final, coordinator = _run(config, pool, tenant)
    assert final == "done"
    assert not [key for key in coordinator._persons if key[0] == tenant]
    assert not [key for key in coordinator._person_tasks if key[0] == tenant]
    progress = client.batch_progress(config, tenant, "b1")
    assert progress["eta_seconds"] == 0.0
    assert progress["eta_seconds_by_person"] == {"a": 0.0, "b": 0.0}
    assert progress["persons_by_state"] == {"done": 2}
    # No names in the progress document: ids and numbers only.
    assert "X" not in str(progress.values())
    # Every job carried the epoch the coordinator claimed, and the pool was fenced with it first.
    assert pool.fenced == [coordinator.epoch] and {epoch for *_, epoch in pool.calls} == {coordinator.epoch}


def test_concurrent_epoch_claims_never_share_a_number(store):
    claimed: list[int] = []
    lock = threading.Lock()

    def claim():
        epoch = claim_epoch(store)
        with lock:
            claimed.append(epoch)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8, claimed
    assert claim_epoch(store) > max(claimed)


@pytest.mark.parametrize("retention, processed_days_ago", [({"deleted_classes": ["uploads", "models"]}, 1),
                                                           ({}, 400)])
def test_more_headshots_refuse_once_the_model_is_not_retained(config, store, tenant, retention,
                                                              processed_days_ago):
    from datetime import datetime, timedelta, timezone

    from storage.retention import format_time

    _batch(store, tenant, ["gone"])
    assert _run(config, ScriptedPool(), tenant)[0] == "done"  # processed (the state machine allows no shortcut)
    states = StateStore(store)
    person = states.load_person(tenant, "b1", "gone")
    person.retention = retention
    person.processed_at = format_time(datetime.now(timezone.utc) - timedelta(days=processed_days_ago))
    states.save_person(person)

    async def ask():
        return await Coordinator(config, ScriptedPool()).more_headshots(tenant, "b1", "gone", 2)

    with pytest.raises(ValueError, match="model is no longer retained .* submit the person again"):
        asyncio.run(ask())
    assert states.load_person(tenant, "b1", "gone").state == "done"  # nothing changed


def test_a_state_write_by_another_writer_wins_over_the_coordinator(config, store, tenant):
    """Compare-and-swap: while the coordinator trains two persons, an operator cancels one and another
    writer flags the other. The cancel stands (the coordinator must not overwrite it with "done"); the
    flag survives (the coordinator carries on from the stored document instead of its own copy)."""
    _batch(store, tenant, ["cancelled", "flagged"])
    states = StateStore(store)

    def cancel_behind_the_coordinators_back():
        person = states.load_person(tenant, "b1", "cancelled")
        person.state, person.error = "cancelled", "cancelled by an operator"
        states.save_person(person)

    def flag_behind_the_coordinators_back():
        person = states.load_person(tenant, "b1", "flagged")
        person.flags = ["checked by a human"]
        states.save_person(person)

    pool = ScriptedPool(during={("cancelled", "train"): cancel_behind_the_coordinators_back,
                                ("flagged", "train"): flag_behind_the_coordinators_back})
    final, _ = _run(config, pool, tenant)
    assert final == "done"
    cancelled = states.load_person(tenant, "b1", "cancelled")
    flagged = states.load_person(tenant, "b1", "flagged")
    assert cancelled.state == "cancelled" and cancelled.error == "cancelled by an operator"
    assert not any(call[:2] == ("cancelled", "generate") for call in pool.calls)
    assert flagged.state == "done" and flagged.flags == ["checked by a human"]
    assert flagged.attempts.get("state_conflicts") == 1
