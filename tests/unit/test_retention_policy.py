from datetime import datetime, timedelta, timezone

import pytest

from storage.retention import (PolicyError, RetentionPolicy, clock_start, index_key, load_policy, parse_time)
from storage.keys import PersonRef

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)


def policy(**overrides) -> RetentionPolicy:
    document = {"version": "v1", "max_days": 90, "days": {"uploads": 30, "derived": 30, "models": 30, "outputs": None}}
    document.update(overrides)
    return RetentionPolicy.from_mapping(document)


def test_the_built_in_policy_keeps_photos_and_models_30_days_and_outputs():
    built_in = load_policy()
    assert built_in.days == {"uploads": 30, "derived": 30, "models": 30, "outputs": None}
    assert built_in.receipts_days == 1095


def test_due_times_follow_tenant_overrides_and_omit_kept_classes():
    p = policy(tenants={"acme": {"uploads": 7, "outputs": 60}})
    assert p.due_times("other", T0) == {a: T0 + timedelta(days=30) for a in ("uploads", "derived", "models")}
    acme = p.due_times("acme", T0)
    assert acme["uploads"] == T0 + timedelta(days=7) and acme["models"] == T0 + timedelta(days=30)
    assert acme["outputs"] == T0 + timedelta(days=60)


@pytest.mark.parametrize("overrides, message", [
    ({"tenants": {"acme": {"uploads": 120}}}, r"tenants.acme.uploads' must be 0..90 days"),
    ({"days": {"uploads": None, "derived": 30, "models": 30, "outputs": None}}, "only outputs may be kept"),
    ({"days": {"uploads": 30, "derived": 30, "models": 30}}, "missing: outputs"),
    ({"tenants": {"acme": {"photos": 3}}}, "unknown artifact class"),
    ({"tenants": {"Acme!": {"uploads": 3}}}, "not a valid id"),
    ({"version": ""}, "'version'"),
])
def test_bad_policies_are_refused_naming_the_field(overrides, message):
    with pytest.raises(PolicyError, match=message):
        policy(**overrides)


def test_clock_starts_when_processed_and_for_needs_photos_at_last_upload():
    assert clock_start({"state": "training", "processed_at": None}) is None
    assert clock_start({"state": "done", "processed_at": "2026-01-10T12:00:00Z"}) == T0
    assert clock_start({"state": "needs_photos", "processed_at": "2026-02-01T00:00:00Z",
                        "last_upload_at": "2026-01-10T12:00:00.000Z"}) == T0


def test_index_keys_are_partitioned_by_day_and_hold_ids_only():
    key = index_key(parse_time("2026-02-09T23:59:00Z"), PersonRef("acme", "b1", "ada"))
    assert key == "_system/expiry/2026-02-09/acme/b1/ada"
