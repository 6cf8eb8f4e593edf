"""Request and response bodies: the same keys as the CLI's ``--json`` output.

A new batch is the manifest's fields (tenant, batch, base_model, styles, images_per_style, priority,
consent, persons); persons carry no ``photos`` (those arrive with ``PUT .../photos/{filename}`` or a
multipart ``POST .../photos``).
Unknown fields are passed on to the manifest parser, which names them and what is allowed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(description="stable error code, e.g. batch_not_found, invalid_request, rate_limited")
    message: str = Field(description="what was wrong and how to fix it")
    field: str | None = Field(description="the request field at fault (body path, parameter or header), or null")
    problems: list[str] | None = Field(default=None, description="every problem found, when there were several")


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    collected_by: str = Field(description="who collected the team's consent (not the subject)")
    given_at: str = Field(description="ISO-8601 date or time")
    purpose: str = "headshots"
    policy_version: str | None = None


class PersonIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    id: str | None = Field(default=None, description="person id (default: the name as a slug)")
    email: str | None = None
    consent_given_at: str | None = None


class BatchCreate(BaseModel):
    """A manifest, as JSON."""

    model_config = ConfigDict(extra="allow")
    tenant: str | None = Field(default=None, description="optional: must be the key's tenant")
    batch: str = Field(description="display name of the batch")
    base_model: str = "tiny"
    styles: list[str]
    images_per_style: int = 4
    priority: int = 0
    consent: ConsentIn
    persons: list[PersonIn]


class PhotoRejectedOut(BaseModel):
    index: int | None = None
    file: str | None = None
    reason: str | None = None
    message: str | None = None


class PersonOut(BaseModel):
    person_id: str
    state: str
    stage: str | None = None
    headshots: int = 0
    photos_accepted: int = 0
    error: str | None = None
    flags: list[str] = []
    photos_rejected: list[PhotoRejectedOut] = []
    eta_seconds: float | None = None


class BatchOut(BaseModel):
    tenant: str
    batch_id: str
    name: str | None = None
    state: str
    created_at: str | None = None
    finished_at: str | None = None
    eta_seconds: float | None = None
    stalled_since: str | None = Field(default=None, description="set while the batch is running but its "
                                      "coordinator has not reported for over 2 minutes (no ETA is shown then)")
    hint: str | None = Field(default=None, description="what the operator can do about a stall")
    persons: list[PersonOut]


class BatchRow(BaseModel):
    tenant: str
    batch_id: str
    name: str
    state: str
    persons: int
    created_at: str
    priority: int
    persons_by_state: dict[str, int] | None = None
    eta_seconds: float | None = None
    stalled_since: str | None = None


class BatchPage(BaseModel):
    tenant: str
    batches: list[BatchRow]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at the end")


class PhotoOut(BaseModel):
    tenant: str
    batch_id: str
    person_id: str
    file: str
    index: int
    stored: bool = Field(description="false when this exact photo was already stored under this name")
    photos_accepted: int


class PhotoStoredOut(BaseModel):
    file: str
    index: int
    stored: bool = Field(description="false when this exact photo was already stored under this name")


class PhotosOut(BaseModel):
    """A multipart upload's outcome, per file (the keys of ``headshots add-photos --json``)."""

    tenant: str
    batch_id: str
    person_id: str
    photos_added: int = Field(description="photos newly stored by this request")
    photos_accepted: int = Field(description="the person's usable photos now")
    photos: list[PhotoStoredOut] = Field(description="the files stored (or already stored), in request order")
    photos_rejected: list[PhotoRejectedOut] = Field(description="the files not stored: file, reason (a stable "
                                                    "code) and message")


class StartOut(BaseModel):
    tenant: str
    batch_id: str
    state: str


class CancelOut(BaseModel):
    tenant: str
    batch_id: str
    person_id: str | None = None
    cancelled: list[str]


class RetryOut(BaseModel):
    tenant: str
    batch_id: str
    person_id: str
    state: str


class MoreIn(BaseModel):
    count: int = Field(ge=1, le=64, description="headshots to add per style")
    style: str | None = Field(default=None, description="one of the batch's styles (default: every style)")


class MoreOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    tenant: str
    batch_id: str
    person_id: str
    added_per_style: dict[str, int]


class DownloadFile(BaseModel):
    path: str = Field(description="where `headshots download` would put it: <person>/<style>/<index>-<seed>.png")
    url: str


class DownloadZip(BaseModel):
    url: str
    files: int


class DownloadOut(BaseModel):
    tenant: str
    batch_id: str
    state: str
    expires_in_s: int
    expires_at: str
    zip: DownloadZip | None
    files: list[DownloadFile]


class DeletionOut(BaseModel):
    tenant: str
    batch_id: str
    person_id: str | None = None
    request_id: str
    receipt_id: str
    objects_deleted: int
    persons: int
    seconds: float
    include_outputs: bool


class DeletionLinkIn(BaseModel):
    include_outputs: bool = Field(default=True, description="delete the person's headshots too (default: yes: "
                                                            "the person asked to be forgotten)")


class DeletionLinkOut(BaseModel):
    tenant: str
    batch_id: str
    person_id: str
    token: str
    url: str = Field(description="POST {\"token\": ...} here (the token also works as ?token=)")
    expires_at: str


class SelfServiceIn(BaseModel):
    token: str = Field(max_length=2000)


class SelfServiceOut(BaseModel):
    receipt_id: str
    objects_deleted: int
    already_deleted: bool


class ReceiptOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    receipt_id: str
    kind: str
    started_at: str
    finished_at: str | None = None
    persons: list[dict[str, Any]]
    objects: list[dict[str, Any]]
    verification: dict[str, Any]


class ReceiptList(BaseModel):
    tenant: str
    receipts: list[dict[str, Any]]
