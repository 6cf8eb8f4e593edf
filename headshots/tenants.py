"""Tenants of the HTTP API: their records, API keys (stored hashed), limits and webhook secret.

Layout (state bucket):
    _system/tenants/<tenant>/record.json     the tenant: name, hashed keys, limits, webhook_secret
    _system/admin/record.json                operators' admin keys (hashed), valid for every tenant
    _system/api-keys/<key_id>.json           key id → owner, so a request's key is found in one read

An API key reads ``hs_<key_id>_<secret>``: ``key_id`` (16 hex digits) names it without revealing it,
``secret`` is 32 random bytes (URL-safe base64). Only ``sha256(salt || secret)`` with a per-key random
salt is stored. A slow hash (scrypt, PBKDF2) protects guessable passwords; a 256-bit random secret
cannot be guessed, so a fast hash loses nothing and keeps the check cheap on every request, while
the salt still makes two stores' hashes incomparable. Keys are shown once, when created.

Records change by compare-and-swap (If-Match), so two operators revoking keys at once both land.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from storage import keys
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, WriteConflict, utc_now_iso

KEY_PREFIX = "hs"
ROLES = ("tenant", "admin")
MAX_RECORD_UPDATE_ATTEMPTS = 10


class TenantError(ValueError):
    """A tenant operation that cannot be done as asked (the message says why and what to do)."""


class TenantExists(TenantError):
    pass


class TenantNotFound(TenantError):
    pass


@dataclass
class ApiKeyRecord:
    """One API key as stored: never the key itself."""

    key_id: str
    salt: str  # hex
    sha256: str  # hex of sha256(salt || secret)
    created_at: str
    role: str = "tenant"
    revoked_at: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} but is {self.role!r}")

    def matches(self, secret: str) -> bool:
        digest = hashlib.sha256(bytes.fromhex(self.salt) + secret.encode()).hexdigest()
        return hmac.compare_digest(digest, self.sha256)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "salt": self.salt, "sha256": self.sha256, "created_at": self.created_at,
                "role": self.role, "revoked_at": self.revoked_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ApiKeyRecord":
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__ if name in data})

    def public(self) -> dict[str, Any]:
        """What listing shows: no hash, no salt."""
        return {"key_id": self.key_id, "role": self.role, "created_at": self.created_at, "revoked_at": self.revoked_at}


@dataclass
class TenantRecord:
    tenant: str
    name: str
    created_at: str
    api_keys: list[ApiKeyRecord] = field(default_factory=list)
    rate_limit_per_s: float = 20.0
    max_concurrent_batches: int = 10
    # Signs webhook deliveries to this tenant (headshots/webhooks.py reads it); shown once at creation.
    webhook_secret: str = ""
    etag: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        keys.validate_id(self.tenant, field="tenant")
        if not 0 < float(self.rate_limit_per_s) <= 100_000:
            raise ValueError(f"rate_limit_per_s must be between 0 (exclusive) and 100000 but is {self.rate_limit_per_s}")
        if not isinstance(self.max_concurrent_batches, int) or not 1 <= self.max_concurrent_batches <= 100_000:
            raise ValueError(f"max_concurrent_batches must be an integer from 1 to 100000 but is "
                             f"{self.max_concurrent_batches!r}")

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "name": self.name, "created_at": self.created_at,
                "api_keys": [key.to_json() for key in self.api_keys],
                "limits": {"rate_limit_per_s": self.rate_limit_per_s,
                           "max_concurrent_batches": self.max_concurrent_batches},
                "webhook_secret": self.webhook_secret, "schema_version": 1}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TenantRecord":
        limits = data.get("limits") or {}
        return cls(tenant=data["tenant"], name=data.get("name") or data["tenant"], created_at=data["created_at"],
                   api_keys=[ApiKeyRecord.from_json(k) for k in data.get("api_keys") or []],
                   rate_limit_per_s=float(limits.get("rate_limit_per_s", 20.0)),
                   max_concurrent_batches=int(limits.get("max_concurrent_batches", 10)),
                   webhook_secret=data.get("webhook_secret") or "")

    def public(self) -> dict[str, Any]:
        """What `tenants list` shows: no secrets."""
        return {"tenant": self.tenant, "name": self.name, "created_at": self.created_at,
                "limits": {"rate_limit_per_s": self.rate_limit_per_s,
                           "max_concurrent_batches": self.max_concurrent_batches},
                "api_keys": [key.public() for key in self.api_keys]}


@dataclass(frozen=True)
class Principal:
    """Who a request is: a tenant's key, or an operator's admin key (``tenant`` None)."""

    role: str
    key_id: str
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def parse_api_key(api_key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    if not isinstance(api_key, str) or len(api_key) > 200:
        return None
    prefix, _, rest = api_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not keys.API_KEY_ID_PATTERN.fullmatch(key_id) or len(secret) < 20:
        return None
    return key_id, secret


def _new_key(role: str) -> tuple[str, ApiKeyRecord]:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = ApiKeyRecord(key_id=key_id, salt=salt.hex(), sha256=hashlib.sha256(salt + secret.encode()).hexdigest(),
                          created_at=utc_now_iso(), role=role)
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


# --- tenants ---------------------------------------------------------------------------------------

def create_tenant(store: ArtifactStore, name: str, *, tenant: str | None = None,
                  rate_limit_per_s: float = 20.0, max_concurrent_batches: int = 10) -> tuple[TenantRecord, str]:
    """Create a tenant with one API key.

    Args:
        name: display name.
        tenant: the tenant id (default: the name as a slug).

    Returns:
        (the record, the API key: shown only now).

    Raises:
        TenantExists: the id is taken.
        storage.keys.InvalidId: the id is not a valid id.
    """
    tenant = keys.validate_id(tenant or keys.slugify(name), field="tenant")
    api_key, key_record = _new_key("tenant")
    record = TenantRecord(tenant=tenant, name=name.strip() or tenant, created_at=utc_now_iso(),
                          api_keys=[key_record], rate_limit_per_s=rate_limit_per_s,
                          max_concurrent_batches=max_concurrent_batches,
                          webhook_secret=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))
    try:
        store.put_json("state", keys.tenant_record_key(tenant), record.to_json(), if_absent=True)
    except ObjectExists:
        raise TenantExists(f"tenant {tenant!r} already exists: `headshots tenants list` shows it; "
                           "`headshots tenants add-key` gives it another key") from None
    _index_key(store, key_record.key_id, tenant=tenant, role="tenant")
    return record, api_key


def load_tenant(store: ArtifactStore, tenant: str) -> TenantRecord:
    try:
        data, etag = store.get_with_etag("state", keys.tenant_record_key(tenant))
    except ObjectNotFound:
        raise TenantNotFound(f"no tenant {tenant!r}: `headshots tenants list` shows the tenants") from None
    import json

    record = TenantRecord.from_json(json.loads(data))
    record.etag = etag
    return record


def tenant_exists(store: ArtifactStore, tenant: str) -> bool:
    return store.exists("state", keys.tenant_record_key(tenant))


def list_tenants(store: ArtifactStore) -> list[TenantRecord]:
    records = []
    for key in store.list_keys("state", keys.TENANTS_PREFIX):
        parts = key[len(keys.TENANTS_PREFIX):].split("/")
        if len(parts) == 2 and parts[1] == "record.json":
            try:
                records.append(load_tenant(store, parts[0]))
            except TenantNotFound:
                continue
    return sorted(records, key=lambda r: r.tenant)


def _update_tenant(store: ArtifactStore, tenant: str, change) -> TenantRecord:
    """Apply ``change(record)`` and save with If-Match, reloading when another writer got there first."""
    for _ in range(MAX_RECORD_UPDATE_ATTEMPTS):
        record = load_tenant(store, tenant)
        change(record)
        try:
            store.put_json("state", keys.tenant_record_key(tenant), record.to_json(), if_match=record.etag)
            return record
        except WriteConflict:
            continue
    raise TenantError(f"tenant {tenant!r} kept changing under {MAX_RECORD_UPDATE_ATTEMPTS} attempts; try again")


def add_api_key(store: ArtifactStore, tenant: str) -> str:
    """A new key for ``tenant`` (e.g. to rotate: add, switch clients over, revoke the old one)."""
    api_key, key_record = _new_key("tenant")
    _update_tenant(store, tenant, lambda record: record.api_keys.append(key_record))
    _index_key(store, key_record.key_id, tenant=tenant, role="tenant")
    return api_key


def set_limits(store: ArtifactStore, tenant: str, *, rate_limit_per_s: float | None = None,
               max_concurrent_batches: int | None = None) -> TenantRecord:
    def change(record: TenantRecord) -> None:
        if rate_limit_per_s is not None:
            record.rate_limit_per_s = float(rate_limit_per_s)
        if max_concurrent_batches is not None:
            record.max_concurrent_batches = int(max_concurrent_batches)
        record.__post_init__()  # the same bounds as at creation

    return _update_tenant(store, tenant, change)


# --- admin keys ------------------------------------------------------------------------------------

def create_admin_key(store: ArtifactStore) -> str:
    """A new operator key that may act on any tenant (``X-Headshots-Tenant`` names which)."""
    api_key, key_record = _new_key("admin")
    for _ in range(MAX_RECORD_UPDATE_ATTEMPTS):
        try:
            data, etag = store.get_with_etag("state", keys.admin_record_key())
            import json

            document = json.loads(data)
        except ObjectNotFound:
            document, etag = {"api_keys": []}, None
        document["api_keys"].append(key_record.to_json())
        try:
            store.put_json("state", keys.admin_record_key(), document, if_absent=etag is None, if_match=etag)
            break
        except WriteConflict:
            continue
    else:
        raise TenantError("the admin record kept changing; try again")
    _index_key(store, key_record.key_id, tenant=None, role="admin")
    return api_key


def _admin_keys(store: ArtifactStore) -> list[ApiKeyRecord]:
    try:
        document = store.get_json("state", keys.admin_record_key())
    except ObjectNotFound:
        return []
    return [ApiKeyRecord.from_json(k) for k in document.get("api_keys") or []]


def _index_key(store: ArtifactStore, key_id: str, *, tenant: str | None, role: str) -> None:
    store.put_json("state", keys.api_key_index_key(key_id), {"key_id": key_id, "tenant": tenant, "role": role},
                   if_absent=True)


def revoke_api_key(store: ArtifactStore, key_id: str) -> dict[str, Any]:
    """Revoke one key (tenant or admin) by its id; idempotent.

    Raises:
        TenantError: no such key.
    """
    try:
        owner = store.get_json("state", keys.api_key_index_key(key_id))
    except ObjectNotFound:
        raise TenantError(f"no API key {key_id!r}: `headshots tenants list` shows the key ids") from None
    revoked_at = utc_now_iso()
    if owner.get("role") == "admin":
        for _ in range(MAX_RECORD_UPDATE_ATTEMPTS):
            import json

            data, etag = store.get_with_etag("state", keys.admin_record_key())
            document = json.loads(data)
            for entry in document["api_keys"]:
                if entry["key_id"] == key_id and not entry.get("revoked_at"):
                    entry["revoked_at"] = revoked_at
            try:
                store.put_json("state", keys.admin_record_key(), document, if_match=etag)
                break
            except WriteConflict:
                continue
    else:
        def change(record: TenantRecord) -> None:
            for entry in record.api_keys:
                if entry.key_id == key_id and not entry.revoked_at:
                    entry.revoked_at = revoked_at

        _update_tenant(store, owner["tenant"], change)
    return {"key_id": key_id, "tenant": owner.get("tenant"), "role": owner.get("role"), "revoked": True}


def authenticate(store: ArtifactStore, api_key: str) -> Principal | None:
    """The principal an API key stands for, or None (malformed, unknown, revoked or wrong secret).

    Every failure looks the same to the caller, so a guess learns nothing about which part was wrong.
    """
    parsed = parse_api_key(api_key)
    if parsed is None:
        return None
    key_id, secret = parsed
    try:
        owner = store.get_json("state", keys.api_key_index_key(key_id))
    except ObjectNotFound:
        return None
    if owner.get("role") == "admin":
        candidates = _admin_keys(store)
        tenant = None
    else:
        tenant = owner.get("tenant")
        try:
            candidates = load_tenant(store, tenant).api_keys
        except (TenantNotFound, keys.InvalidId):
            return None
    for record in candidates:
        if record.key_id == key_id and record.revoked_at is None and record.matches(secret):
            return Principal(role=record.role, key_id=key_id, tenant=tenant)
    return None
