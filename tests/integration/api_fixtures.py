"""The HTTP API on the session's S3 server: uvicorn in a thread on a free loopback port.

Import the fixtures into a test module (``from tests.integration.api_fixtures import *``).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from headshots import tenants

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
# Small caps so the size limits can be tested with small bodies.
TEST_MAX_REQUEST_BYTES = 64 * 1024
TEST_MAX_PHOTO_BYTES = 512 * 1024
# High enough that tests never meet it unless they mean to.
TEST_RATE_LIMIT_PER_S = 10_000.0


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ApiServer:
    """uvicorn serving ``create_app(config)`` in a thread of this process."""

    def __init__(self, config):
        import uvicorn

        from headshots.api.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="api-server")

    def start(self) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API server did not start in 30 s"
            assert self.thread.is_alive(), "the API server thread died while starting"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def api_config(base_config):
    from headshots.config import ApiConfig, WebhooksConfig

    # Webhook receivers in these tests listen on 127.0.0.1, which deliveries refuse unless allowed.
    return base_config.replace(api=ApiConfig(auth_cache_s=0, max_request_bytes=TEST_MAX_REQUEST_BYTES,
                                             max_photo_bytes=TEST_MAX_PHOTO_BYTES),
                               webhooks=WebhooksConfig(allow_private_addresses=True, first_retry_delay_s=0.05,
                                                       max_retry_delay_s=0.5))


@pytest.fixture(scope="module")
def api_server(api_config, store):
    server = ApiServer(api_config).start()
    yield server
    server.stop()


def new_tenant(store, *, rate_limit_per_s: float = TEST_RATE_LIMIT_PER_S, max_concurrent_batches: int = 50):
    """(tenant id, API key) of a fresh tenant."""
    record, api_key = tenants.create_tenant(store, "Studio " + uuid.uuid4().hex[:8], rate_limit_per_s=rate_limit_per_s,
                                            max_concurrent_batches=max_concurrent_batches)
    return record.tenant, api_key


def api_client(server: ApiServer, api_key: str | None, **headers: str) -> httpx.Client:
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


# Person ids a studio's own system gives (never a name); persons not listed here get random ids.
ADA, GRACE = "emp-1815", "emp-1906"
PERSON_IDS = {"Ada Lovelace": ADA, "Grace Hopper": GRACE}


def batch_body(*persons: str, name: str = "Team", styles=("office",), images_per_style: int = 1) -> dict:
    return {"batch": name, "base_model": "tiny", "styles": list(styles), "images_per_style": images_per_style,
            "consent": {"collected_by": "hr@studio.example", "given_at": "2026-11-20"},
            "persons": [{"name": person, **({"id": PERSON_IDS[person]} if person in PERSON_IDS else {})}
                        for person in persons]}


def photo_bytes(person: str = "grace-hopper", count: int = 4) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted((EXAMPLES / person).iterdir())[:count]]
