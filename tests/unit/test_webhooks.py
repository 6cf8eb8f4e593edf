"""Webhook signatures, registrations and event payloads (no server, no Ray)."""

from __future__ import annotations

import logging
import re

import pytest
from prometheus_client import CollectorRegistry

from cluster import webhooks
from cluster.webhooks import (EVENT_TYPES, ReceiverRefused, WebhookDispatcher, WebhookEvent, address_problem,
                              new_event, parse_webhooks, receiver_addresses, sign, url_problem, verify_signature)
from headshots.config import Config, ConfigError, WebhooksConfig
from monitoring.metrics import create_webhook_metrics
from headshots.manifest import ManifestError, parse_manifest

SECRET = "whsec-test-0123456789"
NOW = 1_800_000_000
BODY = b'{"data":{"batch_id":"b1","state":"done","tenant":"acme"},"id":"evt-1","type":"batch.completed"}'


def test_a_signature_verifies_with_the_secret_it_was_made_with():
    signature = sign(SECRET, NOW, BODY)
    assert signature.startswith("v1=") and len(signature) == 3 + 64
    assert verify_signature(SECRET, str(NOW), BODY, signature, now=NOW + 10)
    # Receivers often have the body as text, and the header as a string.
    assert verify_signature(SECRET, NOW, BODY.decode(), signature, now=NOW)


def test_a_wrong_secret_a_tampered_body_or_a_forged_timestamp_fail():
    signature = sign(SECRET, NOW, BODY)
    assert not verify_signature("another-secret", NOW, BODY, signature, now=NOW)
    assert not verify_signature(SECRET, NOW, BODY.replace(b"done", b"fail"), signature, now=NOW)
    # The timestamp is signed too: moving it (to get past the replay window) breaks the signature.
    assert not verify_signature(SECRET, NOW + 1, BODY, signature, now=NOW)
    assert not verify_signature(SECRET, NOW, BODY, "v1=" + "0" * 64, now=NOW)
    assert not verify_signature(SECRET, NOW, BODY, signature.replace("v1=", "v0="), now=NOW)
    assert not verify_signature(SECRET, "not-a-number", BODY, signature, now=NOW)
    assert not verify_signature(SECRET, NOW, BODY, "", now=NOW)


def test_old_and_far_future_timestamps_are_refused_as_replays():
    signature = sign(SECRET, NOW, BODY)
    assert verify_signature(SECRET, NOW, BODY, signature, now=NOW + 299)
    assert not verify_signature(SECRET, NOW, BODY, signature, now=NOW + 301)
    assert not verify_signature(SECRET, NOW, BODY, signature, now=NOW - 301)
    assert verify_signature(SECRET, NOW, BODY, signature, tolerance_s=3600, now=NOW + 1800)


def test_any_of_several_signatures_may_match_for_secret_rotation():
    header = f"{sign('old-secret', NOW, BODY)},{sign(SECRET, NOW, BODY)}"
    assert verify_signature(SECRET, NOW, BODY, header, now=NOW)
    assert verify_signature("old-secret", NOW, BODY, header, now=NOW)


def test_registration_defaults_to_every_event_and_normalises_the_order():
    webhooks, problems = parse_webhooks([{"url": "https://hooks.example/h"},
                                         {"url": "https://other.example/h?t=1",
                                          "events": ["person.failed", "batch.completed"]}])
    assert problems == []
    assert webhooks == [{"url": "https://hooks.example/h", "events": list(EVENT_TYPES)},
                        {"url": "https://other.example/h?t=1", "events": ["batch.completed", "person.failed"]}]
    assert parse_webhooks(None) == ([], [])


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://[::1]:9/h"])
def test_plain_http_is_allowed_on_loopback(url):
    assert url_problem(url) is None


@pytest.mark.parametrize("url, expected", [
    ("http://hooks.example/h", "must use https .* encrypted in transit"),
    ("http://10.0.0.5/h", "must use https"),
    ("ftp://hooks.example/h", "must be an https:// URL"),
    ("https://", "must be an https:// URL with a host"),
    ("https://user:pw@hooks.example/h", "must not carry credentials"),
    ("https://hooks.example:99999/h", "not a valid URL"),
    (42, "must be an https:// URL"),
])
def test_bad_urls_are_refused_with_the_reason(url, expected):
    _, problems = parse_webhooks([{"url": url}], where="team.yaml: field 'webhooks'")
    assert len(problems) == 1
    assert problems[0].startswith("team.yaml: field 'webhooks'[0].url ")
    assert re.search(expected, problems[0]), problems[0]


