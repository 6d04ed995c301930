"""HTTP errors of the service: every one is ``{"detail": "<code>: <message>", "code": ...}``.

The worker's error codes (:mod:`storystudio.errors`) are the vocabulary; this module
only decides which HTTP status each one gets when a request fails synchronously:

* 422: the request does not match the job schema (``invalid_input``, ``unknown_task``,
  and FastAPI's own form/JSON validation, reworded to the same shape);
* 413: an input over its size limit (``input_too_large``);
* 400: any other problem with the caller's media or paths (``input_*``, ``invalid_image``,
  ``invalid_audio``, ``empty_audio``, ``audio_too_long``, ``image_too_large``, ``invalid_video``);
* 500: the server's side failed (``checkpoint_*``, ``out_of_memory``, ``generation_failed``,
  ``encode_failed``, ``storage_failed``, ``server_restarted``, ``internal_error``).

Codes the service adds: ``input_not_found`` (a path under the media root that does not
exist) and ``server_restarted`` (a job that was queued or running when the service stopped).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from storystudio.errors import StoryStudioError

SERVER_RESTARTED = "server_restarted"
INPUT_NOT_FOUND = "input_not_found"

_SCHEMA = frozenset({"invalid_input", "unknown_task"})
_CALLER_MEDIA = frozenset({"invalid_image", "invalid_audio", "empty_audio", "audio_too_long",
                           "image_too_large", "invalid_video", "invalid_media"})


def http_status(code: str) -> int:
    """The HTTP status a failed job or request with error ``code`` is answered with."""
    if code in _SCHEMA:
        return 422
    if code == "input_too_large":
        return 413
    if code.startswith("input_") or code in _CALLER_MEDIA:
        return 400
    return 500


def detail_response(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def error_response(error: dict[str, Any], **extra: Any) -> JSONResponse:
    """A worker error result (``{"error", "code"}``) as an HTTP error."""
    code = str(error.get("code") or "internal_error")
    return detail_response(http_status(code), str(error.get("error") or code), code=code, **extra)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:8]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form")]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    """Exception handlers that keep every error in the ``{"detail": ...}`` shape."""

    async def on_storystudio_error(_request: Request, exc: StoryStudioError) -> JSONResponse:
        return detail_response(http_status(exc.code), f"{exc.code}: {exc.message}", code=exc.code)

    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return detail_response(422, f"invalid_input: {_describe_validation(exc)}", code="invalid_input")

    async def on_http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(StoryStudioError, on_storystudio_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
