"""Ingest: turn an uploaded selfie into a metadata-free RGB photo, and crop photos for training.

The product promises that stored photos carry no metadata at all: no EXIF (camera, time, GPS), no
XMP, no IPTC, no ICC profile, no text chunks or comments, no embedded thumbnails and nothing hidden
after the end of the image. :func:`sanitize_upload` is the only way a photo enters storage:

1. ``check size``      the upload is not empty and at most ``max_bytes``;
2. ``identify``        the format comes from the bytes, never from the file name; only JPEG, PNG and
                       WebP are decoded, everything else is refused with a message naming the format;
3. ``check header``    width x height from the header, before any pixel is decoded (decompression
                       bombs), and the shorter side against ``min_side``;
4. ``decode``          the whole first frame; a truncated or damaged file is refused;
5. ``normalise``       EXIF orientation applied, colours converted to sRGB through the embedded ICC
                       profile, transparency composited on white, everything 8-bit RGB;
6. ``re-encode``       a fresh image with no metadata: JPEG in -> JPEG out (quality 95, 4:4:4),
                       PNG or WebP in -> PNG out (lossless stays lossless);
7. ``verify``          the output is scanned with :func:`find_metadata`; anything found is a bug and
                       raises instead of storing the photo.

Animated images (animated WebP or PNG, and the multi-picture "MPO" JPEGs that many phones write)
are accepted and only their first frame is kept: phones produce these for ordinary selfies (motion or
depth photos), and refusing them would turn away good photos for a reason the user cannot see.

:func:`find_metadata` / :func:`has_metadata` walk the JPEG, PNG and WebP containers themselves rather
than trusting Pillow's ``info``, which skips blocks it does not understand.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

try:  # Pillow is normally built with LittleCMS; without it colours are converted without profiles.
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None  # type: ignore[assignment]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_BYTES = 30 * 1024 * 1024
# Only a floor against icons and thumbnails; whether the face is large and sharp enough is decided
# later by the face-quality gate. Matches IngestConfig.min_side_px in headshots/config.py.
MIN_SIDE_PX = 64
JPEG_QUALITY = 95
# Where the square training crop sits vertically in a portrait photo: 0.0 = top, 0.5 = centred.
# Faces sit in the upper-middle of selfies, so a centred crop cuts the forehead and keeps the chest.
FACE_VERTICAL_BIAS = 0.35

UPLOAD_REJECTION_REASONS = ("decode_failed", "format_not_allowed", "too_many_pixels", "too_small", "too_large_file")
# Decided by the identity gate (pipeline/faces.py) after sanitising; listed here so that one tuple names
# every reason a photo can be turned away for (metrics labels, the CLI's JSON, PhotoRejected).
FACE_REJECTION_REASONS = ("no_face", "multiple_faces", "face_too_small", "blurry", "too_dark", "too_bright",
                          "duplicate", "different_person")
REJECTION_REASONS = UPLOAD_REJECTION_REASONS + FACE_REJECTION_REASONS
ALLOWED_FORMATS_TEXT = "JPEG, PNG or WebP"

# Text chunks are decompressed only to classify them (XMP or not); a zlib bomb must not cost memory.
MAX_DECOMPRESSED_TEXT_BYTES = 8 * 1024 * 1024
# A few padding bytes after a JPEG's end marker are common and carry nothing; more is hidden data.
_JPEG_PADDING = b"\x00\xff"

_WHITE = (255, 255, 255)


class PhotoRejected(ValueError):
    """An upload that cannot become a stored photo.

    Attributes:
        reason: A stable code for programs and metrics, one of :data:`REJECTION_REASONS`.
        filename: The file name as uploaded.
        message: One sentence for a non-technical operator: the file, what is wrong, what is allowed.
    """

    def __init__(self, reason: str, filename: str, message: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; allowed: {', '.join(REJECTION_REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.filename = filename
        self.message = message

    def __reduce__(self):
        # Exceptions cross process boundaries (Ray workers); the default pickling would call
        # PhotoRejected(message) and fail, so rebuild from all three fields.
        return (type(self), (self.reason, self.filename, self.message))


@dataclass(frozen=True)
class SanitizedPhoto:
    """A photo re-encoded without any metadata, ready to store.

    Attributes:
        data: The encoded image (JPEG or PNG) without metadata.
        format: ``"JPEG"`` or ``"PNG"``.
        width: Width in pixels after EXIF orientation was applied.
        height: Height in pixels after EXIF orientation was applied.
        sha256: Hex SHA-256 of ``data``.
        source_filename: The file name as uploaded (for messages; never written into ``data``).
    """

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int
    sha256: str
    source_filename: str

    def __post_init__(self) -> None:
        if self.format not in ("JPEG", "PNG"):
            raise ValueError(f"format must be 'JPEG' or 'PNG' but is {self.format!r}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive but are {self.width}x{self.height}")
        if hashlib.sha256(self.data).hexdigest() != self.sha256:
            raise ValueError("sha256 does not match data")

    @property
    def extension(self) -> str:
        """File extension including the dot: ``".jpg"`` or ``".png"``."""
        return ".jpg" if self.format == "JPEG" else ".png"

    @property
    def content_type(self) -> str:
        """MIME type: ``"image/jpeg"`` or ``"image/png"``."""
        return "image/jpeg" if self.format == "JPEG" else "image/png"


@dataclass(frozen=True)
class MetadataBlock:
    """One piece of metadata found in an image file.

    Attributes:
        kind: ``exif``, ``xmp``, ``iptc``, ``icc``, ``text``, ``comment``, ``thumbnail``,
            ``timestamp``, ``multi_picture``, ``trailing_data`` or ``unknown`` (a block that is
            neither pixels nor rendering parameters, so it may carry anything).
        where: Where it sits, e.g. ``"JPEG APP1"`` or ``"PNG iTXt 'XML:com.adobe.xmp'"``.
        payload: Its content (text chunks decompressed, at most a bounded amount).
    """

    kind: str
    where: str
    payload: bytes = field(repr=False)


# --------------------------------------------------------------------------------------------------
# Upload sanitising
# --------------------------------------------------------------------------------------------------


def sanitize_upload(
    data: bytes,
    *,
    filename: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int = MIN_SIDE_PX,
) -> SanitizedPhoto:
    """Check an uploaded photo and re-encode it with all metadata removed.

    Args:
        data: The uploaded file's bytes.
        filename: The uploaded file's name; used in messages only (the format comes from ``data``).
        max_pixels: Largest accepted width x height, checked from the header before decoding.
            Pillow refuses images above ``Image.MAX_IMAGE_PIXELS`` (about 89 million) itself, so
            larger values have no effect.
        max_bytes: Largest accepted upload size in bytes.
        min_side: Smallest accepted width and height in pixels.

    Returns:
        The sanitised photo: JPEG for JPEG uploads, PNG for PNG and WebP uploads, 8-bit RGB, upright,
        sRGB colours, no metadata.

    Raises:
        PhotoRejected: The upload is empty, too big, not JPEG/PNG/WebP, has too many pixels, is
            too small, or cannot be decoded completely. ``reason`` says which.
    """
    name = _display_name(filename)

    if not data:
        raise PhotoRejected("decode_failed", filename,
                            f"{name}: the file is empty; upload a {ALLOWED_FORMATS_TEXT} photo")
    if len(data) > max_bytes:
        raise file_too_large(filename, size_bytes=len(data), max_bytes=max_bytes)

    image_format = _identify_format(data, filename, name)

    # Check the container ourselves: Pillow decodes a truncated file without complaint when any code
    # in the process has set ImageFile.LOAD_TRUNCATED_IMAGES, and a half-grey selfie must not pass.
    _, complete = _walk_container(data, image_format)
    if not complete:
        raise PhotoRejected("decode_failed", filename,
                            f"{name}: the file is incomplete or damaged (perhaps the upload was cut off); "
                            f"upload the whole {ALLOWED_FORMATS_TEXT} photo again")

    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are bombs to us.
    # (catch_warnings swaps the process-wide filters for a moment, for every thread; it only ever
    # makes this one warning stricter.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[image_format])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise PhotoRejected("too_many_pixels", filename,
                                f"{name}: the photo has far too many pixels; photos may have at most "
                                f"{_megapixels(max_pixels)} megapixels") from error
        except Exception as error:  # any parser failure on untrusted bytes means "cannot read it"
            raise PhotoRejected("decode_failed", filename,
                                f"{name}: the file could not be read as a {_LABELS.get(image_format, image_format)} "
                                f"image (it may be damaged); upload a {ALLOWED_FORMATS_TEXT} photo") from error

        with image:
            width, height = image.size
            # From the header only: nothing has been decoded yet.
            if width * height > max_pixels:
                raise PhotoRejected("too_many_pixels", filename,
                                    f"{name}: the photo is {width}x{height} pixels ({_megapixels(width * height)} "
                                    f"megapixels); photos may have at most {_megapixels(max_pixels)} megapixels")
            if min(width, height) < min_side:
                raise PhotoRejected("too_small", filename,
                                    f"{name}: the photo is only {width}x{height} pixels; width and height must "
                                    f"each be at least {min_side} pixels")
            try:
                image.seek(0)  # animated WebP/PNG and MPO: keep the first frame (see module docstring)
                image.load()
                icc_profile = image.info.get("icc_profile")
                upright = _apply_exif_orientation(image)
                rgb = to_rgb(upright, icc_profile=icc_profile)
            except Exception as error:
                raise PhotoRejected("decode_failed", filename,
                                    f"{name}: the image data is incomplete or damaged; upload the photo again "
                                    f"as {ALLOWED_FORMATS_TEXT}") from error

    output_format = "JPEG" if image_format == "JPEG" else "PNG"
    encoded = _encode_without_metadata(rgb, output_format)
    leftovers = find_metadata(encoded)
    if leftovers:  # cannot happen with a fresh image; never store a photo that breaks the promise
        raise RuntimeError(f"re-encoded photo still carries metadata: {[b.where for b in leftovers]}")
    return SanitizedPhoto(data=encoded, format=output_format, width=rgb.width, height=rgb.height,
                          sha256=hashlib.sha256(encoded).hexdigest(), source_filename=filename)


def file_too_large(filename: str, *, size_bytes: int, max_bytes: int) -> PhotoRejected:
    """The rejection for an upload over ``max_bytes``, for callers that know the size before reading.

    Args:
        filename: The file name as uploaded.
        size_bytes: The file's size in bytes.
        max_bytes: Largest accepted upload size in bytes.

    Returns:
        A ``too_large_file`` :class:`PhotoRejected` (not raised).
    """
    return PhotoRejected("too_large_file", filename,
                         f"{display_name(filename)}: the file is {_megabytes(size_bytes)} MB; photos may be at "
                         f"most {_megabytes(max_bytes)} MB")


def to_rgb(image: Image.Image, *, icc_profile: bytes | None = None) -> Image.Image:
    """Convert any Pillow image to 8-bit sRGB RGB.

    Transparency is composited on white (a transparent background is not black in the photo the
    user saw). 16-bit greyscale is scaled, not clipped. With an ICC profile the colours are
    converted to sRGB, since the profile itself will be dropped; CMYK without a profile uses
    Pillow's plain conversion.

    Args:
        image: Any Pillow image (any mode).
        icc_profile: The ICC profile the pixels are encoded in, if any.

    Returns:
        A new RGB image without ``info`` entries from the input.
    """
    image, alpha = _split_alpha(_to_8_bit(image))
    color = None
    if icc_profile and ImageCms is not None and image.mode in _ICC_COLOR_SPACES:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            if profile.profile.xcolor_space == _ICC_COLOR_SPACES[image.mode]:
                color = ImageCms.profileToProfile(image, profile, _srgb_profile(), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            color = None
        # color is still None for a broken or mismatched profile (e.g. an RGB profile on a greyscale
        # image): the pixels are fine, so they are taken as sRGB, as most viewers would show them.
    if color is None:
        color = image.convert("RGB")
    if alpha is not None:
        background = Image.new("RGB", color.size, _WHITE)
        background.paste(color, (0, 0), alpha)
        color = background
    color.info = {}
    return color


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit greyscale to mode L (Pillow's convert would clip at 255, i.e. blow out)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        transparent = image.info.get("transparency")
        scaled = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
        if isinstance(transparent, int):
            # A 16-bit tRNS colour key: keep it as an alpha channel before the values are merged.
            alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
            scaled = Image.merge("LA", (scaled, alpha))
        return scaled
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Return (colour image without alpha, alpha mask or None)."""
    mode = image.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
            mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            alpha = None
        if mode in ("LA", "La"):
            return image.convert("L"), alpha
        return rgba.convert("RGB"), alpha
    return image, None


