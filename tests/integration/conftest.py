"""Integration fixtures: a real S3 server (SeaweedFS on loopback) and a real local Ray cluster."""

from __future__ import annotations

import base64
import secrets
import uuid
from concurrent.futures import Future

import pytest

from headshots.config import Config
from storage.seaweed import EmbeddedS3, restart_after, start_embedded_s3
from storage.store import ArtifactStore

from headshots.manifest import Consent

# The consent record every test batch carries (photos are accepted only with one).
TEST_CONSENT = Consent(collected_by="test-suite", given_at="2026-11-20")
TINY_TRAINING = {"steps": 6, "rank": 4, "learning_rate": 1e-3, "checkpoint_every": 3}


class SessionS3:
    """The session's S3 server, restartable in place.

    Reads like an :class:`~storage.seaweed.EmbeddedS3` (``endpoint``, ``access_key``, ``pid``, ...,
    always of the current process). ``restart_after`` takes it down for a while and brings it back on
    the same ports with the same data and credentials, so every config, store and Ray actor built
    from it keeps working once it is back.
    """

    def __init__(self, server: EmbeddedS3):
        self.server = server
        self._restarting: Future | None = None

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def restart_after(self, down_s: float, *, crash: bool = False) -> Future:
        """Stop the server now (SIGKILL with ``crash``), start it again ``down_s`` seconds later in
        the background. The future resolves to the new handle (this object then reads from it)."""
        if self._restarting is not None and not self._restarting.done():
            raise RuntimeError("the session S3 server is already restarting")
        self._restarting = restart_after(self.server, down_s, crash=crash)

        def adopt(done: Future) -> None:
            if done.exception() is None:
                self.server = done.result()

        self._restarting.add_done_callback(adopt)
        return self._restarting

    def wait_until_back(self, timeout_s: float = 120.0) -> EmbeddedS3:
        """Block until a restart has finished (raises if the server did not come back)."""
        if self._restarting is not None:
            # Set here too: a waiter can wake before the future's callback has run.
            self.server = self._restarting.result(timeout=timeout_s)
        return self.server

    def stop(self) -> None:
        if self._restarting is not None:
            try:
                self.wait_until_back()
            except Exception:
                pass  # nothing came back to stop
        self.server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SessionS3:
    server = SessionS3(start_embedded_s3(tmp_path_factory.mktemp("s3"), access_key="test" + secrets.token_hex(4),
                                         secret_key=secrets.token_urlsafe(24)))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_config(s3_server, tmp_path_factory) -> Config:
    suffix = uuid.uuid4().hex[:6]
    return Config.from_dict({
        "home": str(tmp_path_factory.mktemp("home")),
        "store": {"endpoint": s3_server.endpoint, "access_key": s3_server.access_key,
                  "secret_key": s3_server.secret_key,
                  **{f"bucket_{a}": f"it-{suffix}-{a}" for a in
                     ("uploads", "derived", "models", "outputs", "state", "receipts")}},
        "training": TINY_TRAINING,
        "generation": {"batch_size": 2},
        # Person artifacts encrypted with per-person keys, as in every real deployment.
        "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
    })


@pytest.fixture(scope="session")
def key_store(base_config, store):
    from storage.crypto import key_store_for

    return key_store_for(base_config, store)


def read_version(store, key_store, artifact: str, key: str, version_id: str | None = None) -> bytes:
    """Read any artifact as the system does: person classes with the person's own SSE-C key."""
    from storage.keys import PersonRef
    from storage.scoped import ENCRYPTED_ARTIFACTS

    ssec = None
    if artifact in ENCRYPTED_ARTIFACTS:
        tenant, batch_id, person_id = key.split("/")[:3]
        ssec = key_store.key_for(PersonRef(tenant, batch_id, person_id))
    return store.get(artifact, key, version_id=version_id, ssec=ssec)


@pytest.fixture(scope="session")
def store(base_config) -> ArtifactStore:
    artifact_store = ArtifactStore.from_config(base_config.store)
    artifact_store.ensure_buckets()
    return artifact_store


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test: tests share buckets but never prefixes."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, namespace="headshots-tests",
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
