"""Deletion's store calls under outages (issue #12), against a scripted fake client (no server, fake clock):
complete version listings, batch deletes by version id whose lazy answers are read inside the retry,
failures per object, and the base-model copy."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from storage.deletion import purge_prefix
from storage.store import REMOVE_BATCH, ArtifactStore, RemoveFailure, StoreError, StoreUnavailable
from tests.unit.store_fakes import BUCKETS, FakeClock, dropped, refused


class VersionedFake:
    """Versions per (bucket, key) in memory, with the minio calls deletion uses.

    ``fail[method]`` holds what to raise, in order, before the method works; an entry ``("after", e)``
    does the work and then raises ``e`` (the answer was lost), None lets that call through.
    ``remove_objects`` is lazy like minio's: nothing is sent until its answer is iterated, one request
    per 1000 keys.
    """

    def __init__(self, *, missing_version_code: str | None = "NoSuchVersion"):
        self.versions: dict[tuple[str, str], list[tuple[str, bool, int]]] = {}
        self.fail: dict[str, list] = {}
        self.calls: dict[str, int] = {}
        self.requests: list[int] = []  # keys per DeleteObjects request actually sent
        self.refuse: set[tuple[str, str]] = set()  # (key, version id) answered AccessDenied
        self.request_error: str | None = None  # a 200 answer whose body is one <Error>
        self.files: dict[str, bytes] = {}
        self.missing_version_code = missing_version_code
        self._counter = 0

    def add(self, bucket: str, key: str, *, marker: bool = False, size: int = 3, version_id: str | None = None) -> str:
        self._counter += 1
        version_id = version_id or f"v{self._counter}"
        self.versions.setdefault((bucket, key), []).append((version_id, marker, 0 if marker else size))
        return version_id

    def _enter(self, method: str):
        self.calls[method] = self.calls.get(method, 0) + 1
        pending = self.fail.get(method)
        if pending:
            failure = pending.pop(0)
            if failure is None:  # this call goes through
                return None
            if not isinstance(failure, tuple):
                raise failure
            return failure[1]
        return None

    def list_objects(self, bucket, *, prefix, recursive, include_version=False):
        self._enter("list_objects")
        middle = self.fail.get("list_objects_midway")
        listed = 0
        for (found_bucket, key), versions in sorted(self.versions.items()):
            if found_bucket != bucket or not key.startswith(prefix) or not versions:
                continue
            rest = key[len(prefix):]
            if not recursive and "/" in rest:
                folder = prefix + rest.split("/", 1)[0] + "/"
                yield SimpleNamespace(object_name=folder, is_dir=True, version_id=None, is_delete_marker=False,
                                      size=None)
                continue
            for version_id, marker, size in (versions if include_version else versions[-1:]):
                if listed == 2 and middle:
                    raise middle.pop(0)
                listed += 1
                yield SimpleNamespace(object_name=key, is_dir=False, version_id=version_id,
                                      is_delete_marker=marker, size=size, etag=f'"etag-{version_id}"')

    def remove_objects(self, bucket, delete_object_list):
        pending = iter(delete_object_list)
        while True:
            batch = [item for _, item in zip(range(1000), pending)]
            if not batch:
                return
            lost = self._enter("remove_objects")
            self.requests.append(len(batch))
            if self.request_error:
                yield SimpleNamespace(code=self.request_error, message="busy", name=None, version_id=None)
                continue
            errors = []
            for item in batch:
                versions = self.versions.get((bucket, item.name), [])
                if (item.name, item.version_id) in self.refuse:
                    errors.append(SimpleNamespace(code="AccessDenied", message="no", name=item.name,
                                                  version_id=item.version_id))
                elif item.version_id is None:
                    versions.append(("marker-added", True, 0))  # S3: no version id, only a delete marker
                elif any(v[0] == item.version_id for v in versions):
                    versions[:] = [v for v in versions if v[0] != item.version_id]
                elif self.missing_version_code:
                    errors.append(SimpleNamespace(code=self.missing_version_code, message="gone", name=item.name,
                                                  version_id=item.version_id))
            if lost:
                raise lost
            yield from errors

    def remove_object(self, bucket, key, version_id=None):
        self._enter("remove_object")
        versions = self.versions.get((bucket, key), [])
        versions[:] = [v for v in versions if v[0] != version_id]

    def fget_object(self, bucket, key, path, request_headers=None, tmp_file_path=None):
        lost = self._enter("fget_object")
        self.files[path] = b"data of " + key.encode()
        if lost:
            raise lost
        return SimpleNamespace(etag=f'"etag-{self.versions[(bucket, key)][-1][0]}"')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake() -> VersionedFake:
    return VersionedFake()


@pytest.fixture
def store(fake, clock) -> ArtifactStore:
    return ArtifactStore(fake, BUCKETS, outage_tolerance_s=30, sleep=clock.sleep, clock=clock, rng=random.Random(3))


def _listed(fake: VersionedFake, bucket: str) -> list[tuple[str, str]]:
    return [(key, v[0]) for (b, key), versions in sorted(fake.versions.items()) if b == bucket for v in versions]


def test_a_version_listing_restarts_after_an_outage_and_is_complete_with_sizes(store, fake, clock):
    for name in ("a", "b", "c"):
        fake.add("b-models", f"t/b/p/{name}", size=10)
        fake.add("b-models", f"t/b/p/{name}", size=20)
    fake.add("b-models", "t/b/p/d", marker=True)
    fake.fail["list_objects"] = [refused()]
    fake.fail["list_objects_midway"] = [dropped()]  # the second attempt dies after two versions
    listed = store.list_all_versions("models", "t/b/p/")
    assert len(listed) == 7 and len(set(listed)) == 7 and fake.calls["list_objects"] == 3
    assert ("t/b/p/d", listed[-1][1], True, 0) == listed[-1]
    assert {size for _, _, marker, size in listed if not marker} == {10, 20}
    assert len(clock.sleeps) == 2


def test_a_batch_delete_whose_lazy_answer_fails_is_retried_inside_the_call(store, fake, clock):
    versions = [(f"t/b/p/{n}", fake.add("b-uploads", f"t/b/p/{n}")) for n in range(5)]
    fake.fail["remove_objects"] = [refused(), refused()]  # raised only once the answer is read
    assert store.remove_versions("uploads", versions) == []
    assert _listed(fake, "b-uploads") == [] and fake.calls["remove_objects"] == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize("missing_code", ["NoSuchVersion", "NoSuchKey", None],
                         ids=["aws-minio", "no-such-key", "seaweedfs-answers-deleted"])
def test_a_retried_delete_after_a_lost_answer_counts_versions_already_gone_as_removed(clock, missing_code):
    fake = VersionedFake(missing_version_code=missing_code)
    store = ArtifactStore(fake, BUCKETS, outage_tolerance_s=30, sleep=clock.sleep, clock=clock)
    versions = [(f"t/b/p/{n}", fake.add("b-derived", f"t/b/p/{n}")) for n in range(4)]
    fake.fail["remove_objects"] = [("after", dropped())]  # everything went, the answer did not come back
    assert store.remove_versions("derived", versions) == []
    assert fake.requests == [4, 4] and _listed(fake, "b-derived") == []


def test_deletes_go_in_batches_of_at_most_1000(store, fake):
    versions = [(f"t/b/p/{n:05d}", fake.add("b-models", f"t/b/p/{n:05d}")) for n in range(2 * REMOVE_BATCH + 500)]
    fake.fail["remove_objects"] = [None, refused()]  # the second batch meets an outage
    assert store.remove_versions("models", versions) == []
    assert fake.requests == [REMOVE_BATCH, REMOVE_BATCH, 500] and fake.calls["remove_objects"] == 4
    assert _listed(fake, "b-models") == []


def test_failures_are_reported_per_object_in_the_callers_terms(store, fake):
    kept = fake.add("b-uploads", "t/b/p/kept")
    gone = fake.add("b-uploads", "t/b/p/gone")
    fake.add("b-uploads", "t/b/p/old", version_id="null")  # an object from before versioning
    fake.refuse.add(("t/b/p/kept", kept))
    failures = store.remove_versions("uploads", [("t/b/p/kept", kept), ("t/b/p/gone", gone), ("t/b/p/old", None)])
    assert failures == [RemoveFailure("t/b/p/kept", kept, "AccessDenied", "no")]
    # None went out as the "null" version, not as a bare delete that would only add a marker.
    assert _listed(fake, "b-uploads") == [("t/b/p/kept", kept)]
    fake.refuse.add(("t/b/p/kept", "null"))
    fake.add("b-uploads", "t/b/p/kept", version_id="null")
    failures = store.remove_versions("uploads", [("t/b/p/kept", None)])
    assert [(f.key, f.version_id) for f in failures] == [("t/b/p/kept", None)]


def test_an_error_about_the_whole_request_fails_every_version_it_named(store, fake):
    versions = [(f"t/b/p/{n}", fake.add("b-uploads", f"t/b/p/{n}")) for n in range(3)]
    fake.request_error = "InternalError"
    failures = store.remove_versions("uploads", versions)
    assert [(f.key, f.version_id, f.code) for f in failures] == [(k, v, "InternalError") for k, v in versions]


def test_an_outage_longer_than_the_tolerance_fails_the_delete(store, fake):
    versions = [("t/b/p/a", fake.add("b-uploads", "t/b/p/a"))]
    fake.fail["remove_objects"] = [refused() for _ in range(1000)]
    with pytest.raises(StoreUnavailable, match="cannot remove object versions"):
        store.remove_versions("uploads", versions)


def test_purge_prefix_over_outages_receipts_each_version_once_and_leaves_nothing(store, fake):
    for name in ("a", "b"):
        for _ in range(3):
            fake.add("b-models", f"t/b/p/models/{name}")
    fake.add("b-models", "t/b/p/models/c", marker=True)
    expected = set(_listed(fake, "b-models"))
    fake.fail["list_objects"] = [refused()]
    fake.fail["remove_objects"] = [("after", dropped()), refused()]
    deleted, remaining = purge_prefix(store, "models", "t/b/p/")
    assert remaining == 0 and _listed(fake, "b-models") == []
    assert sorted((d.key, d.version_id) for d in deleted) == sorted(expected)
    assert any(d.delete_marker for d in deleted)


def test_subprefixes_ride_out_an_outage(store, fake):
    fake.add("b-receipts", "_system/receipts/2026-01-01/r1.json")
    fake.add("b-receipts", "_system/receipts/2026-01-02/r2.json")
    fake.add("b-receipts", "_system/receipts/top.json")
    fake.fail["list_objects"] = [refused()]
    assert store.list_subprefixes("receipts", "_system/receipts/") == [
        "_system/receipts/2026-01-01/", "_system/receipts/2026-01-02/"]


def test_a_base_model_copy_rides_out_an_outage_and_stays_inside_its_folder(store, fake, tmp_path):
    for name in ("model_index.json", "unet/config.json", "unet/weights.bin", "placeholder/"):
        fake.add("models-bucket", f"base/sd/{name}")
    fake.fail["list_objects"] = [refused()]
    fake.fail["fget_object"] = [None, refused(), ("after", dropped())]
    assert store.download_prefix("models-bucket", "base/sd/", tmp_path / "copy") == 3
    assert sorted(fake.files) == sorted(str((tmp_path / "copy" / n).resolve())
                                        for n in ("model_index.json", "unet/config.json", "unet/weights.bin"))
    assert store.download_prefix("models-bucket", "base/none/", tmp_path / "none") == 0
    fake.add("models-bucket", "evil/../../escape.txt")
    with pytest.raises(StoreError, match="outside"):
        store.download_prefix("models-bucket", "evil/", tmp_path / "evil")
    assert not (tmp_path.parent / "escape.txt").exists()


def test_lifecycle_rules_are_set_and_read_through_an_outage(store, fake, clock):
    from storage.lifecycle import apply_lifecycle_rules, read_lifecycle_days
    from storage.retention import load_policy

    rules: dict[str, object] = {}

    def set_bucket_lifecycle(bucket, config):
        fake._enter("set_bucket_lifecycle")
        rules[bucket] = config

    def get_bucket_lifecycle(bucket):
        fake._enter("get_bucket_lifecycle")
        return rules.get(bucket)

    fake.set_bucket_lifecycle, fake.get_bucket_lifecycle = set_bucket_lifecycle, get_bucket_lifecycle
    fake.fail["set_bucket_lifecycle"] = [refused(), dropped()]
    fake.fail["get_bucket_lifecycle"] = [refused()]
    policy = load_policy(None)
    applied = apply_lifecycle_rules(store, policy, grace_days=7)
    assert applied == {"uploads": policy.max_days + 7, "derived": policy.max_days + 7, "models": policy.max_days + 7}
    assert read_lifecycle_days(store, "models") == policy.max_days + 7
    assert read_lifecycle_days(store, "outputs") is None
    assert fake.calls["set_bucket_lifecycle"] == 5 and len(clock.sleeps) == 3
