"""Style presets, seeds and LoRA-swapped generation on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from pipeline.finetune import TrainConfig, instance_prompt, instance_subject, prepare_training_cache, train_lora
from pipeline.generate import (
    BUILTIN_STYLES_PATH,
    GeneratedImage,
    StyleError,
    StylePreset,
    generate_headshots,
    generate_images,
    load_style_presets,
    resolve_styles,
    seed_for,
)
from pipeline.models import build_tiny_pipeline, native_resolution

PERSON = "person-0001"
# Few steps keep CPU generation fast; the presets' 30 steps are for real models.
FAST = dict(guidance_scale=5.0, steps=4, width=64, height=64)
STYLE_A = StylePreset(name="style-a", prompt="corporate headshot of {subject}", negative_prompt="blurry", **FAST)
STYLE_B = StylePreset(name="style-b", prompt="outdoor portrait of {subject}", **FAST)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal up to float rounding: batching may change summation order, moving a pixel by 1 level."""
    diff = np.abs(_pixels(a) - _pixels(b))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"images differ: max {diff.max()}, mean {diff.mean():.3f}"


def _base_images(pipe, preset: StylePreset, subject: str, indices: list[int]) -> list[Image.Image]:
    """What the base model (no LoRA) makes for the same prompts and seeds."""
    return generate_images(
        pipe,
        prompt=preset.render_prompt(subject),
        negative_prompt=preset.negative_prompt,
        seeds=[seed_for(PERSON, preset.name, index) for index in indices],
        guidance_scale=preset.guidance_scale,
        steps=preset.steps,
        width=preset.width,
        height=preset.height,
    )


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def trained(pipe):
    """A LoRA trained hard (high learning rate) so that its effect on images is plain to see."""
    config = TrainConfig(steps=10, rank=4, learning_rate=1e-2, resolution=64, checkpoint_every=100)
    rng = np.random.default_rng(7)
    photos = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    cache = prepare_training_cache(pipe, photos, instance_prompt(config), config.resolution)
    result = train_lora(pipe, cache, config)
    return dict(lora=result.lora_bytes, subject=instance_subject(config))


# --- presets ----------------------------------------------------------------------------------


def test_builtin_presets_are_valid_and_include_the_documented_ones():
    presets = load_style_presets()
    assert {"corporate-grey", "office", "outdoor"} <= presets.keys()
    assert len(presets) >= 5
    for name, preset in presets.items():
        assert preset.name == name
        assert "ohwx person" in preset.render_prompt("ohwx person")
        assert "{subject}" not in preset.render_prompt("ohwx person")


def test_user_file_overrides_and_extends_builtin_presets(tmp_path):
    extra = tmp_path / "styles.yaml"
    extra.write_text(
        "styles:\n"
        "  corporate-grey:\n"
        "    prompt: 'a grey {subject}'\n"
        "    steps: 12\n"
        "  beach:\n"
        "    prompt: '{subject} on a beach'\n"
        "    width: 768\n"
        "    height: 512\n"
    )
    presets = load_style_presets(extra)
    assert presets["corporate-grey"] == StylePreset(name="corporate-grey", prompt="a grey {subject}", steps=12)
    assert (presets["beach"].width, presets["beach"].height) == (768, 512)
    assert "office" in presets


@pytest.mark.parametrize(
    ("style_yaml", "expected"),
    [
        ("  bad:\n    prompt: 'x {subject}'\n    steps: 0\n", ["style 'bad'", "`steps`", "between 1 and 200", "0"]),
        ("  bad:\n    prompt: 'x {subject}'\n    width: 500\n", ["style 'bad'", "`width` must be divisible by 8"]),
        ("  bad:\n    prompt: 'no placeholder'\n", ["style 'bad'", "`prompt`", "{subject}"]),
        ("  bad:\n    prompt: 'x {subject}'\n    guidance: 7\n", ["unknown field(s) guidance", "guidance_scale"]),
        ("  bad:\n    steps: 10\n", ["style 'bad'", "`prompt` is required"]),
        ("  Bad Name:\n    prompt: 'x {subject}'\n", ["'Bad Name'", "`name`", "lowercase"]),
        ("  bad:\n    prompt: 'x {subject}'\n    guidance_scale: 99\n", ["`guidance_scale`", "between 0 and 30"]),
        ("  bad: [1, 2\n", ["not valid YAML"]),
    ],
)
def test_style_file_errors_name_file_style_and_field(tmp_path, style_yaml, expected):
    extra = tmp_path / "my-styles.yaml"
    extra.write_text("styles:\n" + style_yaml)
    with pytest.raises(StyleError) as excinfo:
        load_style_presets(extra)
    message = str(excinfo.value)
    assert str(extra) in message
    for fragment in expected:
        assert fragment in message


