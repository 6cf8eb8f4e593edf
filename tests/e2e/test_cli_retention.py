"""The retention promises through the CLI, on the demo batch: sweep 31 days later, delete on request,
receipts that verify, metrics that show it. Real processes: the CLI's own local stack."""

from __future__ import annotations

import json
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from minio import Minio

from storage.retention import format_time, parse_time
from tests.e2e.test_cli_demo import run_cli

PERSON_CLASSES = ("uploads", "derived", "models")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-retention") / "home"
    demo = json.loads(run_cli(home, "demo", "--json", "-o", str(home.parent / "out")).stdout)
    env = json.loads(run_cli(home, "env", "--json").stdout)
    yield home, demo, env
    run_cli(home, "down", check=False, timeout=120)


def _client(env) -> Minio:
    return Minio(env["s3_endpoint"], access_key=env["access_key"], secret_key=env["secret_key"], secure=env["secure"])


def _versions(env, artifact: str, prefix: str) -> int:
    return sum(1 for _ in _client(env).list_objects(env["buckets"][artifact], prefix=prefix, recursive=True,
                                                    include_version=True))


def _processed_at(env, demo, person_id: str):
    client = _client(env)
    response = client.get_object(env["buckets"]["state"], f"{demo['tenant']}/{demo['batch_id']}/{person_id}/state.json")
    try:
        return parse_time(json.loads(response.read())["processed_at"])
    finally:
        response.close()


def test_sweep_31_days_after_processing_leaves_only_outputs(stack):
    home, demo, env = stack
    prefix = f"{demo['tenant']}/{demo['batch_id']}/"
    latest = max(_processed_at(env, demo, p["person_id"]) for p in demo["persons"])
    dry = json.loads(run_cli(home, "retention", "sweep", "--dry-run", "--now",
                             format_time(latest + timedelta(days=31)), "--json").stdout)
    assert dry["dry_run"] and dry["objects"] > 0 and dry["receipt_id"] is None
    assert _versions(env, "uploads", prefix) > 0, "a dry run must delete nothing"
    outputs_before = _versions(env, "outputs", prefix)

    result = json.loads(run_cli(home, "retention", "sweep", "--now", format_time(latest + timedelta(days=31)),
                                "--json").stdout)
    assert result["receipt_id"] and result["verification"]["listing_count"] == 0
    assert set(result["by_artifact"]) >= set(PERSON_CLASSES)
    for artifact in PERSON_CLASSES:
        assert _versions(env, artifact, prefix) == 0, artifact
    assert _versions(env, "outputs", prefix) == outputs_before
    # Headshots stay downloadable after the cleanup.
    download = json.loads(run_cli(home, "download", demo["batch_id"], "-o", str(home.parent / "after-sweep"),
                                  "--json").stdout)
    assert len([f for f in download["files"] if f.endswith(".png") and "/contact" not in f]) >= 8
    verified = json.loads(run_cli(home, "receipts", "--verify", result["receipt_id"], "--json").stdout)
    assert verified["verified"] and verified["objects_checked"] == result["objects"]


def test_delete_a_person_with_outputs_at_once(stack):
    home, demo, env = stack
    person = demo["persons"][0]["person_id"]
    prefix = f"{demo['tenant']}/{demo['batch_id']}/{person}/"
    result = json.loads(run_cli(home, "delete", "--tenant", demo["tenant"], "--batch", demo["batch_id"],
                                "--person", person, "--include-outputs", "--json").stdout)
    assert set(result) >= {"request_id", "receipt_id", "objects_deleted", "seconds"}
    assert result["seconds"] < 60
    for artifact in PERSON_CLASSES + ("outputs",):
        assert _versions(env, artifact, prefix) == 0
    status = json.loads(run_cli(home, "status", demo["batch_id"], "--json").stdout)
    assert {p["person_id"]: p["state"] for p in status["persons"]}[person] == "deleted"
    receipts = json.loads(run_cli(home, "receipts", "--tenant", demo["tenant"], "--batch", demo["batch_id"],
                                  "--person", person, "--json").stdout)
    assert result["receipt_id"] in [r["receipt_id"] for r in receipts]
    text = json.dumps(receipts).lower()  # any case: a slug of a name is a name too
    assert not [word for word in ("grace", "hopper", "eileen", "collins", "example.com") if word in text]
    assert json.loads(run_cli(home, "receipts", "--verify", result["receipt_id"], "--json").stdout)["verified"]


def test_bad_deletion_requests_are_refused_clearly(stack):
    home, demo, _ = stack
    missing = run_cli(home, "delete", "--tenant", demo["tenant"], "--batch", demo["batch_id"], "--person",
                      "nobody-here", check=False)
    assert missing.returncode == 2 and "no person 'nobody-here'" in missing.stderr
    no_batch = run_cli(home, "delete", "--tenant", demo["tenant"], "--person", "x", check=False)
    assert no_batch.returncode == 2 and "--person needs --batch" in no_batch.stderr


def test_retention_metrics_show_the_deletions(stack):
    home, _, env = stack
    env = json.loads(run_cli(home, "env", "--json").stdout)
    text = urllib.request.urlopen(env["retention_metrics_url"], timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and not line[0] == "#"}
    assert values['headshots_retention_objects_deleted_total{artifact="uploads"}'] > 0
    assert values['headshots_deletion_requests_total{status="succeeded"}'] >= 1
    assert values["headshots_retention_last_success_timestamp_seconds"] > 0
    assert values['headshots_retention_overdue_objects{artifact="uploads"}'] == 0


def test_no_log_on_any_machine_holds_a_name_or_an_email(stack):
    """Logs never contain names or emails: scan every log the stack wrote (CLI home, Ray session logs)."""
    home, _, _ = stack
    info = json.loads((home / "stack.json").read_text())
    roots = [home, Path(info["ray_temp_dir"])] if info.get("ray_temp_dir") else [home]
    scanned = 0
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix not in (".log", ".out", ".err", ".txt"):
                continue
            if (home / "s3") in path.parents and path.name != "weed.log":
                continue  # the store's own data files hold the state documents by design
            text = path.read_text(errors="replace")
            scanned += 1
            for secret in ("Grace Hopper", "Eileen Collins", "grace@example.com"):
                assert secret not in text, f"{secret!r} appears in {path}"
    assert scanned > 5, "no logs were found to scan: the test would prove nothing"
