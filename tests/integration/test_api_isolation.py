"""The HTTP API's tenant isolation, authentication, limits, idempotency and presigned downloads,
against the session's real S3 server (no Ray: nothing here starts a batch)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from headshots import tenants
from storage import keys
from storage.receipts import Receipt, new_receipt_id, save_receipt
from storage.state import HeadshotRecord, StateStore
from storage.store import utc_now_iso
from tests.integration.api_fixtures import (ADA, TEST_MAX_PHOTO_BYTES, TEST_MAX_REQUEST_BYTES,  # noqa: F401
                                            api_client, api_config, api_server, batch_body, new_tenant,
                                            photo_bytes)


@pytest.fixture(scope="module")
def two_tenants(api_server, store):
    """Tenants A and B, each with a batch (one person, one photo) and a receipt of their own."""
    found = {}
    for label in ("a", "b"):
        tenant, api_key = new_tenant(store)
        with api_client(api_server, api_key) as http:
            created = http.post("/v1/batches", json=batch_body("Ada Lovelace", name=f"Team {label}"))
            assert created.status_code == 201, created.text
            batch_id = created.json()["batch_id"]
            name, data = photo_bytes(count=1)[0]
            uploaded = http.put(f"/v1/batches/{batch_id}/persons/{ADA}/photos/{name}", content=data,
                                headers={"Content-Type": "image/jpeg"})
            assert uploaded.status_code == 201, uploaded.text
        receipt = Receipt(receipt_id=new_receipt_id("request"), kind="request", requested_by="test", policy={},
                          started_at=utc_now_iso(), as_of=utc_now_iso(),
                          persons=[{"tenant": tenant, "batch_id": batch_id, "person_id": ADA}])
        save_receipt(store, receipt)
        found[label] = {"tenant": tenant, "key": api_key, "batch_id": batch_id, "person_id": ADA,
                        "receipt_id": receipt.receipt_id, "photo": name}
    return found


def _requests_against(other: dict) -> list[tuple[str, str, dict]]:
    """Every endpoint, aimed at ``other``'s batch, person, photo and receipt."""
    b, p = other["batch_id"], other["person_id"]
    jpeg = photo_bytes(count=2)[1][1]
    return [
        ("GET", f"/v1/batches/{b}", {}),
        ("PUT", f"/v1/batches/{b}/persons/{p}/photos/new.jpg", {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}}),
        ("POST", f"/v1/batches/{b}/start", {}),
        ("POST", f"/v1/batches/{b}/cancel", {}),
        ("POST", f"/v1/batches/{b}/persons/{p}/cancel", {}),
        ("POST", f"/v1/batches/{b}/persons/{p}/retry", {}),
        ("POST", f"/v1/batches/{b}/persons/{p}/more", {"json": {"count": 1}}),
        ("GET", f"/v1/batches/{b}/download", {}),
        ("DELETE", f"/v1/batches/{b}/persons/{p}", {}),
        ("DELETE", f"/v1/batches/{b}/persons/{p}?include_outputs=true", {}),
        ("DELETE", f"/v1/batches/{b}", {}),
        ("POST", f"/v1/batches/{b}/persons/{p}/deletion-link", {}),
        ("GET", f"/v1/receipts/{other['receipt_id']}", {}),
        ("GET", f"/v1/receipts?batch_id={b}", {}),
        ("GET", f"/v1/receipts?batch_id={b}&person_id={p}", {}),
        ("GET", "/v1/batches", {}),
    ]


