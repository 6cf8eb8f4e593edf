"""Retention policy and the expiry index.

The index is what keeps a sweep's cost proportional to what is expiring rather than to what is
stored: one small object per person under ``_system/expiry/<YYYY-MM-DD>/<tenant>/<batch>/<person>``
(state bucket), filed under the day its next artifact class falls due. A sweep lists only the day
partitions up to today, and every entry it finds is either acted on or re-filed under its next due
day. Entries are written at submit (so even a person whose batch never got going expires) and again
when the person reaches a final state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from storage import keys
from storage.state import FINAL_PERSON_STATES, PersonStatus
from storage.store import ArtifactStore, ObjectNotFound

EXPIRING_CLASSES = ("uploads", "derived", "models", "outputs")
DEFAULT_POLICY_PATH = Path(__file__).with_name("retention_policy.yaml")
EXPIRY_PREFIX = f"{keys.SYSTEM_PREFIX}/expiry/"
# A person not yet processed is looked at again this much later.
RECHECK_UNPROCESSED = timedelta(days=1)


class PolicyError(ValueError):
    """The retention policy file is malformed or asks for more than allowed."""


def parse_time(value: str) -> datetime:
    """ISO-8601 → aware UTC datetime ('Z' accepted; a naive time is taken as UTC)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RetentionPolicy:
    """Days to keep each artifact class (None: keep), per tenant within ``max_days``."""

    version: str
    max_days: int
    days: Mapping[str, int | None]
    receipts_days: int = 1095
    tenants: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.version:
            raise PolicyError("retention policy field 'version' must be a non-empty string")
        if not isinstance(self.max_days, int) or self.max_days < 1:
            raise PolicyError(f"retention policy field 'max_days' must be a positive integer but is {self.max_days!r}")
        self._check_days("days", self.days, require_all=True)
        for tenant, overrides in self.tenants.items():
            keys.validate_id(tenant, field="retention policy tenant")
            self._check_days(f"tenants.{tenant}", overrides, require_all=False)
        if not isinstance(self.receipts_days, int) or self.receipts_days < 1:
            raise PolicyError(f"retention policy field 'receipts_days' must be a positive integer "
                              f"but is {self.receipts_days!r}")

    def _check_days(self, where: str, days: Mapping[str, Any], *, require_all: bool) -> None:
        if not isinstance(days, Mapping):
            raise PolicyError(f"retention policy field '{where}' must map artifact classes to days")
        unknown = set(days) - set(EXPIRING_CLASSES)
        if unknown:
            raise PolicyError(f"retention policy field '{where}' names unknown artifact class(es) "
                              f"{', '.join(sorted(unknown))}; allowed: {', '.join(EXPIRING_CLASSES)}")
        if require_all and set(days) != set(EXPIRING_CLASSES):
            missing = set(EXPIRING_CLASSES) - set(days)
            raise PolicyError(f"retention policy field '{where}' must give every class; missing: "
                              f"{', '.join(sorted(missing))}")
        for artifact, value in days.items():
            if value is None:
                if artifact != "outputs":
                    raise PolicyError(f"retention policy field '{where}.{artifact}' must be a number of days: "
                                      "only outputs may be kept indefinitely (null)")
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not (0 <= value <= self.max_days):
                raise PolicyError(f"retention policy field '{where}.{artifact}' must be 0..{self.max_days} days "
                                  f"(max_days) but is {value!r}")

    def days_for(self, tenant: str, artifact: str) -> int | None:
        overrides = self.tenants.get(tenant, {})
        return overrides[artifact] if artifact in overrides else self.days[artifact]

    def due_times(self, tenant: str, clock_start: datetime) -> dict[str, datetime]:
        """Artifact class → when it falls due (classes kept indefinitely are absent)."""
        return {artifact: clock_start + timedelta(days=days) for artifact in EXPIRING_CLASSES
                if (days := self.days_for(tenant, artifact)) is not None}

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "max_days": self.max_days, "days": dict(self.days),
                "receipts_days": self.receipts_days, "tenants": {t: dict(d) for t, d in self.tenants.items()}}

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], *, source: str = "policy") -> "RetentionPolicy":
        if not isinstance(document, Mapping):
            raise PolicyError(f"{source}: must be a mapping with version, max_days, days, tenants")
        allowed = {"version", "max_days", "days", "receipts_days", "tenants"}
        unknown = set(document) - allowed
        if unknown:
            raise PolicyError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; allowed: "
                              f"{', '.join(sorted(allowed))}")
        try:
            return cls(version=str(document.get("version", "")), max_days=document.get("max_days", 90),
                       days=dict(document.get("days") or {}), receipts_days=document.get("receipts_days", 1095),
                       tenants={t: dict(v or {}) for t, v in (document.get("tenants") or {}).items()})
        except PolicyError as error:
            raise PolicyError(f"{source}: {error}") from None
        except keys.InvalidId as error:
            raise PolicyError(f"{source}: {error}") from None


