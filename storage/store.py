"""Artifacts in S3-compatible buckets, one bucket per artifact class, versioning on.

Every write returns a :class:`StoredObject` (bucket, key, version id, size, sha256 at write time): the
person's state keeps these so that deletion receipts can later prove what was removed, even after the
object itself is gone.

Encryption at rest, two kinds (see :mod:`storage.crypto` for why):
- SSE-C (``ssec=``): the caller supplies a 32-byte key with every read and write; the server keeps only
  a salted MAC of it, so once the key is destroyed the object is noise. Used for a person's uploads,
  crops and models.
- SSE-S3 (``server_side_encryption=True``): the server encrypts with its own keys; protects disks and
  backups of the server, not against someone with S3 credentials. Used for everything else.

Outages: every call rides out an unreachable or busy server (restart, failover) by retrying with
exponential backoff and full jitter until ``outage_tolerance_s`` has passed; an S3 answer that means
something (NoSuchKey, AccessDenied, PreconditionFailed, ...) is never retried.

Raw client calls: nothing outside this module calls ``client`` directly for person data; what callers
need beyond single objects is here too, under the same retries: complete version listings
(:meth:`ArtifactStore.list_all_versions`), deletion by version id in batches with failures reported per
object (:meth:`ArtifactStore.remove_versions`), prefix listings (:meth:`ArtifactStore.list_subprefixes`),
listing and copying a folder to disk (:meth:`ArtifactStore.list_prefix`,
:meth:`ArtifactStore.download_prefix`), and :meth:`ArtifactStore.with_retry`
for the rest (bucket settings).

Conditional writes: ``put(if_absent=True)`` (``If-None-Match: *``) and ``put(if_match=etag)``
(``If-Match``) let the server decide atomically which of two racing writers wins; the loser gets
:class:`WriteConflict`. State transitions use them as compare-and-swap (see :mod:`storage.state`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import genheaders
from minio.sse import Sse, SseCustomerKey, SseS3
from minio.versioningconfig import VersioningConfig

logger = logging.getLogger(__name__)

ARTIFACT_CLASSES = ("uploads", "derived", "models", "outputs", "state", "receipts")
DEFAULT_OUTAGE_TOLERANCE_S = 120.0
# Backoff between attempts: full jitter over [0, min(cap, first * 2**n)].
RETRY_FIRST_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 5.0
# One attempt must fail fast while the server is down, so the deadline above is what bounds a call.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
# DeleteObjects takes at most this many keys per request (S3's limit).
REMOVE_BATCH = 1000

# The request may not have reached the server, or its answer was lost: try again.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
# What a GET or HEAD pinned to a listed ETag answers once the object was replaced or removed.
_CHANGED_SINCE_LISTED_CODES = ("PreconditionFailed", "HTTP412", "NoSuchKey", "NoSuchObject", "NoSuchVersion")
# S3 error codes that mean "busy or not ready, try later" (AWS, MinIO and SeaweedFS spellings).
_BUSY_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "SlowDownRead", "SlowDownWrite", "RequestTimeout",
    "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestLimitExceeded",
    "XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum",
})
# HTTP statuses with the same meaning when the answer carries no S3 code (a proxy, a HEAD request).
_BUSY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NOT_FOUND_CODES = ("NoSuchKey", "NoSuchObject", "NoSuchVersion", "ResourceNotFound")
# The version id S3 gives an object written before versioning was turned on.
_NULL_VERSION = "null"

_T = TypeVar("_T")


class StoreError(RuntimeError):
    """A storage call failed; carries what was being touched so an operator can find it."""

    def __init__(self, message: str, *, bucket: str, key: str = "", version_id: str | None = None,
                 request_id: str | None = None, code: str | None = None):
        details = f"bucket={bucket}" + (f" key={key}" if key else "")
        if version_id:
            details += f" version_id={version_id}"
        if request_id:
            details += f" request_id={request_id}"
        super().__init__(f"{message} ({details})")
        self.bucket, self.key, self.version_id, self.request_id, self.code = (
            bucket, key, version_id, request_id, code)


class ObjectNotFound(StoreError):
    """The key (or version) does not exist."""


class StoreUnavailable(StoreError):
    """The server stayed unreachable (or answered "busy") for longer than ``store.outage_tolerance_s``."""


class WriteConflict(StoreError):
    """A conditional write lost: the key's current version is not the one the writer expected
    (``if_match``), or the key already exists (``if_absent``, see :class:`ObjectExists`)."""


class ObjectExists(WriteConflict):
    """A create-only write (``if_absent=True``) found the key already there."""


class ObjectChanged(StoreError):
    """An object is no longer what the listing showed (replaced or removed since): what was being
    copied by that listing would mix two versions, so the caller lists again."""


@dataclass(frozen=True)
class StoredObject:
    """One object version as written."""

    artifact: str
    bucket: str
    key: str
    version_id: str | None
    size: int
    sha256: str
    written_at: str
    # The version's ETag as the server answered it (unquoted); what ``put(if_match=...)`` expects.
    # Records written before it existed load with None.
    etag: str | None = None

    def __post_init__(self) -> None:
        if self.artifact not in ARTIFACT_CLASSES:
            raise ValueError(f"artifact must be one of {', '.join(ARTIFACT_CLASSES)} but is {self.artifact!r}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0 but is {self.size}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StoredObject":
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ListedObject:
    """One current object as a listing shows it: enough to tell whether a copy on disk is still current
    (the ETag changes whenever the object's content is replaced)."""

    key: str
    size: int
    etag: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size must be >= 0 but is {self.size}")
        if not self.etag:
            raise ValueError(f"etag must be the server's ETag of {self.key!r} but is empty")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ListedObject":
        return cls(key=data["key"], size=int(data["size"]), etag=data["etag"])


@dataclass(frozen=True)
class RemoveFailure:
    """One version that a batch delete did not remove: the server's per-object error."""

    key: str
    version_id: str | None
    code: str
    message: str


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_client(*, endpoint: str, access_key: str, secret_key: str, secure: bool, region: str = "us-east-1",
                ca_file: str = "") -> Minio:
    """A minio client with short timeouts and few retries of its own.

    :class:`ArtifactStore` does the retrying (until its outage deadline, and knowing which writes are
    conditional), so urllib3 only retries what is always safe: a connection that was never made. It
    never resends a request that may have reached the server (``read=0``), and leaves 5xx answers to
    the store.
    """
    http_client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        maxsize=16,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=(ca_file or certifi.where()) if secure else None,
        retries=urllib3.Retry(total=2, connect=2, read=0, status=0, other=0, backoff_factor=0.1,
                              respect_retry_after_header=False),
    )
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                 http_client=http_client)


