"""ArtifactStore under outages and races, against a scripted fake client (no server, fake clock)."""

from __future__ import annotations

import hashlib
import logging
import random
import ssl
import time

import pytest
import urllib3
from minio.error import ServerError

from headshots.config import ConfigError, StoreConfig, load_config
from storage.state import PersonState, StateConflict, StateStore
from storage.store import (RETRY_MAX_DELAY_S, ArtifactStore, ObjectExists, ObjectNotFound,
                           StoredObject, StoreError, StoreUnavailable, WriteConflict)

from tests.unit.store_fakes import BUCKETS, FakeClient, FakeClock, dropped, refused, s3_error


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def store(client, clock) -> ArtifactStore:
    return ArtifactStore(client, BUCKETS, outage_tolerance_s=30, sleep=clock.sleep, clock=clock,
                         rng=random.Random(7))


# --- outages ---------------------------------------------------------------------------------------

def test_a_read_waits_out_refused_connections_with_growing_jittered_backoff(store, client, clock):
    store.put("outputs", "t/b/p/x.png", b"png")
    client.fail["get_object"] = [refused() for _ in range(8)]
    assert store.get("outputs", "t/b/p/x.png") == b"png"
    assert client.calls["get_object"] == 9 and len(clock.sleeps) == 8
    for attempt, slept in enumerate(clock.sleeps):
        assert slept <= min(RETRY_MAX_DELAY_S, 0.25 * 2 ** attempt)
    assert max(clock.sleeps) > 0.25  # it does back off, not poll at a fixed rate


@pytest.mark.parametrize("busy", [s3_error("ServiceUnavailable", 503), s3_error("InternalError", 500),
                                  s3_error("SlowDown", 503), ServerError("no body", 503), dropped()],
                         ids=["ServiceUnavailable", "InternalError", "SlowDown", "bare-503", "dropped"])
def test_busy_answers_are_retried_and_warned_about_once(store, client, clock, busy, caplog):
    client.fail["put_object"] = [busy, busy, busy]
    with caplog.at_level(logging.INFO, logger="storage.store"):
        stored = store.put("outputs", "t/b/p/x.png", b"png")
    assert stored.version_id and stored.etag and client.calls["put_object"] == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
    assert "t/b/p" not in warnings[0].getMessage()  # bucket only: no keys, no error text


def test_an_outage_longer_than_the_tolerance_fails_naming_the_object_and_the_fix(store, client, clock):
    client.fail["get_object"] = [refused() for _ in range(1000)]
    with pytest.raises(StoreUnavailable) as caught:
        store.get("outputs", "t/b/p/x.png")
    message = str(caught.value)
    assert "bucket=b-outputs key=t/b/p/x.png" in message
    assert "unreachable or busy for 30 s" in message and "check store.endpoint" in message
    assert "NewConnectionError" in message and "store.outage_tolerance_s=30" in message
    assert clock.now - 1000.0 == pytest.approx(30.0)  # the last wait is cut to the deadline
    assert isinstance(caught.value, StoreError)


def test_real_answers_are_not_retried(store, client, clock):
    client.fail["get_object"] = [s3_error("AccessDenied", 403)]
    with pytest.raises(StoreError, match="AccessDenied") as caught:
        store.get("outputs", "t/b/p/x.png")
    assert not isinstance(caught.value, StoreUnavailable)
    with pytest.raises(ObjectNotFound):
        store.get("outputs", "t/b/p/missing.png")
    client.fail["put_object"] = [s3_error("InvalidArgument", 400)]
    with pytest.raises(StoreError, match="InvalidArgument"):
        store.put("uploads", "t/b/p/a.jpg", b"x")
    assert clock.sleeps == [] and client.calls["get_object"] == 2


def test_a_rejected_tls_certificate_is_a_setting_to_fix_not_an_outage(store, client, clock):
    bad_certificate = urllib3.exceptions.MaxRetryError(None, "/b/k", reason=urllib3.exceptions.SSLError(
        ssl.SSLCertVerificationError(1, "certificate verify failed")))
    client.fail["get_object"] = [bad_certificate]
    with pytest.raises(StoreError, match="store.ca_file"):
        store.get("outputs", "t/b/p/x.png")
    assert clock.sleeps == []


def test_exists_and_listings_ride_out_an_outage_and_return_complete_answers(store, client):
    for name in ("a", "b", "c", "d"):
        store.put("outputs", f"t/b/p/{name}", b"1")
    store.put("outputs", "t/b/p/a", b"2")
    client.fail["stat_object"] = [refused(), s3_error("ServiceUnavailable", 503)]
    assert store.exists("outputs", "t/b/p/a") is True
    assert store.exists("outputs", "t/b/p/zz") is False
    client.fail["list_objects"] = [refused()]
    client.fail["list_objects_after_two"] = [dropped()]  # fails after two keys were listed
    assert list(store.list_keys("outputs", "t/b/p/")) == ["t/b/p/a", "t/b/p/b", "t/b/p/c", "t/b/p/d"]
    client.fail["list_objects_after_two"] = [dropped()]
    versions = store.list_versions("outputs", "t/b/p/")
    assert len(versions) == 5 and len(set(versions)) == 5


def test_raw_client_calls_can_share_the_retries(store, clock):
    failures = [refused(), s3_error("SlowDown", 503)]

    def remove_many() -> list:
        if failures:
            raise failures.pop(0)
        return []

    assert store.with_retry(remove_many, artifact="outputs", key="t/b/p/", action="cannot remove") == []
    assert len(clock.sleeps) == 2
    with pytest.raises(StoreError, match=r"cannot remove: AccessDenied.*bucket=b-outputs key=t/b/p/"):
        store.with_retry(lambda: (_ for _ in ()).throw(s3_error("AccessDenied", 403)), artifact="outputs",
                         key="t/b/p/", action="cannot remove")