def test_bad_registrations_name_the_entry_and_what_is_allowed():
    _, problems = parse_webhooks([{"url": "https://a.example", "events": ["batch.done"], "secret": "x"},
                                  "https://b.example"], where="field 'webhooks'")
    assert any("field 'webhooks'[0] has unknown key(s) secret; allowed: url, events" in p for p in problems)
    assert any("field 'webhooks'[0].events names unknown event type(s) 'batch.done'; allowed: batch.completed"
               in p for p in problems)
    assert any("field 'webhooks'[1] must be a mapping" in p for p in problems)
    _, problems = parse_webhooks([{"url": "https://a.example"}] * 2)
    assert problems == ["field 'webhooks' lists a URL twice; list each URL once, with all its events"]
    _, problems = parse_webhooks({"url": "https://a.example"})
    assert problems == ["field 'webhooks' must be a list of {url, events} entries but is dict"]


def test_the_manifest_carries_webhooks_and_reports_bad_ones_with_the_other_problems(tmp_path):
    document = {"tenant": "acme", "batch": "Q3", "styles": ["office"], "persons": [{"name": "Ada", "photos": []}],
                "consent": {"collected_by": "hr@acme.example", "given_at": "2026-11-20"},
                "webhooks": [{"url": "https://hooks.acme.example/headshots", "events": ["batch.completed"]}]}
    manifest = parse_manifest(document, base_dir=tmp_path, source="team.yaml", known_styles=["office"])
    assert manifest.webhooks == [{"url": "https://hooks.acme.example/headshots", "events": ["batch.completed"]}]
    document["webhooks"] = [{"url": "http://hooks.acme.example/headshots"}]
    document["priority"] = 500
    with pytest.raises(ManifestError) as raised:
        parse_manifest(document, base_dir=tmp_path, source="team.yaml", known_styles=["office"])
    assert len(raised.value.problems) == 2
    assert any(p.startswith("team.yaml: field 'webhooks'[0].url must use https") for p in raised.value.problems)


def test_events_carry_ids_only_and_get_the_same_id_for_the_same_fact():
    first = new_event("person.failed", tenant="acme", batch_id="b1", person_id="ada", state="failed",
                      facts=["2026-11-20T10:00:00Z"])
    again = new_event("person.failed", tenant="acme", batch_id="b1", person_id="ada", state="failed",
                      facts=["2026-11-20T10:00:00Z"])
    later = new_event("person.failed", tenant="acme", batch_id="b1", person_id="ada", state="failed",
                      facts=["2026-11-21T10:00:00Z"])
    assert first.id == again.id != later.id
    assert first.to_json()["data"] == {"tenant": "acme", "batch_id": "b1", "person_id": "ada", "state": "failed"}
    assert WebhookEvent.from_json(first.to_json()) == first
    with pytest.raises(ValueError, match="never names or emails.* but has email, name"):
        new_event("person.failed", tenant="acme", batch_id="b1", name="Ada Lovelace", email="ada@example.com")
    with pytest.raises(ValueError, match="event type must be one of"):
        new_event("person.done", tenant="acme", batch_id="b1")


def test_the_webhooks_config_section_names_key_and_value():
    config = Config.from_dict({"webhooks": {"max_attempts": 3, "first_retry_delay_s": 0.5}})
    assert config.webhooks.max_attempts == 3 and config.webhooks.timeout_s == 5.0
    with pytest.raises(ConfigError, match="webhooks.timeout_s must be a number of seconds between 0.1 and 60 "
                                          "but is 600"):
        Config.from_dict({"webhooks": {"timeout_s": 600}})
    with pytest.raises(ConfigError, match="webhooks.max_retry_delay_s .* must not be less than"):
        Config.from_dict({"webhooks": {"first_retry_delay_s": 10, "max_retry_delay_s": 1}})
    assert Config.from_dict({}).webhooks.allow_private_addresses is False


# --- receiver addresses (SSRF guard): a stub resolver, no network ----------------------------------

PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"


def stub_resolver(*addresses: str):
    """A resolver that answers ``addresses`` for any host and records what it was asked."""
    def resolve(host: str, port: int) -> list[str]:
        resolve.asked.append((host, port))
        return list(addresses)
    resolve.asked = []
    return resolve


