"""Crypto-erasure: per-person data keys, wrapped by a master key, destroyed first on deletion.

Deleting every version of every object is the first line of deletion; this module is the second. A
person's uploads, crops, training cache, checkpoints and LoRA are written with SSE-C under a random
32-byte *data key* of their own. The S3 server never stores that key (only a salted MAC to check it),
so every copy of those objects — a replica, a backup, a version a sweep missed, a disk taken out of a
server — is readable only while the data key exists. Deleting the person destroys the key first;
from then on, whatever escaped is noise.

Data keys are kept in the ``state`` bucket under ``_system/keys/<tenant>/<batch>/<person>.json``,
wrapped with AES-256-GCM by the master key from ``security.master_key``. The associated data is the
person's key prefix, so a wrapped key copied onto another person's key object does not unwrap.

Who calls what:
- the edge (:func:`headshots.client.upload_person`) creates the key with the person's first upload;
- workers read it through :class:`storage.scoped.PersonScope`;
- deletion calls :meth:`PersonKeyStore.destroy` *before* it removes the objects, and workers drop
  their cached copy with :meth:`PersonKeyStore.forget`. A destroyed key object keeps one version, a
  *destroyed* tombstone without key material: creation is create-only, so once a key has been
  destroyed no writer (an upload racing the deletion, a worker with a stale job) can ever make the
  person a new one, and whatever it would have encrypted stays unwritten.

No function here logs, returns in an error or puts in a ``repr`` any key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections import OrderedDict
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from minio.sse import SseCustomerKey

from storage.keys import SYSTEM_PREFIX, PersonRef
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, StoreError, utc_now_iso

logger = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12  # the GCM standard nonce; random per wrap (a master key wraps far fewer than 2**32 keys)
KEY_DOCUMENT_FORMAT = "headshots-data-key/1"
# What a destroyed key object holds from then on: no key material, only the fact. Key creation is
# create-only, so this version is what makes a destroyed key impossible to create again.
DESTROYED_DOCUMENT_FORMAT = "headshots-data-key-destroyed/1"
KEY_ARTIFACT = "state"
KEYS_PREFIX = f"{SYSTEM_PREFIX}/keys/"
DEFAULT_CACHE_ENTRIES = 1024
# destroy() lists again after each pass; a version that keeps coming back means someone is still
# writing the key, which the deletion path must stop first (PersonScope's `revoked`).
DESTROY_MAX_PASSES = 5
GENERATE_MASTER_KEY_COMMAND = (
    'python -c "import secrets,base64;print(base64.b64encode(secrets.token_bytes(32)).decode())"'
)


class MasterKeyError(ValueError):
    """``security.master_key`` is not a usable key. The message never contains the value."""


class KeyDestroyed(PermissionError):
    """The person's data key does not exist: a deletion destroyed it (or it was never created)."""

    def __init__(self, person: PersonRef):
        super().__init__(
            f"the data key of person {person.prefix} does not exist: it was destroyed by a deletion (or never "
            "created), so this person's encrypted uploads, crops and models are unrecoverable by design"
        )
        self.person = person


class KeyUnwrapError(PermissionError):
    """A stored data key cannot be unwrapped: another master key, or a key document not made for this person."""


class KeyDestructionIncomplete(StoreError):
    """Versions of a key object were still listed after every destruction pass."""


# --- the master key ----------------------------------------------------------------------------