def load_policy(path: str | Path | None = None) -> RetentionPolicy:
    """The policy from ``path`` (default: the built-in one)."""
    path = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise PolicyError(f"cannot read retention policy {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"retention policy {path} is not valid YAML: {error}") from None
    return RetentionPolicy.from_mapping(document or {}, source=str(path))


# --- the clock ---------------------------------------------------------------------------------


def clock_start(person_state: Mapping[str, Any]) -> datetime | None:
    """When the person's retention clock started, from its state document; None while not started.

    Processed persons count from ``processed_at``; a person waiting for photos from its last upload.
    """
    if person_state.get("state") == PersonStatus.NEEDS_PHOTOS:
        moment = person_state.get("last_upload_at") or person_state.get("processed_at")
        return parse_time(moment) if moment else None
    if person_state.get("state") in FINAL_PERSON_STATES and person_state.get("processed_at"):
        return parse_time(person_state["processed_at"])
    return None


# --- the index ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiryEntry:
    key: str  # the index object's key
    day: str
    tenant: str
    batch_id: str
    person_id: str

    @property
    def person(self) -> keys.PersonRef:
        return keys.PersonRef(self.tenant, self.batch_id, self.person_id)


def index_key(day: datetime, person: keys.PersonRef) -> str:
    return f"{EXPIRY_PREFIX}{day:%Y-%m-%d}/{person.tenant}/{person.batch_id}/{person.person_id}"


def file_person(store: ArtifactStore, person: keys.PersonRef, due: datetime, *, reason: str) -> str:
    """File (or re-file) the person under the day ``due`` falls on. Idempotent."""
    key = index_key(due, person)
    store.put_json("state", key, {"tenant": person.tenant, "batch_id": person.batch_id,
                                  "person_id": person.person_id, "due": format_time(due), "reason": reason})
    return key


def due_days(store: ArtifactStore, now: datetime) -> list[str]:
    """Day partitions of the index up to and including ``now``'s day (one listing of prefixes)."""
    today = f"{now:%Y-%m-%d}"
    days = []
    for folder in store.list_subprefixes("state", EXPIRY_PREFIX):
        day = folder[len(EXPIRY_PREFIX):].rstrip("/")
        if day <= today:
            days.append(day)
    return sorted(days)


def due_entries(store: ArtifactStore, now: datetime) -> Iterator[ExpiryEntry]:
    """Every index entry filed on a day up to ``now``."""
    for day in due_days(store, now):
        for key in store.list_keys("state", f"{EXPIRY_PREFIX}{day}/"):
            parts = key[len(EXPIRY_PREFIX):].split("/")
            if len(parts) == 4:
                yield ExpiryEntry(key=key, day=parts[0], tenant=parts[1], batch_id=parts[2], person_id=parts[3])


def remove_entry(store: ArtifactStore, key: str) -> None:
    """Remove an index entry, every version (entries carry ids only, but leave no clutter to re-list)."""
    for entry_key, version_id, _ in store.list_versions("state", key):
        if entry_key == key:
            store.remove_version("state", key, version_id=version_id or "null")


def read_person_document(store: ArtifactStore, person: keys.PersonRef) -> dict[str, Any] | None:
    try:
        return json.loads(store.get("state", keys.person_state_key(person)))
    except ObjectNotFound:
        return None
