"""Deletion receipts: what was deleted, why, when, and the proof that it is gone. Ids only.

Layout (receipts bucket):
    _system/receipts/<YYYY-MM-DD>/<receipt_id>.json                  the receipts, by day written
    _system/receipts/index/<tenant>/<batch>/<person>/<receipt_id>    markers for listing by person
    _system/receipts/pending/<receipt_id>/<tenant>/<batch>/<person>.json
        intents: written before a person's deletion starts, removed once a finished receipt holds it.
        A sweep that dies half-way leaves intents behind; the next sweep completes them and puts them
        in its own receipt, so every deleted version ends up in exactly one finished receipt.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from storage import keys
from storage.crypto import key_material_versions
from storage.store import ArtifactStore, ObjectNotFound, utc_now_iso

RECEIPTS_PREFIX = f"{keys.SYSTEM_PREFIX}/receipts/"
INDEX_PREFIX = f"{RECEIPTS_PREFIX}index/"
PENDING_PREFIX = f"{RECEIPTS_PREFIX}pending/"
SCHEMA_VERSION = 1
KINDS = ("sweep", "request")


class ReceiptNotFound(ObjectNotFound):
    pass


def new_receipt_id(kind: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{kind}-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def receipt_key(receipt_id: str) -> str:
    """Where a receipt lives: filed under the day its id was issued (so it can be found without listing)."""
    kind, _, rest = receipt_id.partition("-")
    stamp = rest.split("-", 1)[0]
    if kind not in KINDS or len(stamp) < 8 or not stamp[:8].isdigit():
        raise ReceiptNotFound(f"{receipt_id!r} is not a receipt id (expected e.g. request-20261126T120000-1a2b3c4d)",
                              bucket="receipts", key=receipt_id)
    return f"{RECEIPTS_PREFIX}{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}/{receipt_id}.json"


def receipt_exists(store: ArtifactStore, receipt_id: str) -> bool:
    return store.exists("receipts", receipt_key(receipt_id))


@dataclass
class Receipt:
    receipt_id: str
    kind: str
    requested_by: str
    policy: dict[str, Any]
    started_at: str
    as_of: str  # the instant the sweep judged due-ness by (injected clock), or the request time
    scope: dict[str, Any] = field(default_factory=dict)
    persons: list[dict[str, Any]] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    worker_purges: list[dict[str, Any]] = field(default_factory=list)
    # Every node that hosts or hosted GPU workers: confirmed, or not (dead, unreachable, timed out) and
    # how it is covered then (cluster/purge.py). Receipts written before this field have none.
    nodes: list[dict[str, Any]] = field(default_factory=list)
    keys_destroyed: list[dict[str, Any]] = field(default_factory=list)
    # Early deletions: the deletion barrier raised for each person before anything was deleted.
    barriers: list[dict[str, Any]] = field(default_factory=list)
    completed_from: list[str] = field(default_factory=list)
    finished_at: str | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"receipt kind must be one of {', '.join(KINDS)} but is {self.kind!r}")

    @property
    def key(self) -> str:
        return receipt_key(self.receipt_id)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **{name: getattr(self, name) for name in self.__dataclass_fields__}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Receipt":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def summary(self) -> dict[str, Any]:
        by_class: dict[str, dict[str, int]] = {}
        for item in self.objects:
            entry = by_class.setdefault(item["artifact"], {"versions": 0, "bytes": 0})
            entry["versions"] += 1
            entry["bytes"] += int(item.get("size") or 0)
        return {"receipt_id": self.receipt_id, "kind": self.kind, "persons": len(self.persons),
                "objects_deleted": len(self.objects), "by_artifact": by_class, "nodes": self.node_summary(),
                "bytes": sum(e["bytes"] for e in by_class.values()),
                "verification": self.verification, "started_at": self.started_at, "finished_at": self.finished_at}


    def node_summary(self) -> dict[str, Any]:
        """How many nodes confirmed the purge, and the address and outcome of each one that did not."""
        unconfirmed = [{"address": node.get("address"), "node_id": node.get("node_id"), "outcome": node.get("outcome"),
                        "covered_by": (node.get("coverage") or {}).get("mechanisms", [])}
                       for node in self.nodes if not node.get("confirmed")]
        return {"confirmed": len(self.nodes) - len(unconfirmed), "not_confirmed": unconfirmed}


def write_intent(store: ArtifactStore, receipt_id: str, person: keys.PersonRef, intent: Mapping[str, Any]) -> str:
    key = f"{PENDING_PREFIX}{receipt_id}/{person.tenant}/{person.batch_id}/{person.person_id}.json"
    store.put_json("receipts", key, dict(intent))
    return key


def pending_intents(store: ArtifactStore) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for key in store.list_keys("receipts", PENDING_PREFIX):
        try:
            found.append((key, store.get_json("receipts", key)))
        except ObjectNotFound:
            continue
    return found


def remove_keys(store: ArtifactStore, artifact: str, keys_to_remove: Iterable[str]) -> None:
    """Remove objects and all their versions (receipt bookkeeping only: small counts)."""
    for key in keys_to_remove:
        versions = [(k, v) for k, v, _ in store.list_versions(artifact, key) if k == key]
        if versions:
            store.remove_versions(artifact, versions)


def save_receipt(store: ArtifactStore, receipt: Receipt) -> str:
    """Write the finished receipt and its per-person index markers."""
    receipt.finished_at = receipt.finished_at or utc_now_iso()
    unique = {(p["tenant"], p["batch_id"], p["person_id"]): p for p in receipt.persons}
    receipt.persons = list(unique.values())
    versions = {(o["bucket"], o["key"], o["version_id"]): o for o in receipt.objects}
    receipt.objects = list(versions.values())
    store.put_json("receipts", receipt.key, receipt.to_json())
    for person in receipt.persons:
        marker = f"{INDEX_PREFIX}{person['tenant']}/{person['batch_id']}/{person['person_id']}/{receipt.receipt_id}"
        store.put("receipts", marker, receipt.key.encode(), content_type="text/plain")
    return receipt.key


def load_receipt(store: ArtifactStore, receipt_id: str) -> Receipt:
    key = receipt_key(receipt_id)
    try:
        return Receipt.from_json(store.get_json("receipts", key))
    except ObjectNotFound:
        raise ReceiptNotFound(f"no receipt {receipt_id!r}; `headshots receipts` lists them",
                              bucket=store.bucket("receipts"), key=key) from None


def list_receipts(store: ArtifactStore, *, tenant: str | None = None, batch_id: str | None = None,
                  person_id: str | None = None) -> list[Receipt]:
    """Receipts, newest first; with a filter, those naming a matching person."""
    if tenant is None and (batch_id or person_id):
        raise ValueError("filtering by batch or person needs the tenant too (ids are unique only within one)")
    if tenant:
        prefix = INDEX_PREFIX + keys.tenant_prefix(tenant)
        if batch_id:
            prefix += f"{keys.validate_id(batch_id, field='batch_id')}/"
            if person_id:
                prefix += f"{keys.validate_id(person_id, field='person_id')}/"
        receipt_keys = sorted({store.get("receipts", marker).decode() for marker in store.list_keys("receipts", prefix)})
    else:
        receipt_keys = [key for key in store.list_keys("receipts", RECEIPTS_PREFIX)
                        if key.endswith(".json") and not key.startswith((INDEX_PREFIX, PENDING_PREFIX))]
    receipts = []
    for key in receipt_keys:
        try:
            receipts.append(Receipt.from_json(store.get_json("receipts", key)))
        except ObjectNotFound:
            continue  # expired under the receipts' own retention; its index marker outlived it
    return sorted(receipts, key=lambda r: r.started_at, reverse=True)


def verify_receipt(store: ArtifactStore, receipt_id: str) -> dict[str, Any]:
    """List the store again: is every object version the receipt names still absent?"""
    receipt = load_receipt(store, receipt_id)
    present = []
    buckets = {store.bucket(artifact): artifact for artifact in store.buckets}
    by_bucket_key: dict[tuple[str, str], set[str | None]] = {}
    for item in receipt.objects:
        by_bucket_key.setdefault((item["bucket"], item["key"]), set()).add(item["version_id"])
    for (bucket, key), version_ids in by_bucket_key.items():
        artifact = buckets.get(bucket)
        if artifact is None:
            continue
        for listed_key, version_id, _ in store.list_versions(artifact, key):
            if listed_key == key and version_id in version_ids:
                present.append({"bucket": bucket, "key": key, "version_id": version_id})
    key_objects_present = []
    for destroyed in receipt.keys_destroyed:
        # A destroyed key keeps one version, a tombstone without key material (storage/crypto.py).
        if key_material_versions(store, destroyed["key"]):
            key_objects_present.append(destroyed["key"])
    return {"receipt_id": receipt_id, "objects_checked": len(receipt.objects), "still_present": present,
            "keys_still_present": key_objects_present, "verified": not present and not key_objects_present,
            "checked_at": utc_now_iso()}


def receipt_json_dumps(receipt: Receipt) -> str:
    return json.dumps(receipt.to_json(), indent=1, sort_keys=True)
