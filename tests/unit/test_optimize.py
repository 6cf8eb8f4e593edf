"""Throughput switches of the resident pipe (pipeline.models.optimize_pipeline, merged LoRA swap,
batches across styles, training on an optimised pipe): same images as the plain path, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.finetune import TrainConfig, instance_prompt, instance_subject, prepare_training_cache, train_lora
from pipeline.generate import StylePreset, generate_headshots, has_merged_lora
from pipeline.models import (
    PipelineOptimizations,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    optimizations_of,
    optimize_pipeline,
)

PERSON = "person-0001"
FAST = dict(guidance_scale=5.0, steps=3, width=64, height=64)
STYLE_A = StylePreset(name="style-a", prompt="corporate headshot of {subject}", negative_prompt="blurry", **FAST)
STYLE_B = StylePreset(name="style-b", prompt="outdoor portrait of {subject}", **FAST)
STYLE_C = StylePreset(name="style-c", prompt="studio photo of {subject}", negative_prompt="hat",
                      **{**FAST, "guidance_scale": 3.0})


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal up to float rounding (another summation order may move a pixel by one level)."""
    diff = np.abs(_pixels(a) - _pixels(b))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"images differ: max {diff.max()}, mean {diff.mean():.3f}"


def _train(pipe, *, seed: int, steps: int = 8) -> bytes:
    """A LoRA trained hard (high learning rate) so its effect on images is plain to see."""
    config = TrainConfig(steps=steps, rank=4, learning_rate=1e-2, resolution=64, checkpoint_every=100, seed=seed)
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    cache = prepare_training_cache(pipe, photos, instance_prompt(config), config.resolution)
    return train_lora(pipe, cache, config).lora_bytes


def _generate(pipe, lora: bytes, styles, *, count: int = 2, batch_size: int = 4, **kwargs) -> dict:
    images = generate_headshots(pipe, lora, subject=instance_subject(TrainConfig()), styles=styles,
                                images_per_style=count, person_id=PERSON, batch_size=batch_size, **kwargs)
    return {(image.style, image.index): image.image for image in images}


@pytest.fixture(scope="module")
def plain():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def fused():
    pipe = build_tiny_pipeline(seed=0)
    applied = optimize_pipeline(pipe, channels_last=True, fuse_qkv=True)
    assert applied == PipelineOptimizations(channels_last=True, fuse_qkv=True, compile_mode=None)
    return pipe


@pytest.fixture(scope="module")
def loras(plain):
    return [_train(plain, seed=1), _train(plain, seed=2)]


def test_cpu_defaults_leave_the_pipe_plain():
    pipe = build_tiny_pipeline(seed=0)
    processors = pipe.unet.attn_processors
    assert optimize_pipeline(pipe) == PipelineOptimizations()
    assert optimizations_of(pipe) == PipelineOptimizations()
    assert pipe.unet.attn_processors == processors
    assert not optimizations_of(pipe).needs_merged_lora


def test_compile_is_refused_on_the_cpu_and_optimising_twice_is_refused():
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match="needs a CUDA pipeline"):
        optimize_pipeline(pipe, compile_mode="default")
    with pytest.raises(ValueError, match="`compile_mode` must be None or one of"):
        optimize_pipeline(pipe, compile_mode="fastest")
    optimize_pipeline(pipe, fuse_qkv=False)
    with pytest.raises(ValueError, match="already optimised"):
        optimize_pipeline(pipe)


def test_fused_qkv_and_channels_last_give_the_plain_images(plain, fused, loras):
    assert fused.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(getattr(module, "fused_projections", True) for name, module in fused.unet.named_modules()
               if name.endswith(("attn1", "attn2")))
    reference = _generate(plain, loras[0], [STYLE_A], lora_mode="peft")
    optimised = _generate(fused, loras[0], [STYLE_A])  # auto: merged, since the projections are fused
    assert reference.keys() == optimised.keys()
    for key in reference:
        _assert_same_image(optimised[key], reference[key])


def test_merged_loras_in_sequence_each_give_their_own_images_and_the_base_comes_back_exactly(plain, fused, loras):
    base_weights = {name: tensor.clone() for name, tensor in fused.unet.state_dict().items()}
    outputs = []
    for lora in loras:
        reference = _generate(plain, lora, [STYLE_A], lora_mode="peft")
        merged = _generate(fused, lora, [STYLE_A], lora_mode="merge")
        for key in reference:
            _assert_same_image(merged[key], reference[key])
        outputs.append(merged)
        assert not has_merged_lora(fused)
        after = fused.unet.state_dict()
        assert all(torch.equal(after[name], base_weights[name]) for name in base_weights), "base weights changed"
    first, second = (outputs[0][("style-a", 0)], outputs[1][("style-a", 0)])
    assert np.abs(_pixels(first) - _pixels(second)).mean() > 2, "the two LoRAs gave the same image"


