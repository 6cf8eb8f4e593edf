"""What the deletion tests share: small valid photos to upload, and the audit every one ends with —
nothing of the person is left, in any bucket or version."""

from __future__ import annotations

import io
import random

from PIL import Image

from storage import keys
from storage.crypto import key_material_versions, key_object_key
from storage.deletion import count_versions

PERSON_CLASSES = ("uploads", "derived", "models", "outputs")


def make_photo(rng: random.Random) -> bytes:
    """A small, valid, distinct JPEG (the edge's checks re-encode it; faces are checked later, at ingest)."""
    image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):
        x, y = rng.randrange(90), rng.randrange(90)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def assert_erased(store, person: keys.PersonRef, *, include_outputs: bool = True) -> None:
    """Nothing of the person in any class, any version; state is one tombstone; the key holds no material."""
    for artifact in PERSON_CLASSES if include_outputs else PERSON_CLASSES[:3]:
        assert count_versions(store, artifact, person.prefix) == 0, f"{artifact} still holds {person.prefix}"
    state_versions = store.list_versions("state", person.prefix)
    assert [key for key, _, _ in state_versions] == [keys.person_state_key(person)], state_versions
    tombstone = store.get_json("state", keys.person_state_key(person))
    assert tombstone["state"] == "deleted" and tombstone["name"] is None and tombstone["email"] is None
    assert key_material_versions(store, key_object_key(person)) == [], "the data key (or a new one) is back"
