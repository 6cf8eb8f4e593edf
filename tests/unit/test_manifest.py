from pathlib import Path

import pytest

from headshots.manifest import ManifestError, load_manifest

STYLES = ["corporate-grey", "office", "outdoor"]


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


def test_yaml_manifest_expands_folders_and_slugifies_names(tmp_path, photos):
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
    assert ada.person_id == "ada-lovelace" and [p.name for p in ada.photos] == ["0.jpg", "1.jpg", "2.jpg"]
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
  - name: Ada
  - name: ada
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
