"""Fixtures' way to store a person as an earlier run left it (done, training, ...).

StateStore lets a new document start only in an initial state (storage/state.py), and the moves that led
a fixture's person to its state are not what the test is about, so it is written straight to the store,
as one version, like the last save of that earlier run. Later saves go through StateStore as usual.
"""

from __future__ import annotations

from storage import keys
from storage.state import PersonState, PersonStatus
from storage.store import ArtifactStore, StoredObject


def seed_person(store: ArtifactStore, person: PersonState) -> StoredObject:
    """Write ``person`` in its state as it is; ``person`` remembers the version (etag, state) as a load would."""
    person.state = PersonStatus(person.state)
    stored = store.put_json("state", keys.person_state_key(person.ref), person.to_json())
    person.etag, person.stored_state = stored.etag, person.state
    return stored
