"""The object key layout. Every key is built here, from validated ids only.

    <tenant>/<batch>/<person>/...          per-person artifacts, in every bucket
    <tenant>/<batch>/_batch/...            batch-level files
    _system/...                            indexes, keys, receipts

Ids match ``[a-z0-9][a-z0-9-]{0,62}``: no ``/``, no ``..``, no control characters, so no id can
escape its prefix. Names and emails never appear in a key.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
BATCH_PREFIX = "_batch"
SYSTEM_PREFIX = "_system"
COORDINATOR_EPOCH_PREFIX = f"{SYSTEM_PREFIX}/coordinator/epoch-"


class InvalidId(ValueError):
    """An id does not match the allowed pattern."""


def validate_id(value: str, *, field: str) -> str:
    """Return ``value`` if it is a valid id.

    Raises:
        InvalidId: naming the field, the value and the allowed pattern.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidId(
            f"{field} {value!r} is not a valid id: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return value


def slugify(text: str, *, max_length: int = 63) -> str:
    """Turn a display name into an id: 'Zoë O'Brien' → 'zoe-obrien'. Returns '' when nothing usable is left."""
    normalized = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    normalized = normalized.replace("'", "")
    slug = re.sub(r"[^a-z0-9]+", "-", normalized).strip("-")
    return slug[:max_length].rstrip("-")


PERSON_ID_PREFIX = "p-"


def new_person_id() -> str:
    """A person id for a roster entry without one: ``p-`` and 12 random hex digits (48 bits).

    Never derived from the name, the email or anything else about the person: the id is in every key
    of theirs, in the batch manifest, the download's folders and the deletion receipts that are kept.
    """
    return f"{PERSON_ID_PREFIX}{secrets.token_hex(6)}"


def new_batch_id(display_name: str, *, now: datetime | None = None) -> str:
    """A unique batch id: ``<slug>-<yyyymmdd>-<random>``."""
    now = now or datetime.now(timezone.utc)
    suffix = f"{now:%Y%m%d}-{secrets.token_hex(3)}"
    stem = slugify(display_name, max_length=63 - len(suffix) - 1) or "batch"
    return validate_id(f"{stem}-{suffix}", field="batch_id")


@dataclass(frozen=True)
class PersonRef:
    """Who an artifact belongs to. Person ids are unique only within a batch."""

    tenant: str
    batch_id: str
    person_id: str

    def __post_init__(self) -> None:
        validate_id(self.tenant, field="tenant")
        validate_id(self.batch_id, field="batch_id")
        validate_id(self.person_id, field="person_id")

    @property
    def prefix(self) -> str:
        return f"{self.tenant}/{self.batch_id}/{self.person_id}/"


def batch_prefix(tenant: str, batch_id: str) -> str:
    validate_id(tenant, field="tenant")
    validate_id(batch_id, field="batch_id")
    return f"{tenant}/{batch_id}/"


def tenant_prefix(tenant: str) -> str:
    return f"{validate_id(tenant, field='tenant')}/"


# --- per person -------------------------------------------------------------------------------


def upload_key(person: PersonRef, index: int, extension: str) -> str:
    return f"{person.prefix}uploads/{index:03d}{_extension(extension)}"


def crop_key(person: PersonRef, index: int) -> str:
    return f"{person.prefix}crops/{index:03d}.png"


def training_cache_key(person: PersonRef) -> str:
    return f"{person.prefix}cache/training-cache.safetensors"


def identity_reference_key(person: PersonRef) -> str:
    """Face embeddings of the accepted photos: biometric data, so a derived artifact (retention deletes it)."""
    return f"{person.prefix}identity/reference-embeddings.json"


def checkpoint_key(person: PersonRef) -> str:
    # One key, overwritten: older checkpoints stay as noncurrent versions until retention deletes them.
    return f"{person.prefix}checkpoints/train-state.pt"


def lora_key(person: PersonRef) -> str:
    return f"{person.prefix}lora/pytorch_lora_weights.safetensors"


def headshot_key(person: PersonRef, style: str, index: int, seed: int, extension: str = ".png") -> str:
    validate_id(style, field="style")
    return f"{person.prefix}headshots/{style}/{index:03d}-{seed}{_extension(extension)}"


def person_contact_sheet_key(person: PersonRef) -> str:
    return f"{person.prefix}contact-sheet.png"


def person_state_key(person: PersonRef) -> str:
    return f"{person.prefix}state.json"


# --- per batch --------------------------------------------------------------------------------


def batch_state_key(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}{BATCH_PREFIX}/state.json"


def batch_contact_sheet_key(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}{BATCH_PREFIX}/contact-sheet.png"


def batch_manifest_key(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}{BATCH_PREFIX}/manifest.json"


def batch_progress_key(tenant: str, batch_id: str) -> str:
    """Live progress of a running batch (ETAs from measured stage times), written by the coordinator."""
    return f"{batch_prefix(tenant, batch_id)}{BATCH_PREFIX}/progress.json"


def coordinator_epoch_key(epoch: int) -> str:
    """One create-only marker per coordinator epoch: whoever creates it owns that epoch."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be an integer >= 1 but is {epoch!r}")
    return f"{COORDINATOR_EPOCH_PREFIX}{epoch:012d}"


def batch_index_key(tenant: str, batch_id: str) -> str:
    """An empty marker per batch so listing batches never walks per-person objects."""
    return f"{SYSTEM_PREFIX}/batches/{validate_id(tenant, field='tenant')}/{validate_id(batch_id, field='batch_id')}"


def batch_index_prefix(tenant: str | None = None) -> str:
    return f"{SYSTEM_PREFIX}/batches/" + (tenant_prefix(tenant) if tenant else "")


def open_batch_key(tenant: str, batch_id: str) -> str:
    """An empty marker per batch that is created or running (storage/state.py keeps it), so counting a
    tenant's open batches reads only those, not every batch the tenant ever made."""
    return f"{open_batch_prefix(tenant)}{validate_id(batch_id, field='batch_id')}"


def open_batch_prefix(tenant: str) -> str:
    return f"{SYSTEM_PREFIX}/open-batches/{tenant_prefix(tenant)}"


# --- webhooks ---------------------------------------------------------------------------------

WEBHOOKS_PREFIX = f"{SYSTEM_PREFIX}/webhooks"
# The per-stack signing secret, for batches of tenants without a tenant record (operator batches).
WEBHOOK_DEFAULT_SECRET_KEY = f"{WEBHOOKS_PREFIX}/default-secret"


def webhook_pending_prefix(source: str) -> str:
    """Deliveries not yet finished, per emitting process (``coordinator``, ``retention``)."""
    return f"{WEBHOOKS_PREFIX}/pending/{validate_id(source, field='webhook source')}/"


def webhook_pending_key(source: str, delivery_id: str) -> str:
    return f"{webhook_pending_prefix(source)}{validate_id(delivery_id, field='delivery id')}.json"


def _extension(extension: str) -> str:
    if extension not in (".png", ".jpg", ".webp"):
        raise ValueError(f"extension must be .png, .jpg or .webp but is {extension!r}")
    return extension


# --- tenants and the HTTP API (headshots/tenants.py, headshots/api/) -----------------------------

TENANTS_PREFIX = f"{SYSTEM_PREFIX}/tenants/"
API_KEY_INDEX_PREFIX = f"{SYSTEM_PREFIX}/api-keys/"
API_KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
SHA256_HEX_PATTERN = re.compile(r"[0-9a-f]{64}")


def tenant_record_key(tenant: str) -> str:
    """The tenant's record: display name, hashed API keys, limits, ``webhook_secret`` (cluster/webhooks.py
    signs the tenant's deliveries with it)."""
    return f"{TENANTS_PREFIX}{validate_id(tenant, field='tenant')}/record.json"


def admin_record_key() -> str:
    """Operators' admin API keys (hashed), which may act on any tenant."""
    return f"{SYSTEM_PREFIX}/admin/record.json"


def api_key_index_key(key_id: str) -> str:
    """``key_id`` → owner (tenant or admin), so a request's key is found without scanning tenants."""
    if not isinstance(key_id, str) or not API_KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidId(f"api key id {key_id!r} is not valid: 16 lowercase hex digits")
    return f"{API_KEY_INDEX_PREFIX}{key_id}.json"


def idempotency_key(tenant: str, key_sha256: str) -> str:
    """The record of one ``Idempotency-Key`` (named by its sha256, so any header value is a safe key)."""
    if not isinstance(key_sha256, str) or not SHA256_HEX_PATTERN.fullmatch(key_sha256):
        raise InvalidId(f"idempotency key digest {key_sha256!r} is not a sha256 hex digest")
    return f"{TENANTS_PREFIX}{validate_id(tenant, field='tenant')}/idempotency/{key_sha256}.json"


def deletion_link_secret_key() -> str:
    """The HMAC key that signs self-service deletion links (created once, on first use)."""
    return f"{SYSTEM_PREFIX}/api/deletion-link-secret.json"


def batch_download_zip_key(tenant: str, batch_id: str, fingerprint: str) -> str:
    """A batch's headshots as one ZIP, named by a digest of what it holds (a new headshot, a new ZIP).

    Under ``_batch/`` in the outputs bucket, so deleting a batch's outputs deletes it too.
    """
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16,64}", fingerprint):
        raise InvalidId(f"zip fingerprint {fingerprint!r} is not a hex digest")
    return f"{batch_prefix(tenant, batch_id)}{BATCH_PREFIX}/downloads/headshots-{fingerprint}.zip"
