"""The HTTP API driving real batches on the shared local Ray cluster: a studio's client in a second
process, early deletion with receipts, self-service deletion links, cancellation."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from storage import keys
from storage.deletion import count_versions
from tests.integration.api_fixtures import (ADA, EXAMPLES, GRACE, api_client, api_config,  # noqa: F401
                                            api_server, batch_body, new_tenant, photo_bytes)
from tests.integration.ray_actors import remove_named_actors, wait_for
from tests.integration.webhook_receiver import Receiver

STUDIO_CLIENT = Path(__file__).resolve().parent / "scripts" / "studio_client.py"


@pytest.fixture(scope="module")
def stack_actors(ray_cluster, api_config):
    """The coordinator and retention controller, built with this module's config."""
    from cluster.actors import existing_gpu_workers, get_or_create_coordinator, get_or_create_retention_controller

    namespace = api_config.ray.namespace
    remove_named_actors(ray_cluster, namespace)  # earlier modules' actors run with other configs
    coordinator = get_or_create_coordinator(api_config, metrics_port=None)
    wait_for(lambda: len(existing_gpu_workers(namespace)) == 2, 60, "the GPU workers")
    controller = get_or_create_retention_controller(api_config, metrics_port=None)
    yield coordinator, controller
    remove_named_actors(ray_cluster, namespace)


def test_a_studio_submits_polls_and_downloads_from_another_process(stack_actors, api_server, store, tmp_path):
    tenant, api_key = new_tenant(store)
    output_zip = tmp_path / "headshots.zip"
    completed = subprocess.run([sys.executable, str(STUDIO_CLIENT), api_server.url, api_key,
                                str(EXAMPLES / "grace-hopper"), str(output_zip)],
                               capture_output=True, text=True, timeout=500)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout)
    assert summary["state"] == "done" and summary["persons"][0]["state"] == "done", summary
    with zipfile.ZipFile(output_zip) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    assert "grace/office/" in " ".join(names) and "manifest.json" in names and "grace/contact-sheet.png" in names
    assert sorted(summary["files"]) == sorted(names)

    # The studio then deletes the person (keeping the headshots) and reads the receipt.
    batch_id = summary["batch_id"]
    ref = keys.PersonRef(tenant, batch_id, "grace")
    with api_client(api_server, api_key) as http:
        deleted = http.delete(f"/v1/batches/{batch_id}/persons/grace")
        assert deleted.status_code == 200, deleted.text
        result = deleted.json()
        assert result["objects_deleted"] > 0 and result["include_outputs"] is False
        receipt = http.get(f"/v1/receipts/{result['receipt_id']}")
        assert receipt.status_code == 200 and receipt.json()["verification"]["listing_count"] == 0
        assert {p["person_id"] for p in receipt.json()["persons"]} == {"grace"}
        listed = http.get("/v1/receipts", params={"batch_id": batch_id}).json()["receipts"]
        assert [r["receipt_id"] for r in listed] == [result["receipt_id"]]
        status = http.get(f"/v1/batches/{batch_id}").json()
        assert status["persons"][0]["state"] == "deleted"
        # Headshots stay downloadable: the person was deleted without ?include_outputs=true.
        again = http.get(f"/v1/batches/{batch_id}/download").json()
        assert any(f["path"].startswith("grace/office/") for f in again["files"])
    for artifact in ("uploads", "derived", "models"):
        assert count_versions(store, artifact, ref.prefix) == 0, artifact
    assert count_versions(store, "outputs", ref.prefix) > 0


def test_a_batch_created_over_http_with_webhooks_announces_its_completion_signed(stack_actors, api_server, store):
    from cluster.webhooks import verify_signature
    from headshots import tenants

    tenant, api_key = new_tenant(store)
    receiver = Receiver()
    try:
        with api_client(api_server, api_key) as http:
            body = {**batch_body("Grace Hopper"), "webhooks": [{"url": receiver.url, "events": ["batch.completed"]}]}
            created = http.post("/v1/batches", json=body)
            assert created.status_code == 201, created.text
            batch_id = created.json()["batch_id"]
            uploaded = http.post(f"/v1/batches/{batch_id}/persons/{GRACE}/photos",
                                 files=[("photos", (name, data, "image/jpeg")) for name, data in photo_bytes(count=4)])
            assert uploaded.status_code == 201, uploaded.text
            assert http.post(f"/v1/batches/{batch_id}/start").status_code == 200
            request = receiver.wait_for(1, timeout_s=300)[0]
        event = json.loads(request["body"])
        assert event["type"] == "batch.completed"
        assert event["data"] == {"tenant": tenant, "batch_id": batch_id, "state": "done",
                                 "persons_by_state": {"done": 1}}
        secret = tenants.load_tenant(store, tenant).webhook_secret
        headers = request["headers"]
        assert verify_signature(secret, headers["X-Headshots-Timestamp"], request["body"],
                                headers["X-Headshots-Signature"])
        assert headers["X-Headshots-Event"] == "batch.completed"
    finally:
        receiver.close()