# Pillow mode -> ICC colour space signature a profile must have to describe those pixels.
_ICC_COLOR_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}
_SRGB_PROFILE = None


def _srgb_profile():
    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB_PROFILE


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (phones store selfies sideways plus a tag)."""
    try:
        with warnings.catch_warnings():
            # "Corrupt EXIF data" warnings are noise: the EXIF is about to be discarded anyway.
            warnings.simplefilter("ignore", UserWarning)
            upright = ImageOps.exif_transpose(image)
    except Exception:
        # Unreadable EXIF: the orientation is unknown, so keep the pixels as stored (what viewers
        # that cannot read the tag show too). The EXIF itself is dropped below either way.
        return image
    return upright if upright is not None else image


def _encode_without_metadata(rgb: Image.Image, output_format: str) -> bytes:
    # A brand-new image from raw pixels: Pillow copies some info entries (JPEG comment, PNG ICC
    # profile and transparency) from the source image into the saved file unless told otherwise.
    fresh = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    if output_format == "JPEG":
        # 4:4:4 keeps skin and lip edges sharp; 95 keeps recompression loss below what training sees.
        fresh.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
    else:
        fresh.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def open_sanitized(photo_bytes: bytes) -> Image.Image:
    """Open a photo produced by :func:`sanitize_upload` (or any plain JPEG/PNG) as RGB.

    Args:
        photo_bytes: JPEG or PNG bytes.

    Returns:
        A fully loaded RGB image.

    Raises:
        ValueError: The bytes are not a readable JPEG or PNG, or exceed Pillow's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    """
    # Pillow's decompression-bomb limit is the guard here: these bytes passed sanitize_upload once,
    # so anything above it means the stored object is not what ingest wrote.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(photo_bytes), formats=("JPEG", "PNG")) as image:
                image.load()
                rgb = image.convert("RGB")
        except Exception as error:
            raise ValueError(f"not a readable sanitised photo (JPEG or PNG expected): {error}") from error
    rgb.info = {}
    return rgb


