"""The GPU worker: one per GPU, a base model resident, per-person LoRAs swapped in and out.

Lifecycle: the actor keeps the base pipeline of the last base model it served (loading a pipeline
costs ~6× a LoRA swap on an H200, see docs/measured-facts.md). Every person-specific thing it touches — crops,
training cache, LoRA — lives in memory only for the duration of one call; the one file (the LoRA on its
way to bytes) is written under the node cache's ``persons/`` folder, in a folder of this process's own.

At start a worker wipes everything under its node's ``persons/`` folder that no live worker process
holds (:func:`wipe_unowned_person_files`): nothing there is needed across a restart, and a node that was
down or cut off while a person was deleted must not keep their files when it comes back. Base models
(the rest of the node cache) are kept.

With crypto-erasure on, the worker holds a :class:`storage.crypto.PersonKeyStore` (``self.key_store``);
a person's data key is cached only while a stage for them runs, and dropped when it returns or fails.

If the actor dies and Ray restarts it, it starts empty; the coordinator re-sends the stage, which:
- train: resumes from the last checkpoint in the models bucket (same result as an uninterrupted run);
- generate: skips images already stored (keys are deterministic: style, index, seed).
Both calls are therefore safe to repeat.

Cut off from the head (a partitioned node, see :mod:`cluster.lease`): with a ``lease``, every training
step and write first waits until the head has confirmed recently that this node is alive, and every
write is confirmed again after it returns; once the head says the node is dead, the stage stops
(:class:`~cluster.lease.NodeCutOff`), undoing a write that may have landed after its replacement
started. Headshots are written create-only, so of two runs racing for one image exactly one version
is stored, and the other run adopts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from cluster.jobs import PersonJob, StageResult
from cluster.lease import HeadLease, NodeCutOff
from cluster.stages import gate_config, load_crops
from pipeline import package
from storage import barrier, keys
from storage.crypto import key_store_for
from storage.scoped import PersonScope
from storage.store import (ArtifactStore, ListedObject, ObjectChanged, ObjectExists, StoredObject, StoreError,
                           utc_now_iso)

logger = logging.getLogger(__name__)

Reporter = Callable[[PersonJob, list[StoredObject]], None]
REVOKED_MAX = 100_000
# Set by whoever starts a node (the chart: the GPU pod's cache volume; tests/integration/multinode.py: a
# folder per host) to the node's own local disk. Read by the worker process: the config a worker gets is
# the coordinator's, the same for every node, so it cannot say where one node's disk is.
NODE_CACHE_ENV = "HEADSHOTS_NODE_CACHE_DIR"


def node_cache_dir(config, environ=None) -> Path:
    """This node's cache folder (base models copied from ``s3://``): ``$HEADSHOTS_NODE_CACHE_DIR``
    where the node sets it, else ``workers.cache_dir``, else ``<home>/model-cache``."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(NODE_CACHE_ENV) or config.workers.cache_dir or str(Path(config.home_path) / "model-cache")
    return Path(chosen)


# Under the node cache: every file a worker writes for a person, and nothing else. Each worker process
# keeps its files in a folder of its own there (``_worker-<pid>-<token>``, not a valid id, so it never
# collides with a tenant's folder), locked (flock) for as long as the process lives.
PERSONS_FOLDER = "persons"
OWNER_LOCK = ".owner.lock"
OWNED_PREFIX = "_worker-"
STARTING_PREFIX = "_starting-"


