"""`headshots check`: the identity gate on a folder, as an operator runs it (no stack needed)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.e2e.test_cli_demo import REPO, run_cli

PHOTOS = REPO / "examples" / "demo" / "photos"


def _bomb_png() -> bytes:
    """A valid PNG header claiming 40,000 × 40,000 pixels (1.6 GP), with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_check_gives_the_right_verdict_for_each_kind_of_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for photo in sorted((PHOTOS / "grace-hopper").iterdir())[:4]:
        shutil.copy(photo, folder / photo.name)
    shutil.copy(PHOTOS / "eileen-collins" / "02-mirrored-bright.jpg", folder / "someone-else.jpg")
    noise = np.random.default_rng(7).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    (folder / "no-face.jpg").write_bytes(buffer.getvalue())
    (folder / "corrupt.jpg").write_bytes((PHOTOS / "grace-hopper" / "05-close-up.jpg").read_bytes()[:2000])
    (folder / "bomb.png").write_bytes(_bomb_png())

    completed = run_cli(tmp_path / "home", "check", str(folder), "--json")
    verdicts = {Path(v["file"]).name: v for v in json.loads(completed.stdout)}
    assert {name: v["reason"] for name, v in verdicts.items() if not v["accepted"]} == {
        "someone-else.jpg": "different_person", "no-face.jpg": "no_face", "corrupt.jpg": "decode_failed",
        "bomb.png": "too_many_pixels"}
    assert sum(v["accepted"] for v in verdicts.values()) == 4
    for verdict in verdicts.values():
        assert set(verdict) == {"file", "accepted", "reason", "message", "scores"}
        assert verdict["message"].startswith(Path(verdict["file"]).name)
    text = run_cli(tmp_path / "home", "check", str(folder)).stdout
    assert "4 of 8 photos accepted" in text
