"""Upload sanitising: metadata is gone, bad uploads are refused with a clear reason, crops are sane."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile, PngImagePlugin
from PIL.ExifTags import GPS, IFD, Base

from pipeline.ingest import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE_PX,
    PhotoRejected,
    SanitizedPhoto,
    find_metadata,
    has_metadata,
    open_sanitized,
    sanitize_upload,
    training_crop,
    upper_center_square_box,
)

DEMO_PHOTOS = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"
RED = (255, 0, 0)
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------- helpers


def photo(size: tuple[int, int] = (320, 240), mode: str = "RGB") -> Image.Image:
    """A gradient (so JPEG has real content) with a red 40x40 marker in the top-left corner."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    pixels[:40, :40] = RED
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[Base.Make] = "TestPhone"
    exif[Base.Model] = "Secret Model 7"
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[GPS.GPSLatitudeRef] = "N"
    gps[GPS.GPSLatitude] = (51.0, 30.0, 26.0)
    gps[GPS.GPSLongitudeRef] = "W"
    gps[GPS.GPSLongitude] = (0.0, 7.0, 39.0)
    return exif


def png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def raw_png(width: int, height: int, *, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows) if rows is not None else zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def swapped_primaries_icc() -> bytes:
    """An ICC v2 RGB profile whose red and green primaries are sRGB's green and red, linear tone curves.

    In this colour space the pixel (255, 0, 0) *is* sRGB green, so a converter that honours the
    profile turns it green, and one that ignores the profile leaves it red.
    """
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    linear = b"curv\0\0\0\0" + struct.pack(">I", 0)
    description = b"swapped"
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(description) + 1) + description + b"\0"
         + b"\0" * 8 + b"\0" * 3 + b"\0" * 67),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.3851, 0.7169, 0.0971)),  # sRGB's green (D50)
        (b"gXYZ", xyz(0.4361, 0.2225, 0.0139)),  # sRGB's red (D50)
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", linear), (b"gTRC", linear), (b"bTRC", linear),
        (b"cprt", b"text\0\0\0\0public domain\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, bodies = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(bodies), len(body))
        bodies += body
    size = offset + len(bodies)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + bodies


def kinds(data: bytes) -> set[str]:
    return {block.kind for block in find_metadata(data)}


def rejected(data: bytes, filename: str = "upload.jpg", **options) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as caught:
        sanitize_upload(data, filename=filename, **options)
    return caught.value


# ---------------------------------------------------------------------------------------------- metadata


def test_gps_exif_is_removed_from_a_jpeg():
    original = encode(photo(), "JPEG", exif=gps_exif(), quality=90)
    assert has_metadata(original)
    assert "exif" in kinds(original)
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(IFD.GPSInfo)

    result = sanitize_upload(original, filename="selfie.jpg")

    assert not has_metadata(result.data)
    assert result.format == "JPEG"
    reopened = Image.open(io.BytesIO(result.data))
    assert not reopened.getexif()
    assert "exif" not in reopened.info
    assert b"Secret Model 7" not in result.data and b"TestPhone" not in result.data


@pytest.mark.parametrize("options", [
    {"comment": b"taken at 12 Oak Street"},
    {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()},
    {"xmp": b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF/></x:xmpmeta>"},
], ids=["comment", "icc", "xmp"])
def test_other_jpeg_metadata_is_removed(options):
    original = encode(photo(), "JPEG", **options)
    assert has_metadata(original)
    assert not has_metadata(sanitize_upload(original, filename="a.jpg").data)


def test_data_hidden_after_the_jpeg_end_is_removed():
    original = encode(photo(), "JPEG") + b"MOTION-PHOTO-VIDEO" * 100
    assert kinds(original) == {"trailing_data"}
    assert not has_metadata(sanitize_upload(original, filename="a.jpg").data)


def test_png_xmp_text_exif_icc_and_private_chunks_are_removed():
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", zip=True)
    info.add_text("Author", "Jane Doe")
    info.add_text("Comment", "home address", zip=True)
    info.add(b"tIME", struct.pack(">HBBBBB", 2024, 5, 1, 9, 30, 0))
    info.add(b"prVt", b"private app data")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    original = encode(photo(), "PNG", pnginfo=info, exif=gps_exif(), icc_profile=icc)
    assert kinds(original) == {"xmp", "text", "exif", "icc", "timestamp", "unknown"}

    result = sanitize_upload(original, filename="selfie.png")

    assert result.format == "PNG"
    assert not has_metadata(result.data)
    assert Image.open(io.BytesIO(result.data)).info.keys() <= {"dpi"}


def test_webp_metadata_is_removed_and_the_photo_stored_as_png():
    original = encode(photo(), "WEBP", exif=gps_exif(), xmp=b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>",
                      lossless=True)
    assert {"exif", "xmp"} <= kinds(original)
    result = sanitize_upload(original, filename="selfie.webp")
    assert (result.format, result.extension, result.content_type) == ("PNG", ".png", "image/png")
    assert not has_metadata(result.data)
    # Lossless in, lossless out.
    assert np.array_equal(np.asarray(open_sanitized(result.data)), np.asarray(photo()))


def test_a_clean_pillow_file_has_no_metadata():
    assert not has_metadata(encode(photo(), "JPEG"))
    assert not has_metadata(encode(photo(), "PNG"))
    assert not has_metadata(encode(photo(), "WEBP"))


def test_unknown_jpeg_app_segment_counts_as_metadata():
    clean = encode(photo(), "JPEG")
    segment = b"\xff\xe5" + struct.pack(">H", 2 + 12) + b"VENDOR-DATA!"
    assert kinds(clean[:2] + segment + clean[2:]) == {"unknown"}


def test_demo_photo_with_fake_gps_is_cleaned():
    gps_photo = DEMO_PHOTOS / "grace-hopper" / "02-phone-gps.jpg"
    data = gps_photo.read_bytes()
    assert "exif" in kinds(data)
    assert not has_metadata(sanitize_upload(data, filename=gps_photo.name).data)


def test_every_demo_photo_is_accepted():
    photos = sorted(DEMO_PHOTOS.glob("*/*.jpg"))
    assert len(photos) >= 10
    for path in photos:
        result = sanitize_upload(path.read_bytes(), filename=path.name)
        assert result.format == "JPEG" and not has_metadata(result.data)


# ---------------------------------------------------------------------------------------------- orientation and colour


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[Base.Orientation] = 6  # stored sideways; viewers rotate 90 degrees clockwise
    original = encode(photo((300, 200)), "JPEG", exif=exif, quality=95)

    result = sanitize_upload(original, filename="sideways.jpg")
    upright = open_sanitized(result.data)

    assert (result.width, result.height) == (200, 300) == upright.size
    # The red marker stored top-left is shown top-right after a clockwise turn.
    assert _close(upright.getpixel((upright.width - 10, 10)), RED)
    assert not _close(upright.getpixel((10, 10)), RED)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour():
    original = encode(Image.new("CMYK", (200, 200), (0, 255, 255, 0)), "JPEG", quality=95)
    image = open_sanitized(sanitize_upload(original, filename="print.jpg").data)
    assert image.mode == "RGB"
    assert _close(image.getpixel((100, 100)), RED)


def test_colours_are_converted_to_srgb_before_the_icc_profile_is_dropped():
    red_in_swapped_space = Image.new("RGB", (100, 100), RED)
    original = encode(red_in_swapped_space, "PNG", icc_profile=swapped_primaries_icc())
    image = open_sanitized(sanitize_upload(original, filename="wide-gamut.png").data)
    assert _close(image.getpixel((50, 50)), (0, 255, 0), tolerance=20)


def test_a_profile_for_another_colour_space_is_ignored():
    grey = Image.new("L", (100, 100), 200)
    original = encode(grey, "PNG", icc_profile=swapped_primaries_icc())  # an RGB profile on grey pixels
    image = open_sanitized(sanitize_upload(original, filename="grey.png").data)
    assert image.getpixel((50, 50)) == (200, 200, 200)


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535] * 40] * 100, dtype=np.uint16)
    original = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(original)).mode.startswith("I")

    image = open_sanitized(sanitize_upload(original, filename="scan.png").data)

    assert image.mode == "RGB"
    assert [image.getpixel((x, 50)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_16_bit_rgb_png_becomes_8_bit_rgb():
    row = b"\x00" + struct.pack(">HHH", 65535, 0, 32896) * 100
    original = raw_png(100, 100, bit_depth=16, color_type=2, rows=row * 100)

    image = open_sanitized(sanitize_upload(original, filename="deep.png").data)

    assert image.mode == "RGB"
    assert _close(image.getpixel((50, 50)), (255, 0, 128), tolerance=1)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 50, 100))
    if mode == "LA":
        image = image.convert("LA")
    result = open_sanitized(sanitize_upload(encode(image, "PNG"), filename="cut-out.png").data)
    assert result.getpixel((75, 50)) == WHITE
    assert result.getpixel((25, 50)) != WHITE


