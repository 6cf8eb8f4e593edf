"""Packaging: AI-provenance XMP in every headshot, contact sheets, batch manifests."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline.ingest import find_metadata
from pipeline.package import (
    CONTACT_SHEET_CAPTION_PX,
    CONTACT_SHEET_PADDING_PX,
    CONTACT_SHEET_TITLE_PX,
    TRAINED_ALGORITHMIC_MEDIA,
    build_batch_manifest,
    contact_sheet,
    encode_headshot,
    read_digital_source_type,
)


def headshot(size=(96, 128), colour=(40, 90, 160)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((200, 160, 120), (20, 20, 60, 70))
    return image


# ---------------------------------------------------------------------------------------------- encode_headshot


@pytest.mark.parametrize("fmt, pil_format", [("PNG", "PNG"), ("JPEG", "JPEG"), ("jpg", "JPEG"), ("png", "PNG")])
def test_headshot_declares_it_was_made_by_a_trained_model(fmt, pil_format):
    data = encode_headshot(headshot(), fmt=fmt)

    assert read_digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA
    assert [block.kind for block in find_metadata(data)] == ["xmp"]  # and nothing else
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size, image.mode) == (pil_format, (96, 128), "RGB")


def test_png_xmp_sits_in_an_itxt_chunk_with_the_standard_keyword():
    data = encode_headshot(headshot(), fmt="PNG")
    assert b"iTXtXML:com.adobe.xmp\x00\x00\x00" in data  # uncompressed, as the XMP spec advises
    with Image.open(io.BytesIO(data)) as image:
        assert "trainedAlgorithmicMedia" in image.info["XML:com.adobe.xmp"]


def test_jpeg_xmp_sits_in_an_app1_segment():
    data = encode_headshot(headshot(), fmt="JPEG")
    assert b"\xff\xe1" in data and b"http://ns.adobe.com/xap/1.0/\x00" in data
    with Image.open(io.BytesIO(data)) as image:
        assert b"trainedAlgorithmicMedia" in image.info["xmp"]


def test_png_headshot_pixels_are_lossless():
    data = encode_headshot(headshot(), fmt="PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image), np.asarray(headshot()))


def test_metadata_of_the_input_image_is_not_carried_over():
    image = headshot()
    image.info["comment"] = b"person: Jane Doe"
    image.info["icc_profile"] = b"fake profile"
    for fmt in ("PNG", "JPEG"):
        data = encode_headshot(image, fmt=fmt)
        assert b"Jane Doe" not in data and b"fake profile" not in data
        assert [block.kind for block in find_metadata(data)] == ["xmp"]


def test_transparent_headshot_is_flattened_on_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    data = encode_headshot(image, fmt="PNG")
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "RGB" and decoded.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "webp", ""])
def test_unknown_format_is_refused_naming_the_allowed_ones(fmt):
    with pytest.raises(ValueError, match="PNG, JPEG"):
        encode_headshot(headshot(), fmt=fmt)


@pytest.mark.parametrize("quality", [0, 101, 95.0])
def test_bad_jpeg_quality_is_refused(quality):
    with pytest.raises(ValueError, match="quality"):
        encode_headshot(headshot(), fmt="JPEG", quality=quality)


def test_plain_image_has_no_digital_source_type():
    buffer = io.BytesIO()
    headshot().save(buffer, "PNG")
    assert read_digital_source_type(buffer.getvalue()) is None
    assert read_digital_source_type(b"not an image") is None


def test_digital_source_type_written_as_attribute_by_other_tools_is_read():
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
              'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"/>'
              '</rdf:RDF></x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet, zip=True)
    buffer = io.BytesIO()
    headshot().save(buffer, "PNG", pnginfo=info)
    assert read_digital_source_type(buffer.getvalue()).endswith("/digitalCapture")


def test_xmp_with_a_dtd_is_ignored():
    packet = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">'
              '&a;</x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet)
    buffer = io.BytesIO()
    headshot().save(buffer, "PNG", pnginfo=info)
    assert read_digital_source_type(buffer.getvalue()) is None


# ---------------------------------------------------------------------------------------------- contact_sheet


def _sheet_size(columns: int, rows: int, tile_px: int, title: bool) -> tuple[int, int]:
    pad, caption = CONTACT_SHEET_PADDING_PX, CONTACT_SHEET_CAPTION_PX
    return (columns * (tile_px + pad) + pad,
            (CONTACT_SHEET_TITLE_PX if title else 0) + rows * (tile_px + caption + pad) + pad)


def test_contact_sheet_with_one_tile():
    sheet = contact_sheet([(headshot(), "corporate-grey 1")], tile_px=100)
    assert sheet.mode == "RGB"
    assert sheet.size == _sheet_size(1, 1, 100, title=False)


def test_contact_sheet_with_five_tiles_wraps_to_a_second_row():
    tiles = [(headshot(colour=(10 * i, 50, 200)), f"style {i}") for i in range(5)]
    sheet = contact_sheet(tiles, columns=4, tile_px=80, title="Grace Hopper - demo-team")
    assert sheet.size == _sheet_size(4, 2, 80, title=True)
    # The fifth tile starts the second row: its colour is in the first column, below the first row.
    pad = CONTACT_SHEET_PADDING_PX
    top_of_second_row = CONTACT_SHEET_TITLE_PX + pad + 80 + CONTACT_SHEET_CAPTION_PX + pad
    assert sheet.getpixel((pad + 40, top_of_second_row + 5)) == (40, 50, 200)


def test_contact_sheet_draws_captions_and_title():
    plain = contact_sheet([(headshot(), "")], tile_px=64)
    captioned = contact_sheet([(headshot(), "a rather long caption that will not fit the tile")], tile_px=64,
                              title="Title")
    caption_band = (0, plain.height - CONTACT_SHEET_CAPTION_PX - CONTACT_SHEET_PADDING_PX, plain.width,
                    plain.height - CONTACT_SHEET_PADDING_PX)
    assert plain.crop(caption_band).getextrema() != captioned.crop(
        (caption_band[0], caption_band[1] + CONTACT_SHEET_TITLE_PX, caption_band[2],
         caption_band[3] + CONTACT_SHEET_TITLE_PX)).getextrema()
    title_bar = np.asarray(captioned.crop((0, 0, captioned.width, CONTACT_SHEET_TITLE_PX)))
    assert len(np.unique(title_bar.reshape(-1, 3), axis=0)) > 1


def test_contact_sheet_needs_tiles():
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])
    with pytest.raises(ValueError, match="columns"):
        contact_sheet([(headshot(), "x")], columns=0)


# ---------------------------------------------------------------------------------------------- manifest


def _image(style: str, seed: int) -> dict:
    return {"person": "p-1", "style": style, "prompt": "a photo of sks person, grey backdrop",
            "negative_prompt": "blurry", "seed": seed, "model": "tiny", "key": f"out/p-1/{style}-{seed}.png",
            "file": f"{style}-{seed}.png", "timings": {"generate_s": 0.61, "encode_s": 0.01}}


def _manifest(**changes):
    arguments = dict(tenant="demo", batch_id="b-20261126-1", batch_name="demo-team", base_model="tiny",
                     generated_at="2026-11-26T10:00:00Z",
                     persons=[{"person_id": "p-1", "state": "done",
                               "images": [_image("office", 1), _image("office", 2)]},
                              {"person_id": "p-2", "state": "needs_photos", "images": []}])
    arguments.update(changes)
    return build_batch_manifest(**arguments)


def test_manifest_is_json_with_a_schema_version_and_summary():
    manifest = _manifest()
    assert json.loads(json.dumps(manifest)) == manifest
    assert manifest["schema_version"] == 1
    assert manifest["summary"] == {"persons": 2, "images": 2, "persons_by_state": {"done": 1, "needs_photos": 1}}
    assert manifest["persons"][0]["images"][1]["seed"] == 2


def test_manifest_adds_no_personal_fields():
    text = json.dumps(_manifest())
    for field in ('"name"', '"email"'):
        assert field not in text


def test_manifest_does_not_share_objects_with_the_caller():
    persons = [{"person_id": "p-1", "state": "done", "images": [_image("office", 1)]}]
    manifest = _manifest(persons=persons)
    snapshot = copy.deepcopy(manifest)
    persons[0]["images"][0]["timings"]["generate_s"] = 99.0
    assert manifest == snapshot


@pytest.mark.parametrize("changes, message", [
    ({"generated_at": "yesterday"}, "generated_at"),
    ({"tenant": ""}, "tenant"),
    ({"persons": [{"person_id": "p-1", "state": "done", "images": [{**_image("office", 1), "seed": "7"}]}]},
     r"persons\[0\].images\[0\].seed"),
    ({"persons": [{"person_id": "p-1", "state": "done", "images": [{"style": "office"}]}]}, "lacks"),
    ({"persons": [{"person_id": "p-1", "images": []}]}, r"persons\[0\].state"),
    ({"persons": [{"person_id": "p-1", "state": "done", "images": [],
                   "extra": float("nan")}]}, "JSON"),
])
def test_manifest_refuses_bad_input_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        _manifest(**changes)
