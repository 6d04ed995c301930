"""Client side: what the story app's backend runs against the RunPod API (not in the container).

* :class:`RunPodClient` — REST ``workersMin`` get/set and the serverless job API
  (``/run``, ``/runsync``, ``/status``, ``/stream``, ``/cancel``, ``/health``) with
  bounded retries.
* :class:`WarmWorkers` — raise ``workersMin`` for a block, always restore it (also on
  errors, Ctrl-C and SIGTERM).
* :func:`submit_story` — one story in, typed per-scene results out.
* ``storystudio`` CLI — :mod:`storystudio.backend.cli`.
"""

from .auth import ApiKey, load_api_key
from .client import Health, JobStatus, PollSettings, RetryPolicy, RunPodClient, WorkerCounts
from .errors import (
    AuthError,
    BackendError,
    ConfigError,
    JobFailed,
    JobTimeout,
    RequestTimeout,
    RestoreFailed,
    RunPodAPIError,
    WorkersNotReady,
)
from .schema import ErrorInfo, ImageSettings, Scene, SceneResult, StoryProject, StoryResult, VideoSettings
from .submit import ProgressUpdate, submit_story
from .warm import Terminated, WarmWorkers

__all__ = [
    "ApiKey", "AuthError", "BackendError", "ConfigError", "ErrorInfo", "Health", "ImageSettings",
    "JobFailed", "JobStatus", "JobTimeout", "PollSettings", "ProgressUpdate", "RequestTimeout",
    "RestoreFailed", "RetryPolicy", "RunPodAPIError", "RunPodClient", "Scene", "SceneResult",
    "StoryProject", "StoryResult", "Terminated", "VideoSettings", "WarmWorkers", "WorkerCounts",
    "WorkersNotReady", "load_api_key", "submit_story",
]
