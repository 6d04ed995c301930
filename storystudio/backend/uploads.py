"""Client-side uploads of local media to the input bucket, deduplicated by content hash.

The bucket is configured exactly like the worker's result storage — same variables,
same parsing (:meth:`storystudio.storage.StorageSettings.from_env`:
``STORYSTUDIO_S3_BUCKET``, ``STORYSTUDIO_S3_ENDPOINT_URL``, the key pair, region,
prefix, addressing, and RunPod's ``BUCKET_*`` fallbacks) — and the upload itself goes
through the same :class:`storystudio.storage.S3Storage` (boto3 client settings,
retries, multipart). What this module adds:

* **Content-hash keys.** A file goes to ``<prefix>inputs/sha256/<hex>.<ext>``. The
  same narration in ten stories is one object; a changed file is a new key, so a
  queued job never sees a file change under it.
* **Skip what is there.** ``HEAD`` first; an object of the same size under the hash key
  is not uploaded again.
* **Presigned GET URLs for the worker**, valid ``STORYSTUDIO_INPUT_URL_SECONDS``
  (default 24 h, at most 7 days, the SigV4 maximum) so a job that waits in RunPod's
  queue still finds its inputs. They are presigned even when
  ``STORYSTUDIO_S3_PUBLIC_BASE_URL`` is set: that setting says where *results* are
  served, and inputs need not be public.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from storystudio.errors import StorageError
from storystudio.storage import MAX_PRESIGN_SECONDS, ObjectKey, S3Storage, StorageSettings, check_key

from .errors import ConfigError, UploadFailed
from .media import LocalFile

log = logging.getLogger(__name__)

ENV_INPUT_URL_SECONDS = "STORYSTUDIO_INPUT_URL_SECONDS"
DEFAULT_INPUT_URL_SECONDS = 24 * 3600
INPUT_KEY_DIR = "inputs/sha256"


def input_url_seconds_from_env(env: Mapping[str, str] = os.environ) -> int:
    raw = (env.get(ENV_INPUT_URL_SECONDS) or "").strip()
    if not raw:
        return DEFAULT_INPUT_URL_SECONDS
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_INPUT_URL_SECONDS}={raw!r} is not a whole number of seconds") from None
    if not 1 <= value <= MAX_PRESIGN_SECONDS:
        raise ConfigError(f"{ENV_INPUT_URL_SECONDS}={value} is out of range 1..{MAX_PRESIGN_SECONDS} "
                          "(presigned URLs live at most 7 days)")
    return value


@dataclass(frozen=True)
class UploadedInput:
    """Where one local file went: its full object key, the URL the worker gets, and
    whether this call uploaded it (``False``: it was already in the bucket)."""

    key: str
    url: str
    uploaded: bool


class InputUploader:
    """Puts local media into the bucket under content-hash keys and presigns them."""

    def __init__(self, settings: StorageSettings, *, url_seconds: int = DEFAULT_INPUT_URL_SECONDS) -> None:
        if settings.backend != "s3":
            raise ConfigError("uploading local media needs a bucket (STORYSTUDIO_S3_BUCKET)")
        if not 1 <= url_seconds <= MAX_PRESIGN_SECONDS:
            raise ConfigError(f"input URL lifetime {url_seconds}s is out of range 1..{MAX_PRESIGN_SECONDS}")
        try:
            self.settings = replace(settings, public_base_url=None, presign_seconds=url_seconds)
            self.storage = S3Storage(self.settings)
        except StorageError as exc:
            raise UploadFailed(exc.message) from None
        self.url_seconds = url_seconds
        self._done: dict[str, UploadedInput] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, *, url_seconds: int | None = None) -> InputUploader | None:
        """The uploader for the bucket in the environment, or ``None`` when none is set."""
        try:
            settings = StorageSettings.from_env(env)
        except StorageError as exc:
            raise ConfigError(exc.message) from None
        if settings.backend != "s3":
            return None
        return cls(settings, url_seconds=input_url_seconds_from_env(env) if url_seconds is None else url_seconds)

    @property
    def client(self):
        """The boto3 S3 client (tests count its requests)."""
        return self.storage.client

    def _scrub(self, text: str) -> str:
        secret = self.settings.secret_access_key
        return text.replace(secret, "***") if secret else text

    @staticmethod
    def key_for(file: LocalFile) -> ObjectKey:
        """``inputs/sha256/<hex>.<ext>`` (without the storage prefix)."""
        return ObjectKey(check_key(f"{INPUT_KEY_DIR}/{file.sha256}.{file.ext}"))

    def _exists(self, full_key: str, size: int) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.storage.bucket, Key=full_key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise UploadFailed(self._scrub(
                f"checking s3://{self.storage.bucket}/{full_key} failed: {code or status}: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - botocore connection errors and friends
            raise UploadFailed(self._scrub(
                f"checking s3://{self.storage.bucket}/{full_key} failed: {type(exc).__name__}: {exc}")) from None
        return head.get("ContentLength") == size

    def ensure(self, file: LocalFile) -> UploadedInput:
        """Upload ``file`` unless its hash key is already there; return its URL."""
        if file.sha256 in self._done:
            return self._done[file.sha256]
        key = self.key_for(file)
        full = self.settings.prefix + key
        try:
            if self._exists(full, file.size):
                log.info("input %s already in bucket %s as %s; not uploaded again",
                         file.path.name, self.storage.bucket, full)
                done = UploadedInput(full, self.storage.url_for(full), uploaded=False)
            else:
                stored = self.storage.put_file(key, file.path, file.content_type)
                log.info("uploaded input %s (%d bytes) to bucket %s as %s",
                         file.path.name, file.size, self.storage.bucket, full)
                done = UploadedInput(stored.key, stored.url, uploaded=True)
        except StorageError as exc:
            raise UploadFailed(exc.message) from None
        self._done[file.sha256] = done
        return done