def test_the_tolerance_comes_from_config_and_env(monkeypatch):
    assert StoreConfig().outage_tolerance_s == 120.0
    config = load_config(environ={"HEADSHOTS_STORE_OUTAGE_TOLERANCE_S": "30", "HEADSHOTS_HOME": "/tmp/x"})
    assert config.store.outage_tolerance_s == 30.0
    store = ArtifactStore.from_config(StoreConfig(endpoint="127.0.0.1:9", outage_tolerance_s=7.5))
    assert store.outage_tolerance_s == 7.5
    with pytest.raises(ConfigError, match="store.outage_tolerance_s must be a number of seconds > 0 but is 0"):
        StoreConfig(outage_tolerance_s=0)


def test_with_a_real_client_one_attempt_fails_fast_and_the_deadline_holds():
    # Nothing listens on this port: each attempt is refused at once; the deadline ends the call.
    from storage.seaweed import pick_port_pairs

    port = pick_port_pairs(1)[0]
    store = ArtifactStore.from_config(StoreConfig(endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="s",
                                                  outage_tolerance_s=0.6))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable or busy for 1 s"):
        store.get("outputs", "t/b/p/x.png")
    assert time.monotonic() - started < 3.0


# --- conditional writes ----------------------------------------------------------------------------

def test_if_match_writes_only_over_the_expected_version(store, client):
    first = store.put("state", "t/b/p/state.json", b"one")
    data, etag = store.get_with_etag("state", "t/b/p/state.json")
    assert (data, etag) == (b"one", first.etag)
    second = store.put("state", "t/b/p/state.json", b"two", if_match=etag)
    assert second.etag != etag
    with pytest.raises(WriteConflict, match="no longer ETag") as caught:
        store.put("state", "t/b/p/state.json", b"three", if_match=etag)
    assert not isinstance(caught.value, ObjectExists) and caught.value.code == "PreconditionFailed"
    assert store.get("state", "t/b/p/state.json") == b"two"
    assert client.calls.get("get_object") == 2  # a conflict on the first attempt reads nothing back


@pytest.mark.parametrize("condition", ["if_match", "if_absent"])
def test_a_conditional_write_whose_answer_was_lost_counts_when_it_landed(store, client, condition):
    before = store.put("state", "t/b/p/state.json", b"old") if condition == "if_match" else None
    client.fail["_put_object"] = [("after", dropped())]  # lands, then the connection drops
    kwargs = {"if_match": before.etag} if before else {"if_absent": True}
    stored = store.put("state", "t/b/p/state.json", b"new", **kwargs)
    data, etag = store.get_with_etag("state", "t/b/p/state.json")
    assert data == b"new" and stored.etag == etag and stored.sha256 == hashlib.sha256(b"new").hexdigest()
    assert len(client.versions[("b-state", "t/b/p/state.json")]) == (2 if before else 1)  # written once


@pytest.mark.parametrize("condition", ["if_match", "if_absent"])
def test_a_lost_answer_then_another_writer_is_still_a_conflict(store, client, condition):
    before = store.put("state", "t/b/p/state.json", b"old") if condition == "if_match" else None

    def another_writer_wins_and_our_answer_is_lost():
        client._write("b-state", "t/b/p/state.json", b"theirs")
        raise s3_error("ServiceUnavailable", 503)

    client.fail["_put_object"] = [another_writer_wins_and_our_answer_is_lost]
    kwargs = {"if_match": before.etag} if before else {"if_absent": True}
    with pytest.raises(ObjectExists if condition == "if_absent" else WriteConflict):
        store.put("state", "t/b/p/state.json", b"ours", **kwargs)
    assert store.get("state", "t/b/p/state.json") == b"theirs"


def test_if_absent_and_if_match_together_are_refused(store):
    with pytest.raises(ValueError, match="if_absent or if_match"):
        store.put("state", "k", b"x", if_absent=True, if_match="e")


def test_records_without_an_etag_still_load():
    old = {"artifact": "outputs", "bucket": "b", "key": "k", "version_id": "v", "size": 1, "sha256": "0" * 64,
           "written_at": "2026-11-20T00:00:00.000Z"}
    assert StoredObject.from_json(old).etag is None
    assert StoredObject.from_json({**old, "etag": "e1"}).etag == "e1"


# --- state documents -------------------------------------------------------------------------------

def test_state_saves_are_compare_and_swap_and_the_etag_stays_out_of_the_document(store):
    states = StateStore(store)
    person = PersonState(tenant="t", batch_id="b", person_id="ada", name="Ada")
    states.save_person(person)  # no etag: a plain write
    assert person.etag and "etag" not in person.to_json()
    mine, theirs = states.load_person("t", "b", "ada"), states.load_person("t", "b", "ada")
    assert mine == theirs and mine.etag == person.etag
    mine.state = "ingesting"
    states.save_person(mine)
    theirs.state = "cancelled"
    with pytest.raises(StateConflict, match=r"state of person t/b/ada was changed by another writer") as caught:
        states.save_person(theirs)
    assert isinstance(caught.value, WriteConflict) and "Ada" not in str(caught.value)
    assert states.load_person("t", "b", "ada").state == "ingesting"
    assert PersonState.from_json(mine.to_json()).etag is None
    with pytest.raises(StateConflict, match="already exists"):
        states.create_person(PersonState(tenant="t", batch_id="b", person_id="ada", name="Ada"))