def test_palette_png_with_transparent_index_is_composited_on_white():
    image = Image.new("P", (100, 100), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 50, 100))
    result = open_sanitized(sanitize_upload(encode(image, "PNG", transparency=0), filename="p.png").data)
    assert result.getpixel((75, 50)) == WHITE
    assert result.getpixel((25, 50)) == RED


def test_animated_webp_keeps_the_first_frame():
    frames = [Image.new("RGB", (120, 120), colour) for colour in (RED, (0, 0, 255))]
    original = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(original)).n_frames == 2
    image = open_sanitized(sanitize_upload(original, filename="live.webp").data)
    assert image.getpixel((60, 60)) == RED


def test_multi_picture_jpeg_from_a_phone_keeps_the_first_picture_only():
    first, second = photo(), photo().transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    original = encode(first, "MPO", save_all=True, append_images=[second])
    assert {"multi_picture", "trailing_data"} <= kinds(original)

    result = sanitize_upload(original, filename="portrait-mode.jpg")

    assert result.format == "JPEG"
    assert not has_metadata(result.data)
    assert _close(open_sanitized(result.data).getpixel((10, 10)), RED)


# ---------------------------------------------------------------------------------------------- refusals


def test_gif_is_refused_naming_the_file_and_the_allowed_formats():
    error = rejected(encode(photo(), "GIF"), filename="party.gif")
    assert error.reason == "format_not_allowed"
    assert error.filename == "party.gif"
    assert error.message.startswith("party.gif: GIF images are not accepted")
    assert "JPEG, PNG or WebP" in error.message
    assert str(error) == error.message