def _owner_lock(folder: Path) -> tuple[bool, int | None]:
    """(held by a live worker process, the lock's descriptor if this call took it). A folder without a
    lock file (an old layout, or files put there by other means) is nobody's."""
    try:
        descriptor = os.open(folder / OWNER_LOCK, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False, None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return True, None
    return False, descriptor


def _count_files(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return 1
    return sum(1 for found in path.rglob("*") if found.is_file() and found.name != OWNER_LOCK)


def wipe_unowned_person_files(persons_dir: Path, *, keep: Path | None = None) -> dict:
    """Remove everything under ``persons_dir`` that no live worker process holds: the files of a
    worker that died (killed, its node lost) or of an older layout. Folders locked by a running worker
    (another slot on this node, mid-stage) are left alone.

    Returns:
        ``{"folders_removed", "files_removed", "kept_in_use"}``: counts only (folder names hold ids).
    """
    removed_folders = removed_files = kept = 0
    if not persons_dir.is_dir():
        return {"folders_removed": 0, "files_removed": 0, "kept_in_use": 0}
    for entry in list(persons_dir.iterdir()):
        if keep is not None and entry == keep:
            continue
        folder = entry.is_dir() and not entry.is_symlink()
        in_use, descriptor = _owner_lock(entry) if folder else (False, None)
        if in_use:
            kept += 1
            continue
        try:
            # Removed while holding the lock: a worker creating this folder right now waits, then finds
            # it gone and makes another (claim_person_folder).
            removed_files += _count_files(entry)
            if folder:
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed_folders += 1
        finally:
            if descriptor is not None:
                os.close(descriptor)
    return {"folders_removed": removed_folders, "files_removed": removed_files, "kept_in_use": kept}


def claim_person_folder(persons_dir: Path) -> tuple[Path, int]:
    """A folder of this process's own under ``persons_dir``, locked until the process exits (the lock
    goes with the process, however it ends). Made under a temporary name and renamed once locked, so
    another worker's start-up wipe never takes it for an abandoned one.

    Returns:
        (the folder, the lock's descriptor: keep it open).
    """
    persons_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        starting = persons_dir / f"{STARTING_PREFIX}{token}"
        try:
            starting.mkdir()
            descriptor = os.open(starting / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:
            continue  # another worker's wipe removed it before the lock was taken: make another
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        owned = persons_dir / f"{OWNED_PREFIX}{token}"
        try:
            starting.rename(owned)
        except FileNotFoundError:
            os.close(descriptor)
            continue
        return owned, descriptor
    raise RuntimeError(f"could not make a folder of this worker's own under {persons_dir}: other workers "
                       "starting on this node kept removing it; check that the node cache is not shared "
                       "between nodes (HEADSHOTS_NODE_CACHE_DIR or workers.cache_dir)")


# The node cache's folder for base models: beside persons/ (person data, wiped on its own), never in it.
BASE_MODEL_CACHE_FOLDER = "base-models"
# Inside each copy, written last before the rename: the listing the copy was made from.
BASE_MODEL_COPY_RECORD = ".copy.json"
# A model re-uploaded while a worker copies it is listed and copied again, this many times in all.
BASE_MODEL_COPY_ATTEMPTS = 3


def _split_s3_location(base_model: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``), refusing what could not be a
    folder inside the node cache."""
    bucket, _, prefix = base_model[len("s3://"):].partition("/")
    parts = [part for part in prefix.split("/") if part]
    if not bucket or not parts or any(part in (".", "..") for part in parts) or "/" in bucket:
        raise ValueError(f"base_model {base_model!r} must be s3://<bucket>/<prefix>/ with a non-empty prefix "
                         "and no '.' or '..' parts, e.g. s3://models/_system/base-models/sd15/")
    return bucket, "/".join(parts) + "/"


def _listing_digest(listing: list[ListedObject]) -> str:
    """Names one version of a model folder: any object added, removed or replaced changes it."""
    canonical = json.dumps([item.to_json() for item in listing], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _is_complete_copy(copy_dir: Path, listing: list[ListedObject]) -> bool:
    """Whether ``copy_dir`` holds this listing whole: its record matches and every file has its size
    (a copy cut short after the rename, e.g. by a power loss, fails the size check)."""
    try:
        record = json.loads((copy_dir / BASE_MODEL_COPY_RECORD).read_text())
        recorded = [ListedObject.from_json(item) for item in record["objects"]]
        prefix = record["prefix"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if recorded != listing:
        return False
    for item in listing:
        try:
            if (copy_dir / item.key[len(prefix):]).stat().st_size != item.size:
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, *, waiting_for: str):
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the ``with`` block.

    The file is opened anew on every call: flock excludes other open files, so threads of one process
    exclude each other as processes do; the lock ends with the process, so a killed holder frees it.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s (lock %s)", waiting_for, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_into_place(store: ArtifactStore, bucket: str, prefix: str, listing: list[ListedObject],
                     copy_dir: Path) -> None:
    """Copy ``listing`` into a fresh folder beside ``copy_dir`` and rename it into place when whole.
    Called with the model's lock held, so no other copier is running and any ``.partial-*`` folder or
    unfinished ``copy_dir`` is what a dead one left."""
    model_dir = copy_dir.parent
    model_dir.mkdir(parents=True, exist_ok=True)
    for leftover in model_dir.glob(".partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if copy_dir.exists():
        shutil.rmtree(copy_dir)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{copy_dir.name}-", dir=model_dir))
    try:
        logger.info("copying base model s3://%s/%s (%d objects, %d bytes) into %s", bucket, prefix, len(listing),
                    sum(item.size for item in listing), copy_dir)
        store.download_prefix(bucket, prefix, partial, objects=listing)
        record = {"bucket": bucket, "prefix": prefix, "objects": [item.to_json() for item in listing],
                  "copied_at": utc_now_iso()}
        (partial / BASE_MODEL_COPY_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        os.rename(partial, copy_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class StaleJob(RuntimeError):
    """A stage sent by a coordinator that has since been replaced (fenced by a newer epoch)."""


def _forgets_person_key(stage):
    """One GPU stage at a time, and the person's data key dropped from the cache when it ends.

    The actor takes several calls at once so that revoke/purge reach it mid-stage; the stages
    themselves share one resident pipeline and must not overlap (a coordinator that restarts may
    re-send a stage the worker is still running). A key kept between calls would outlive the person's
    deletion in this process.
    """

    @functools.wraps(stage)
    def run(self, job: PersonJob, *args, **kwargs):
        self._observe_epoch(job.epoch)
        with self._stage_lock:
            # Checked again inside the lock: a newer coordinator may have fenced while this call waited.
            if self.is_stale(job):
                raise StaleJob(f"job for {job.ref.prefix} comes from coordinator epoch {job.epoch}, but epoch "
                               f"{self._epoch} has taken over; the new coordinator re-sends what it needs")
            if self.lease is not None and self.lease.dead:
                raise NodeCutOff(f"this node was declared dead; {stage.__name__} of {job.ref.prefix} runs elsewhere")
            # The store's word, not only this process's: a deletion this worker was never told of
            # (it restarted, or the revoke missed it) still stops the stage before any cache is used.
            if barrier.is_deleted(self.store, job.ref):
                self.purge([job.ref.prefix])
                raise barrier.PersonDeleted(job.ref, f"{stage.__name__} stage")
            self.running = f"{stage.__name__} {job.ref.prefix}"
            try:
                return stage(self, job, *args, **kwargs)
            finally:
                self.running = None
                if self.key_store is not None:
                    self.key_store.forget(job.ref)
                shutil.rmtree(self._person_scratch(job.ref, create=False), ignore_errors=True)

    return run


class GpuWorker:
    """Fine-tunes and generates for one person at a time on one GPU (or the CPU in tests).

    Args:
        config: the system config (:class:`headshots.config.Config`).
        worker_id: a stable name for logs and metrics (e.g. ``gpu-0``).
        report_objects: called with each object written *as it is written* (checkpoints during a long
            fine-tune), so the person's state knows every version even if this worker dies later.
        lease: this node's lease on the cluster (:mod:`cluster.lease`); None: never cut off (tests).
    """

    def __init__(self, config, worker_id: str, *, report_objects: Reporter | None = None,
                 lease: HeadLease | None = None):
        import torch

        from pipeline import models

        self.config = config
        self.worker_id = worker_id
        self.store = ArtifactStore.from_config(config.store)
        # None when person artifacts are not encrypted. Deletion calls self.key_store.forget(person).
        self.key_store = key_store_for(config, self.store)
        self.report_objects = report_objects or (lambda job, objects: None)
        self.lease = lease
        torch.set_num_threads(config.workers.torch_threads)
        self.device, self.dtype = models.pick_device_and_dtype()
        self._base_model: str | None = None
        self._pipe = None
        self.pipeline_loads = 0
        self.busy_s = 0.0
        self._cache_dir = node_cache_dir(config)
        # Person files: this process's own folder first, then whatever no live worker holds is wiped
        # (a worker that died, a node that was down or cut off while a person was deleted).
        self._persons_dir = self._cache_dir / PERSONS_FOLDER
        self._scratch_dir, self._scratch_lock = claim_person_folder(self._persons_dir)
        self.start_wipe = {**wipe_unowned_person_files(self._persons_dir, keep=self._scratch_dir),
                           "persons_dir": str(self._persons_dir), "at": time.time()}
        if self.start_wipe["folders_removed"]:
            logger.warning("worker %s wiped %d person folders (%d files) no live worker held from %s at start",
                           worker_id, self.start_wipe["folders_removed"], self.start_wipe["files_removed"],
                           self._persons_dir)
        else:
            logger.info("worker %s found no person files left from before under %s", worker_id, self._persons_dir)
        # Person prefixes being deleted: any step or write for them is refused from now on. Bounded,
        # because ids are never reused (batch ids are unique), so old entries only cost memory.
        self._revoked: dict[str, float] = {}
        self._stage_lock = threading.Lock()
        # The newest coordinator epoch seen: stages of older epochs stop at their next step or write.
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self.pid = os.getpid()
        self.started_at = time.time()
        self.running: str | None = None  # "<stage> <person prefix>" while a stage runs

    # --- deletion ----------------------------------------------------------------------------------

    def is_revoked(self, person: keys.PersonRef) -> bool:
        return person.prefix in self._revoked or any(person.prefix.startswith(p) for p in self._revoked)

    def _person_scratch(self, person: keys.PersonRef, *, create: bool = True) -> Path:
        """This process's folder for a person's files (removed when the stage ends, by purge, and by
        the next worker's start-up wipe if this process dies first)."""
        folder = self._scratch_dir / person.prefix.strip("/")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- fencing -----------------------------------------------------------------------------------

    def _observe_epoch(self, epoch: int) -> None:
        with self._epoch_lock:
            self._epoch = max(self._epoch, epoch)

    def is_stale(self, job: PersonJob) -> bool:
        return job.epoch < self._epoch

    # --- cut off from the head -------------------------------------------------------------------

    def _must_stop(self, job: PersonJob) -> bool:
        """Asked before every training step and every write: true when the person is revoked or the job
        is stale. While this node's lease has lapsed (the head did not confirm it alive lately) it
        waits for the next confirmation first.

        Raises:
            NodeCutOff: the head declared this node dead (the stage runs elsewhere now).
        """
        def stop() -> bool:
            return self.is_revoked(job.ref) or self.is_stale(job)

        if stop():
            return True
        if self.lease is not None and not self.lease.valid():
            return not self.lease.wait_valid(give_up=stop)
        return False

    def _confirmed(self, job: PersonJob, stored: StoredObject, *, undo: bool = True) -> StoredObject:
        """After a write: ask the head again (a probe that starts now). Alive: nothing can have replaced
        this stage when the write landed. Dead: a replacement may have started first, so the version is
        removed (``undo``; for keys that are overwritten anyway: checkpoints, LoRA, cache) and the stage
        stops. Create-only keys (headshots) are kept: a replacement that lost the race adopts them."""
        if self.lease is None or self.lease.confirm() is not False:
            return stored
        if undo:
            try:
                self.store.remove_version(stored.artifact, stored.key, version_id=stored.version_id or "null")
            except StoreError as error:
                logger.warning("worker %s could not undo a write made after its node was declared dead (%s)",
                               self.worker_id, type(error).__name__)
        raise NodeCutOff(f"this node was declared dead while writing {stored.artifact} for {job.ref.prefix}"
                         f"{'; the version was removed' if undo else ''}")

    def fence(self, epoch: int, timeout_s: float = 120.0) -> dict:
        """A new coordinator (``epoch``) took over: stop every stage its predecessors started.

        Returns once no older stage runs any more (each stops at its next training step or write), so
        the new coordinator can re-send work without two runs of one stage ever writing at once.
        """
        self._observe_epoch(epoch)
        drained = self._stage_lock.acquire(timeout=timeout_s)
        if drained:
            self._stage_lock.release()
        return {"worker_id": self.worker_id, "epoch": self._epoch, "drained": drained, "pid": self.pid}

    def revoke(self, prefixes: list[str]) -> dict:
        """Refuse any further training step or write for persons under these prefixes (a person, batch
        or tenant prefix). Safe to call while a stage runs: it stops at its next step or write."""
        now = time.time()
        for prefix in prefixes:
            self._revoked[prefix] = now
        while len(self._revoked) > REVOKED_MAX:
            self._revoked.pop(next(iter(self._revoked)))
        return {"worker_id": self.worker_id, "revoked": len(prefixes), "at": now}

    def allow(self, prefixes: list[str]) -> dict:
        """Lift a revocation (a cancelled person being retried). Deleted persons are never allowed again:
        their ids are tombstoned and their key is gone, so nothing could be written for them anyway."""
        for prefix in prefixes:
            self._revoked.pop(prefix, None)
        return {"worker_id": self.worker_id, "allowed": len(prefixes)}

    def purge(self, prefixes: list[str]) -> dict:
        """Drop every local copy of these persons: cached data keys, files under the cache folder, and
        (by revoking) any stage still holding their crops or LoRA in memory. Returns the confirmation
        that goes into the deletion receipt."""
        self.revoke(prefixes)
        keys_forgotten = 0
        if self.key_store is not None:
            keys_forgotten = sum(self.key_store.forget(prefix) for prefix in prefixes)
        files_removed = 0
        # Every worker's folder on this node (and the bare layout), not only this process's own: a
        # worker that died left its folder here, and its successor may not have started yet.
        roots = [self._persons_dir] + sorted(self._persons_dir.glob(f"{OWNED_PREFIX}*")) \
            + sorted(self._persons_dir.glob(f"{STARTING_PREFIX}*"))
        folders = [root / prefix.strip("/") for root in roots for prefix in prefixes]
        for folder in folders:
            if folder.exists():
                files_removed += _count_files(folder)
                shutil.rmtree(folder, ignore_errors=True)
        remaining = sorted({prefix for prefix in prefixes for root in roots if (root / prefix.strip("/")).exists()})
        return {"worker_id": self.worker_id, "persons": list(prefixes), "purged": not remaining,
                "keys_forgotten": keys_forgotten, "local_files_removed": files_removed,
                "in_memory": "released: stages hold person data only within a call, and revoked calls stop",
                "at": time.time()}

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "device": self.device, "dtype": str(self.dtype),
                "training_steps": self.config.training.steps, "pid": self.pid, "started_at": self.started_at,
                "epoch": self._epoch, "base_model": self._base_model, "pipeline_loads": self.pipeline_loads,
                "busy_s": self.busy_s, "running": self.running, "start_wipe": self.start_wipe,
                **self._lease_figures(), **_gpu_figures(self.device)}

    def _lease_figures(self) -> dict:
        if self.lease is None:
            return {}
        return {"head_lease": {"valid": self.lease.valid(), "dead": self.lease.dead, "lapses": self.lease.lapses,
                               "lease_s": self.lease.lease_s}}

    # --- base model ------------------------------------------------------------------------------

    def _pipeline(self, base_model: str):
        """The resident pipeline for ``base_model``, loading it only when the model changes."""
        from pipeline import models

        if self._pipe is not None and self._base_model == base_model:
            return self._pipe
        self._pipe = None  # free the old model before loading the next
        source = self._materialize(base_model)
        self._pipe = models.load_base_pipeline(source, device=self.device, dtype=self.dtype)
        self._base_model = base_model
        self.pipeline_loads += 1
        return self._pipe

    def _materialize(self, base_model: str) -> str:
        """``s3://bucket/prefix/`` → a local folder, copied once per node; other sources unchanged.

        The node's copy lives in ``<node cache>/base-models/<bucket>/<prefix>/version-<digest>/``, where
        the digest is the sha256 of the prefix's listing (every key with its size and ETag). The store is
        listed on every load, so a model uploaded again under the same prefix (new ETags) gets a new
        digest and is copied again; an unchanged one is reused, across worker restarts, from the disk.
        A node wipe (the cache folder gone) simply copies again. Older versions stay on disk: a worker
        may still be loading one.

        One worker per node copies, the others wait for it and reuse its copy: the copy is made under an
        exclusive ``flock`` on ``<bucket>/<prefix>/.lock`` (the kernel releases it when a worker dies),
        into a ``.partial-*`` folder beside the final one, renamed into place only once every object and
        the completion record (``.copy.json``, the listing) are in it. A folder left by a killed copy is
        never used, and is removed by the next copier. A copy is used only while its record matches the
        store's listing and every file has its listed size.

        The copy rides out store outages like every other store call (``store.outage_tolerance_s``).
        Base models are kept outside ``persons/``, which holds person data and is wiped on its own.

        Raises:
            ValueError: ``base_model`` is not ``s3://<bucket>/<prefix>/``, names no objects, or kept
                changing while it was being copied.
        """
        if not base_model.startswith("s3://"):
            return base_model
        bucket, prefix = _split_s3_location(base_model)
        model_dir = self._cache_dir / BASE_MODEL_CACHE_FOLDER / bucket / prefix.strip("/")
        for attempt in range(1, BASE_MODEL_COPY_ATTEMPTS + 1):
            listing = self.store.list_prefix(bucket, prefix)
            if not listing:
                raise ValueError(f"base_model {base_model!r} names no objects; upload a diffusers folder there first")
            copy_dir = model_dir / f"version-{_listing_digest(listing)}"
            if _is_complete_copy(copy_dir, listing):
                return str(copy_dir)
            with _exclusive_lock(model_dir / ".lock", waiting_for=f"another worker copying {base_model}"):
                if _is_complete_copy(copy_dir, listing):  # copied by another worker while this one waited
                    return str(copy_dir)
                try:
                    _copy_into_place(self.store, bucket, prefix, listing, copy_dir)
                except ObjectChanged:
                    logger.info("base model %s changed while it was copied (attempt %d of %d); listing it again",
                                base_model, attempt, BASE_MODEL_COPY_ATTEMPTS)
                    continue
                return str(copy_dir)
        raise ValueError(f"base_model {base_model!r} changed on every one of {BASE_MODEL_COPY_ATTEMPTS} copies; "
                         "finish uploading the new version before starting a batch that uses it")

    def _train_config(self, pipe):
        from pipeline import finetune, models

        training = self.config.training.resolved(tiny_model=self._base_model == models.TINY_MODEL)
        return finetune.TrainConfig(
            steps=training.steps, rank=training.rank, learning_rate=training.learning_rate,
            resolution=training.resolution or models.native_resolution(pipe),
            checkpoint_every=training.checkpoint_every, seed=training.seed)

    # --- stages ------------------------------------------------------------------------------------

    @_forgets_person_key
    def train(self, job: PersonJob, *, should_stop: Callable[[], bool] | None = None) -> StageResult:
        """Fine-tune the person's LoRA, resuming from a stored checkpoint if there is one."""
        from pipeline import finetune

        started = time.perf_counter()
        pipe = self._pipeline(job.base_model)
        scope = PersonScope(self.store, job.ref, key_store=self.key_store, revoked=lambda: self._must_stop(job))
        result = StageResult()
        train_config = self._train_config(pipe)
        prompt = finetune.instance_prompt(train_config)

        cache_key = keys.training_cache_key(job.ref)
        if scope.exists("derived", cache_key):
            cache = finetune.TrainingCache.from_bytes(scope.get("derived", cache_key))
        else:
            crops = load_crops(scope)
            if not crops:
                raise ValueError("no training crops found for this person; the ingest stage must run first")
            cache = finetune.prepare_training_cache(pipe, crops, prompt, train_config.resolution)
            stored = self._confirmed(job, scope.put("derived", cache_key, cache.to_bytes()))
            result.objects.append(stored)
            self.report_objects(job, [stored])

        checkpoint_key = keys.checkpoint_key(job.ref)
        resume = None
        if scope.exists("models", checkpoint_key):
            resume = finetune.TrainCheckpoint.from_bytes(scope.get("models", checkpoint_key))
            logger.info("worker %s resumes %s at step %d", self.worker_id, job.ref.prefix, resume.step)

        def save_checkpoint(checkpoint) -> None:
            stored_checkpoint = self._confirmed(job, scope.put("models", checkpoint_key, checkpoint.to_bytes()))
            result.objects.append(stored_checkpoint)
            self.report_objects(job, [stored_checkpoint])

        trained = finetune.train_lora(pipe, cache, train_config, resume=resume, on_checkpoint=save_checkpoint,
                                      should_stop=lambda: self._must_stop(job)
                                      or (should_stop is not None and should_stop()),
                                      scratch_dir=self._person_scratch(job.ref))
        stored_lora = self._confirmed(job, scope.put("models", keys.lora_key(job.ref), trained.lora_bytes))
        result.objects.append(stored_lora)
        self.report_objects(job, [stored_lora])
        result.training_steps = trained.steps - trained.resumed_from
        result.seconds = time.perf_counter() - started
        result.details = {"steps": trained.steps, "resumed_from": trained.resumed_from,
                          "final_loss": trained.final_loss, "worker": self.worker_id}
        self.busy_s += result.seconds
        return result

    @_forgets_person_key
    def generate(self, job: PersonJob) -> StageResult:
        """Generate the person's headshots, checked against their own face; delivered images are stored.

        With a real base model every candidate is scored (face found, identity distance to the person's
        accepted photos, sharpness); candidates that fail are replaced by new seeds until enough pass or
        ``ingest.regeneration_budget`` × the requested count is spent, and the best by identity are
        delivered. The built-in ``tiny`` model makes noise, so its images are delivered with the check
        recorded as ``not_applicable``. Slots already stored by an interrupted attempt are kept.
        """
        from pipeline import faces, finetune, generate, models

        started = time.perf_counter()
        pipe = self._pipeline(job.base_model)
        scope = PersonScope(self.store, job.ref, key_store=self.key_store, revoked=lambda: self._must_stop(job))
        presets = generate.load_style_presets(self.config.generation.styles_file or None)
        styles = generate.resolve_styles(list(job.styles), presets)
        tiny = job.base_model == models.TINY_MODEL
        checks_setting = self.config.generation.output_checks
        checked = checks_setting == "on" or (checks_setting == "auto" and not tiny)
        if tiny:
            # The built-in test model only works at its native size and needs only a few steps: it
            # makes noise either way, so spend as little CPU as possible on it.
            size_override, steps_override = models.native_resolution(pipe), self.config.generation.steps_override or 4
        else:
            size_override = self.config.generation.size_override or None
            steps_override = self.config.generation.steps_override
        if steps_override:
            styles = [_with_steps(style, steps_override) for style in styles]
        extension = ".png" if self.config.generation.image_format == "PNG" else ".jpg"
        subject = finetune.instance_subject(self._train_config(pipe))
        references = self._reference_embeddings(scope, job) if checked else None
        face_models = faces.load_face_models() if references else None
        gate = gate_config(self.config)

        def judge(image) -> dict:
            if not checked:
                return faces.not_applicable()
            if not references:
                return {**faces.not_applicable(), "reason": "no accepted photo embeddings to compare with"}
            return faces.score_output(image, face_models, references, gate)

        stored_slots = _stored_slots(scope.list("outputs", "headshots/"))
        result = StageResult()
        # Slots an interrupted run stored (possibly one that could not report them: a node cut off)
        # are recorded with this run's objects, so the person's state lists every version delivered.
        result.objects.extend(self._adopt(scope, [key for _, key in stored_slots.values()]))
        lora_bytes = scope.get("models", keys.lora_key(job.ref))
        records, distances, flags = [], [], []
        regenerated = 0
        extra_by_style = dict(job.extra_by_style)
        batch_size = self.config.generation.batch_size

        def run_round(round_styles, count: int, skip: set, candidates_by_style: dict) -> None:
            for image in generate.generate_headshots(
                    pipe, lora_bytes, subject=subject, styles=round_styles, images_per_style=count,
                    person_id=job.person_id, batch_size=batch_size, skip=skip, size_override=size_override):
                quality = judge(image.image)
                if quality.get("identity_distance") is not None:
                    distances.append(quality["identity_distance"])
                candidates_by_style[image.style].append((quality, image))

        # What each style lacks, and its first round: exactly the missing images (checked: the first
        # indices whose seeds are not stored yet; unchecked: one image per missing slot, with the
        # slot's own seed, so a retry reproduces it exactly).
        plans, first_round = {}, {}
        for style in styles:
            wanted = job.images_per_style + extra_by_style.get(style.name, 0)
            done = {slot: (seed, key) for (name, slot), (seed, key) in stored_slots.items() if name == style.name}
            missing_slots = [slot for slot in range(wanted) if slot not in done]
            used_seeds = {seed for seed, _ in done.values()}
            budget = max(len(missing_slots), math.ceil(self.config.ingest.regeneration_budget * wanted)) \
                if checked else len(missing_slots)
            plans[style.name] = (wanted, done, missing_slots, used_seeds, budget)
            if not missing_slots:
                continue
            if checked:
                upto = min(budget, len(missing_slots))
                first_round[style.name] = (upto, {i for i in range(upto)
                                                  if generate.seed_for(job.person_id, style.name, i) in used_seeds})
            else:
                first_round[style.name] = (wanted, {i for i in range(wanted) if i not in missing_slots})
        candidates_by_style = {style.name: [] for style in styles}
        if first_round:
            # One call for every style's first round: images of different styles share batches.
            count = max(upto for upto, _ in first_round.values())
            skip = {(name, i) for name, (upto, skipped) in first_round.items()
                    for i in range(count) if i >= upto or i in skipped}
            run_round([style for style in styles if style.name in first_round], count, skip, candidates_by_style)

        for style in styles:
            wanted, done, missing_slots, used_seeds, budget = plans[style.name]
            for slot, (seed, key) in sorted(done.items()):  # kept from an interrupted attempt
                quality = judge(_open_image(scope.get("outputs", key))) if checked else faces.not_applicable()
                records.append(_record(style, slot, seed, key, subject, 0.0, quality))
            if not missing_slots:
                continue
            candidates = candidates_by_style[style.name]
            if checked:
                next_index = first_round[style.name][0]
                while next_index < budget and _passing(candidates) < len(missing_slots):
                    shortfall = len(missing_slots) - _passing(candidates)
                    # Later rounds: twice the shortfall (most candidates pass with a good LoRA, so a
                    # small top-up usually suffices).
                    upto = min(budget, next_index + 2 * shortfall)
                    run_round([style], upto, {(style.name, i) for i in range(upto) if i < next_index
                                              or generate.seed_for(job.person_id, style.name, i) in used_seeds},
                              candidates_by_style)
                    next_index = upto
            # Best first: passing images, then by identity distance (the closest look most like them).
            candidates.sort(key=lambda c: (c[0]["status"] == "fail", c[0].get("identity_distance") or 0.0))
            delivered = candidates[:len(missing_slots)]
            regenerated += max(0, len(candidates) - len(missing_slots))
            slots = missing_slots if checked else [image.index for _, image in delivered]
            for slot, (quality, image) in zip(slots, delivered):
                key = keys.headshot_key(job.ref, style.name, slot, image.seed, extension)
                try:
                    # Create-only: a run that raced this one (a cut-off node's) cannot add a second version.
                    stored = scope.put("outputs", key, package.encode_headshot(
                        image.image, fmt=self.config.generation.image_format),
                        content_type="image/png" if extension == ".png" else "image/jpeg", if_absent=True)
                    stored = self._confirmed(job, stored, undo=False)
                except ObjectExists:
                    stored = next(iter(self._adopt(scope, [key])), None)
                    if stored is None:
                        raise
                result.objects.append(stored)
                self.report_objects(job, [stored])
                result.images_by_style[style.name] = result.images_by_style.get(style.name, 0) + 1
                records.append(_record(style, slot, image.seed, key, subject, image.seconds, quality))
            passed = _passing(delivered)
            if checked and references and passed < len(missing_slots):
                flags.append(f"identity: {passed} of {len(missing_slots)} {style.name} headshots passed the "
                             f"identity check within {budget} candidates; the rest are the closest found")
        result.details = {"headshots": records, "worker": self.worker_id, "identity_distances": distances,
                          "regenerated": regenerated, "identity_flag": "; ".join(flags) or None}
        result.seconds = time.perf_counter() - started
        self.busy_s += result.seconds
        return result

    def _adopt(self, scope: PersonScope, output_keys: list[str]) -> list[StoredObject]:
        """Records of headshots already stored under these keys (their one version each)."""
        import hashlib

        adopted = []
        for key in output_keys:
            versions = [version for k, version, marker in self.store.list_versions("outputs", key)
                        if k == key and not marker]
            if len(versions) != 1:
                continue  # none (removed meanwhile) or several (left to the audit): nothing to adopt
            data = scope.get("outputs", key)
            adopted.append(StoredObject(artifact="outputs", bucket=self.store.bucket("outputs"), key=key,
                                        version_id=versions[0], size=len(data),
                                        sha256=hashlib.sha256(data).hexdigest(), written_at=utc_now_iso()))
        return adopted

    def _reference_embeddings(self, scope: PersonScope, job: PersonJob) -> list[list[float]] | None:
        key = keys.identity_reference_key(job.ref)
        if not scope.exists("derived", key):
            return None
        return json.loads(scope.get("derived", key))["embeddings"]


def _gpu_figures(device: str) -> dict:
    """GPU memory and utilisation for this worker's device (CUDA only; empty on the CPU)."""
    if not str(device).startswith("cuda"):
        return {}
    import torch

    # The device's own figures (every process on it), not just this process's allocator.
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    figures = {"gpu_memory_used_bytes": total_bytes - free_bytes, "gpu_memory_total_bytes": total_bytes}
    try:
        figures["gpu_utilization_ratio"] = torch.cuda.utilization() / 100.0  # needs NVML (pynvml)
    except Exception:  # no NVML on this node: memory figures only
        pass
    return figures


def _passing(candidates) -> int:
    return sum(1 for quality, _ in candidates if quality["status"] == "pass")


def _record(style, slot: int, seed: int, key: str, subject: str, seconds: float, quality: dict) -> dict:
    return {"style": style.name, "index": slot, "seed": seed, "key": key, "prompt": style.render_prompt(subject),
            "negative_prompt": style.negative_prompt, "seconds": seconds, "quality": quality}


def _stored_slots(output_keys: list[str]) -> dict[tuple[str, int], tuple[int, str]]:
    """(style, slot) → (seed, key) of headshots already stored: ``.../headshots/<style>/<slot>-<seed>.<ext>``."""
    slots = {}
    for key in output_keys:
        style, filename = key.rsplit("/", 2)[-2:]
        stem = filename.rsplit(".", 1)[0]
        slot, _, seed = stem.partition("-")
        if slot.isdigit() and seed.isdigit():
            slots[(style, int(slot))] = (int(seed), key)
    return slots


def _open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _with_steps(style, steps: int):
    import dataclasses

    return dataclasses.replace(style, steps=steps)
