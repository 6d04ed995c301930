"""Client side: what the story app's backend runs against the RunPod API (not in the container).

* :class:`StoryStudio` — the Python API: ``run_story(story, warm=1, download=DIR)``
  validates the story with the worker's own models, uploads (or inlines) local media,
  runs it with warm workers, and writes every PNG/MP4 plus ``result.json`` to ``DIR``.
* :class:`RunPodClient` — REST ``workersMin`` get/set and the serverless job API
  (``/run``, ``/runsync``, ``/status``, ``/stream``, ``/cancel``, ``/health``) with
  bounded retries and RunPod's request-size limits.
* :class:`WarmWorkers` — raise ``workersMin`` for a block, always restore it (also on
  errors, Ctrl-C and SIGTERM).
* :func:`submit_story` — one prepared story in, typed per-scene results out.
* ``storystudio`` CLI — :mod:`storystudio.backend.cli`, a thin layer over :class:`StoryStudio`.
"""

from .auth import ApiKey, load_api_key
from .client import (
    RUN_PAYLOAD_LIMIT_BYTES,
    RUNSYNC_PAYLOAD_LIMIT_BYTES,
    Health,
    JobStatus,
    PollSettings,
    RetryPolicy,
    RunPodClient,
    WorkerCounts,
)
from .errors import (
    AuthError,
    BackendError,
    ConfigError,
    DownloadFailed,
    JobFailed,
    JobTimeout,
    LocalMediaError,
    PayloadTooLarge,
    RequestTimeout,
    RestoreFailed,
    RunPodAPIError,
    UploadFailed,
    WorkersNotReady,
)
from .results import ErrorInfo, SceneResult, StoryResult
from .scene_progress import SceneProgress
from .story import Story
from .studio import PreparedStory, StoryStudio
from .submit import ProgressUpdate, submit_story
from .warm import Terminated, WarmWorkers

__all__ = [
    "RUNSYNC_PAYLOAD_LIMIT_BYTES", "RUN_PAYLOAD_LIMIT_BYTES", "ApiKey", "AuthError", "BackendError",
    "ConfigError", "DownloadFailed", "ErrorInfo", "Health", "JobFailed", "JobStatus", "JobTimeout",
    "LocalMediaError", "PayloadTooLarge", "PollSettings", "PreparedStory", "ProgressUpdate", "RequestTimeout",
    "RestoreFailed", "RetryPolicy", "RunPodAPIError", "RunPodClient", "SceneProgress", "SceneResult", "Story",
    "StoryResult", "StoryStudio", "Terminated", "UploadFailed", "WarmWorkers", "WorkerCounts",
    "WorkersNotReady", "load_api_key", "submit_story",
]
