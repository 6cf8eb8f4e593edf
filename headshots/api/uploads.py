"""Multipart photo uploads, read part by part as the body streams in.

Each file part is spooled to a temporary file (in memory up to ``SPOOL_MEMORY_BYTES``, on disk past
that) and stops being kept once it passes the photo cap, so a request holds at most one photo, of at
most ``api.max_photo_bytes``, at a time. A part is handed to the caller as soon as it ends, so photos
are stored while later ones are still arriving. Starlette's form parser is not used: it caps fields,
not files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from typing import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from headshots.api.errors import ApiError

PHOTOS_FIELD = "photos"
SPOOL_MEMORY_BYTES = 1024 * 1024


@dataclass
class FilePart:
    """One part of the body: its field name, file name (None for a plain field) and contents."""

    field: str
    filename: str | None
    size: int = 0
    over_cap: bool = False
    spool: SpooledTemporaryFile | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def read(self) -> bytes:
        assert self.spool is not None and not self.over_cap
        self.spool.seek(0)
        return self.spool.read()

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def multipart_boundary(request: Request) -> bytes:
    """The body's multipart boundary.

    Raises:
        ApiError: 422 when the body is not ``multipart/form-data`` with a boundary.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        shown = content_type.decode("latin-1") or "none"
        raise ApiError(422, "unsupported_content_type", f"send the photos as multipart/form-data, each file in a "
                       f"part named `{PHOTOS_FIELD}` (curl -F {PHOTOS_FIELD}=@front.jpg), not {shown}", "Content-Type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(422, "invalid_multipart", "the multipart/form-data Content-Type has no boundary parameter",
                       "Content-Type")
    return boundary


async def file_parts(request: Request, *, max_part_bytes: int) -> AsyncIterator[FilePart]:
    """The body's parts in order, each yielded when it has fully arrived; the caller closes each one.

    A part larger than ``max_part_bytes`` is yielded with ``over_cap`` set and no contents: its bytes
    are read and dropped as they arrive.

    Raises:
        ApiError: 422 when the body is not well-formed multipart/form-data.
    """
    boundary = multipart_boundary(request)
    finished: list[FilePart] = []
    pending_writes: list[tuple[FilePart, bytes]] = []
    current: FilePart | None = None
    # Part headers are bounded by the parser (8 headers of at most 4 KiB each).
    header_name, header_value = bytearray(), bytearray()
    ended = False

    def on_part_begin() -> None:
        nonlocal current
        current = FilePart(field="", filename=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        assert current is not None
        current.headers[header_name.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        assert current is not None
        _, params = parse_options_header(current.headers.get("content-disposition", ""))
        current.field = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        current.filename = filename.decode("utf-8", "replace") if filename is not None else None
        current.spool = SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        assert current is not None
        current.size += end - start
        if current.size > max_part_bytes:
            current.over_cap = True
        elif end > start:
            pending_writes.append((current, data[start:end]))

    def on_part_end() -> None:
        nonlocal current
        assert current is not None
        finished.append(current)
        current = None

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end})
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except MultipartParseError as error:
                raise ApiError(422, "invalid_multipart", f"the body is not valid multipart/form-data ({error})",
                               "body") from None
            for part, data in pending_writes:
                if part.over_cap:
                    part.close()
                elif part.size > SPOOL_MEMORY_BYTES:  # on disk by now: keep the event loop free
                    await run_in_threadpool(part.spool.write, data)
                else:
                    part.spool.write(data)
            pending_writes.clear()
            while finished:
                part = finished.pop(0)
                if part.over_cap:
                    part.close()
                yield part
        if not ended:
            raise ApiError(422, "invalid_multipart", "the body ended before the closing multipart boundary; files "
                           "before the cut were stored (repeating them is a no-op)", "body")
    finally:
        for part, _ in pending_writes:
            part.close()
        for part in finished:
            part.close()
        if current is not None:
            current.close()
