"""DreamBooth-style LoRA fine-tuning of the resident base pipeline on one person's photos.

The steps, in the order a worker runs them:

1. :func:`prepare_training_cache` encodes the photos with the VAE and the instance prompt with the
   text encoder(s), once. Training then needs only the UNet, and the cache (a few hundred KB of
   safetensors) can be stored so a retry or resume on another worker skips the encoders.
2. :func:`train_lora` adds a LoRA adapter to ``pipe.unet``, trains only the adapter, hands out
   :class:`TrainCheckpoint` s along the way and returns the adapter as a standard diffusers LoRA
   safetensors file (:class:`TrainResult`). The adapter is always removed again: the pipe is shared
   and stays resident for the next person, so its base weights never change.

Training is deterministic for a given config: the noise, timesteps and image picks of step ``k`` come
from a generator seeded by ``(config.seed, k)``, so a run resumed from a checkpoint ends with the
same LoRA weights as an uninterrupted one, up to floating-point noise.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

import numpy as np
import PIL.Image
import safetensors.torch
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from pipeline.models import eager_unet, is_sdxl, optimizations_of

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""UNet attention projections that get LoRA adapters (the usual DreamBooth-LoRA choice)."""

TRAIN_ADAPTER_NAME = "headshots_train"
"""Name of the adapter while it is being trained; it never outlives :func:`train_lora`."""

# Images are VAE-encoded in chunks of this many so 20 photos at 1024 px do not need 20x the
# activation memory of one.
_VAE_ENCODE_CHUNK = 4

# Steps whose random inputs are drawn and copied to the device at once, and whose losses are read
# back at once: one host-device synchronisation per chunk instead of two per step, so the GPU is
# not left idle while Python launches the next step.
_STEP_CHUNK = 25

_CACHE_FORMAT = "headshots-training-cache/1"
_CHECKPOINT_FORMAT = "headshots-train-checkpoint/1"
_TOKEN_PATTERN = re.compile(r"\S+")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass; `steps: true` in a YAML file is a mistake, not 1 step.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer between {low} and {high} but is {value!r}")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be between {low} and {high} but is {value}")


