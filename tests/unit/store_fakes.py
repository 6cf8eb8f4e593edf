"""A scripted fake minio client and a fake clock, for ArtifactStore unit tests (no server, no waiting)."""

from __future__ import annotations

import http.client
from types import SimpleNamespace

import urllib3
from minio.error import S3Error

from storage.store import ARTIFACT_CLASSES

BUCKETS = {artifact: f"b-{artifact}" for artifact in ARTIFACT_CLASSES}


# --- a fake minio client ---------------------------------------------------------------------------

def refused() -> Exception:
    """What urllib3 raises while nothing listens on the port."""
    return urllib3.exceptions.MaxRetryError(
        None, "/b/k", reason=urllib3.exceptions.NewConnectionError(None, "Connection refused"))


def dropped() -> Exception:
    """What urllib3 raises when the server closes the connection before answering."""
    return urllib3.exceptions.ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed"))


def s3_error(code: str, status: int) -> S3Error:
    return S3Error(SimpleNamespace(status=status, headers={}), code, f"{code} message", "/b/k", "req-1", None)


class FakeResponse:
    def __init__(self, data: bytes, headers: dict[str, str]):
        self._data, self.headers = data, headers

    def read(self) -> bytes:
        return self._data

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeClient:
    """Versioned objects in memory; ``fail[method]`` is a list of exceptions raised before the method works.

    An entry ``("after", error)`` does the work first and then raises (the answer was lost); a function
    entry is called instead of the method (it raises what it wants).
    """

    def __init__(self):
        self.versions: dict[tuple[str, str], list[tuple[bytes, str, str]]] = {}
        self.fail: dict[str, list] = {}
        self.calls: dict[str, int] = {}
        self._counter = 0

    def _enter(self, method: str):
        self.calls[method] = self.calls.get(method, 0) + 1
        pending = self.fail.get(method)
        if pending:
            failure = pending.pop(0)
            if callable(failure):
                failure()
            if not isinstance(failure, tuple):
                raise failure
            return failure[1]
        return None

    def _write(self, bucket: str, key: str, data: bytes) -> SimpleNamespace:
        self._counter += 1
        etag, version_id = f"etag{self._counter}", f"v{self._counter}"
        self.versions.setdefault((bucket, key), []).append((data, etag, version_id))
        return SimpleNamespace(version_id=version_id, etag=etag)

    def _current(self, bucket: str, key: str):
        found = self.versions.get((bucket, key))
        return found[-1] if found else None

    def put_object(self, bucket, key, stream, length, *, content_type, metadata, sse):
        lost = self._enter("put_object")
        result = self._write(bucket, key, stream.read())
        if lost:
            raise lost
        return result

    def _put_object(self, bucket, key, data, headers):
        lost = self._enter("_put_object")
        current = self._current(bucket, key)
        if headers.get("If-None-Match") == "*" and current is not None:
            raise s3_error("PreconditionFailed", 412)
        if "If-Match" in headers and (current is None or f'"{current[1]}"' != headers["If-Match"]):
            raise s3_error("PreconditionFailed", 412)
        result = self._write(bucket, key, data)
        if lost:
            raise lost
        return result

    def get_object(self, bucket, key, version_id=None, ssec=None):
        self._enter("get_object")
        current = self._current(bucket, key)
        if current is None:
            raise s3_error("NoSuchKey", 404)
        return FakeResponse(current[0], {"ETag": f'"{current[1]}"', "x-amz-version-id": current[2]})

    def stat_object(self, bucket, key, ssec=None):
        self._enter("stat_object")
        if self._current(bucket, key) is None:
            raise s3_error("NoSuchKey", 404)
        return SimpleNamespace()

    def list_objects(self, bucket, *, prefix, recursive, include_version=False):
        self._enter("list_objects")
        mid_listing = self.fail.get("list_objects_after_two")
        for index, ((found_bucket, key), versions) in enumerate(sorted(self.versions.items())):
            if found_bucket != bucket or not key.startswith(prefix):
                continue
            if index == 2 and mid_listing:
                raise mid_listing.pop(0)
            for _, _, version_id in (versions if include_version else versions[-1:]):
                yield SimpleNamespace(object_name=key, version_id=version_id, is_delete_marker=False)

    def remove_object(self, bucket, key, version_id=None):
        self._enter("remove_object")


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