def test_style_file_shape_errors(tmp_path):
    extra = tmp_path / "flat.yaml"
    extra.write_text("corporate-grey:\n  prompt: 'x {subject}'\n")
    with pytest.raises(StyleError, match="top-level `styles:` key"):
        load_style_presets(extra)
    with pytest.raises(StyleError, match="cannot read style file"):
        load_style_presets(tmp_path / "missing.yaml")


def test_builtin_file_ships_next_to_the_module():
    assert BUILTIN_STYLES_PATH.name == "styles.yaml" and BUILTIN_STYLES_PATH.is_file()


def test_resolve_styles_keeps_order_and_lists_available_on_unknown_name():
    presets = load_style_presets()
    assert [p.name for p in resolve_styles(["outdoor", "office"], presets)] == ["outdoor", "office"]
    with pytest.raises(StyleError) as excinfo:
        resolve_styles(["office", "pirate"], presets)
    message = str(excinfo.value)
    assert "'pirate'" in message and "corporate-grey" in message and "outdoor" in message
    with pytest.raises(StyleError, match="requested twice"):
        resolve_styles(["office", "office"], presets)
    with pytest.raises(StyleError, match="no styles requested"):
        resolve_styles([], presets)


# --- seeds ------------------------------------------------------------------------------------


def test_seeds_are_stable_and_distinct():
    # Pinned values: a change here changes every user's regenerated images.
    assert seed_for("person-1", "office", 0) == 1422349942
    assert seed_for("person-1", "office", 1) == 120726854
    assert seed_for("person-1", "office", 0, base_seed=1) == 1846927179
    seeds = {seed_for(f"p{p}", style, i) for p in range(10) for style in ("a", "b") for i in range(10)}
    assert len(seeds) == 200
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert seed_for("a:b", "c", 0) != seed_for("a", "b:c", 0)


# --- generation -------------------------------------------------------------------------------


def test_generates_every_image_with_its_seed_and_prompt(pipe, trained):
    images = list(
        generate_headshots(
            pipe,
            trained["lora"],
            subject=trained["subject"],
            styles=[STYLE_A, STYLE_B],
            images_per_style=3,
            person_id=PERSON,
            batch_size=2,
        )
    )
    assert [(image.style, image.index) for image in images] == [
        ("style-a", 0), ("style-a", 1), ("style-a", 2), ("style-b", 0), ("style-b", 1), ("style-b", 2)
    ]
    for image in images:
        assert isinstance(image, GeneratedImage)
        assert image.image.size == (64, 64) and image.image.mode == "RGB"
        assert image.seed == seed_for(PERSON, image.style, image.index)
        assert "ohwx person" in image.prompt and image.seconds > 0
    assert images[0].negative_prompt == "blurry" and images[3].negative_prompt == ""
    assert not getattr(pipe.unet, "peft_config", None)


def test_same_seed_same_image_whatever_the_batching_and_skips(pipe, trained):
    common = dict(subject=trained["subject"], styles=[STYLE_A], images_per_style=4, person_id=PERSON)
    batched = {img.index: img.image for img in generate_headshots(pipe, trained["lora"], batch_size=4, **common)}
    already_stored = {("style-a", 0), ("style-a", 2)}
    resumed = {
        img.index: img.image
        for img in generate_headshots(pipe, trained["lora"], batch_size=1, skip=already_stored, **common)
    }
    assert sorted(resumed) == [1, 3]
    for index in resumed:
        _assert_same_image(resumed[index], batched[index])

    everything_stored = {("style-a", index) for index in range(4)}
    assert list(generate_headshots(pipe, trained["lora"], skip=everything_stored, **common)) == []


