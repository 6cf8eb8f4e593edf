"""Webhook deliveries against the real S3 server and a real HTTP receiver on loopback: retries with the
same delivery id, pending records that survive a restart, the coordinator's and the retention
controller's events (ids only), and a receiver that hangs not holding up a batch."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from cluster.coordinator import Coordinator
from cluster.retention import RetentionController
from cluster.webhooks import DATA_FIELDS, WebhookDispatcher, default_secret, new_event, post, verify_signature
from headshots.config import WebhooksConfig
from monitoring.metrics import create_webhook_metrics
from storage import keys
from storage.state import BatchState, PersonState, PhotoRecord, StateStore
from tests.integration.scripted_pool import ScriptedPool
from tests.integration.webhook_receiver import Receiver

# The receivers here listen on 127.0.0.1, which deliveries are refused unless allowed explicitly.
FAST = WebhooksConfig(max_attempts=5, first_retry_delay_s=0.05, max_retry_delay_s=0.2, timeout_s=2.0,
                      allow_private_addresses=True)
PERSON_NAME = "Ada Lovelace"
PERSON_EMAIL = "ada@example.com"


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def config(base_config):
    return base_config.replace(webhooks=FAST, workers=dataclasses.replace(base_config.workers, max_stage_attempts=1))


@pytest.fixture
def dispatchers(store):
    """Dispatchers with a source of their own (tests share buckets; each test sees only its records)."""
    made: list[WebhookDispatcher] = []

    def make(webhooks_config: WebhooksConfig = FAST, source: str | None = None) -> WebhookDispatcher:
        registry = CollectorRegistry()
        dispatcher = WebhookDispatcher(store, webhooks_config, source=source or "t" + uuid.uuid4().hex[:10],
                                       metrics=create_webhook_metrics(registry))
        dispatcher.registry = registry
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.stop()


def _tenant_secret(store, tenant: str) -> str:
    secret = "whsec-" + uuid.uuid4().hex
    store.put_json("state", keys.tenant_record_key(tenant), {"tenant": tenant, "webhook_secret": secret})
    return secret


def _verified(request: dict, secret: str) -> bool:
    headers = request["headers"]
    return verify_signature(secret, headers["X-Headshots-Timestamp"], request["body"],
                            headers["X-Headshots-Signature"])


def _pending_keys(store, source: str) -> list[str]:
    return list(store.list_keys("state", keys.webhook_pending_prefix(source)))


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody-listens"


def test_a_failing_receiver_gets_retries_with_the_same_delivery_id_until_it_accepts(
        store, tenant, receivers, dispatchers):
    secret = _tenant_secret(store, tenant)
    receiver = receivers(statuses=[500, 500])
    dispatcher = dispatchers()
    event = new_event("batch.completed", tenant=tenant, batch_id="b1", state="done", facts=["t1"])
    dispatcher.emit(event, [{"url": receiver.url, "events": ["batch.completed"]}])

    assert dispatcher.wait_idle(10)
    requests = receiver.requests
    assert len(requests) == 3
    assert {r["headers"]["X-Headshots-Delivery"] for r in requests} == {event.id}
    assert {r["headers"]["X-Headshots-Event"] for r in requests} == {"batch.completed"}
    assert {r["headers"]["Content-Type"] for r in requests} == {"application/json"}
    assert {r["path"] for r in requests} == {"/hooks/headshots?token=t"}
    # Signed with the tenant's own secret, every attempt; not with another one.
    assert all(_verified(r, secret) for r in requests)
    assert not _verified(requests[-1], default_secret(store))
    assert json.loads(requests[-1]["body"]) == event.to_json()
    # Backoff: the second retry waited at least half the doubled first delay.
    assert requests[2]["at"] - requests[1]["at"] >= FAST.first_retry_delay_s
    # Delivered once in the end: the pending record (every version of it) is gone.
    assert _pending_keys(store, dispatcher.source) == []
    assert store.list_versions("state", keys.webhook_pending_prefix(dispatcher.source)) == []
    value = dispatcher.registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "retried"}) == 2
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "delivered"}) == 1
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "failed"}) == 0


def test_an_event_emitted_again_after_it_was_delivered_is_not_posted_again(store, tenant, receivers, dispatchers):
    # The coordinator can announce one person twice with the same event id (its own transition, and the
    # submit's read of persons left in needs_photos): the second emit finds it delivered and sends nothing.
    receiver = receivers()
    dispatcher = dispatchers()
    webhooks = [{"url": receiver.url, "events": ["person.needs_photos"]}]
    event = new_event("person.needs_photos", tenant=tenant, batch_id="b1", person_id="ada", state="needs_photos",
                      facts=["t1"])
    dispatcher.emit(event, webhooks)
    assert dispatcher.wait_idle(10)
    dispatcher.emit(new_event("person.needs_photos", tenant=tenant, batch_id="b1", person_id="ada",
                              state="needs_photos", facts=["t1"]), webhooks)
    other = new_event("person.needs_photos", tenant=tenant, batch_id="b1", person_id="grace", state="needs_photos",
                      facts=["t1"])
    dispatcher.emit(other, webhooks)
    assert dispatcher.wait_idle(10)
    assert [r["headers"]["X-Headshots-Delivery"] for r in receiver.requests] == [event.id, other.id]
    value = dispatcher.registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "person.needs_photos", "outcome": "delivered"}) == 2


def test_a_delivery_is_given_up_after_max_attempts(store, tenant, receivers, dispatchers):
    receiver = receivers(default=503)
    dispatcher = dispatchers(dataclasses.replace(FAST, max_attempts=3))
    dispatcher.emit(new_event("person.failed", tenant=tenant, batch_id="b1", person_id="ada", state="failed"),
                    [{"url": receiver.url, "events": ["person.failed"]},
                     {"url": _closed_port_url(), "events": ["person.failed"]}])
    assert dispatcher.wait_idle(10)
    assert len(receiver.requests) == 3
    assert _pending_keys(store, dispatcher.source) == []
    value = dispatcher.registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "person.failed", "outcome": "failed"}) == 2
    assert value("headshots_webhook_deliveries_total", {"event": "person.failed", "outcome": "retried"}) == 4


def test_by_default_a_loopback_receiver_is_refused_without_a_single_request(store, tenant, receivers, dispatchers):
    receiver = receivers()
    dispatcher = dispatchers(dataclasses.replace(FAST, allow_private_addresses=False))
    dispatcher.emit(new_event("batch.completed", tenant=tenant, batch_id="b1", state="done", facts=["t1"]),
                    [{"url": receiver.url, "events": ["batch.completed"]}])
    assert dispatcher.wait_idle(10)
    assert receiver.requests == []
    assert _pending_keys(store, dispatcher.source) == []
    value = dispatcher.registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "failed"}) == 1
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "retried"}) == 0


def test_the_connection_goes_to_the_checked_address_not_to_a_new_lookup(receivers):
    # "hooks.invalid" resolves nowhere (RFC 6761): the request can only arrive through the pinned address.
    receiver = receivers()
    port = receiver.server.server_address[1]
    status = post(f"http://hooks.invalid:{port}/h?t=1", b"{}", {"Content-Type": "application/json"},
                  timeout_s=2.0, addresses=["127.0.0.1"])
    assert status == 200
    [request] = receiver.requests
    assert request["headers"]["Host"] == f"hooks.invalid:{port}" and request["path"] == "/h?t=1"


def test_pending_deliveries_survive_a_dispatcher_restart(store, tenant, receivers, dispatchers):
    secret = _tenant_secret(store, tenant)
    receiver = receivers(statuses=[503])
    # The first dispatcher's retry would come only after a minute: it is stopped long before.
    first = dispatchers(dataclasses.replace(FAST, first_retry_delay_s=60.0, max_retry_delay_s=60.0))
    event = new_event("person.needs_photos", tenant=tenant, batch_id="b1", person_id="ada", state="needs_photos")
    first.emit(event, [{"url": receiver.url, "events": ["person.needs_photos"]}])
    receiver.wait_for(1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the failed attempt is recorded right after the answer
        records = [store.get_json("state", key) for key in _pending_keys(store, first.source)]
        if records and records[0]["attempts"] == 1:
            break
        time.sleep(0.02)
    assert [(r["event"]["id"], r["attempts"], r["last_error"]) for r in records] == [(event.id, 1, "HTTP 503")]
    first.stop()

    second = dispatchers(source=first.source)
    second.start()
    requests = receiver.wait_for(2)
    assert second.wait_idle(10)
    assert [r["headers"]["X-Headshots-Delivery"] for r in requests] == [event.id, event.id]
    assert json.loads(requests[1]["body"]) == event.to_json() and _verified(requests[1], secret)
    assert _pending_keys(store, first.source) == []


def _batch(store, tenant: str, webhooks: list[dict], photos_by_person: dict[str, int],
           edge_needs_photos: tuple[str, ...] = ()) -> BatchState:
    states = StateStore(store)
    for person_id, count in photos_by_person.items():
        ref = keys.PersonRef(tenant, "b1", person_id)
        person = PersonState(tenant=tenant, batch_id="b1", person_id=person_id, name=PERSON_NAME, email=PERSON_EMAIL,
                             photos=[PhotoRecord(index=i, source=f"{i}.jpg", accepted=True,
                                                 key=keys.upload_key(ref, i, ".jpg")) for i in range(count)])
        if person_id in edge_needs_photos:  # too few usable photos at submit: never reaches the coordinator
            person.state, person.processed_at = "needs_photos", "2026-11-20T10:00:00Z"
        states.save_person(person)
    batch = BatchState(tenant=tenant, batch_id="b1", name="webhooks", base_model="tiny", styles=["office"],
                       images_per_style=1, person_ids=list(photos_by_person), webhooks=webhooks)
    states.save_batch(batch)
    return batch


def _run(config, pool, tenant: str) -> tuple[str, Coordinator, float]:
    async def go():
        coordinator = Coordinator(config, pool)
        started = time.perf_counter()
        await coordinator.submit(tenant, "b1")
        final = await coordinator.wait(tenant, "b1", timeout_s=60)
        return final, coordinator, time.perf_counter() - started

    return asyncio.run(go())


def test_the_coordinator_announces_persons_and_the_batch_with_ids_only(config, store, tenant, receivers):
    everything, completions = receivers(), receivers()
    webhooks = [{"url": everything.url, "events": ["batch.completed", "person.needs_photos", "person.failed",
                                                    "deletion.completed"]},
                {"url": completions.url, "events": ["batch.completed"]}]
    from cluster.coordinator import PermanentStageError

    _batch(store, tenant, webhooks, {"fine": 4, "few-photos": 2, "poison": 4, "no-photos": 0},
           edge_needs_photos=("no-photos",))
    pool = ScriptedPool({("poison", "train"): [PermanentStageError("bad input")]})
    final, coordinator, _ = _run(config, pool, tenant)
    try:
        assert final == "done"
        assert coordinator.webhooks.wait_idle(10)
    finally:
        coordinator.webhooks.stop()

    by_type = {}
    for event in everything.events():
        by_type.setdefault(event["type"], []).append(event)
    assert sorted((t, len(events)) for t, events in by_type.items()) == [
        ("batch.completed", 1), ("person.failed", 1), ("person.needs_photos", 2)]
    assert {e["data"]["person_id"] for e in by_type["person.needs_photos"]} == {"few-photos", "no-photos"}
    assert by_type["person.failed"][0]["data"] == {"tenant": tenant, "batch_id": "b1", "person_id": "poison",
                                                   "state": "failed"}
    completed = by_type["batch.completed"][0]["data"]
    assert completed == {"tenant": tenant, "batch_id": "b1", "state": "done",
                         "persons_by_state": {"done": 1, "failed": 1, "needs_photos": 2}}
    assert [e["type"] for e in completions.events()] == ["batch.completed"]
    # Ids only: no name or email anywhere, and data holds nothing but the allowed keys.
    for request in everything.requests + completions.requests:
        assert PERSON_NAME.encode() not in request["body"] and PERSON_EMAIL.encode() not in request["body"]
        assert set(json.loads(request["body"])["data"]) <= set(DATA_FIELDS)
        # No tenant record (an operator's batch): signed with the stack's default secret.
        assert _verified(request, default_secret(store))
        assert request["headers"]["X-Headshots-Event"] == json.loads(request["body"])["type"]
    assert _pending_keys(store, "coordinator") == []
    value = coordinator.registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "person.needs_photos", "outcome": "delivered"}) == 2


def test_a_receiver_that_hangs_does_not_hold_up_the_batch(config, store, tenant, receivers):
    # The receiver holds every request until released, and the attempt's timeout is long: if emitting
    # waited for the receiver, the batch could not finish before the release.
    release = threading.Event()
    hanging = receivers(hold=release)
    slow_config = config.replace(webhooks=dataclasses.replace(FAST, timeout_s=30.0))

    _batch(store, tenant, [], {"a": 4, "b": 4})
    _, baseline, baseline_s = _run(slow_config, ScriptedPool(), tenant)
    baseline.webhooks.stop()

    other = "t" + uuid.uuid4().hex[:10]
    _batch(store, other, [{"url": hanging.url}, {"url": _closed_port_url()}], {"a": 4, "b": 1})
    final, coordinator, with_hooks_s = _run(slow_config, ScriptedPool(), other)
    try:
        assert final == "done"
        # The batch is done while its events are still undelivered: the pipeline never waited for them.
        pending = coordinator.webhooks.pending()
        assert any(delivery_id.startswith(_completed_id(store, other)) for delivery_id in pending), pending
        assert with_hooks_s < baseline_s + 1.0, (with_hooks_s, baseline_s)
        release.set()
        hanging.wait_for(2)  # person.needs_photos (b) and batch.completed
    finally:
        release.set()
        coordinator.webhooks.stop()
    _drain(store, config, "coordinator")


def _completed_id(store, tenant: str) -> str:
    from cluster.webhooks import batch_completed_event

    batch = StateStore(store).load_batch(tenant, "b1")
    return batch_completed_event(batch).id


def _drain(store, config, source: str) -> None:
    """Deliver (or give up) what a test left pending, so later tests' dispatchers do not pick it up."""
    dispatcher = WebhookDispatcher(store, dataclasses.replace(FAST, max_attempts=1, timeout_s=0.5), source=source)
    dispatcher.start()
    deadline = time.monotonic() + 10
    while _pending_keys(store, source) and time.monotonic() < deadline:
        time.sleep(0.05)
    dispatcher.stop()
    assert _pending_keys(store, source) == []


def test_the_retention_controller_announces_each_deleted_person_with_the_receipt(config, store, tenant,
                                                                                   receivers, key_store):
    secret = _tenant_secret(store, tenant)
    receiver = receivers()
    _batch(store, tenant, [{"url": receiver.url, "events": ["deletion.completed"]}], {"ada": 4, "bob": 4})
    controller = RetentionController(config, metrics_port=None, key_store=key_store)
    try:
        summary = controller.delete(tenant, "b1")
        assert controller.webhooks.wait_idle(10)
    finally:
        controller.stop()
    events = sorted(receiver.events(), key=lambda e: e["data"]["person_id"])
    assert [e["type"] for e in events] == ["deletion.completed"] * 2
    assert [e["data"]["person_id"] for e in events] == ["ada", "bob"]
    assert {e["data"]["receipt_id"] for e in events} == {summary["receipt_id"]}
    assert all(e["data"]["state"] == "deleted" and e["data"]["kind"] == "request" for e in events)
    assert all(_verified(request, secret) for request in receiver.requests)
    assert _pending_keys(store, "retention") == []
