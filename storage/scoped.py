"""Person-scoped access: the only way workers read or write a person's artifacts.

A fine-tune for person P must never read another person's photos (uploads are used only for that
person's own headshots). Rather than trusting every caller to build the right prefix, workers get a
:class:`PersonScope` bound to one person, and every key they pass is checked against it.

The scope is also where two deletion guarantees are enforced:
- with a key store, the person's uploads, crops and models are encrypted with their own data key
  (SSE-C, see :mod:`storage.crypto`), so destroying that key makes every copy unreadable;
- with ``revoked`` (the process's own knowledge) and the store's deletion barrier (everyone's, see
  :mod:`storage.barrier`), nothing more is written for a person once their deletion has started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from storage.barrier import PersonDeleted, PersonRevoked, confirm_write
from storage.keys import PersonRef
from storage.store import ArtifactStore, StoredObject

if TYPE_CHECKING:
    from minio.sse import SseCustomerKey

    from storage.crypto import PersonKeyStore

# The artifact classes that hold the person's face or something learnt from it, and that nobody
# outside the pipeline reads: encrypted with the person's own key. Outputs are downloaded by the
# customer and state/receipts are read by the system, so those use the server's encryption (SSE-S3).
ENCRYPTED_ARTIFACTS = ("uploads", "derived", "models")


class ScopeViolation(PermissionError):
    """A key outside the person's own prefix was asked for."""


class PersonScope:
    """Read/write a single person's artifacts.

    Args:
        store: the artifact store.
        person: whose artifacts these are.
        key_store: when given, reads and writes of ``ENCRYPTED_ARTIFACTS`` use the person's SSE-C data
            key; only a write to ``uploads`` may create it (the person's first photo).
        revoked: asked before every write; when it returns true the write is refused before anything
            (not even a data key) reaches the store.
    """

    def __init__(self, store: ArtifactStore, person: PersonRef, *, key_store: PersonKeyStore | None = None,
                 revoked: Callable[[], bool] | None = None):
        self.store = store
        self.person = person
        self.key_store = key_store
        self.revoked = revoked

    def _check(self, key: str) -> str:
        # Ids cannot contain '/' or '..', so a plain prefix test is exact; normalise anyway to refuse
        # keys such as 'acme/b/p/../q/uploads/000.jpg' that some servers would resolve.
        if not key.startswith(self.person.prefix) or "/../" in key or key.endswith("/..") or "//" in key:
            raise ScopeViolation(
                f"key {key!r} is outside person {self.person.person_id!r}'s prefix {self.person.prefix!r}; "
                "a stage may only touch its own person's artifacts"
            )
        return key

    def _encryption(self, artifact: str, *, create: bool = False) -> dict[str, SseCustomerKey]:
        """``{"ssec": key}`` for the person's encrypted classes, else ``{}``.

        Raises:
            storage.crypto.KeyDestroyed: the person's key is gone (they were deleted).
        """
        if self.key_store is None or artifact not in ENCRYPTED_ARTIFACTS:
            return {}
        return {"ssec": self.key_store.key_for(self.person, create=create)}

    def list(self, artifact: str, subfolder: str) -> list[str]:
        prefix = self._check(self.person.prefix + subfolder)
        return sorted(self.store.list_keys(artifact, prefix))

    def get(self, artifact: str, key: str) -> bytes:
        """Read one of the person's objects (decrypted with their key where it is encrypted).

        Raises:
            ScopeViolation: ``key`` is not the person's.
            storage.crypto.KeyDestroyed: the object is encrypted and the person's key was destroyed.
            storage.store.StoreError: the read failed.
        """
        key = self._check(key)
        return self.store.get(artifact, key, **self._encryption(artifact))

    def exists(self, artifact: str, key: str) -> bool:
        key = self._check(key)
        return self.store.exists(artifact, key, **self._encryption(artifact))

    def put(self, artifact: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
            metadata: Mapping[str, str] | None = None, if_absent: bool = False) -> StoredObject:
        """Write one of the person's objects (encrypted with their key for ``ENCRYPTED_ARTIFACTS``).

        Args:
            if_absent: create only (see :meth:`ArtifactStore.put`): two writers racing for one key
                cannot both land.

        Raises:
            ScopeViolation: ``key`` is not the person's.
            PersonRevoked: the person's deletion has started (this process was told); nothing was written.
            storage.barrier.PersonDeleted: the person's deletion barrier was up once the write landed;
                the version written was removed again.
            storage.crypto.KeyDestroyed: a write for a person whose key is gone (never created anew).
            storage.store.StoreError: the write failed.
        """
        key = self._check(key)
        # Checked before the data key is fetched or created, so a revoked person gets no new key either.
        if self.revoked is not None and self.revoked():
            raise PersonRevoked(
                f"person {self.person.prefix} is being deleted: nothing more may be written for them "
                f"(refused {artifact}:{key})")
        encryption = self._encryption(artifact, create=artifact == "uploads")
        written = self.store.put(artifact, key, data, content_type=content_type, metadata=metadata,
                                 if_absent=if_absent, **encryption)
        # After the write, never only before: see storage/barrier.py for why this order closes the race.
        return confirm_write(self.store, self.person, artifact, written)
