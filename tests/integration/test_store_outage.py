"""The S3 server goes away for 30 s and comes back: every store call waits it out, nothing is lost.

Uses the session's server (restarted in place on the same ports and data), so it also proves that the
fixtures every other test uses survive a restart.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from storage.state import PersonState, StateStore

DOWN_S = 30.0


def test_every_store_call_waits_out_a_30_s_outage_and_no_data_is_lost(s3_server, store, tenant, caplog):
    states = StateStore(store)
    prefix = f"{tenant}/b1/ada/"
    before = store.put("outputs", prefix + "headshots/office/0-1.png", b"written before the outage")
    person = PersonState(tenant=tenant, batch_id="b1", person_id="ada", name="Ada Lovelace")
    states.save_person(person)
    old_pid, endpoint = s3_server.pid, s3_server.endpoint
    assert store.outage_tolerance_s > DOWN_S + 15

    s3_server.restart_after(DOWN_S)  # returns with the server stopped; it is back DOWN_S later
    down_at = time.monotonic()

    def save_state_with_compare_and_swap() -> str:
        person.state = "ingesting"
        states.save_person(person)  # If-Match: the etag from before the outage
        return person.etag

    def call_midway(call):
        def later():
            time.sleep(DOWN_S / 2)  # a call that starts in the middle of the outage
            return call()
        return later

    calls = {
        "put": lambda: store.put("outputs", prefix + "headshots/office/1-2.png", b"written during the outage"),
        "get": lambda: store.get("outputs", before.key),
        "list_keys": lambda: sorted(store.list_keys("outputs", prefix)),
        "list_versions": lambda: store.list_versions("outputs", prefix),
        "exists": lambda: store.exists("outputs", before.key),
        "save_person": save_state_with_compare_and_swap,
        "get_midway": call_midway(lambda: store.get("outputs", before.key)),
    }
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = {name: pool.submit(call) for name, call in calls.items()}
            results = {name: future.result(timeout=store.outage_tolerance_s + 30) for name, future in futures.items()}
    waited_s = time.monotonic() - down_at

    server = s3_server.wait_until_back(timeout_s=60)
    assert server.endpoint == endpoint and server.pid != old_pid and s3_server.pid == server.pid
    assert waited_s >= DOWN_S - 1, "the calls should have waited for the server"
    assert any("retrying" in record.getMessage() for record in caplog.records)

    assert results["get"] == results["get_midway"] == b"written before the outage"
    assert results["exists"] is True
    during = results["put"]
    assert store.get("outputs", during.key, version_id=during.version_id) == b"written during the outage"
    # Listings started before the server came back: complete when they return.
    assert before.key in results["list_keys"]
    assert (before.key, before.version_id, False) in results["list_versions"]
    # The compare-and-swap write landed once, over the document from before the outage.
    loaded = states.load_person(tenant, "b1", "ada")
    assert loaded.state == "ingesting" and loaded.etag == results["save_person"]
    assert len(store.list_versions("state", f"{tenant}/b1/ada/")) == 2
    # Data from before the outage is all still there, every version of it.
    assert store.get("outputs", before.key, version_id=before.version_id) == b"written before the outage"
    assert sorted(store.list_keys("outputs", prefix)) == sorted([before.key, during.key])
