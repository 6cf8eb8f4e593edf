"""The GPU worker's stages, in process (no Ray), against the real S3 server: resume and idempotence."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from cluster.jobs import PersonJob
from cluster.stages import run_ingest
from cluster.worker import GpuWorker
from headshots.client import upload_person
from headshots.manifest import PersonSpec
from pipeline import finetune, models
from storage import keys
from storage.crypto import key_store_for
from tests.integration.conftest import TEST_CONSENT, read_version

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


@pytest.fixture(scope="module")
def worker(base_config):
    return GpuWorker(base_config, "test-worker")


def _ingested_person(store, config, tenant: str, person_id: str) -> PersonJob:
    photos = sorted((EXAMPLES / "grace-hopper").iterdir())[:4]
    person = upload_person(store, config, tenant=tenant, batch_id="b1",
                           spec=PersonSpec(person_id, "Someone", None, photos), consent=TEST_CONSENT)
    job = PersonJob(tenant=tenant, batch_id="b1", person_id=person_id, base_model=models.TINY_MODEL,
                    styles=("corporate-grey", "office"), images_per_style=2,
                    upload_keys=tuple(p.key for p in person.photos if p.accepted))
    run_ingest(store, job, training_resolution=0, key_store=key_store_for(config, store))
    return job


def test_interrupted_fine_tune_resumes_from_the_stored_checkpoint(worker, store, key_store, base_config, tenant):
    # base_config trains 6 steps with a checkpoint every 3.
    uninterrupted = _ingested_person(store, base_config, tenant, "straight")
    interrupted = _ingested_person(store, base_config, tenant, "crashed")
    reference = worker.train(uninterrupted)
    assert reference.details["resumed_from"] == 0

    calls = {"n": 0}

    def crash_after_four_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(finetune.TrainingStopped):
        worker.train(interrupted, should_stop=crash_after_four_steps)
    assert not list(store.list_keys("models", keys.lora_key(interrupted.ref)))
    resumed = worker.train(interrupted)
    assert resumed.details["resumed_from"] == 3 and resumed.training_steps == 3

    expected = load_safetensors(read_version(store, key_store, "models", keys.lora_key(uninterrupted.ref)))
    actual = load_safetensors(read_version(store, key_store, "models", keys.lora_key(interrupted.ref)))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] - actual[name]).abs().max().item() < 1e-5, name


def test_generation_after_a_crash_makes_only_the_missing_images(worker, store, base_config, tenant):
    job = _ingested_person(store, base_config, tenant, "gen")
    worker.train(job)
    first = worker.generate(job)
    records = {(r["style"], r["index"]): r for r in first.details["headshots"]}
    assert len(records) == 4 and len(first.objects) == 4
    lost = records[("office", 1)]
    original_bytes = store.get("outputs", lost["key"])
    # Simulate a worker that died before writing this image: remove every version of it.
    for key, version_id, _ in store.list_versions("outputs", lost["key"]):
        store.client.remove_object(store.bucket("outputs"), key, version_id=version_id)
    again = worker.generate(job)
    # Only the lost image is made again; the three kept ones are recorded as the versions stored before.
    earlier = {(o.key, o.version_id) for o in first.objects}
    assert [o.key for o in again.objects if (o.key, o.version_id) not in earlier] == [lost["key"]]
    assert len(again.objects) == 4
    assert len(again.details["headshots"]) == 4
    import numpy as np
    from PIL import Image

    before = np.asarray(Image.open(io.BytesIO(original_bytes)).convert("RGB"), dtype=np.int16)
    after = np.asarray(Image.open(io.BytesIO(store.get("outputs", lost["key"]))).convert("RGB"), dtype=np.int16)
    # Same seed, same image — up to float summation order: the first run sampled it in a batch of
    # two, the retry alone, which on CPU can move a pixel by one level.
    difference = np.abs(before - after)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_base_model_from_the_store_is_copied_once_and_stays_resident(base_config, store, tmp_path):
    bucket = store.bucket("models")  # any bucket the worker's credentials can read
    folder = models.save_tiny_model(tmp_path / "tiny-model")
    prefix = f"_system/base-models/{tmp_path.name}/"
    for path in folder.rglob("*"):
        if path.is_file():
            store.client.fput_object(bucket, prefix + str(path.relative_to(folder)), str(path))
    worker = GpuWorker(base_config.replace(workers=base_config.workers.__class__(cache_dir=str(tmp_path / "cache"))),
                       "s3-model-worker")
    source = f"s3://{bucket}/{prefix}"
    pipe = worker._pipeline(source)
    assert models.native_resolution(pipe) == 64
    copies = list((tmp_path / "cache" / "base-models" / bucket / prefix.strip("/")).glob("version-*/.copy.json"))
    assert len(copies) == 1
    assert worker._pipeline(source) is pipe and worker.pipeline_loads == 1
    with pytest.raises(ValueError, match="names no objects"):
        worker._pipeline(f"s3://{bucket}/_system/base-models/missing/")


def test_output_checks_regenerate_up_to_the_budget_and_flag_the_person(store, base_config, tenant):
    """Forced on for the tiny model: its noise never shows a face, so every candidate fails, the worker
    spends the whole budget (3 × requested), delivers the requested count, and flags the person."""
    config = base_config.replace(generation=base_config.generation.__class__(batch_size=2, output_checks="on"))
    worker = GpuWorker(config, "checked-worker")
    job = _ingested_person(store, config, tenant, "checked")
    worker.train(job)
    result = worker.generate(job)
    records = result.details["headshots"]
    assert len(records) == 4 and len(result.objects) == 4  # only delivered images are stored
    assert all(r["quality"]["status"] == "fail" and r["quality"]["reason"] == "no_face" for r in records)
    # 2 styles × 2 images, budget 3× per style: 6 candidates per style, 4 of them extra.
    assert result.details["regenerated"] == 8
    assert "identity: 0 of 2" in result.details["identity_flag"]


def test_the_tiny_model_records_output_checks_as_not_applicable(worker, store, base_config, tenant):
    job = _ingested_person(store, base_config, tenant, "tiny")
    worker.train(job)
    result = worker.generate(job)
    assert {r["quality"]["status"] for r in result.details["headshots"]} == {"not_applicable"}
    assert result.details["regenerated"] == 0 and result.details["identity_flag"] is None


def test_ingest_keeps_reference_embeddings_as_encrypted_derived_data(worker, store, key_store, base_config, tenant):
    job = _ingested_person(store, base_config, tenant, "refs")
    key = keys.identity_reference_key(job.ref)
    assert key in set(store.list_keys("derived", job.ref.prefix))
    import json

    embeddings = json.loads(read_version(store, key_store, "derived", key))["embeddings"]
    assert len(embeddings) == 4 and all(len(e) == 128 for e in embeddings)


def test_a_fence_stops_a_stale_fine_tune_and_refuses_older_jobs(base_config, store, tenant):
    """A new coordinator epoch: the stage its predecessor started stops at its next step, and returns
    before the new coordinator re-sends anything; jobs of the old epoch are refused from then on."""
    import dataclasses
    import threading

    from cluster.worker import StaleJob

    worker = GpuWorker(base_config, "fence-worker")
    job = dataclasses.replace(_ingested_person(store, base_config, tenant, "fenced"), epoch=1)
    step_reached = threading.Event()
    release = threading.Event()

    def pause_at_second_step() -> bool:
        # Called before every step: hold the stage here until the fence has been raised.
        if not step_reached.is_set():
            step_reached.set()
            release.wait(timeout=30)
        return False

    outcome = {}

    def run_stale_stage():
        try:
            outcome["result"] = worker.train(job, should_stop=pause_at_second_step)
        except BaseException as error:  # noqa: BLE001 - the test inspects what the stage raised
            outcome["error"] = error

    stage = threading.Thread(target=run_stale_stage)
    stage.start()
    assert step_reached.wait(timeout=60)
    fence_result = {}
    fencer = threading.Thread(target=lambda: fence_result.update(worker.fence(2)))
    fencer.start()
    release.set()
    fencer.join(timeout=60)
    stage.join(timeout=60)
    assert fence_result["drained"] is True and fence_result["epoch"] == 2
    assert isinstance(outcome.get("error"), finetune.TrainingStopped), outcome
    assert not list(store.list_keys("models", keys.lora_key(job.ref)))  # the stale stage wrote no LoRA
    with pytest.raises(StaleJob, match="epoch 1"):
        worker.train(job)
    # The new epoch's job resumes from the stale stage's last checkpoint (or the start) and completes.
    finished = worker.train(dataclasses.replace(job, epoch=2))
    assert finished.details["steps"] == base_config.training.steps


def test_more_images_generate_only_the_new_slots(worker, store, base_config, tenant):
    import dataclasses

    job = _ingested_person(store, base_config, tenant, "more")
    worker.train(job)
    first = worker.generate(job)
    before = {o.key: o.version_id for o in first.objects}
    more = worker.generate(dataclasses.replace(job, extra_by_style=(("office", 3),)))
    added = {(r["style"], r["index"]) for r in more.details["headshots"]} - {
        (r["style"], r["index"]) for r in first.details["headshots"]}
    assert added == {("office", 2), ("office", 3), ("office", 4)}
    # Nothing already stored was written again: the kept images come back as the versions stored before.
    assert len([o for o in more.objects if before.get(o.key) != o.version_id]) == 3
    for key, version_id in before.items():
        assert [v for _, v, _ in store.list_versions("outputs", key)] == [version_id]