def test_a_person_waiting_for_photos_is_retried_then_gets_more_headshots(stack_actors, api_server, store):
    tenant, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Grace Hopper")).json()["batch_id"]
        person = f"/v1/batches/{batch_id}/persons/{GRACE}"

        def grace() -> dict:
            status = http.get(f"/v1/batches/{batch_id}").json()
            return {"batch": status["state"], **status["persons"][0]}

        # Started with no photos: the person waits in needs_photos and the batch ends without them.
        assert http.post(f"/v1/batches/{batch_id}/start").status_code == 200
        wait_for(lambda: grace()["batch"] == "done", 60, "the batch to end")
        assert grace()["state"] == "needs_photos"
        early = http.post(f"{person}/more", json={"count": 1})
        assert early.status_code == 409 and early.json()["code"] == "invalid_state"
        uploaded = http.post(f"{person}/photos", files=[("photos", (name, data, "image/jpeg"))
                                                        for name, data in photo_bytes(count=4)])
        assert uploaded.status_code == 201 and uploaded.json()["photos_accepted"] == 4, uploaded.text

        retried = http.post(f"{person}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json() == {"tenant": tenant, "batch_id": batch_id, "person_id": GRACE,
                                  "state": "queued"}
        wait_for(lambda: grace()["batch"] == "done" and grace()["state"] == "done", 120, "the retried person")
        assert grace()["headshots"] == 1

        more = http.post(f"{person}/more", json={"count": 1, "style": "office"})
        assert more.status_code == 200, more.text
        assert more.json()["added_per_style"] == {"office": 1}
        wait_for(lambda: grace()["batch"] == "done" and grace()["state"] == "done" and grace()["headshots"] == 2,
                 120, "the extra headshot")
        files = http.get(f"/v1/batches/{batch_id}/download").json()["files"]
        assert len([f for f in files if f["path"].startswith(f"{GRACE}/office/")]) == 2
    # Done again: the batch has left the open-batch index (the coordinator dropped its marker).
    assert not store.exists("state", keys.open_batch_key(tenant, batch_id))


def test_a_deletion_link_lets_the_person_delete_themselves_once(stack_actors, api_server, store):
    tenant, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Ada Lovelace")).json()["batch_id"]
        name, data = photo_bytes(count=1)[0]
        http.put(f"/v1/batches/{batch_id}/persons/{ADA}/photos/{name}", content=data,
                 headers={"Content-Type": "image/jpeg"})
        link = http.post(f"/v1/batches/{batch_id}/persons/{ADA}/deletion-link")
        assert link.status_code == 201, link.text
        token = link.json()["token"]
        assert link.json()["url"].endswith(f"/v1/self-service/delete?token={token}")
    ref = keys.PersonRef(tenant, batch_id, ADA)
    assert count_versions(store, "uploads", ref.prefix) == 1
    with api_client(api_server, None) as anonymous:  # the person pictured has no API key
        forged = anonymous.post("/v1/self-service/delete", json={"token": token[:-4] + "AAAA"})
        assert forged.status_code == 403 and forged.json()["code"] == "invalid_token"
        first = anonymous.post("/v1/self-service/delete", json={"token": token})
        assert first.status_code == 200, first.text
        assert first.json()["already_deleted"] is False and first.json()["objects_deleted"] >= 1
        second = anonymous.post(f"/v1/self-service/delete?token={token}")
        assert second.json() == {"receipt_id": first.json()["receipt_id"], "objects_deleted": 0,
                                 "already_deleted": True}
    assert count_versions(store, "uploads", ref.prefix) == 0
    with api_client(api_server, api_key) as http:
        receipt = http.get(f"/v1/receipts/{first.json()['receipt_id']}").json()
        assert receipt["requested_by"] == "self-service"


def test_an_expired_deletion_link_is_refused(api_server, store):
    from headshots.api.app import _sign

    server_secret = api_server.server.config.app.state.service.link_secret()
    token = _sign(server_secret, {"v": 1, "t": "acme", "b": "b1", "p": "p1", "o": True, "exp": 1, "n": "00"})
    with api_client(api_server, None) as anonymous:
        expired = anonymous.post("/v1/self-service/delete", json={"token": token})
    assert expired.status_code == 403 and expired.json()["code"] == "token_expired"


def test_cancel_and_delete_a_batch_over_http(stack_actors, api_server, store):
    tenant, api_key = new_tenant(store)
    with api_client(api_server, api_key) as http:
        batch_id = http.post("/v1/batches", json=batch_body("Ada Lovelace", "Grace Hopper")).json()["batch_id"]
        for name, data in photo_bytes(count=1):
            http.put(f"/v1/batches/{batch_id}/persons/{GRACE}/photos/{name}", content=data,
                     headers={"Content-Type": "image/jpeg"})
        cancelled = http.post(f"/v1/batches/{batch_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert sorted(cancelled.json()["cancelled"]) == [ADA, GRACE]
        assert http.get(f"/v1/batches/{batch_id}").json()["state"] == "cancelled"
        assert not store.exists("state", keys.open_batch_key(tenant, batch_id)), "a cancelled batch is not open"
        refused = http.post(f"/v1/batches/{batch_id}/start")
        assert refused.status_code == 409 and refused.json()["code"] == "invalid_state"
        deleted = http.delete(f"/v1/batches/{batch_id}", params={"include_outputs": "true"})
        assert deleted.status_code == 200 and deleted.json()["persons"] == 2
        assert http.get(f"/v1/batches/{batch_id}").json()["state"] == "deleted"
    assert count_versions(store, "uploads", f"{tenant}/{batch_id}/") == 0
