"""Batch manifests: a YAML file, or a CSV roster plus command-line fields.

Two kinds of problem, handled differently:
- the manifest itself is wrong (malformed YAML/CSV, a missing or invalid field, an unknown style, two
  persons with the same id): :class:`ManifestError` lists every problem, nothing is submitted;
- a person's photos are wrong (a missing file, an unreadable image, no photos at all): recorded on that
  person, who ends in ``needs_photos`` if nothing usable is left, while the rest of the batch goes on.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cluster.webhooks import parse_webhooks
from storage.keys import ID_PATTERN, new_person_id

MAX_PERSONS = 2000
MAX_IMAGES_PER_STYLE = 64
MAX_PHOTOS_PER_PERSON = 50
MANIFEST_FIELDS = ("tenant", "batch", "base_model", "styles", "images_per_style", "priority", "consent", "persons",
                   "webhooks")
# Batch priority: within a tenant, higher runs first; between tenants fair share decides.
PRIORITY_RANGE = (-100, 100)
PERSON_FIELDS = ("name", "id", "email", "photos", "consent_given_at")
CONSENT_FIELDS = ("collected_by", "given_at", "purpose", "policy_version")
CONSENT_PURPOSES = ("headshots",)
# A manifest file may be at most this large (2,000 persons with long photo lists take a fraction of it),
# and its YAML may nest at most MAX_YAML_DEPTH levels and, with every alias expanded, hold at most
# MAX_YAML_EXPANDED_CHARS characters: an alias repeats what its anchor names at no cost in bytes, so a
# few lines of nested aliases ("billion laughs") would otherwise stand for gigabytes.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_EXPANDED_CHARS = 2 * MAX_MANIFEST_BYTES


class ManifestError(ValueError):
    """The manifest cannot be submitted; ``problems`` lists each one."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source} cannot be submitted:\n{listed}")


@dataclass(frozen=True)
class Consent:
    """The batch's consent record: each person agreed, when the operator collected it, to this purpose."""

    collected_by: str  # who collected the consents (an operator, an HR system): never the photo subject
    given_at: str
    purpose: str = "headshots"
    policy_version: str = ""  # empty: the retention policy in force at submit


@dataclass
class PersonSpec:
    person_id: str  # the roster's 'id', or random (storage.keys.new_person_id): never derived from the name
    name: str
    email: str | None
    photos: list[Path]
    # Photo entries that named nothing readable (missing file or folder): reported on the person.
    missing: list[str] = field(default_factory=list)
    # Overrides the batch consent's given_at for this person.
    consent_given_at: str | None = None


@dataclass
class BatchManifest:
    tenant: str
    name: str
    base_model: str
    styles: list[str]
    images_per_style: int
    persons: list[PersonSpec]
    source: str = ""
    consent: Consent | None = None
    priority: int = 0
    # [{url, events}]: where the batch's events are delivered (see cluster/webhooks.py).
    webhooks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "batch": self.name, "base_model": self.base_model, "styles": self.styles,
                "images_per_style": self.images_per_style, "priority": self.priority,
                "webhooks": self.webhooks,
                "persons": [{"id": p.person_id, "name": p.name, "email": p.email,
                             "photos": [str(photo) for photo in p.photos]} for p in self.persons]}


