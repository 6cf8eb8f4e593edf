"""The state machine holds against the real S3 server (issue #13): every save is checked against the one
table in storage/state.py, and random sequences of what operators, the API and the coordinator do to
a batch (start, add photos, cancel, retry, more, delete, coordinator progress and restarts) never store
a forbidden transition: every stored version of every person and batch document is read back, oldest
first, and each consecutive pair must be a move the table allows.

The coordinator runs in-process with a pool whose stages wait until the test lets each one through (or
fails it), so operations land between stages in orders drawn by hypothesis; the test waits on
conditions (a stage reached, a run ended), never on time. Calls that go over Ray in production (the
CLI's cancel, a batch's start, deletion stopping the coordinator's persons) reach the same coordinator
object directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import uuid
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import storage.deletion
import storage.state
from cluster.coordinator import Coordinator
from cluster.retention import RetentionController
from headshots import client, operations
from headshots.config import WebhooksConfig
from headshots.manifest import BatchManifest, PersonSpec
from storage import keys
from storage.barrier import PersonRevoked
from storage.crypto import key_store_for
from storage.deletion import replace_with_tombstone
from storage.state import (BatchState, BatchStatus, ForbiddenTransition, PersonState, PersonStatus, StateConflict,
                           StateStore, check_batch_transition, check_person_transition)
from storage.store import ArtifactStore
from storage.sweep import DeletionHooks
from tests.integration.conftest import TEST_CONSENT
from tests.integration.deletion_audit import make_photo
from tests.integration.scripted_pool import ScriptedPool

PERSONS = ("ada", "bob")
# One round of waiting for the coordinator to react: far more than any reaction takes; reaching it means
# the coordinator is stuck, and the test says so instead of hanging.
SETTLE_ROUND_S = 120.0


# --- reading what was stored ------------------------------------------------------------------------

def stored_documents(store: ArtifactStore, key: str) -> list[dict[str, Any]]:
    """Every stored version of a state document, oldest first (listings give a key's newest first)."""
    versions = [version for found, version, is_marker in store.list_versions("state", key)
                if found == key and not is_marker]
    return [json.loads(store.get("state", key, version_id=version)) for version in reversed(versions)]


def forbidden_moves(documents: list[dict[str, Any]], what: str,
                    check: Callable[[str, str | None, str], Any]) -> list[str]:
    """Each stored move the table does not allow, as the refusal's message (empty: the history is legal).

    The first version must be an initial state, unless it is a tombstone: a deletion removes the older
    versions on purpose (they hold names)."""
    problems = []
    if documents and not documents[0].get("tombstoned_at"):
        try:
            check(what, None, documents[0]["state"])
        except ForbiddenTransition as refused:
            problems.append(str(refused))
    for before, after in itertools.pairwise(documents):
        try:
            check(what, before["state"], after["state"])
        except ForbiddenTransition as refused:
            problems.append(str(refused))
    return problems


def batch_history_problems(store: ArtifactStore, tenant: str, batch_id: str) -> list[str]:
    problems = forbidden_moves(stored_documents(store, keys.batch_state_key(tenant, batch_id)),
                               f"batch {tenant}/{batch_id}", check_batch_transition)
    for person_id in PERSONS:
        ref = keys.PersonRef(tenant, batch_id, person_id)
        problems += forbidden_moves(stored_documents(store, keys.person_state_key(ref)),
                                    f"person {tenant}/{batch_id}/{person_id}", check_person_transition)
    return problems


# --- StateStore and the tombstone refuse forbidden moves ---------------------------------------------

def _person(tenant: str, person_id: str = "ada", **fields) -> PersonState:
    return PersonState(tenant=tenant, batch_id="b1", person_id=person_id, name="Ada Lovelace", **fields)


def test_a_person_save_moves_from_the_state_it_was_loaded_or_last_saved_with(store, tenant):
    states = StateStore(store)
    key = keys.person_state_key(keys.PersonRef(tenant, "b1", "ada"))
    with pytest.raises(ForbiddenTransition, match=rf"person {tenant}/b1/ada is a new document and may start only "
                                                  r"in queued, needs_photos, but its state is training"):
        states.save_person(_person(tenant, state="training"))
    assert stored_documents(store, key) == []  # refused before anything was written
    person = _person(tenant)
    states.create_person(person)
    assert person.stored_state == PersonStatus.QUEUED and "stored_state" not in stored_documents(store, key)[0]
    person.state = "ingesting"
    states.save_person(person)  # from the state of its last save: queued -> ingesting
    assert person.state is PersonStatus.INGESTING and person.stored_state == PersonStatus.INGESTING
    loaded = states.load_person(tenant, "b1", "ada")
    assert loaded.stored_state == PersonStatus.INGESTING
    loaded.state = "done"  # training, generating and packaging skipped
    with pytest.raises(ForbiddenTransition, match=rf"person {tenant}/b1/ada cannot go from ingesting to done; from "
                                                  r"ingesting it may be saved as ingesting, training, needs_photos, "
                                                  r"failed, cancelled, deleted"):
        states.save_person(loaded)
    assert [d["state"] for d in stored_documents(store, key)] == ["queued", "ingesting"]
    # A copy carrying only the ETag is checked against the stored version at that ETag.
    copy = PersonState.from_json(loaded.to_json())
    copy.etag = loaded.etag
    assert copy.stored_state is None
    with pytest.raises(ForbiddenTransition, match="cannot go from ingesting to done"):
        states.save_person(copy)
    copy.state = "training"
    states.save_person(copy)
    # ... and a copy whose version is no longer the stored one loses as its If-Match would.
    stale = PersonState.from_json(loaded.to_json())
    stale.etag, stale.state = loaded.etag, "cancelled"
    with pytest.raises(StateConflict, match="changed by another writer"):
        states.save_person(stale)
    assert [d["state"] for d in stored_documents(store, key)] == ["queued", "ingesting", "training"]
    assert forbidden_moves(stored_documents(store, key), "person", check_person_transition) == []


def test_a_batch_save_is_checked_too_and_deleted_is_the_end(store, tenant):
    states = StateStore(store)
    batch = BatchState(tenant=tenant, batch_id="b1", name="Q3", base_model="tiny", styles=["office"],
                       images_per_style=1, person_ids=["ada"], state="created")
    states.create_batch(batch)
    batch.state = "done"  # never started
    with pytest.raises(ForbiddenTransition, match=rf"batch {tenant}/b1 cannot go from created to done"):
        states.save_batch(batch)
    batch.state = BatchStatus.CANCELLED
    states.save_batch(batch)
    loaded = states.load_batch(tenant, "b1")
    assert loaded.stored_state == BatchStatus.CANCELLED
    loaded.state = "deleted"
    states.save_batch(loaded)
    loaded.state = "running"
    with pytest.raises(ForbiddenTransition, match="cannot go from deleted to running; from deleted it may be saved "
                                                  "as deleted"):
        states.save_batch(loaded)
    documents = stored_documents(store, keys.batch_state_key(tenant, "b1"))
    assert [d["state"] for d in documents] == ["created", "cancelled", "deleted"]


def test_the_tombstone_written_past_the_state_store_is_checked(store, tenant):
    states = StateStore(store)
    ref = keys.PersonRef(tenant, "b1", "ada")
    states.create_person(_person(tenant))
    document = stored_documents(store, keys.person_state_key(ref))[-1]
    kept, _ = replace_with_tombstone(store, ref, document, receipt_id="r1", state="deleted")
    assert kept["state"] == "deleted" and kept["name"] is None
    with pytest.raises(ForbiddenTransition, match=rf"person {tenant}/b1/ada cannot go from deleted to queued"):
        replace_with_tombstone(store, ref, kept, receipt_id="r2", state="queued")
    assert [d["state"] for d in stored_documents(store, keys.person_state_key(ref))] == ["deleted"]


def test_the_history_check_finds_a_forbidden_move_written_past_the_state_store(store, tenant):
    """The property test below can fail: a move the table forbids, once stored, is reported."""
    states = StateStore(store)
    person = _person(tenant)
    states.create_person(person)
    key = keys.person_state_key(person.ref)
    assert forbidden_moves(stored_documents(store, key), "person", check_person_transition) == []
    store.put_json("state", key, {**person.to_json(), "state": "done"})  # no StateStore: no check
    assert forbidden_moves(stored_documents(store, key), "person t/b1/ada", check_person_transition) == [
        "person t/b1/ada cannot go from queued to done; from queued it may be saved as queued, ingesting, "
        "needs_photos, cancelled, deleted"]


# --- random operation sequences ------------------------------------------------------------------------

class GatedPool(ScriptedPool):
    """Stages of one batch wait at a gate until the test opens it with success or a failure; a revoke
    (deletion, cancel) ends a waiting stage the way a GPU worker refuses to go on."""

    def __init__(self, batch_id: str):
        super().__init__()
        self.batch_id = batch_id
        self.free = False  # at the end of an example: every stage runs at once
        self.gates: dict[str, asyncio.Future] = {}
        self.revoked: set[str] = set()
        self.arrived = asyncio.Event()

    async def _stage(self, stage: str, job, **details: Any):
        if job.batch_id == self.batch_id and not self.free:
            if job.person_id in self.revoked:
                raise PersonRevoked(f"{job.ref.prefix} is revoked on this worker")
            gate = asyncio.get_running_loop().create_future()
            self.gates[job.person_id] = gate
            self.arrived.set()
            try:
                failure = await gate
            finally:
                if self.gates.get(job.person_id) is gate:
                    del self.gates[job.person_id]
            if failure is not None:
                raise failure
        return await super()._stage(stage, job, **details)

    def open(self, person_id: str, failure: BaseException | None = None) -> None:
        # Out of the waiting ones at once: the stage is on its way again before its coroutine resumes.
        gate = self.gates.pop(person_id, None)
        if gate is not None and not gate.done():
            gate.set_result(failure)

    async def revoke(self, prefixes):
        for prefix in prefixes:
            person_id = prefix.split("/")[2]
            self.revoked.add(person_id)
            self.open(person_id, PersonRevoked(f"{prefix} revoked"))
        return []

    async def allow(self, prefixes):
        self.revoked.difference_update(prefix.split("/")[2] for prefix in prefixes)
        return []


class Harness:
    """One example: a batch, the coordinator running it, and the operations applied to it."""

    def __init__(self, config, store: ArtifactStore, tenant: str, batch_id: str, seed: int):
        self.config, self.store, self.tenant, self.batch_id = config, store, tenant, batch_id
        self.states = StateStore(store)
        self.pool = GatedPool(batch_id)
        self.loop = asyncio.get_running_loop()
        self.coordinator = Coordinator(config, self.pool)
        self.retention = RetentionController(config, key_store=key_store_for(config, store), hooks=DeletionHooks(
            stop_persons=lambda persons: self.call("stop_persons", [
                {"tenant": p.tenant, "batch_id": p.batch_id, "person_id": p.person_id} for p in persons])))
        self.rng = random.Random(seed)
        self.photo_names = itertools.count()

    def call(self, method: str, *args: Any) -> Any:
        """A coordinator call from another thread, as over Ray."""
        return asyncio.run_coroutine_threadsafe(getattr(self.coordinator, method)(*args), self.loop).result()

    async def add_photo(self, person_id: str) -> None:
        try:
            await asyncio.to_thread(client.add_photo_bytes, self.config, tenant=self.tenant, batch_id=self.batch_id,
                                    person_id=person_id, filename=f"{next(self.photo_names):03d}.jpg",
                                    data=make_photo(self.rng), store=self.store)
        except ValueError as refused:
            refusal(refused)

    async def apply(self, kind: str, person_id: str, succeed: bool) -> None:
        person = {"tenant": self.tenant, "batch_id": self.batch_id, "person_id": person_id}
        if kind == "progress":  # the person's stage ends (else another waiting one's)
            waiting = [person_id] if person_id in self.pool.gates else sorted(self.pool.gates)
            if waiting:
                self.pool.open(waiting[0], None if succeed else RuntimeError("scripted stage failure"))
        elif kind == "add_photo":
            await self.add_photo(person_id)
        elif kind == "start":
            try:
                await asyncio.to_thread(client.begin_batch, self.config, self.tenant, self.batch_id, store=self.store)
            except ValueError as refused:
                refusal(refused)
        elif kind == "cancel":
            await self.coordinator.cancel_persons([person])
        elif kind == "cancel_batch":
            await asyncio.to_thread(operations.cancel, None, self.states, tenant=self.tenant, batch_id=self.batch_id)
        elif kind in ("retry", "more"):
            try:
                if kind == "retry":
                    await self.coordinator.retry_person(self.tenant, self.batch_id, person_id)
                else:
                    await self.coordinator.more_headshots(self.tenant, self.batch_id, person_id, 1)
            except ValueError as refused:
                refusal(refused)
        elif kind == "delete":
            await asyncio.to_thread(self.retention.delete, self.tenant, self.batch_id, person_id)
        elif kind == "delete_batch":
            await asyncio.to_thread(self.retention.delete, self.tenant, self.batch_id)
        elif kind == "restart":
            await self.crash()
            self.coordinator = Coordinator(self.config, self.pool)
            await self.coordinator.start()  # resumes the batch if the store says it is running
        else:
            raise AssertionError(f"unknown operation {kind}")
        await self.settle()

    def _ours(self) -> list[tuple[tuple[str, str, str], asyncio.Task]]:
        return [(key, task) for key, task in self.coordinator._person_tasks.items()
                if key[:2] == (self.tenant, self.batch_id)]

    async def settle(self) -> None:
        """Wait until every person of the batch waits at a gate or has no run, and the batch's run has
        ended or waits for such a person: the coordinator has done all it will do until the next step."""
        while True:
            moving = [task for key, task in self._ours() if not task.done() and key[2] not in self.pool.gates]
            batch_task = self.coordinator._batches.get((self.tenant, self.batch_id))
            if not moving and batch_task is not None and not batch_task.done() and not self.pool.gates:
                moving = [batch_task]
            if not moving:
                return
            self.pool.arrived.clear()
            arrival = asyncio.ensure_future(self.pool.arrived.wait())
            done, _ = await asyncio.wait([*moving, arrival], timeout=SETTLE_ROUND_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            arrival.cancel()
            assert done, f"the coordinator made no step in {SETTLE_ROUND_S:.0f} s"

    async def finish(self) -> None:
        """Let every stage through until the batch's run ends, then stop the coordinator."""
        self.pool.free = True
        for person_id in list(self.pool.gates):
            self.pool.open(person_id)
        await self.settle()
        await self.crash()
        self.retention.stop()

    async def crash(self) -> None:
        """The coordinator process dies (between steps: nothing of it is writing)."""
        coordinator = self.coordinator
        tasks = [task for task in (*coordinator._batches.values(), *coordinator._person_tasks.values(),
                                   coordinator._monitor) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        coordinator.webhooks.stop()


def refusal(error: ValueError) -> None:
    """An operation refused as the caller's error (a person in the wrong state, being deleted): fine,
    unless it is the state machine refusing a writer's move."""
    if isinstance(error, ForbiddenTransition):
        raise error


@pytest.fixture(scope="module")
def isolated(base_config):
    """Buckets of this module's own: each coordinator resumes every running batch it finds, and must find
    only ours (other tests leave running batches behind in the shared buckets)."""
    suffix = uuid.uuid4().hex[:6]
    config = base_config.replace(
        store=dataclasses.replace(base_config.store, **{f"bucket_{a}": f"sm-{suffix}-{a}" for a in
                                                        ("uploads", "derived", "models", "outputs", "state",
                                                         "receipts")}),
        ingest=dataclasses.replace(base_config.ingest, min_photos=2),
        workers=dataclasses.replace(base_config.workers, max_stage_attempts=1),
        webhooks=WebhooksConfig(max_attempts=1, first_retry_delay_s=0.05, max_retry_delay_s=0.1, timeout_s=1.0))
    store = ArtifactStore.from_config(config.store)
    store.ensure_buckets()
    return config, store


@pytest.fixture
def refusals(monkeypatch):
    """Every move the state machine refused during the test (each one is a writer attempting a move the
    table forbids, or a table missing a real move; the coordinator would turn some into a failed stage)."""
    refused: list[str] = []

    def recording(check):
        def checked(what, from_state, to_state):
            try:
                return check(what, from_state, to_state)
            except ForbiddenTransition as error:
                refused.append(str(error))
                raise
        return checked

    monkeypatch.setattr(storage.state, "check_person_transition", recording(check_person_transition))
    monkeypatch.setattr(storage.state, "check_batch_transition", recording(check_batch_transition))
    monkeypatch.setattr(storage.deletion, "check_person_transition", recording(check_person_transition))
    return refused


@pytest.fixture
def harnesses(monkeypatch):
    """The harness of the running example; the CLI's and the API's Ray hops reach its coordinator."""
    current: list[Harness] = []
    monkeypatch.setattr(operations, "coordinator_call", lambda resolved, method, *args: current[-1].call(method, *args))
    monkeypatch.setattr(client, "start_batch",
                        lambda config, tenant, batch_id: current[-1].call("submit", tenant, batch_id))
    return current


KINDS = ("progress",) * 10 + ("add_photo", "add_photo", "cancel", "cancel_batch", "retry", "retry", "more", "more",
                             "delete", "delete_batch", "restart", "start")
BEFORE_START = ("add_photo", "add_photo", "cancel", "cancel_batch", "delete")
OPERATION = st.tuples(st.sampled_from(KINDS), st.sampled_from(PERSONS), st.sampled_from([True, True, True, False]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(photos=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       before=st.lists(st.tuples(st.sampled_from(BEFORE_START), st.sampled_from(PERSONS), st.just(True)), max_size=2),
       operations_=st.lists(OPERATION, min_size=1, max_size=20),
       seed=st.integers(0, 2 ** 16))
def test_no_sequence_of_operations_stores_a_forbidden_transition(isolated, harnesses, refusals, photos, before,
                                                                 operations_, seed):
    config, store = isolated
    tenant = "t" + uuid.uuid4().hex[:10]
    manifest = BatchManifest(tenant=tenant, name="State machine", base_model="tiny", styles=["office"],
                             images_per_style=1, consent=TEST_CONSENT,
                             persons=[PersonSpec(person_id, person_id.title(), None, []) for person_id in PERSONS])
    batch_id = client.create_batch(config, manifest, store=store).batch_id

    async def run() -> None:
        harness = Harness(config, store, tenant, batch_id, seed)
        harnesses.append(harness)
        try:
            for person_id, count in zip(PERSONS, photos):
                for _ in range(count):
                    await harness.add_photo(person_id)
            for kind, person_id, succeed in [*before, ("start", PERSONS[0], True), *operations_]:
                await harness.apply(kind, person_id, succeed)
        finally:
            await harness.finish()

    asyncio.run(run())
    assert refusals == []
    assert batch_history_problems(store, tenant, batch_id) == []
