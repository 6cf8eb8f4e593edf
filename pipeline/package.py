"""Package: encode finished headshots, draw contact sheets, describe a batch in a manifest.

Every delivered headshot says in its own bytes that it was made by a trained model: an XMP packet
with the IPTC property ``Iptc4xmpExt:DigitalSourceType`` set to
``http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia``, the value that image
platforms read to label AI-generated pictures. It is the only metadata written: no software name,
no time, no person.

- PNG: an uncompressed ``iTXt`` chunk with keyword ``XML:com.adobe.xmp`` (the XMP specification's
  place for PNG), written before the image data.
- JPEG: an ``APP1`` segment starting ``http://ns.adobe.com/xap/1.0/\\0`` (Pillow's ``xmp=`` option).
"""

from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ElementTree
from datetime import datetime
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from pipeline.ingest import find_metadata, to_rgb

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
HEADSHOT_FORMATS = ("PNG", "JPEG")
PNG_XMP_KEYWORD = "XML:com.adobe.xmp"
IPTC_EXT_NAMESPACE = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_NAMESPACE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"

MANIFEST_SCHEMA_VERSION = 1
IMAGE_FIELDS = ("person", "style", "prompt", "negative_prompt", "seed", "model", "key", "file", "timings")

CONTACT_SHEET_PADDING_PX = 8
CONTACT_SHEET_CAPTION_PX = 20
CONTACT_SHEET_TITLE_PX = 32
MIN_TILE_PX = 32
_SHEET_BACKGROUND = (245, 245, 245)
_TILE_BACKGROUND = (225, 225, 225)
_TEXT_COLOR = (30, 30, 30)

_DIGITAL_SOURCE_TYPE_TAG = f"{{{IPTC_EXT_NAMESPACE}}}DigitalSourceType"
_RDF_RESOURCE = f"{{{RDF_NAMESPACE}}}resource"
_RDF_LI = f"{{{RDF_NAMESPACE}}}li"

