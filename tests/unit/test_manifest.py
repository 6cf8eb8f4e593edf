import re
from pathlib import Path

import pytest

from headshots.manifest import ManifestError, load_manifest

STYLES = ["corporate-grey", "office", "outdoor"]
RANDOM_ID = re.compile(r"p-[0-9a-f]{12}")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos" / "ada"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index}.jpg").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    return folder


def test_yaml_manifest_expands_folders_and_gives_random_ids(tmp_path, photos):
    path = _write(tmp_path, "team.yaml", """
tenant: acme
batch: Q3 team
styles: [corporate-grey, office]
images_per_style: 2
consent: {collected_by: hr@acme.example, given_at: 2026-11-20}
persons:
  - name: Ada Lovelace
    photos: [photos/ada/]
  - name: Bob
    photos: [photos/ada/0.jpg, photos/missing.jpg]
""")
    manifest = load_manifest(path, known_styles=STYLES)
    assert manifest.tenant == "acme" and manifest.base_model == "tiny"
    ada, bob = manifest.persons
    assert RANDOM_ID.fullmatch(ada.person_id) and RANDOM_ID.fullmatch(bob.person_id) and ada.person_id != bob.person_id
    assert [p.name for p in ada.photos] == ["0.jpg", "1.jpg", "2.jpg"]
    assert bob.missing == ["photos/missing.jpg"] and len(bob.photos) == 1


def test_csv_roster_with_command_line_fields(tmp_path, photos):
    path = _write(tmp_path, "team.csv", "name,photos,email\nAda Lovelace,photos/ada/0.jpg;photos/ada/1.jpg,a@x.io\n"
                                        "Bob,photos/ada,\n")
    manifest = load_manifest(path, known_styles=STYLES,
                             overrides={"tenant": "acme", "batch": "Q3", "styles": "office,outdoor",
                                        "images_per_style": 3,
                                        "consent": {"collected_by": "hr", "given_at": "2026-11-20T10:00:00Z"}})
    assert manifest.consent.collected_by == "hr" and manifest.consent.purpose == "headshots"
    assert manifest.styles == ["office", "outdoor"] and manifest.images_per_style == 3
    assert [len(p.photos) for p in manifest.persons] == [2, 3]
    assert manifest.persons[0].email == "a@x.io"


def test_every_problem_is_listed_with_its_field(tmp_path):
    path = _write(tmp_path, "team.yaml", """
tenant: Acme Inc
batch: ""
styles: [corporate-grey, neon]
images_per_style: 0
persons:
  - {name: Ada, id: ada}
  - {name: Ada Again, id: ada}
  - photos: [x]
""")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, known_styles=STYLES)
    text = str(caught.value)
    assert "field 'tenant'" in text and "'Acme Inc'" in text
    assert "field 'batch'" in text
    assert "unknown style 'neon'; available: corporate-grey, office, outdoor" in text
    assert "field 'images_per_style'" in text
    assert "persons[1]: person id 'ada' is already used by persons[0]" in text
    assert "persons[2].name" in text
    assert str(path) in text


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "team.yaml", "tenant: acme\npersons: [\n  - name: x\n")
    with pytest.raises(ManifestError, match=r"team.yaml: not valid YAML at line \d+"):
        load_manifest(path, known_styles=STYLES)


def test_csv_without_photos_column_is_refused(tmp_path):
    path = _write(tmp_path, "team.csv", "name,email\nAda,a@x.io\n")
    with pytest.raises(ManifestError, match="columns name,photos"):
        load_manifest(path, known_styles=STYLES, overrides={"tenant": "acme", "batch": "b", "styles": "office"})


def test_base_model_folder_must_be_a_diffusers_folder(tmp_path):
    path = _write(tmp_path, "team.yaml", "tenant: acme\nbatch: b\nstyles: [office]\nbase_model: models/sd15\n"
                                         "consent: {collected_by: hr, given_at: 2026-11-20}\n"
                                         "persons:\n  - name: Ada\n    photos: []\n")
    with pytest.raises(ManifestError, match="no model_index.json"):
        load_manifest(path, known_styles=STYLES)


def test_a_person_without_photos_is_kept_for_needs_photos(tmp_path):
    path = _write(tmp_path, "team.yaml", "tenant: acme\nbatch: b\nstyles: [office]\n"
                                         "consent: {collected_by: hr, given_at: 2026-11-20}\n"
                                         "persons:\n  - name: Ada\n    photos: []\n")
    manifest = load_manifest(path, known_styles=STYLES)
    assert manifest.persons[0].photos == []