@pytest.mark.parametrize("actor,owner", [("a", "b"), ("b", "a")])
def test_a_tenant_key_never_reaches_another_tenants_data(api_server, two_tenants, store, actor, owner):
    me, other = two_tenants[actor], two_tenants[owner]
    with api_client(api_server, me["key"]) as http:
        for method, path, extra in _requests_against(other):
            response = http.request(method, path, **extra)
            text = response.text
            assert other["batch_id"] not in text.replace(path, "") or response.status_code == 404, (method, path, text)
            assert other["tenant"] not in text, (method, path, text)
            assert other["receipt_id"] not in text or response.status_code == 404, (method, path, text)
            if path in ("/v1/batches",) or path.startswith("/v1/receipts?"):
                # Listings answer, with the caller's own things only.
                assert response.status_code == 200, (method, path, text)
                assert other["batch_id"] not in text
            else:
                assert response.status_code in (403, 404), (method, path, response.status_code, text)
                assert set(response.json()) >= {"code", "message", "field"}
        # Naming the other tenant outright is refused.
        named = http.get(f"/v1/batches/{other['batch_id']}", headers={"X-Headshots-Tenant": other["tenant"]})
        assert named.status_code == 403 and named.json()["code"] == "forbidden"
        assert http.get(f"/v1/batches?tenant={other['tenant']}").status_code == 403
    # Nothing of the other tenant's changed: still created, one photo, no new receipt.
    batch = StateStore(store).load_batch(other["tenant"], other["batch_id"])
    person = StateStore(store).load_person(other["tenant"], other["batch_id"], other["person_id"])
    assert batch.state == "created" and person.photos_accepted == 1


def test_admin_key_acts_for_the_tenant_it_names(api_server, two_tenants, store):
    admin_key = tenants.create_admin_key(store)
    a = two_tenants["a"]
    with api_client(api_server, admin_key) as http:
        missing = http.get(f"/v1/batches/{a['batch_id']}")
        assert missing.status_code == 400 and missing.json()["field"] == "X-Headshots-Tenant"
        seen = http.get(f"/v1/batches/{a['batch_id']}", headers={"X-Headshots-Tenant": a["tenant"]})
        assert seen.status_code == 200 and seen.json()["tenant"] == a["tenant"]
        wrong = http.get(f"/v1/batches/{a['batch_id']}", headers={"X-Headshots-Tenant": two_tenants["b"]["tenant"]})
        assert wrong.status_code == 404


@pytest.mark.parametrize("bad_id", ["..", "..%2F..%2Fother", "%2e%2e", "UPPER", "a%00b", "a%0Ab", "-lead", "x" * 64,
                                    "a%2Fb", "caf%C3%A9"])
def test_path_traversal_and_invalid_ids_are_rejected(api_server, two_tenants, bad_id):
    a = two_tenants["a"]
    with api_client(api_server, a["key"]) as http:
        for path in (f"/v1/batches/{bad_id}", f"/v1/batches/{a['batch_id']}/persons/{bad_id}/photos/x.jpg",
                     f"/v1/batches/{bad_id}/download", f"/v1/receipts/{bad_id}",
                     f"/v1/batches/{a['batch_id']}/persons/{ADA}/photos/{bad_id}"):
            method = "PUT" if "/photos/" in path else "GET"
            response = http.request(method, path, content=b"x" if method == "PUT" else None)
            assert response.status_code in (404, 405, 422), (path, response.status_code, response.text)
            assert set(response.json()) >= {"code", "message", "field"}


