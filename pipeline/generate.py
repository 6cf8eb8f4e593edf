"""Headshot generation: style presets, per-image seeds, and LoRA-swapped batched sampling.

The steps of one person's generation, as :func:`generate_headshots` runs them:

1. ``check_inputs``: styles, counts and the LoRA file are validated before the pipe is touched.
2. The person's LoRA is swapped into the resident pipe, without reloading the pipeline: either as
   PEFT layers (``load_lora_weights``, the plain diffusers way) or merged into the attention
   weights in place (``lora_mode="merge"``, what an optimised pipe needs: fused QKV projections
   bypass PEFT layers, and a compiled UNet would recompile whenever PEFT layers come and go).
3. Each style's prompt is encoded once; the images not yet stored are sampled in batches that mix
   styles sharing steps, guidance and size (their prompt embeddings stacked). Every image has its
   own generator seeded by :func:`seed_for`, so an image is reproducible whatever the batching and
   whichever images were skipped after a crash.
4. The LoRA is removed again, always, so the next person gets the clean base model (a merged LoRA
   by copying the saved base weights back: bit-exact).

Style presets live in ``pipeline/styles.yaml`` and can be extended or overridden by a user YAML
file of the same shape (see :func:`load_style_presets`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import PIL.Image
import safetensors.torch
import torch
import yaml
from diffusers import DiffusionPipeline

from pipeline.models import eager_unet, is_sdxl, optimizations_of

logger = logging.getLogger(__name__)

BUILTIN_STYLES_PATH = Path(__file__).with_name("styles.yaml")
"""The built-in presets shipped with the package."""

SUBJECT_PLACEHOLDER = "{subject}"
"""Marks where a style prompt names the person, e.g. ``"ohwx person"``."""

GENERATION_ADAPTER_NAME = "headshots_subject"
"""Adapter name of the person's LoRA while :func:`generate_headshots` runs."""

LORA_MODES = ("auto", "peft", "merge")
"""How :func:`generate_headshots` applies a person's LoRA (see its ``lora_mode``)."""

_STYLE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_MAX_SEED = 2**31 - 1
# Set on the pipe while a LoRA is merged into its weights; the saved base weights live beside it.
_MERGED_ATTR = "_headshots_merged_lora"
_BASE_WEIGHTS_ATTR = "_headshots_base_weights"


class StyleError(ValueError):
    """A style preset, a style file or a requested style name is invalid."""


