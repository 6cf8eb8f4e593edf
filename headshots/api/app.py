"""The studios' HTTP API: ``create_app(config)`` builds it, ``headshots serve`` runs it with uvicorn.

Every route is scoped to the acting tenant (see auth.py) and builds store keys from that tenant and
ids checked by :func:`storage.keys.validate_id` only. Work is done by the same functions the CLI uses
(:mod:`headshots.client`, :mod:`headshots.operations`); this module maps HTTP to them and their
errors to JSON (errors.py).

Why FastAPI + uvicorn and not Ray Serve: the API is I/O on the store plus a few actor calls, and must
keep answering status, downloads and receipts while Ray restarts; it needs no GPU or Ray scheduling,
and FastAPI generates the OpenAPI document the tests check against. It runs as a plain process on
the Ray head (it connects to Ray as a client only for start, cancel, retry and deletion).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from minio import Minio
from starlette.routing import Match

from headshots import client, operations
from headshots.api import errors
from headshots.api import schemas as s
from headshots.api.auth import Authenticator, TenantContext, TokenBuckets, bearer_scheme
from headshots.api.errors import ApiError, not_found
from headshots.api.uploads import PHOTOS_FIELD, file_parts
from headshots.manifest import MAX_PHOTOS_PER_PERSON, ManifestError, parse_manifest
from pipeline import ingest
from storage import keys
from storage.receipts import ReceiptNotFound, list_receipts, load_receipt
from storage.state import StateConflict, StateStore
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, StoreUnavailable, utc_now_iso

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
PHOTO_PATH = re.compile(r"^/v1/batches/[^/]+/persons/[^/]+/photos/[^/]+$")
PHOTOS_PATH = re.compile(r"^/v1/batches/[^/]+/persons/[^/]+/photos/?$")
# Files one multipart request may carry: as many as a person may have.
MAX_FILES_PER_UPLOAD = MAX_PHOTOS_PER_PERSON
FILENAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RECEIPT_ID_PATTERN = re.compile(r"(sweep|request)-\d{8}T\d{6}-[0-9a-f]{8}")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
IDEMPOTENCY_WAIT_S = 5.0
# A claimed Idempotency-Key whose batch never appeared after this long was abandoned (a crash): the
# next request with the key creates the batch under the id the claim recorded.
IDEMPOTENCY_ABANDONED_S = 30.0
SELF_SERVICE_RATE_PER_S = 5.0
PHOTO_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 422, 429)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {status: {"model": s.ErrorBody} for status in ERROR_STATUSES}


class BodySizeLimit:
    """Refuse bodies over the cap before reading them (Content-Length), or as soon as a streamed body
    passes it: a photo up to ``api.max_photo_bytes``, a multipart upload up to that per file (each file
    is capped on its own as it streams, see uploads.py), everything else up to ``api.max_request_bytes``."""

    def __init__(self, app, *, max_request_bytes: int, max_photo_bytes: int):
        self.app, self.max_request_bytes, self.max_photo_bytes = app, max_request_bytes, max_photo_bytes

    def cap_for(self, path: str) -> tuple[int, str]:
        """(the cap in bytes, the error message with ``{cap}``) of a request to ``path``."""
        if PHOTO_PATH.match(path):
            return self.max_photo_bytes, "a photo may be at most {cap} bytes (api.max_photo_bytes)"
        if PHOTOS_PATH.match(path):
            return (MAX_FILES_PER_UPLOAD * self.max_photo_bytes + self.max_request_bytes,
                    f"a multipart upload may be at most {{cap}} bytes ({MAX_FILES_PER_UPLOAD} files of at most "
                    "api.max_photo_bytes each, plus api.max_request_bytes)")
        return self.max_request_bytes, "a request body may be at most {cap} bytes (api.max_request_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap, what = self.cap_for(scope.get("path", ""))
        too_large = {"code": "body_too_large", "message": what.format(cap=cap), "field": "body"}
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > cap or declared < 0:
                    return await _send_json(send, 413, too_large)
        seen = 0
        # Set once a streamed body (no Content-Length, or a short one) passes the cap. The route may turn
        # the error raised below into another answer (FastAPI reports any failure to read a JSON body as
        # 400), so whatever it answers then is replaced by the 413.
        tripped = False
        started = replaced = False

        async def counted_receive():
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    tripped = True
                    raise ApiError(413, "body_too_large", too_large["message"], "body")
            return message

        async def guarded_send(message):
            nonlocal started, replaced
            if replaced:
                return  # the rest of the answer that was replaced
            if message["type"] == "http.response.start":
                if tripped and message["status"] != 413:
                    replaced = True
                    await _send_json(send, 413, too_large)
                    return
                started = True
            await send(message)

        try:
            return await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if tripped and not started and not replaced:
                return await _send_json(send, 413, too_large)
            raise


class TrailingSlashRedirect:
    """``/v1/batches/`` → 307 to ``/v1/batches``, as Starlette's ``redirect_slashes`` would, but with the
    Location built from :meth:`Service.public_base_url` (Starlette builds it from the Host header, which
    the client chooses: a redirect to any host it names)."""

    def __init__(self, app, *, service: "Service"):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.endswith("/") and path.strip("/") and "app" in scope:
            routes = scope["app"].router.routes
            stripped = {**scope, "path": path.rstrip("/")}
            if (not any(route.matches(scope)[0] != Match.NONE for route in routes)
                    and any(route.matches(stripped)[0] != Match.NONE for route in routes)):
                query = scope.get("query_string", b"").decode("latin-1")
                location = self.service.public_base_url(Request(scope)) + stripped["path"]
                response = RedirectResponse(location + (f"?{query}" if query else ""), status_code=307)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _check_id(value: str, field: str) -> str:
    try:
        return keys.validate_id(value, field=field)
    except keys.InvalidId as error:
        raise ApiError(422, "invalid_id", str(error), field) from None


class Service:
    """What the routes share: the config, one store client, the authenticator, the signing keys."""

    def __init__(self, config):
        self.config = config
        self.store = ArtifactStore.from_config(config.store)
        self.states = StateStore(self.store)
        self.auth = Authenticator(self.store, cache_s=config.api.auth_cache_s)
        self.self_service_bucket = TokenBuckets()
        store_config = config.store
        # Presigned URLs are signed for the address clients use; signing is local (region given).
        self.signer = Minio(store_config.public_endpoint or store_config.endpoint,
                            access_key=store_config.access_key, secret_key=store_config.secret_key,
                            secure=store_config.public_secure if store_config.public_endpoint else store_config.secure,
                            region=store_config.region)
        self._link_secret: bytes | None = None
        self._warned_base_url = False
        self._lock = threading.Lock()
        self._person_locks: dict[tuple[str, str, str], threading.Lock] = {}

    def person_lock(self, tenant: str, batch_id: str, person_id: str) -> threading.Lock:
        """Uploads for one person in this process take turns (the store's conditional writes guard
        against other processes; this only saves them from retrying each other)."""
        with self._lock:
            return self._person_locks.setdefault((tenant, batch_id, person_id), threading.Lock())

    def link_secret(self) -> bytes:
        """The key that signs self-service deletion links: one per store, created on first use."""
        if self._link_secret is None:
            key = keys.deletion_link_secret_key()
            try:
                self.store.put_json("state", key, {"secret": secrets.token_hex(32), "created_at": utc_now_iso()},
                                    if_absent=True)
            except ObjectExists:
                pass  # made earlier, or by another replica just now: use that one
            self._link_secret = bytes.fromhex(self.store.get_json("state", key)["secret"])
        return self._link_secret

    def resolved_batch(self, tenant: str, batch_id: str):
        _check_id(batch_id, "batch_id")
        try:
            return self.states.load_batch(tenant, batch_id)
        except ObjectNotFound:
            raise not_found("batch", batch_id, "batch_id") from None

    def person_of(self, tenant: str, batch_id: str, person_id: str):
        batch = self.resolved_batch(tenant, batch_id)
        _check_id(person_id, "person_id")
        if person_id not in batch.person_ids:
            raise not_found("person", person_id, "person_id")
        return batch

    def public_base_url(self, request: Request) -> str:
        """The origin (and path prefix) of the URLs this API hands out, without a trailing slash:
        ``api.public_base_url`` when set, else the address of the socket the request came in on (the
        server's own bind address, never the client's Host header)."""
        configured = self.config.api.public_base_url
        if configured:
            return configured.rstrip("/")
        server = request.scope.get("server")
        host, port = (server[0], server[1]) if server and server[1] is not None else (
            self.config.api.host, self.config.api.port)
        if not self._warned_base_url:
            self._warned_base_url = True
            logger.warning("api.public_base_url is not set: links and redirects name this server's own address "
                           "(%s:%s); set it to the address clients use", host, port)
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def presign(self, key: str, expires_s: int) -> str:
        return self.signer.presigned_get_object(self.store.bucket("outputs"), key, expires=timedelta(seconds=expires_s))


def create_app(config) -> FastAPI:
    """The API for a resolved config (store endpoint and Ray address filled in). Builds no connection
    until the first request, so the OpenAPI document can be generated anywhere."""
    app = FastAPI(title="headshots studio API", version=API_VERSION,
                  description="Batches of AI headshots for a studio's teams, with deletion on request. "
                              "Authenticate with `Authorization: Bearer <API key>`. Every error is "
                              "`{code, message, field}`.",
                  # Trailing-slash redirects come from TrailingSlashRedirect (Starlette's name the Host header).
                  redirect_slashes=False)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_request_bytes=config.api.max_request_bytes,
                       max_photo_bytes=config.api.max_photo_bytes)
    service = Service(config)
    app.state.service = service
    app.add_middleware(TrailingSlashRedirect, service=service)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, __: StoreUnavailable):
        from fastapi.responses import JSONResponse

        return JSONResponse({"code": "store_unavailable", "message": "the object store is unreachable; try again "
                             "in a minute", "field": None}, status_code=503, headers={"Retry-After": "30"})

    def tenant_context(request: Request,
                       credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
                       x_headshots_tenant: str | None = Header(default=None, description="admin keys: the tenant to act for"),
                       ) -> TenantContext:
        return service.auth.context(request, credentials)

    def store_photo(tenant: str, batch_id: str, person_id: str, filename: str, data: bytes) -> dict[str, Any]:
        """One photo through the same checks and storage as the CLI (PUT and multipart POST alike)."""
        with service.person_lock(tenant, batch_id, person_id):
            return client.add_photo_bytes(config, tenant=tenant, batch_id=batch_id, person_id=person_id,
                                          filename=filename, data=data, store=service.store)

    v1 = "/v1"

    # --- batches -------------------------------------------------------------------------------------

    @app.post(f"{v1}/batches", status_code=201, response_model=s.BatchOut, responses=ERROR_RESPONSES,
              summary="Create a batch (its photos arrive with PUT; `start` begins processing)")
    def create_batch(body: s.BatchCreate, response: Response, ctx: TenantContext = Depends(tenant_context),
                     idempotency_key: str | None = Header(default=None, alias="Idempotency-Key",
                                                          description="same key + same body → same batch")):
        document = body.model_dump(exclude_none=True)
        if document.get("tenant", ctx.tenant) != ctx.tenant:
            raise ApiError(403, "forbidden", "the body names another tenant than the API key's; leave `tenant` out "
                           "or set it to your own", "tenant")
        document["tenant"] = ctx.tenant
        manifest = _parse_batch(config, document)
        body_digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        claim_key = None
        if idempotency_key is not None:
            if not IDEMPOTENCY_KEY_PATTERN.fullmatch(idempotency_key):
                raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII "
                               "characters without spaces (a UUID is a good choice)", "Idempotency-Key")
            claim_key = keys.idempotency_key(ctx.tenant, hashlib.sha256(idempotency_key.encode()).hexdigest())
            replay = _replay(service, ctx.tenant, claim_key, body_digest)
            if replay is not None:
                response.headers["Idempotent-Replayed"] = "true"
                return replay
        limit = ctx.record.max_concurrent_batches
        if client.open_batches(service.store, ctx.tenant, limit=limit) >= limit:
            raise ApiError(429, "too_many_batches", f"tenant {ctx.tenant} has {limit} "
                           "batches created or running, its limit; wait for one to finish, or cancel or delete one",
                           None)
        batch_id = keys.new_batch_id(manifest.name)
        if claim_key is not None:
            try:
                service.store.put_json("state", claim_key, {"body_sha256": body_digest, "batch_id": batch_id,
                                                            "created_at": utc_now_iso()}, if_absent=True)
            except ObjectExists:  # a concurrent request with the same key claimed it first
                replay = _replay(service, ctx.tenant, claim_key, body_digest)
                if replay is None:
                    raise ApiError(409, "idempotency_in_progress", "a request with this Idempotency-Key is still "
                                   "being processed; retry in a few seconds", "Idempotency-Key") from None
                response.headers["Idempotent-Replayed"] = "true"
                return replay
        client.create_batch(config, manifest, batch_id=batch_id, store=service.store)
        return _status(service, ctx.tenant, batch_id)

    @app.get(f"{v1}/batches", response_model=s.BatchPage, responses=ERROR_RESPONSES,
             summary="List the tenant's batches (paginated, in batch id order)")
    def list_batches(ctx: TenantContext = Depends(tenant_context),
                     limit: int = Query(default=50, ge=1, le=config.api.max_page_size),
                     cursor: str | None = Query(default=None, description="next_cursor of the previous page")):
        if cursor is not None:
            _check_id(cursor, "cursor")
        rows, next_cursor = client.list_batch_page(config, tenant=ctx.tenant, limit=limit, after=cursor,
                                                   store=service.store)
        return {"tenant": ctx.tenant, "batches": rows, "next_cursor": next_cursor}

    @app.get(f"{v1}/batches/{{batch_id}}", response_model=s.BatchOut, responses=ERROR_RESPONSES,
             summary="A batch's state, with per-person progress and ETAs")
    def get_batch(batch_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context)):
        service.resolved_batch(ctx.tenant, batch_id)
        return _status(service, ctx.tenant, batch_id)

    @app.put(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/photos/{{filename}}", status_code=201,
             response_model=s.PhotoOut, responses={200: {"model": s.PhotoOut, "description": "this exact photo was "
                                                          "already stored under this name: nothing new"},
                                                    **ERROR_RESPONSES},
             openapi_extra={"requestBody": {"required": True, "content": {
                 t: {"schema": {"type": "string", "format": "binary"}} for t in PHOTO_CONTENT_TYPES}}},
             summary="Upload one photo of a person (the raw image as the body: JPEG, PNG or WebP)")
    async def put_photo(request: Request, response: Response, batch_id: str = Path(max_length=200),
                        person_id: str = Path(max_length=200), filename: str = Path(max_length=200),
                        ctx: TenantContext = Depends(tenant_context)):
        if not FILENAME_PATTERN.fullmatch(filename) or ".." in filename:
            raise ApiError(422, "invalid_filename", f"filename {filename!r} is not allowed: use 1-100 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit (e.g. 01-front.jpg)", "filename")
        await run_in_threadpool(service.person_of, ctx.tenant, batch_id, person_id)
        content_type = (request.headers.get("content-type") or "application/octet-stream").split(";")[0].strip()
        if content_type == "multipart/form-data":
            raise ApiError(422, "unsupported_content_type", "PUT takes the image itself as the body; send "
                           f"multipart/form-data (field `{PHOTOS_FIELD}`, one or more files) with POST "
                           f"/v1/batches/{batch_id}/persons/{person_id}/photos", "Content-Type")
        if content_type not in PHOTO_CONTENT_TYPES:
            raise ApiError(422, "unsupported_content_type", f"send the image itself as the body with Content-Type "
                           f"{', '.join(PHOTO_CONTENT_TYPES)} (not {content_type})", "Content-Type")
        chunks, size = [], 0
        cap = config.api.max_photo_bytes
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, "body_too_large", f"a photo may be at most {cap} bytes (api.max_photo_bytes)", "body")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise ApiError(422, "empty_body", "the body is empty: send the image's bytes", "body")

        try:
            result = await run_in_threadpool(store_photo, ctx.tenant, batch_id, person_id, filename, data)
        except ingest.PhotoRejected as rejected:
            raise ApiError(422, f"photo_{rejected.reason}", rejected.message, "body") from None
        except ObjectNotFound:
            raise not_found("person", person_id, "person_id") from None
        except ValueError as error:
            raise ApiError(409, "photo_refused", str(error), "filename") from None
        if not result["stored"]:
            response.status_code = 200
        return {"tenant": ctx.tenant, "batch_id": batch_id, **result}

    @app.post(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/photos", response_model=s.PhotosOut,
              status_code=201, responses={200: {"model": s.PhotosOut, "description": "no photo was new (each was "
                                                "rejected, or already stored under its name)"}, **ERROR_RESPONSES},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": [PHOTOS_FIELD],
                  "properties": {PHOTOS_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                                "description": "the photos (JPEG, PNG or WebP), one file "
                                                               "per part; the part's file name names it"}}}}}}},
              summary="Upload several photos of a person in one multipart/form-data request (field `photos`); "
                      "201 when at least one was stored, 200 when none was new")
    async def post_photos(request: Request, response: Response, batch_id: str = Path(max_length=200),
                          person_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context)):
        def refusal() -> str | None:
            batch = service.person_of(ctx.tenant, batch_id, person_id)
            return client.photo_refusal(batch, service.states.load_person(ctx.tenant, batch_id, person_id))

        # Refused before the body is read: the person cannot take photos now (the answer says when).
        refused = await run_in_threadpool(refusal)
        if refused is not None:
            raise ApiError(409, "photo_refused", refused, "person_id")
        cap = config.api.max_photo_bytes
        stored: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        files = 0

        def reject(name: str | None, reason: str, message: str) -> None:
            rejected.append({"file": name, "reason": reason, "message": message})

        async for part in file_parts(request, max_part_bytes=cap):
            try:
                name = part.filename
                if part.field != PHOTOS_FIELD or name is None:
                    reject(name or part.field, "unexpected_field", f"part {part.field!r}: send each photo as a file "
                           f"in a part named `{PHOTOS_FIELD}` (curl -F {PHOTOS_FIELD}=@front.jpg)")
                    continue
                files += 1
                if files > MAX_FILES_PER_UPLOAD:
                    reject(name, "too_many_files", f"{name}: not stored: at most {MAX_FILES_PER_UPLOAD} files per "
                           "request; send the rest in another request")
                elif not FILENAME_PATTERN.fullmatch(name) or ".." in name:
                    reject(name, "invalid_filename", f"file name {name!r} is not allowed: use 1-100 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit (e.g. 01-front.jpg)")
                elif part.over_cap:
                    reject(name, "too_large_file", f"{name}: over the API's limit of {cap} bytes per photo "
                           "(api.max_photo_bytes)")
                elif part.size == 0:
                    reject(name, "empty_file", f"{name}: the file is empty: send the image's bytes")
                else:
                    try:
                        result = await run_in_threadpool(store_photo, ctx.tenant, batch_id, person_id, name,
                                                         part.read())
                    except ingest.PhotoRejected as error:
                        reject(name, error.reason, error.message)
                    except ObjectNotFound:
                        raise not_found("person", person_id, "person_id") from None
                    except ValueError as error:
                        reject(name, "refused", str(error))
                    else:
                        stored.append({key: result[key] for key in ("file", "index", "stored")})
            finally:
                part.close()
        if files == 0:
            raise ApiError(422, "no_photos", f"the body has no files in field `{PHOTOS_FIELD}`: send each photo as "
                           f"a file part named `{PHOTOS_FIELD}` (curl -F {PHOTOS_FIELD}=@front.jpg)", PHOTOS_FIELD)
        person = await run_in_threadpool(service.states.load_person, ctx.tenant, batch_id, person_id)
        added = sum(1 for photo in stored if photo["stored"])
        if not added:
            response.status_code = 200
        return {"tenant": ctx.tenant, "batch_id": batch_id, "person_id": person_id, "photos_added": added,
                "photos_accepted": person.photos_accepted, "photos": stored, "photos_rejected": rejected}

    @app.post(f"{v1}/batches/{{batch_id}}/start", response_model=s.StartOut, responses=ERROR_RESPONSES,
              summary="Start processing a created batch (persons with too few photos wait in needs_photos)")
    def start_batch(batch_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context)):
        service.resolved_batch(ctx.tenant, batch_id)
        try:
            return client.begin_batch(config, ctx.tenant, batch_id, store=service.store)
        except ValueError as error:
            raise ApiError(409, "invalid_state", str(error), "batch_id") from None
        except StateConflict:  # the batch's persons kept changing under the start (concurrent requests)
            raise ApiError(409, "conflict", "the batch changed while it was being started; read it with GET "
                           f"/v1/batches/{batch_id} and start it again if it is still created", "batch_id") from None

    @app.post(f"{v1}/batches/{{batch_id}}/cancel", response_model=s.CancelOut, responses=ERROR_RESPONSES,
              summary="Cancel a batch: running stages stop at their next step")
    def cancel_batch(batch_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context)):
        service.resolved_batch(ctx.tenant, batch_id)
        result = _refusal_as_409(lambda: operations.cancel(config, service.states, tenant=ctx.tenant,
                                                           batch_id=batch_id))
        return {"tenant": ctx.tenant, "batch_id": batch_id, "person_id": None, "cancelled": result["cancelled"]}

    @app.post(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/cancel", response_model=s.CancelOut,
              responses=ERROR_RESPONSES, summary="Cancel one person")
    def cancel_person(batch_id: str = Path(max_length=200), person_id: str = Path(max_length=200),
                      ctx: TenantContext = Depends(tenant_context)):
        service.person_of(ctx.tenant, batch_id, person_id)
        result = _refusal_as_409(lambda: operations.cancel(config, service.states, tenant=ctx.tenant,
                                                           batch_id=batch_id, person_id=person_id))
        return {"tenant": ctx.tenant, "batch_id": batch_id, "person_id": person_id, "cancelled": result["cancelled"]}

    @app.post(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/retry", response_model=s.RetryOut,
              responses=ERROR_RESPONSES, summary="Run a needs_photos, failed or cancelled person again")
    def retry_person(batch_id: str = Path(max_length=200), person_id: str = Path(max_length=200),
                     ctx: TenantContext = Depends(tenant_context)):
        service.person_of(ctx.tenant, batch_id, person_id)
        return _refusal_as_409(lambda: operations.retry(config, tenant=ctx.tenant, batch_id=batch_id,
                                                        person_id=person_id))

    @app.post(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/more", response_model=s.MoreOut,
              responses=ERROR_RESPONSES, summary="More headshots for a done person, from its stored model")
    def more_headshots(body: s.MoreIn, batch_id: str = Path(max_length=200), person_id: str = Path(max_length=200),
                       ctx: TenantContext = Depends(tenant_context)):
        service.person_of(ctx.tenant, batch_id, person_id)
        return _refusal_as_409(lambda: operations.more(config, tenant=ctx.tenant, batch_id=batch_id,
                                                       person_id=person_id, count=body.count, style=body.style))

    @app.get(f"{v1}/batches/{{batch_id}}/download", response_model=s.DownloadOut, responses=ERROR_RESPONSES,
             summary="Presigned URLs for every headshot, the contact sheets, the manifest and one ZIP")
    def download(batch_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context),
                 expires_in_s: int = Query(default=config.api.presign_expiry_s, ge=1, le=config.api.presign_expiry_s,
                                           description="how long the URLs work")):
        batch = service.resolved_batch(ctx.tenant, batch_id)
        persons = service.states.load_persons(batch)
        from cluster.stages import download_path

        files = []
        for person in persons:
            for record in person.headshots:
                files.append({"path": download_path(person.person_id, record.key),
                              "url": service.presign(record.key, expires_in_s)})
            contact = keys.person_contact_sheet_key(person.ref)
            if person.headshots and service.store.exists("outputs", contact):
                files.append({"path": f"{person.person_id}/contact-sheet.png",
                              "url": service.presign(contact, expires_in_s)})
        for key, relative in ((keys.batch_contact_sheet_key(ctx.tenant, batch_id), "contact-sheet.png"),
                              (keys.batch_manifest_key(ctx.tenant, batch_id), "manifest.json")):
            if service.store.exists("outputs", key):
                files.append({"path": relative, "url": service.presign(key, expires_in_s)})
        archive = client.batch_zip(config, ctx.tenant, batch_id, store=service.store)
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)
        return {"tenant": ctx.tenant, "batch_id": batch_id, "state": batch.state, "expires_in_s": expires_in_s,
                "expires_at": expires_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "zip": {"url": service.presign(archive[0], expires_in_s), "files": archive[1]} if archive else None,
                "files": files}

    # --- deletion ----------------------------------------------------------------------------------

    @app.delete(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}", response_model=s.DeletionOut,
                responses=ERROR_RESPONSES, summary="Delete a person's photos and models now (headshots too with "
                                                   "?include_outputs=true); returns the receipt id")
    def delete_person(batch_id: str = Path(max_length=200), person_id: str = Path(max_length=200),
                      include_outputs: bool = False, ctx: TenantContext = Depends(tenant_context)):
        service.person_of(ctx.tenant, batch_id, person_id)
        result = _refusal_as_409(lambda: operations.delete(
            config, tenant=ctx.tenant, batch_id=batch_id, person_id=person_id, include_outputs=include_outputs,
            requested_by=_requested_by(ctx)))
        return _deletion(ctx.tenant, batch_id, person_id, include_outputs, result)

    @app.delete(f"{v1}/batches/{{batch_id}}", response_model=s.DeletionOut, responses=ERROR_RESPONSES,
                summary="Delete a batch's photos and models now (headshots too with ?include_outputs=true)")
    def delete_batch(batch_id: str = Path(max_length=200), include_outputs: bool = False,
                     ctx: TenantContext = Depends(tenant_context)):
        service.resolved_batch(ctx.tenant, batch_id)
        result = _refusal_as_409(lambda: operations.delete(
            config, tenant=ctx.tenant, batch_id=batch_id, include_outputs=include_outputs,
            requested_by=_requested_by(ctx)))
        return _deletion(ctx.tenant, batch_id, None, include_outputs, result)

    @app.post(f"{v1}/batches/{{batch_id}}/persons/{{person_id}}/deletion-link", response_model=s.DeletionLinkOut,
              status_code=201, responses=ERROR_RESPONSES,
              summary="A signed, expiring link with which the person pictured deletes their own data")
    def deletion_link(request: Request, body: s.DeletionLinkIn | None = Body(default=None),
                      batch_id: str = Path(max_length=200), person_id: str = Path(max_length=200),
                      ctx: TenantContext = Depends(tenant_context)):
        service.person_of(ctx.tenant, batch_id, person_id)
        include_outputs = body.include_outputs if body is not None else True
        expires = int(time.time()) + config.api.deletion_link_ttl_s
        payload = {"v": 1, "t": ctx.tenant, "b": batch_id, "p": person_id, "o": include_outputs, "exp": expires,
                   "n": secrets.token_hex(4)}
        token = _sign(service.link_secret(), payload)
        url = service.public_base_url(request) + f"{v1}/self-service/delete?token={token}"
        return {"tenant": ctx.tenant, "batch_id": batch_id, "person_id": person_id, "token": token, "url": url,
                "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat().replace("+00:00", "Z")}

    @app.post(f"{v1}/self-service/delete", response_model=s.SelfServiceOut, responses=ERROR_RESPONSES,
              summary="Open a deletion link: the person pictured deletes their data (no API key; the token is the "
                      "authority)")
    def self_service_delete(body: s.SelfServiceIn | None = Body(default=None),
                            token: str | None = Query(default=None, max_length=2000)):
        if service.self_service_bucket.take("all", SELF_SERVICE_RATE_PER_S) > 0:
            raise ApiError(429, "rate_limited", "too many deletion requests right now; retry in a second", None,
                           headers={"Retry-After": "1"})
        token = (body.token if body is not None else None) or token
        if not token:
            raise ApiError(400, "token_required", "send the link's token as {\"token\": ...} or ?token=", "token")
        payload = _verify(service.link_secret(), token)
        tenant, batch_id, person_id = payload["t"], payload["b"], payload["p"]
        try:
            person = service.states.load_person(tenant, batch_id, person_id)
        except ObjectNotFound:
            raise ApiError(404, "person_not_found", "the person this link was made for no longer exists", "token") from None
        if person.state == "deleted" and person.receipt_ids:
            return {"receipt_id": person.receipt_ids[-1], "objects_deleted": 0, "already_deleted": True}
        result = _refusal_as_409(lambda: operations.delete(
            config, tenant=tenant, batch_id=batch_id, person_id=person_id, include_outputs=bool(payload["o"]),
            requested_by="self-service"))
        return {"receipt_id": result["receipt_id"], "objects_deleted": result["objects_deleted"],
                "already_deleted": False}

    # --- receipts ----------------------------------------------------------------------------------

    @app.get(f"{v1}/receipts", response_model=s.ReceiptList, responses=ERROR_RESPONSES,
             summary="The tenant's deletion receipts (summaries), newest first")
    def receipts(ctx: TenantContext = Depends(tenant_context), batch_id: str | None = Query(default=None, max_length=200),
                 person_id: str | None = Query(default=None, max_length=200)):
        if batch_id is not None:
            _check_id(batch_id, "batch_id")
        if person_id is not None:
            _check_id(person_id, "person_id")
            if batch_id is None:
                raise ApiError(422, "batch_required", "person_id needs batch_id: person ids are unique only within "
                               "a batch", "batch_id")
        found = list_receipts(service.store, tenant=ctx.tenant, batch_id=batch_id, person_id=person_id)
        summaries = []
        for receipt in found:
            own = _tenant_view(receipt.to_json(), ctx.tenant)
            if own is not None:
                summaries.append({key: own[key] for key in ("receipt_id", "kind", "started_at", "finished_at")}
                                 | {"persons": len(own["persons"]), "objects_deleted": len(own["objects"])})
        return {"tenant": ctx.tenant, "receipts": summaries}

    @app.get(f"{v1}/receipts/{{receipt_id}}", response_model=s.ReceiptOut, responses=ERROR_RESPONSES,
             summary="One deletion receipt: what was deleted (ids, versions, sha256), when, and the verification")
    def receipt(receipt_id: str = Path(max_length=200), ctx: TenantContext = Depends(tenant_context)):
        if not RECEIPT_ID_PATTERN.fullmatch(receipt_id):
            raise ApiError(422, "invalid_id", f"receipt_id {receipt_id!r} is not a receipt id (e.g. "
                           "request-20261126T120000-1a2b3c4d)", "receipt_id")
        try:
            found = load_receipt(service.store, receipt_id)
        except ReceiptNotFound:
            raise not_found("receipt", receipt_id, "receipt_id") from None
        own = _tenant_view(found.to_json(), ctx.tenant)
        if own is None:
            raise not_found("receipt", receipt_id, "receipt_id")
        return own

    return app


# --- helpers ---------------------------------------------------------------------------------------------

def _parse_batch(config, document: dict[str, Any]):
    """The manifest parser's checks on a JSON batch; photos are refused (they arrive with PUT)."""
    from pathlib import Path as FilePath

    from pipeline.generate import load_style_presets

    for position, person in enumerate(document.get("persons") or []):
        if isinstance(person, dict) and person.get("photos"):
            raise ApiError(422, "photos_not_allowed", "a batch created over the API lists no photo files; upload "
                           "them with POST /v1/batches/{batch_id}/persons/{person_id}/photos (multipart) or one by "
                           "one with PUT .../photos/{filename}", f"persons[{position}].photos")
        if isinstance(person, dict):
            person.pop("photos", None)
    base_model = document.get("base_model", "tiny")
    if base_model not in config.api.base_models:
        raise ApiError(422, "invalid_request", f"base_model {base_model!r} is not offered here; allowed: "
                       f"{', '.join(config.api.base_models)} (api.base_models)", "base_model")
    presets = load_style_presets(config.generation.styles_file or None)
    try:
        # No folder: a batch over the API names no local files (the base dir is never read).
        return parse_manifest(document, base_dir=FilePath("/nonexistent-api-request"), source="request body",
                              known_styles=presets)
    except ManifestError as error:
        field = None
        match = re.search(r"field '([\w.]+)'|(persons\[\d+\][\w.]*)", error.problems[0]) if error.problems else None
        if match:
            field = match.group(1) or match.group(2)
        message = error.problems[0].replace("request body: ", "") if error.problems else str(error)
        raise ApiError(422, "invalid_manifest", message, field,
                       problems=[p.replace("request body: ", "") for p in error.problems]) from None