def test_merged_lora_is_removed_when_the_consumer_stops_early(fused, loras):
    base = fused.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv.weight.clone()
    images = generate_headshots(fused, loras[0], subject="ohwx person", styles=[STYLE_A], images_per_style=3,
                                person_id=PERSON, batch_size=1)
    next(images)
    assert has_merged_lora(fused)
    with pytest.raises(RuntimeError, match="merged into the pipe's weights"):
        generate_headshots(fused, loras[1], subject="ohwx person", styles=[STYLE_A], images_per_style=1,
                           person_id=PERSON)
    images.close()
    assert not has_merged_lora(fused)
    assert torch.equal(fused.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv.weight, base)


def test_peft_mode_is_refused_on_a_fused_pipe_and_foreign_lora_keys_are_refused_for_merging(fused, loras):
    with pytest.raises(RuntimeError, match="use lora_mode='merge'"):
        generate_headshots(fused, loras[0], subject="ohwx person", styles=[STYLE_A], images_per_style=1,
                           person_id=PERSON, lora_mode="peft")
    import safetensors.torch

    state = safetensors.torch.load(loras[0])
    renamed = {key.replace("to_q.", "to_z."): value for key, value in state.items()}
    with pytest.raises(ValueError, match="does not exist in this UNet"):
        generate_headshots(fused, safetensors.torch.save(renamed), subject="ohwx person", styles=[STYLE_A],
                           images_per_style=1, person_id=PERSON)
    assert not has_merged_lora(fused)


def test_batches_across_styles_give_the_per_style_images(plain, loras):
    per_style = {}
    for style in (STYLE_A, STYLE_B, STYLE_C):
        per_style.update(_generate(plain, loras[0], [style], count=2, batch_size=1))
    images = generate_headshots(plain, loras[0], subject=instance_subject(TrainConfig()),
                                styles=[STYLE_A, STYLE_B, STYLE_C], images_per_style=2, person_id=PERSON, batch_size=8)
    listed = list(images)
    # A and B share guidance, steps and size: one batch of four; C (other guidance) samples apart.
    assert [(image.style, image.index) for image in listed] == [
        ("style-a", 0), ("style-a", 1), ("style-b", 0), ("style-b", 1), ("style-c", 0), ("style-c", 1)
    ]
    assert listed[0].seconds == listed[3].seconds != listed[4].seconds
    for image in listed:
        _assert_same_image(image.image, per_style[(image.style, image.index)])
        assert image.negative_prompt == {"style-a": "blurry", "style-b": "", "style-c": "hat"}[image.style]


def test_training_on_a_fused_pipe_gives_the_plain_lora_and_keeps_its_processors(plain, fused, loras):
    processors = fused.unet.attn_processors
    lora = _train(fused, seed=1)
    import safetensors.torch

    ours, reference = safetensors.torch.load(lora), safetensors.torch.load(loras[0])
    assert ours.keys() == reference.keys()
    # channels_last alone moves the weights by ~2e-5 (float rounding amplified by Adam); fusing by 0.
    assert all(torch.allclose(ours[key], reference[key], atol=2e-4) for key in ours)
    after = fused.unet.attn_processors
    assert all(after[name] is processors[name] for name in processors), "fused processors were not put back"


def test_sdxl_fused_merged_and_batched_across_styles_gives_the_plain_images():
    plain_xl = build_tiny_sdxl_pipeline(seed=0)
    lora = _train(plain_xl, seed=3, steps=4)
    reference = {}
    for style in (STYLE_A, STYLE_B):
        reference.update(_generate(plain_xl, lora, [style], count=1, batch_size=1, lora_mode="peft"))
    fused_xl = build_tiny_sdxl_pipeline(seed=0)
    optimize_pipeline(fused_xl, channels_last=True, fuse_qkv=True)
    optimised = _generate(fused_xl, lora, [STYLE_A, STYLE_B], count=1, batch_size=2)
    assert optimised.keys() == reference.keys()
    for key in reference:
        _assert_same_image(optimised[key], reference[key])
