"""Hostile uploads: a seeded corpus of damaged, disguised and oversized files never crashes or hangs ingest.

Every file goes through ``sanitize_upload`` and, when accepted, through the face checks
(``analyse_photo``), as ``headshots check`` and the ingest stage do. Each one must be decided in
under 2 s, either rejected with a known reason or accepted with no metadata left, and the memory the
worst file needs is bounded.

The corpus (about 1,100 files) is derived from small real photos (two demo faces), synthetic images
and hand-built special cases: truncated and bit-flipped JPEG/PNG/WebP, decompression bombs, zero-byte
and random files, wrong extensions, CMYK JPEG, 16-bit PNG, animated GIF/WebP/PNG, huge EXIF, XMP and
text blocks, a zTXt zlib bomb, and polyglots (JPEG+ZIP, PNG+HTML, GIF+ZIP, PDF/HTML wrappers).

It runs in one fresh worker process, so that its peak RSS measures this corpus alone and not whatever
earlier tests left behind, and so that no other work competes with the per-file timings.
"""

from __future__ import annotations

import io
import multiprocessing
import random
import resource
import struct
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, PngImagePlugin
from PIL.ExifTags import GPS, IFD, Base

from pipeline.ingest import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FACE_REJECTION_REASONS,
    MIN_SIDE_PX,
    UPLOAD_REJECTION_REASONS,
    PhotoRejected,
    has_metadata,
    sanitize_upload,
)

SEED = 20261126
# A hostile file may take at most this many times as long as a legitimate upload of the largest size
# allowed, decided in the same process just before (an absolute limit fails on a loaded machine), and
# never less than the floor.
SLOWDOWN_FACTOR = 4.0
MIN_SECONDS_PER_FILE = 2.0
# Above the worker's RSS after loading the face models. The largest accepted upload (25 megapixels,
# the default limit) needs ~75 MB per RGB copy; sanitising holds a few copies plus the JPEG encoder's
# coefficient buffers (~600 MB measured for a 25 MP JPEG). 1 GiB leaves headroom, not room for a bomb.
MAX_PEAK_RSS_GROWTH_MIB = 1024
DEMO_PHOTOS = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"

FILENAMES = (
    "IMG_0001.jpg", "photo.PNG", "selfie.webp", "scan.gif", "image.heic", "noextension", "notes.txt",
    "../../etc/passwd.jpg", "evil\x00name.jpg", "C:\\Users\\someone\\Desktop\\pic.JPG", "名前.jpeg",
    "a" * 300 + ".jpg", "archive.zip", "page.html", ".jpg",
)


# ---------------------------------------------------------------------------------------------- corpus


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 0,
         extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[Base.Make] = "FuzzPhone"
    exif[Base.Model] = "Serial 12345"
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[GPS.GPSLatitudeRef] = "N"
    gps[GPS.GPSLatitude] = (38.0, 53.0, 22.0)
    return exif


def _jpeg_with_segments(jpeg: bytes, segments: list[tuple[int, bytes]]) -> bytes:
    """Insert APPn/COM segments right after SOI."""
    inserted = b"".join(b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
                        for marker, body in segments)
    return jpeg[:2] + inserted + jpeg[2:]


def _set_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header's dimensions (a decompression bomb in a 1 kB file)."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            data[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise AssertionError("no SOF marker")


def _bases(rng: np.random.Generator) -> list[Image.Image]:
    bases = []
    for person, size in (("grace-hopper", (240, 300)), ("eileen-collins", (320, 400))):  # faces ~100 px
        with Image.open(sorted((DEMO_PHOTOS / person).glob("*.jpg"))[0]) as photo:
            bases.append(photo.convert("RGB").resize(size, Image.Resampling.LANCZOS))
    x = np.linspace(0, 255, 128)[None, :].repeat(96, 0)
    bases.append(Image.fromarray(np.stack([x, x[:, ::-1], 255 - x], -1).astype(np.uint8)))  # smooth gradient
    bases.append(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)))
    drawing = Image.new("RGB", (160, 120), (240, 230, 210))
    draw = ImageDraw.Draw(drawing)
    draw.ellipse((20, 10, 100, 100), fill=(200, 40, 40))
    draw.rectangle((90, 40, 150, 110), outline=(0, 0, 0), width=3)
    bases.append(drawing)
    return bases