def _replay(service: Service, tenant: str, claim_key: str, body_digest: str) -> dict[str, Any] | None:
    """The batch an earlier request with this Idempotency-Key created, or None if the key is unused.

    Raises:
        ApiError: 409 when the key was used with another body, or its batch is still being created.
    """
    try:
        claim = service.store.get_json("state", claim_key)
    except ObjectNotFound:
        return None
    if claim["body_sha256"] != body_digest:
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used with a different body; use a "
                       "new key for a new batch", "Idempotency-Key")
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        try:
            return _status(service, tenant, claim["batch_id"])
        except ApiError as error:
            if error.status != 404:
                raise
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    created = datetime.fromisoformat(claim["created_at"].replace("Z", "+00:00"))
    if (datetime.now(timezone.utc) - created).total_seconds() < IDEMPOTENCY_ABANDONED_S:
        raise ApiError(409, "idempotency_in_progress", "a request with this Idempotency-Key is still being "
                       "processed; retry in a few seconds", "Idempotency-Key")
    return None


def _status(service: Service, tenant: str, batch_id: str) -> dict[str, Any]:
    try:
        summary = client.batch_status(service.config, batch_id, tenant=tenant, store=service.store)
    except ObjectNotFound:
        raise not_found("batch", batch_id, "batch_id") from None
    return summary


