"""Request body and upload size limits, derived from the worker's input limits (one definition of each limit).

An upload is refused as early as possible: a ``Content-Length`` over the limit gets
413 before a byte of the body is read, and a body without a length (chunked) is
counted while it streams and cut off at the limit. The limits are not new numbers:

* ``POST /generate-video`` (multipart): one image and one audio file, so
  ``max_image_bytes + max_audio_bytes`` (``STORYSTUDIO_MAX_IMAGE_MB`` /
  ``STORYSTUDIO_MAX_AUDIO_MB``) plus room for the form's text fields;
  each file is then checked against its own kind's limit (:func:`check_upload`);
* ``POST /jobs`` (JSON): one image, one audio and one pose video inline as base64
  (4/3 of their limits) plus room for the settings; stories with many scenes should
  pass URLs, as on RunPod;
* everything else (``/generate/speech-to-video`` takes paths): ``OTHER_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storystudio.errors import InputFetchError
from storystudio.inputs import InputLimits, Kind
from storystudio.serve.errors import detail_response

MIB = 1024 * 1024
FORM_OVERHEAD_BYTES = 1 * MIB  # multipart boundaries, headers, prompt and the other text fields
OTHER_BYTES = 1 * MIB


class BodyTooLarge(HTTPException):
    """413 raised from inside ``receive``; FastAPI re-raises it from body parsing as is."""

    def __init__(self, size: int, limit: int, *, streamed: bool = False) -> None:
        what = f"more than {limit} bytes" if streamed else f"{size} bytes"
        super().__init__(413, f"input_too_large: the request body is {what}, over the limit of {limit} bytes")


@dataclass(frozen=True)
class BodyLimits:
    """Largest request body per route, in bytes."""

    generate_video: int
    jobs: int
    other: int = OTHER_BYTES

    @classmethod
    def from_inputs(cls, limits: InputLimits) -> BodyLimits:
        inline = limits.max_image_bytes + limits.max_audio_bytes + limits.max_video_bytes
        return cls(
            generate_video=limits.max_image_bytes + limits.max_audio_bytes + FORM_OVERHEAD_BYTES,
            jobs=-(-inline * 4 // 3) + OTHER_BYTES,
        )

    def for_path(self, path: str) -> int:
        if path == "/generate-video":
            return self.generate_video
        if path == "/jobs":
            return self.jobs
        return self.other


def check_upload(data: bytes, kind: Kind, limits: InputLimits, field: str) -> bytes:
    """One uploaded file against the worker's limit for its kind; empty files are refused too."""
    limit = limits.max_bytes(kind)
    if len(data) > limit:
        raise InputFetchError(f"{field}: the file is {len(data)} bytes, over the limit of {limit} bytes",
                              code="input_too_large")
    if not data:
        raise InputFetchError(f"{field}: the file is empty", code="input_empty")
    return data


class BodyLimitMiddleware:
    """Pure ASGI: 413 for bodies over :meth:`BodyLimits.for_path`."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        length = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            exc = BodyTooLarge(int(length), limit)
            await detail_response(exc.status_code, exc.detail)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(seen, limit, streamed=True)
            return message

        await self.app(scope, limited, send)