def _valid_files(image: Image.Image, rng: random.Random) -> list[tuple[str, bytes]]:
    """One image in every accepted container and mode, with and without metadata."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone@example.com")
    info.add_text("Comment", "x" * 5000, zip=True)
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "y" * 100_000 + "</x:xmpmeta>")
    frames = [image, image.rotate(90), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    jpeg = _encode(image, "JPEG", quality=rng.randint(50, 95))
    files = [
        ("jpeg", jpeg),
        ("jpeg-progressive", _encode(image, "JPEG", quality=80, progressive=True, optimize=True)),
        ("jpeg-grey", _encode(image.convert("L"), "JPEG", quality=85)),
        ("jpeg-cmyk", _encode(image.convert("CMYK"), "JPEG", quality=85)),
        ("jpeg-exif-icc", _encode(image, "JPEG", exif=_exif(), icc_profile=icc, comment=b"<?php system($_GET['c']); ?>")),
        ("jpeg-huge-exif", _jpeg_with_segments(jpeg, [(0xE1, b"Exif\x00\x00" + bytes(rng.getrandbits(8) for _ in range(200)) * 300)] * 12
                                               + [(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + b"<x>" * 20_000)])),
        ("jpeg-exif-orientation", _encode(image, "JPEG", exif=_orientation_exif(rng.choice([3, 6, 8])))),
        ("png", _encode(image, "PNG")),
        ("png-rgba", _encode(image.convert("RGBA"), "PNG")),
        ("png-palette", _encode(image.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)),
        ("png-16bit", _encode(Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257)), "PNG")),
        ("png-1bit", _encode(image.convert("1"), "PNG")),
        ("png-la", _encode(image.convert("LA"), "PNG")),
        ("png-text-exif-icc", _encode(image, "PNG", pnginfo=info, exif=_exif(), icc_profile=icc)),
        ("png-animated", _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)),
        ("webp-lossy", _encode(image, "WEBP", quality=70)),
        ("webp-lossless", _encode(image, "WEBP", lossless=True)),
        ("webp-exif-xmp", _encode(image, "WEBP", exif=_exif(), xmp=b"<x:xmpmeta>gps</x:xmpmeta>", icc_profile=icc)),
        ("webp-animated", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)),
        ("gif-animated", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)),
        ("tiff", _encode(image, "TIFF")),
        ("bmp", _encode(image, "BMP")),
    ]
    return files


def _orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _truncated(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(1, len(data))]


def _bit_flipped(data: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(data)
    start = 16 if rng.random() < 0.8 else 0  # mostly keep the signature, so the decoder itself is hit
    for _ in range(rng.choice([1, 2, 4, 8, 32])):
        position = rng.randrange(start, len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def _specials(rng: random.Random, base: Image.Image) -> list[tuple[str, bytes, str | None]]:
    """Hand-built hostile files, with the upload decision each must get (None: accept)."""
    jpeg = _encode(base, "JPEG", quality=85)
    png = _encode(base, "PNG")
    webp = _encode(base, "WEBP", quality=80)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("payload.js", "alert(1)" * 100)
    zipped = zipped.getvalue()
    zeros = zlib.compress(b"\x00" * 40_000_000, 9)  # ~40 kB that inflates to 40 MB
    ztxt_bomb = _png_chunk(b"zTXt", b"Comment\x00\x00" + zeros)
    flat_25mp = _encode(Image.new("L", (5000, 5000), 128), "PNG")
    big_jpeg = _encode(Image.new("RGB", (5000, 5000), (90, 120, 150)), "JPEG", quality=90)
    return [
        ("empty", b"", "decode_failed"),
        ("one-byte", b"\xff", "decode_failed"),
        ("jpeg-magic-only", b"\xff\xd8\xff", "decode_failed"),
        ("png-signature-only", b"\x89PNG\r\n\x1a\n", "decode_failed"),
        ("riff-webp-header-only", b"RIFF\x04\x00\x00\x00WEBP", "decode_failed"),
        ("random-bytes", bytes(rng.getrandbits(8) for _ in range(5000)), "decode_failed"),
        ("text", b"just some text, not an image\n" * 50, "decode_failed"),
        ("html", b"<html><body><img src=x onerror=alert(1)></body></html>", "decode_failed"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "format_not_allowed"),
        ("pdf", b"%PDF-1.4\n" + jpeg, "format_not_allowed"),
        ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100, "format_not_allowed"),
        ("bomb-png-100k-square", _png(100_000, 100_000, zlib.compress(b"\x00" * 1000)), "too_many_pixels"),
        ("bomb-png-30mp", _png(30_000, 1_000, zlib.compress(b"\x00" * 30_001_000, 9)), "too_many_pixels"),
        ("bomb-jpeg-65k", _set_jpeg_size(jpeg, 65_000, 65_000), "too_many_pixels"),
        ("bomb-jpeg-30mp", _set_jpeg_size(jpeg, 6_000, 5_000), "too_many_pixels"),
        ("bomb-gif", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;", "format_not_allowed"),
        ("tiny-1x1", _encode(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        ("too-small-side", _encode(Image.new("RGB", (4000, MIN_SIDE_PX - 1)), "PNG"), "too_small"),
        ("too-large-file", jpeg + b"\x00" * (DEFAULT_MAX_BYTES + 1 - len(jpeg)), "too_large_file"),
        # Pillow refuses text chunks inflating past its MAX_TEXT_CHUNK (decode_failed); either way the
        # 40 MB must never be inflated (time and memory are what this case checks).
        ("ztxt-bomb", png[:33] + ztxt_bomb + png[33:], "?"),
        ("flat-25-megapixels-png", flat_25mp, None),
        ("flat-25-megapixels-jpeg", big_jpeg, None),
        ("polyglot-jpeg-zip", jpeg + zipped, None),
        ("polyglot-png-html", png + b"<html><script>alert(1)</script></html>", None),
        ("polyglot-webp-zip", webp + zipped, None),
        ("polyglot-gif-zip", _encode(base, "GIF") + zipped, "format_not_allowed"),
        ("polyglot-zip-jpeg", zipped + jpeg, "decode_failed"),
        ("jpeg-then-png-magic", b"\xff\xd8\xff" + png, "decode_failed"),
        ("jpeg-no-eoi", jpeg[:-2], "decode_failed"),
        ("png-no-iend", png[:-12], "decode_failed"),
        ("png-bad-crc", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], "decode_failed"),
        ("png-idat-lies", _png(64, 64, zlib.compress(b"\x00" * 10)), "decode_failed"),
        ("webp-riff-size-lies", webp[:4] + struct.pack("<I", 10 ** 9) + webp[8:], "decode_failed"),
        ("jpeg-length-overflow", jpeg[:2] + b"\xff\xe1\xff\xff" + b"Exif\x00\x00" + b"\x00" * 100, "decode_failed"),
        ("sliver-png", _encode(Image.new("RGB", (MIN_SIDE_PX, 60_000), (30, 160, 90)), "PNG"), None),
        ("sliver-jpeg", _encode(base.resize((20_000, 300)), "JPEG"), None),
        ("jpeg-many-app-segments", _jpeg_with_segments(jpeg, [(0xE0 + i % 16, b"X" * 60_000) for i in range(40)]), None),
    ]


def _build_corpus(seed: int = SEED) -> list[tuple[str, str, bytes, str | None]]:
    """``(kind, filename, data, expected upload reason or None for accept or '?' for any)``."""
    rng = random.Random(seed)
    bases = _bases(np.random.default_rng(seed))
    corpus: list[tuple[str, str, bytes, str | None]] = []
    for base in bases:
        for kind, data in _valid_files(base, rng):
            expected = "format_not_allowed" if kind.split("-")[0] in ("gif", "tiff", "bmp") else None
            corpus.append((kind, rng.choice(FILENAMES), data, expected))
            for _ in range(5):
                corpus.append((f"{kind}/truncated", rng.choice(FILENAMES), _truncated(data, rng), "?"))
            for _ in range(5):
                corpus.append((f"{kind}/bit-flipped", rng.choice(FILENAMES), _bit_flipped(data, rng), "?"))
    for kind, data, expected in _specials(rng, bases[0]):
        corpus.append((f"special/{kind}", rng.choice(FILENAMES), data, expected))
    return corpus


# ---------------------------------------------------------------------------------------------- workers


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _decide_all(cases: list[tuple[int, str, str, bytes]]) -> tuple[list[dict], float, float, float]:
    """Run in a fresh process: decide every case; return records, baseline and peak RSS (MiB), and the
    seconds a legitimate upload of the largest size allowed took in the same process."""
    from pipeline.faces import FaceObservation, PhotoVerdict, analyse_photo, decode_for_analysis, load_face_models

    models = load_face_models()
    analyse_photo(Image.new("RGB", (96, 96), (128, 128, 128)), models)  # warm up before the baseline
    baseline = _peak_rss_mib()  # before the reference: its peak counts like any case's
    # The legitimate reference: the largest photo allowed, through the same path as every case.
    side = int(DEFAULT_MAX_PIXELS ** 0.5)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)),
                       np.full((side, side), 128, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    del pixels
    started = time.perf_counter()
    legitimate = sanitize_upload(buffer.getvalue(), filename="legitimate.jpg", max_pixels=DEFAULT_MAX_PIXELS,
                                 max_bytes=DEFAULT_MAX_BYTES, min_side=MIN_SIDE_PX)
    analyse_photo(decode_for_analysis(legitimate.data), models, filename="legitimate.jpg")
    reference_s = time.perf_counter() - started
    del legitimate, buffer
    records = []
    for index, kind, filename, data in cases:
        record = {"index": index, "kind": kind}
        started = time.perf_counter()
        try:
            photo = sanitize_upload(data, filename=filename, max_pixels=DEFAULT_MAX_PIXELS,
                                    max_bytes=DEFAULT_MAX_BYTES, min_side=MIN_SIDE_PX)
        except PhotoRejected as rejected:
            record.update(outcome="rejected", reason=rejected.reason, message=rejected.message)
        except Exception as error:  # noqa: BLE001 - any other exception is the bug this test looks for
            record.update(outcome="crash", error=f"sanitize_upload: {error!r}")
        else:
            record.update(outcome="accepted", reason=None, metadata=has_metadata(photo.data), format=photo.format)
            try:
                result = analyse_photo(decode_for_analysis(photo.data), models, filename=filename)
            except Exception as error:  # noqa: BLE001
                record.update(outcome="crash", error=f"analyse_photo: {error!r}")
            else:
                if isinstance(result, FaceObservation):
                    record["face"] = "face"
                else:
                    assert isinstance(result, PhotoVerdict)
                    record["face"] = result.reason
                    record["face_message"] = result.message
        record["seconds"] = time.perf_counter() - started
        records.append(record)
    return records, baseline, _peak_rss_mib(), reference_s


# ---------------------------------------------------------------------------------------------- the test


@pytest.mark.timeout(300)
def test_hostile_uploads_are_decided_quickly_and_safely():
    corpus = _build_corpus()
    assert len(corpus) >= 1000
    cases = [(i, kind, name, data) for i, (kind, name, data, _) in enumerate(corpus)]
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        # A hang anywhere surfaces as a timeout here instead of blocking the suite.
        records, baseline, peak, reference_s = pool.apply_async(_decide_all, (cases,)).get(timeout=240)
    finally:
        pool.terminate()
        pool.join()

    assert len(records) == len(corpus)
    crashes = [(r["kind"], r["error"]) for r in records if r["outcome"] == "crash"]
    assert crashes == []

    limit_s = max(MIN_SECONDS_PER_FILE, SLOWDOWN_FACTOR * reference_s)
    slow = [(r["kind"], round(r["seconds"], 2)) for r in records if r["seconds"] >= limit_s]
    assert slow == [], f"slower than {limit_s:.2f} s ({SLOWDOWN_FACTOR}x a legitimate {reference_s:.2f} s upload)"

    for record, (kind, _, _, expected) in zip(records, corpus):
        if record["outcome"] == "rejected":
            assert record["reason"] in UPLOAD_REJECTION_REASONS, record
            assert record["message"] and "\x00" not in record["message"] and "/" not in record["message"].split(":")[0]
        else:
            assert record["metadata"] is False, record  # accepted: nothing left but pixels
            assert record["format"] in ("JPEG", "PNG")
            assert record["face"] in ("face", *FACE_REJECTION_REASONS), record
        if expected != "?":
            assert record.get("reason") == expected, (kind, record)

    assert peak - baseline < MAX_PEAK_RSS_GROWTH_MIB, (baseline, peak)

    outcomes = Counter(r["outcome"] if r["outcome"] == "rejected" else f"accepted/{r['face']}" for r in records)
    reasons = Counter(r["reason"] for r in records if r["outcome"] == "rejected")
    slowest = max(records, key=lambda r: r["seconds"])
    print(f"\n{len(records)} files: {dict(outcomes)}; rejections {dict(reasons)}; slowest "
          f"{slowest['seconds']:.2f} s ({slowest['kind']}); peak RSS growth "
          f"{peak - baseline:.0f} MiB")
    # The corpus really reaches every stage: faces found in accepted files, and each kind of rejection.
    assert outcomes["accepted/face"] >= 20
    assert outcomes["accepted/no_face"] >= 20
    assert set(reasons) >= {"decode_failed", "format_not_allowed", "too_many_pixels", "too_small", "too_large_file"}
