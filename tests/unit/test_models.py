"""Base-model building and loading: the tiny pipeline, local diffusers folders, device choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from pipeline.models import (
    TINY_MODEL,
    BaseModelError,
    build_tiny_pipeline,
    is_sdxl,
    load_base_pipeline,
    native_resolution,
    pick_device_and_dtype,
    save_tiny_model,
)


def _images(pipe, seeds, *, steps=4):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    out = pipe(
        prompt=["a photo of ohwx person"] * len(seeds),
        negative_prompt=["blurry"] * len(seeds),
        generator=generators,
        num_inference_steps=steps,
        height=native_resolution(pipe),
        width=native_resolution(pipe),
    ).images
    return [np.asarray(image) for image in out]


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(seed=0)


def test_tiny_pipeline_generates_native_size_rgb_images(tiny_pipe):
    assert native_resolution(tiny_pipe) == 64
    images = _images(tiny_pipe, [0, 1])
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert images[0].std() > 0, "a constant image means the pipeline produced nothing"
    assert not np.array_equal(images[0], images[1]), "different seeds must give different images"


def test_tiny_pipeline_is_configured_for_headless_use(tiny_pipe):
    assert tiny_pipe.safety_checker is None
    assert tiny_pipe.config.requires_safety_checker is False
    assert tiny_pipe.tokenizer.model_max_length == 77


def test_tiny_pipeline_weights_depend_only_on_seed():
    first, again, other = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        a, b, c = (getattr(p, name).state_dict() for p in (first, again, other))
        assert all(torch.equal(a[key], b[key]) for key in a), f"{name} differs for the same seed"
    unet_a, unet_c = first.unet.state_dict(), other.unet.state_dict()
    assert not all(torch.equal(unet_a[key], unet_c[key]) for key in unet_a)


def test_building_the_tiny_pipeline_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_tokenizes_any_text(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    text = "Corporate HEADSHOT of ohwx person, 85mm f/1.8 — naïve émoji 🙂 " * 20
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert max(ids) < tiny_pipe.text_encoder.config.vocab_size
    assert ids[0] == tokenizer.bos_token_id
    # Ordinary words must map to real character tokens, not to the unknown token.
    word_ids = tokenizer("ohwx").input_ids[1:-1]
    assert len(word_ids) == 4 and tokenizer.unk_token_id not in word_ids


def test_saved_tiny_model_loads_with_identical_weights_and_images(tmp_path, tiny_pipe):
    folder = save_tiny_model(tmp_path / "tiny-model")
    assert (folder / "model_index.json").is_file()

    loaded = load_base_pipeline(str(folder), device="cpu", dtype=torch.float32)

    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.safety_checker is None
    assert loaded._progress_bar_config.get("disable") is True
    built, reloaded = tiny_pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(built[key], reloaded[key]) for key in built)
    assert all(np.array_equal(a, b) for a, b in zip(_images(tiny_pipe, [3]), _images(loaded, [3])))


def test_sdxl_folder_is_detected_from_model_index(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny-xl", sdxl=True)
    pipe = load_base_pipeline(str(folder), device="cpu", dtype=torch.float32)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert is_sdxl(pipe)
    assert native_resolution(pipe) == 64
    assert _images(pipe, [0])[0].shape == (64, 64, 3)


def test_tiny_source_loads_on_cpu_with_torch_sdpa_attention():
    pipe = load_base_pipeline(TINY_MODEL, device="cpu", dtype=torch.float32)
    assert pipe.unet.device.type == "cpu" and pipe.unet.dtype == torch.float32
    # xformers must never be used on CPU; SDPA is diffusers' default processor.
    assert all(isinstance(proc, AttnProcessor2_0) for proc in pipe.unet.attn_processors.values())


def test_missing_folder_error_names_the_path_and_what_is_expected(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BaseModelError) as excinfo:
        load_base_pipeline(str(missing), device="cpu", dtype=torch.float32)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "model_index.json" in message and "'tiny'" in message
    assert isinstance(excinfo.value, ValueError)


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(BaseModelError, match="has no model_index.json"):
        load_base_pipeline(str(tmp_path), device="cpu", dtype=torch.float32)


def test_unsupported_pipeline_class_is_rejected_with_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(BaseModelError) as excinfo:
        load_base_pipeline(str(tmp_path), device="cpu", dtype=torch.float32)
    assert "FluxPipeline" in str(excinfo.value)
    assert "StableDiffusionXLPipeline" in str(excinfo.value)


def test_folder_with_broken_components_raises_base_model_error(tmp_path):
    folder = save_tiny_model(tmp_path / "broken")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(BaseModelError, match="cannot load StableDiffusionPipeline"):
        load_base_pipeline(str(folder), device="cpu", dtype=torch.float32)


def test_pick_device_and_dtype(monkeypatch):
    assert pick_device_and_dtype("cpu") == ("cpu", torch.float32)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_and_dtype() == ("cpu", torch.float32)
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device_and_dtype("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert pick_device_and_dtype("auto") == ("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert pick_device_and_dtype("cuda") == ("cuda", torch.float16)

    with pytest.raises(ValueError, match="`prefer` must be one of auto, cuda, cpu"):
        pick_device_and_dtype("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_uses_half_precision_and_channels_last():
    device, dtype = pick_device_and_dtype()
    pipe = load_base_pipeline(TINY_MODEL, device=device, dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.unet.device.type == "cuda"
    weight = pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    image = _images(pipe, [0])[0]
    assert image.shape == (64, 64, 3) and image.std() > 0