class MasterKey:
    """The key that wraps every person's data key (AES-256-GCM).

    ``repr`` and ``str`` show only :attr:`key_id`, a one-way fingerprint that tells operators which
    master key wrapped a data key without revealing it.

    Args:
        key: 32 random bytes.

    Raises:
        MasterKeyError: ``key`` is not 32 bytes.
    """

    __slots__ = ("_aead", "key_id")

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            length = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise MasterKeyError(f"security.master_key must be {KEY_BYTES} bytes but is {length}; "
                                 f"generate one with: {GENERATE_MASTER_KEY_COMMAND}")
        self._aead = AESGCM(bytes(key))
        self.key_id = hmac.new(bytes(key), b"headshots master key id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_base64(cls, text: str) -> "MasterKey":
        """Parse the ``security.master_key`` setting (base64 of 32 bytes; surrounding whitespace ignored).

        Raises:
            MasterKeyError: empty, not base64, or not 32 bytes; says how to generate a key.
        """
        how = f"generate one with: {GENERATE_MASTER_KEY_COMMAND}"
        if not isinstance(text, str) or not text.strip():
            raise MasterKeyError(f"security.master_key is empty; {how}")
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(f"security.master_key is not valid base64; {how}") from None
        if len(key) != KEY_BYTES:
            raise MasterKeyError(
                f"security.master_key must be base64 of {KEY_BYTES} bytes but decodes to {len(key)} bytes; {how}")
        return cls(key)

    def wrap(self, data_key: bytes, *, associated_data: bytes) -> bytes:
        """Encrypt ``data_key``; returns nonce ‖ ciphertext ‖ tag.

        Args:
            data_key: the key to protect.
            associated_data: bound to the result; :meth:`unwrap` must be given the same bytes.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, bytes(data_key), associated_data)

    def unwrap(self, wrapped: bytes, *, associated_data: bytes) -> bytes:
        """Decrypt what :meth:`wrap` returned.

        Raises:
            KeyUnwrapError: another master key wrapped it, it was altered, or ``associated_data`` differs.
        """
        if len(wrapped) <= NONCE_BYTES:
            raise KeyUnwrapError("the wrapped key is truncated")
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise KeyUnwrapError(
                f"the wrapped key does not open with master key {self.key_id}: it was wrapped by another "
                "master key, altered, or made for another person") from None

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would put the key into Ray's object store or a log of task arguments: refuse, and
        # pass the config (or build the key where it is used) instead.
        raise TypeError("a MasterKey cannot be pickled; build it from security.master_key where it is used")


# --- per-person data keys ------------------------------------------------------------------------


def key_object_key(person: PersonRef) -> str:
    """Where the person's wrapped data key lives in the ``state`` bucket."""
    return f"{KEYS_PREFIX}{person.tenant}/{person.batch_id}/{person.person_id}.json"


def _associated_data(person: PersonRef) -> bytes:
    return person.prefix.encode()


class PersonKeyStore:
    """Create, read and destroy per-person data keys.

    Keys read or created are cached in this process (least recently used first out, at most
    ``cache_entries``), so a fine-tune writing a checkpoint every few steps does not fetch its key each
    time. The cache is exactly what a deletion must reach: call :meth:`forget` (or :meth:`forget_all`)
    in every process that may hold the person's key.

    Thread-safe.

    Args:
        store: the artifact store (key objects go to its ``state`` bucket).
        master: wraps and unwraps the data keys.
        cache_entries: how many persons' keys to keep in memory.
    """

    def __init__(self, store: ArtifactStore, master: MasterKey, *, cache_entries: int = DEFAULT_CACHE_ENTRIES):
        if cache_entries < 1:
            raise ValueError(f"cache_entries must be at least 1 but is {cache_entries}")
        self.store = store
        self.master = master
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, SseCustomerKey] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PersonKeyStore(master={self.master!r}, cached={len(self._cache)})"

    def key_for(self, person: PersonRef, *, create: bool = False) -> SseCustomerKey:
        """The person's SSE-C key.

        Args:
            person: whose key.
            create: make the key if the person has none yet. Only the person's first upload may do this:
                everywhere else a missing key means the person was deleted, and creating a fresh key
                would only make the writer believe its data is readable.

        Returns:
            The key, ready to pass as ``ssec=`` to :class:`storage.store.ArtifactStore`.

        Raises:
            KeyDestroyed: the person has no key and ``create`` is false.
            KeyUnwrapError: the stored key does not open with this master key, or was made for someone else.
            StoreError: the store failed (a failure to read is never reported as a destroyed key).
        """
        cached = self._cached(person)
        if cached is not None:
            return cached
        try:
            return self._remember(person, self._read(person))
        except ObjectNotFound:
            if not create:
                raise KeyDestroyed(person) from None
        data_key = secrets.token_bytes(KEY_BYTES)
        try:
            # Create-only: of two processes racing to make the person's first key, the server lets
            # exactly one write; the other reads the winner's key. Two different keys for one person
            # would leave half of their uploads unreadable.
            self.store.put(KEY_ARTIFACT, key_object_key(person), self._document(person, data_key),
                           content_type="application/json", if_absent=True)
        except ObjectExists:
            try:
                return self._remember(person, self._read(person))
            except ObjectNotFound:  # the winner's key was destroyed in between: a deletion is running
                raise KeyDestroyed(person) from None
        logger.info("created the data key of %s (master key %s)", person.prefix, self.master.key_id)
        return self._remember(person, SseCustomerKey(data_key))

    def destroy(self, person: PersonRef) -> dict[str, Any]:
        """Destroy the person's data key: replace its key object by a *destroyed* tombstone, then remove
        every other version and delete marker.

        Idempotent. Lists again after each pass and only returns once the tombstone is the only version,
        so a version that a concurrent writer or a lagging listing brought back is not missed. Creation
        is create-only, so with the tombstone in place no key can be created for the person again.

        Args:
            person: whose key.

        Returns:
            ``{"bucket", "key", "versions_destroyed", "tombstone_version_id"}`` for the deletion receipt.

        Raises:
            KeyDestructionIncomplete: other versions were still listed after ``DESTROY_MAX_PASSES`` passes.
            StoreError: the store refused a write, a listing or a removal.
        """
        key = key_object_key(person)
        bucket = self.store.bucket(KEY_ARTIFACT)
        self.forget(person)
        # Written first, unconditionally: from here on every create-only key creation fails.
        tombstone = self.store.put(KEY_ARTIFACT, key, json.dumps({
            "format": DESTROYED_DOCUMENT_FORMAT, "destroyed_at": utc_now_iso()}, sort_keys=True).encode(),
            content_type="application/json")
        destroyed = 0
        for _ in range(DESTROY_MAX_PASSES):
            remaining = [(name, version_id) for name, version_id, _ in self.store.list_versions(KEY_ARTIFACT, key)
                         if name == key and version_id != tombstone.version_id]
            if not remaining:
                self.forget(person)  # a key_for() racing this call may have cached it meanwhile
                logger.info("destroyed the data key of %s (%d object versions)", person.prefix, destroyed)
                return {"bucket": bucket, "key": key, "versions_destroyed": destroyed,
                        "tombstone_version_id": tombstone.version_id}
            for name, version_id in remaining:
                # "null" is the version id S3 gives an object written before versioning was on.
                self.store.remove_version(KEY_ARTIFACT, name, version_id=version_id or "null")
                destroyed += 1
        raise KeyDestructionIncomplete(
            f"the data key of {person.prefix} still has versions after {DESTROY_MAX_PASSES} passes; stop "
            "every writer for this person and run the deletion again", bucket=bucket, key=key)

    def forget(self, person: PersonRef | str) -> int:
        """Drop cached keys from this process (a deletion has begun).

        Args:
            person: a person, or a key prefix: ``tenant/batch/person/`` drops that person's key,
                ``tenant/batch/`` every cached key of the batch, ``tenant/`` of the tenant.

        Returns:
            How many keys were dropped.
        """
        if isinstance(person, PersonRef):
            with self._lock:
                return 1 if self._cache.pop(person.prefix, None) is not None else 0
        prefix = person if person.endswith("/") else person + "/"
        if prefix == "/":
            raise ValueError("forget() needs a person or a non-empty key prefix; use forget_all() to drop every key")
        with self._lock:
            doomed = [cached for cached in self._cache if cached.startswith(prefix)]
            for cached in doomed:
                del self._cache[cached]
            return len(doomed)

    def forget_all(self) -> None:
        """Drop every cached key."""
        with self._lock:
            self._cache.clear()

    # --- internals -----------------------------------------------------------------------------

    def _cached(self, person: PersonRef) -> SseCustomerKey | None:
        with self._lock:
            found = self._cache.get(person.prefix)
            if found is not None:
                self._cache.move_to_end(person.prefix)
            return found

    def _remember(self, person: PersonRef, key: SseCustomerKey) -> SseCustomerKey:
        with self._lock:
            self._cache[person.prefix] = key
            self._cache.move_to_end(person.prefix)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return key

    def _document(self, person: PersonRef, data_key: bytes) -> bytes:
        wrapped = self.master.wrap(data_key, associated_data=_associated_data(person))
        return json.dumps({
            "format": KEY_DOCUMENT_FORMAT,
            "algorithm": "AES-256-GCM",
            "associated_data": "person key prefix",
            "master_key_id": self.master.key_id,
            "wrapped_key": base64.b64encode(wrapped).decode(),
            "created_at": utc_now_iso(),
        }, indent=1, sort_keys=True).encode()

    def _read(self, person: PersonRef) -> SseCustomerKey:
        raw = self.store.get(KEY_ARTIFACT, key_object_key(person))
        try:
            document = json.loads(raw)
            if isinstance(document, dict) and document.get("format") == DESTROYED_DOCUMENT_FORMAT:
                raise KeyDestroyed(person)
            if document.get("format") != KEY_DOCUMENT_FORMAT:
                raise ValueError(f"format is {document.get('format')!r}, not {KEY_DOCUMENT_FORMAT!r}")
            wrapped = base64.b64decode(document["wrapped_key"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
            raise KeyUnwrapError(f"the key document {key_object_key(person)} is malformed ({error})") from None
        try:
            data_key = self.master.unwrap(wrapped, associated_data=_associated_data(person))
        except KeyUnwrapError:
            raise KeyUnwrapError(
                f"the data key of {person.prefix} does not open: it was wrapped by master key "
                f"{document.get('master_key_id')!r} and security.master_key is {self.master.key_id!r} "
                "(a different master key), or the key document was copied from another person") from None
        return SseCustomerKey(data_key)


def key_material_versions(store: ArtifactStore, key: str) -> list[str | None]:
    """Version ids of a key object that may hold key material: every version but a destroyed tombstone
    (a deletion receipt verifies that this is empty). Old receipts' keys, removed whole, list nothing."""
    found = []
    for name, version_id, is_marker in store.list_versions(KEY_ARTIFACT, key):
        if name != key or is_marker:
            continue
        try:
            document = json.loads(store.get(KEY_ARTIFACT, key, version_id=version_id))
        except ObjectNotFound:
            continue  # removed between the listing and the read
        except ValueError:
            document = None
        if not (isinstance(document, dict) and document.get("format") == DESTROYED_DOCUMENT_FORMAT):
            found.append(version_id)
    return found


def key_store_for(config, store: ArtifactStore) -> PersonKeyStore | None:
    """The key store the config asks for, or None when person artifacts are not to be encrypted.

    Args:
        config: a :class:`headshots.config.Config` (its ``security`` section).
        store: the artifact store the keys live in.

    Returns:
        None only when ``security.encrypt_person_artifacts`` is explicitly off.

    Raises:
        MasterKeyError: ``security.master_key`` is empty or not a valid key. Encryption fails closed:
            faces are never stored without their per-person key just because a key was forgotten.
    """
    security = config.security
    if not security.encrypt_person_artifacts:
        _warn_unencrypted_once()
        return None
    if not security.master_key:
        raise MasterKeyError(
            "security.master_key is empty, so person artifacts cannot be encrypted: set it (for example with "
            f"HEADSHOTS_SECURITY_MASTER_KEY; generate one with: {GENERATE_MASTER_KEY_COMMAND}), or set "
            "security.encrypt_person_artifacts: false to store them without crypto-erasure")
    return PersonKeyStore(store, MasterKey.from_base64(security.master_key))


_warned_unencrypted = threading.Event()


def _warn_unencrypted_once() -> None:
    if not _warned_unencrypted.is_set():
        _warned_unencrypted.set()
        logger.warning(
            "security.encrypt_person_artifacts is off: person artifacts are stored WITHOUT crypto-erasure; "
            "set a security.master_key and turn it on (generate a key with: %s)", GENERATE_MASTER_KEY_COMMAND)
