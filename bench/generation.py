"""Benchmark: the pipeline's generation path against a plain diffusers loop, same model, same run.

    python bench/generation.py --model tiny            # CPU smoke run (CI-sized)
    python bench/generation.py --model sd15 --out DIR  # SD1.5 architecture, random weights, 512 px, 25 steps

Baseline: one ``pipe(prompt, ...)`` call per image at batch 1 (what a plain diffusers script does).
Pipeline path: :func:`pipeline.generate.generate_headshots`, the function the GPU workers call — a
person's LoRA swapped into the resident pipe, images batched per style. Also measured: LoRA swap
(load + unload) against reloading the pipeline from disk. Needs only torch, diffusers, transformers,
peft, pillow, pyyaml (it runs on the GPU machine, which has no Ray or S3 server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import finetune, generate, models  # noqa: E402

PROMPT = "professional corporate headshot of ohwx person, grey backdrop"
NEGATIVE = "blurry, deformed"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        function()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--images", type=int, default=0, help="images per measurement (default: 8 tiny, 16 sd15)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default: 4 tiny, 25 sd15)")
    parser.add_argument("--batch-size", type=int, default=0, help="pipeline path batch (default: 4 tiny, 8 sd15)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="folder for generation.json")
    args = parser.parse_args()

    device, dtype = models.pick_device_and_dtype()
    if args.model == "tiny":
        pipe, images, steps, batch = models.build_tiny_pipeline(), args.images or 8, args.steps or 4, args.batch_size or 4
    else:
        pipe, images, steps, batch = models.build_random_sd15_pipeline(), args.images or 16, args.steps or 25, args.batch_size or 8
    torch.set_grad_enabled(False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    size = models.native_resolution(pipe)
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype), "torch": torch.__version__, "size_px": size, "steps": steps,
              "images": images, "batch_size": batch, "repeats": args.repeats}

    # A LoRA to swap in, trained for a couple of steps on a grey image (its values do not matter).
    torch.set_grad_enabled(True)
    config = finetune.TrainConfig(steps=2, rank=16, resolution=size, checkpoint_every=100)
    cache = finetune.prepare_training_cache(pipe, [Image.new("RGB", (size, size), (128, 128, 128))],
                                            finetune.instance_prompt(config), size)
    lora_bytes = finetune.train_lora(pipe, cache, config).lora_bytes
    torch.set_grad_enabled(False)

    def baseline() -> None:
        for index in range(images):
            pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                 height=size, width=size, generator=torch.Generator(device).manual_seed(index), output_type="pil")

    style = generate.StylePreset(name="bench", prompt="professional corporate headshot of {subject}, grey backdrop",
                                 negative_prompt=NEGATIVE, guidance_scale=7.0, steps=steps, width=size, height=size)

    def pipeline_path() -> None:
        for _ in generate.generate_headshots(pipe, lora_bytes, subject="ohwx person", styles=[style],
                                             images_per_style=images, person_id="bench", batch_size=batch,
                                             size_override=size):
            pass

    baseline()  # warm-up: kernels, allocator
    pipeline_path()
    baseline_s = timed(baseline, device, args.repeats)
    pipeline_s = timed(pipeline_path, device, args.repeats)
    result["baseline_img_per_s"] = round(images / statistics.median(baseline_s), 3)
    result["pipeline_img_per_s"] = round(images / statistics.median(pipeline_s), 3)
    result["ratio"] = round(result["pipeline_img_per_s"] / result["baseline_img_per_s"], 2)

    from safetensors.torch import load as load_safetensors

    lora_state = load_safetensors(lora_bytes)

    def lora_swap() -> None:
        pipe.load_lora_weights(lora_state, adapter_name="swap")
        pipe.unload_lora_weights()

    result["lora_swap_s"] = round(statistics.median(timed(lora_swap, device, args.repeats)), 4)
    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(folder, safe_serialization=True)

        def reload() -> None:
            models.load_base_pipeline(folder, device=device, dtype=dtype)

        result["pipeline_reload_s"] = round(statistics.median(timed(reload, device, min(args.repeats, 2))), 4)
    if device == "cuda":
        result["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)

    print(f"{result['model']} on {result['device']} ({result['dtype']}), {size} px, {steps} steps, {images} images")
    print(f"  plain diffusers loop, batch 1 : {result['baseline_img_per_s']:>8} img/s")
    print(f"  pipeline path, batch {batch:<2}       : {result['pipeline_img_per_s']:>8} img/s  "
          f"(x{result['ratio']} vs baseline)")
    print(f"  LoRA swap {result['lora_swap_s']} s vs pipeline reload {result['pipeline_reload_s']} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "generation.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