class ArtifactStore:
    """Typed access to the artifact buckets.

    Args:
        client: a connected minio client.
        buckets: artifact class → bucket name (all six classes).
        server_side_encryption: ask the server to encrypt every object written without an SSE-C key
            (SSE-S3, ``x-amz-server-side-encryption: AES256``).
        outage_tolerance_s: how long one call keeps retrying an unreachable or busy server.
        sleep, clock, rng: injectable for tests (``time.sleep``, ``time.monotonic``, a fresh Random).
    """

    def __init__(self, client: Minio, buckets: Mapping[str, str], *, server_side_encryption: bool = False,
                 outage_tolerance_s: float = DEFAULT_OUTAGE_TOLERANCE_S,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        missing = set(ARTIFACT_CLASSES) - set(buckets)
        if missing:
            raise ValueError(f"buckets is missing artifact classes: {', '.join(sorted(missing))}")
        if not outage_tolerance_s > 0:
            raise ValueError(f"outage_tolerance_s must be > 0 seconds but is {outage_tolerance_s}")
        self.client = client
        self.buckets = dict(buckets)
        self.server_side_encryption = server_side_encryption
        self.outage_tolerance_s = float(outage_tolerance_s)
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()

    @classmethod
    def from_config(cls, store_config) -> "ArtifactStore":
        """Build from a :class:`headshots.config.StoreConfig` (endpoint must be set; its
        ``server_side_encryption`` switch turns SSE-S3 on, ``outage_tolerance_s`` bounds retries)."""
        if not store_config.endpoint:
            raise ValueError("store.endpoint is empty: start the local stack (`headshots up`) or set it")
        client = make_client(endpoint=store_config.endpoint, access_key=store_config.access_key,
                             secret_key=store_config.secret_key, secure=store_config.secure,
                             region=store_config.region, ca_file=store_config.ca_file)
        return cls(client, store_config.buckets,
                   server_side_encryption=store_config.server_side_encryption,
                   outage_tolerance_s=store_config.outage_tolerance_s)

    def bucket(self, artifact: str) -> str:
        try:
            return self.buckets[artifact]
        except KeyError:
            raise ValueError(f"artifact must be one of {', '.join(ARTIFACT_CLASSES)} but is {artifact!r}") from None

    # --- set-up --------------------------------------------------------------------------------

    def ensure_buckets(self) -> None:
        """Create missing buckets and turn versioning on (idempotent)."""
        for artifact in ARTIFACT_CLASSES:
            bucket = self.bucket(artifact)

            def prepare(bucket: str = bucket) -> None:
                if not self.client.bucket_exists(bucket):
                    try:
                        self.client.make_bucket(bucket)
                    except S3Error as error:
                        # Also the answer to a retried create whose first answer was lost.
                        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                config = self.client.get_bucket_versioning(bucket)
                if config.status != ENABLED:
                    self.client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))

            self._retry(prepare, bucket=bucket, key="", action="cannot prepare bucket")

    # --- objects -------------------------------------------------------------------------------

    def put(self, artifact: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
            metadata: Mapping[str, str] | None = None, ssec: SseCustomerKey | None = None,
            if_absent: bool = False, if_match: str | None = None) -> StoredObject:
        """Write one object version and return its record.

        Args:
            artifact: the artifact class (picks the bucket).
            key: the object key.
            data: the whole object.
            content_type: stored as the object's Content-Type.
            metadata: user metadata (``x-amz-meta-*``); never put secrets or names here.
            ssec: encrypt with this customer key (SSE-C); every later read must present it. Without it,
                SSE-S3 is requested when the store was built with ``server_side_encryption``.
            if_absent: create only (``If-None-Match: *``): fail rather than add a version when the key
                already has a current version. The server decides atomically, so of two racing writers
                exactly one succeeds.
            if_match: compare-and-swap (``If-Match``): write only if the key's current version has this
                ETag (as returned by :meth:`get_with_etag` or in a previous record's ``etag``).

            A conditional write whose answer was lost and whose retry then fails its condition may have
            landed itself: the current object is read back, and if its bytes are ours the write counts
            as done (the record then describes that version).

        Returns:
            The record of the version written, with its ETag.

        Raises:
            ObjectExists: ``if_absent`` and the key already exists.
            WriteConflict: ``if_match`` and the key's current version has another ETag (or is gone).
            StoreUnavailable: the server stayed unreachable for ``outage_tolerance_s``.
            StoreError: the write failed (bucket, key and request id in the message).
        """
        if if_absent and if_match is not None:
            raise ValueError("put takes if_absent or if_match, not both")
        bucket = self.bucket(artifact)
        digest = hashlib.sha256(data).hexdigest()
        sse = self._sse_for_write(ssec)
        conditional = if_absent or if_match is not None
        attempts = 0

        def write() -> tuple[str | None, str | None]:
            nonlocal attempts
            attempts += 1
            if not conditional:
                result = self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type,
                                                metadata=dict(metadata or {}), sse=sse)
                return result.version_id, _unquote(result.etag)
            try:
                result = self._put_conditional(bucket, key, data, content_type=content_type, metadata=metadata,
                                               sse=sse, if_match=if_match)
                return result.version_id, _unquote(result.etag)
            except S3Error as error:
                if error.code != "PreconditionFailed" or attempts == 1:
                    raise
                # An earlier attempt failed without an answer, so this 412 may be about our own write.
                landed = self._current_if_ours(bucket, key, digest, ssec)
                if landed is None:
                    raise
                logger.info("a conditional write to bucket %s had landed before its answer was lost", bucket)
                return landed

        if if_absent:
            conflict: type[WriteConflict] = ObjectExists
            conflict_message = "cannot write object: the key already exists (create-only write)"
        else:
            conflict = WriteConflict
            conflict_message = (f"cannot write object: its current version is no longer ETag {if_match!r} "
                                "(another writer changed or removed it)")
        version_id, etag = self._retry(write, bucket=bucket, key=key, action="cannot write object",
                                       conflict=conflict, conflict_message=conflict_message)
        return StoredObject(artifact=artifact, bucket=bucket, key=key, version_id=version_id,
                            size=len(data), sha256=digest, written_at=utc_now_iso(), etag=etag)

    def get(self, artifact: str, key: str, *, version_id: str | None = None,
            ssec: SseCustomerKey | None = None) -> bytes:
        """Read one object (the current version, or ``version_id``).

        Args:
            ssec: the customer key the object was written with (SSE-C objects only).

        Raises:
            ObjectNotFound: no such key or version.
            StoreUnavailable: the server stayed unreachable for ``outage_tolerance_s``.
            StoreError: any other failure; an SSE-C object read without its key fails with code
                ``InvalidArgument``, with another key with ``AccessDenied``.
        """
        return self.get_with_etag(artifact, key, version_id=version_id, ssec=ssec)[0]

    def get_with_etag(self, artifact: str, key: str, *, version_id: str | None = None,
                      ssec: SseCustomerKey | None = None) -> tuple[bytes, str]:
        """Read one object and its ETag in one GET (for a later ``put(if_match=etag)``).

        Returns:
            (the object's bytes, its ETag without quotes).

        Raises:
            The same as :meth:`get`.
        """
        bucket = self.bucket(artifact)

        def read() -> tuple[bytes, str]:
            response = self.client.get_object(bucket, key, version_id=version_id, ssec=ssec)
            try:
                return response.read(), _unquote(response.headers.get("ETag")) or ""
            finally:
                response.close()
                response.release_conn()

        return self._retry(read, bucket=bucket, key=key, version_id=version_id, action="cannot read object")

    def exists(self, artifact: str, key: str, *, ssec: SseCustomerKey | None = None) -> bool:
        """Whether ``key`` has a current version.

        Args:
            ssec: the object's customer key; S3 refuses even a HEAD of an SSE-C object without it.
        """
        bucket = self.bucket(artifact)

        def stat() -> bool:
            try:
                self.client.stat_object(bucket, key, ssec=ssec)
                return True
            except S3Error as error:
                if error.code in _NOT_FOUND_CODES:
                    return False
                raise

        return self._retry(stat, bucket=bucket, key=key, action="cannot stat object")

    def remove_version(self, artifact: str, key: str, *, version_id: str) -> None:
        """Permanently remove one version (or delete marker) of ``key``.

        Raises:
            StoreError: the server refused (bucket, key, version id and request id in the message).
        """
        bucket = self.bucket(artifact)
        self._retry(lambda: self.client.remove_object(bucket, key, version_id=version_id), bucket=bucket,
                    key=key, version_id=version_id, action="cannot remove object version")

    def list_keys(self, artifact: str, prefix: str, *, recursive: bool = True) -> Iterator[str]:
        """Current (latest, not deleted) keys under ``prefix``.

        The listing is complete before the first key is returned: a listing interrupted by an outage
        starts again from the beginning, so no key is skipped or returned twice.
        """
        bucket = self.bucket(artifact)
        names = self._retry(
            lambda: [item.object_name for item in self.client.list_objects(bucket, prefix=prefix,
                                                                           recursive=recursive)],
            bucket=bucket, key=prefix, action="cannot list objects")
        return iter(names)

    def list_versions(self, artifact: str, prefix: str) -> list[tuple[str, str | None, bool]]:
        """Every version and delete marker under ``prefix`` as (key, version id, is delete marker).

        Complete or an error: a listing interrupted by an outage starts again from the beginning.
        """
        bucket = self.bucket(artifact)
        return self._retry(
            lambda: [(item.object_name, item.version_id, bool(item.is_delete_marker))
                     for item in self.client.list_objects(bucket, prefix=prefix, recursive=True,
                                                          include_version=True)],
            bucket=bucket, key=prefix, action="cannot list object versions")

    def list_all_versions(self, artifact: str, prefix: str) -> list[tuple[str, str | None, bool, int]]:
        """Every version and delete marker under ``prefix`` as (key, version id, is delete marker, size).

        Like :meth:`list_versions`, with each version's size (0 for a delete marker). Complete or an
        error: the whole listing is made inside one retried call, so one interrupted by an outage
        starts again from the beginning and nothing is skipped or returned twice.
        """
        bucket = self.bucket(artifact)
        return self._retry(
            lambda: [(item.object_name, item.version_id, bool(item.is_delete_marker), item.size or 0)
                     for item in self.client.list_objects(bucket, prefix=prefix, recursive=True,
                                                          include_version=True)],
            bucket=bucket, key=prefix, action="cannot list object versions")

    def remove_versions(self, artifact: str, versions: Iterable[tuple[str, str | None]]) -> list[RemoveFailure]:
        """Permanently remove these (key, version id) pairs: versions or delete markers.

        Sent in DeleteObjects requests of at most ``REMOVE_BATCH`` keys, each request under the
        outage retries (the client's lazy answer is read to the end inside the retried call). A
        retried request may name versions its lost first attempt already removed: the server answers
        those as deleted (SeaweedFS) or NoSuchVersion (AWS, MinIO), and both count as removed.

        A version id of None is sent as "null" (an object from before versioning): a delete without
        a version id would only add a delete marker.

        Returns:
            The versions the server refused, each with its S3 error code, in the pairs given (empty
            when everything went). A refusal of a whole request fails every version it named.

        Raises:
            StoreUnavailable: the server stayed unreachable for ``outage_tolerance_s``.
            StoreError: the server refused a whole request with an error status.
        """
        bucket = self.bucket(artifact)
        pairs = list(versions)
        failures: list[RemoveFailure] = []
        for start in range(0, len(pairs), REMOVE_BATCH):
            chunk = pairs[start:start + REMOVE_BATCH]
            sent = {(key, version_id or _NULL_VERSION): (key, version_id) for key, version_id in chunk}
            request = [DeleteObject(key, version_id) for key, version_id in sent]
            errors = self._retry(lambda: list(self.client.remove_objects(bucket, request)), bucket=bucket,
                                 key=chunk[0][0], action="cannot remove object versions")
            for error in errors:
                if error.code in _NOT_FOUND_CODES:
                    continue  # already gone: what a retried request finds of its own first attempt
                if error.name is None:
                    # An error about the request as a whole (a 200 answer with an <Error> body).
                    failures.extend(RemoveFailure(key, version_id, error.code, error.message or "")
                                    for key, version_id in chunk)
                    continue
                key, version_id = sent.get((error.name, error.version_id or _NULL_VERSION),
                                           (error.name, error.version_id))
                failures.append(RemoveFailure(key, version_id, error.code, error.message or ""))
        return failures

    def list_subprefixes(self, artifact: str, prefix: str) -> list[str]:
        """The "folders" directly under ``prefix`` (common prefixes of a listing without recursion),
        each as its full name ending in '/'. Complete or an error, like :meth:`list_keys`."""
        bucket = self.bucket(artifact)
        return self._retry(
            lambda: [item.object_name for item in self.client.list_objects(bucket, prefix=prefix, recursive=False)
                     if item.is_dir],
            bucket=bucket, key=prefix, action="cannot list prefixes")

    def list_prefix(self, bucket: str, prefix: str) -> list[ListedObject]:
        """Every current object under ``s3://bucket/prefix`` with its size and ETag, sorted by key;
        folder placeholders (keys ending in '/') hold nothing and are left out. For buckets outside the
        artifact classes, such as base models. Complete or an error, like :meth:`list_keys`."""
        listed = self._retry(
            lambda: [ListedObject(key=item.object_name, size=int(item.size or 0), etag=_unquote(item.etag))
                     for item in self.client.list_objects(bucket, prefix=prefix, recursive=True)
                     if not item.object_name.endswith("/")],
            bucket=bucket, key=prefix, action="cannot list objects to download")
        return sorted(listed, key=lambda item: item.key)

    def download_prefix(self, bucket: str, prefix: str, target: str | Path, *,
                        objects: Iterable[ListedObject] | None = None) -> int:
        """Copy every object under ``s3://bucket/prefix`` into the folder ``target`` (keys relative to
        ``prefix`` become paths). For buckets outside the artifact classes, such as base models.

        The listing is complete before the first download; each download is retried on its own and
        rewrites its file whole, so a copy interrupted by an outage carries on where it was. A download
        is written to a temporary file next to its destination and renamed over it when whole; the
        temporary file is removed when the download fails, so a failed copy leaves no partial files
        (the files already copied stay).

        Args:
            objects: copy exactly these (from :meth:`list_prefix`) instead of listing again; each is
                fetched only while its ETag is still the listed one (``If-Match``), so the folder never
                mixes two versions of what was listed.

        Returns:
            How many objects were copied (0: nothing under the prefix).

        Raises:
            ObjectChanged: with ``objects``, one was replaced or removed since it was listed.
            StoreError: a key would land outside ``target`` (``..``), or the store refused a call.
            StoreUnavailable: the server stayed unreachable for ``outage_tolerance_s``.
        """
        root = Path(target).resolve()
        wanted = list(objects) if objects is not None else self.list_prefix(bucket, prefix)
        planned = []
        for item in wanted:
            destination = (root / item.key[len(prefix):]).resolve()
            if not item.key.startswith(prefix) or root not in destination.parents:
                raise StoreError(f"cannot download object: its key would be written outside {root}",
                                 bucket=bucket, key=item.key)
            planned.append((item, destination))
        for item, destination in planned:
            destination.parent.mkdir(parents=True, exist_ok=True)
            # Named by us (not minio's "<file>.<etag>.part.minio") so that it can be removed on failure.
            partial = destination.with_name(f".{destination.name}.{os.getpid()}-{threading.get_ident()}.part")
            pinned = {"If-Match": f'"{item.etag}"'} if objects is not None else None
            try:
                stat = self._retry(
                    lambda item=item, destination=destination, partial=partial: self.client.fget_object(
                        bucket, item.key, str(destination), request_headers=pinned, tmp_file_path=str(partial)),
                    bucket=bucket, key=item.key, action="cannot download object")
            except StoreUnavailable:
                raise
            except StoreError as error:
                # The HEAD before the GET answers a failed If-Match with a bare 412 (no error body).
                if objects is None or error.code not in _CHANGED_SINCE_LISTED_CODES:
                    raise
                raise ObjectChanged(f"cannot download object: it was replaced or removed since it was listed "
                                    f"({error.code}); list again", bucket=bucket, key=item.key,
                                    code=error.code) from None
            finally:
                partial.unlink(missing_ok=True)
            # A server that ignores If-Match still says which version it sent.
            sent_etag = _unquote(getattr(stat, "etag", None))
            if objects is not None and sent_etag is not None and sent_etag != item.etag:
                destination.unlink(missing_ok=True)
                raise ObjectChanged("cannot download object: it was replaced since it was listed; list again",
                                    bucket=bucket, key=item.key, code="ETagChanged")
        return len(planned)

    def put_json(self, artifact: str, key: str, document: Any, *, if_absent: bool = False,
                 if_match: str | None = None) -> StoredObject:
        """Write ``document`` as JSON; ``if_absent`` and ``if_match`` as in :meth:`put`."""
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        return self.put(artifact, key, data, content_type="application/json", if_absent=if_absent,
                        if_match=if_match)

    def get_json(self, artifact: str, key: str) -> Any:
        return json.loads(self.get(artifact, key))

    def with_retry(self, call: Callable[[], _T], *, artifact: str, key: str = "", version_id: str | None = None,
                   action: str) -> _T:
        """Run ``call`` (raw client calls) under the store's outage retries and error mapping.

        ``call`` must be safe to run more than once (it is repeated when an attempt fails without a
        meaningful answer); a listing inside it should be materialised (``list(...)``).

        Raises:
            StoreUnavailable: still failing after ``outage_tolerance_s``.
            StoreError: the server answered with an error (``action`` starts the message).
        """
        return self._retry(call, bucket=self.bucket(artifact), key=key, version_id=version_id, action=action)

    # --- internals -----------------------------------------------------------------------------

    def _sse_for_write(self, ssec: SseCustomerKey | None) -> Sse | None:
        if ssec is not None:
            return ssec
        return SseS3() if self.server_side_encryption else None

    def _put_conditional(self, bucket: str, key: str, data: bytes, *, content_type: str,
                         metadata: Mapping[str, str] | None, sse: Sse | None, if_match: str | None):
        # minio-py (7.2) has no public way to send If-None-Match / If-Match on PutObject (it would turn
        # the header into user metadata), so these calls go through the client's single-request PUT.
        # The headers are plain S3 (AWS, MinIO and SeaweedFS honour them); tests/integration exercise them.
        put_single = getattr(self.client, "_put_object", None)
        if put_single is None:  # pragma: no cover - a future minio release
            raise StoreError("this minio client cannot send a conditional write (If-None-Match/If-Match); "
                             "pin minio to a 7.2 release", bucket=bucket, key=key)
        headers = genheaders(dict(metadata or {}), sse, None, None, False)
        headers["Content-Type"] = content_type or "application/octet-stream"
        if if_match is not None:
            headers["If-Match"] = f'"{_unquote(if_match)}"'
        else:
            headers["If-None-Match"] = "*"
        return put_single(bucket, key, data, headers=headers)

    def _current_if_ours(self, bucket: str, key: str, digest: str,
                         ssec: SseCustomerKey | None) -> tuple[str | None, str | None] | None:
        """(version id, ETag) of the key's current version if its bytes hash to ``digest``, else None."""
        try:
            response = self.client.get_object(bucket, key, ssec=ssec)
        except S3Error as error:
            if error.code in _NOT_FOUND_CODES:
                return None
            raise
        try:
            current = response.read()
            version_id = response.headers.get("x-amz-version-id")
            etag = _unquote(response.headers.get("ETag"))
        finally:
            response.close()
            response.release_conn()
        return (version_id, etag) if hashlib.sha256(current).hexdigest() == digest else None

    def _retry(self, call: Callable[[], _T], *, bucket: str, key: str, action: str, version_id: str | None = None,
               conflict: type[WriteConflict] = WriteConflict, conflict_message: str | None = None) -> _T:
        """Run ``call``; retry while the server is unreachable or busy, until ``outage_tolerance_s``.

        Waits grow exponentially from RETRY_FIRST_DELAY_S, capped at RETRY_MAX_DELAY_S, with full jitter
        (so many callers coming back after an outage do not arrive together). The last attempt is made
        at the deadline. S3 answers that mean something are raised at once, mapped to StoreError kinds.
        """
        started = self._clock()
        deadline = started + self.outage_tolerance_s
        attempt = 0
        while True:
            attempt += 1
            try:
                result = call()
            except S3Error as error:
                if not _is_busy(error):
                    raise _store_error(action, error, bucket=bucket, key=key, version_id=version_id,
                                       conflict=conflict, conflict_message=conflict_message) from None
                failure: Exception = error
            except (ServerError, InvalidResponseError) as error:
                if _status_of(error) not in _BUSY_STATUSES:
                    raise StoreError(f"{action}: unexpected answer from the store: {_describe(error)}",
                                     bucket=bucket, key=key, version_id=version_id,
                                     code=f"HTTP{_status_of(error)}") from None
                failure = error
            except _NETWORK_ERRORS as error:
                if _is_certificate_error(error):  # a setting to fix, not an outage to wait out
                    raise StoreError(f"{action}: the store's TLS certificate was not accepted ({_describe(error)}); "
                                     "check store.ca_file and store.endpoint", bucket=bucket, key=key,
                                     version_id=version_id, code="TLSCertificate") from None
                failure = error
            else:
                if attempt > 1:
                    logger.info("store call in bucket %s succeeded after %d attempts (%.1f s)", bucket, attempt,
                                self._clock() - started)
                return result
            now = self._clock()
            if now >= deadline:
                raise StoreUnavailable(
                    f"{action}: the store was unreachable or busy for {now - started:.0f} s "
                    f"({attempt} attempts; last error: {_describe(failure)}); check store.endpoint and that the "
                    f"S3 server is running (store.outage_tolerance_s={self.outage_tolerance_s:g} s)",
                    bucket=bucket, key=key, version_id=version_id, code="StoreUnavailable") from None
            if attempt == 1:
                # Once per call; the bucket only: no key, no error text (it can quote URLs).
                logger.warning("store unreachable or busy (%s) in bucket %s; retrying for up to %.0f s",
                               _error_kind(failure), bucket, self.outage_tolerance_s)
            ceiling_s = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (attempt - 1))
            self._sleep(min(self._rng.uniform(0, ceiling_s), deadline - now))


