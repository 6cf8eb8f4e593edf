"""Module-scoped fixtures the multi-node test modules share: the config built from a module's own
``settings`` fixture (its cluster, buckets and training profile), the store and the key store on it."""

from __future__ import annotations

import pytest

from headshots.config import Config


@pytest.fixture(scope="module")
def config(settings) -> Config:
    return Config.from_dict(settings)


@pytest.fixture(scope="module")
def store(config):
    from storage.store import ArtifactStore

    artifact_store = ArtifactStore.from_config(config.store)
    artifact_store.ensure_buckets()
    return artifact_store


@pytest.fixture(scope="module")
def key_store(config, store):
    from storage.crypto import key_store_for

    return key_store_for(config, store)
