"""Hostile requests against the HTTP API (#17), over loopback against the session's real S3 server:
a forged Host header, key guessing, chunked oversize bodies, deeply nested JSON, and (on the shared
local Ray cluster) concurrent starts of one batch."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from headshots.api.auth import BAD_KEY_BURST, BAD_KEY_RATE_PER_S, TokenBuckets
from storage import keys
from tests.integration.api_fixtures import (TEST_MAX_REQUEST_BYTES, ApiServer, api_client, api_config,  # noqa: F401
                                            api_server, batch_body, new_tenant)
from tests.integration.ray_actors import remove_named_actors, wait_for

EVIL = "evil.example"
PUBLIC = "https://api.studio.example/headshots"


def _service(server: ApiServer):
    """The running app's Service (routes, store client, authenticator)."""
    return server.server.config.app.state.service


def _ada_batch() -> dict:
    body = batch_body("Ada Lovelace")
    body["persons"][0]["id"] = "ada-lovelace"
    return body


def _forged_host_requests(http: httpx.Client, batch_id: str) -> list[httpx.Response]:
    """Requests that make the API hand out a URL: a trailing-slash redirect (with and without a
    query, and of a POST), and a self-service deletion link."""
    return [http.get("/v1/batches/"), http.get("/v1/batches/?limit=1"), http.post("/v1/batches/", json={}),
            http.get(f"/v1/batches/{batch_id}/"),
            http.post(f"/v1/batches/{batch_id}/persons/ada-lovelace/deletion-link")]


def _assert_host_not_reflected(answers: list[httpx.Response], base: str) -> None:
    for answer in answers:
        shown = answer.text + json.dumps(dict(answer.headers))
        assert EVIL not in shown, (answer.request.url, answer.status_code, shown[:500])
    redirects, link = answers[:-1], answers[-1]
    for answer in redirects:
        assert answer.status_code == 307, answer.text
        assert answer.headers["location"].startswith(base + "/v1/batches"), answer.headers["location"]
    assert redirects[1].headers["location"] == base + "/v1/batches?limit=1"
    assert link.status_code == 201, link.text
    assert link.json()["url"].startswith(base + "/v1/self-service/delete?token="), link.json()["url"]


def test_a_forged_host_header_is_never_reflected_without_a_public_base_url(api_server, store):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=_ada_batch()).json()["batch_id"]
    forged = {"Host": EVIL, "X-Forwarded-Host": EVIL, "Forwarded": f"host={EVIL};proto=https"}
    with api_client(api_server, api_key, **forged) as http:
        answers = _forged_host_requests(http, batch_id)
    # Unset api.public_base_url: the server's own address (what the socket was bound to).
    _assert_host_not_reflected(answers, api_server.url)


def test_urls_use_the_configured_public_base_url(api_config, store):
    config = api_config.replace(api=dataclasses.replace(api_config.api, public_base_url=PUBLIC + "/"))
    server = ApiServer(config).start()
    try:
        _, api_key = new_tenant(store)
        with api_client(server, api_key) as http:
            batch_id = http.post("/v1/batches", json=_ada_batch()).json()["batch_id"]
        with api_client(server, api_key, Host=EVIL) as http:
            _assert_host_not_reflected(_forged_host_requests(http, batch_id), PUBLIC)
            # Paths that exist neither way are the router's 404, not a redirect.
            missing = http.get("/v1/nothing-here/")
            assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    finally:
        server.stop()


def test_invalid_keys_are_rate_limited_per_client_address(api_config, store):
    server = ApiServer(api_config)
    now = [1000.0]
    _service(server).auth.failures = TokenBuckets(clock=lambda: now[0])  # time stands still unless moved
    server.start()
    try:
        _, known_key = new_tenant(store)
        _, fresh_key = new_tenant(store)
        _, other_key = new_tenant(store)
        guessed = {"Authorization": "Bearer hs_0123456789abcdef_" + "x" * 43}
        with api_client(server, known_key) as http:
            assert http.get("/v1/batches").status_code == 200  # this process has verified it
            for attempt in range(BAD_KEY_BURST):
                answer = http.get("/v1/batches", headers=guessed)
                assert answer.status_code == 401 and answer.json()["code"] == "invalid_api_key", (attempt, answer.text)
            limited = http.get("/v1/batches", headers=guessed)
            assert limited.status_code == 429, limited.text
            assert limited.json()["code"] == "too_many_invalid_keys" and limited.json()["field"] == "Authorization"
            assert int(limited.headers["Retry-After"]) >= 1
            # Another made-up key, or a real one this process never saw: the same answer, so a throttled
            # guesser learns nothing (and costs no store read).
            assert http.get("/v1/batches", headers={"Authorization": "Bearer nonsense"}).status_code == 429
            assert http.get("/v1/batches", headers={"Authorization": f"Bearer {fresh_key}"}).status_code == 429
            # A key verified before still works from the same address, within its tenant's own limit.
            assert http.get("/v1/batches").status_code == 200
        # Another client address has its own allowance.
        elsewhere = httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                                 headers={"Authorization": f"Bearer {other_key}"}, timeout=60)
        with elsewhere:
            assert elsewhere.get("/v1/batches", headers=guessed).status_code == 401
            assert elsewhere.get("/v1/batches").status_code == 200
        # The allowance refills at BAD_KEY_RATE_PER_S: one more attempt once a token is due, then 429 again.
        now[0] += 1.0 / BAD_KEY_RATE_PER_S
        with api_client(server, None) as http:
            assert http.get("/v1/batches", headers=guessed).status_code == 401
            assert http.get("/v1/batches", headers=guessed).status_code == 429
    finally:
        server.stop()


