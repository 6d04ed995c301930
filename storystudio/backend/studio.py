"""``StoryStudio``: the Python API the story app calls to turn a story into files.

::

    from storystudio.backend import StoryStudio

    studio = StoryStudio("abc123xyz", api_key)              # api_key=None: $RUNPOD_API_KEY
    result = studio.run_story("story.json", warm=1, download="out/")
    for scene in result.scenes:
        print(scene.scene_id, scene.ok, scene.image_path, scene.video_path)

``run_story`` does, in order, and stops at the first problem before spending money:

1. validates the story with the worker's own models (:class:`~storystudio.backend.story.Story`);
2. finds the local media files it names and hashes them (:mod:`~storystudio.backend.media`);
3. with a download folder whose ``result.json`` shows this exact story (same input,
   same file contents) already rendered without errors: fetches only the missing files
   and returns — nothing is uploaded or rendered again (``rerun=True`` forces a render);
4. uploads the local files to the input bucket, deduplicated by content hash, and sends
   presigned URLs (:mod:`~storystudio.backend.uploads`); without a bucket, inlines them
   as ``data:`` URIs while the request stays under RunPod's size limit for ``/run``,
   else raises :class:`~storystudio.backend.errors.PayloadTooLarge` naming limit and size;
5. runs the story as one batch job with warm workers restored afterwards, per-scene
   progress to ``on_progress`` (:func:`~storystudio.backend.submit.submit_story`);
6. downloads every PNG and MP4 plus ``result.json`` (:mod:`~storystudio.backend.downloads`).

The ``storystudio submit`` command is a thin layer over this class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storystudio.errors import StorageError
from storystudio.storage import MAX_PRESIGN_SECONDS, StorageSettings

from .auth import ApiKey, load_api_key
from .client import DEFAULT_API_BASE, DEFAULT_REST_BASE, PollSettings, RunPodClient, check_body_size, job_body
from .downloads import FileState, Manifest, download_story
from .errors import ConfigError
from .media import LocalFile, LocalMedia
from .results import StoryResult
from .story import Story
from .submit import ProgressUpdate, submit_story
from .uploads import InputUploader, UploadedInput, input_url_seconds_from_env

log = logging.getLogger(__name__)

_NO_BUCKET_HINT = ("configure a bucket (STORYSTUDIO_S3_BUCKET, STORYSTUDIO_S3_ENDPOINT_URL and the key pair, "
                   "as for the worker) so local files are uploaded and sent as URLs")


@dataclass(frozen=True)
class PreparedStory:
    """A story ready to send: ``story`` is the validated input with every local file
    replaced (by a presigned URL in ``uploads``, or by a data URI when ``inlined``)."""

    story: Story
    source: Story
    media: LocalMedia
    fingerprint: str
    uploads: tuple[UploadedInput, ...]
    inlined: bool
    body_bytes: int
    route: str


class StoryStudio:
    """One RunPod endpoint running the Story Studio worker, seen from the story app.

    ``api_key``: the RunPod key (``None``: ``RUNPOD_API_KEY`` / ``RUNPOD_API_KEY_FILE``).
    ``storage``: the input bucket for local media (``None``: read from the environment,
    the worker's S3 variables, e.g. ``STORYSTUDIO_S3_BUCKET``; ``StorageSettings()``
    without a bucket: always inline). ``input_url_seconds``: lifetime of the presigned
    input URLs (``None``: ``STORYSTUDIO_INPUT_URL_SECONDS``, default 24 h).
    ``client``: an existing :class:`RunPodClient` (then ``api_key``/bases are unused).
    """

    def __init__(
        self,
        endpoint_id: str,
        api_key: ApiKey | str | None = None,
        *,
        client: RunPodClient | None = None,
        storage: StorageSettings | None = None,
        input_url_seconds: int | None = None,
        api_base: str | None = None,
        rest_base: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint_id = endpoint_id
        self._env = os.environ if env is None else env
        self._owns_client = client is None
        if client is None:
            key = load_api_key(env=self._env) if api_key is None else api_key
            client = RunPodClient(key, api_base=api_base or self._env.get("RUNPOD_ENDPOINT_BASE_URL") or DEFAULT_API_BASE,
                                  rest_base=rest_base or self._env.get("RUNPOD_REST_BASE_URL") or DEFAULT_REST_BASE)
        self.client = client
        self._storage = storage
        self.input_url_seconds = (input_url_seconds_from_env(self._env) if input_url_seconds is None
                                  else input_url_seconds)
        if not 1 <= self.input_url_seconds <= MAX_PRESIGN_SECONDS:
            raise ConfigError(f"input URL lifetime {self.input_url_seconds}s is out of range "
                              f"1..{MAX_PRESIGN_SECONDS} (presigned URLs live at most 7 days)")
        self._uploader: InputUploader | None | bool = False  # False: not looked up yet

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> StoryStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ media

    @property
    def uploader(self) -> InputUploader | None:
        """The input bucket's uploader, or ``None`` when no bucket is configured."""
        if self._uploader is False:
            try:
                settings = self._storage if self._storage is not None else StorageSettings.from_env(self._env)
            except StorageError as exc:
                raise ConfigError(exc.message) from None
            self._uploader = (InputUploader(settings, url_seconds=self.input_url_seconds)
                              if settings.backend == "s3" else None)
        return self._uploader  # type: ignore[return-value]

    def prepare(
        self,
        story: Story | Mapping[str, Any] | str | Path,
        *,
        route: str = "run",
        base_dir: Path | str | None = None,
        batch_only: bool = True,
        execution_timeout: float | None = None,
    ) -> PreparedStory:
        """Validate ``story`` and replace its local files (upload or inline), checking
        the request against RunPod's size limit for ``route`` (``run``/``runsync``).

        Also for single ``video`` jobs (``batch_only=False``): send
        ``prepared.story.job_input`` with :meth:`RunPodClient.run` / ``run_sync``.
        """
        source = Story.load(story, base_dir=base_dir, batch_only=batch_only)
        media = LocalMedia.scan(source)
        return self._prepare(source, media, media.fingerprint(source.job_input), route, execution_timeout)

    def _prepare(self, source: Story, media: LocalMedia, fingerprint: str, route: str,
                 execution_timeout: float | None, min_url_seconds: float = 0.0) -> PreparedStory:
        uploads: list[UploadedInput] = []
        inlined = False
        job_input = source.job_input
        if media:
            uploader = self.uploader
            if uploader is not None:
                if self.input_url_seconds < min_url_seconds:
                    raise ConfigError(
                        f"input URLs would expire after {self.input_url_seconds}s, before the job's "
                        f"{min_url_seconds:g}s timeout; raise STORYSTUDIO_INPUT_URL_SECONDS / --input-url-ttl")

                def upload(file: LocalFile) -> str:
                    done = uploader.ensure(file)
                    uploads.append(done)
                    return done.url

                job_input = media.substitute(job_input, upload)
            else:
                inlined = True
                # the exact size first, without reading any file: a 2 GB video is refused at once
                empty = job_body(media.substitute(job_input, lambda f: ""), execution_timeout)
                check_body_size(empty, route, extra=sum(media.file(r).data_uri_length for r in media.refs),
                                hint=self._inline_hint(media))
                job_input = media.substitute(job_input, LocalFile.data_uri)
        sent = source.with_input(job_input) if media else source
        hint = self._inline_hint(media) if inlined else "send large media as URLs"
        size = check_body_size(job_body(sent.job_input, execution_timeout), route, hint=hint)
        if inlined:
            log.info("no input bucket: %d local file(s) inlined as data: URIs (request %d bytes)",
                     len(media.files), size)
        return PreparedStory(sent, source, media, fingerprint, tuple(uploads), inlined, size, route)

    @staticmethod
    def _inline_hint(media: LocalMedia) -> str:
        return (f"{len(media.files)} local file(s) of {media.total_bytes:,} bytes were inlined as data: URIs; "
                + _NO_BUCKET_HINT)

    # ------------------------------------------------------------------ stories

    def run_story(
        self,
        story: Story | Mapping[str, Any] | str | Path,
        *,
        warm: int | None = None,
        workers: int | None = None,
        download: Path | str | None = None,
        rerun: bool = False,
        timeout: float = 3600.0,
        execution_timeout: float | None = -1,
        wait_ready: bool = False,
        ready_timeout: float = 600.0,
        ready_poll_interval: float = 5.0,
        poll: PollSettings | None = None,
        base_dir: Path | str | None = None,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        on_submitted: Callable[[str], None] | None = None,
        on_download: Callable[[FileState], None] | None = None,
        cancel_on_abort: bool = True,
        handle_signals: bool = True,
    ) -> StoryResult:
        """Run ``story`` (a path to a JSON file, a mapping, or a :class:`Story`) and
        return its typed result; with ``download``, also write the files there.

        ``warm``: keep ``workersMin >= warm`` while the story runs (restored after, also
        on errors and signals). ``workers=N`` (N > 1): fan the story out over N workers
        instead (:mod:`storystudio.backend.fanout`: ``workersMin=N``, the images as one job,
        then one video job per scene). ``rerun``: render again even if ``download`` holds this
        story's finished result. The other arguments are those of :func:`submit_story`.
        Scene failures do not raise: check ``result.ok`` / ``result.failed_scenes``.
        """
        source = Story.load(story, base_dir=base_dir)
        media = LocalMedia.scan(source)
        fingerprint = media.fingerprint(source.job_input)
        folder = Path(download).expanduser() if download is not None else None
        previous = Manifest.read(folder) if folder is not None else None
        if previous is not None and not rerun:
            if previous.story_sha256 == fingerprint and previous.result.ok:
                log.info("%s already holds this story's result (job %s): not rendered again, fetching only "
                         "missing files (rerun=True / --rerun renders it again)", folder, previous.result.job_id)
                return download_story(previous.result, folder, story_sha256=fingerprint, previous=previous,
                                      on_file=on_download)
        if execution_timeout == -1:
            execution_timeout = max(timeout, 10.0)
        prepared = self._prepare(source, media, fingerprint, "run", execution_timeout, min_url_seconds=timeout)
        if workers is not None and workers > 1:
            from .fanout import fan_out_story

            result = fan_out_story(
                self.client, self.endpoint_id, prepared.story, workers=workers,
                timeout=timeout, poll=poll, execution_timeout=execution_timeout, wait_ready=wait_ready,
                ready_timeout=ready_timeout, ready_poll_interval=ready_poll_interval,
                on_progress=on_progress, handle_signals=handle_signals,
            )
        else:
            result = submit_story(
                self.client, self.endpoint_id, prepared.story,
                timeout=timeout, poll=poll, execution_timeout=execution_timeout, warm=warm,
                wait_ready=wait_ready, ready_timeout=ready_timeout, ready_poll_interval=ready_poll_interval,
                on_progress=on_progress, on_submitted=on_submitted, cancel_on_abort=cancel_on_abort,
                handle_signals=handle_signals,
            )
        if folder is not None:
            result = download_story(result, folder, story_sha256=fingerprint, previous=previous, on_file=on_download)
        return result
