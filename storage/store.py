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
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.error import S3Error
from minio.helpers import genheaders
from minio.sse import Sse, SseCustomerKey, SseS3
from minio.versioningconfig import VersioningConfig

ARTIFACT_CLASSES = ("uploads", "derived", "models", "outputs", "state", "receipts")
_TRANSIENT_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


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


class ObjectExists(StoreError):
    """A create-only write (``if_absent=True``) found the key already there."""


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


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_client(*, endpoint: str, access_key: str, secret_key: str, secure: bool, region: str = "us-east-1",
                ca_file: str = "") -> Minio:
    """A minio client with bounded timeouts and retries (a dead store must not hang a stage forever)."""
    http_client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        maxsize=16,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=(ca_file or certifi.where()) if secure else None,
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
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
    """

    def __init__(self, client: Minio, buckets: Mapping[str, str], *, server_side_encryption: bool = False):
        missing = set(ARTIFACT_CLASSES) - set(buckets)
        if missing:
            raise ValueError(f"buckets is missing artifact classes: {', '.join(sorted(missing))}")
        self.client = client
        self.buckets = dict(buckets)
        self.server_side_encryption = server_side_encryption

    @classmethod
    def from_config(cls, store_config) -> "ArtifactStore":
        """Build from a :class:`headshots.config.StoreConfig` (endpoint must be set; its
        ``server_side_encryption`` switch turns SSE-S3 on)."""
        if not store_config.endpoint:
            raise ValueError("store.endpoint is empty: start the local stack (`headshots up`) or set it")
        client = make_client(endpoint=store_config.endpoint, access_key=store_config.access_key,
                             secret_key=store_config.secret_key, secure=store_config.secure,
                             region=store_config.region, ca_file=store_config.ca_file)
        return cls(client, store_config.buckets,
                   server_side_encryption=store_config.server_side_encryption)

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
            try:
                if not self.client.bucket_exists(bucket):
                    try:
                        self.client.make_bucket(bucket)
                    except S3Error as error:
                        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                config = self.client.get_bucket_versioning(bucket)
                if config.status != ENABLED:
                    self.client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
            except S3Error as error:
                raise _store_error("cannot prepare bucket", error, bucket=bucket) from None

    # --- objects -------------------------------------------------------------------------------

    def put(self, artifact: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
            metadata: Mapping[str, str] | None = None, ssec: SseCustomerKey | None = None,
            if_absent: bool = False) -> StoredObject:
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

        Returns:
            The record of the version written.

        Raises:
            ObjectExists: ``if_absent`` and the key already exists.
            StoreError: the write failed (bucket, key and request id in the message).
        """
        bucket = self.bucket(artifact)
        digest = hashlib.sha256(data).hexdigest()
        sse = self._sse_for_write(ssec)

        def write():
            if if_absent:
                return self._put_if_absent(bucket, key, data, content_type=content_type, metadata=metadata,
                                           sse=sse)
            return self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type,
                                          metadata=dict(metadata or {}), sse=sse)

        result = self._retry(write, bucket=bucket, key=key, action="cannot write object")
        return StoredObject(artifact=artifact, bucket=bucket, key=key, version_id=result.version_id,
                            size=len(data), sha256=digest, written_at=utc_now_iso())

    def get(self, artifact: str, key: str, *, version_id: str | None = None,
            ssec: SseCustomerKey | None = None) -> bytes:
        """Read one object (the current version, or ``version_id``).

        Args:
            ssec: the customer key the object was written with (SSE-C objects only).

        Raises:
            ObjectNotFound: no such key or version.
            StoreError: any other failure; an SSE-C object read without its key fails with code
                ``InvalidArgument``, with another key with ``AccessDenied``.
        """
        bucket = self.bucket(artifact)

        def read() -> bytes:
            response = self.client.get_object(bucket, key, version_id=version_id, ssec=ssec)
            try:
                return response.read()
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
        try:
            self.client.stat_object(bucket, key, ssec=ssec)
            return True
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NoSuchVersion", "ResourceNotFound"):
                return False
            raise _store_error("cannot stat object", error, bucket=bucket, key=key) from None

    def remove_version(self, artifact: str, key: str, *, version_id: str) -> None:
        """Permanently remove one version (or delete marker) of ``key``.

        Raises:
            StoreError: the server refused (bucket, key, version id and request id in the message).
        """
        bucket = self.bucket(artifact)
        self._retry(lambda: self.client.remove_object(bucket, key, version_id=version_id), bucket=bucket,
                    key=key, version_id=version_id, action="cannot remove object version")

    def _sse_for_write(self, ssec: SseCustomerKey | None) -> Sse | None:
        if ssec is not None:
            return ssec
        return SseS3() if self.server_side_encryption else None

    def _put_if_absent(self, bucket: str, key: str, data: bytes, *, content_type: str,
                       metadata: Mapping[str, str] | None, sse: Sse | None):
        # minio-py (7.2) has no public way to send If-None-Match on PutObject (it would turn the header
        # into user metadata), so this one call goes through the client's single-request PUT. The
        # header is plain S3 (AWS, MinIO and SeaweedFS all honour it); tests/integration exercise it.
        put_single = getattr(self.client, "_put_object", None)
        if put_single is None:  # pragma: no cover - a future minio release
            raise StoreError("this minio client cannot send a conditional write (If-None-Match); "
                             "pin minio to a 7.2 release", bucket=bucket, key=key)
        headers = genheaders(dict(metadata or {}), sse, None, None, False)
        headers["Content-Type"] = content_type or "application/octet-stream"
        headers["If-None-Match"] = "*"
        return put_single(bucket, key, data, headers=headers)

    def list_keys(self, artifact: str, prefix: str, *, recursive: bool = True) -> Iterator[str]:
        """Current (latest, not deleted) keys under ``prefix``."""
        bucket = self.bucket(artifact)
        try:
            for item in self.client.list_objects(bucket, prefix=prefix, recursive=recursive):
                yield item.object_name
        except S3Error as error:
            raise _store_error("cannot list objects", error, bucket=bucket, key=prefix) from None

    def list_versions(self, artifact: str, prefix: str) -> list[tuple[str, str | None, bool]]:
        """Every version and delete marker under ``prefix`` as (key, version id, is delete marker)."""
        bucket = self.bucket(artifact)
        try:
            return [(item.object_name, item.version_id, bool(item.is_delete_marker))
                    for item in self.client.list_objects(bucket, prefix=prefix, recursive=True,
                                                         include_version=True)]
        except S3Error as error:
            raise _store_error("cannot list object versions", error, bucket=bucket, key=prefix) from None

    def put_json(self, artifact: str, key: str, document: Any) -> StoredObject:
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        return self.put(artifact, key, data, content_type="application/json")

    def get_json(self, artifact: str, key: str) -> Any:
        return json.loads(self.get(artifact, key))

    def _retry(self, call, *, bucket: str, key: str, action: str, version_id: str | None = None,
               attempts: int = 4):
        """Retry transient network failures with jittered backoff; S3 errors are answers, not outages."""
        delay_s = 0.25
        for attempt in range(attempts):
            try:
                return call()
            except S3Error as error:
                raise _store_error(action, error, bucket=bucket, key=key, version_id=version_id) from None
            except _TRANSIENT_ERRORS as error:
                if attempt == attempts - 1:
                    raise StoreError(f"{action}: store unreachable ({error})", bucket=bucket, key=key,
                                     version_id=version_id) from None
                time.sleep(delay_s * (1 + 0.5 * (hash((key, attempt)) % 100) / 100))
                delay_s *= 2
        raise AssertionError("unreachable")


def _store_error(action: str, error: S3Error, *, bucket: str, key: str = "",
                 version_id: str | None = None) -> StoreError:
    if error.code in ("NoSuchKey", "NoSuchObject", "NoSuchVersion"):
        kind = ObjectNotFound
    elif error.code == "PreconditionFailed":
        kind = ObjectExists
    else:
        kind = StoreError
    return kind(f"{action}: {error.code}: {error.message}", bucket=bucket, key=key, version_id=version_id,
                request_id=error.request_id, code=error.code)
