"""Derive the demo team's "selfies" from two public-domain portraits shipped inside Python packages.

Sources (see examples/README.md for their public-domain status):
- Grace Hopper: matplotlib's ``mpl-data/sample_data/grace_hopper.jpg`` (512x600, US Navy photo);
- Eileen Collins: scikit-image's ``skimage.data.astronaut()`` (512x512, NASA photo).

Each portrait becomes several photos that differ the way real selfies do: framing and distance,
mirroring (front cameras), a tilted phone (about +-8 degrees), exposure, contrast, colour cast and
JPEG quality. Each keeps one clear frontal face large enough for face detection, and they differ in
geometry, not only in brightness, so a perceptual-hash near-duplicate check keeps all of them.

One photo, ``grace-hopper/02-phone-gps.jpg``, carries a fake EXIF block (camera make/model, time and
GPS position of the Washington Monument, a public landmark) so that the demo exercises metadata
stripping: ingest must store it without any of that.

Run from the repository root (needs matplotlib and scikit-image, which are not runtime
dependencies: ``pip install matplotlib scikit-image``)::

    python examples/make_demo_photos.py            # writes examples/demo/photos/
    python examples/make_demo_photos.py --out DIR  # somewhere else

The output is deterministic for given package versions.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps
from PIL.ExifTags import GPS, IFD, Base

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "demo" / "photos"
OUTPUT_LONG_SIDE_PX = 512
# Upscaling a crop more than this softens it enough for a blur check to complain.
MAX_UPSCALE = 1.4
# A crop narrower than this many face widths cuts off the hair and chin.
MIN_CROP_FACES = 1.5

# Face boxes (left, top, right, bottom) in the source portraits, measured once with dlib's HOG
# frontal face detector (scores 1.52 and 1.53); used only to frame the crops around the face.
GRACE_HOPPER_FACE = (161, 137, 376, 352)
EILEEN_COLLINS_FACE = (179, 83, 266, 170)


@dataclass(frozen=True)
class Variant:
    """How one demo photo differs from its source portrait.

    Attributes:
        name: File name stem.
        crop_faces: Crop width in face widths (larger = more of the scene).
        aspect: Crop width / height.
        shift: (x, y) offset of the crop centre from the face centre, in face widths.
        mirror: Flip left-right, as many front cameras do.
        rotate_deg: Counter-clockwise tilt around the face centre.
        brightness: ImageEnhance factor (1.0 = unchanged).
        contrast: ImageEnhance factor.
        saturation: ImageEnhance factor.
        warmth: Red gain minus blue gain; positive = warmer (indoor light), negative = cooler.
        quality: JPEG quality.
        with_fake_gps: Embed the fake EXIF/GPS block.
    """

    name: str
    crop_faces: float
    aspect: float
    shift: tuple[float, float] = (0.0, 0.2)
    mirror: bool = False
    rotate_deg: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    warmth: float = 0.0
    quality: int = 85
    with_fake_gps: bool = False


GRACE_HOPPER_VARIANTS = (
    Variant("01-front", crop_faces=2.2, aspect=4 / 5, quality=86),
    Variant("02-phone-gps", crop_faces=1.9, aspect=3 / 4, mirror=True, brightness=1.12, warmth=0.06,
            quality=84, with_fake_gps=True),
    Variant("03-tilt-left", crop_faces=2.0, aspect=1.0, rotate_deg=8, contrast=0.85, quality=82),
    Variant("04-tilt-right-dim", crop_faces=2.2, aspect=4 / 5, shift=(0.1, 0.15), rotate_deg=-7,
            brightness=0.8, warmth=-0.05, quality=80),
    Variant("05-close-up", crop_faces=1.55, aspect=4 / 5, shift=(-0.05, 0.05), saturation=1.2, quality=88),
    Variant("06-wide-mirrored", crop_faces=2.4, aspect=1.0, shift=(-0.1, 0.3), mirror=True, rotate_deg=4,
            contrast=1.15, saturation=0.7, quality=72),
)
EILEEN_COLLINS_VARIANTS = (
    Variant("01-front", crop_faces=3.6, aspect=4 / 5, shift=(0.0, 0.6), quality=86),
    Variant("02-mirrored-bright", crop_faces=3.2, aspect=3 / 4, shift=(0.0, 0.5), mirror=True, brightness=1.12,
            quality=84),
    Variant("03-tilt-right", crop_faces=4.2, aspect=1.0, shift=(0.1, 0.5), rotate_deg=-8, contrast=0.85,
            warmth=0.06, quality=82),
    Variant("04-tilt-left-dim", crop_faces=3.8, aspect=4 / 5, shift=(-0.3, 0.7), rotate_deg=7, brightness=0.8,
            quality=80),
    Variant("05-close-up", crop_faces=2.6, aspect=4 / 5, shift=(0.0, 0.35), saturation=1.15, warmth=-0.05,
            quality=88),
    Variant("06-wide-mirrored", crop_faces=5.5, aspect=1.0, shift=(0.4, 1.4), mirror=True, rotate_deg=3,
            contrast=1.15, saturation=0.75, quality=72),
)


def load_sources() -> dict[str, tuple[Image.Image, tuple[int, int, int, int], tuple[Variant, ...]]]:
    """Load both portraits from the installed packages.

    Returns:
        ``{folder name: (RGB portrait, face box, variants)}``.

    Raises:
        SystemExit: matplotlib or scikit-image is missing (with the command that installs them).
    """
    try:
        import matplotlib
        from skimage import data as skimage_data
    except ImportError as error:
        raise SystemExit(f"{error.name} is needed to build the demo photos: pip install matplotlib scikit-image")
    hopper_path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper_path) as hopper:
        grace = hopper.convert("RGB")
    eileen = Image.fromarray(skimage_data.astronaut()).convert("RGB")
    return {
        "grace-hopper": (grace, GRACE_HOPPER_FACE, GRACE_HOPPER_VARIANTS),
        "eileen-collins": (eileen, EILEEN_COLLINS_FACE, EILEEN_COLLINS_VARIANTS),
    }


def render(source: Image.Image, face: tuple[int, int, int, int], variant: Variant) -> Image.Image:
    """Apply one variant to a portrait.

    Args:
        source: RGB portrait.
        face: Face box in ``source``.
        variant: What to change.

    Returns:
        The derived RGB photo, long side :data:`OUTPUT_LONG_SIDE_PX` at most.
    """
    face_width = face[2] - face[0]
    center_x = (face[0] + face[2]) / 2
    center_y = (face[1] + face[3]) / 2

    image = source
    valid = Image.new("L", source.size, 255)  # which pixels are real after rotation (no fill corners)
    if variant.rotate_deg:
        image = image.rotate(variant.rotate_deg, Image.Resampling.BICUBIC, center=(center_x, center_y))
        valid = valid.rotate(variant.rotate_deg, Image.Resampling.NEAREST, center=(center_x, center_y))

    crop_center = (center_x + variant.shift[0] * face_width, center_y + variant.shift[1] * face_width)
    width = variant.crop_faces * face_width
    box = _crop_box(crop_center, width, width / variant.aspect, image.size)
    # Shrink until the crop holds no filled-in corner from the rotation.
    while _minimum(valid.crop(box)) < 255:
        width *= 0.96
        box = _crop_box(crop_center, width, width / variant.aspect, image.size)
    if box[2] - box[0] < MIN_CROP_FACES * face_width:
        raise ValueError(f"{variant.name}: the crop shrank to {box[2] - box[0]} px around a {face_width} px face; "
                         f"use less rotation or shift so the whole head stays in the photo")
    image = image.crop(box)

    scale = min(OUTPUT_LONG_SIDE_PX / max(image.size), MAX_UPSCALE)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    if variant.mirror:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(variant.brightness)
    image = ImageEnhance.Contrast(image).enhance(variant.contrast)
    image = ImageEnhance.Color(image).enhance(variant.saturation)
    if variant.warmth:
        red, green, blue = image.split()
        red = red.point(lambda v: min(255, round(v * (1 + variant.warmth / 2))))
        blue = blue.point(lambda v: min(255, round(v * (1 - variant.warmth / 2))))
        image = Image.merge("RGB", (red, green, blue))
    return image


def _crop_box(center: tuple[float, float], width: float, height: float,
              size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A width x height box around ``center``, shrunk to fit and moved inside the image."""
    scale = min(1.0, size[0] / width, size[1] / height)
    width, height = width * scale, height * scale
    left = min(max(center[0] - width / 2, 0), size[0] - width)
    top = min(max(center[1] - height / 2, 0), size[1] - height)
    return round(left), round(top), round(left + width), round(top + height)


