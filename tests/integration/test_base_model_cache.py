"""A base model from ``s3://`` is copied once per node (issue #12), against the real S3 server.

The node cache is the folder ``HEADSHOTS_NODE_CACHE_DIR`` names; a "restart" is a new GpuWorker on the
same folder, a "node wipe" removes it. What the workers fetch is counted on their own minio clients: every
GET still goes to the server, the count only records which objects were asked for.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from cluster.worker import NODE_CACHE_ENV, GpuWorker
from pipeline import models
from storage.store import ArtifactStore

# Longest a test waits for another thread to get somewhere; reaching it fails the test, not a timing bound.
WAIT_LIMIT_S = 120.0


class FetchLog:
    """The object GETs one worker's store sends, in order. ``before_get`` runs before each one is sent."""

    def __init__(self, worker: GpuWorker, *, before_get=None, after_listing=None):
        self.keys: list[str] = []
        self._lock = threading.Lock()
        client = worker.store.client
        send_get, send_listing = client.get_object, client.list_objects

        def get_object(bucket_name, object_name, *args, **kwargs):
            with self._lock:
                self.keys.append(object_name)
            if before_get is not None:
                before_get(object_name)
            return send_get(bucket_name, object_name, *args, **kwargs)

        def list_objects(*args, **kwargs):
            yield from send_listing(*args, **kwargs)
            if after_listing is not None:
                after_listing()

        # Instance attributes: minio's fget_object calls self.get_object, so it goes through here too.
        client.get_object, client.list_objects = get_object, list_objects


def _upload_model(store: ArtifactStore, folder: Path, bucket: str, prefix: str) -> int:
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in files:
        store.client.fput_object(bucket, prefix + path.relative_to(folder).as_posix(), str(path))
    return len(files)


@pytest.fixture
def model(store, tmp_path):
    """A tiny diffusers folder uploaded under a fresh prefix: (s3:// source, bucket, prefix, object count)."""
    bucket = store.bucket("models")  # any bucket the worker's credentials can read
    prefix = f"_system/base-models/{tmp_path.name}/"
    count = _upload_model(store, models.save_tiny_model(tmp_path / "tiny-v1", seed=0), bucket, prefix)
    return f"s3://{bucket}/{prefix}", bucket, prefix, count


@pytest.fixture
def node_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "node-cache"
    monkeypatch.setenv(NODE_CACHE_ENV, str(folder))
    return folder


def _worker(base_config, name: str) -> GpuWorker:
    return GpuWorker(base_config, name)


def _same_weights(pipe, expected_folder: Path) -> bool:
    """Whether every weighted component of ``pipe`` is the one saved in ``expected_folder``."""
    expected = models.load_base_pipeline(str(expected_folder), device="cpu", dtype=torch.float32)
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(expected, component).state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[name].cpu(), theirs[name]) for name in ours):
            return False
    return True


def test_a_restarted_worker_reuses_the_node_copy_and_a_wiped_node_copies_again(base_config, model, node_cache,
                                                                              tmp_path):
    source, _, _, object_count = model
    first = _worker(base_config, "first")
    first_fetches = FetchLog(first)
    assert models.native_resolution(first._pipeline(source)) == 64
    assert len(first_fetches.keys) == object_count
    copy_dir = Path(first._materialize(source))
    assert node_cache / "base-models" in copy_dir.parents and (node_cache / "persons") not in copy_dir.parents

    restarted = _worker(base_config, "restarted")
    restarted_fetches = FetchLog(restarted)
    pipe = restarted._pipeline(source)
    assert restarted_fetches.keys == []
    assert Path(restarted._materialize(source)) == copy_dir
    assert _same_weights(pipe, tmp_path / "tiny-v1")

    shutil.rmtree(node_cache)
    after_wipe = _worker(base_config, "after-wipe")
    after_wipe_fetches = FetchLog(after_wipe)
    pipe = after_wipe._pipeline(source)
    assert len(after_wipe_fetches.keys) == object_count
    assert _same_weights(pipe, tmp_path / "tiny-v1")