# --------------------------------------------------------------------------------------------
# Style presets
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StylePreset:
    """How one style of headshot is generated.

    Attributes:
        name: Slug that names the style in requests and storage keys:
            ``[a-z0-9][a-z0-9-]{0,62}``.
        prompt: Prompt template; must contain ``{subject}``, replaced by the person's instance words.
        negative_prompt: What to steer away from; empty for none.
        guidance_scale: Classifier-free guidance scale, 0..30 (1 or less turns guidance off).
        steps: Denoising steps, 1..200.
        width: Image width in pixels, 64..2048, divisible by 8.
        height: Image height in pixels, 64..2048, divisible by 8.

    Raises:
        StyleError: A field is invalid; the message names it and what is allowed.
    """

    name: str
    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = 7.0
    steps: int = 30
    width: int = 512
    height: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _STYLE_NAME_PATTERN.fullmatch(self.name):
            raise StyleError(
                f"`name` must be 1-63 lowercase letters, digits or dashes, starting with a letter or "
                f"digit, but is {self.name!r}"
            )
        if not isinstance(self.prompt, str) or SUBJECT_PLACEHOLDER not in self.prompt:
            raise StyleError(
                f"`prompt` must be a string containing {SUBJECT_PLACEHOLDER} (where the person goes) "
                f"but is {self.prompt!r}"
            )
        if not isinstance(self.negative_prompt, str):
            raise StyleError(f"`negative_prompt` must be a string but is {self.negative_prompt!r}")
        if (
            not isinstance(self.guidance_scale, (int, float))
            or isinstance(self.guidance_scale, bool)
            or not math.isfinite(self.guidance_scale)
            or not 0 <= self.guidance_scale <= 30
        ):
            raise StyleError(f"`guidance_scale` must be a number between 0 and 30 but is {self.guidance_scale!r}")
        if not _is_int(self.steps) or not 1 <= self.steps <= 200:
            raise StyleError(f"`steps` must be an integer between 1 and 200 but is {self.steps!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or not 64 <= value <= 2048:
                raise StyleError(f"`{name}` must be an integer between 64 and 2048 but is {value!r}")
            if value % 8:
                raise StyleError(f"`{name}` must be divisible by 8 but is {value}")

    def render_prompt(self, subject: str) -> str:
        """The prompt with ``{subject}`` replaced, e.g. ``"headshot of ohwx person, ..."``."""
        # str.replace, not str.format: other braces in a user's prompt are just text.
        return self.prompt.replace(SUBJECT_PLACEHOLDER, subject)


_STYLE_FIELDS = tuple(f.name for f in fields(StylePreset) if f.name != "name")


def _parse_style_file(text: str, source: str) -> dict[str, StylePreset]:
    """Parse one style YAML document; every error names ``source`` and the style and field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise StyleError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(document, dict) or "styles" not in document:
        raise StyleError(f"{source}: must be a mapping with a top-level `styles:` key holding the styles by name")
    extra_keys = sorted(str(key) for key in document if key != "styles")
    if extra_keys:
        raise StyleError(f"{source}: unknown top-level key(s) {', '.join(extra_keys)}; only `styles` is allowed")
    styles = document["styles"]
    if not isinstance(styles, dict) or not styles:
        raise StyleError(f"{source}: `styles` must be a non-empty mapping of style name to fields")

    presets: dict[str, StylePreset] = {}
    for name, spec in styles.items():
        where = f"{source}: style {name!r}"
        if not isinstance(spec, dict):
            raise StyleError(f"{where}: must be a mapping of fields ({', '.join(_STYLE_FIELDS)})")
        unknown = sorted(str(key) for key in spec if key not in _STYLE_FIELDS)
        if unknown:
            raise StyleError(
                f"{where}: unknown field(s) {', '.join(unknown)}; allowed fields are {', '.join(_STYLE_FIELDS)}"
            )
        if "prompt" not in spec:
            raise StyleError(f"{where}: `prompt` is required (a text containing {SUBJECT_PLACEHOLDER})")
        try:
            presets[name] = StylePreset(name=name, **spec)
        except StyleError as error:
            raise StyleError(f"{where}: {error}") from error
    return presets


def load_style_presets(extra_path: str | Path | None = None) -> dict[str, StylePreset]:
    """Load the built-in style presets, extended or overridden by a user's YAML file.

    Args:
        extra_path: Optional YAML file shaped like ``pipeline/styles.yaml``
            (``styles: {name: {prompt: ..., ...}}``). A style with a built-in's name replaces that
            preset as a whole; new names are added.

    Returns:
        Presets by name.

    Raises:
        StyleError: A file is missing, not valid YAML, not shaped as above, or has an invalid field;
            the message names the file, the style, the field and what is allowed.
    """
    presets = _parse_style_file(BUILTIN_STYLES_PATH.read_text(encoding="utf-8"), str(BUILTIN_STYLES_PATH))
    if extra_path is not None:
        path = Path(extra_path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise StyleError(f"{path}: cannot read style file: {error}") from error
        presets.update(_parse_style_file(text, str(path)))
    return presets


def resolve_styles(names: list[str], presets: dict[str, StylePreset]) -> list[StylePreset]:
    """Look up the requested styles, keeping the request's order.

    Args:
        names: Requested style names.
        presets: From :func:`load_style_presets`.

    Returns:
        The presets, one per name.

    Raises:
        StyleError: ``names`` is empty, repeats a name, or holds an unknown name (the message lists
            the available styles).
    """
    if not names:
        raise StyleError(f"no styles requested; available styles: {', '.join(sorted(presets))}")
    seen: set[str] = set()
    resolved = []
    for name in names:
        if name not in presets:
            raise StyleError(f"unknown style {name!r}; available styles: {', '.join(sorted(presets))}")
        if name in seen:
            # The same style twice would generate the very same images twice (same seeds).
            raise StyleError(f"style {name!r} is requested twice; list each style once")
        seen.add(name)
        resolved.append(presets[name])
    return resolved


# --------------------------------------------------------------------------------------------
# Seeds and sampling
# --------------------------------------------------------------------------------------------


def seed_for(person_id: str, style: str, index: int, base_seed: int = 0) -> int:
    """The seed of one image: stable across processes, machines and Python versions.

    sha256 rather than ``hash()``, which is salted per process.

    Args:
        person_id: The person the image is for.
        style: Style name.
        index: Image number within the style, from 0.
        base_seed: Varies every seed at once (e.g. a "regenerate" request).

    Returns:
        A seed in ``0 .. 2**31 - 1``.
    """
    # JSON encoding keeps the fields apart: ("a:b", "c") and ("a", "b:c") get different seeds.
    key = json.dumps([base_seed, person_id, style, index]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & _MAX_SEED


@dataclass
class GeneratedImage:
    """One generated headshot and how it was made (enough to regenerate it exactly).

    Attributes:
        style: Style name.
        index: Image number within the style.
        seed: Seed of its initial noise (:func:`seed_for`).
        prompt: Prompt with the subject filled in.
        negative_prompt: Negative prompt used.
        image: The RGB image.
        seconds: Its share of its batch's sampling time.
    """

    style: str
    index: int
    seed: int
    prompt: str
    negative_prompt: str
    image: PIL.Image.Image
    seconds: float


def generate_images(
    pipe: DiffusionPipeline,
    *,
    prompt: str,
    negative_prompt: str,
    seeds: list[int],
    guidance_scale: float,
    steps: int,
    width: int,
    height: int,
) -> list[PIL.Image.Image]:
    """Sample one batch, one image per seed, with whatever LoRA is loaded in ``pipe``.

    Each image gets its own CPU generator: its initial noise depends only on its seed (not on
    batch size, position or device), so the same seed gives the same image up to float rounding.

    Args:
        pipe: A Stable Diffusion (1.5 or XL) pipeline.
        prompt: Full prompt.
        negative_prompt: Negative prompt; empty means the pipeline's default unconditional input.
        seeds: One seed per image; the batch size is ``len(seeds)``.
        guidance_scale: Classifier-free guidance scale.
        steps: Denoising steps.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The images, in the order of ``seeds``.
    """
    count = len(seeds)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    result = pipe(
        prompt=[prompt] * count,
        # None (not "") keeps SDXL's zeroed unconditional embedding for an empty negative prompt.
        negative_prompt=[negative_prompt] * count if negative_prompt else None,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)


# --------------------------------------------------------------------------------------------
# One person's headshots
# --------------------------------------------------------------------------------------------


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length + JSON)."""
    if len(data) < 8:
        return {}
    (header_length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (ValueError, UnicodeDecodeError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _lora_state_from_bytes(lora_bytes: bytes) -> dict[str, torch.Tensor]:
    """Parse a diffusers LoRA safetensors file into the state dict ``load_lora_weights`` takes."""
    if not isinstance(lora_bytes, (bytes, bytearray, memoryview)) or len(lora_bytes) == 0:
        raise ValueError("`lora_bytes` must be the non-empty bytes of a LoRA safetensors file")
    data = bytes(lora_bytes)
    try:
        state = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"`lora_bytes` is not a safetensors file: {error}") from error
    if not state or not all("lora" in key for key in state):
        raise ValueError(
            "`lora_bytes` holds no LoRA weights (every key must contain 'lora', e.g. "
            "'unet.<module>.lora_A.weight'); pass TrainResult.lora_bytes from train_lora"
        )
    # A state dict carries no LoRA alpha: loading assumes alpha == rank. Refuse a file whose
    # metadata says otherwise instead of silently generating with the wrong LoRA strength.
    raw = _safetensors_metadata(data).get("lora_adapter_metadata")
    if raw:
        try:
            adapter = json.loads(raw)
        except ValueError:
            adapter = {}
        rank, alpha = adapter.get("unet.r"), adapter.get("unet.lora_alpha")
        if rank is not None and alpha is not None and rank != alpha:
            raise ValueError(
                f"LoRA file has lora_alpha {alpha} but rank {rank}; only files with lora_alpha == rank "
                "(as train_lora writes) can be loaded from bytes"
            )
    return state


def _check_inputs(
    pipe: DiffusionPipeline,
    *,
    subject: str,
    styles: list[StylePreset],
    images_per_style: int,
    person_id: str,
    batch_size: int,
    size_override: int | None,
    lora_mode: str,
) -> None:
    if lora_mode not in LORA_MODES:
        raise ValueError(f"`lora_mode` must be one of {', '.join(LORA_MODES)} but is {lora_mode!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"`subject` must be a non-empty string such as 'ohwx person' but is {subject!r}")
    if not isinstance(person_id, str) or not person_id:
        raise ValueError(f"`person_id` must be a non-empty string but is {person_id!r}")
    if not styles:
        raise StyleError("`styles` must hold at least one StylePreset (see resolve_styles)")
    for preset in styles:
        if not isinstance(preset, StylePreset):
            raise StyleError(f"`styles` must hold StylePreset objects but holds {type(preset).__name__}")
    names = [preset.name for preset in styles]
    if len(set(names)) != len(names):
        raise StyleError(f"`styles` repeats a style ({', '.join(names)}); list each style once")
    if not _is_int(images_per_style) or not 1 <= images_per_style <= 1000:
        raise ValueError(f"`images_per_style` must be an integer between 1 and 1000 but is {images_per_style!r}")
    if not _is_int(batch_size) or not 1 <= batch_size <= 256:
        raise ValueError(f"`batch_size` must be an integer between 1 and 256 but is {batch_size!r}")
    if size_override is not None and (not _is_int(size_override) or size_override < 8 or size_override % 8):
        raise ValueError(f"`size_override` must be None or a positive multiple of 8 but is {size_override!r}")
    loaded = getattr(eager_unet(pipe), "peft_config", None)
    if loaded:
        raise RuntimeError(
            f"pipe.unet already has LoRA adapters {sorted(loaded)}: another person's LoRA would leak "
            "into these images. Call pipe.unload_lora_weights() first"
        )
    if has_merged_lora(pipe):
        raise RuntimeError(
            "a LoRA is merged into the pipe's weights (another generation is still running or was "
            "not closed): another person's LoRA would leak into these images"
        )


def generate_headshots(
    pipe: DiffusionPipeline,
    lora_bytes: bytes,
    *,
    subject: str,
    styles: list[StylePreset],
    images_per_style: int,
    person_id: str,
    base_seed: int = 0,
    batch_size: int = 4,
    skip: set[tuple[str, int]] = frozenset(),
    size_override: int | None = None,
    lora_mode: str = "auto",
) -> Iterator[GeneratedImage]:
    """Generate one person's headshots with their LoRA swapped into the resident pipe.

    Inputs are checked when this is called; the LoRA is applied when iteration starts and removed
    when it ends, fails or the iterator is closed. Consume the iterator fully or close it
    (``contextlib.closing``); not thread-safe with other users of ``pipe``.

    Args:
        pipe: The resident base pipeline, without any LoRA loaded.
        lora_bytes: The person's LoRA safetensors file (``TrainResult.lora_bytes``).
        subject: Words that name the person in prompts, e.g. ``"ohwx person"``
            (:func:`pipeline.finetune.instance_subject`).
        styles: Presets to generate (:func:`resolve_styles`), each once.
        images_per_style: Images per style, indices ``0 .. images_per_style - 1``.
        person_id: Identifies the person; part of every seed.
        base_seed: Varies every seed at once.
        batch_size: Images sampled together. A batch may mix styles that share guidance scale,
            steps and size (each image keeps its own prompt and seed).
        skip: ``(style, index)`` pairs already stored (resume after a crash); not generated again.
        size_override: Square side in pixels used instead of the presets' width/height, e.g.
            ``native_resolution(pipe)`` for the tiny test model.
        lora_mode: ``"peft"`` loads the LoRA as PEFT layers (``load_lora_weights``) and unloads
            it after; ``"merge"`` adds it into the UNet's weights in place and copies the saved base
            weights back after (no change of module structure, so a compiled UNet does not
            recompile, and fused QKV projections see the LoRA); ``"auto"`` merges when the pipe was
            optimised with fused QKV or compilation (:func:`pipeline.models.optimize_pipeline`),
            else uses PEFT.

    Returns:
        An iterator of :class:`GeneratedImage`: batches in the order of the first style of each
        (guidance, steps, size) group, within a batch style by style, index by index.

    Raises:
        ValueError: A count, size, subject, ``lora_mode`` or the LoRA file is invalid, or a merged
            LoRA names modules the UNet lacks.
        StyleError: ``styles`` is empty, repeats a style or holds a non-preset.
        RuntimeError: ``pipe`` already has a LoRA loaded or merged, or ``lora_mode="peft"`` is
            asked for on a pipe whose fused or compiled UNet needs merging.
    """
    _check_inputs(
        pipe,
        subject=subject,
        styles=styles,
        images_per_style=images_per_style,
        person_id=person_id,
        batch_size=batch_size,
        size_override=size_override,
        lora_mode=lora_mode,
    )
    needs_merge = optimizations_of(pipe).needs_merged_lora
    if lora_mode == "peft" and needs_merge:
        raise RuntimeError(
            f"the pipe is optimised ({optimizations_of(pipe)}): PEFT layers would be bypassed by its fused "
            "projections or recompile its UNet; use lora_mode='merge' or 'auto'"
        )
    merge = lora_mode == "merge" or (lora_mode == "auto" and needs_merge)
    lora_state = _lora_state_from_bytes(lora_bytes)
    if merge:
        # Checked now, not when iteration starts: a bad file must fail before the pipe is touched.
        _merge_plan(eager_unet(pipe), lora_state)
    return _generate_with_lora(
        pipe,
        lora_state,
        merge=merge,
        subject=subject,
        styles=list(styles),
        images_per_style=images_per_style,
        person_id=person_id,
        base_seed=base_seed,
        batch_size=batch_size,
        skip=frozenset(skip),
        size_override=size_override,
    )


# --------------------------------------------------------------------------------------------
# LoRA merged into the weights (the optimised pipe's swap)
# --------------------------------------------------------------------------------------------


def _merge_plan(
    unet: torch.nn.Module, lora_state: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (lora_A, lora_B)}`` for a diffusers UNet LoRA file, checked against ``unet``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state.items():
        match = re.fullmatch(r"unet\.(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None:
            raise ValueError(
                f"LoRA key {key!r} cannot be merged: only UNet LoRA weights named "
                "'unet.<module>.lora_A.weight' / 'lora_B.weight' (as train_lora writes) can"
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    plan = {}
    for path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {path!r} has {sorted(pair)} but needs both lora_A and lora_B")
        try:
            module = unet.get_submodule(path)
        except AttributeError as error:
            raise ValueError(f"LoRA module {path!r} does not exist in this UNet (another base model?)") from error
        down, up = pair["lora_A"], pair["lora_B"]
        if not isinstance(module, torch.nn.Linear) or down.ndim != 2 or up.ndim != 2:
            raise ValueError(f"LoRA module {path!r} is not a linear layer with 2-d lora_A/lora_B; cannot merge it")
        if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != tuple(module.weight.shape):
            raise ValueError(
                f"LoRA module {path!r}: lora_B @ lora_A is {up.shape[0]}x{down.shape[1]} but the weight is "
                f"{tuple(module.weight.shape)} (another base model?)"
            )
        plan[path] = (down, up)
    return plan


def _refresh_fused_projections(unet: torch.nn.Module, paths) -> None:
    """Copy ``to_q/k/v`` into the fused ``to_qkv`` / ``to_kv`` of the attention layers owning ``paths``."""
    owners = {path.rsplit(".to_", 1)[0] for path in paths if ".to_" in path}
    for owner in owners:
        attention = unet.get_submodule(owner)
        if not getattr(attention, "fused_projections", False):
            continue
        if getattr(attention, "to_qkv", None) is not None and not attention.is_cross_attention:
            attention.to_qkv.weight.copy_(
                torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight])
            )
        if getattr(attention, "to_kv", None) is not None and attention.is_cross_attention:
            attention.to_kv.weight.copy_(torch.cat([attention.to_k.weight, attention.to_v.weight]))


@torch.no_grad()
def _merge_lora(pipe: DiffusionPipeline, plan: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add ``lora_B @ lora_A`` (scale 1: alpha == rank) to each target weight, saving the base first.

    The saved base weights stay on the pipe (same device, same dtype) and are reused for every
    person: restoring is a copy, so the base model comes back bit-exact.
    """
    unet = eager_unet(pipe)
    saved: dict[str, torch.Tensor] = getattr(pipe, _BASE_WEIGHTS_ATTR, None) or {}
    # Attached before any weight changes, so a failure half-way can still be restored.
    setattr(pipe, _BASE_WEIGHTS_ATTR, saved)
    setattr(pipe, _MERGED_ATTR, True)
    for path, (down, up) in plan.items():
        weight = unet.get_submodule(path).weight
        if path not in saved:
            saved[path] = weight.detach().clone()
        delta = up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)
        weight.copy_((saved[path].float() + delta).to(weight.dtype))
    _refresh_fused_projections(unet, plan)


@torch.no_grad()
def _restore_base_weights(pipe: DiffusionPipeline, paths) -> None:
    unet = eager_unet(pipe)
    saved: dict[str, torch.Tensor] = getattr(pipe, _BASE_WEIGHTS_ATTR, None) or {}
    for path in paths:
        if path in saved:
            unet.get_submodule(path).weight.copy_(saved[path])
    _refresh_fused_projections(unet, paths)
    setattr(pipe, _MERGED_ATTR, False)


def has_merged_lora(pipe: DiffusionPipeline) -> bool:
    """Whether a person's LoRA is merged into ``pipe``'s weights right now (a generation is running)."""
    return bool(getattr(pipe, _MERGED_ATTR, False))


# --------------------------------------------------------------------------------------------
# Batches across styles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PromptEmbeddings:
    """One style's encoded prompt and negative prompt, one row each (``None`` where not used)."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


def _uses_guidance(pipe: DiffusionPipeline, guidance_scale: float) -> bool:
    # The pipelines' own rule: guidance only above 1 and not for guidance-distilled UNets.
    return guidance_scale > 1 and eager_unet(pipe).config.time_cond_proj_dim is None


@torch.no_grad()
def _encode_style(pipe: DiffusionPipeline, prompt: str, negative_prompt: str, guidance: bool) -> _PromptEmbeddings:
    device = pipe._execution_device
    # None (not "") keeps SDXL's zeroed unconditional embedding for an empty negative prompt.
    negative = negative_prompt or None
    if is_sdxl(pipe):
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative,
        )
        return _PromptEmbeddings(embeds, negative_embeds if guidance else None, pooled,
                                 negative_pooled if guidance else None)
    embeds, negative_embeds = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance, negative_prompt=negative,
    )
    return _PromptEmbeddings(embeds, negative_embeds if guidance else None)


def _sample_batch(
    pipe: DiffusionPipeline,
    rows: list[_PromptEmbeddings],
    seeds: list[int],
    *,
    guidance_scale: float,
    steps: int,
    width: int,
    height: int,
) -> list[PIL.Image.Image]:
    """Sample one batch whose images may have different prompts: their embeddings are stacked."""

    def stack(name: str) -> torch.Tensor | None:
        tensors = [getattr(row, name) for row in rows]
        return None if tensors[0] is None else torch.cat(tensors)

    kwargs = dict(prompt_embeds=stack("prompt"), negative_prompt_embeds=stack("negative"))
    if is_sdxl(pipe):
        kwargs.update(pooled_prompt_embeds=stack("pooled"), negative_pooled_prompt_embeds=stack("negative_pooled"))
    result = pipe(
        **kwargs,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        output_type="pil",
    )
    return list(result.images)


def _generate_with_lora(
    pipe: DiffusionPipeline,
    lora_state: dict[str, torch.Tensor],
    *,
    merge: bool,
    subject: str,
    styles: list[StylePreset],
    images_per_style: int,
    person_id: str,
    base_seed: int,
    batch_size: int,
    skip: frozenset[tuple[str, int]],
    size_override: int | None,
) -> Iterator[GeneratedImage]:
    # Group the pending images by what one pipe call must share; a group keeps style order.
    groups: dict[tuple[float, int, int, int], list[tuple[StylePreset, int]]] = {}
    for preset in styles:
        width = size_override or preset.width
        height = size_override or preset.height
        for index in range(images_per_style):
            if (preset.name, index) not in skip:
                key = (float(preset.guidance_scale), preset.steps, width, height)
                groups.setdefault(key, []).append((preset, index))
    if not groups:
        return  # everything is stored already (resume after a crash at the very end)
    plan = _merge_plan(eager_unet(pipe), lora_state) if merge else None
    try:
        started = time.perf_counter()
        if plan is not None:
            _merge_lora(pipe, plan)
        else:
            pipe.load_lora_weights(lora_state, adapter_name=GENERATION_ADAPTER_NAME)
        logger.debug("applied LoRA for %s (%s) in %.3f s", person_id, "merged" if merge else "peft",
                     time.perf_counter() - started)
        embeddings: dict[str, _PromptEmbeddings] = {}
        for (guidance_scale, steps, width, height), items in groups.items():
            guidance = _uses_guidance(pipe, guidance_scale)
            for preset, _ in items:
                if preset.name not in embeddings:
                    embeddings[preset.name] = _encode_style(
                        pipe, preset.render_prompt(subject), preset.negative_prompt, guidance
                    )
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                seeds = [seed_for(person_id, preset.name, index, base_seed) for preset, index in batch]
                batch_started = time.perf_counter()
                images = _sample_batch(
                    pipe,
                    [embeddings[preset.name] for preset, _ in batch],
                    seeds,
                    guidance_scale=guidance_scale,
                    steps=steps,
                    width=width,
                    height=height,
                )
                per_image_s = (time.perf_counter() - batch_started) / len(batch)
                for (preset, index), seed, image in zip(batch, seeds, images):
                    yield GeneratedImage(
                        style=preset.name,
                        index=index,
                        seed=seed,
                        prompt=preset.render_prompt(subject),
                        negative_prompt=preset.negative_prompt,
                        image=image,
                        seconds=per_image_s,
                    )
    finally:
        # The pipe is shared: the next person must never get this person's LoRA.
        if plan is not None:
            _restore_base_weights(pipe, plan)
        else:
            pipe.unload_lora_weights()
