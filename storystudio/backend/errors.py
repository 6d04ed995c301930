"""Errors raised by the backend client.

They reuse :class:`storystudio.errors.StoryStudioError` so the story app can branch on
``code`` the same way it does for worker results. Messages never contain the API key:
the client scrubs every message it builds (see :func:`storystudio.backend.auth.scrub`).
"""

from __future__ import annotations

from storystudio.errors import StoryStudioError


class BackendError(StoryStudioError):
    """Base class of everything the backend client raises on purpose."""

    code = "backend_error"


class ConfigError(BackendError):
    """Missing/invalid configuration: no API key, unreadable key file, bad story file."""

    code = "config_error"


class RunPodAPIError(BackendError):
    """An HTTP call to RunPod failed for good (non-retryable status, or retries exhausted).

    ``status`` is the HTTP status (``None`` for timeouts and connection errors),
    ``attempts`` how many tries were made.
    """

    code = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        attempts: int = 1,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.attempts = attempts


class AuthError(RunPodAPIError):
    """401/403: the API key is missing, wrong or lacks permission. Never retried."""

    code = "auth_failed"


class RequestTimeout(RunPodAPIError):
    """Timeouts or connection errors on every attempt."""

    code = "request_timeout"


class WorkersNotReady(BackendError):
    """No worker became ready within the bounded wait."""

    code = "workers_not_ready"


class JobError(BackendError):
    """A job ended without a usable result. ``job_id`` and ``status`` say which and how."""

    code = "job_failed"

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        status: str | None = None,
        code: str | None = None,
        output: object = None,
    ) -> None:
        super().__init__(message, code=code)
        self.job_id = job_id
        self.status = status
        self.output = output


class JobFailed(JobError):
    """The job ended FAILED/CANCELLED/TIMED_OUT, or COMPLETED with an ``{"error", "code"}`` output.

    ``code`` is the worker's error code when it sent one (e.g. ``invalid_input``),
    otherwise ``job_failed`` / ``job_cancelled`` / ``job_timed_out``.
    """


class JobTimeout(JobError):
    """The client gave up waiting for the job (it did not reach a final state in time)."""

    code = "job_timeout"


class RestoreFailed(BackendError):
    """``workersMin`` could not be restored. The message names the command to run by hand."""

    code = "restore_failed"


class PayloadTooLarge(BackendError):
    """The job request would exceed RunPod's request-size limit for its route.

    ``size`` and ``limit`` are in bytes; ``route`` is ``run`` or ``runsync``. Raised
    before anything is sent (RunPod would refuse the request anyway).
    """

    code = "payload_too_large"

    def __init__(self, message: str, *, size: int, limit: int, route: str) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
        self.route = route


class LocalMediaError(ConfigError):
    """A story names a local media file that cannot be used (missing, unreadable, a folder)."""

    code = "local_media"


class UploadFailed(BackendError):
    """A local media file could not be uploaded to (or presigned in) the input bucket."""

    code = "upload_failed"


class DownloadFailed(BackendError):
    """A result file could not be downloaded, or did not match its size/hash."""

    code = "download_failed"
