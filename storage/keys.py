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


def _extension(extension: str) -> str:
    if extension not in (".png", ".jpg", ".webp"):
        raise ValueError(f"extension must be .png, .jpg or .webp but is {extension!r}")
    return extension