def _unquote(etag: str | None) -> str | None:
    return etag.strip().strip('"') if etag else etag


def _status_of(error: Exception) -> int | None:
    if isinstance(error, S3Error):
        return getattr(error.response, "status", None)
    if isinstance(error, ServerError):
        return error.status_code
    if isinstance(error, InvalidResponseError):
        return getattr(error, "_code", None)
    return None


def _is_busy(error: S3Error) -> bool:
    """An S3 error answer that means "not now" rather than "no"."""
    return error.code in _BUSY_CODES or _status_of(error) in _BUSY_STATUSES


def _is_certificate_error(error: BaseException) -> bool:
    """Whether a network error is a rejected TLS certificate (urllib3 nests it a few levels deep)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        pending.extend([getattr(current, "reason", None), current.__cause__, current.__context__,
                        *(arg for arg in current.args if isinstance(arg, BaseException))])
    return False


def _error_kind(error: Exception) -> str:
    if isinstance(error, S3Error):
        return f"S3 {error.code}"
    if isinstance(error, (ServerError, InvalidResponseError)):
        return f"HTTP {_status_of(error)}"
    reason = getattr(error, "reason", None)  # urllib3's MaxRetryError wraps the real cause
    return type(reason or error).__name__


def _describe(error: Exception) -> str:
    if isinstance(error, S3Error):
        return f"{error.code} (HTTP {_status_of(error)}): {error.message}"
    if isinstance(error, (ServerError, InvalidResponseError)):
        return f"HTTP {_status_of(error)}"
    reason = getattr(error, "reason", None) or error
    return f"{type(reason).__name__}: {str(reason)[:200]}"


def _store_error(action: str, error: S3Error, *, bucket: str, key: str = "", version_id: str | None = None,
                 conflict: type[WriteConflict] = WriteConflict, conflict_message: str | None = None) -> StoreError:
    if error.code in ("NoSuchKey", "NoSuchObject", "NoSuchVersion"):
        kind, message = ObjectNotFound, f"{action}: {error.code}: {error.message}"
    elif error.code == "PreconditionFailed":
        kind, message = conflict, conflict_message or f"{action}: {error.code}: {error.message}"
    else:
        kind, message = StoreError, f"{action}: {error.code}: {error.message}"
    return kind(message, bucket=bucket, key=key, version_id=version_id, request_id=error.request_id,
                code=error.code)
