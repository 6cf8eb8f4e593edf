"""The CLI end to end, as a user runs it: `headshots demo`, then status, download, env, down.

Real processes throughout: the CLI starts the embedded S3 server and a Ray head in the background
under a temporary $HEADSHOTS_HOME; the finalizer stops them with `headshots down`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from pipeline.ingest import has_metadata
from pipeline.package import TRAINED_ALGORITHMIC_MEDIA, read_digital_source_type
from storage.crypto import MasterKey, PersonKeyStore
from storage.keys import PersonRef
from storage.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
DEMO_NAMES = ("Grace Hopper", "Eileen Collins")
# Person ids the system makes for a roster without ids: random, never from the name.
RANDOM_ID = re.compile(r"p-[0-9a-f]{12}")
STYLES, IMAGES_PER_STYLE = ("corporate-grey", "office"), 2


def run_cli(home: Path, *args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HEADSHOTS_HOME=str(home))
    completed = subprocess.run([sys.executable, "-m", "headshots.cli", *args], env=environment, cwd=home.parent,
                               capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"headshots {' '.join(args)} exited {completed.returncode}:\n"
                             f"{completed.stdout}\n{completed.stderr}")
    return completed


@pytest.fixture(scope="module")
def stack_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e") / "home"
    yield home
    run_cli(home, "down", check=False, timeout=120)


@pytest.fixture(scope="module")
def demo(stack_home):
    output = stack_home.parent / "demo-output"
    completed = run_cli(stack_home, "demo", "--json", "-o", str(output))
    return json.loads(completed.stdout)


def demo_person_ids(demo) -> list[str]:
    return [p["person_id"] for p in demo["persons"]]


def test_demo_reports_every_person_done_with_headshots(demo):
    persons = {p["person_id"]: p for p in demo["persons"]}
    assert len(persons) == len(DEMO_NAMES) and all(RANDOM_ID.fullmatch(person_id) for person_id in persons)
    for person in persons.values():
        assert person["state"] == "done"
        assert person["headshots"] == len(STYLES) * IMAGES_PER_STYLE
        assert person["photos_accepted"] >= 4
    assert demo["tenant"] == "demo" and demo["batch_id"].startswith("demo-team-")
    assert demo["seconds"] > 0


def test_demo_output_folder_has_headshots_sheets_and_manifest(demo):
    output = Path(demo["output_dir"])
    manifest = json.loads((output / "manifest.json").read_text())
    images = [image for person in manifest["persons"] for image in person["images"]]
    assert len(images) == len(DEMO_NAMES) * len(STYLES) * IMAGES_PER_STYLE
    for image in images:
        path = output / image["file"]
        assert path.is_file(), f"{image['file']} listed in the manifest but not downloaded"
        assert {"person", "style", "prompt", "seed", "model", "timings"} <= set(image)
        assert read_digital_source_type(path.read_bytes()) == TRAINED_ALGORITHMIC_MEDIA
    assert (output / "contact-sheet.png").is_file()
    for person in demo_person_ids(demo):  # folders by person id
        assert (output / person / "contact-sheet.png").is_file()


def test_store_holds_every_artifact_under_the_key_layout(demo, stack_home):
    env = json.loads(run_cli(stack_home, "env", "--json").stdout)
    assert env["ray_address"] and env["metrics_url"].startswith("http://127.0.0.1:")
    client = Minio(env["s3_endpoint"], access_key=env["access_key"], secret_key=env["secret_key"],
                   secure=env["secure"])
    prefix = f"{demo['tenant']}/{demo['batch_id']}/"

    def listed(artifact: str) -> list[str]:
        return [o.object_name for o in client.list_objects(env["buckets"][artifact], prefix=prefix, recursive=True)]

    outputs = listed("outputs")
    assert f"{prefix}_batch/manifest.json" in outputs and f"{prefix}_batch/contact-sheet.png" in outputs
    for person in demo_person_ids(demo):
        headshots = [k for k in outputs if k.startswith(f"{prefix}{person}/headshots/")]
        assert len(headshots) == len(STYLES) * IMAGES_PER_STYLE
        for key in headshots:
            style, name = key.rsplit("/", 2)[-2:]
            assert style in STYLES and name.endswith(".png") and name[:3].isdigit() and "-" in name
        assert f"{prefix}{person}/contact-sheet.png" in outputs
        assert f"{prefix}{person}/lora/pytorch_lora_weights.safetensors" in listed("models")
        assert f"{prefix}{person}/state.json" in listed("state")
    uploads = listed("uploads")
    assert len(uploads) >= 8
    # Uploads are encrypted with each person's own data key (crypto-erasure): S3 credentials alone
    # cannot read them; the stack's master key unwraps the person's key.
    store = ArtifactStore(client, env["buckets"])
    key_store = PersonKeyStore(store, MasterKey.from_base64((stack_home / "master-key").read_text()))
    for key in uploads:  # the demo includes a photo with GPS EXIF: nothing stored may keep it
        with pytest.raises(S3Error, match="InvalidArgument|customer key"):
            client.get_object(env["buckets"]["uploads"], key)
        tenant, batch_id, person_id = key.split("/")[:3]
        data = store.get("uploads", key, ssec=key_store.key_for(PersonRef(tenant, batch_id, person_id)))
        assert not has_metadata(data), f"{key} was stored with metadata"


def test_status_json_shapes(demo, stack_home):
    listing = json.loads(run_cli(stack_home, "status", "--json").stdout)
    assert any(row["batch_id"] == demo["batch_id"] for row in listing)
    status = json.loads(run_cli(stack_home, "status", demo["batch_id"], "--json").stdout)
    assert set(status) == {"tenant", "batch_id", "state", "eta_seconds", "stalled_since", "hint", "persons"}
    assert status["state"] == "done" and status["stalled_since"] is None and status["hint"] is None
    for person in status["persons"]:
        assert set(person) >= {"person_id", "state", "stage", "headshots", "error"}
    assert not [name for name in DEMO_NAMES if name in json.dumps(status)], "status --json holds ids only"


def test_status_shows_each_persons_name_next_to_the_id(demo, stack_home):
    lines = run_cli(stack_home, "status", demo["batch_id"]).stdout.splitlines()
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert sorted(by_id) == sorted(demo_person_ids(demo))
    assert sorted(next(name for name in DEMO_NAMES if name in line) for line in by_id.values()) == sorted(DEMO_NAMES)


def test_download_zip(demo, stack_home, tmp_path):
    result = json.loads(run_cli(stack_home, "download", demo["batch_id"], "-o", str(tmp_path / "dl"), "--zip",
                                "--json").stdout)
    assert Path(result["zip"]).is_file()
    assert "manifest.json" in result["files"]


def test_submit_with_bad_manifest_exits_2_naming_the_field(stack_home, tmp_path):
    manifest = tmp_path / "team.yaml"
    manifest.write_text("tenant: acme\nbatch: q3\nstyles: [neon]\nconsent: {collected_by: hr, given_at: 2026-11-20}\n"
                        "persons:\n  - name: Ada\n    photos: []\n")
    completed = run_cli(stack_home, "submit", str(manifest), "--json", check=False)
    assert completed.returncode == 2
    assert "unknown style 'neon'" in completed.stderr and "corporate-grey" in completed.stderr


def test_metrics_endpoint_reports_the_demo(demo, stack_home):
    import urllib.request

    env = json.loads(run_cli(stack_home, "env", "--json").stdout)
    text = urllib.request.urlopen(env["metrics_url"], timeout=10).read().decode()
    # The gauge counts batches in flight (a finished batch leaves the coordinator's memory); the
    # counter keeps the total.
    done = [line for line in text.splitlines() if line.startswith('headshots_persons_finished_total{state="done"}')]
    assert done and float(done[0].split()[-1]) >= len(DEMO_NAMES)
    assert "headshots_images_generated_total" in text and "headshots_stage_duration_seconds_bucket" in text


def test_csv_roster_submitted_and_watched_to_the_end(demo, stack_home):
    completed = run_cli(stack_home, "submit", str(REPO / "examples" / "demo" / "team.csv"), "--tenant", "acme",
                        "--batch", "CSV team", "--styles", "office", "--images-per-style", "1",
                        "--consent-collected-by", "hr-system", "--consent-given-at", "2026-11-20", "--watch")
    assert "submitted batch csv-team-" in completed.stdout
    assert completed.stdout.rstrip().endswith(": done"), completed.stdout[-500:]
    batch_id = completed.stdout.split("submitted batch ", 1)[1].split()[0]
    status = json.loads(run_cli(stack_home, "status", batch_id, "--json").stdout)
    assert status["tenant"] == "acme"
    assert [(p["state"], p["headshots"]) for p in status["persons"]] == [("done", 1)] * len(DEMO_NAMES)
    assert all(RANDOM_ID.fullmatch(p["person_id"]) for p in status["persons"])
    for name in DEMO_NAMES:  # submit lists each person's id with the name from the roster
        assert re.search(rf"p-[0-9a-f]{{12}} \({name}\): \d+ photo\(s\) accepted", completed.stdout), name


def test_csv_roster_without_batch_fields_is_refused(stack_home):
    completed = run_cli(stack_home, "submit", str(REPO / "examples" / "demo" / "team.csv"), check=False)
    assert completed.returncode == 2 and "--tenant, --batch, --styles" in completed.stderr


def test_operator_fixes_refuse_clearly_on_a_finished_batch(demo, stack_home):
    person = demo["persons"][0]["person_id"]
    common = ["--tenant", demo["tenant"], "--batch", demo["batch_id"]]
    retry = run_cli(stack_home, "retry", *common, "--person", person, check=False)
    assert retry.returncode == 2 and "is done; only needs_photos, failed, cancelled" in retry.stderr
    photo = REPO / "examples" / "demo" / "photos" / "grace-hopper" / "01-front.jpg"
    add = run_cli(stack_home, "add-photos", *common, "--person", person, str(photo), check=False)
    assert add.returncode == 2 and "photos can be added to persons in needs_photos" in add.stderr
    cancel = json.loads(run_cli(stack_home, "cancel", *common, "--json").stdout)
    assert cancel["cancelled"] == []  # every person is final already: nothing to cancel
    status = json.loads(run_cli(stack_home, "status", demo["batch_id"], "--json").stdout)
    assert status["state"] == "done"


def test_status_shows_etas_and_fair_progress_for_two_concurrent_batches(demo, stack_home, tmp_path):
    """A studio submits six persons, a company two a moment later: `status` lists both running with their
    progress and an ETA, and the small batch finishes first (first come, first served would finish the
    studio's batch first)."""
    import time

    photos = REPO / "examples" / "demo" / "photos"

    def manifest(tenant: str, count: int) -> Path:
        path = tmp_path / f"{tenant}.yaml"
        persons = "\n".join(f"  - name: Person {index}\n    photos: [{photos / ('grace-hopper', 'eileen-collins')[index % 2]}/]"
                            for index in range(count))
        path.write_text(f"tenant: {tenant}\nbatch: {tenant} team\nbase_model: tiny\nstyles: [office]\n"
                        f"images_per_style: 1\nconsent:\n  collected_by: test-suite\n  given_at: 2026-11-20\n"
                        f"persons:\n{persons}\n")
        return path

    studio = json.loads(run_cli(stack_home, "submit", str(manifest("studio", 6)), "--json").stdout)
    corp = json.loads(run_cli(stack_home, "submit", str(manifest("corp", 2)), "--json").stdout)
    seen_both_with_eta = False
    finished: dict[str, float] = {}
    text_with_eta = ""
    deadline = time.monotonic() + 600
    while len(finished) < 2:
        assert time.monotonic() < deadline, "the two batches did not finish"
        rows = {row["batch_id"]: row for row in json.loads(run_cli(stack_home, "status", "--json").stdout)}
        for name, submitted in (("studio", studio), ("corp", corp)):
            row = rows[submitted["batch_id"]]
            if row["state"] != "running" and name not in finished:
                finished[name] = time.monotonic()
        running = [rows[b["batch_id"]] for b in (studio, corp) if rows[b["batch_id"]]["state"] == "running"]
        if len(running) == 2 and all(row["eta_seconds"] is not None and row["persons_by_state"] for row in running):
            seen_both_with_eta = True
            text_with_eta = run_cli(stack_home, "status").stdout
        time.sleep(1.0)
    assert seen_both_with_eta, "status never showed both batches running with progress and an ETA"
    assert "ETA" in text_with_eta and studio["batch_id"] in text_with_eta and corp["batch_id"] in text_with_eta
    assert finished["corp"] < finished["studio"]
    for submitted in (studio, corp):
        status = json.loads(run_cli(stack_home, "status", submitted["batch_id"], "--json").stdout)
        assert status["state"] == "done" and status["eta_seconds"] is None
        assert {p["state"] for p in status["persons"]} == {"done"}


def test_more_adds_headshots_from_the_stored_model(demo, stack_home, tmp_path):
    import time

    person = demo["persons"][0]["person_id"]
    common = ["--tenant", demo["tenant"], "--batch", demo["batch_id"], "--person", person]
    bad = run_cli(stack_home, "more", *common, "--style", "beach", "--count", "1", check=False)
    assert bad.returncode == 2 and "style 'beach' is not one of batch" in bad.stderr
    started = json.loads(run_cli(stack_home, "more", *common, "--style", "office", "--count", "1", "--json").stdout)
    assert started["added_per_style"] == {"office": 1}
    deadline = time.monotonic() + 300
    while True:
        status = json.loads(run_cli(stack_home, "status", demo["batch_id"], "--json").stdout)
        if status["state"] == "done":
            break
        assert time.monotonic() < deadline, "the batch did not finish the extra headshot"
        time.sleep(1.0)
    headshots = {p["person_id"]: p["headshots"] for p in status["persons"]}
    assert headshots[person] == len(STYLES) * IMAGES_PER_STYLE + 1
    downloaded = json.loads(run_cli(stack_home, "download", demo["batch_id"], "-o", str(tmp_path / "out"),
                                    "--json").stdout)
    assert len(list((tmp_path / "out" / person / "office").glob("*.png"))) == IMAGES_PER_STYLE + 1
    assert downloaded["files"]
