"""Crypto-erasure without a server: master key parsing, key wrapping, the key store's rules, the scope's
encryption and revocation, and where the master key comes from (config, local stack)."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import secrets
import stat
import types
import uuid

import pytest

from headshots import stack
from headshots.config import Config, ConfigError, load_config
from storage import barrier, crypto
from storage.crypto import (GENERATE_MASTER_KEY_COMMAND, KeyDestroyed, KeyDestructionIncomplete, KeyUnwrapError,
                            MasterKey, MasterKeyError, PersonKeyStore, key_object_key, key_store_for)
from storage.keys import PersonRef
from storage.scoped import PersonRevoked, PersonScope
from storage.store import ObjectExists, ObjectNotFound, StoreError

ADA = PersonRef("acme", "b1", "ada")
BOB = PersonRef("acme", "b1", "bob")


def _key_text() -> tuple[bytes, str]:
    raw = secrets.token_bytes(32)
    return raw, base64.b64encode(raw).decode()


class _MemoryStore:
    """Just enough of ArtifactStore for the key store: versioned objects, create-only writes."""

    def __init__(self):
        self.versions: dict[tuple[str, str], list[tuple[str, bytes | None]]] = {}  # newest last; None: marker
        self.gets = 0
        self.resurrect: bytes | None = None  # a writer that keeps putting the key back

    def bucket(self, artifact: str) -> str:
        return f"bucket-{artifact}"

    def _current(self, artifact: str, key: str) -> bytes | None:
        history = self.versions.get((artifact, key), [])
        return history[-1][1] if history else None

    def put(self, artifact, key, data, *, content_type="application/octet-stream", metadata=None, ssec=None,
            if_absent=False):
        if if_absent and self._current(artifact, key) is not None:
            raise ObjectExists("exists", bucket=self.bucket(artifact), key=key, code="PreconditionFailed")
        version_id = uuid.uuid4().hex
        self.versions.setdefault((artifact, key), []).append((version_id, data))
        return types.SimpleNamespace(key=key, version_id=version_id)

    def get(self, artifact, key, *, version_id=None, ssec=None):
        self.gets += 1
        history = self.versions.get((artifact, key), [])
        if version_id is not None:
            data = next((found for vid, found in history if vid == version_id), None)
        else:
            data = self._current(artifact, key)
        if data is None:
            raise ObjectNotFound("missing", bucket=self.bucket(artifact), key=key, code="NoSuchKey")
        return data

    def delete(self, artifact, key):
        self.versions.setdefault((artifact, key), []).append((uuid.uuid4().hex, None))

    def list_versions(self, artifact, prefix):
        return [(key, version_id, data is None) for (a, key), history in self.versions.items()
                if a == artifact and key.startswith(prefix) for version_id, data in history]

    def remove_version(self, artifact, key, *, version_id):
        history = self.versions[(artifact, key)]
        history[:] = [entry for entry in history if entry[0] != version_id]
        if self.resurrect is not None:
            history.append((uuid.uuid4().hex, self.resurrect))


def _md5(sse) -> str:
    """Identifies an SSE-C key the way S3 does, without handling the key itself."""
    return sse.headers()["X-Amz-Server-Side-Encryption-Customer-Key-MD5"]


# --- the master key ------------------------------------------------------------------------------


def test_master_key_parses_base64_of_32_bytes_and_ignores_surrounding_whitespace():
    raw, text = _key_text()
    assert MasterKey.from_base64(f"  {text}\n").key_id == MasterKey(raw).key_id


@pytest.mark.parametrize("text, problem", [
    ("", "is empty"),
    ("   \n", "is empty"),
    ("not base64 at all!", "not valid base64"),
    (base64.b64encode(b"k" * 16).decode(), "decodes to 16 bytes"),
    (base64.b64encode(b"k" * 33).decode(), "decodes to 33 bytes"),
])
def test_bad_master_key_names_the_setting_and_how_to_make_one_but_not_the_value(text, problem):
    with pytest.raises(MasterKeyError) as caught:
        MasterKey.from_base64(text)
    message = str(caught.value)
    assert "security.master_key" in message and problem in message
    assert GENERATE_MASTER_KEY_COMMAND in message
    if text.strip():
        assert text.strip() not in message


def test_master_key_never_shows_its_bytes():
    raw, text = _key_text()
    master = MasterKey(raw)
    for shown in (repr(master), str(master), f"{master}", repr(PersonKeyStore(_MemoryStore(), master))):
        assert text not in shown and raw.hex() not in shown and repr(raw) not in shown
        assert master.key_id in shown
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(master)


def test_master_key_id_tells_keys_apart_and_is_stable():
    raw, _ = _key_text()
    assert MasterKey(raw).key_id == MasterKey(raw).key_id
    assert MasterKey(raw).key_id != MasterKey(secrets.token_bytes(32)).key_id


# --- wrapping ------------------------------------------------------------------------------------


def test_wrap_round_trips_with_a_fresh_nonce_each_time():
    master = MasterKey(secrets.token_bytes(32))
    data_key = secrets.token_bytes(32)
    first = master.wrap(data_key, associated_data=ADA.prefix.encode())
    second = master.wrap(data_key, associated_data=ADA.prefix.encode())
    assert first != second and data_key not in first
    assert master.unwrap(first, associated_data=ADA.prefix.encode()) == data_key
    assert master.unwrap(second, associated_data=ADA.prefix.encode()) == data_key


def test_a_wrapped_key_for_one_person_does_not_unwrap_as_another():
    master = MasterKey(secrets.token_bytes(32))
    wrapped = master.wrap(secrets.token_bytes(32), associated_data=ADA.prefix.encode())
    with pytest.raises(KeyUnwrapError):
        master.unwrap(wrapped, associated_data=BOB.prefix.encode())


def test_unwrap_refuses_another_master_key_and_any_altered_byte():
    master = MasterKey(secrets.token_bytes(32))
    wrapped = master.wrap(secrets.token_bytes(32), associated_data=b"x")
    with pytest.raises(KeyUnwrapError, match="does not open with master key"):
        MasterKey(secrets.token_bytes(32)).unwrap(wrapped, associated_data=b"x")
    for position in (0, len(wrapped) // 2, len(wrapped) - 1):
        altered = bytearray(wrapped)
        altered[position] ^= 1
        with pytest.raises(KeyUnwrapError):
            master.unwrap(bytes(altered), associated_data=b"x")
    with pytest.raises(KeyUnwrapError, match="truncated"):
        master.unwrap(wrapped[:12], associated_data=b"x")


# --- the key store ---------------------------------------------------------------------------------


def test_key_is_created_once_stored_wrapped_and_read_back_by_another_process():
    store, master = _MemoryStore(), MasterKey(secrets.token_bytes(32))
    created = PersonKeyStore(store, master).key_for(ADA, create=True)
    document = store.get("state", key_object_key(ADA))
    assert key_object_key(ADA) == "_system/keys/acme/b1/ada.json"
    assert created.headers()["X-Amz-Server-Side-Encryption-Customer-Key"].encode() not in document
    assert _md5(PersonKeyStore(store, master).key_for(ADA)) == _md5(created)
    assert _md5(PersonKeyStore(store, master).key_for(ADA, create=True)) == _md5(created)
    assert len(store.versions[("state", key_object_key(ADA))]) == 1


def test_a_missing_key_is_destroyed_unless_creating():
    key_store = PersonKeyStore(_MemoryStore(), MasterKey(secrets.token_bytes(32)))
    with pytest.raises(KeyDestroyed, match="destroyed by a deletion.*unrecoverable by design") as caught:
        key_store.key_for(ADA)
    assert isinstance(caught.value, PermissionError) and caught.value.person == ADA


def test_a_store_failure_is_not_reported_as_a_destroyed_key():
    class Down(_MemoryStore):
        def get(self, artifact, key, **kwargs):
            raise StoreError("cannot read object: store unreachable", bucket="b", key=key)

    with pytest.raises(StoreError, match="unreachable"):
        PersonKeyStore(Down(), MasterKey(secrets.token_bytes(32))).key_for(ADA, create=True)


def test_losing_a_creation_race_uses_the_winners_key():
    store, master = _MemoryStore(), MasterKey(secrets.token_bytes(32))
    winner = PersonKeyStore(store, master)
    # The loser reads before the winner writes (finds nothing), then its create-only write finds the
    # winner's key: it must use that one, and leave a single version.
    loser_store = _MemoryStore()
    loser_store.versions = store.versions
    reads = {"n": 0}
    original_get = loser_store.get

    def first_read_misses(artifact, key, **kwargs):
        reads["n"] += 1
        if reads["n"] == 1:
            winner.key_for(ADA, create=True)
            raise ObjectNotFound("missing", bucket="b", key=key)
        return original_get(artifact, key, **kwargs)

    loser_store.get = first_read_misses
    assert _md5(PersonKeyStore(loser_store, master).key_for(ADA, create=True)) == _md5(winner.key_for(ADA))
    assert len(store.versions[("state", key_object_key(ADA))]) == 1


def test_a_key_document_replayed_onto_another_person_does_not_open():
    store, master = _MemoryStore(), MasterKey(secrets.token_bytes(32))
    PersonKeyStore(store, master).key_for(ADA, create=True)
    store.put("state", key_object_key(BOB), store.get("state", key_object_key(ADA)))
    with pytest.raises(KeyUnwrapError, match="copied from another person"):
        PersonKeyStore(store, master).key_for(BOB)


def test_another_master_key_cannot_open_the_person_key_and_says_which_wrapped_it():
    store, master = _MemoryStore(), MasterKey(secrets.token_bytes(32))
    PersonKeyStore(store, master).key_for(ADA, create=True)
    other = MasterKey(secrets.token_bytes(32))
    with pytest.raises(KeyUnwrapError, match=f"master key '{master.key_id}'.*is '{other.key_id}'"):
        PersonKeyStore(store, other).key_for(ADA)


def test_malformed_key_document_is_refused():
    store = _MemoryStore()
    store.put("state", key_object_key(ADA), b'{"format": "something-else"}')
    with pytest.raises(KeyUnwrapError, match="malformed"):
        PersonKeyStore(store, MasterKey(secrets.token_bytes(32))).key_for(ADA)


def test_destroy_removes_every_version_and_delete_marker_and_forgets_the_cached_key():
    store, master = _MemoryStore(), MasterKey(secrets.token_bytes(32))
    key_store = PersonKeyStore(store, master)
    key_store.key_for(ADA, create=True)
    key_store.key_for(BOB, create=True)
    store.delete("state", key_object_key(ADA))  # a stray plain delete left a marker
    store.put("state", key_object_key(ADA), b"stray")  # and someone wrote over it
    receipt = key_store.destroy(ADA)
    left = store.list_versions("state", key_object_key(ADA))
    assert receipt == {"bucket": "bucket-state", "key": key_object_key(ADA), "versions_destroyed": 3,
                       "tombstone_version_id": left[0][1]}
    # One version is left: the tombstone, which holds no key material.
    assert len(left) == 1 and crypto.key_material_versions(store, key_object_key(ADA)) == []
    assert b"wrapped_key" not in store.get("state", key_object_key(ADA))
    with pytest.raises(KeyDestroyed):
        key_store.key_for(ADA)  # not served from the cache
    assert key_store.key_for(BOB)  # nobody else's key was touched
    assert key_store.destroy(ADA)["versions_destroyed"] == 1  # idempotent: only the older tombstone goes
    assert crypto.key_material_versions(store, key_object_key(ADA)) == []


def test_a_destroyed_key_can_never_be_created_again():
    store = _MemoryStore()
    key_store = PersonKeyStore(store, MasterKey(secrets.token_bytes(32)))
    key_store.key_for(ADA, create=True)
    key_store.destroy(ADA)
    # An upload racing the deletion (or arriving after it) asks for the person's first key: refused,
    # by the store's create-only write against the tombstone, in this process and in any other.
    for process in (key_store, PersonKeyStore(store, key_store.master)):
        with pytest.raises(KeyDestroyed):
            process.key_for(ADA, create=True)
    assert crypto.key_material_versions(store, key_object_key(ADA)) == []
    # A person who never had a key gets the tombstone too: no key can be made for them afterwards.
    key_store.destroy(BOB)
    with pytest.raises(KeyDestroyed):
        key_store.key_for(BOB, create=True)


def test_destroy_fails_loudly_when_the_key_keeps_coming_back():
    store = _MemoryStore()
    key_store = PersonKeyStore(store, MasterKey(secrets.token_bytes(32)))
    key_store.key_for(ADA, create=True)
    store.resurrect = b"written again by a writer the deletion did not stop"
    with pytest.raises(KeyDestructionIncomplete, match="still has versions"):
        key_store.destroy(ADA)


def test_cache_is_bounded_and_forget_drops_keys():
    store = _MemoryStore()
    key_store = PersonKeyStore(store, MasterKey(secrets.token_bytes(32)), cache_entries=2)
    persons = [PersonRef("acme", "b1", f"p{i}") for i in range(3)]
    for person in persons:
        key_store.key_for(person, create=True)
    reads = store.gets
    key_store.key_for(persons[2])
    key_store.key_for(persons[1])
    assert store.gets == reads  # the two most recent come from memory
    key_store.key_for(persons[0])
    assert store.gets == reads + 1  # the oldest was evicted
    key_store.forget(persons[0])
    key_store.key_for(persons[0])
    assert store.gets == reads + 2
    key_store.forget_all()
    key_store.key_for(persons[1])
    assert store.gets == reads + 3
    with pytest.raises(ValueError, match="forget_all"):
        key_store.forget("")


def test_forget_by_prefix_reaches_a_person_a_batch_or_a_tenant():
    store = _MemoryStore()
    key_store = PersonKeyStore(store, MasterKey(secrets.token_bytes(32)))
    persons = [PersonRef("acme", "b1", "ada"), PersonRef("acme", "b1", "ada-x"), PersonRef("acme", "b2", "ada"),
               PersonRef("other", "b1", "ada")]
    for person in persons:
        key_store.key_for(person, create=True)
    assert key_store.forget(persons[0]) == 1 and key_store.forget(persons[0]) == 0
    assert key_store.forget("acme/b1/ada-x/") == 1  # a prefix never matches a longer id
    for person in persons[:2]:
        key_store.key_for(person)
    assert key_store.forget("acme/b1/ada") == 1  # the trailing slash is implied
    assert key_store.forget("acme/") == 2 and key_store.forget("other/b1/") == 1
    with pytest.raises(ValueError, match="cache_entries"):
        PersonKeyStore(store, MasterKey(secrets.token_bytes(32)), cache_entries=0)


def test_key_store_for_follows_the_security_section(caplog):
    _, text = _key_text()
    assert key_store_for(Config.from_dict({"security": {"master_key": text, "encrypt_person_artifacts": False}}),
                         _MemoryStore()) is None
    assert isinstance(key_store_for(Config.from_dict({"security": {"master_key": text}}), _MemoryStore()),
                      PersonKeyStore)
    # Encryption fails closed: no master key is an error naming the setting, never silent plaintext.
    with pytest.raises(crypto.MasterKeyError, match="security.master_key is empty.*encrypt_person_artifacts: false"):
        key_store_for(Config(), _MemoryStore())
    crypto._warned_unencrypted.clear()
    caplog.clear()
    plaintext = Config.from_dict({"security": {"encrypt_person_artifacts": False}})
    with caplog.at_level(logging.WARNING, logger="storage.crypto"):
        assert key_store_for(plaintext, _MemoryStore()) is None
        assert key_store_for(plaintext, _MemoryStore()) is None
    warnings = [r.getMessage() for r in caplog.records if "WITHOUT crypto-erasure" in r.getMessage()]
    assert len(warnings) == 1 and "security.master_key" in warnings[0]


# --- the scope ---------------------------------------------------------------------------------------


class _RecordingStore:
    def __init__(self):
        self.calls: list[tuple] = []
        self.barriers: set[str] = set()

    def put(self, artifact, key, data, **kwargs):
        self.calls.append(("put", artifact, kwargs.get("ssec")))
        return types.SimpleNamespace(key=key, version_id=f"v{len(self.calls)}")

    def get(self, artifact, key, **kwargs):
        self.calls.append(("get", artifact, kwargs.get("ssec")))
        return b""

    def exists(self, artifact, key, **kwargs):
        if key.startswith(barrier.BARRIERS_PREFIX):
            return key in self.barriers  # the deletion barrier: asked after every write, not recorded
        self.calls.append(("exists", artifact, kwargs.get("ssec")))
        return True

    def remove_version(self, artifact, key, *, version_id):
        self.calls.append(("remove", artifact, version_id))


class _RecordingKeys:
    def __init__(self):
        self.asked: list[tuple[str, bool]] = []

    def key_for(self, person, *, create=False):
        self.asked.append((person.person_id, create))
        return f"key-of-{person.person_id}"


def test_scope_encrypts_uploads_derived_and_models_and_only_an_upload_creates_the_key():
    store, key_store = _RecordingStore(), _RecordingKeys()
    scope = PersonScope(store, ADA, key_store=key_store)
    for artifact in ("uploads", "derived", "models", "outputs", "state"):
        scope.put(artifact, f"{ADA.prefix}x", b"data")
        scope.get(artifact, f"{ADA.prefix}x")
        scope.exists(artifact, f"{ADA.prefix}x")
    encrypted = {(op, artifact) for op, artifact, ssec in store.calls if ssec == "key-of-ada"}
    assert encrypted == {(op, a) for op in ("put", "get", "exists") for a in ("uploads", "derived", "models")}
    assert all(ssec is None for _, artifact, ssec in store.calls if artifact in ("outputs", "state"))
    assert ("ada", True) in key_store.asked and key_store.asked.count(("ada", True)) == 1


def test_scope_without_a_key_store_passes_no_key():
    store = _RecordingStore()
    PersonScope(store, ADA).put("uploads", f"{ADA.prefix}uploads/000.jpg", b"x")
    assert store.calls == [("put", "uploads", None)]


def test_revoked_scope_refuses_every_write_before_a_key_or_object_is_made():
    store, key_store = _RecordingStore(), _RecordingKeys()
    deleting = {"now": False}
    scope = PersonScope(store, ADA, key_store=key_store, revoked=lambda: deleting["now"])
    scope.put("derived", f"{ADA.prefix}crops/000.png", b"x")
    deleting["now"] = True
    for artifact in ("uploads", "derived", "models", "outputs"):
        with pytest.raises(PersonRevoked, match="being deleted") as caught:
            scope.put(artifact, f"{ADA.prefix}x", b"x")
        assert isinstance(caught.value, PermissionError)
    assert store.calls == [("put", "derived", "key-of-ada")] and key_store.asked == [("ada", False)]
    assert scope.get("derived", f"{ADA.prefix}crops/000.png") == b""  # reading is still allowed


def test_a_write_that_lands_after_the_deletion_barrier_is_removed_again_and_refused():
    store, key_store = _RecordingStore(), _RecordingKeys()
    scope = PersonScope(store, ADA, key_store=key_store)  # a process the deletion never told (no revoked)
    scope.put("uploads", f"{ADA.prefix}uploads/000.jpg", b"x")
    store.barriers.add(barrier.barrier_key(ADA))  # the deletion starts while this writer is mid-write
    for artifact in ("uploads", "derived", "models", "outputs"):
        store.calls.clear()
        with pytest.raises(barrier.PersonDeleted, match="has been deleted") as caught:
            scope.put(artifact, f"{ADA.prefix}x", b"x")
        assert isinstance(caught.value, PersonRevoked)  # stages treat it like a revocation
        assert store.calls[0][:2] == ("put", artifact)
        assert store.calls[1] == ("remove", artifact, "v1"), "the version written must be removed"
    other = PersonScope(store, BOB, key_store=key_store)
    assert other.put("uploads", f"{BOB.prefix}uploads/000.jpg", b"x") is not None  # only ADA's barrier


# --- config and the local stack ----------------------------------------------------------------------


def test_security_config_from_yaml_and_environment_never_echoes_the_key(tmp_path):
    _, text = _key_text()
    config = load_config(environ={"HEADSHOTS_HOME": str(tmp_path), "HEADSHOTS_SECURITY_MASTER_KEY": text,
                                  "HEADSHOTS_SECURITY_ENCRYPT_PERSON_ARTIFACTS": "false"})
    assert config.security.master_key == text and config.security.encrypt_person_artifacts is False
    assert text not in repr(config)
    assert Config().security.encrypt_person_artifacts is True and Config().store.server_side_encryption is False
    bad = text[:-8]
    with pytest.raises(ConfigError, match="security.master_key") as caught:
        Config.from_dict({"security": {"master_key": bad}})
    assert bad not in str(caught.value)
    with pytest.raises(ConfigError, match="security.master_key must be a string.*not shown"):
        Config.from_dict({"security": {"master_key": 1234567}})


def test_local_stack_generates_a_private_master_key_once_and_fills_it_in(tmp_path):
    config = Config(home=str(tmp_path / "home"))
    info = stack.StackInfo(s3_endpoint="127.0.0.1:9999", ray_address="127.0.0.1:6379")
    resolved = stack.effective_config(config, info)
    path = tmp_path / "home" / "master-key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert MasterKey.from_base64(resolved.security.master_key)
    assert resolved.security.master_key == path.read_text().strip()
    assert stack.effective_config(config, info).security.master_key == resolved.security.master_key
    assert resolved.store.server_side_encryption is True
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".master-key")] == []


def test_a_configured_master_key_or_store_is_left_alone(tmp_path):
    _, text = _key_text()
    info = stack.StackInfo(s3_endpoint="127.0.0.1:9999", ray_address="127.0.0.1:6379")
    own_key = Config.from_dict({"home": str(tmp_path / "a"), "security": {"master_key": text}})
    assert stack.effective_config(own_key, info).security.master_key == text
    own_store = Config.from_dict({"home": str(tmp_path / "b"), "store": {"endpoint": "127.0.0.1:9000"}})
    resolved = stack.effective_config(own_store, info)
    assert resolved.security.master_key == "" and resolved.store.server_side_encryption is False
    assert not (tmp_path / "b" / "master-key").exists()
