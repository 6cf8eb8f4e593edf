"""Every error the API answers is JSON ``{code, message, field}`` with the status that fits.

``code`` is stable (for programs), ``message`` one sentence saying what was wrong and how to fix it,
``field`` the request field at fault (a body path such as ``persons[0].name``, a path or query
parameter, a header) or null. Nothing else reaches a client: no stack trace, no store address.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.state import StateConflict

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than success; raised anywhere in a request, turned into JSON here."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, *,
                 headers: dict[str, str] | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}
        self.problems = problems

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if self.problems:
            body["problems"] = self.problems
        return body


def not_found(what: str, value: str, field: str) -> ApiError:
    """The same answer whether the thing does not exist or belongs to another tenant: never leak which."""
    return ApiError(404, f"{what}_not_found", f"no {what} {value!r} for this tenant", field)


def _field_of(location: tuple | list) -> str | None:
    parts = [str(part) for part in location]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        problems = []
        for item in errors:
            where = _field_of(item.get("loc", ())) or "body"
            problems.append(f"{where}: {item.get('msg', 'is not valid')}")
        first = errors[0] if errors else {}
        field = _field_of(first.get("loc", ()))
        message = problems[0] if problems else "the request is not valid"
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON: send a JSON document (Content-Type: application/json)"
        body = {"code": "invalid_request", "message": message, "field": field}
        if len(problems) > 1:
            body["problems"] = problems
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: ("not_found", "no such endpoint: see /openapi.json for the API's paths"),
                 405: ("method_not_allowed", "this path does not take that method: see /openapi.json")}
        code, message = codes.get(error.status_code, ("http_error", str(error.detail)))
        if error.status_code == 400 and isinstance(error.__cause__, RecursionError):
            # FastAPI's answer when the JSON decoder gives up on a body nested past Python's recursion limit.
            code, message = "invalid_request", "the body is nested too deeply to be read as JSON"
        return JSONResponse({"code": code, "message": message, "field": None}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(StateConflict)
    async def state_conflict(_: Request, __: StateConflict) -> JSONResponse:
        # A compare-and-swap write lost to another writer that no route handled itself: the request
        # raced another one (or the coordinator), which is the client's to retry, not a server error.
        return JSONResponse({"code": "conflict", "message": "the resource changed while the request ran (a "
                             "concurrent request?); read it again and retry", "field": None}, status_code=409)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        # The details go to the server's log, never to the client.
        logger.exception("unexpected error in an API request")
        return JSONResponse({"code": "internal_error", "message": "the server could not complete the request; "
                             "try again, and tell the operator if it persists", "field": None}, status_code=500)