def test_photos_need_a_consent_record(tmp_path):
    path = _write(tmp_path, "team.yaml", "tenant: acme\nbatch: b\nstyles: [office]\n"
                                         "persons:\n  - name: Ada\n    photos: []\n")
    with pytest.raises(ManifestError, match="field 'consent' is required"):
        load_manifest(path, known_styles=STYLES)
    bad = _write(tmp_path, "bad.yaml", "tenant: acme\nbatch: b\nstyles: [office]\n"
                                       "consent: {collected_by: hr, given_at: someday, purpose: marketing}\n"
                                       "persons:\n  - name: Ada\n    photos: []\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(bad, known_styles=STYLES)
    assert "consent.given_at" in str(caught.value) and "consent.purpose" in str(caught.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.yaml", known_styles=STYLES)


NAMED_ROSTER = """
tenant: acme
batch: Q3 team
styles: [office]
consent: {collected_by: hr@acme.example, given_at: 2026-11-20}
persons:
  - name: Thaddeus Plimsoll
    email: t.plimsoll@example.org
    photos: []
  - name: Ottoline Quarrington
    photos: []
  - name: Thaddeus Plimsoll
    photos: []
"""


def _fragments(name: str) -> list[str]:
    from storage.keys import slugify

    return [word.lower() for word in name.split()] + [slugify(name)]


def test_person_ids_are_not_derived_from_names(tmp_path):
    yaml_path = _write(tmp_path, "team.yaml", NAMED_ROSTER)
    csv_path = _write(tmp_path, "team.csv", "name,photos,email\nThaddeus Plimsoll,,t.plimsoll@example.org\n"
                                            "Ottoline Quarrington,,\n")
    overrides = {"tenant": "acme", "batch": "Q3", "styles": "office",
                 "consent": {"collected_by": "hr", "given_at": "2026-11-20"}}
    parses = [load_manifest(yaml_path, known_styles=STYLES), load_manifest(yaml_path, known_styles=STYLES),
              load_manifest(csv_path, known_styles=STYLES, overrides=overrides)]
    for manifest in parses:
        for person in manifest.persons:
            assert RANDOM_ID.fullmatch(person.person_id), person.person_id
            assert not [f for f in _fragments(person.name) if f in person.person_id]
            assert "plimsoll" not in person.person_id and "example" not in person.person_id
        # The name stays on the spec (for the state document); two persons of one name are two ids.
        assert [p.name for p in manifest.persons][:2] == ["Thaddeus Plimsoll", "Ottoline Quarrington"]
        assert len({p.person_id for p in manifest.persons}) == len(manifest.persons)
    # Not a function of the name: the same roster read again gets other ids (made once, at parse time).
    first, again = parses[0], parses[1]
    assert not {p.person_id for p in first.persons} & {p.person_id for p in again.persons}
    assert first.to_json()["persons"][0]["id"] == first.persons[0].person_id


def test_explicit_ids_are_kept_and_validated(tmp_path, monkeypatch):
    import headshots.manifest as manifest_module

    path = _write(tmp_path, "team.yaml", NAMED_ROSTER.replace("    email: t.plimsoll@example.org\n",
                                                              "    id: emp-1042\n"))
    manifest = load_manifest(path, known_styles=STYLES)
    assert manifest.persons[0].person_id == "emp-1042"
    assert RANDOM_ID.fullmatch(manifest.persons[1].person_id)
    csv_path = _write(tmp_path, "team.csv", "name,photos,id\nThaddeus Plimsoll,,emp-7\nOttoline Quarrington,,\n")
    from_csv = load_manifest(csv_path, known_styles=STYLES, overrides={
        "tenant": "acme", "batch": "Q3", "styles": "office", "consent": {"collected_by": "hr", "given_at": "2026-11-20"}})
    assert from_csv.persons[0].person_id == "emp-7" and RANDOM_ID.fullmatch(from_csv.persons[1].person_id)

    # A random id never takes an id the roster gives to someone else (even to a later person), nor one
    # already made for this batch.
    made = iter(["p-00000000beef", "p-0000000cafe0", "p-0000000cafe0", "p-000000000001"])
    monkeypatch.setattr(manifest_module, "new_person_id", lambda: next(made))
    clash = _write(tmp_path, "clash.yaml", NAMED_ROSTER.replace(
        "  - name: Ottoline Quarrington\n    photos: []\n  - name: Thaddeus Plimsoll\n    photos: []\n",
        "  - name: Ottoline Quarrington\n    photos: []\n  - name: Someone\n    id: p-00000000beef\n    photos: []\n"))
    ids = [p.person_id for p in load_manifest(clash, known_styles=STYLES).persons]
    assert ids == ["p-0000000cafe0", "p-000000000001", "p-00000000beef"]
    monkeypatch.undo()

    bad = _write(tmp_path, "bad.yaml", NAMED_ROSTER.replace("    email: t.plimsoll@example.org\n",
                                                            "    id: Thaddeus Plimsoll\n"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(bad, known_styles=STYLES)
    assert "persons[0].id 'Thaddeus Plimsoll' is not a valid id" in str(caught.value)
    twice = _write(tmp_path, "twice.yaml", NAMED_ROSTER.replace("    photos: []\n", "    id: emp-1\n    photos: []\n"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(twice, known_styles=STYLES)
    assert "persons[1]: person id 'emp-1' is already used by persons[0]" in str(caught.value)


def test_new_person_ids_are_valid_and_random():
    from storage.keys import ID_PATTERN, new_person_id

    made = {new_person_id() for _ in range(1000)}
    assert len(made) == 1000 and all(ID_PATTERN.fullmatch(i) and RANDOM_ID.fullmatch(i) for i in made)