def _refusal_as_409(call):
    try:
        return call()
    except operations.OperationRefused as error:
        raise ApiError(409, "invalid_state", str(error), None) from None
    except StateConflict:
        raise ApiError(409, "conflict", "the batch changed while the request ran; try again", None) from None


def _requested_by(ctx: TenantContext) -> str:
    # Ids only in receipts: the key id says which credential asked, never the key.
    return f"api:{ctx.principal.role}:{ctx.principal.key_id}"


def _deletion(tenant: str, batch_id: str, person_id: str | None, include_outputs: bool,
              result: dict[str, Any]) -> dict[str, Any]:
    return {"tenant": tenant, "batch_id": batch_id, "person_id": person_id, "request_id": result["request_id"],
            "receipt_id": result["receipt_id"], "objects_deleted": result["objects_deleted"],
            "persons": result["persons"], "seconds": result["seconds"], "include_outputs": include_outputs}


def _tenant_view(receipt: dict[str, Any], tenant: str) -> dict[str, Any] | None:
    """The part of a receipt about ``tenant`` (a sweep's receipt covers many tenants), or None if none is."""
    persons = [p for p in receipt.get("persons", []) if p.get("tenant") == tenant]
    if not persons:
        return None
    prefix = keys.tenant_prefix(tenant)
    view = dict(receipt)
    view["persons"] = persons
    view["objects"] = [o for o in receipt.get("objects", []) if str(o.get("key", "")).startswith(prefix)]
    view["keys_destroyed"] = [k for k in receipt.get("keys_destroyed", [])
                              if f"/{tenant}/" in str(k.get("key", "")) or str(k.get("key", "")).startswith(prefix)]
    view["worker_purges"] = [] if receipt.get("kind") == "sweep" else receipt.get("worker_purges", [])
    # Which nodes confirmed and how the others are covered; without the nodes' network addresses.
    view["nodes"] = [] if receipt.get("kind") == "sweep" else [
        {key: value for key, value in node.items() if key != "address"} for node in receipt.get("nodes", [])]
    view["scope"] = receipt.get("scope") if receipt.get("kind") == "request" else {}
    return view


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: dict[str, Any]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())}"


def _verify(secret: bytes, token: str) -> dict[str, Any]:
    """The payload of a valid, unexpired deletion token.

    Raises:
        ApiError: 403 for a token that is malformed, forged or expired.
    """
    invalid = ApiError(403, "invalid_token", "this deletion link is not valid; ask the studio for a new one", "token")
    body, _, signature = token.partition(".")
    try:
        expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            raise invalid
        payload = json.loads(_unb64(body))
        for name, field in (("t", "tenant"), ("b", "batch_id"), ("p", "person_id")):
            keys.validate_id(payload[name], field=field)
    except ApiError:
        raise
    except (ValueError, KeyError, TypeError):
        raise invalid from None
    if payload.get("exp", 0) < time.time():
        raise ApiError(403, "token_expired", "this deletion link has expired; ask the studio for a new one", "token")
    return payload


def openapi_document(config=None) -> dict[str, Any]:
    """The API's OpenAPI document (what docs/openapi.json holds)."""
    from headshots.config import Config

    config = config or Config.from_dict({"store": {"endpoint": "127.0.0.1:9000"}})
    return create_app(config).openapi()


if __name__ == "__main__":  # python -m headshots.api.app > docs/openapi.json
    print(json.dumps(openapi_document(), indent=1, sort_keys=True))
