"""Manifests are bounded before and while their YAML is parsed: file size, nesting depth and the size
the document reaches with its aliases expanded (a "billion laughs" file is refused in a moment)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from headshots.manifest import (MAX_MANIFEST_BYTES, MAX_YAML_DEPTH, MAX_YAML_EXPANDED_CHARS, ManifestError,
                                load_manifest)

STYLES = ["office"]
HEADER = "tenant: acme\nbatch: Q3\nstyles: [office]\nconsent: {collected_by: hr@acme.example, given_at: 2026-11-20}\n"


def alias_bomb(levels: int) -> str:
    """Each level lists nine aliases of the one before; ``tenant`` lists nine of the last: 9**levels
    strings from a few hundred bytes (an error message quoting the field would be that long)."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    lines.append("tenant: [" + ",".join([f"*l{levels - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + HEADER.replace("tenant: acme\n", "") + "persons: [{name: Ada}]\n"


def legitimate(size: int) -> str:
    """A plain manifest of about ``size`` bytes (persons without photos)."""
    text, index = HEADER + "persons:\n", 0
    while len(text) < size:
        text += f"  - {{name: Person {index}, email: p{index}@acme.example}}\n"
        index += 1
    return text


def peak_bytes_of_loading(path: Path) -> tuple[int, Exception | None]:
    tracemalloc.start()
    try:
        load_manifest(path, known_styles=STYLES)
        error = None
    except ManifestError as raised:
        error = raised
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


@pytest.mark.parametrize("levels", [7, 9])
def test_an_alias_bomb_is_refused_at_the_cost_of_a_legitimate_manifest(tmp_path, levels):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(levels))
    plain = tmp_path / "plain.yaml"
    plain.write_text(legitimate(len(bomb.read_bytes())))
    load_manifest(plain, known_styles=STYLES)  # warm: imports and caches are not the parse's cost

    plain_peak, plain_error = peak_bytes_of_loading(plain)
    assert plain_error is None
    bomb_peak, bomb_error = peak_bytes_of_loading(bomb)
    assert isinstance(bomb_error, ManifestError)
    message = str(bomb_error)
    assert str(bomb) in message and "aliases" in message and str(MAX_YAML_EXPANDED_CHARS) in message, message
    assert len(message) < 1000
    # Refused while composing, before anything is expanded: the same order of cost as a real manifest.
    assert bomb_peak <= 20 * plain_peak, (bomb_peak, plain_peak)


def test_aliases_that_expand_modestly_still_work(tmp_path):
    path = tmp_path / "team.yaml"
    path.write_text(HEADER + "persons:\n  - &ada {name: Ada, id: ada, email: ada@acme.example}\n"
                             "  - {<<: *ada, name: Grace, id: grace}\n")
    manifest = load_manifest(path, known_styles=STYLES)
    assert [(p.person_id, p.email) for p in manifest.persons] == [("ada", "ada@acme.example"),
                                                                 ("grace", "ada@acme.example")]


def test_recursive_aliases_and_deep_nesting_are_refused_with_their_place(tmp_path):
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text(HEADER + "persons: &p [{name: Ada}, *p]\n")
    with pytest.raises(ManifestError, match=r"recursive.yaml: alias \*p is inside the node it names .*line 5"):
        load_manifest(recursive, known_styles=STYLES)
    deep = tmp_path / "deep.yaml"
    deep.write_text(HEADER + "persons: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ManifestError, match=rf"deep.yaml: nests deeper than {MAX_YAML_DEPTH} levels"):
        load_manifest(deep, known_styles=STYLES)


def test_a_manifest_over_the_size_cap_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("name,photos\n" + "Ada,a.jpg\n" * (MAX_MANIFEST_BYTES // 10 + 1))
    with pytest.raises(ManifestError, match=rf"huge.csv: is larger than {MAX_MANIFEST_BYTES} bytes"):
        load_manifest(path, known_styles=STYLES, overrides={"tenant": "acme", "batch": "Q3", "styles": "office"})