def load_manifest(path: str | Path, *, known_styles: Iterable[str], overrides: dict[str, Any] | None = None
                  ) -> BatchManifest:
    """Read a YAML manifest or a CSV roster.

    Args:
        path: ``*.yaml``/``*.yml`` or ``*.csv``.
        known_styles: style preset names that exist.
        overrides: command-line fields (tenant, batch, base_model, styles, images_per_style, priority); needed for a
            CSV, optional for YAML (where they win over the file).

    Raises:
        ManifestError: with every problem found, each naming the file and field.
    """
    path = Path(path)
    source = str(path)
    too_large = f"{source}: is larger than {MAX_MANIFEST_BYTES} bytes, the most a manifest may be; split the batch"
    try:
        if path.is_file() and path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(source, [too_large])
        with path.open(encoding="utf-8") as handle:  # bounded: a FIFO or device has no size to check first
            text = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(source, [too_large])
    except FileNotFoundError:
        raise ManifestError(source, [f"{source}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(source, [f"{source}: cannot be read as UTF-8 text ({error})"]) from None
    if path.suffix.lower() == ".csv":
        document = _document_from_csv(source, text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        document = _document_from_yaml(source, text)
    else:
        raise ManifestError(source, [f"{source}: unknown manifest type {path.suffix!r}; use .yaml, .yml or .csv"])
    for key, value in (overrides or {}).items():
        if value is not None:
            document[key] = value
    return parse_manifest(document, base_dir=path.parent, source=source, known_styles=known_styles)


class _YamlLimitExceeded(yaml.YAMLError):
    def __init__(self, message: str, mark):
        super().__init__(message)
        self.message, self.mark = message, mark


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses, while composing, YAML nested deeper than MAX_YAML_DEPTH, an
    alias inside the node it names, and aliases that expand the document past MAX_YAML_EXPANDED_CHARS
    (each node weighs its scalar's length, or the sum of its children's weights, aliases included)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._weights: dict[int, int] = {}  # id(node) -> expanded size, for nodes composed so far
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._weights:
                raise _YamlLimitExceeded(f"alias *{event.anchor} is inside the node it names (a recursive "
                                         "structure)", event.start_mark)
            return super().compose_node(parent, index)  # an unknown anchor: the composer's own error
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimitExceeded(f"nests deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            weight = len(node.value) + 1
        elif isinstance(node, yaml.SequenceNode):
            weight = 1 + sum(self._weights[id(child)] for child in node.value)
        else:
            weight = 1 + sum(self._weights[id(key)] + self._weights[id(value)] for key, value in node.value)
        if weight > MAX_YAML_EXPANDED_CHARS:
            raise _YamlLimitExceeded(f"with its aliases (*name) expanded, holds more than {MAX_YAML_EXPANDED_CHARS} "
                                     "characters, the most a manifest may; write the entries out instead of "
                                     "nesting aliases", node.start_mark)
        self._weights[id(node)] = weight
        return node


def _document_from_yaml(source: str, text: str) -> dict[str, Any]:
    loader = _BoundedLoader(text)
    try:
        document = loader.get_single_data()
    except _YamlLimitExceeded as error:
        where = f" (at line {error.mark.line + 1}, column {error.mark.column + 1})" if error.mark else ""
        raise ManifestError(source, [f"{source}: {error.message}{where}"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(source, [f"{source}: not valid YAML{where}: {getattr(error, 'problem', error)}"]) from None
    finally:
        loader.dispose()
    if not isinstance(document, dict):
        raise ManifestError(source, [f"{source}: must be a mapping with keys {', '.join(MANIFEST_FIELDS)}"])
    return document


def _document_from_csv(source: str, text: str) -> dict[str, Any]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as error:
        raise ManifestError(source, [f"{source}: not valid CSV: {error}"]) from None
    header = [column.strip().lower() for column in (csv.reader(io.StringIO(text)).__next__() if text.strip() else [])]
    if "name" not in header or "photos" not in header:
        raise ManifestError(source, [f"{source}: the header must have columns name,photos (optional: email, id); "
                                     f"found {','.join(header) or 'nothing'}"])
    persons = []
    for row in rows:
        row = {(key or "").strip().lower(): (value or "").strip() for key, value in row.items()}
        photos = [part.strip() for part in row.get("photos", "").split(";") if part.strip()]
        person: dict[str, Any] = {"name": row.get("name", ""), "photos": photos}
        if row.get("email"):
            person["email"] = row["email"]
        if row.get("id"):
            person["id"] = row["id"]
        persons.append(person)
    return {"persons": persons}


def parse_manifest(document: dict[str, Any], *, base_dir: Path, source: str, known_styles: Iterable[str]
                   ) -> BatchManifest:
    """Validate a manifest document (already parsed). See :func:`load_manifest`."""
    problems: list[str] = []
    known_styles = sorted(known_styles)
    unknown = sorted(set(document) - set(MANIFEST_FIELDS))
    if unknown:
        problems.append(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(MANIFEST_FIELDS)}")

    tenant = document.get("tenant")
    if not isinstance(tenant, str) or not ID_PATTERN.fullmatch(tenant):
        problems.append(f"{source}: field 'tenant' must be a slug of 1-63 lowercase letters, digits and '-' "
                        f"(e.g. acme) but is {tenant!r}")
    name = document.get("batch")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        problems.append(f"{source}: field 'batch' must be a display name of 1-200 characters but is {name!r}")
    base_model = document.get("base_model", "tiny")
    if not isinstance(base_model, str) or not base_model.strip():
        problems.append(f"{source}: field 'base_model' must be 'tiny', a local diffusers folder or "
                        f"s3://bucket/prefix but is {base_model!r}")
    elif base_model != "tiny" and not base_model.startswith("s3://"):
        folder = Path(base_model) if Path(base_model).is_absolute() else (base_dir / base_model)
        if not (folder / "model_index.json").is_file():
            problems.append(f"{source}: field 'base_model' {base_model!r} is not a diffusers folder "
                            f"(no model_index.json in {folder}); use 'tiny', a diffusers folder or s3://bucket/prefix")
        else:
            base_model = str(folder.resolve())
    styles = document.get("styles")
    if isinstance(styles, str):
        styles = [part.strip() for part in styles.split(",") if part.strip()]
    if not isinstance(styles, list) or not styles or not all(isinstance(s, str) for s in styles):
        problems.append(f"{source}: field 'styles' must be a non-empty list of style names; available: "
                        f"{', '.join(known_styles)}")
        styles = []
    else:
        for style in styles:
            if style not in known_styles:
                problems.append(f"{source}: field 'styles' names unknown style {style!r}; available: "
                                f"{', '.join(known_styles)}")
        if len(set(styles)) != len(styles):
            problems.append(f"{source}: field 'styles' lists a style twice: {styles}")
    images_per_style = document.get("images_per_style", 4)
    if isinstance(images_per_style, str) and images_per_style.isdigit():
        images_per_style = int(images_per_style)
    if not isinstance(images_per_style, int) or isinstance(images_per_style, bool) or not (
            1 <= images_per_style <= MAX_IMAGES_PER_STYLE):
        problems.append(f"{source}: field 'images_per_style' must be an integer from 1 to {MAX_IMAGES_PER_STYLE} "
                        f"but is {images_per_style!r}")

    priority = document.get("priority", 0)
    if isinstance(priority, str) and priority.lstrip("-").isdigit():
        priority = int(priority)
    if not isinstance(priority, int) or isinstance(priority, bool) or not (
            PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
        problems.append(f"{source}: field 'priority' must be an integer from {PRIORITY_RANGE[0]} to "
                        f"{PRIORITY_RANGE[1]} (higher runs first within the tenant) but is {priority!r}")

    consent = _parse_consent(document.get("consent"), source, problems)
    webhooks, webhook_problems = parse_webhooks(document.get("webhooks"), where=f"{source}: field 'webhooks'")
    problems.extend(webhook_problems)

    raw_persons = document.get("persons")
    persons: list[PersonSpec] = []
    if not isinstance(raw_persons, list) or not raw_persons:
        problems.append(f"{source}: field 'persons' must be a non-empty list of {{name, photos}} entries")
        raw_persons = []
    elif len(raw_persons) > MAX_PERSONS:
        problems.append(f"{source}: field 'persons' has {len(raw_persons)} entries; at most {MAX_PERSONS} per batch")
    seen: dict[str, int] = {}
    explicit_ids = {entry.get("id") for entry in raw_persons if isinstance(entry, dict)
                    and isinstance(entry.get("id"), str)}
    for position, entry in enumerate(raw_persons):
        where = f"{source}: persons[{position}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a mapping with keys {', '.join(PERSON_FIELDS)}")
            continue
        extra = sorted(set(entry) - set(PERSON_FIELDS))
        if extra:
            problems.append(f"{where} has unknown field(s) {', '.join(extra)}; allowed: {', '.join(PERSON_FIELDS)}")
        person_name = entry.get("name")
        if not isinstance(person_name, str) or not person_name.strip():
            problems.append(f"{where}.name must be the person's name but is {person_name!r}")
            continue
        person_id = entry.get("id")
        if person_id is None:
            # Random, never derived from the name: the id is in every key, the batch manifest and the
            # receipts that outlive the person. Made once, here; the batch state keeps it from then on.
            person_id = new_person_id()
            while person_id in seen or person_id in explicit_ids:
                person_id = new_person_id()
        if not isinstance(person_id, str) or not ID_PATTERN.fullmatch(person_id):
            problems.append(f"{where}.id {person_id!r} is not a valid id (1-63 lowercase letters, digits and '-', "
                            "starting with a letter or digit); leave 'id' out and a random one is made")
            continue
        if person_id in seen:
            problems.append(f"{where}: person id {person_id!r} is already used by persons[{seen[person_id]}]; "
                            "person ids must be unique within a batch: give each person a different 'id', or "
                            "leave 'id' out and a random one is made")
            continue
        seen[person_id] = position
        email = entry.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email):
            problems.append(f"{where}.email must be an email address but is {email!r}")
            continue
        photos_field = entry.get("photos", [])
        if isinstance(photos_field, str):
            photos_field = [photos_field]
        if not isinstance(photos_field, list) or not all(isinstance(p, str) for p in photos_field):
            problems.append(f"{where}.photos must be a list of files and/or folders relative to the manifest")
            continue
        photos, missing = _expand_photos(photos_field, base_dir)
        if len(photos) > MAX_PHOTOS_PER_PERSON:
            problems.append(f"{where}.photos names {len(photos)} files; at most {MAX_PHOTOS_PER_PERSON} per person")
            continue
        given_at = entry.get("consent_given_at")
        if given_at is not None and not _is_iso_time(given_at):
            problems.append(f"{where}.consent_given_at must be an ISO-8601 date or time but is {given_at!r}")
            continue
        persons.append(PersonSpec(person_id=person_id, name=person_name.strip(), email=email, photos=photos,
                                  missing=missing, consent_given_at=str(given_at) if given_at else None))
    if problems:
        raise ManifestError(source, problems)
    return BatchManifest(tenant=tenant, name=name.strip(), base_model=base_model, styles=list(styles),
                         images_per_style=images_per_style, persons=persons, source=source, consent=consent,
                         priority=priority, webhooks=webhooks)


def _is_iso_time(value: Any) -> bool:
    import datetime as _datetime

    if isinstance(value, (_datetime.date, _datetime.datetime)):
        return True
    try:
        _datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _parse_consent(raw: Any, source: str, problems: list[str]) -> Consent | None:
    """Photos are accepted only with consent: the manifest must say who collected it, and when."""
    example = "consent: {collected_by: hr@acme.example, given_at: 2026-11-20}"
    if raw is None:
        problems.append(f"{source}: field 'consent' is required: photos are accepted only with a consent record "
                        f"(e.g. {example}; for a CSV roster: --consent-collected-by and --consent-given-at)")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{source}: field 'consent' must be a mapping like {example}")
        return None
    found: list[str] = []
    unknown = sorted(set(raw) - set(CONSENT_FIELDS))
    if unknown:
        found.append(f"{source}: field 'consent' has unknown key(s) {', '.join(unknown)}; allowed: "
                     f"{', '.join(CONSENT_FIELDS)}")
    collected_by = raw.get("collected_by")
    if not isinstance(collected_by, str) or not collected_by.strip():
        found.append(f"{source}: field 'consent.collected_by' must say who collected the consents "
                     f"but is {collected_by!r}")
    given_at = raw.get("given_at")
    if not _is_iso_time(given_at):
        found.append(f"{source}: field 'consent.given_at' must be an ISO-8601 date or time but is {given_at!r}")
    purpose = raw.get("purpose", "headshots")
    if purpose not in CONSENT_PURPOSES:
        found.append(f"{source}: field 'consent.purpose' must be one of {', '.join(CONSENT_PURPOSES)} "
                     f"(uploads are used only for that person's own headshots) but is {purpose!r}")
    problems.extend(found)
    if found:
        return None
    return Consent(collected_by=collected_by.strip(), given_at=str(given_at), purpose=purpose,
                   policy_version=str(raw.get("policy_version") or ""))


def _expand_photos(entries: list[str], base_dir: Path) -> tuple[list[Path], list[str]]:
    photos: list[Path] = []
    missing: list[str] = []
    for entry in entries:
        target = Path(entry) if Path(entry).is_absolute() else base_dir / entry
        if target.is_dir():
            photos.extend(sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith(".")))
        elif target.is_file():
            photos.append(target)
        else:
            missing.append(entry)
    # The same file listed twice (a folder and one of its files) counts once.
    unique: list[Path] = []
    for photo in photos:
        if photo.resolve() not in {p.resolve() for p in unique}:
            unique.append(photo)
    return unique, missing