# --------------------------------------------------------------------------------------------------
# Training crops
# --------------------------------------------------------------------------------------------------


def upper_center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The default training crop: the largest square, centred horizontally, biased upward.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        ``(left, top, right, bottom)`` of a square inside the image.
    """
    side = min(width, height)
    left = (width - side) // 2
    top = int(round((height - side) * FACE_VERTICAL_BIAS))
    return left, top, left + side, top + side


def training_crop(image: Image.Image, resolution: int, *,
                  crop_box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Cut the square a model trains on and resize it to ``resolution``.

    Args:
        image: The (sanitised, upright) photo.
        resolution: Side of the output square in pixels.
        crop_box: ``(left, top, right, bottom)`` of a square inside the image. This is the hook for
            face-aware cropping: a face detector passes the aligned box around the face. ``None``
            uses :func:`upper_center_square_box`.

    Returns:
        An RGB image of ``resolution`` x ``resolution`` pixels.

    Raises:
        ValueError: ``resolution`` is not a positive integer, or ``crop_box`` is not a non-empty
            square inside the image.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer number of pixels but is {resolution!r}")
    width, height = image.size
    if crop_box is None:
        box = upper_center_square_box(width, height)
    else:
        if len(crop_box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in crop_box):
            raise ValueError(f"crop_box must be four integers (left, top, right, bottom) but is {crop_box!r}")
        left, top, right, bottom = crop_box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"crop_box {crop_box} must lie inside the {width}x{height} image with left < right "
                             f"and top < bottom")
        if right - left != bottom - top:
            raise ValueError(f"crop_box {crop_box} must be square but is {right - left}x{bottom - top}; a "
                             f"non-square box would stretch the face")
        box = (left, top, right, bottom)
    cropped = image.crop(box)
    if cropped.mode != "RGB":
        cropped = to_rgb(cropped)
    # Lanczos keeps facial detail when shrinking; reducing_gap makes large shrinks fast at equal quality.
    return cropped.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------------
# Metadata detection
# --------------------------------------------------------------------------------------------------


def has_metadata(data: bytes) -> bool:
    """Whether an image file carries any metadata (see :func:`find_metadata`).

    Args:
        data: Image file bytes.

    Returns:
        True if EXIF, XMP, IPTC, ICC, text chunks, comments, thumbnails, unknown blocks or data after
        the end of the image are present.
    """
    return bool(find_metadata(data))


def find_metadata(data: bytes) -> list[MetadataBlock]:
    """List the metadata blocks in an image file.

    JPEG, PNG and WebP are walked block by block. Only pixel data and rendering parameters count
    as clean (JPEG: JFIF header without thumbnail, Adobe colour-transform marker, tables, frames,
    scans; PNG: IHDR, PLTE, IDAT, IEND, tRNS, gAMA, cHRM, sRGB, sBIT, bKGD, hIST, pHYs, sPLT, the
    APNG and HDR colour chunks; WebP: VP8/VP8L/VP8X/ALPH/ANIM/ANMF); every other block is reported.
    Other formats are checked through Pillow's parsed ``info`` only. Damaged files are walked as far
    as they go.

    Args:
        data: Image file bytes.

    Returns:
        The blocks found, in file order; empty when there is no metadata or the bytes are not an image.
    """
    image_format = _sniff_format(data)
    if image_format in ALLOWED_FORMATS:
        blocks, _ = _walk_container(data, image_format)
        return blocks
    return _pillow_metadata(data)


def _walk_container(data: bytes, image_format: str) -> tuple[list[MetadataBlock], bool]:
    """Return (metadata blocks, whether the container reached its proper end)."""
    if image_format == "JPEG":
        return _walk_jpeg(data)
    if image_format == "PNG":
        return _walk_png(data)
    return _walk_webp(data)


_JPEG_APP_SIGNATURES = (
    # (marker, payload prefix, kind); first match wins.
    (0xE1, b"Exif\x00", "exif"),
    (0xE1, b"http://ns.adobe.com/xap/1.0/\x00", "xmp"),
    (0xE1, b"http://ns.adobe.com/xmp/extension/\x00", "xmp"),
    (0xE2, b"ICC_PROFILE\x00", "icc"),
    (0xE2, b"MPF\x00", "multi_picture"),
    (0xED, b"Photoshop 3.0\x00", "iptc"),
    (0xE0, b"JFXX\x00", "thumbnail"),
)
_XMP_JPEG_PREFIXES = (b"http://ns.adobe.com/xap/1.0/\x00", b"http://ns.adobe.com/xmp/extension/\x00")


def _walk_jpeg(data: bytes) -> tuple[list[MetadataBlock], bool]:
    blocks: list[MetadataBlock] = []
    size = len(data)
    position = 2  # after SOI
    while position < size:
        if data[position] != 0xFF:
            return blocks, False  # garbage where a marker must be
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= size:
            break
        marker = data[position]
        position += 1
        if marker == 0xD9:  # EOI
            trailing = data[position:]
            if trailing.strip(_JPEG_PADDING):
                blocks.append(MetadataBlock("trailing_data", "JPEG after end of image", trailing))
            return blocks, True
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # standalone markers
            continue
        if position + 2 > size:
            break
        length = struct.unpack(">H", data[position:position + 2])[0]
        if length < 2:
            return blocks, False
        payload = data[position + 2:position + length]
        end = position + length
        if 0xE0 <= marker <= 0xEF:
            kind = _classify_jpeg_app(marker, payload)
            if kind is not None:
                if kind == "xmp":
                    payload = payload[len(next(p for p in _XMP_JPEG_PREFIXES if payload.startswith(p))):]
                blocks.append(MetadataBlock(kind, f"JPEG APP{marker - 0xE0}", payload))
        elif marker == 0xFE:
            blocks.append(MetadataBlock("comment", "JPEG COM", payload))
        if end > size:
            break
        position = end
        if marker == 0xDA:  # entropy-coded scan data runs until the next real marker
            while True:
                found = data.find(b"\xff", position)
                if found < 0 or found + 1 >= size:
                    position = size
                    break
                following = data[found + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    position = found + 1  # stuffed byte, restart marker or fill: still scan data
                    continue
                position = found
                break
    return blocks, False


def _classify_jpeg_app(marker: int, payload: bytes) -> str | None:
    for signature_marker, prefix, kind in _JPEG_APP_SIGNATURES:
        if marker == signature_marker and payload.startswith(prefix):
            return kind
    if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
        # JFIF: version, units, density, then thumbnail width/height and RGB thumbnail pixels.
        has_thumbnail = len(payload) >= 14 and (payload[12] or payload[13] or len(payload) > 14)
        return "thumbnail" if has_thumbnail else None
    if marker == 0xEE and payload.startswith(b"Adobe"):
        return None  # colour transform flag for CMYK/YCCK decoding, no personal data
    return "unknown"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CLEAN_CHUNKS = frozenset({
    b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"bKGD",
    b"hIST", b"pHYs", b"sPLT", b"acTL", b"fcTL", b"fdAT", b"cICP", b"mDCv", b"cLLi",
})
_PNG_METADATA_CHUNKS = {b"eXIf": "exif", b"iCCP": "icc", b"tIME": "timestamp"}
_PNG_TEXT_KEYWORDS = {  # keyword -> kind (ImageMagick/exiftool "Raw profile" conventions)
    b"XML:com.adobe.xmp": "xmp",
    b"Raw profile type exif": "exif",
    b"Raw profile type APP1": "exif",
    b"Raw profile type xmp": "xmp",
    b"Raw profile type iptc": "iptc",
    b"Raw profile type icc": "icc",
}


def _walk_png(data: bytes) -> tuple[list[MetadataBlock], bool]:
    blocks: list[MetadataBlock] = []
    size = len(data)
    position = len(_PNG_SIGNATURE)
    while position + 8 <= size:
        length, chunk_type = struct.unpack(">I4s", data[position:position + 8])
        if not chunk_type.isalpha():
            return blocks, False
        body = data[position + 8:position + 8 + length]
        end = position + 12 + length
        if chunk_type in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _png_text(chunk_type, body)
            kind = _PNG_TEXT_KEYWORDS.get(keyword, "text")
            where = f"PNG {chunk_type.decode()} {keyword.decode('latin-1')!r}"
            blocks.append(MetadataBlock(kind, where, text))
        elif chunk_type in _PNG_METADATA_CHUNKS:
            blocks.append(MetadataBlock(_PNG_METADATA_CHUNKS[chunk_type], f"PNG {chunk_type.decode()}", body))
        elif chunk_type not in _PNG_CLEAN_CHUNKS:
            blocks.append(MetadataBlock("unknown", f"PNG {chunk_type.decode()}", body))
        if end > size:
            return blocks, False
        position = end
        if chunk_type == b"IEND":
            if data[position:]:
                blocks.append(MetadataBlock("trailing_data", "PNG after IEND", data[position:]))
            return blocks, True
    return blocks, False


def _png_text(chunk_type: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Return (keyword, text) of a tEXt/zTXt/iTXt chunk; compressed text is inflated up to a bound."""
    keyword, _, rest = body.partition(b"\x00")
    if chunk_type == b"tEXt":
        return keyword, rest
    if chunk_type == b"zTXt":
        return keyword, _bounded_inflate(rest[1:])
    # iTXt: compression flag, method, language\0, translated keyword\0, text
    if len(rest) < 2:
        return keyword, b""
    compressed = rest[0] == 1
    after_language = rest[2:].partition(b"\x00")[2]
    text = after_language.partition(b"\x00")[2]
    return keyword, _bounded_inflate(text) if compressed else text


