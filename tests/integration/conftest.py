"""Integration fixtures: a real S3 server (SeaweedFS on loopback) and a real local Ray cluster."""

from __future__ import annotations

import base64
import secrets
import uuid

import pytest

from headshots.config import Config
from storage.seaweed import start_embedded_s3
from storage.store import ArtifactStore

from headshots.manifest import Consent

# The consent record every test batch carries (photos are accepted only with one).
TEST_CONSENT = Consent(collected_by="test-suite", given_at="2026-11-20")
TINY_TRAINING = {"steps": 6, "rank": 4, "learning_rate": 1e-3, "checkpoint_every": 3}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_embedded_s3(tmp_path_factory.mktemp("s3"), access_key="test" + secrets.token_hex(4),
                               secret_key=secrets.token_urlsafe(24))
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
