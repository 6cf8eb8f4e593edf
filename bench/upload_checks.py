"""Benchmark: identity-gate upload checks on 12 MP phone-sized JPEGs, and output checks on 512 px headshots.

    python bench/upload_checks.py            # table
    python bench/upload_checks.py --json     # the same figures as JSON

Inputs are made here: each demo photo of one person is upscaled (bicubic) to fill a 4000x3000 frame
(cropped to 4:3 around the face), given mild sensor noise (so the JPEG is as hard to decode as a camera's) and a phone-like EXIF block,
and saved as JPEG quality 92. Steps measured per photo, single process (one core):

- ``sanitize_upload``       full decode, orientation/colour, metadata-free re-encode (what is stored);
- ``decode (draft)``        the sanitised JPEG decoded at reduced DCT scale (PIL ``draft``: 1/2 here,
                            4000x3000 -> 2000x1500), which is all the face checks need;
- ``decode (full)``         the same without ``draft``, for comparison;
- ``face checks``           ``analyse_photo`` (shrink to 1024x768, HOG, landmarks, embedding, hash);
- ``check_files``           the whole ``headshots check`` path for the person's 6 files, per photo.

"per core" figures are photos per CPU-second of this process (``time.process_time``), so they do not
depend on other load. Output checks: ``score_output`` on 512 px aligned crops against the person's
accepted photos, models loaded once.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.ExifTags import GPS, IFD, Base  # noqa: E402

from pipeline.faces import (  # noqa: E402
    aligned_crop,
    analyse_photo,
    check_files,
    decode_for_analysis,
    load_face_models,
    reference_embeddings,
    score_output,
)
from pipeline.ingest import sanitize_upload  # noqa: E402

DEMO_PHOTOS = REPO / "examples" / "demo" / "photos"
FRAME_PX = (4000, 3000)


def phone_jpeg(source: Path, seed: int, models) -> bytes:
    """A 4000x3000 JPEG (q92, 4:2:0, EXIF with GPS): the demo photo upscaled to fill the frame.

    The photo is cropped to 4:3 around its face rather than fitted with bars: identical flat bars
    would dominate the perceptual hash and make different photos look like duplicates.
    """
    with Image.open(source) as image:
        photo = image.convert("RGB")
    face = analyse_photo(photo, models)
    scale = max(FRAME_PX[0] / photo.width, FRAME_PX[1] / photo.height)
    upscaled = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
    center_y = (face.box[1] + face.box[3]) / 2 * scale
    top = int(min(max(center_y - FRAME_PX[1] / 2, 0), upscaled.height - FRAME_PX[1]))
    left = (upscaled.width - FRAME_PX[0]) // 2
    frame = upscaled.crop((left, top, left + FRAME_PX[0], top + FRAME_PX[1]))
    noise = np.random.default_rng(seed).normal(0.0, 3.0, (FRAME_PX[1], FRAME_PX[0], 3))
    frame = Image.fromarray(np.clip(np.asarray(frame, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[Base.Make], exif[Base.Model] = "BenchPhone", "12MP"
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[GPS.GPSLatitudeRef], gps[GPS.GPSLatitude] = "N", (38.0, 53.0, 22.0)
    buffer = io.BytesIO()
    frame.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def timed(function, repeats: int) -> tuple[float, float, object]:
    """Median wall seconds, median CPU seconds, last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--person", default="grace-hopper", help="demo person folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    sources = sorted((DEMO_PHOTOS / args.person).glob("*.jpg"))
    load_started = time.perf_counter()
    models = load_face_models()
    load_s = time.perf_counter() - load_started
    jpegs = [phone_jpeg(path, seed, models) for seed, path in enumerate(sources)]

    steps: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                   ("sanitize", "decode_draft", "decode_full", "faces", "faces_full")}
    draft_size = None
    for index, data in enumerate(jpegs):
        wall, cpu, photo = timed(lambda: sanitize_upload(data, filename=f"IMG_{index}.jpg"), args.repeats)
        steps["sanitize"].append((wall, cpu))
        wall, cpu, reduced = timed(lambda: decode_for_analysis(photo.data), args.repeats)
        steps["decode_draft"].append((wall, cpu))
        draft_size = reduced.size
        wall, cpu, full = timed(lambda: decode_for_analysis(photo.data, min_side=10 ** 6), args.repeats)
        steps["decode_full"].append((wall, cpu))
        wall, cpu, result = timed(lambda: analyse_photo(reduced, models), args.repeats)
        steps["faces"].append((wall, cpu))
        if not hasattr(result, "embedding"):
            raise SystemExit(f"bench photo {index} was rejected: {result.message}")
        wall, cpu, _ = timed(lambda: analyse_photo(full, models), args.repeats)
        steps["faces_full"].append((wall, cpu))

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, data in enumerate(jpegs):
            paths.append(Path(folder) / f"IMG_{index:04d}.jpg")
            paths[-1].write_bytes(data)
        wall, cpu, verdicts = timed(lambda: check_files(paths, models), args.repeats)
    if not all(v.accepted for v in verdicts):
        raise SystemExit(f"bench photos were rejected: {[v.to_dict() for v in verdicts if not v.accepted]}")
    check_files_per_photo = (wall / len(paths), cpu / len(paths))

    # Output checks: 512 px aligned crops of the same photos, against the accepted photos' embeddings.
    references = reference_embeddings(verdicts)
    outputs = []
    for path in sources:
        with Image.open(path) as image:
            photo = image.convert("RGB")
        observation = analyse_photo(photo, models)
        outputs.append(aligned_crop(photo, observation, 512))
    output_walls, output_cpus = [], []
    for image in outputs:
        wall_o, cpu_o, score = timed(lambda: score_output(image, models, references), args.repeats)
        output_walls.append(wall_o)
        output_cpus.append(cpu_o)
        if score["status"] != "pass":
            raise SystemExit(f"an output check failed on a real photo: {score}")

    def row(name: str, pairs: list[tuple[float, float]] | tuple[float, float]) -> dict:
        pairs = [pairs] if isinstance(pairs, tuple) else pairs
        wall_s = statistics.median(p[0] for p in pairs)
        cpu_s = statistics.median(p[1] for p in pairs)
        return {"step": name, "wall_s": round(wall_s, 4), "cpu_s": round(cpu_s, 4),
                "per_s_per_core": round(1 / cpu_s, 2) if cpu_s else None}

    upload_per_photo = [(s[0] + d[0] + f[0], s[1] + d[1] + f[1])
                        for s, d, f in zip(steps["sanitize"], steps["decode_draft"], steps["faces"])]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": {name: metadata.version(name) for name in ("dlib-bin", "face-recognition-models", "pillow", "numpy")},
        "input": {"photos": len(jpegs), "size_px": list(FRAME_PX), "jpeg_mb_median": round(
            statistics.median(len(d) for d in jpegs) / 1e6, 2), "draft_decode_px": list(draft_size)},
        "model_load_s": round(load_s, 3),
        "repeats": args.repeats,
        "upload": [
            row("sanitize_upload (full decode + re-encode)", steps["sanitize"]),
            row("decode for face checks, draft", steps["decode_draft"]),
            row("decode for face checks, full size", steps["decode_full"]),
            row("face checks on the draft decode", steps["faces"]),
            row("face checks on the full decode", steps["faces_full"]),
            row("upload check total (sanitize + draft + faces)", upload_per_photo),
            row("check_files, per photo (6 photos, incl. identity)", check_files_per_photo),
        ],
        "output": [row("score_output, 512 px, 6 references", list(zip(output_walls, output_cpus)))],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['machine']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())}")
    print(f"{len(jpegs)} JPEGs {FRAME_PX[0]}x{FRAME_PX[1]} (median {result['input']['jpeg_mb_median']} MB), "
          f"draft decode {draft_size[0]}x{draft_size[1]}; models loaded once in {load_s:.2f} s; "
          f"medians of {args.repeats} repeats")
    print()
    print(f"| {'step':<52} | {'wall s':>7} | {'CPU s':>7} | {'per s per core':>14} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 16}|")
    for entry in result["upload"] + result["output"]:
        print(f"| {entry['step']:<52} | {entry['wall_s']:>7.3f} | {entry['cpu_s']:>7.3f} | "
              f"{entry['per_s_per_core']:>14} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
