"""GPU throughput: plain diffusers against the pipeline's own code paths, same model, same run.

    python bench/gpu.py --model tiny --device cpu --repeats 1     # CPU dry run (CI-sized, ~20 s)
    python bench/gpu.py --model sd15 --device cuda --out DIR      # SD1.5 architecture, 512 px, 25 steps
    python bench/gpu.py --model sdxl --device cuda --out DIR      # SDXL architecture, 1024 px

Baseline (a plain diffusers script): ``pipe(prompt, num_inference_steps, guidance_scale=7.5)`` at batch
1 and at ``--baseline-batch``; a plain PEFT LoRA training loop (rank 16, batch 1, AdamW, autocast).
Pipeline path (what the GPU workers call): :func:`pipeline.models.optimize_pipeline` (fused QKV,
channels-last, ``torch.compile`` on CUDA), :func:`pipeline.finetune.train_lora` and one person's
:func:`pipeline.generate.generate_headshots` (LoRA merged, styles batched together), optionally
``--train-procs`` persons fine-tuning at once in separate processes (``workers.slots_per_gpu``).

Random weights with the real architectures (throughput does not depend on weight values). Needs
only torch, diffusers, transformers, peft, safetensors, pillow, numpy, pyyaml: no Ray, no S3
server; the system's CPU-side cost per person (``--cpu-overhead-s``) is measured elsewhere and added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import finetune, generate, models  # noqa: E402

PERSON_STEPS = 800
PERSON_IMAGES = 40
# CPU-side cost per person on a GPU worker's critical path, from bench/RESULTS.md (2-core VM):
# 2 stage dispatches x 10.5 ms (median stage-end -> next-stage-start, "GPU pool on Ray") + 40 output
# checks x 0.159 s (`score_output`, "Identity gate"), which the worker runs between batches today.
DEFAULT_CPU_OVERHEAD_S = round(2 * 0.0105 + PERSON_IMAGES * 0.159, 3)
PROMPT = "professional corporate headshot of ohwx person, grey backdrop"
NEGATIVE = "blurry, deformed"
SUBJECT = "ohwx person"
PERSON = "bench-person"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="",
                        help="default: the workers' choice (bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default 25; tiny 4)")
    parser.add_argument("--images", type=int, default=0, help="images of the person (default 40; tiny 8)")
    parser.add_argument("--styles", type=int, default=2, help="styles the person's images are spread over")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="pipeline path batch (default 20 = images/styles; tiny 4). Pick a divisor of "
                             "--images: every other shape costs a compilation")
    parser.add_argument("--baseline-batch", type=int, default=0, help="batched baseline (default 16; tiny 4)")
    parser.add_argument("--baseline-b1-images", type=int, default=0, help="images at batch 1 (default 4; tiny 2)")
    parser.add_argument("--train-steps", type=int, default=0, help="timed training steps (default 60; tiny 6)")
    parser.add_argument("--train-procs", type=int, default=0,
                        help="also time this many persons fine-tuning at once, one process each (0: skip)")
    parser.add_argument("--compile-mode", default="auto",
                        help="torch.compile mode of the UNet on the pipeline path; 'none' for eager; "
                             "auto: 'default' on CUDA, none on CPU")
    parser.add_argument("--quality-images", type=int, default=4, help="images compared plain vs optimised")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: 1 with --device cpu, so shared 2-core machines do not "
                             "oversubscribe; torch's default on CUDA)")
    parser.add_argument("--cpu-overhead-s", type=float, default=DEFAULT_CPU_OVERHEAD_S,
                        help=f"CPU-side seconds per person added to persons/GPU-hour (default "
                             f"{DEFAULT_CPU_OVERHEAD_S}: see DEFAULT_CPU_OVERHEAD_S)")
    parser.add_argument("--out", default="", help="folder for gpu.json")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    args.steps = args.steps or (4 if tiny else 25)
    args.images = args.images or (8 if tiny else PERSON_IMAGES)
    args.batch_size = args.batch_size or (4 if tiny else max(1, args.images // max(1, args.styles)))
    args.baseline_batch = args.baseline_batch or (4 if tiny else 16)
    args.baseline_b1_images = args.baseline_b1_images or (2 if tiny else 4)
    args.train_steps = max(2, args.train_steps or (6 if tiny else 60))
    if args.compile_mode == "auto":
        args.compile_mode = "default" if args.device == "cuda" else "none"
    if args.images % args.styles:
        parser.error(f"--images ({args.images}) must be divisible by --styles ({args.styles})")
    return args


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int = 1) -> float:
    """Median wall seconds of ``function()`` over ``repeats`` runs, the device synchronised."""
    seconds = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        function()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None


def build(model: str, device: str, dtype: torch.dtype):
    if model == "tiny":
        pipe = models.build_tiny_pipeline(seed=0)
    elif model == "sd15":
        pipe = models.build_random_sd15_pipeline(seed=0, device=device)
    else:
        pipe = models.build_random_sdxl_pipeline(seed=0, device=device)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(a: list[Image.Image], b: list[Image.Image]) -> dict:
    """Max absolute pixel difference (0-255 levels) and PSNR (dB) over image pairs."""
    x = np.stack([np.asarray(image, dtype=np.float64) for image in a])
    y = np.stack([np.asarray(image, dtype=np.float64) for image in b])
    mse = float(np.mean((x - y) ** 2))
    return {"images": len(a), "max_abs_diff": int(np.abs(x - y).max()),
            "psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else float("inf")}


def styles_for(args, size: int) -> list[generate.StylePreset]:
    return [generate.StylePreset(name=f"bench-{index}", prompt=f"style {index} headshot of {{subject}}, grey backdrop",
                                 negative_prompt=NEGATIVE if index % 2 == 0 else "", guidance_scale=7.5,
                                 steps=args.steps, width=size, height=size)
            for index in range(args.styles)]


def train_cache(pipe, size: int) -> finetune.TrainingCache:
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
    return finetune.prepare_training_cache(pipe, photos, finetune.instance_prompt(finetune.TrainConfig()), size)


def baseline_train_steps_per_s(pipe, device: str, size: int, steps: int) -> float:
    """A plain PEFT LoRA loop (as the GPU baseline probe): rank 16, batch 1, inputs already on the device."""
    from peft import LoraConfig

    unet = models.eager_unet(pipe)
    dtype = unet.dtype
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(finetune.LORA_TARGET_MODULES)),
                     adapter_name="bench_baseline")
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        side = size // pipe.vae_scale_factor
        x = torch.randn(1, 4, side, side, device=device)
        width = unet.config.cross_attention_dim
        c = torch.randn(1, 77, width, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (1,), device=device)
        added = None
        if models.is_sdxl(pipe):
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
                     "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)}
        autocast = device == "cuda" and dtype != torch.float32

        def step():
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                out = unet(x.to(dtype), t, c, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(out.float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        return steps / timed(lambda: [step() for _ in range(steps)], device)
    finally:
        unet.unload_lora()
        unet.requires_grad_(False)


def _train_worker(rank: int, model: str, device: str, dtype_name: str, steps: int, barrier, results) -> None:
    """One fine-tuning person in its own process (what ``workers.slots_per_gpu`` > 1 runs)."""
    if device == "cpu":
        torch.set_num_threads(1)
    pipe = build(model, device, getattr(torch, dtype_name))
    size = models.native_resolution(pipe)
    cache = train_cache(pipe, size)
    config = finetune.TrainConfig(steps=steps, resolution=size, checkpoint_every=100_000, seed=rank)
    finetune.train_lora(pipe, cache, finetune.TrainConfig(steps=2, resolution=size, checkpoint_every=100_000))
    barrier.wait()
    started = time.perf_counter()
    finetune.train_lora(pipe, cache, config)
    sync(device)
    results.put((rank, time.perf_counter() - started, torch.cuda.max_memory_allocated() if device == "cuda" else 0))


def concurrent_training(args, dtype: torch.dtype) -> dict:
    """``--train-procs`` persons fine-tuning at once, one process each, started together."""
    import multiprocessing as mp

    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, results = context.Barrier(args.train_procs), context.Queue()
    dtype_name = str(dtype).removeprefix("torch.")
    procs = [context.Process(target=_train_worker, args=(rank, args.model, args.device, dtype_name,
                                                         args.train_steps, barrier, results))
             for rank in range(args.train_procs)]
    for proc in procs:
        proc.start()
    try:
        finished = [results.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    wall = max(seconds for _, seconds, _ in finished)
    peak = max(peak for _, _, peak in finished)
    return {"procs": args.train_procs, "person_steps_per_s": round(args.train_steps * len(finished) / wall, 3),
            "peak_gb": round(peak / 1e9, 2) if args.device == "cuda" else None}


def persons_per_hour(train_steps_per_s: float, img_per_s: float, fixed_s: float, cpu_s: float) -> tuple[float, float]:
    gpu_s = PERSON_STEPS / train_steps_per_s + PERSON_IMAGES / img_per_s + fixed_s
    return round(3600 / gpu_s, 1), round(3600 / (gpu_s + cpu_s), 1)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) or \
        models.pick_device_and_dtype(device)[1]
    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    started = time.perf_counter()
    pipe = build(args.model, device, dtype)
    size = models.native_resolution(pipe)
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__, "size_px": size, "steps": args.steps,
              "images": args.images, "styles": args.styles, "batch_size": args.batch_size,
              "baseline_batch": args.baseline_batch, "compile_mode": compile_mode, "repeats": args.repeats,
              "cpu_overhead_s": args.cpu_overhead_s, "build_s": round(time.perf_counter() - started, 1)}
    rows = result["rows"] = {}
    print(f"built {args.model} ({size} px, {dtype}) on {result['device']} in {result['build_s']} s", flush=True)

    # --- baseline: plain diffusers ------------------------------------------------------------
    def plain(batch: int, seed: int = 0):
        return pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=args.steps,
                    guidance_scale=7.5, height=size, width=size, output_type="pil",
                    generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]).images

    with torch.no_grad():
        plain(1)  # warm-up: kernels, allocator
        reset_peak(device)
        seconds = timed(lambda: [plain(1, i) for i in range(args.baseline_b1_images)], device, args.repeats)
        rows["baseline_b1"] = {"img_per_s": round(args.baseline_b1_images / seconds, 3), "peak_gb": peak_gb(device)}
        reset_peak(device)
        plain(args.baseline_batch)
        seconds = timed(lambda: plain(args.baseline_batch), device, args.repeats)
        rows["baseline_batched"] = {"img_per_s": round(args.baseline_batch / seconds, 3), "peak_gb": peak_gb(device)}
    print(f"baseline generation: {rows['baseline_b1']['img_per_s']} img/s at batch 1, "
          f"{rows['baseline_batched']['img_per_s']} at batch {args.baseline_batch}", flush=True)

    reset_peak(device)
    rows["baseline_train"] = {"steps_per_s": round(baseline_train_steps_per_s(pipe, device, size, args.train_steps), 3),
                              "peak_gb": peak_gb(device)}
    print(f"baseline LoRA training: {rows['baseline_train']['steps_per_s']} steps/s", flush=True)

    # A LoRA with a visible effect for generation and the quality guard (lr 1e-2: 2 steps suffice).
    cache = train_cache(pipe, size)
    lora = finetune.train_lora(pipe, cache, finetune.TrainConfig(steps=2, learning_rate=1e-2, resolution=size,
                                                                 checkpoint_every=100_000)).lora_bytes
    styles = styles_for(args, size)
    per_style = args.images // args.styles
    order = [(style.name, index) for style in styles for index in range(per_style)]
    compared = order[: args.quality_images]
    others = frozenset(order[args.quality_images:])

    def person(pipe_, batch_size: int, skip=frozenset(), lora_mode: str = "auto") -> dict:
        return {(image.style, image.index): image.image for image in generate.generate_headshots(
            pipe_, lora, subject=SUBJECT, styles=styles, images_per_style=per_style, person_id=PERSON,
            batch_size=batch_size, skip=skip, lora_mode=lora_mode)}

    with torch.no_grad():
        reference = person(pipe, 1, skip=others, lora_mode="peft")
        batched_plain = person(pipe, args.batch_size, skip=others, lora_mode="peft")
    lora_state = generate._lora_state_from_bytes(lora)
    result["peft_swap_s"] = round(timed(lambda: (pipe.load_lora_weights(lora_state, adapter_name="swap"),
                                                 pipe.unload_lora_weights()), device, 3), 4)

    # --- the pipeline's code paths on the optimised pipe ------------------------------------------
    applied = models.optimize_pipeline(pipe, channels_last=True, fuse_qkv=True, compile_mode=compile_mode)
    result["optimizations"] = {"channels_last": applied.channels_last, "fuse_qkv": applied.fuse_qkv,
                               "compile_mode": applied.compile_mode}
    reset_peak(device)
    one = timed(lambda: finetune.train_lora(pipe, cache, finetune.TrainConfig(steps=1, resolution=size,
                                                                              checkpoint_every=100_000)), device)
    many = timed(lambda: finetune.train_lora(pipe, cache, finetune.TrainConfig(
        steps=args.train_steps, resolution=size, checkpoint_every=100_000)), device, args.repeats)
    per_step = max((many - one) / (args.train_steps - 1), 1e-9)
    rows["pipeline_train"] = {"steps_per_s": round(1 / per_step, 3), "fixed_s": round(max(one - per_step, 0.0), 3),
                              "peak_gb": peak_gb(device)}
    print(f"pipeline train_lora: {rows['pipeline_train']['steps_per_s']} steps/s, "
          f"{rows['pipeline_train']['fixed_s']} s per person besides the steps", flush=True)

    from torch._dynamo.utils import counters

    with torch.no_grad():
        warmup_started = time.perf_counter()
        try:
            person(pipe, args.batch_size)  # warm-up: compiles every batch shape of a person
        except Exception as error:  # noqa: BLE001 - a compiler failure must not cost the other figures
            if compile_mode is None:
                raise
            result["compile_error"] = repr(error)[:500]
            print(f"compilation failed, measuring the eager UNet instead: {result['compile_error']}", flush=True)
            pipe.unet = models.eager_unet(pipe)
            setattr(pipe, models._OPTIMIZATIONS_ATTR, dataclasses.replace(applied, compile_mode=None))
            result["optimizations"]["compile_mode"] = None
            person(pipe, args.batch_size)
        result["warmup_s"] = round(time.perf_counter() - warmup_started, 1)
        result["graph_breaks"] = sum(counters["graph_break"].values())
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        reset_peak(device)
        latest: dict = {}
        seconds = timed(lambda: latest.update(person(pipe, args.batch_size)), device, args.repeats)
    rows["pipeline_generate"] = {"img_per_s": round(args.images / seconds, 3), "peak_gb": peak_gb(device)}
    # A LoRA swap must not recompile: the count of compiled graphs stays what the warm-up left.
    result["recompiles_after_warmup"] = counters["stats"]["unique_graphs"] - graphs_after_warmup
    print(f"pipeline generate_headshots: {rows['pipeline_generate']['img_per_s']} img/s "
          f"(warm-up {result['warmup_s']} s)", flush=True)

    plan = generate._merge_plan(models.eager_unet(pipe), lora_state)
    result["merged_swap_s"] = round(timed(lambda: (generate._merge_lora(pipe, plan),
                                                   generate._restore_base_weights(pipe, plan)), device, 3), 4)
    saved = getattr(pipe, generate._BASE_WEIGHTS_ATTR, {})
    result["saved_base_weights_gb"] = round(sum(t.numel() * t.element_size() for t in saved.values()) / 1e9, 3)

    result["quality"] = {
        "optimised_vs_plain": compare([latest[key] for key in compared], [reference[key] for key in compared]),
        "plain_batched_vs_plain_b1": compare([batched_plain[key] for key in compared],
                                             [reference[key] for key in compared]),
    }

    if args.train_procs > 0:
        try:
            rows["pipeline_train_concurrent"] = concurrent_training(args, dtype)
        except Exception as error:  # noqa: BLE001 - report, keep the other figures
            result["train_concurrent_error"] = repr(error)[:300]

    # --- persons per GPU-hour ---------------------------------------------------------------
    cpu_s = args.cpu_overhead_s
    base = persons_per_hour(rows["baseline_train"]["steps_per_s"],
                            max(rows["baseline_b1"]["img_per_s"], rows["baseline_batched"]["img_per_s"]),
                            result["peft_swap_s"], cpu_s)
    train_rate = rows.get("pipeline_train_concurrent", {}).get("person_steps_per_s") or rows["pipeline_train"]["steps_per_s"]
    ours = persons_per_hour(train_rate, rows["pipeline_generate"]["img_per_s"], rows["pipeline_train"]["fixed_s"],
                            cpu_s)
    result["persons_per_gpu_hour"] = {"baseline": base[0], "baseline_with_cpu": base[1],
                                      "pipeline": ours[0], "pipeline_with_cpu": ours[1]}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    b1, bb = rows["baseline_b1"]["img_per_s"], rows["baseline_batched"]["img_per_s"]
    bt = rows["baseline_train"]["steps_per_s"]
    pp = result["persons_per_gpu_hour"]

    def ratio(value, reference):
        return f"×{value / reference:.2f}" if value and reference else "—"

    def gb(row):
        return "—" if row.get("peak_gb") is None else f"{row['peak_gb']}"

    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}), {result['size_px']} px, {result['steps']} steps, "
        f"person = {PERSON_STEPS} steps + {PERSON_IMAGES} images, CPU overhead {result['cpu_overhead_s']} s/person",
        "",
        "| row | path | batch | img/s | steps/s | persons/GPU-h (GPU only / with CPU overhead) | peak GPU GB | ratio |",
        "|---|---|---|---|---|---|---|---|",
        f"| baseline_b1 | plain diffusers `pipe(prompt)` | 1 | {b1} | — | — | {gb(rows['baseline_b1'])} | ×1.00 |",
        f"| baseline_batched | plain diffusers `pipe(prompt)` | {result['baseline_batch']} | {bb} | — | — | "
        f"{gb(rows['baseline_batched'])} | {ratio(bb, b1)} vs b1 |",
        f"| baseline_train | plain PEFT LoRA loop, r16 | 1 | — | {bt} | — | {gb(rows['baseline_train'])} | ×1.00 |",
        f"| baseline_person | plain: train + batched generation | — | — | — | {pp['baseline']} / "
        f"{pp['baseline_with_cpu']} | — | ×1.00 |",
        f"| pipeline_generate | `generate_headshots` ({result['styles']} styles batched, merged LoRA, fused QKV, "
        f"channels-last, compile={result['optimizations']['compile_mode']}) | {result['batch_size']} | "
        f"{rows['pipeline_generate']['img_per_s']} | — | — | {gb(rows['pipeline_generate'])} | "
        f"{ratio(rows['pipeline_generate']['img_per_s'], bb)} vs batched |",
        f"| pipeline_train | `train_lora`, r16 (fixed {rows['pipeline_train']['fixed_s']} s/person) | 1 | — | "
        f"{rows['pipeline_train']['steps_per_s']} | — | {gb(rows['pipeline_train'])} | "
        f"{ratio(rows['pipeline_train']['steps_per_s'], bt)} |",
    ]
    concurrent = rows.get("pipeline_train_concurrent")
    if concurrent:
        lines.append(f"| pipeline_train_concurrent | `train_lora` × {concurrent['procs']} processes (person-steps/s) "
                     f"| 1 each | — | {concurrent['person_steps_per_s']} | — | {gb(concurrent)} per process "
                     f"| {ratio(concurrent['person_steps_per_s'], bt)} |")
    lines.append(f"| pipeline_person | pipeline: train + generation | — | — | — | {pp['pipeline']} / "
                 f"{pp['pipeline_with_cpu']} | — | {ratio(pp['pipeline'], pp['baseline'])} |")
    quality = result["quality"]
    lines += [
        "",
        "| quality guard (same seeds) | images | max abs diff (0-255) | PSNR dB |",
        "|---|---|---|---|",
    ]
    for name, label in (("optimised_vs_plain", "optimised path vs plain path (batch 1, PEFT LoRA)"),
                        ("plain_batched_vs_plain_b1", "noise floor: plain batched vs plain batch 1")):
        q = quality[name]
        lines.append(f"| {label} | {q['images']} | {q['max_abs_diff']} | {q['psnr_db']} |")
    lines += [
        "",
        f"LoRA swap: merged {result['merged_swap_s']} s (saved base weights {result['saved_base_weights_gb']} GB) "
        f"vs PEFT load+unload {result['peft_swap_s']} s; recompilations after warm-up: "
        f"{result['recompiles_after_warmup']}; graph breaks: {result['graph_breaks']}; warm-up {result['warmup_s']} s; "
        f"whole run {result['elapsed_s']} s",
    ]
    if "compile_error" in result:
        lines.append(f"compilation failed, pipeline rows are eager: {result['compile_error']}")
    if "train_concurrent_error" in result:
        lines.append(f"concurrent training failed: {result['train_concurrent_error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    result = run(args)
    print(table(result), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
