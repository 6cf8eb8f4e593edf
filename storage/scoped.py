"""Person-scoped access: the only way workers read or write a person's artifacts.

A fine-tune for person P must never read another person's photos (uploads are used only for that
person's own headshots). Rather than trusting every caller to build the right prefix, workers get a
:class:`PersonScope` bound to one person, and every key they pass is checked against it.
"""

from __future__ import annotations

from typing import Mapping

from storage.keys import PersonRef
from storage.store import ArtifactStore, StoredObject


class ScopeViolation(PermissionError):
    """A key outside the person's own prefix was asked for."""


class PersonScope:
    """Read/write a single person's artifacts.

    Args:
        store: the artifact store.
        person: whose artifacts these are.
    """

    def __init__(self, store: ArtifactStore, person: PersonRef):
        self.store = store
        self.person = person

    def _check(self, key: str) -> str:
        # Ids cannot contain '/' or '..', so a plain prefix test is exact; normalise anyway to refuse
        # keys such as 'acme/b/p/../q/uploads/000.jpg' that some servers would resolve.
        if not key.startswith(self.person.prefix) or "/../" in key or key.endswith("/..") or "//" in key:
            raise ScopeViolation(
                f"key {key!r} is outside person {self.person.person_id!r}'s prefix {self.person.prefix!r}; "
                "a stage may only touch its own person's artifacts"
            )
        return key

    def list(self, artifact: str, subfolder: str) -> list[str]:
        prefix = self._check(self.person.prefix + subfolder)
        return sorted(self.store.list_keys(artifact, prefix))

    def get(self, artifact: str, key: str) -> bytes:
        key = self._check(key)
        return self.store.get(artifact, key)

    def exists(self, artifact: str, key: str) -> bool:
        key = self._check(key)
        return self.store.exists(artifact, key)

    def put(self, artifact: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
            metadata: Mapping[str, str] | None = None) -> StoredObject:
        key = self._check(key)
        return self.store.put(artifact, key, data, content_type=content_type, metadata=metadata)
