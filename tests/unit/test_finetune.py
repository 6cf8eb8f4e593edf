"""LoRA fine-tuning on the tiny pipeline: config validation, cache, training, checkpoint and resume."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from pipeline.finetune import (
    TrainCheckpoint,
    TrainConfig,
    TrainingCache,
    TrainingStopped,
    instance_prompt,
    instance_subject,
    prepare_training_cache,
    train_lora,
)
from pipeline.models import build_tiny_pipeline, build_tiny_sdxl_pipeline

RESOLUTION = 64


def _photos(count: int = 3, side: int = 80) -> list[Image.Image]:
    rng = np.random.default_rng(42)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _config(**overrides) -> TrainConfig:
    values = dict(steps=20, rank=4, learning_rate=1e-3, resolution=RESOLUTION, checkpoint_every=5)
    values.update(overrides)
    return TrainConfig(**values)


def _unet_snapshot(pipe) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}


def _assert_pristine(pipe, snapshot) -> None:
    """The resident pipe must be the base model again: same weights, no LoRA layers left."""
    state = pipe.unet.state_dict()
    assert state.keys() == snapshot.keys(), "LoRA parameters were left in the UNet"
    assert all(torch.equal(state[name], snapshot[name]) for name in snapshot), "base UNet weights changed"
    assert not getattr(pipe.unet, "peft_config", None)
    assert not any(isinstance(module, BaseTunerLayer) for module in pipe.unet.modules())


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def cache(pipe):
    return prepare_training_cache(pipe, _photos(), instance_prompt(_config()), RESOLUTION)


@pytest.fixture(scope="module")
def full_run(pipe, cache):
    """An uninterrupted 20-step run, with everything its callbacks saw."""
    snapshot = _unet_snapshot(pipe)
    checkpoints, steps = [], []
    result = train_lora(
        pipe, cache, _config(), on_checkpoint=checkpoints.append, on_step=lambda step, loss: steps.append(step)
    )
    return dict(result=result, checkpoints=checkpoints, steps=steps, snapshot=snapshot)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rank=0), "`rank` must be between 1 and 256 but is 0"),
        (dict(rank=512), "`rank` must be between 1 and 256 but is 512"),
        (dict(steps=0), "`steps` must be between 1 and 100000 but is 0"),
        (dict(steps=True), "`steps` must be an integer"),
        (dict(resolution=500), "`resolution` must be divisible by 8 but is 500"),
        (dict(resolution=32), "`resolution` must be between 64 and 2048 but is 32"),
        (dict(learning_rate=0.0), "`learning_rate` must be in (0, 1]"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be a number"),
        (dict(checkpoint_every=0), "`checkpoint_every` must be between 1 and 100000"),
        (dict(batch_size=0), "`batch_size` must be between 1 and 64"),
        (dict(seed=-1), "`seed` must be between 0 and 2147483647"),
        (dict(instance_token="oh wx"), "`instance_token` must be a single word"),
        (dict(class_noun=""), "`class_noun` must be a non-empty string"),
        (dict(max_grad_norm=0), "`max_grad_norm` must be in (0, 1000]"),
    ],
)
def test_invalid_config_names_field_and_range(overrides, message):
    with pytest.raises(ValueError) as excinfo:
        TrainConfig(**overrides)
    assert message in str(excinfo.value)


def test_defaults_and_instance_prompt():
    config = TrainConfig()
    assert (config.steps, config.rank, config.resolution, config.learning_rate) == (400, 16, 512, 1e-4)
    assert instance_prompt(config) == "a photo of ohwx person"
    assert instance_subject(TrainConfig(instance_token="sks", class_noun="woman")) == "sks woman"


# --- training cache ---------------------------------------------------------------------------


def test_cache_holds_one_latent_per_photo_and_one_prompt(cache):
    assert cache.latents.shape == (3, 4, RESOLUTION // 2, RESOLUTION // 2)
    assert cache.latents.dtype == torch.float32 and cache.latents.device.type == "cpu"
    assert cache.prompt_embeds.shape == (1, 77, 32)
    assert not cache.is_sdxl


def test_cache_is_deterministic_and_round_trips_through_bytes(pipe, cache):
    again = prepare_training_cache(pipe, _photos(), instance_prompt(_config()), RESOLUTION)
    assert torch.equal(again.latents, cache.latents)

    restored = TrainingCache.from_bytes(cache.to_bytes())
    assert torch.equal(restored.latents, cache.latents)
    assert torch.equal(restored.prompt_embeds, cache.prompt_embeds)
    assert restored.pooled_prompt_embeds is None and restored.add_time_ids is None


def test_cache_with_flips_doubles_the_photos(pipe):
    flipped = prepare_training_cache(pipe, _photos(2), "a photo of ohwx person", RESOLUTION, hflip=True)
    assert flipped.latents.shape[0] == 4


def test_cache_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="`images` must hold at least one photo"):
        prepare_training_cache(pipe, [], "a photo of ohwx person", RESOLUTION)
    with pytest.raises(ValueError, match=r"images\[0\] must be square but is 80x60"):
        prepare_training_cache(pipe, [Image.new("RGB", (80, 60))], "a photo of ohwx person", RESOLUTION)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        TrainingCache.from_bytes(b"not a cache")


# --- training ---------------------------------------------------------------------------------


def test_training_reports_steps_checkpoints_and_a_standard_lora_file(full_run):
    result = full_run["result"]
    assert full_run["steps"] == list(range(1, 21))
    assert [checkpoint.step for checkpoint in full_run["checkpoints"]] == [5, 10, 15, 20]
    assert result.steps == 20 and result.resumed_from == 0
    assert math.isfinite(result.final_loss) and result.seconds > 0

    state = safetensors.torch.load(result.lora_bytes)
    assert state and all(key.startswith("unet.") for key in state)
    assert any(key.endswith("to_q.lora_A.weight") for key in state)
    assert any(key.endswith("to_out.0.lora_B.weight") for key in state)
    # lora_B starts at zero; after training it must not be, or the LoRA would do nothing.
    assert any(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)


def test_training_leaves_the_base_unet_exactly_unchanged(pipe, full_run):
    _assert_pristine(pipe, full_run["snapshot"])


def test_adapter_is_removed_when_a_callback_fails(pipe, cache):
    snapshot = _unet_snapshot(pipe)

    def failing_on_step(step, loss):
        if step == 2:
            raise RuntimeError("storage unavailable")

    with pytest.raises(RuntimeError, match="storage unavailable"):
        train_lora(pipe, cache, _config(steps=5), on_step=failing_on_step)
    _assert_pristine(pipe, snapshot)


def test_interrupted_then_resumed_run_matches_the_uninterrupted_one(pipe, cache, full_run):
    checkpoints, done = [], []

    def on_step(step, loss):
        done.append(step)

    with pytest.raises(TrainingStopped) as excinfo:
        train_lora(
            pipe,
            cache,
            _config(),
            on_checkpoint=checkpoints.append,
            on_step=on_step,
            should_stop=lambda: len(done) >= 10,
        )
    assert excinfo.value.step == 10
    assert [checkpoint.step for checkpoint in checkpoints] == [5, 10]
    _assert_pristine(pipe, full_run["snapshot"])

    # Through bytes, as a worker on another machine would get it.
    stored = TrainCheckpoint.from_bytes(checkpoints[-1].to_bytes())
    resumed = train_lora(pipe, cache, _config(), resume=stored)

    assert resumed.resumed_from == 10 and resumed.steps == 20
    expected = safetensors.torch.load(full_run["result"].lora_bytes)
    actual = safetensors.torch.load(resumed.lora_bytes)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed.final_loss == pytest.approx(full_run["result"].final_loss, rel=1e-4)
    _assert_pristine(pipe, full_run["snapshot"])


def test_stop_exception_carries_a_resumable_checkpoint(pipe, cache, full_run):
    with pytest.raises(TrainingStopped) as excinfo:
        train_lora(pipe, cache, _config(steps=20), should_stop=lambda: True)
    assert excinfo.value.step == 0 and excinfo.value.checkpoint.step == 0
    _assert_pristine(pipe, full_run["snapshot"])

    # Workers report it to another process: it must survive pickling with its attributes.
    copy = pickle.loads(pickle.dumps(excinfo.value))
    assert (copy.step, copy.total_steps, copy.checkpoint.step) == (0, 20, 0)
    assert str(copy) == "training stopped on request after 0 of 20 steps"


def test_resume_with_a_different_config_is_refused(pipe, cache, full_run):
    checkpoint = full_run["checkpoints"][0]
    with pytest.raises(ValueError, match="resume with the same TrainConfig"):
        train_lora(pipe, cache, _config(learning_rate=2e-3), resume=checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint step 5 is outside 0\.\.4"):
        train_lora(pipe, cache, _config(steps=4), resume=checkpoint)
    _assert_pristine(pipe, full_run["snapshot"])


def test_resume_from_the_final_checkpoint_only_writes_the_lora(pipe, cache, full_run):
    # A worker that died after the last checkpoint but before storing the LoRA file.
    final = TrainCheckpoint.from_bytes(full_run["checkpoints"][-1].to_bytes())
    result = train_lora(pipe, cache, _config(), resume=final)
    assert (result.steps, result.resumed_from) == (20, 20)
    assert result.final_loss == full_run["result"].final_loss
    expected = safetensors.torch.load(full_run["result"].lora_bytes)
    actual = safetensors.torch.load(result.lora_bytes)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    _assert_pristine(pipe, full_run["snapshot"])


def test_checkpoint_bytes_are_validated():
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        TrainCheckpoint.from_bytes(b"garbage")


def test_cache_at_another_resolution_is_refused(pipe, cache):
    with pytest.raises(ValueError, match="prepare the cache at the config's resolution"):
        train_lora(pipe, cache, _config(resolution=128, steps=1))


def test_training_refuses_a_pipe_with_a_lora_loaded(pipe, cache, full_run):
    pipe.load_lora_weights(safetensors.torch.load(full_run["result"].lora_bytes), adapter_name="someone")
    try:
        with pytest.raises(RuntimeError, match="already has LoRA adapters"):
            train_lora(pipe, cache, _config(steps=1))
    finally:
        pipe.unload_lora_weights()
    _assert_pristine(pipe, full_run["snapshot"])


def test_sdxl_training_produces_a_lora_the_sdxl_pipe_loads():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    snapshot = _unet_snapshot(pipe)
    config = _config(steps=3, learning_rate=1e-2)
    cache = TrainingCache.from_bytes(
        prepare_training_cache(pipe, _photos(2), instance_prompt(config), RESOLUTION).to_bytes()
    )
    assert cache.is_sdxl and cache.add_time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]

    result = train_lora(pipe, cache, config)

    _assert_pristine(pipe, snapshot)
    pipe.load_lora_weights(safetensors.torch.load(result.lora_bytes), adapter_name="subject")
    assert "subject" in pipe.unet.peft_config
    pipe.unload_lora_weights()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_training_keeps_base_weights():
    from pipeline.models import TINY_MODEL, load_base_pipeline, pick_device_and_dtype

    device, dtype = pick_device_and_dtype()
    pipe = load_base_pipeline(TINY_MODEL, device=device, dtype=dtype)
    snapshot = _unet_snapshot(pipe)
    cache = prepare_training_cache(pipe, _photos(), "a photo of ohwx person", RESOLUTION)
    result = train_lora(pipe, cache, _config(steps=10, learning_rate=1e-2))
    assert math.isfinite(result.final_loss)
    _assert_pristine(pipe, snapshot)