def _chunks(prefix: bytes, size: int, suffix: bytes):
    """A body of about ``size`` bytes as a generator: httpx sends it chunked, without Content-Length."""
    yield prefix
    for _ in range(size // 8192 + 1):
        yield b"x" * 8192
    yield suffix


@pytest.mark.parametrize("path, authenticated", [("/v1/batches", True), ("/v1/self-service/delete", False)])
def test_a_chunked_json_body_over_the_cap_answers_413(api_server, store, path, authenticated):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key if authenticated else None) as http:
        answer = http.post(path, content=_chunks(b'{"batch": "', 2 * TEST_MAX_REQUEST_BYTES, b'"}'),
                           headers={"Content-Type": "application/json"})
        assert answer.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in answer.request.headers
        assert answer.status_code == 413, answer.text
        assert answer.json() == {"code": "body_too_large", "field": "body", "message": "a request body may be at "
                                 f"most {TEST_MAX_REQUEST_BYTES} bytes (api.max_request_bytes)"}
        # A chunked body under the cap is read as usual.
        small = http.post(path, content=_chunks(b'{"batch": "', 1024, b'"}'),
                          headers={"Content-Type": "application/json"})
        assert small.status_code in (400, 403, 422) and small.json()["code"] != "body_too_large", small.text


def test_deeply_nested_or_wide_json_is_bounded(api_server, store):
    _, api_key = new_tenant(store)
    depth = (TEST_MAX_REQUEST_BYTES - 1024) // 2
    nested = json.dumps(batch_body("Ada"))[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    wide = {**batch_body(*[f"Person {i}" for i in range(3000)])}
    with api_client(api_server, api_key) as http:
        deep = http.post("/v1/batches", content=nested.encode(), headers={"Content-Type": "application/json"})
        assert deep.status_code in (400, 413, 422) and deep.json()["code"] in ("invalid_request", "invalid_manifest")
        too_many = http.post("/v1/batches", json=wide)
        assert too_many.status_code in (413, 422), too_many.text
        assert http.get("/v1/batches").status_code == 200  # and the server is fine


# --- concurrent starts (real Ray) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack_actors(ray_cluster, api_config):
    from cluster.actors import existing_gpu_workers, get_or_create_coordinator

    namespace = api_config.ray.namespace
    remove_named_actors(ray_cluster, namespace)  # earlier modules' actors run with other configs
    coordinator = get_or_create_coordinator(api_config, metrics_port=None)
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 60, "the GPU workers")
    yield coordinator
    remove_named_actors(ray_cluster, namespace)


def _states_written(store, key: str) -> list[str]:
    """The ``state`` of every stored version of a state document, oldest first."""
    versions = [version for found, version, is_marker in store.list_versions("state", key)
                if found == key and not is_marker]
    return [json.loads(store.get("state", key, version_id=version))["state"] for version in reversed(versions)]


def test_concurrent_starts_answer_200_or_409_and_start_the_batch_once(stack_actors, api_server, store):
    tenant, api_key = new_tenant(store)
    starters = 4
    persons = [f"Person {i}" for i in range(6)]  # no photos: each is set to needs_photos by the start
    for attempt in range(3):
        with api_client(api_server, api_key) as http:
            created = http.post("/v1/batches", json=batch_body(*persons, name=f"Race {attempt}"))
            assert created.status_code == 201, created.text
        batch = created.json()
        batch_id, person_ids = batch["batch_id"], [p["person_id"] for p in batch["persons"]]
        together = threading.Barrier(starters)

        def start(_: int) -> httpx.Response:
            with api_client(api_server, api_key) as client:
                client.get("/v1/batches", params={"limit": 1})  # connected before the race starts
                together.wait(timeout=60)
                return client.post(f"/v1/batches/{batch_id}/start")

        with ThreadPoolExecutor(starters) as pool:
            answers = list(pool.map(start, range(starters)))
        statuses = [answer.status_code for answer in answers]
        assert all(status in (200, 409) for status in statuses), [(a.status_code, a.text) for a in answers]
        assert 200 in statuses
        for answer in answers:
            if answer.status_code == 200:
                assert answer.json() == {"tenant": tenant, "batch_id": batch_id, "state": "running"}
            else:
                assert set(answer.json()) >= {"code", "message", "field"} and answer.json()["code"] in (
                    "conflict", "invalid_state"), answer.text
        with api_client(api_server, api_key) as http:
            wait_for(lambda: http.get(f"/v1/batches/{batch_id}").json()["state"] == "done", 120,
                     "the raced batch to end")
        # Started once: one request moved the batch to running and each person to needs_photos.
        written = _states_written(store, keys.batch_state_key(tenant, batch_id))
        assert written.count("running") == 1 and written[-1] == "done", written
        for person_id in person_ids:
            person_states = _states_written(store, keys.person_state_key(keys.PersonRef(tenant, batch_id, person_id)))
            assert person_states.count("needs_photos") == 1, (person_id, person_states)