def test_two_workers_on_one_node_copy_once_and_both_load_the_whole_model(base_config, model, node_cache, tmp_path):
    source, _, _, object_count = model
    workers = {name: _worker(base_config, name) for name in ("slot-0", "slot-1")}
    listed = {name: threading.Event() for name in workers}
    first_get = {"by": None}
    first_get_lock = threading.Lock()
    waited_too_long: list[str] = []

    def hold_first_get_until_the_other_listed(name: str):
        # The first copier pauses until the other worker has listed the model and so decided whether a
        # copy exists: without a node lock it would now copy too; with one it waits for this copy.
        def before_get(_key: str) -> None:
            with first_get_lock:
                if first_get["by"] is not None:
                    return
                first_get["by"] = name
            other = next(n for n in workers if n != name)
            if not listed[other].wait(WAIT_LIMIT_S):
                waited_too_long.append(other)
        return before_get

    fetches = {name: FetchLog(worker, before_get=hold_first_get_until_the_other_listed(name),
                              after_listing=listed[name].set) for name, worker in workers.items()}
    copies, errors = {}, []

    def copy(name: str) -> None:
        try:
            copies[name] = workers[name]._materialize(source)
        except BaseException as error:  # reported below, in the test's thread
            errors.append((name, error))

    # Only the copies run at once: diffusers cannot load two pipelines in threads of one process (its
    # empty-weights patch is process-wide), and real workers are processes of their own.
    threads = [threading.Thread(target=copy, args=(name,)) for name in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_LIMIT_S * 2)
    assert not errors and not waited_too_long and all(not thread.is_alive() for thread in threads)
    copier = first_get["by"]
    waiter = next(name for name in workers if name != copier)
    assert len(fetches[copier].keys) == object_count and fetches[waiter].keys == []
    assert copies[copier] == copies[waiter]
    for name, worker in workers.items():
        assert _same_weights(worker._pipeline(source), tmp_path / "tiny-v1"), name
    assert len(fetches[copier].keys) + len(fetches[waiter].keys) == object_count