def _check_float(name: str, value: object, low: float, high: float, *, low_inclusive: bool) -> None:
    allowed = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a number in {allowed} but is {value!r}")
    if value > high or value < low or (value == low and not low_inclusive):
        raise ValueError(f"`{name}` must be in {allowed} but is {value:g}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one LoRA fine-tuning run.

    Attributes:
        steps: Optimizer steps in total (a resumed run continues up to this count), 1..100000.
        rank: LoRA rank r (``lora_alpha`` is set equal, so the LoRA scale is 1), 1..256.
        learning_rate: Constant AdamW learning rate, in (0, 1].
        resolution: Training image side in pixels, 64..2048, divisible by 8; the cache must have
            been prepared at this resolution.
        checkpoint_every: Hand out a :class:`TrainCheckpoint` every this many steps, 1..100000.
        batch_size: Images per step, drawn with replacement from the cached photos, 1..64.
        seed: Seed of LoRA initialisation and of every step's noise, 0..2**31-1.
        instance_token: Rare token that comes to mean "this person", one word (e.g. ``"ohwx"``).
        class_noun: What the person is, e.g. ``"person"``, ``"man"``, ``"woman"``.
        max_grad_norm: Gradient-norm clipping threshold, in (0, 1000].

    Raises:
        ValueError: A field is out of its range; the message names the field and the range.
    """

    steps: int = 400
    rank: int = 16
    learning_rate: float = 1e-4
    resolution: int = 512
    checkpoint_every: int = 100
    batch_size: int = 1
    seed: int = 0
    instance_token: str = "ohwx"
    class_noun: str = "person"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1, 100_000)
        _check_int("rank", self.rank, 1, 256)
        _check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_inclusive=False)
        _check_int("resolution", self.resolution, 64, 2048)
        if self.resolution % 8:
            raise ValueError(f"`resolution` must be divisible by 8 but is {self.resolution}")
        _check_int("checkpoint_every", self.checkpoint_every, 1, 100_000)
        _check_int("batch_size", self.batch_size, 1, 64)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        for name in ("instance_token", "class_noun"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or value != value.strip():
                raise ValueError(
                    f"`{name}` must be a non-empty string without leading/trailing spaces but is {value!r}"
                )
        if not _TOKEN_PATTERN.fullmatch(self.instance_token):
            raise ValueError(
                f"`instance_token` must be a single word without spaces (e.g. 'ohwx') but is "
                f"{self.instance_token!r}"
            )
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, 1000.0, low_inclusive=False)

    def fingerprint(self) -> str:
        """The fields a resumed run must share with the run that wrote the checkpoint.

        ``steps`` and ``checkpoint_every`` may change between the two runs; anything else would make
        the resumed trajectory differ from an uninterrupted one.
        """
        keys = ("rank", "learning_rate", "resolution", "batch_size", "seed", "max_grad_norm")
        return ",".join(f"{key}={getattr(self, key)!r}" for key in keys)


def instance_subject(config: TrainConfig) -> str:
    """The words that name the person in prompts, e.g. ``"ohwx person"``.

    Style presets put this in place of their ``{subject}`` placeholder.
    """
    return f"{config.instance_token} {config.class_noun}"


def instance_prompt(config: TrainConfig) -> str:
    """The DreamBooth instance prompt the LoRA is trained on, e.g. ``"a photo of ohwx person"``."""
    return f"a photo of {instance_subject(config)}"


# --------------------------------------------------------------------------------------------
# Training cache: encoded photos and prompt
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingCache:
    """Everything training needs from the photos and the prompt, already through the encoders.

    Attributes:
        latents: ``(N, 4, h, w)`` float32 CPU tensor: VAE latent means times the VAE scaling factor.
        prompt_embeds: ``(1, 77, D)`` float32 CPU tensor: the instance prompt's text-encoder states.
        pooled_prompt_embeds: SDXL only: ``(1, P)`` pooled embedding of the second text encoder.
        add_time_ids: SDXL only: ``(1, 6)`` original size, crop offset and target size.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    @property
    def is_sdxl(self) -> bool:
        """Whether the cache carries SDXL's extra conditioning."""
        return self.pooled_prompt_embeds is not None

    def to_bytes(self) -> bytes:
        """Serialize as safetensors (no pickle, so loading a stored cache cannot run code)."""
        tensors = {"latents": self.latents, "prompt_embeds": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            tensors["pooled_prompt_embeds"] = self.pooled_prompt_embeds
        if self.add_time_ids is not None:
            tensors["add_time_ids"] = self.add_time_ids
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        return safetensors.torch.save(tensors, metadata={"format": _CACHE_FORMAT})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingCache:
        """Read a cache written by :meth:`to_bytes`.

        Raises:
            ValueError: ``data`` is not a safetensors file, or lacks ``latents``/``prompt_embeds``.
        """
        try:
            tensors = safetensors.torch.load(data)
        except Exception as error:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"training cache is not a valid safetensors file: {error}") from error
        missing = {"latents", "prompt_embeds"} - tensors.keys()
        if missing:
            raise ValueError(
                f"training cache lacks {', '.join(sorted(missing))}; it was not written by "
                "TrainingCache.to_bytes — prepare it again with prepare_training_cache"
            )
        return cls(
            latents=tensors["latents"],
            prompt_embeds=tensors["prompt_embeds"],
            pooled_prompt_embeds=tensors.get("pooled_prompt_embeds"),
            add_time_ids=tensors.get("add_time_ids"),
        )


def _images_to_tensor(images: list[PIL.Image.Image], resolution: int) -> torch.Tensor:
    """Square PIL images -> ``(N, 3, res, res)`` float32 in [-1, 1], the VAE's input range."""
    arrays = []
    for index, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"images[{index}] must be a PIL.Image.Image but is {type(image).__name__}")
        if image.width != image.height:
            raise ValueError(
                f"images[{index}] must be square but is {image.width}x{image.height}; crop the "
                "photos around the face before preparing the training cache"
            )
        resized = image.convert("RGB").resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
        arrays.append(np.asarray(resized, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


@torch.no_grad()
def _encode_latents(pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    # The SDXL VAE overflows in float16 (its config says force_upcast); encode in float32 then.
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        chunks = []
        for start in range(0, pixels.shape[0], _VAE_ENCODE_CHUNK):
            chunk = pixels[start : start + _VAE_ENCODE_CHUNK].to(device=vae.device, dtype=vae.dtype)
            # The distribution's mean, not a sample: the cache is made once and must be reproducible.
            mean = vae.encode(chunk).latent_dist.mean
            chunks.append(mean.float().cpu())
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return torch.cat(chunks) * float(vae.config.scaling_factor)


def prepare_training_cache(
    pipe: DiffusionPipeline,
    images: list[PIL.Image.Image],
    prompt: str,
    resolution: int,
    *,
    hflip: bool = False,
) -> TrainingCache:
    """Encode the person's photos and the instance prompt once, for :func:`train_lora`.

    Args:
        pipe: The resident base pipeline (SD1.5-style or SDXL).
        images: The person's photos, already cropped square around the face.
        prompt: The instance prompt, normally :func:`instance_prompt` of the train config.
        resolution: Side in pixels the photos are resized to; must equal the train config's
            ``resolution`` and be divisible by 8.
        hflip: Also cache each photo mirrored, doubling the data. Off by default because faces are
            not symmetric (hair parting, moles) and a mirrored face is a slightly different face.

    Returns:
        The cache: float32 CPU tensors.

    Raises:
        ValueError: ``images`` is empty or holds a non-square or non-image item, ``prompt`` is
            empty, or ``resolution`` is not a positive multiple of 8.
    """
    if not images:
        raise ValueError("`images` must hold at least one photo but is empty")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"`prompt` must be a non-empty string but is {prompt!r}")
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"`resolution` must be a positive multiple of 8 but is {resolution!r}")

    pixels = _images_to_tensor(images, resolution)
    if hflip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    latents = _encode_latents(pipe, pixels)

    device = eager_unet(pipe).device
    with torch.no_grad():
        if is_sdxl(pipe):
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            # (original size, crop top-left, target size): an uncropped photo at full resolution,
            # which is also what generation asks for by default.
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
            return TrainingCache(
                latents=latents.contiguous(),
                prompt_embeds=prompt_embeds.float().cpu().contiguous(),
                pooled_prompt_embeds=pooled.float().cpu().contiguous(),
                add_time_ids=time_ids,
            )
        prompt_embeds, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return TrainingCache(latents=latents.contiguous(), prompt_embeds=prompt_embeds.float().cpu().contiguous())


# --------------------------------------------------------------------------------------------
# Checkpoints and results
# --------------------------------------------------------------------------------------------


@dataclass
class TrainCheckpoint:
    """Training state after ``step`` optimizer steps; enough to continue exactly where it stopped.

    Attributes:
        step: Optimizer steps done.
        lora_state: Trainable LoRA parameters by parameter name, float32 CPU tensors.
        optimizer_state: ``torch.optim.AdamW.state_dict()`` of the run.
        loss: Training loss of the last step done (NaN at step 0).
        config_fingerprint: :meth:`TrainConfig.fingerprint` of the run that wrote it.
        grad_scaler_state: float16 training only: the loss scaler's state; empty otherwise.
    """

    step: int
    lora_state: dict[str, torch.Tensor]
    optimizer_state: dict
    loss: float = float("nan")
    config_fingerprint: str = ""
    grad_scaler_state: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialize with ``torch.save`` (tensors and plain containers only)."""
        buffer = io.BytesIO()
        payload = {"format": _CHECKPOINT_FORMAT}
        payload.update({f.name: getattr(self, f.name) for f in fields(self)})
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainCheckpoint:
        """Read a checkpoint written by :meth:`to_bytes`.

        Loads with ``weights_only=True``, so a tampered file cannot execute code.

        Raises:
            ValueError: ``data`` is not a checkpoint written by :meth:`to_bytes`.
        """
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for corrupt or unsafe files
            raise ValueError(f"not a readable training checkpoint: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"not a training checkpoint of format {_CHECKPOINT_FORMAT!r}")
        missing = [name for name in ("step", "lora_state", "optimizer_state") if name not in payload]
        if missing:
            raise ValueError(f"training checkpoint lacks {', '.join(missing)}; it is truncated or corrupt")
        return cls(**{f.name: payload[f.name] for f in fields(cls) if f.name in payload})


@dataclass
class TrainResult:
    """Outcome of :func:`train_lora`.

    Attributes:
        lora_bytes: A diffusers LoRA safetensors file (what ``save_lora_weights`` writes, keys
            ``unet.<module>.lora_A.weight`` / ``lora_B.weight``), loadable with
            ``pipe.load_lora_weights``.
        steps: Optimizer steps in total, including those before a resume.
        final_loss: Loss of the last step.
        seconds: Wall time of this call.
        resumed_from: Step the run resumed from, 0 for a fresh run.
    """

    lora_bytes: bytes
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int


class TrainingStopped(Exception):
    """``should_stop()`` asked :func:`train_lora` to stop before all steps were done.

    Attributes:
        step: Optimizer steps done when it stopped.
        total_steps: Steps the run was configured for.
        checkpoint: State at ``step``; pass it as ``resume=`` to continue later.
    """

    def __init__(self, step: int, total_steps: int, checkpoint: TrainCheckpoint) -> None:
        super().__init__(f"training stopped on request after {step} of {total_steps} steps")
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint

    def __reduce__(self):
        # Exceptions pickle as cls(*args) with args == (message,) by default; this one must cross
        # process boundaries (worker -> scheduler) with its attributes intact.
        return type(self), (self.step, self.total_steps, self.checkpoint)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one step, independent of every other step, so resume replays exactly."""
    digest = hashlib.sha256(f"headshots-train:{seed}:{step}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _check_train_inputs(pipe: DiffusionPipeline, cache: TrainingCache, config: TrainConfig) -> None:
    unet = eager_unet(pipe)
    if getattr(unet, "peft_config", None):
        raise RuntimeError(
            f"pipe.unet already has LoRA adapters {sorted(unet.peft_config)}; training on top of them "
            "would bake them into this person's LoRA. Call pipe.unload_lora_weights() first"
        )
    from pipeline.generate import has_merged_lora  # generate does not import this module: no cycle

    if has_merged_lora(pipe):
        raise RuntimeError(
            "a LoRA is merged into the pipe's weights (a generation is still running or was not closed); "
            "training on top of it would bake it into this person's LoRA"
        )
    if cache.latents.ndim != 4 or cache.latents.shape[0] == 0:
        raise ValueError(f"cache.latents must have shape (N, C, h, w) with N >= 1 but has {tuple(cache.latents.shape)}")
    if cache.latents.shape[1] != unet.config.in_channels:
        raise ValueError(
            f"cache.latents has {cache.latents.shape[1]} channels but the UNet expects "
            f"{unet.config.in_channels}; prepare the cache with the same base model"
        )
    expected_side = config.resolution // pipe.vae_scale_factor
    if tuple(cache.latents.shape[2:]) != (expected_side, expected_side):
        raise ValueError(
            f"cache.latents are {tuple(cache.latents.shape[2:])} but `resolution` {config.resolution} "
            f"needs {(expected_side, expected_side)}; prepare the cache at the config's resolution"
        )
    if cache.prompt_embeds.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(
            f"cache.prompt_embeds has width {cache.prompt_embeds.shape[-1]} but the UNet expects "
            f"{unet.config.cross_attention_dim}; prepare the cache with the same base model"
        )
    if is_sdxl(pipe) and (cache.pooled_prompt_embeds is None or cache.add_time_ids is None):
        raise ValueError("the pipe is SDXL but the cache has no pooled_prompt_embeds/add_time_ids; "
                         "prepare it with this pipe")


def _check_resume(resume: TrainCheckpoint, config: TrainConfig, trainable: dict[str, torch.nn.Parameter]) -> None:
    if not 0 <= resume.step <= config.steps:
        raise ValueError(f"checkpoint step {resume.step} is outside 0..{config.steps} (`steps` of the config)")
    if resume.config_fingerprint and resume.config_fingerprint != config.fingerprint():
        raise ValueError(
            f"checkpoint was written with {resume.config_fingerprint} but the config has "
            f"{config.fingerprint()}; resume with the same TrainConfig (only `steps` and "
            "`checkpoint_every` may change)"
        )
    if set(resume.lora_state) != set(trainable):
        raise ValueError(
            "checkpoint LoRA parameters do not match this adapter (a different base model or LoRA "
            "target modules?); start a fresh run instead of resuming"
        )


def _autocast_dtype(unet: torch.nn.Module, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for CUDA (None = full precision, as on CPU)."""
    if device.type != "cuda":
        return None
    if unet.dtype in (torch.float16, torch.bfloat16):
        return unet.dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _lora_file_bytes(pipe: DiffusionPipeline, lora_config: LoraConfig, scratch_dir: str | Path | None = None) -> bytes:
    """Write the trained adapter with diffusers' own writer, so the file is the standard format.

    The file is the person's LoRA: it goes to ``scratch_dir`` (the caller's own folder for the
    person, which it wipes) rather than the system's temp folder, where a process killed mid-write
    would leave it for good."""
    state = get_peft_model_state_dict(eager_unet(pipe), adapter_name=TRAIN_ADAPTER_NAME)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in state.items()}
    metadata = lora_config.to_dict()
    with TemporaryDirectory(prefix="headshots-lora-", dir=scratch_dir) as tmp:
        type(pipe).save_lora_weights(
            tmp,
            unet_lora_layers=state,
            unet_lora_adapter_metadata=metadata,
            safe_serialization=True,
            weight_name="lora.safetensors",
        )
        return (Path(tmp) / "lora.safetensors").read_bytes()


def train_lora(
    pipe: DiffusionPipeline,
    cache: TrainingCache,
    config: TrainConfig,
    *,
    resume: TrainCheckpoint | None = None,
    on_checkpoint: Callable[[TrainCheckpoint], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    scratch_dir: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the cached photos, leaving the resident pipe exactly as it was.

    Only the adapter (on the UNet's attention projections :data:`LORA_TARGET_MODULES`) is trained,
    with AdamW at a constant learning rate and the DDPM noise-prediction loss (epsilon or
    v-prediction, as the pipe's scheduler config says). On CUDA the forward pass runs under
    bfloat16/float16 autocast while LoRA weights and optimizer state stay float32.

    Not thread-safe: the caller must not use ``pipe`` elsewhere while this runs. Side effect that
    outlives the call: the base UNet's parameters are left with ``requires_grad=False`` (a resident
    inference model never needs gradients); their values are never changed.

    On a pipe optimised by :func:`pipeline.models.optimize_pipeline`, training runs on the eager
    UNet (a compiled one would recompile for every person's new adapter layers) and, when its
    projections are fused, with the unfused attention processors (the fused ones would bypass the
    adapter on ``to_q/k/v``); the very same processor objects are put back afterwards, so a
    compiled generation graph stays valid. On CUDA the optimizer is the fused AdamW, and the
    loss is read back (and checked for NaN/inf) once per chunk of steps, unless ``on_step`` wants
    it every step.

    Args:
        pipe: The resident base pipeline (SD1.5-style or SDXL) with no LoRA loaded.
        cache: From :func:`prepare_training_cache`, made at ``config.resolution``.
        config: Hyper-parameters.
        resume: A checkpoint of an earlier run with the same config; training continues from its
            step up to ``config.steps`` and ends where an uninterrupted run would.
        on_checkpoint: Called with a :class:`TrainCheckpoint` after every ``config.checkpoint_every``
            steps (not at step 0). Runs synchronously: it should store the bytes and return.
        on_step: Called as ``on_step(steps_done, loss)`` after every step.
        should_stop: Polled before every step; when it returns True, training stops.
        scratch_dir: Where the LoRA file is written on its way to bytes (a folder the caller
            cleans up for this person); None: the system's temp folder.

    Returns:
        The :class:`TrainResult` with the LoRA safetensors bytes.

    Raises:
        TrainingStopped: ``should_stop()`` returned True; its ``checkpoint`` holds the progress.
        ValueError: The cache does not match the pipe or config, or ``resume`` does not match
            the config.
        RuntimeError: The pipe already has a LoRA loaded, or the loss became NaN/inf (lower
            ``learning_rate``).
    """
    started = time.perf_counter()
    _check_train_inputs(pipe, cache, config)
    unet = eager_unet(pipe)
    device = unet.device
    autocast_dtype = _autocast_dtype(unet, device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler `prediction_type` must be 'epsilon' or 'v_prediction' but is {prediction_type!r}"
        )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    lora_config = LoraConfig(
        r=config.rank,
        # alpha == rank keeps the LoRA scale at 1, which is also what loading a file without
        # adapter metadata assumes.
        lora_alpha=config.rank,
        init_lora_weights=True,  # B = 0: the untrained adapter leaves the base model's output unchanged
        target_modules=list(LORA_TARGET_MODULES),
    )
    # Base weights are frozen once and for all; only the adapter created below gets gradients.
    unet.requires_grad_(False)
    adapter_added = False
    fused_processors = None
    if optimizations_of(pipe).fuse_qkv and getattr(unet, "original_attn_processors", None):
        fused_processors = unet.attn_processors
        unet.set_attn_processor(dict(unet.original_attn_processors))
    try:
        # Seed the adapter's initialisation without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet.add_adapter(lora_config, adapter_name=TRAIN_ADAPTER_NAME)
        adapter_added = True
        trainable = {name: param for name, param in unet.named_parameters() if param.requires_grad}
        for param in trainable.values():
            # float32 master weights: the Adam update of a float16/bfloat16 weight rounds to nothing.
            param.data = param.data.float()
        # Fused AdamW: one kernel for all the adapter's small tensors instead of several per tensor.
        optimizer = torch.optim.AdamW(trainable.values(), lr=config.learning_rate, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

        start_step, last_loss = 0, float("nan")
        if resume is not None:
            _check_resume(resume, config, trainable)
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(resume.lora_state[name])
            optimizer.load_state_dict(resume.optimizer_state)
            if resume.grad_scaler_state and scaler.is_enabled():
                scaler.load_state_dict(resume.grad_scaler_state)
            start_step, last_loss = resume.step, resume.loss

        def checkpoint(step: int, loss: float) -> TrainCheckpoint:
            return TrainCheckpoint(
                step=step,
                lora_state={name: param.detach().to("cpu", copy=True) for name, param in trainable.items()},
                optimizer_state=_optimizer_state_to_cpu(optimizer.state_dict()),
                loss=loss,
                config_fingerprint=config.fingerprint(),
                grad_scaler_state=scaler.state_dict() if scaler.is_enabled() else {},
            )

        latents = cache.latents.to(device=device, dtype=torch.float32)
        prompt_embeds = cache.prompt_embeds.to(device=device, dtype=unet.dtype)
        added_cond = None
        if is_sdxl(pipe):
            added_cond = {
                "text_embeds": cache.pooled_prompt_embeds.to(device=device, dtype=unet.dtype),
                "time_ids": cache.add_time_ids.to(device=device, dtype=unet.dtype),
            }

        params = list(trainable.values())
        pending: list[tuple[int, torch.Tensor]] = []  # (step number, loss on the device) not read yet

        def read_losses() -> float:
            """Read the pending losses back (one sync); raise on the first that is not finite."""
            nonlocal pending
            if not pending:
                return last_loss
            values = torch.stack([loss for _, loss in pending]).tolist()
            for (step_number, _), value in zip(pending, values):
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"training loss became {value} at step {step_number}; lower `learning_rate` "
                        f"(now {config.learning_rate:g})"
                    )
            pending = []
            return values[-1]

        for chunk_start in range(start_step, config.steps, _STEP_CHUNK):
            chunk_steps = range(chunk_start, min(chunk_start + _STEP_CHUNK, config.steps))
            inputs = _step_inputs(
                config.seed, chunk_steps, latent_count=latents.shape[0], latent_shape=tuple(latents.shape[1:]),
                batch_size=config.batch_size, num_train_timesteps=num_train_timesteps, device=device,
            )
            for offset, step in enumerate(chunk_steps):
                if should_stop is not None and should_stop():
                    last_loss = read_losses()
                    raise TrainingStopped(step, config.steps, checkpoint(step, last_loss))
                picks, noise, timesteps = (tensor[offset] for tensor in inputs)
                pending.append((step + 1, _train_step(
                    unet=unet,
                    optimizer=optimizer,
                    scaler=scaler,
                    noise_scheduler=noise_scheduler,
                    params=params,
                    clean=latents[picks],
                    noise=noise,
                    timesteps=timesteps,
                    prompt_embeds=prompt_embeds,
                    added_cond=added_cond,
                    prediction_type=prediction_type,
                    autocast_dtype=autocast_dtype,
                    max_grad_norm=config.max_grad_norm,
                )))
                done = step + 1
                at_checkpoint = on_checkpoint is not None and done % config.checkpoint_every == 0
                if on_step is not None or at_checkpoint:
                    last_loss = read_losses()
                if on_step is not None:
                    on_step(done, last_loss)
                if at_checkpoint:
                    on_checkpoint(checkpoint(done, last_loss))
            last_loss = read_losses()

        lora_bytes = _lora_file_bytes(pipe, lora_config, scratch_dir)
    finally:
        if adapter_added or getattr(unet, "peft_config", None):
            # Removes the LoRA wrapper layers and puts the original modules back: the shared
            # resident pipe must be exactly the base model again, whatever happened above.
            unet.unload_lora()
        if fused_processors is not None:
            unet.set_attn_processor(fused_processors)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return TrainResult(
        lora_bytes=lora_bytes,
        steps=config.steps,
        final_loss=last_loss,
        seconds=time.perf_counter() - started,
        resumed_from=resume.step if resume is not None else 0,
    )


def _step_inputs(
    seed: int,
    steps: range,
    *,
    latent_count: int,
    latent_shape: tuple[int, ...],
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image picks, noise and timesteps of several steps, stacked along a new first dimension.

    Each step's values come from its own generator (:func:`_step_generator`), drawn on the CPU in a
    fixed order: identical on every device, whatever the chunking, and on every replay of a step.
    """
    picks, noises, timesteps = [], [], []
    for step in steps:
        generator = _step_generator(seed, step)
        picks.append(torch.randint(0, latent_count, (batch_size,), generator=generator))
        noises.append(torch.randn((batch_size, *latent_shape), generator=generator))
        timesteps.append(torch.randint(0, num_train_timesteps, (batch_size,), generator=generator))
    stacked = (torch.stack(picks), torch.stack(noises), torch.stack(timesteps))
    if device.type != "cuda":
        return stacked
    # Pinned memory makes the copies asynchronous: the GPU is still busy with the previous chunk.
    return tuple(tensor.pin_memory().to(device, non_blocking=True) for tensor in stacked)


def _train_step(
    *,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    noise_scheduler: DDPMScheduler,
    params: list[torch.nn.Parameter],
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None,
    prediction_type: str,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float,
) -> torch.Tensor:
    """One optimizer step of the denoising loss; returns the loss, detached, still on the device."""
    device = clean.device
    batch_size = clean.shape[0]
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)

    batch_cond = None
    if added_cond is not None:
        batch_cond = {key: value.expand(batch_size, -1) for key, value in added_cond.items()}
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        prediction = unet(
            noisy.to(unet.dtype),
            timesteps,
            encoder_hidden_states=prompt_embeds.expand(batch_size, -1, -1),
            added_cond_kwargs=batch_cond,
        ).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float())

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _optimizer_state_to_cpu(state: dict) -> dict:
    """Copy an optimizer state dict with every tensor on the CPU, detached from the live optimizer."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, list):
            return [move(item) for item in value]
        return value

    return move(state)
