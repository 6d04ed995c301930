"""Errors that reach a job result.

Every failure a caller can cause or observe is a :class:`StoryStudioError` with a
stable machine-readable ``code``; the handler turns it into
``{"error": message, "code": code}`` so the story app can branch on the code
without parsing messages.
"""

from __future__ import annotations


class StoryStudioError(Exception):
    """Base class: an error with a stable code that is safe to show the caller."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_result(self) -> dict[str, str]:
        """``{"error": "<code>: <message>", "code": "<code>"}``.

        The code is repeated at the front of the message because RunPod keeps only
        the ``error`` string of a failed job in some responses (``/runsync`` of the
        local test API drops everything else); callers can always recover it.
        """
        return {"error": f"{self.code}: {self.message}", "code": self.code}


class InvalidInput(StoryStudioError):
    """The job input does not match the schema (unknown task, missing field, out of range).

    Codes: ``invalid_input``, ``unknown_task``; ``invalid_config`` for a bad env var at start-up;
    ``fp8_unsupported`` when a job demands FP8 linears this device cannot run.
    """

    code = "invalid_input"


class InputFetchError(StoryStudioError):
    """An input URL/base64 payload could not be fetched or decoded.

    Codes: ``input_forbidden`` (scheme or address not allowed), ``input_download_failed``
    (HTTP error, timeout, connection), ``input_too_large``, ``input_empty`` (empty body or
    payload), ``input_invalid_base64``.
    """

    code = "input_download_failed"


class MediaError(StoryStudioError):
    """Image/audio/video bytes are not what they claim to be.

    Codes: ``invalid_image``, ``image_too_large`` (pixel limit, decompression bomb),
    ``invalid_audio``, ``empty_audio``, ``audio_too_long``, ``invalid_video``, ``encode_failed``.
    """

    code = "invalid_media"


class CheckpointError(StoryStudioError):
    """A model folder is missing files or holds files that do not match the layout.

    Codes: ``checkpoint_missing``, ``checkpoint_corrupt``, ``checkpoint_mismatch``.
    """

    code = "checkpoint_missing"


class GenerationError(StoryStudioError):
    """The model failed while generating (``generation_failed``, ``out_of_memory``; on a
    multi-GPU worker ``rank_failed``: a rank died or the ranks fell out of step)."""

    code = "generation_failed"


class StorageError(StoryStudioError):
    """Uploading or writing a result failed (``storage_failed``)."""

    code = "storage_failed"


class PreflightError(StoryStudioError):
    """This machine cannot serve jobs (``preflight_failed``): an unusable GPU, or one too small for Wan.

    Raised at start-up by :mod:`storystudio.preflight`, never as a job result: the
    process exits so that RunPod marks the worker unhealthy.
    """

    code = "preflight_failed"