def _bounded_inflate(compressed: bytes) -> bytes:
    try:
        return zlib.decompressobj().decompress(compressed, MAX_DECOMPRESSED_TEXT_BYTES)
    except zlib.error:
        return compressed


_WEBP_CLEAN_CHUNKS = frozenset({b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"})
_WEBP_METADATA_CHUNKS = {b"EXIF": "exif", b"XMP ": "xmp", b"ICCP": "icc"}


def _walk_webp(data: bytes) -> tuple[list[MetadataBlock], bool]:
    blocks: list[MetadataBlock] = []
    if len(data) < 12:
        return blocks, False
    riff_end = 8 + struct.unpack("<I", data[4:8])[0]
    position = 12
    while position + 8 <= min(riff_end, len(data)):
        chunk_type, length = struct.unpack("<4sI", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if chunk_type in _WEBP_METADATA_CHUNKS:
            blocks.append(MetadataBlock(_WEBP_METADATA_CHUNKS[chunk_type],
                                        f"WebP {chunk_type.decode('latin-1')}", body))
        elif chunk_type not in _WEBP_CLEAN_CHUNKS:
            blocks.append(MetadataBlock("unknown", f"WebP {chunk_type.decode('latin-1')!r}", body))
        position += 8 + length + (length & 1)  # chunks are padded to even length
    complete = position == riff_end and riff_end <= len(data)
    if len(data) > riff_end and data[riff_end:].strip(b"\x00"):
        blocks.append(MetadataBlock("trailing_data", "WebP after RIFF", data[riff_end:]))
    return blocks, complete


_PILLOW_METADATA_KEYS = {
    "exif": "exif", "xmp": "xmp", "XML:com.adobe.xmp": "xmp", "icc_profile": "icc", "photoshop": "iptc",
    "iptc": "iptc", "comment": "comment",
}


def _pillow_metadata(data: bytes) -> list[MetadataBlock]:
    """Best-effort check for formats we do not walk ourselves (GIF comments, TIFF tags, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as image:
                blocks = [MetadataBlock(kind, f"{image.format} {key}", _as_bytes(image.info[key]))
                          for key, kind in _PILLOW_METADATA_KEYS.items() if image.info.get(key)]
                if not any(block.kind == "exif" for block in blocks) and len(image.getexif()):
                    blocks.append(MetadataBlock("exif", f"{image.format} tags", image.getexif().tobytes()))
                return blocks
        except Exception:
            return []


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------
# Format identification and messages
# --------------------------------------------------------------------------------------------------

_LABELS = {
    "JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "TIFF": "TIFF", "BMP": "BMP",
    "HEIF": "HEIC/HEIF", "AVIF": "AVIF", "PDF": "PDF", "PSD": "Photoshop (PSD)", "SVG": "SVG",
    "JPEG XL": "JPEG XL", "JPEG 2000": "JPEG 2000", "ICO": "icon (ICO)", "MPO": "JPEG",
}
_FORMAT_HINTS = {
    "HEIF": " (on an iPhone choose Settings > Camera > Formats > Most Compatible, or export the photo as JPEG)",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
_AVIF_BRANDS = (b"avif", b"avis")


def _sniff_format(data: bytes) -> str | None:
    """Name the format from the first bytes; None when no signature matches."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brands = data[8:64]
        if any(brand in brands for brand in _AVIF_BRANDS):
            return "AVIF"
        if any(brand in brands for brand in _HEIF_BRANDS):
            return "HEIF"
        return None
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    text_head = data[:1024].lstrip().lower()
    if text_head.startswith(b"<svg") or (text_head.startswith(b"<?xml") and b"<svg" in text_head):
        return "SVG"
    return None


def _identify_format(data: bytes, filename: str, name: str) -> str:
    """Return the allowed format of ``data`` or raise PhotoRejected."""
    image_format = _sniff_format(data)
    if image_format in ALLOWED_FORMATS:
        return image_format
    if image_format is None:
        # Let Pillow name rarer formats (BMP, ICO, TGA, ...) from their header, without decoding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with Image.open(io.BytesIO(data)) as probe:
                    image_format = probe.format
            except Exception:
                image_format = None
    if image_format is None:
        raise PhotoRejected("decode_failed", filename,
                            f"{name}: the file is not a readable image (it may be damaged or not a photo); "
                            f"upload a {ALLOWED_FORMATS_TEXT} photo")
    label = _LABELS.get(image_format, image_format)
    raise PhotoRejected("format_not_allowed", filename,
                        f"{name}: {label} images are not accepted; upload {ALLOWED_FORMATS_TEXT}"
                        f"{_FORMAT_HINTS.get(image_format, '')}")


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _display_name(filename: str) -> str:
    """The file's base name, safe to show: no folders (they may name a person's machine), no control characters."""
    base = re.split(r"[\\/]", str(filename or ""))[-1]
    base = _UNPRINTABLE.sub("?", base)
    if len(base) > 120:
        base = base[:117] + "..."
    return base or "photo"


def display_name(filename: str) -> str:
    """The file's base name as messages show it: no folders, no control characters, at most 120 characters.

    Args:
        filename: A file name or path as uploaded.

    Returns:
        The safe base name (``"photo"`` when nothing is left).
    """
    return _display_name(filename)


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.1f}".rstrip("0").rstrip(".")