def _minimum(mask: Image.Image) -> int:
    return mask.getextrema()[0]


def fake_gps_exif() -> bytes:
    """An EXIF block like a phone writes: make, model, time and a GPS position (all invented)."""
    exif = Image.Exif()
    exif[Base.Make] = "DemoPhone"
    exif[Base.Model] = "Fake GPS Example"
    exif[Base.DateTime] = "2024:05:01 09:30:00"
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[GPS.GPSVersionID] = b"\x02\x03\x00\x00"
    # The Washington Monument: a public landmark, not where any of these photos were taken.
    gps[GPS.GPSLatitudeRef] = "N"
    gps[GPS.GPSLatitude] = (38.0, 53.0, 22.0)
    gps[GPS.GPSLongitudeRef] = "W"
    gps[GPS.GPSLongitude] = (77.0, 2.0, 7.0)
    return exif.tobytes()


def encode(image: Image.Image, variant: Variant) -> bytes:
    """JPEG bytes as a phone would save them (4:2:0), with the fake EXIF where the variant asks."""
    buffer = io.BytesIO()
    options = {"quality": variant.quality, "optimize": True}
    if variant.with_fake_gps:
        options["exif"] = fake_gps_exif()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="folder for <person>/*.jpg")
    args = parser.parse_args(argv)

    total = 0
    for folder, (source, face, variants) in load_sources().items():
        person_dir = args.out / folder
        person_dir.mkdir(parents=True, exist_ok=True)
        # Remove earlier outputs so a renamed variant does not leave a stale photo in the demo.
        for old in person_dir.glob("*.jpg"):
            old.unlink()
        for variant in variants:
            data = encode(render(source, face, variant), variant)
            path = person_dir / f"{variant.name}.jpg"
            path.write_bytes(data)
            total += len(data)
            print(f"{path.relative_to(args.out.parent) if args.out.parent in path.parents else path}: "
                  f"{len(data) / 1024:.0f} KB")
    print(f"total: {total / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
