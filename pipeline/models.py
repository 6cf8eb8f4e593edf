"""Base diffusion models: pick a device, build or load the pipeline that stays resident on a worker.

Two kinds of base model are supported:

* ``"tiny"`` (:data:`TINY_MODEL`): an SD1.5-shaped pipeline with about a million random weights,
  built from configs in code. It generates 64 px noise in well under a second on a CPU, so tests, CI and
  the demo exercise the whole system without downloading anything.
* a local diffusers folder (one with ``model_index.json``) holding a ``StableDiffusionPipeline``
  (SD1.5-style) or a ``StableDiffusionXLPipeline``. Nothing is ever fetched from a model hub.

The loaded pipeline is meant to stay resident for many people: fine-tuning and generation swap LoRA
adapters in and out of it (see :mod:`pipeline.finetune` and :mod:`pipeline.generate`) and never
reload it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from packaging.version import Version
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"
"""``source`` value for :func:`load_base_pipeline` that builds the tiny random-weight pipeline."""

# Pipeline classes a base-model folder may hold, by the `_class_name` in its model_index.json.
SUPPORTED_PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}

_DEVICE_PREFERENCES = ("auto", "cuda", "cpu")

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns from 0.42 on);
# the project supports releases on both sides of the rename.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"

# CLIP's tokenizer cannot go past the 77 positions its text model has embeddings for.
_TOKENIZER_MAX_LENGTH = 77
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"

# SD1.5's noise schedule: the tiny model uses it too so that fine-tuning and sampling code paths are
# exactly the ones a real SD1.5 checkpoint takes.
_SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


class BaseModelError(ValueError):
    """The base model source is not something :func:`load_base_pipeline` can load."""


def pick_device_and_dtype(prefer: str = "auto") -> tuple[str, torch.dtype]:
    """Choose where the pipeline runs and in which precision.

    bfloat16 is preferred on CUDA because it has float32's range: no loss scaling is needed in
    training and the SDXL VAE does not overflow. GPUs without bfloat16 (pre-Ampere) get float16.
    CPUs get float32, since half-precision convolutions on CPU are slow or unsupported.

    Args:
        prefer: ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` or ``"cpu"``.

    Returns:
        ``(device, dtype)``, e.g. ``("cuda", torch.bfloat16)`` or ``("cpu", torch.float32)``.

    Raises:
        ValueError: ``prefer`` is not one of the allowed values, or ``"cuda"`` was asked for on a
            machine where torch sees no CUDA device.
    """
    if prefer not in _DEVICE_PREFERENCES:
        raise ValueError(f"`prefer` must be one of {', '.join(_DEVICE_PREFERENCES)} but is {prefer!r}")
    if prefer == "cpu":
        return "cpu", torch.float32
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    if prefer == "cuda":
        raise ValueError(
            "`prefer` is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "check CUDA_VISIBLE_DEVICES and that a CUDA build of torch is installed, or use 'auto'/'cpu'"
        )
    return "cpu", torch.float32


def _write_char_level_vocab(directory: Path) -> tuple[Path, Path]:
    """Write a character-level CLIP BPE vocabulary so any ASCII prompt tokenizes without merges.

    Every printable ASCII character appears twice: bare (inside a word) and with CLIP's
    end-of-word suffix ``</w>`` (last character of a word). With no merges, each word becomes one
    token per character, which is all a random-weight text encoder needs.
    """
    printable = [chr(code) for code in range(33, 127)]  # space separates words, so it is not a token
    tokens = printable + [char + "</w>" for char in printable] + [_BOS_TOKEN, _EOS_TOKEN]
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def _build_tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="headshots-tiny-tokenizer-") as tmp:
        vocab_file, merges_file = _write_char_level_vocab(Path(tmp))
        # Positional: transformers 4.x names these vocab_file/merges_file, 5.x vocab/merges. The
        # tokenizer reads both files in its constructor, so the directory may go afterwards.
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=_TOKENIZER_MAX_LENGTH,
            bos_token=_BOS_TOKEN,
            eos_token=_EOS_TOKEN,
            pad_token=_EOS_TOKEN,
            unk_token=_EOS_TOKEN,
        )


def _tiny_vae() -> AutoencoderKL:
    """The KL VAE both tiny pipelines share: scale factor 2, so 32 latent px make 64 px images."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=64,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build an SD1.5-shaped Stable Diffusion pipeline with tiny random weights.

    Same architecture families and code paths as SD1.5 (cross-attention UNet, KL VAE, CLIP text
    encoder and tokenizer, DPM-Solver++ sampler, SD1.5 noise schedule), but with channel counts
    small enough that 4 images of 64 px take well under a second on a CPU. Images are noise: the
    model is for exercising the system, not for looking at.

    Args:
        seed: Seed for the random weights. The same seed gives bit-identical weights; the global
            torch RNG is left untouched.

    Returns:
        A float32 CPU pipeline with native resolution 64 px, ``safety_checker=None`` and
        ``requires_safety_checker=False``.
    """
    tokenizer = _build_tiny_tokenizer()
    # fork_rng: seeding here must not change the random stream of whoever called us.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            # 32 latent px x VAE scale factor 2 = 64 px native resolution.
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=_TOKENIZER_MAX_LENGTH,
                # The pooled output is read at the EOS position, so these must match the tokenizer.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DPMSolverMultistepScheduler(**_SD15_SCHEDULE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded_on(device: str | torch.device, seed: int):
    """Context: build modules directly on ``device`` from a seeded RNG, the caller's RNG untouched."""
    import contextlib

    device = torch.device(device)
    stack = contextlib.ExitStack()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
    torch.manual_seed(seed)
    stack.enter_context(device)
    return stack


def build_random_sd15_pipeline(seed: int = 0, *, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """Build a pipeline with SD1.5's real architecture (860M-param UNet, 512 px) and random weights.

    Throughput does not depend on weight values, so benchmarks use this where no real checkpoint can
    be downloaded. The tokenizer is the character-level one of the tiny model (prompts tokenize; the
    vocabulary is not CLIP's, which only matters for image content).

    Args:
        seed: Seed for the random weights; the global torch RNG is left untouched.
        device: Where the weights are created (``"cuda"`` skips a slow CPU initialisation).

    Returns:
        A float32 pipeline on ``device``; move it with ``.to(device, dtype)``.
    """
    tokenizer = _build_tiny_tokenizer()
    with _seeded_on(device, seed):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                vocab_size=49408,
                max_position_embeddings=_TOKENIZER_MAX_LENGTH,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_SD15_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_random_sdxl_pipeline(seed: int = 0, *, device: str | torch.device = "cpu") -> StableDiffusionXLPipeline:
    """Build a pipeline with SDXL's real architecture (2.6B-param UNet, 1024 px) and random weights.

    Same purpose and tokenizer as :func:`build_random_sd15_pipeline`: UNet with text-time
    conditioning, a CLIP ViT-L text encoder and a ViT-bigG one with projection, the KL VAE.

    Args:
        seed: Seed for the random weights; the global torch RNG is left untouched.
        device: Where the weights are created (``"cuda"`` skips a slow CPU initialisation).

    Returns:
        A float32 pipeline on ``device`` without watermarker; move it with ``.to(device, dtype)``.
    """
    tokenizer = _build_tiny_tokenizer()
    tokenizer_2 = _build_tiny_tokenizer()
    special = dict(
        vocab_size=49408,
        max_position_embeddings=_TOKENIZER_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded_on(device, seed):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            # 6 time ids x 256 + the 1280-wide pooled embedding of the second text encoder.
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           hidden_act="quick_gelu", **special)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           hidden_act="gelu", projection_dim=1280, **special)
        )
    return _sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)


def _sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet) -> StableDiffusionXLPipeline:
    """Assemble built SDXL components with the schedule every built model uses (no watermarker: the
    random-weight models are for tests and benchmarks)."""
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=DPMSolverMultistepScheduler(**_SD15_SCHEDULE),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build an SDXL-shaped pipeline with tiny random weights, to test the SDXL code paths on a CPU.

    Like SDXL it has two CLIP text encoders (the second with a projection whose pooled output joins
    the time ids as extra UNet conditioning) and a ``text_time`` UNet; like
    :func:`build_tiny_pipeline` it is small enough for CPU tests and its native resolution is 64 px.

    Args:
        seed: Seed for the random weights; the global torch RNG is left untouched.

    Returns:
        A float32 CPU ``StableDiffusionXLPipeline`` without watermarker.
    """
    tokenizer = _build_tiny_tokenizer()
    tokenizer_2 = _build_tiny_tokenizer()
    text_time_embed_dim = 8
    projection_dim = 32
    text_config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=_TOKENIZER_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=text_time_embed_dim,
            # 6 time ids (original size, crop offset, target size) + the pooled text embedding.
            projection_class_embeddings_input_dim=6 * text_time_embed_dim + projection_dim,
            # SDXL concatenates the hidden states of both text encoders.
            cross_attention_dim=2 * text_config["hidden_size"],
            norm_num_groups=8,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    return _sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)


def save_tiny_model(path: str | Path, seed: int = 0, *, sdxl: bool = False) -> Path:
    """Save the tiny pipeline as a diffusers folder, to exercise the local-folder loading path.

    Args:
        path: Folder to write (created if missing; existing model files are overwritten).
        seed: Weight seed, as for :func:`build_tiny_pipeline`.
        sdxl: Save :func:`build_tiny_sdxl_pipeline` instead of the SD1.5-shaped one.

    Returns:
        The folder, as a :class:`~pathlib.Path`; pass it to :func:`load_base_pipeline`.
    """
    folder = Path(path)
    pipe = build_tiny_sdxl_pipeline(seed=seed) if sdxl else build_tiny_pipeline(seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _pipeline_class_for(folder: Path) -> type[DiffusionPipeline]:
    """Read ``model_index.json`` and return the pipeline class it names, or raise BaseModelError."""
    expected = (
        f"expected a diffusers folder containing model_index.json "
        f"(a {' or '.join(SUPPORTED_PIPELINE_CLASSES)}), or {TINY_MODEL!r} for the tiny test model"
    )
    if not folder.exists():
        raise BaseModelError(f"base model {str(folder)!r} does not exist; {expected}")
    if folder.is_file():
        raise BaseModelError(
            f"base model {str(folder)!r} is a file; {expected}. A single-file checkpoint can be "
            "converted once with StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise BaseModelError(f"base model folder {str(folder)!r} has no model_index.json; {expected}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BaseModelError(f"cannot read {str(index_file)!r} as JSON ({error}); {expected}") from error
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in SUPPORTED_PIPELINE_CLASSES:
        raise BaseModelError(
            f"{str(index_file)!r} has `_class_name` {class_name!r}; supported pipelines are "
            f"{', '.join(SUPPORTED_PIPELINE_CLASSES)}"
        )
    return SUPPORTED_PIPELINE_CLASSES[class_name]


def _set_attention_backend(pipe: DiffusionPipeline, device: str) -> None:
    """Use xformers on CUDA when it is installed; otherwise keep torch's SDPA (diffusers' default).

    xformers is never used on CPU: its kernels raise NotImplementedError there.
    """
    if not device.startswith("cuda"):
        return
    if importlib.util.find_spec("xformers") is None:
        logger.info("xformers is not installed; using torch SDPA attention (pip install 'headshots[gpu]')")
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as error:  # noqa: BLE001 - any xformers/CUDA mismatch must fall back, not fail
        logger.warning("xformers is installed but unusable (%s); using torch SDPA attention", error)
        # Undo a partial switch: disabling xformers puts torch's SDPA processor on every layer.
        pipe.disable_xformers_memory_efficient_attention()


def load_base_pipeline(
    source: str,
    *,
    device: str,
    dtype: torch.dtype,
    variant: str | None = None,
    optimize: bool = True,
    compile_mode: str | None = None,
) -> DiffusionPipeline:
    """Load the base model that stays resident on a worker.

    Args:
        source: :data:`TINY_MODEL` (``"tiny"``) or the path of a local diffusers folder whose
            ``model_index.json`` names a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        device: torch device string, e.g. ``"cuda"``, ``"cuda:1"`` or ``"cpu"``
            (see :func:`pick_device_and_dtype`).
        dtype: Weight dtype, e.g. ``torch.bfloat16`` on CUDA, ``torch.float32`` on CPU.
        variant: Weight-file variant to load from the folder (e.g. ``"fp16"`` for
            ``diffusion_pytorch_model.fp16.safetensors``); ``None`` loads the plain files.
        optimize: Apply :func:`optimize_pipeline` with its defaults: channels-last and fused QKV
            on CUDA, nothing on the CPU. Compilation is opt-in (``compile_mode``).
        compile_mode: ``torch.compile`` mode for the UNet (e.g. ``"default"``,
            ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``), CUDA only; ``None`` compiles
            nothing. Each new batch shape costs one compilation (tens of seconds for SD1.5).

    Returns:
        The pipeline on ``device`` in ``dtype``, progress bars disabled, safety checker off
        (SD1.5), xformers attention when installed and on CUDA, and on CUDA the layout
        optimisations of :func:`optimize_pipeline`.

    Raises:
        BaseModelError: ``source`` is missing, is not a diffusers folder, names an unsupported
            pipeline class, or its files cannot be loaded.
    """
    if source == TINY_MODEL:
        pipe: DiffusionPipeline = build_tiny_pipeline(seed=0)
        pipe.to(dtype=dtype)
    else:
        folder = Path(source).expanduser()
        pipeline_class = _pipeline_class_for(folder)
        kwargs: dict = {_DTYPE_KWARG: dtype, "local_files_only": True, "variant": variant}
        if pipeline_class is StableDiffusionPipeline:
            # Headshots of consenting users: the NSFW classifier would only cost memory and time.
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        try:
            pipe = pipeline_class.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as error:
            raise BaseModelError(
                f"cannot load {pipeline_class.__name__} from {str(folder)!r}: {error}. The folder must "
                "hold every component listed in model_index.json (weights as safetensors"
                + (f", variant {variant!r}" if variant else "; pass variant='fp16' for fp16-only folders")
                + ")"
            ) from error

    # Folder models are already in `dtype`: casting again after loading would skip diffusers'
    # keep-in-float32 module handling.
    pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)
    _set_attention_backend(pipe, device)
    if optimize:
        optimize_pipeline(pipe, compile_mode=compile_mode)
    elif compile_mode is not None:
        raise ValueError("`compile_mode` needs `optimize=True`")
    return pipe


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The image side length, in pixels, the pipeline's UNet was built for.

    Args:
        pipe: A Stable Diffusion (1.5 or XL) pipeline.

    Returns:
        ``unet.config.sample_size * vae_scale_factor``: 64 for the tiny model, 512 for SD1.5,
        1024 for SDXL.
    """
    sample_size = pipe.unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):  # some configs store (height, width)
        sample_size = sample_size[0]
    return int(sample_size) * int(pipe.vae_scale_factor)


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline is SDXL-shaped (two text encoders, pooled + time-id conditioning)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


# --------------------------------------------------------------------------------------------
# Throughput optimisations of a resident pipeline
# --------------------------------------------------------------------------------------------

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes :func:`optimize_pipeline` accepts."""

_OPTIMIZATIONS_ATTR = "_headshots_optimizations"


@dataclass(frozen=True)
class PipelineOptimizations:
    """What :func:`optimize_pipeline` did to a pipeline (read back with :func:`optimizations_of`).

    Attributes:
        channels_last: UNet and VAE weights are in NHWC memory format.
        fuse_qkv: The attention projections of UNet and VAE are fused (one ``to_qkv`` matmul in
            self-attention, one ``to_kv`` in cross-attention). LoRA adapters on ``to_q/to_k/to_v``
            are then bypassed by the fused processor, so generation merges a person's LoRA into the
            weights (``lora_mode="merge"`` in :mod:`pipeline.generate`) and fine-tuning switches the
            unfused processors back while it trains.
        compile_mode: ``torch.compile`` mode of the UNet, or ``None`` when it is not compiled.
    """

    channels_last: bool = False
    fuse_qkv: bool = False
    compile_mode: str | None = None

    @property
    def needs_merged_lora(self) -> bool:
        """Whether a LoRA must be merged into the weights rather than loaded as PEFT layers.

        Fused projections bypass PEFT layers on ``to_q/k/v``; a compiled UNet would recompile
        every time PEFT layers are added or removed (a new module structure).
        """
        return self.fuse_qkv or self.compile_mode is not None


def optimizations_of(pipe: DiffusionPipeline) -> PipelineOptimizations:
    """The optimisations applied to ``pipe`` by :func:`optimize_pipeline` (none for a plain pipe)."""
    return getattr(pipe, _OPTIMIZATIONS_ATTR, None) or PipelineOptimizations()


def eager_unet(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's UNet module itself, not its ``torch.compile`` wrapper.

    Training adds and removes PEFT layers per person; running it through the compiled wrapper would
    recompile on every person. The eager module shares its parameters with the compiled one.
    """
    return getattr(pipe.unet, "_orig_mod", pipe.unet)


def _pipeline_device(pipe: DiffusionPipeline) -> torch.device:
    return next(eager_unet(pipe).parameters()).device


def optimize_pipeline(
    pipe: DiffusionPipeline,
    *,
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
    compile_mode: str | None = None,
) -> PipelineOptimizations:
    """Make a resident pipeline faster without changing what it computes beyond float rounding.

    Call once, after the pipeline is on its device and before any LoRA is loaded. Switches left at
    ``None`` are on when the pipeline is on CUDA and off on the CPU (where NHWC and fused matmuls
    gain nothing and the CPU test path stays the plain diffusers one).

    Args:
        pipe: A Stable Diffusion (1.5 or XL) pipeline without LoRA adapters.
        channels_last: Put UNet and VAE weights in NHWC memory format (faster convolutions on tensor
            cores).
        fuse_qkv: Fuse the query/key/value projections of every attention layer in UNet and VAE.
        compile_mode: Compile the UNet with ``torch.compile(mode=compile_mode)``, one of
            :data:`COMPILE_MODES`; ``None`` leaves it eager. CUDA only.

    Returns:
        What was applied; also kept on the pipe for :func:`optimizations_of`.

    Raises:
        ValueError: ``compile_mode`` is unknown or asked for on a CPU pipeline, or the pipeline was
            optimised already.
        RuntimeError: The UNet has LoRA adapters loaded.
    """
    if getattr(pipe, _OPTIMIZATIONS_ATTR, None) is not None:
        raise ValueError(f"pipeline is already optimised ({optimizations_of(pipe)}); optimise a pipeline once")
    if getattr(eager_unet(pipe), "peft_config", None):
        raise RuntimeError("optimise the pipeline before any LoRA is loaded (pipe.unload_lora_weights() first)")
    on_cuda = _pipeline_device(pipe).type == "cuda"
    channels_last = on_cuda if channels_last is None else bool(channels_last)
    fuse_qkv = on_cuda if fuse_qkv is None else bool(fuse_qkv)
    if compile_mode is not None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"`compile_mode` must be None or one of {', '.join(COMPILE_MODES)} but is {compile_mode!r}")
        if not on_cuda:
            raise ValueError(
                f"`compile_mode` {compile_mode!r} needs a CUDA pipeline; on the CPU leave it None (eager)"
            )

    if fuse_qkv:
        # Fuses UNet and VAE attention and installs diffusers' fused SDPA processor (this replaces
        # xformers processors: the fused matmul matters more than the attention kernel here).
        pipe.fuse_qkv_projections(unet=True, vae=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        # Not fullgraph: a graph break (a diffusers or torch upgrade) must cost speed, not the
        # worker; bench/gpu.py reports graph breaks. dynamic=None lets the first batch shape compile
        # static and a second one compile a batch-dynamic graph, so a person's last, smaller batch
        # costs one recompilation per process, not one per person.
        pipe.unet = torch.compile(pipe.unet, mode=None if compile_mode == "default" else compile_mode)
    applied = PipelineOptimizations(channels_last=channels_last, fuse_qkv=fuse_qkv, compile_mode=compile_mode)
    setattr(pipe, _OPTIMIZATIONS_ATTR, applied)
    return applied