def test_trained_lora_changes_the_images_and_is_unloaded_afterwards(pipe, trained):
    indices = [0, 1]
    before = _base_images(pipe, STYLE_A, trained["subject"], indices)

    # The file loads with plain diffusers and changes what the same seed gives.
    pipe.load_lora_weights(safetensors.torch.load(trained["lora"]), adapter_name="check")
    with_lora_plain = _base_images(pipe, STYLE_A, trained["subject"], indices)
    pipe.unload_lora_weights()

    generated = list(
        generate_headshots(
            pipe, trained["lora"], subject=trained["subject"], styles=[STYLE_A], images_per_style=2, person_id=PERSON
        )
    )
    after = _base_images(pipe, STYLE_A, trained["subject"], indices)

    for base, plain, ours in zip(before, with_lora_plain, (g.image for g in generated)):
        assert np.abs(_pixels(plain) - _pixels(base)).mean() > 2, "the LoRA had no visible effect"
        _assert_same_image(ours, plain)
    for base, again in zip(before, after):
        assert np.array_equal(_pixels(base), _pixels(again)), "the pipe still carries the LoRA"
    assert not getattr(pipe.unet, "peft_config", None)


def test_lora_is_unloaded_when_the_consumer_stops_early(pipe, trained):
    images = generate_headshots(
        pipe, trained["lora"], subject=trained["subject"], styles=[STYLE_A], images_per_style=4,
        person_id=PERSON, batch_size=1,
    )
    next(images)
    assert "headshots_subject" in pipe.unet.peft_config  # swapped in while generating
    images.close()
    assert not getattr(pipe.unet, "peft_config", None)


def test_size_override_replaces_the_preset_size(pipe, trained):
    large = StylePreset(name="large", prompt="{subject}", steps=2, width=1024, height=768)
    (image,) = generate_headshots(
        pipe, trained["lora"], subject=trained["subject"], styles=[large], images_per_style=1,
        person_id=PERSON, size_override=native_resolution(pipe),
    )
    assert image.image.size == (64, 64)


def test_bad_arguments_fail_before_the_pipe_is_touched(pipe, trained):
    common = dict(subject="ohwx person", styles=[STYLE_A], images_per_style=1, person_id=PERSON)
    with pytest.raises(ValueError, match="`images_per_style` must be an integer between 1 and 1000"):
        generate_headshots(pipe, trained["lora"], **{**common, "images_per_style": 0})
    with pytest.raises(ValueError, match="`batch_size`"):
        generate_headshots(pipe, trained["lora"], batch_size=0, **common)
    with pytest.raises(ValueError, match="`size_override`"):
        generate_headshots(pipe, trained["lora"], size_override=100, **common)
    with pytest.raises(ValueError, match="not a safetensors file"):
        generate_headshots(pipe, b"\x00" * 64, **common)
    with pytest.raises(StyleError, match="repeats a style"):
        generate_headshots(pipe, trained["lora"], **{**common, "styles": [STYLE_A, STYLE_A]})

    pipe.load_lora_weights(safetensors.torch.load(trained["lora"]), adapter_name="someone-else")
    try:
        with pytest.raises(RuntimeError, match="already has LoRA adapters"):
            generate_headshots(pipe, trained["lora"], **common)
    finally:
        pipe.unload_lora_weights()
    assert not getattr(pipe.unet, "peft_config", None)


def test_style_preset_validation_messages():
    with pytest.raises(StyleError, match="`height` must be divisible by 8 but is 500"):
        StylePreset(name="x", prompt="{subject}", height=500)
    with pytest.raises(StyleError, match="`steps` must be an integer between 1 and 200 but is 201"):
        StylePreset(name="x", prompt="{subject}", steps=201)
    assert issubclass(StyleError, ValueError)