@pytest.mark.parametrize("fmt, label", [("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_image_formats_are_refused(fmt, label):
    error = rejected(encode(photo(), fmt), filename=f"photo.{fmt.lower()}")
    assert error.reason == "format_not_allowed"
    assert label in error.message


def test_iphone_heic_is_refused_with_a_hint():
    heic_header = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    error = rejected(heic_header, filename="IMG_0001.HEIC")
    assert error.reason == "format_not_allowed"
    assert "HEIC" in error.message and "Most Compatible" in error.message


def test_message_shows_only_the_file_name_not_the_folders():
    error = rejected(encode(photo(), "GIF"), filename="C:\\Users\\jane.doe\\Pictures\\me.gif")
    assert error.message.startswith("me.gif:")
    assert "jane.doe" not in error.message


def test_png_bytes_named_jpg_are_accepted_as_png():
    result = sanitize_upload(encode(photo(), "PNG"), filename="actually-a-png.jpg")
    assert (result.format, result.extension) == ("PNG", ".png")


def _bomb_must_not_be_decoded(monkeypatch):
    def forbidden_load(self):
        raise AssertionError("a decompression bomb was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)


@pytest.mark.parametrize("side", [30_000, 6_000], ids=["beyond-pillow-limit", "beyond-our-limit"])
def test_decompression_bomb_is_refused_from_the_header(monkeypatch, side):
    bomb = raw_png(side, side, bit_depth=8, color_type=2)
    assert len(bomb) < 200
    _bomb_must_not_be_decoded(monkeypatch)

    # Refused from the header alone: _bomb_must_not_be_decoded fails the test if any pixel is decoded.
    error = rejected(bomb, filename="bomb.png")

    assert error.reason == "too_many_pixels"
    assert f"{DEFAULT_MAX_PIXELS // 1_000_000} megapixels" in error.message


def test_max_pixels_can_be_lowered():
    error = rejected(encode(photo((400, 300)), "PNG"), max_pixels=100_000)
    assert error.reason == "too_many_pixels"
    assert "400x300" in error.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_file_is_refused(fmt, monkeypatch):
    data = encode(photo(), fmt)
    # Even when some other code told Pillow to accept truncated images.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    error = rejected(data[: len(data) * 2 // 3], filename="half.img")
    assert error.reason == "decode_failed"
    assert error.message.startswith("half.img:")


def test_empty_file_is_refused():
    error = rejected(b"", filename="empty.jpg")
    assert error.reason == "decode_failed"
    assert "empty" in error.message


def test_random_bytes_are_refused_as_unreadable():
    error = rejected(b"this is a text file, not a photo\n" * 10, filename="notes.jpg")
    assert error.reason == "decode_failed"
    assert "JPEG, PNG or WebP" in error.message


def test_tiny_image_is_refused():
    error = rejected(encode(photo((MIN_SIDE_PX - 1, 300)), "PNG"), filename="thumb.png")
    assert error.reason == "too_small"
    assert f"at least {MIN_SIDE_PX} pixels" in error.message
    assert sanitize_upload(encode(photo((MIN_SIDE_PX, 300)), "PNG"), filename="ok.png").width == MIN_SIDE_PX


def test_large_file_is_refused_before_reading_it():
    data = encode(photo(), "PNG")
    error = rejected(data, max_bytes=len(data) - 1, filename="big.png")
    assert error.reason == "too_large_file"
    assert error.message.startswith("big.png: the file is") and "at most" in error.message
    assert sanitize_upload(data, max_bytes=len(data), filename="big.png").format == "PNG"


def test_rejection_survives_pickling_between_processes():
    error = rejected(encode(photo(), "GIF"), filename="x.gif")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.filename, copy.message) == (error.reason, error.filename, error.message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0, max_value=10_000), value=st.integers(0, 255),
       cut=st.integers(min_value=0, max_value=10_000), fmt=st.sampled_from(["JPEG", "PNG"]))
def test_damaged_uploads_are_either_clean_or_refused(position, value, cut, fmt):
    data = bytearray(encode(photo((96, 96)), fmt, exif=gps_exif()))
    data[position % len(data)] = value
    damaged = bytes(data[: len(data) - cut % 200])
    try:
        result = sanitize_upload(damaged, filename="fuzz")
    except PhotoRejected as error:
        assert error.reason in ("decode_failed", "format_not_allowed", "too_many_pixels", "too_small")
    else:
        assert not has_metadata(result.data)


# ---------------------------------------------------------------------------------------------- records and helpers


def test_a_photo_that_still_has_metadata_is_never_returned(monkeypatch):
    import pipeline.ingest as ingest

    monkeypatch.setattr(ingest, "_encode_without_metadata",
                        lambda image, output_format: encode(image, "JPEG", comment=b"leak"))
    with pytest.raises(RuntimeError, match="still carries metadata"):
        sanitize_upload(encode(photo(), "JPEG"), filename="a.jpg")


def test_sanitized_photo_record():
    result = sanitize_upload(encode(photo(), "JPEG"), filename="me.jpg")
    assert (result.extension, result.content_type, result.source_filename) == (".jpg", "image/jpeg", "me.jpg")
    assert "data=" not in repr(result)  # megabytes of bytes must not end up in logs
    with pytest.raises(ValueError, match="sha256"):
        SanitizedPhoto(data=result.data, format="JPEG", width=1, height=1, sha256="0" * 64, source_filename="x")


def test_open_sanitized_refuses_other_formats():
    with pytest.raises(ValueError, match="JPEG or PNG"):
        open_sanitized(encode(photo(), "GIF"))


def test_training_crop_default_is_square_and_biased_upward():
    portrait = photo((400, 600))
    left, top, right, bottom = upper_center_square_box(400, 600)
    assert (left, right, bottom - top) == (0, 400, 400)
    assert top < (600 - 400) / 2  # more headroom kept above than a centred crop

    crop = training_crop(portrait, 256)
    assert crop.size == (256, 256) and crop.mode == "RGB"
    # The same as cropping the box by hand: the box really is what was used.
    expected = portrait.crop((left, top, right, bottom)).resize((256, 256), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(crop, dtype=int) - np.asarray(expected, dtype=int)).max() <= 2


def test_training_crop_uses_a_given_face_box():
    crop = training_crop(photo((320, 240)), 64, crop_box=(0, 0, 40, 40))  # exactly the red marker
    assert np.asarray(crop).reshape(-1, 3).min(axis=0).tolist()[0] > 240  # all red


@pytest.mark.parametrize("crop_box, message", [
    ((0, 0, 50, 40), "square"),
    ((300, 0, 340, 40), "inside"),
    ((10, 10, 10, 10), "inside"),
])
def test_training_crop_refuses_bad_boxes(crop_box, message):
    with pytest.raises(ValueError, match=message):
        training_crop(photo((320, 240)), 64, crop_box=crop_box)


def test_training_crop_refuses_bad_resolution():
    with pytest.raises(ValueError, match="positive integer"):
        training_crop(photo(), 0)


def _close(pixel, expected, tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))