@pytest.mark.parametrize(("address", "kind"), [
    ("10.1.2.3", "private"),
    ("172.16.0.9", "private"),
    ("192.168.1.20", "private"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.251", "multicast"),
    ("240.0.0.1", "reserved"),
    ("100.64.0.1", "not globally routable"),
    ("fd00::1", "private"),
    ("fe80::1%eth0", "link-local"),
    ("::ffff:10.0.0.1", "private, as 10.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "link-local, as 169.254.169.254"),
    ("2002:a00:1::", "private, as 10.0.0.1"),
])
def test_addresses_that_are_not_public_unicast_are_named_by_kind(address, kind):
    assert address_problem(address) == kind


@pytest.mark.parametrize("address", [PUBLIC_V4, PUBLIC_V6, "8.8.8.8", "::ffff:93.184.216.34"])
def test_public_unicast_addresses_pass(address):
    assert address_problem(address) is None


@pytest.mark.parametrize(("url", "answer", "expected"), [
    ("https://hooks.example/h", "10.0.0.5", "hooks.example resolves to 10.0.0.5 (private)"),
    ("https://metadata.example/latest", "169.254.169.254", "metadata.example resolves to 169.254.169.254 (link-local)"),
    ("http://[::1]:8265/api/jobs/", "::1", "::1 resolves to ::1 (loopback)"),
    ("http://127.0.0.1:9400/metrics", "127.0.0.1", "127.0.0.1 resolves to 127.0.0.1 (loopback)"),
])
def test_a_receiver_resolving_to_a_private_address_is_refused(url, answer, expected):
    with pytest.raises(ReceiverRefused, match=re.escape(expected)):
        receiver_addresses(url, allow_private=False, resolve=stub_resolver(answer))


def test_one_private_answer_among_public_ones_refuses_the_host():
    # A name that also answers a private address could be picked on that one (or rebound to it).
    with pytest.raises(ReceiverRefused, match=r"resolves to 10\.0\.0\.5"):
        receiver_addresses("https://hooks.example/h", allow_private=False,
                           resolve=stub_resolver(PUBLIC_V4, "10.0.0.5"))


def test_a_public_receiver_passes_and_its_addresses_are_the_ones_connected_to():
    resolve = stub_resolver(PUBLIC_V4, PUBLIC_V6)
    assert receiver_addresses("https://hooks.example/h?t=1", allow_private=False, resolve=resolve) == [
        PUBLIC_V4, PUBLIC_V6]
    assert resolve.asked == [("hooks.example", 443)]
    receiver_addresses("http://hooks.example:8080/h", allow_private=False, resolve=resolve)
    assert resolve.asked[-1] == ("hooks.example", 8080)


def test_the_switch_allows_private_receivers_and_an_empty_answer_is_a_retryable_error():
    assert receiver_addresses("http://127.0.0.1:9/h", allow_private=True, resolve=stub_resolver("127.0.0.1")) == [
        "127.0.0.1"]
    with pytest.raises(OSError, match="resolves to no address"):
        receiver_addresses("https://hooks.example/h", allow_private=False, resolve=stub_resolver())


class _RecordsOnlyStore:
    """Just enough of ArtifactStore for a delivery's pending record (no server)."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def put_json(self, bucket, key, document, **_):
        self.records[key] = document

    def list_versions(self, bucket, prefix):
        return [(key, "v1", None) for key in self.records if key.startswith(prefix)]

    def remove_version(self, bucket, key, *, version_id):
        self.records.pop(key, None)


def test_a_refused_delivery_is_given_up_at_once_counted_as_failed_and_logged_by_host(monkeypatch, caplog):
    def no_connection(*args, **kwargs):
        raise AssertionError("a refused receiver must not be connected to")

    monkeypatch.setattr(webhooks, "post", no_connection)
    store = _RecordsOnlyStore()
    registry = CollectorRegistry()
    dispatcher = WebhookDispatcher(store, WebhooksConfig(max_attempts=5, first_retry_delay_s=0.01),
                                   source="unit", metrics=create_webhook_metrics(registry),
                                   resolve=stub_resolver("169.254.169.254"))
    event = new_event("batch.completed", tenant="acme", batch_id="b1", state="done", facts=["t1"])
    with caplog.at_level(logging.WARNING, logger="cluster.webhooks"):
        try:
            dispatcher.emit(event, [{"url": "https://hooks.example/path?token=receiver-secret"}])
            assert dispatcher.wait_idle(5)
        finally:
            dispatcher.stop()
    value = registry.get_sample_value
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "failed"}) == 1
    assert value("headshots_webhook_deliveries_total", {"event": "batch.completed", "outcome": "retried"}) == 0
    assert store.records == {}  # the pending record is gone: nothing is retried after a restart
    [line] = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert "hooks.example resolves to 169.254.169.254 (link-local)" in line
    assert "webhooks.allow_private_addresses" in line
    assert "token" not in line and "/path" not in line