def test_missing_wrong_and_revoked_keys_get_401(api_server, store):
    tenant, api_key = new_tenant(store)
    with api_client(api_server, None) as http:
        assert http.get("/v1/batches").status_code == 401
        assert http.get("/v1/batches", headers={"Authorization": "Bearer hs_0123456789abcdef_" + "x" * 43}).status_code == 401
        assert http.get("/v1/batches", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        assert http.get("/v1/batches", headers={"Authorization": f"Bearer {api_key}x"}).status_code == 401
        assert http.get("/v1/batches", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
        key_id = tenants.parse_api_key(api_key)[0]
        tenants.revoke_api_key(store, key_id)
        revoked = http.get("/v1/batches", headers={"Authorization": f"Bearer {api_key}"})
        assert revoked.status_code == 401 and revoked.json()["code"] == "invalid_api_key"
    record = tenants.load_tenant(store, tenant)
    assert api_key not in json.dumps(record.to_json()), "the key itself must never be stored"


def test_same_idempotency_key_same_body_same_batch_different_body_409(api_server, store):
    _, api_key = new_tenant(store)
    body = batch_body("Ada Lovelace", "Grace Hopper")
    with api_client(api_server, api_key) as http:
        first = http.post("/v1/batches", json=body, headers={"Idempotency-Key": "order-42"})
        again = http.post("/v1/batches", json=body, headers={"Idempotency-Key": "order-42"})
        assert first.status_code == again.status_code == 201
        assert first.json()["batch_id"] == again.json()["batch_id"]
        assert again.headers.get("Idempotent-Replayed") == "true"
        other = http.post("/v1/batches", json=batch_body("Someone Else"), headers={"Idempotency-Key": "order-42"})
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
        fresh = http.post("/v1/batches", json=body, headers={"Idempotency-Key": "order-43"})
        assert fresh.status_code == 201 and fresh.json()["batch_id"] != first.json()["batch_id"]
        assert len(http.get("/v1/batches").json()["batches"]) == 2


def test_concurrent_requests_with_one_idempotency_key_create_one_batch(api_server, store):
    _, api_key = new_tenant(store)
    body = batch_body("Ada Lovelace")

    def create(_):
        with api_client(api_server, api_key) as http:
            return http.post("/v1/batches", json=body, headers={"Idempotency-Key": "burst-1"})

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(create, range(6)))
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    assert len({r.json()["batch_id"] for r in responses}) == 1
    with api_client(api_server, api_key) as http:
        assert len(http.get("/v1/batches").json()["batches"]) == 1


def test_a_batch_over_the_api_takes_photos_one_by_one(api_server, store):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Ada Lovelace")).json()["batch_id"]
        path = f"/v1/batches/{batch_id}/persons/{ADA}/photos"
        (name, data), (_, other) = photo_bytes(count=2)
        assert http.put(f"{path}/{name}", content=data, headers={"Content-Type": "image/jpeg"}).status_code == 201
        repeat = http.put(f"{path}/{name}", content=data, headers={"Content-Type": "image/jpeg"})
        assert repeat.status_code == 200 and repeat.json()["stored"] is False, "a repeated PUT stores nothing new"
        clash = http.put(f"{path}/{name}", content=other, headers={"Content-Type": "image/jpeg"})
        assert clash.status_code == 409 and clash.json()["field"] == "filename"
        broken = http.put(f"{path}/broken.jpg", content=b"not an image at all", headers={"Content-Type": "image/jpeg"})
        assert broken.status_code == 422 and broken.json()["code"].startswith("photo_")
        status = http.get(f"/v1/batches/{batch_id}").json()
        assert status["state"] == "created" and status["persons"][0]["photos_accepted"] == 1
        unknown_person = http.put(f"/v1/batches/{batch_id}/persons/nobody/photos/{name}", content=data)
        assert unknown_person.status_code == 404


def test_a_multipart_upload_stores_several_photos_and_reports_each_file(api_server, store):
    tenant, api_key = new_tenant(store)
    (first, first_data), (second, second_data) = photo_bytes(count=2)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Ada Lovelace")).json()["batch_id"]
        path = f"/v1/batches/{batch_id}/persons/{ADA}/photos"
        files = [("photos", (first, first_data, "image/jpeg")), ("photos", (second, second_data, "image/jpeg")),
                 ("photos", ("broken.jpg", b"not an image at all", "image/jpeg")),
                 ("photos", ("bad name.jpg", first_data, "image/jpeg")),
                 ("photos", ("huge.jpg", b"\xff" * (TEST_MAX_PHOTO_BYTES + 1), "image/jpeg")),
                 ("comment", (None, b"hello"))]
        uploaded = http.post(path, files=files)
        assert uploaded.status_code == 201, uploaded.text
        result = uploaded.json()
        assert result["photos_added"] == 2 and result["photos_accepted"] == 2
        assert [(p["file"], p["stored"]) for p in result["photos"]] == [(first, True), (second, True)]
        reasons = {r["file"]: r["reason"] for r in result["photos_rejected"]}
        assert reasons == {"broken.jpg": "decode_failed", "bad name.jpg": "invalid_filename",
                           "huge.jpg": "too_large_file", "comment": "unexpected_field"}, reasons
        assert all(r["message"] for r in result["photos_rejected"])
        # The same files again store nothing new; one of them by PUT too (same name, same bytes).
        again = http.post(path, files=files[:2])
        assert again.status_code == 200 and again.json()["photos_added"] == 0
        assert [p["stored"] for p in again.json()["photos"]] == [False, False]
        repeat = http.put(f"{path}/{first}", content=first_data, headers={"Content-Type": "image/jpeg"})
        assert repeat.status_code == 200
        # Multipart belongs to POST; a body with no `photos` file is refused.
        wrong = http.put(f"{path}/{first}", files=files[:1])
        assert wrong.status_code == 422 and f"POST /v1/batches/{batch_id}/persons/{ADA}/photos" in \
            wrong.json()["message"]
        empty = http.post(path, files=[("other", ("x.jpg", first_data, "image/jpeg"))])
        assert empty.status_code == 422 and empty.json()["code"] == "no_photos"
        raw = http.post(path, content=first_data, headers={"Content-Type": "image/jpeg"})
        assert raw.status_code == 422 and raw.json()["code"] == "unsupported_content_type"
        assert http.get(f"/v1/batches/{batch_id}").json()["persons"][0]["photos_accepted"] == 2
    person = StateStore(store).load_person(tenant, batch_id, ADA)
    assert sorted(p.source for p in person.photos if p.accepted) == sorted([first, second])


def test_errors_are_json_with_code_message_and_field(api_server, store):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        unknown_style = http.post("/v1/batches", json=batch_body("Ada", styles=("no-such-style",)))
        assert unknown_style.status_code == 422
        assert unknown_style.json()["field"] == "styles" and "no-such-style" in unknown_style.json()["message"]
        body = batch_body("Ada")
        body["persons"][0]["photos"] = ["/etc/passwd"]
        photos = http.post("/v1/batches", json=body)
        assert photos.status_code == 422 and photos.json()["field"] == "persons[0].photos"
        missing = http.post("/v1/batches", json={"batch": "x"})
        assert missing.status_code == 422 and missing.json()["code"] == "invalid_request" and missing.json()["field"]
        model = http.post("/v1/batches", json={**batch_body("Ada"), "base_model": "/models/secret"})
        assert model.status_code == 422 and model.json()["field"] == "base_model"
        not_json = http.post("/v1/batches", content=b"{nope", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 422 and "JSON" in not_json.json()["message"]
        assert http.get("/v1/nothing-here").json()["code"] == "not_found"
        wrong_method = http.patch("/v1/batches")
        assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"


def test_request_size_caps_answer_413(api_server, store):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        huge = batch_body(*[f"Person {i}" for i in range(1)])
        huge["batch"] = "x" * (TEST_MAX_REQUEST_BYTES + 10)
        too_big = http.post("/v1/batches", json=huge)
        assert too_big.status_code == 413 and too_big.json()["code"] == "body_too_large"
        created = http.post("/v1/batches", json=batch_body("Ada")).json()
        # No id in the body: the answer lists the random id the person got.
        batch_id, ada = created["batch_id"], created["persons"][0]["person_id"]
        photo = http.put(f"/v1/batches/{batch_id}/persons/{ada}/photos/big.jpg", content=b"\xff" * (TEST_MAX_PHOTO_BYTES + 1),
                         headers={"Content-Type": "image/jpeg"})
        assert photo.status_code == 413 and photo.json()["field"] == "body"

        def chunked():  # no Content-Length: the cap applies while the body streams in
            for _ in range(TEST_MAX_PHOTO_BYTES // 65536 + 2):
                yield b"\xff" * 65536

        streamed = http.put(f"/v1/batches/{batch_id}/persons/{ada}/photos/big2.jpg", content=chunked(),
                            headers={"Content-Type": "image/jpeg"})
        assert streamed.status_code == 413


def test_rate_limit_and_concurrent_batch_limit_answer_429(api_server, store):
    _, slow_key = new_tenant(store, rate_limit_per_s=2)
    with api_client(api_server, slow_key) as http:
        statuses = [http.get("/v1/batches") for _ in range(10)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and statuses[0].status_code == 200
    assert limited[0].json()["code"] == "rate_limited" and int(limited[0].headers["Retry-After"]) >= 1
    tenant, one_batch_key = new_tenant(store, max_concurrent_batches=1)
    states = StateStore(store)
    with api_client(api_server, one_batch_key) as http:
        first = http.post("/v1/batches", json=batch_body("Ada")).json()["batch_id"]
        second = http.post("/v1/batches", json=batch_body("Grace"))
        assert second.status_code == 429 and second.json()["code"] == "too_many_batches"
        # A batch that reaches a final state frees its place (and leaves the open-batch index). Never
        # started, it can only be cancelled (or deleted): the state machine refuses created -> done.
        batch = states.load_batch(tenant, first)
        batch.state = "cancelled"
        states.save_batch(batch)
        assert not store.exists("state", keys.open_batch_key(tenant, first))
        third = http.post("/v1/batches", json=batch_body("Grace"))
        assert third.status_code == 201, third.text
        third_id = third.json()["batch_id"]
        # A marker left behind (a crash after the final write, or a writer not allowed to delete it) does
        # not hold the place: the count checks the batch and drops the marker.
        batch = states.load_batch(tenant, third_id)
        batch.state = "cancelled"
        states.save_batch(batch)
        store.put("state", keys.open_batch_key(tenant, third_id), b"", content_type="text/plain")
        assert http.post("/v1/batches", json=batch_body("Ada")).status_code == 201
        assert not store.exists("state", keys.open_batch_key(tenant, third_id))
    assert states.count_open_batches(tenant) == 1


def test_listing_is_paginated(api_server, store):
    _, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        created = {http.post("/v1/batches", json=batch_body("Ada", name=f"Team {i}")).json()["batch_id"]
                   for i in range(5)}
        seen, cursor, pages = [], None, 0
        while True:
            page = http.get("/v1/batches", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [row["batch_id"] for row in page["batches"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(created) and len(seen) == len(set(seen)) and pages == 3


def _deliver_fake_headshot(store, tenant: str, batch_id: str, person_id: str) -> str:
    """Put one 'headshot' in the outputs bucket and record it, as the pipeline would."""
    states = StateStore(store)
    person = states.load_person(tenant, batch_id, person_id)
    key = keys.headshot_key(person.ref, "office", 0, 1234)
    store.put("outputs", key, b"\x89PNG fake headshot bytes", content_type="image/png")
    person.headshots.append(HeadshotRecord(style="office", index=0, seed=1234, key=key, prompt="p",
                                           negative_prompt="n", seconds=0.1))
    states.save_person(person)
    return key


def test_presigned_urls_work_until_expiry_then_403_and_404_once_deleted(api_server, store):
    tenant, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Ada Lovelace")).json()["batch_id"]
        key = _deliver_fake_headshot(store, tenant, batch_id, ADA)
        short = http.get(f"/v1/batches/{batch_id}/download", params={"expires_in_s": 3}).json()
        long = http.get(f"/v1/batches/{batch_id}/download").json()
    assert long["expires_in_s"] == 900, "the default expiry is 15 minutes"
    [headshot] = [f for f in short["files"] if f["path"] == f"{ADA}/office/000-1234.png"]
    assert httpx.get(headshot["url"]).content == b"\x89PNG fake headshot bytes"
    archive = httpx.get(short["zip"]["url"])
    assert archive.status_code == 200
    assert zipfile.ZipFile(io.BytesIO(archive.content)).read(f"{ADA}/office/000-1234.png").startswith(b"\x89PNG")
    time.sleep(4.5)
    assert httpx.get(headshot["url"]).status_code == 403, "an expired URL must be refused"
    still_valid = [f for f in long["files"] if f["path"] == headshot["path"]][0]["url"]
    assert httpx.get(still_valid).status_code == 200
    for listed_key, version_id, _ in store.list_versions("outputs", key):
        store.remove_version("outputs", listed_key, version_id=version_id)
    assert httpx.get(still_valid).status_code == 404, "a deleted object's URL must find nothing"


def test_presigned_urls_use_the_public_endpoint(api_config, store):
    import dataclasses

    from headshots.api.app import Service

    public = api_config.replace(store=dataclasses.replace(api_config.store, public_endpoint="files.studio.example",
                                                          public_secure=True))
    url = Service(public).presign("t/b/p/headshots/office/000-1.png", 60)
    assert url.startswith("https://files.studio.example/") and "X-Amz-Expires=60" in url
