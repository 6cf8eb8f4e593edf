"""Counting a batch after faults: every person exactly once, nothing lost, nothing duplicated.

Shared by the chaos tests (one node: tests/integration/test_chaos.py; many nodes:
tests/integration/test_multinode_chaos.py) and the node-loss tests (tests/integration/test_multinode.py).
Everything is read back from the store, the system's only truth: state documents with every version
they went through, headshot keys with their versions, checkpoints and LoRAs.
"""

from __future__ import annotations

import json

from storage import keys
from storage.keys import PersonRef
from storage.state import StateStore
from tests.integration.conftest import read_version


def person_state_versions(store, person_ref: PersonRef) -> list[dict]:
    """Every version the person's state document went through (the store keeps them all)."""
    key = keys.person_state_key(person_ref)
    versions = [version for k, version, marker in store.list_versions("state", key) if k == key and not marker]
    return [json.loads(store.get("state", key, version_id=version)) for version in versions]


def checkpoint_versions(store, person: PersonRef) -> list[str]:
    key = keys.checkpoint_key(person)
    return [version for k, version, marker in store.list_versions("models", key) if k == key and not marker]


def checkpoint_steps(store, key_store, person: PersonRef, versions: list[str] | None = None) -> list[int]:
    """The training step of each checkpoint version (all of them, or ``versions``)."""
    from pipeline.finetune import TrainCheckpoint

    key = keys.checkpoint_key(person)
    return [TrainCheckpoint.from_bytes(read_version(store, key_store, "models", key, version)).step
            for version in (checkpoint_versions(store, person) if versions is None else versions)]


def assert_every_person_exactly_once(store, batch_id: str, tenant: str, *, count: int, images: int, steps: int,
                                     style: str = "office") -> list:
    """The batch and all ``count`` persons done, each exactly once: one `done` in its state history
    (a second would mean it was processed to the end twice), each expected headshot key stored with
    one version and every stored version recorded in the person's state (none lost, none duplicated),
    and its LoRA trained to the last of ``steps``. Returns the persons' final states."""
    states = StateStore(store)
    batch = states.load_batch(tenant, batch_id)
    persons = states.load_persons(batch)
    summary = [(p.person_id, p.state, p.error, p.attempts, p.timings_s) for p in persons]
    print(f"persons: {summary}")
    assert batch.state == "done", summary
    assert [p.state for p in persons] == ["done"] * count, summary
    for person in persons:
        history = [version["state"] for version in person_state_versions(store, person.ref)]
        assert history.count("done") == 1, (person.person_id, history)
        expected = {keys.headshot_key(person.ref, style, h.index, h.seed) for h in person.headshots}
        assert sorted(h.index for h in person.headshots) == list(range(images)), person.person_id
        stored = store.list_versions("outputs", person.ref.prefix + "headshots/")
        assert sorted(key for key, _, _ in stored) == sorted(expected), (person.person_id, stored)
        recorded = {(o.key, o.version_id) for o in person.objects if o.artifact == "outputs"}
        assert {(key, version) for key, version, _ in stored} <= recorded, person.person_id
        assert person.train_steps_done == steps, person.person_id
        assert store.list_versions("models", keys.lora_key(person.ref)), person.person_id
    return persons