def test_a_copy_left_unfinished_is_not_used_and_is_replaced(base_config, model, node_cache, tmp_path):
    source, _, _, object_count = model
    copy_dir = Path(_worker(base_config, "before-the-crash")._materialize(source))
    weights = copy_dir / "unet" / "diffusion_pytorch_model.safetensors"
    full_size = weights.stat().st_size
    # What a copier killed half-way leaves: its .partial- folder, and (an older layout, or a disk that
    # lost the last writes) a version folder with a short file and no completion record.
    leftover = copy_dir.parent / f".partial-{copy_dir.name}-killed"
    shutil.copytree(copy_dir, leftover)
    (copy_dir / ".copy.json").unlink()
    with open(weights, "r+b") as handle:
        handle.truncate(full_size // 2)

    worker = _worker(base_config, "after-the-crash")
    fetches = FetchLog(worker)
    pipe = worker._pipeline(source)
    assert len(fetches.keys) == object_count
    assert Path(worker._materialize(source)) == copy_dir and weights.stat().st_size == full_size
    assert not leftover.exists() and not list(copy_dir.parent.glob(".partial-*"))
    assert _same_weights(pipe, tmp_path / "tiny-v1")


def test_a_copy_cut_short_by_the_store_leaves_nothing_and_the_next_worker_copies_whole(base_config, model,
                                                                                      node_cache, tmp_path):
    source, _, _, object_count = model

    class StoreRefused(RuntimeError):
        pass

    def fail_on_the_third_object(_key: str) -> None:
        if len(dying_fetches.keys) == 3:
            raise StoreRefused("the copy dies here")

    dying = _worker(base_config, "dying")
    dying_fetches = FetchLog(dying, before_get=fail_on_the_third_object)
    with pytest.raises(StoreRefused):
        dying._materialize(source)
    model_dir = node_cache / "base-models" / source[len("s3://"):].strip("/")
    assert sorted(path.name for path in model_dir.iterdir()) == [".lock"]  # no partial folder, no version

    worker = _worker(base_config, "next")  # also proves the lock was let go
    fetches = FetchLog(worker)
    assert _same_weights(worker._pipeline(source), tmp_path / "tiny-v1")
    assert len(fetches.keys) == object_count


def test_a_new_version_under_the_same_prefix_is_copied_again(base_config, store, model, node_cache, tmp_path):
    source, bucket, prefix, object_count = model
    old_copy = Path(_worker(base_config, "old")._materialize(source))
    _upload_model(store, models.save_tiny_model(tmp_path / "tiny-v2", seed=1), bucket, prefix)

    worker = _worker(base_config, "after-the-upload")
    fetches = FetchLog(worker)
    pipe = worker._pipeline(source)
    assert len(fetches.keys) == object_count
    assert Path(worker._materialize(source)) != old_copy
    assert _same_weights(pipe, tmp_path / "tiny-v2") and not _same_weights(pipe, tmp_path / "tiny-v1")


def test_a_model_replaced_while_it_is_copied_is_copied_as_the_new_version_never_a_mix(base_config, store, model,
                                                                                     node_cache, tmp_path):
    source, bucket, prefix, _ = model
    new_version = models.save_tiny_model(tmp_path / "tiny-v2", seed=1)
    replaced = threading.Event()

    # Keys are fetched in sorted order: the replacement lands after every other object was copied, between
    # the last one's HEAD and its GET, so only the GET itself can tell it is no longer the listed version.
    last_key = prefix + max(path.relative_to(new_version).as_posix() for path in new_version.rglob("*")
                            if path.is_file())

    def replace_the_model_once(key: str) -> None:
        if key == last_key and not replaced.is_set():
            replaced.set()
            _upload_model(store, new_version, bucket, prefix)

    worker = _worker(base_config, "copying-during-an-upload")
    FetchLog(worker, before_get=replace_the_model_once)
    pipe = worker._pipeline(source)
    assert replaced.is_set()
    assert _same_weights(pipe, new_version)
    model_dir = Path(worker._materialize(source)).parent
    assert [path.name for path in model_dir.iterdir() if path.name.startswith((".partial-", "version-"))] == [
        Path(worker._materialize(source)).name]


def test_a_download_that_breaks_mid_object_leaves_no_partial_file(base_config, store, model, tmp_path):
    _, bucket, prefix, _ = model
    listing = store.list_prefix(bucket, prefix)
    weights_key = prefix + "unet/diffusion_pytorch_model.safetensors"

    class ConnectionBroke(RuntimeError):
        pass

    class BreaksAfterOneChunk:
        def __init__(self, response):
            self._response = response

        def __getattr__(self, name):
            return getattr(self._response, name)

        def stream(self, *args, **kwargs):
            chunks = self._response.stream(*args, **kwargs)
            yield next(chunks)
            raise ConnectionBroke("the connection broke mid-object")

    copying = ArtifactStore.from_config(base_config.store)  # its own client, so only this test's GETs break
    send_get = copying.client.get_object

    def get_object(bucket_name, object_name, *args, **kwargs):
        response = send_get(bucket_name, object_name, *args, **kwargs)
        return BreaksAfterOneChunk(response) if object_name == weights_key else response

    copying.client.get_object = get_object
    target = tmp_path / "copy"
    with pytest.raises(ConnectionBroke):
        copying.download_prefix(bucket, prefix, target, objects=listing)
    written = sorted(path.relative_to(target).as_posix() for path in target.rglob("*") if path.is_file())
    assert written and all(".part" not in name for name in written)
    assert "unet/diffusion_pytorch_model.safetensors" not in written