_XMP_PACKET = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="{RDF_NAMESPACE}">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="{IPTC_EXT_NAMESPACE}">
   <Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="r"?>"""


# --------------------------------------------------------------------------------------------------
# Headshot files
# --------------------------------------------------------------------------------------------------


def encode_headshot(image: Image.Image, *, fmt: str = "PNG", quality: int = 95) -> bytes:
    """Encode a generated headshot with its AI-provenance XMP and no other metadata.

    Args:
        image: The generated image (any mode; converted to RGB, transparency on white).
        fmt: ``"PNG"`` or ``"JPEG"`` (case-insensitive; ``"JPG"`` means JPEG).
        quality: JPEG quality from 1 to 100; ignored for PNG.

    Returns:
        The encoded file, carrying ``DigitalSourceType = trainedAlgorithmicMedia`` in XMP.

    Raises:
        ValueError: ``fmt`` is not PNG or JPEG, or ``quality`` is outside 1..100.
    """
    normalized = fmt.upper() if isinstance(fmt, str) else fmt
    normalized = "JPEG" if normalized == "JPG" else normalized
    if normalized not in HEADSHOT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(HEADSHOT_FORMATS)} but is {fmt!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100 but is {quality!r}")

    rgb = image if image.mode == "RGB" else to_rgb(image)
    # A fresh image: Pillow would otherwise copy e.g. an ICC profile or comment from image.info.
    fresh = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    if normalized == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_XMP_KEYWORD, _XMP_PACKET, lang="", tkey="", zip=False)
        fresh.save(buffer, "PNG", pnginfo=info, compress_level=6)
    else:
        fresh.save(buffer, "JPEG", quality=quality, subsampling=0, optimize=True,
                   xmp=_XMP_PACKET.encode("utf-8"))
    return buffer.getvalue()


def read_digital_source_type(data: bytes) -> str | None:
    """Read the IPTC DigitalSourceType from an image's XMP.

    Args:
        data: JPEG, PNG or WebP bytes.

    Returns:
        The DigitalSourceType URI, or None when the file has no XMP with that property (or is not
        an image).
    """
    for block in find_metadata(data):
        if block.kind != "xmp":
            continue
        value = _digital_source_type_from_xmp(block.payload)
        if value:
            return value
    return None


def _digital_source_type_from_xmp(packet: bytes) -> str | None:
    # XMP never needs a DTD; refusing one rules out entity-expansion attacks on the XML parser.
    if b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        return None
    try:
        root = ElementTree.fromstring(packet.strip(b"\x00 \t\r\n"))
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        # The property may be written as an attribute of rdf:Description, as an element with text,
        # as an element with rdf:resource, or (non-standard but seen) as a list.
        if _DIGITAL_SOURCE_TYPE_TAG in element.attrib:
            return element.attrib[_DIGITAL_SOURCE_TYPE_TAG].strip()
        if element.tag == _DIGITAL_SOURCE_TYPE_TAG:
            if element.get(_RDF_RESOURCE):
                return element.get(_RDF_RESOURCE).strip()
            if element.text and element.text.strip():
                return element.text.strip()
            for item in element.iter(_RDF_LI):
                if item.text and item.text.strip():
                    return item.text.strip()
    return None


# --------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------


def contact_sheet(tiles: list[tuple[Image.Image, str]], *, columns: int = 4, tile_px: int = 192,
                  title: str | None = None) -> Image.Image:
    """Lay images out in a grid with a caption under each, for a quick review of a batch.

    The sheet is ``min(columns, len(tiles))`` tiles wide; each tile is ``tile_px`` square (the image
    fitted inside, aspect kept) with a ``CONTACT_SHEET_CAPTION_PX`` caption band below; tiles are
    separated by ``CONTACT_SHEET_PADDING_PX``; a title adds a ``CONTACT_SHEET_TITLE_PX`` bar on top.

    Args:
        tiles: ``(image, caption)`` pairs; captions too long for a tile are shortened with "...".
        columns: Most tiles per row.
        tile_px: Side of each tile in pixels, at least ``MIN_TILE_PX``.
        title: Text for a bar above the grid; None for no bar.

    Returns:
        An RGB image.

    Raises:
        ValueError: ``tiles`` is empty, ``columns`` is below 1 or ``tile_px`` below ``MIN_TILE_PX``.
    """
    if not tiles:
        raise ValueError("contact_sheet needs at least one (image, caption) tile but got none")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer but is {columns!r}")
    if isinstance(tile_px, bool) or not isinstance(tile_px, int) or tile_px < MIN_TILE_PX:
        raise ValueError(f"tile_px must be an integer of at least {MIN_TILE_PX} but is {tile_px!r}")

    pad = CONTACT_SHEET_PADDING_PX
    grid_columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / grid_columns)
    title_height = CONTACT_SHEET_TITLE_PX if title else 0
    cell_height = tile_px + CONTACT_SHEET_CAPTION_PX
    sheet = Image.new("RGB", (grid_columns * (tile_px + pad) + pad, title_height + rows * (cell_height + pad) + pad),
                      _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    caption_font = _font(12)

    if title:
        title_font = _font(18)
        text = _fit_text(draw, title, title_font, sheet.width - 2 * pad)
        draw.text((pad, title_height // 2 + pad // 2), text, fill=_TEXT_COLOR, font=title_font, anchor="lm")

    for index, (image, caption) in enumerate(tiles):
        row, column = divmod(index, grid_columns)
        left = pad + column * (tile_px + pad)
        top = title_height + pad + row * (cell_height + pad)
        tile = Image.new("RGB", (tile_px, tile_px), _TILE_BACKGROUND)
        fitted = ImageOps.contain(image if image.mode == "RGB" else to_rgb(image), (tile_px, tile_px),
                                  Image.Resampling.LANCZOS)
        tile.paste(fitted, ((tile_px - fitted.width) // 2, (tile_px - fitted.height) // 2))
        sheet.paste(tile, (left, top))
        text = _fit_text(draw, str(caption), caption_font, tile_px)
        draw.text((left + tile_px // 2, top + tile_px + CONTACT_SHEET_CAPTION_PX // 2), text,
                  fill=_TEXT_COLOR, font=caption_font, anchor="mm")
    return sheet


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """Shorten ``text`` with '...' until it fits ``max_width`` pixels."""
    text = " ".join(text.split())  # newlines and tabs would break the one-line layout
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Pillow's bitmap fallback font (no FreeType) only encodes Latin-1.
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text.rstrip() + "..."


# --------------------------------------------------------------------------------------------------
# Batch manifest
# --------------------------------------------------------------------------------------------------


def build_batch_manifest(*, tenant: str, batch_id: str, batch_name: str, base_model: str,
                         persons: list[dict], generated_at: str) -> dict:
    """Describe a finished batch as a JSON-ready dict (written next to the images).

    Only what the caller passes goes in; this function adds no names, e-mails or other personal
    fields. Keys of each person and image beyond the documented ones are kept as given.

    Args:
        tenant: Tenant slug.
        batch_id: Batch identifier.
        batch_name: Display name of the batch.
        base_model: The base model the batch used.
        persons: One dict per person with ``person_id`` (str), ``state`` (str) and ``images``: a
            list of dicts with ``person``, ``style``, ``prompt``, ``negative_prompt`` (str),
            ``seed`` (int), ``model``, ``key``, ``file`` (str) and ``timings`` (dict of name to
            seconds).
        generated_at: ISO 8601 timestamp, e.g. ``"2026-11-26T10:00:00Z"``.

    Returns:
        ``{"schema_version", "tenant", "batch_id", "batch_name", "base_model", "generated_at",
        "summary": {"persons", "images", "persons_by_state"}, "persons": [...]}``.

    Raises:
        ValueError: A field is missing or has the wrong type, ``generated_at`` is not ISO 8601, or
            a value cannot be written as JSON; the message names the field.
    """
    for field_name, value in (("tenant", tenant), ("batch_id", batch_id), ("batch_name", batch_name),
                              ("base_model", base_model), ("generated_at", generated_at)):
        _require_text(field_name, value)
    try:
        datetime.fromisoformat(generated_at)
    except ValueError as error:
        raise ValueError(f"generated_at must be an ISO 8601 timestamp such as '2026-11-26T10:00:00Z' "
                         f"but is {generated_at!r}") from error
    if not isinstance(persons, list):
        raise ValueError(f"persons must be a list of dicts but is {type(persons).__name__}")

    manifest_persons = []
    persons_by_state: dict[str, int] = {}
    image_count = 0
    for position, person in enumerate(persons):
        where = f"persons[{position}]"
        if not isinstance(person, dict):
            raise ValueError(f"{where} must be a dict with person_id, state and images but is "
                             f"{type(person).__name__}")
        _require_text(f"{where}.person_id", person.get("person_id"))
        _require_text(f"{where}.state", person.get("state"))
        images = person.get("images")
        if not isinstance(images, list):
            raise ValueError(f"{where}.images must be a list (empty if none) but is {images!r}")
        manifest_images = [_checked_image(f"{where}.images[{i}]", image) for i, image in enumerate(images)]
        extra = {key: value for key, value in person.items() if key not in ("person_id", "state", "images")}
        manifest_persons.append({"person_id": person["person_id"], "state": person["state"], **extra,
                                 "images": manifest_images})
        persons_by_state[person["state"]] = persons_by_state.get(person["state"], 0) + 1
        image_count += len(manifest_images)

    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "tenant": tenant,
        "batch_id": batch_id,
        "batch_name": batch_name,
        "base_model": base_model,
        "generated_at": generated_at,
        "summary": {"persons": len(manifest_persons), "images": image_count,
                    "persons_by_state": dict(sorted(persons_by_state.items()))},
        "persons": manifest_persons,
    }
    try:
        # Round-trip so the result shares no mutable objects with the caller's dicts.
        return json.loads(json.dumps(manifest, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"the manifest cannot be written as JSON: {error}") from error


def _checked_image(where: str, image: Any) -> dict:
    if not isinstance(image, dict):
        raise ValueError(f"{where} must be a dict with {', '.join(IMAGE_FIELDS)} but is {type(image).__name__}")
    missing = [name for name in IMAGE_FIELDS if name not in image]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; each image needs {', '.join(IMAGE_FIELDS)}")
    for name in ("person", "style", "model", "key", "file"):
        _require_text(f"{where}.{name}", image[name])
    for name in ("prompt", "negative_prompt"):
        if not isinstance(image[name], str):
            raise ValueError(f"{where}.{name} must be a string (may be empty) but is {image[name]!r}")
    seed = image["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}.seed must be an integer but is {seed!r}")
    timings = image["timings"]
    if not isinstance(timings, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in timings.items()):
        raise ValueError(f"{where}.timings must map names to finite numbers of seconds but is {timings!r}")
    ordered = {name: image[name] for name in IMAGE_FIELDS}
    ordered.update({key: value for key, value in image.items() if key not in ordered})
    return ordered


def _require_text(field_name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name} must be a non-empty string but is {value!r}")
