"""Person ids are random, so the CLI's own terminal output shows each person's display name next to the id
(read from the state documents); ``--json`` output stays ids only."""

from __future__ import annotations

import argparse
import json

import pytest

from headshots import cli
from headshots.client import SubmitResult
from headshots.manifest import BatchManifest, PersonSpec

NAMES = {"p-0123456789ab": "Thaddeus Plimsoll", "p-ba9876543210": "Ottoline Quarrington"}


def _person(person_id: str, state: str = "done", error: str | None = None) -> dict:
    return {"person_id": person_id, "state": state, "stage": None, "headshots": 2, "photos_accepted": 4,
            "error": error, "flags": [], "photos_rejected": [], "eta_seconds": None}


@pytest.fixture
def stack(monkeypatch):
    from headshots import client, stack

    summary = {"tenant": "acme", "batch_id": "q3-20261202-abcdef", "name": "Q3", "state": "done",
               "eta_seconds": None,
               "persons": [_person("p-0123456789ab"), _person("p-ba9876543210", "needs_photos", "1 usable photo"),
                           _person("p-deleted00000", "deleted")]}
    monkeypatch.setattr(stack, "connect", lambda config, **options: config)
    monkeypatch.setattr(client, "batch_status", lambda config, batch_id, **options: summary)
    asked = []

    def person_names(config, tenant, batch_id):
        asked.append((tenant, batch_id))
        return dict(NAMES)  # a deleted person's tombstone has no name

    monkeypatch.setattr(cli, "person_names", person_names)
    return summary, asked


def test_status_shows_the_name_next_to_each_id(stack, capsys):
    summary, asked = stack
    assert cli.cmd_status(argparse.Namespace(batch=summary["batch_id"], tenant=None, watch=False, json=False),
                          None) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert asked == [("acme", summary["batch_id"])]
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert "Thaddeus Plimsoll" in by_id["p-0123456789ab"] and "done" in by_id["p-0123456789ab"]
    assert "Ottoline Quarrington" in by_id["p-ba9876543210"] and "1 usable photo" in by_id["p-ba9876543210"]
    assert by_id["p-deleted00000"].split()[1:3] == ["-", "deleted"]


def test_status_json_has_ids_only(stack, capsys):
    summary, _ = stack
    cli.cmd_status(argparse.Namespace(batch=summary["batch_id"], tenant=None, watch=False, json=True), None)
    out = capsys.readouterr().out
    assert [p["person_id"] for p in json.loads(out)["persons"]] == [p["person_id"] for p in summary["persons"]]
    assert "Plimsoll" not in out and "Quarrington" not in out


def test_watch_labels_persons_with_their_names(stack, capsys):
    summary, _ = stack
    assert cli.watch(None, summary["batch_id"]) is summary  # a finished batch: one pass, no waiting
    out = capsys.readouterr().out
    assert "p-0123456789ab Thaddeus Plimsoll" in out
    assert "p-ba9876543210 (Ottoline Quarrington): needs_photos: 1 usable photo" in out


def test_submit_lists_each_person_with_the_name_from_the_manifest(monkeypatch, capsys, tmp_path):
    from headshots import client, stack

    manifest = BatchManifest(tenant="acme", name="Q3", base_model="tiny", styles=["office"], images_per_style=1,
                             persons=[PersonSpec(person_id, name, None, []) for person_id, name in NAMES.items()])
    persons = [{"person_id": person_id, "state": "queued", "photos_accepted": 4, "photos_rejected": []}
               for person_id in NAMES]
    persons[1]["photos_rejected"] = [{"file": "x.gif", "reason": "format_not_allowed", "message": "x.gif: not JPEG"}]
    monkeypatch.setattr(cli, "_load_manifest", lambda path, config, overrides=None: manifest)
    monkeypatch.setattr(stack, "connect", lambda config, **options: config)
    monkeypatch.setattr(client, "submit_batch", lambda config, manifest: SubmitResult("acme", "q3-1", persons))
    args = argparse.Namespace(manifest=str(tmp_path / "team.yaml"), tenant=None, batch=None, base_model=None,
                              styles=None, images_per_style=None, priority=None, consent_collected_by=None,
                              consent_given_at=None, watch=False, json=False)
    assert cli.cmd_submit(args, None) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "p-0123456789ab (Thaddeus Plimsoll): 4 photo(s) accepted" in out
    assert "p-ba9876543210 (Ottoline Quarrington): photo rejected: x.gif: not JPEG" in out
    args.json = True
    cli.cmd_submit(args, None)
    assert json.loads(capsys.readouterr().out) == {"tenant": "acme", "batch_id": "q3-1"}
