"""Where results go: an S3-compatible bucket (AWS S3, Cloudflare R2, ...) or a local folder.

Configuration (environment, read by :meth:`StorageSettings.from_env`; an empty
value counts as unset):

``STORYSTUDIO_S3_ENDPOINT_URL`` (fallback ``BUCKET_ENDPOINT_URL``)
    S3 API endpoint. Empty: AWS S3 (the endpoint follows from the region).
    Cloudflare R2: ``https://<account_id>.r2.cloudflarestorage.com`` (the
    dashboard's "S3 API" URL with ``/<bucket>`` on the end is accepted too: the
    bucket is taken from the path). RunPod's ``rp_upload`` convention, a
    virtual-hosted AWS URL ``https://<bucket>.s3.<region>.amazonaws.com``, is
    understood: bucket and region are taken from the host name (likewise for
    DigitalOcean Spaces' ``https://<bucket>.<region>.digitaloceanspaces.com``;
    Backblaze B2, Wasabi and Scaleway hosts ``https://s3.<region>.<domain>``
    give their region).
``STORYSTUDIO_S3_BUCKET``
    Bucket name. Empty (and no bucket in the endpoint URL): results are written
    to the local folder ``STORYSTUDIO_OUTPUT_DIR`` instead, and their "URL" is
    the absolute file path, which only helps when the caller shares that disk.
``STORYSTUDIO_S3_ACCESS_KEY_ID`` (fallback ``BUCKET_ACCESS_KEY_ID``)
``STORYSTUDIO_S3_SECRET_ACCESS_KEY`` (fallback ``BUCKET_SECRET_ACCESS_KEY``)
    Key pair; set both or neither. Neither: boto3's default credential chain
    (``AWS_ACCESS_KEY_ID``..., instance roles). The secret is never logged,
    never part of an error message and hidden from ``repr``.
``STORYSTUDIO_S3_REGION``
    Signing region. Default: ``auto`` for an R2 endpoint, the region in the
    endpoint's host name (see above), else ``us-east-1``.
``STORYSTUDIO_S3_PREFIX``
    Key prefix inside the bucket (and sub-folder of the local folder); default
    ``storystudio/``, empty for none. Slashes at either end are normalised;
    ``.``/``..`` segments and characters outside ``[A-Za-z0-9._-]`` are refused.
``STORYSTUDIO_S3_PUBLIC_BASE_URL``
    If set, the bucket is served publicly (R2 custom domain or ``r2.dev`` URL,
    CloudFront, a public-read bucket): results get ``<base_url>/<key>`` instead
    of a presigned URL.
``STORYSTUDIO_S3_PRESIGN_SECONDS``
    Lifetime of presigned GET URLs, 1..604800 (7 days, the SigV4 maximum);
    default 604800.
``STORYSTUDIO_S3_ADDRESSING``
    ``path`` (``https://endpoint/bucket/key``) or ``virtual``
    (``https://bucket.endpoint/key``). Default ``path`` for a custom endpoint
    (R2, MinIO, SeaweedFS...), ``virtual`` for AWS.
``STORYSTUDIO_OUTPUT_DIR``
    Local folder for the local backend; default ``./output``.

RunPod's names are the ones ``runpod.serverless.utils.rp_upload`` reads
(``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``);
each ``STORYSTUDIO_*`` variable wins over its fallback on its own. rp_upload has
no bucket variable (it names buckets after the month); here the bucket comes
from ``STORYSTUDIO_S3_BUCKET`` or from a virtual-hosted endpoint URL.

Object keys (see :func:`make_key`)::

    <prefix><project_id or "jobs">/<job_id>/[<scene_id>/]<kind>[-<name>].<ext>

e.g. ``storystudio/story-1/3f2a.../s1/video.mp4``. Every user-controlled piece
is passed through :func:`safe_part`. A project literally called ``jobs`` shares
the top folder with project-less jobs; the job id still keeps them apart.

Uploads set ``Content-Type`` and ``Cache-Control``; files and byte strings at
or over :data:`MULTIPART_THRESHOLD` go up in parts through boto3's transfer
manager.
Objects are read back too (``get_bytes``, ``exists``, ``url``): a story batch keeps a
manifest of its finished scenes next to them and reuses them when resumed
(:mod:`storystudio.manifest`).
The local backend writes to a temporary file in the target folder and renames
it into place, so a reader never sees half a file, and refuses any path that
resolves outside its folder. Every failure is a :class:`StorageError` (code
``storage_failed``) naming the bucket/folder and key. URLs are not logged: a
presigned URL is a bearer credential for its lifetime.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NewType, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

from storystudio.errors import StorageError

log = logging.getLogger(__name__)

ObjectKey = NewType("ObjectKey", str)
"""A key made by :func:`make_key`: segments of ``[A-Za-z0-9._-]``, no ``..``, no leading dot."""

Backend = Literal["s3", "local"]
Addressing = Literal["path", "virtual"]

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer
DEFAULT_PREFIX = "storystudio/"
DEFAULT_OUTPUT_DIR = "./output"
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
MAX_ATTEMPTS = 5  # botocore "standard" retry mode: 5xx, throttling, timeouts, resets
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
# Keys are per job, but a retried job writes the same key again: no "immutable".
CACHE_CONTROL_PUBLIC = "public, max-age=86400"
CACHE_CONTROL_PRIVATE = "private, max-age=86400"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

MAX_PART_LEN = 64
HASH_LEN = 10
MAX_KEY_LEN = 1024  # S3's limit, in UTF-8 bytes; our keys are ASCII

_R2_HOST_SUFFIX = ".r2.cloudflarestorage.com"
_AWS_BUCKET_HOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]*[a-z0-9])\.s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com$"
)
_AWS_SERVICE_HOST = re.compile(r"^s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com$")
_DO_HOST = re.compile(r"^(?:(?P<bucket>[a-z0-9][a-z0-9-]*[a-z0-9])\.)?(?P<region>[a-z0-9]+)\.digitaloceanspaces\.com$")
# Providers whose API host is "s3.<region>.<domain>" and who check the signing region.
_REGIONAL_HOST = re.compile(r"^s3\.(?P<region>[a-z0-9-]+)\.(?:backblazeb2\.com|wasabisys\.com|scw\.cloud)$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_EXT = re.compile(r"^[a-z0-9]{1,10}$")


# --------------------------------------------------------------------------- keys


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LEN]


def safe_part(value: str | None) -> str:
    """Turn a user-controlled id into one safe key segment.

    Accented letters lose their accents, every other character outside
    ``[A-Za-z0-9._-]`` becomes ``_`` (runs collapse), runs of dots become one dot
    and dots/underscores at either end go, so the result never is or contains
    ``..``, never starts with a dot and holds no ``/``, ``%`` or NUL. A value that
    had to change gets ``-<hash of the original>`` appended, so two different
    ids never land on the same key ("a/b" and "a_b" stay apart); one longer than
    :data:`MAX_PART_LEN` is cut and gets the hash too; an empty result is the
    hash alone. Unchanged ids (``story-1``, a RunPod job id) pass through as is.
    """
    raw = "" if value is None else str(value)
    decomposed = unicodedata.normalize("NFKD", raw)
    kept = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    cleaned = _UNSAFE_CHARS.sub("_", kept)
    cleaned = re.sub(r"_{2,}", "_", cleaned)
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    cleaned = cleaned.strip("._")
    if not cleaned:
        return _digest(raw)
    if cleaned == raw and len(cleaned) <= MAX_PART_LEN:
        return cleaned
    head = cleaned[: MAX_PART_LEN - HASH_LEN - 1].rstrip(".")
    return f"{head}-{_digest(raw)}"


def make_key(
    *,
    kind: str,
    job_id: str,
    ext: str,
    project_id: str | None = None,
    scene_id: str | None = None,
    name: str | None = None,
) -> ObjectKey:
    """Object key (without the storage's prefix) for one result file.

    Layout: ``<project_id or "jobs">/<job_id>/[<scene_id>/]<kind>[-<name>].<ext>``.
    ``project_id``, ``job_id``, ``scene_id`` and ``name`` come from callers and go
    through :func:`safe_part`; ``kind`` (``image``, ``video``...) and ``ext``
    (``png``, ``.mp4``...) are chosen by the code and must already be plain
    (``ValueError`` otherwise).
    """
    ext = ext.lstrip(".").lower()
    if not _KIND.fullmatch(kind):
        raise ValueError(f"kind must match {_KIND.pattern}, got {kind!r}")
    if not _EXT.fullmatch(ext):
        raise ValueError(f"ext must match {_EXT.pattern}, got {ext!r}")
    parts = ["jobs" if project_id is None else safe_part(project_id), safe_part(job_id)]
    if scene_id is not None:
        parts.append(safe_part(scene_id))
    filename = kind if name is None else f"{kind}-{safe_part(name)}"
    parts.append(f"{filename}.{ext}")
    return ObjectKey("/".join(parts))


def check_key(key: str) -> str:
    """Raise :class:`StorageError` unless ``key`` is a safe relative key; return it."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise StorageError(f"unsafe object key {key!r}: empty, not text or too long")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg) or ".." in seg:
            raise StorageError(
                f"unsafe object key {key!r}: segment {seg!r} is empty, starts with a dot, "
                "holds '..' or characters outside [A-Za-z0-9._-]"
            )
    return key


def _normalise_prefix(prefix: str) -> str:
    segments = [s for s in prefix.strip().split("/") if s]
    if not segments:
        return ""
    joined = "/".join(segments)
    try:
        check_key(joined)
    except StorageError:
        raise StorageError(
            f"STORYSTUDIO_S3_PREFIX={prefix!r} is not usable: use segments of [A-Za-z0-9._-] "
            "that do not start with a dot and hold no '..'"
        ) from None
    return joined + "/"


# --------------------------------------------------------------------------- settings


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _is_r2(endpoint_url: str | None) -> bool:
    host = (urlsplit(endpoint_url).hostname or "") if endpoint_url else ""
    return host.endswith(_R2_HOST_SUFFIX)


def _split_endpoint(url: str) -> tuple[str | None, str | None, str | None]:
    """``(endpoint_url, bucket, region)`` from an endpoint URL as operators write it.

    AWS host names become ``endpoint_url=None`` (boto3 derives the endpoint from
    the region) with the bucket/region they carry; an R2 URL with one path
    segment gives that segment as the bucket; anything else is kept as is.
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:  # checked first: such a URL is not echoed in messages
        raise StorageError("S3 endpoint URL must not carry credentials; use the key variables")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(
            f"S3 endpoint URL {url!r} is not an http(s) URL "
            "(STORYSTUDIO_S3_ENDPOINT_URL / BUCKET_ENDPOINT_URL)"
        )
    host = parts.hostname.lower()
    m = _AWS_BUCKET_HOST.fullmatch(host)
    if m:
        return None, m["bucket"], m["region"]
    m = _AWS_SERVICE_HOST.fullmatch(host)
    if m:
        return None, None, m["region"]
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.strip("/")
    m = _DO_HOST.fullmatch(host)
    if m:  # rp_upload reads the region from Spaces URLs too
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{m['region']}.digitaloceanspaces.com{port}", m["bucket"], m["region"]
    if host.endswith(_R2_HOST_SUFFIX):
        if path and "/" not in path:
            return base, path, None
        return base, None, None
    m = _REGIONAL_HOST.fullmatch(host)
    return (base + "/" + path if path else base), None, (m["region"] if m else None)


@dataclass(frozen=True)
class StorageSettings:
    """Resolved storage configuration; see the module docstring for each variable.

    Construct directly (tests, the handler with explicit values) or with
    :meth:`from_env`. ``region=None``/``addressing=None`` pick the defaults
    described above. Invalid values raise :class:`StorageError`.
    """

    bucket: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    region: str | None = None
    prefix: str = DEFAULT_PREFIX
    public_base_url: str | None = None
    presign_seconds: int = MAX_PRESIGN_SECONDS
    output_dir: Path = Path(DEFAULT_OUTPUT_DIR)
    addressing: Addressing | None = None

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        put("bucket", (self.bucket or "").strip() or None)
        put("endpoint_url", (self.endpoint_url or "").strip().rstrip("/") or None)
        put("access_key_id", (self.access_key_id or "").strip() or None)
        put("secret_access_key", (self.secret_access_key or "").strip() or None)
        if bool(self.access_key_id) != bool(self.secret_access_key):
            missing = "secret access key" if self.access_key_id else "access key id"
            raise StorageError(
                f"S3 credentials are incomplete: the {missing} is not set "
                "(STORYSTUDIO_S3_ACCESS_KEY_ID and STORYSTUDIO_S3_SECRET_ACCESS_KEY go together)"
            )
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            if "@" in parts.netloc:
                raise StorageError("S3 endpoint URL must not carry credentials; use the key variables")
            if parts.scheme not in ("http", "https"):
                raise StorageError(f"S3 endpoint URL {self.endpoint_url!r} is not an http(s) URL")
        region = (self.region or "").strip()
        if not region:
            region = "auto" if _is_r2(self.endpoint_url) else "us-east-1"
        put("region", region)
        put("prefix", _normalise_prefix(self.prefix or ""))
        base = (self.public_base_url or "").strip().rstrip("/") or None
        if base and urlsplit(base).scheme not in ("http", "https"):
            raise StorageError(f"STORYSTUDIO_S3_PUBLIC_BASE_URL={base!r} is not an http(s) URL")
        put("public_base_url", base)
        seconds = self.presign_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_PRESIGN_SECONDS:
            raise StorageError(
                f"STORYSTUDIO_S3_PRESIGN_SECONDS={seconds!r} is out of range 1..{MAX_PRESIGN_SECONDS} "
                "(presigned URLs live at most 7 days)"
            )
        put("output_dir", Path(self.output_dir))
        addressing = (self.addressing or "").strip().lower() or ("path" if self.endpoint_url else "virtual")
        if addressing not in ("path", "virtual"):
            raise StorageError(f"STORYSTUDIO_S3_ADDRESSING={self.addressing!r}: use 'path' or 'virtual'")
        put("addressing", addressing)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StorageSettings:
        endpoint_raw = _first(env, "STORYSTUDIO_S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL")
        endpoint, url_bucket, url_region = _split_endpoint(endpoint_raw) if endpoint_raw else (None, None, None)
        bucket = _first(env, "STORYSTUDIO_S3_BUCKET")
        if bucket and url_bucket and bucket != url_bucket:
            raise StorageError(
                f"STORYSTUDIO_S3_BUCKET={bucket!r} disagrees with the bucket {url_bucket!r} "
                "in the endpoint URL; set one of them"
            )
        presign_raw = _first(env, "STORYSTUDIO_S3_PRESIGN_SECONDS")
        if presign_raw is None:
            presign = MAX_PRESIGN_SECONDS
        else:
            try:
                presign = int(presign_raw)
            except ValueError:
                raise StorageError(
                    f"STORYSTUDIO_S3_PRESIGN_SECONDS={presign_raw!r} is not a whole number of seconds"
                ) from None
        prefix = env.get("STORYSTUDIO_S3_PREFIX")
        return cls(
            bucket=bucket or url_bucket,
            endpoint_url=endpoint,
            access_key_id=_first(env, "STORYSTUDIO_S3_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID"),
            secret_access_key=_first(env, "STORYSTUDIO_S3_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY"),
            region=_first(env, "STORYSTUDIO_S3_REGION") or url_region,
            prefix=DEFAULT_PREFIX if prefix is None else prefix,
            public_base_url=_first(env, "STORYSTUDIO_S3_PUBLIC_BASE_URL"),
            presign_seconds=presign,
            output_dir=Path(_first(env, "STORYSTUDIO_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR),
            addressing=_first(env, "STORYSTUDIO_S3_ADDRESSING"),  # type: ignore[arg-type]
        )

    @property
    def backend(self) -> Backend:
        return "s3" if self.bucket else "local"

    @property
    def is_r2(self) -> bool:
        return _is_r2(self.endpoint_url)

    def describe(self) -> dict[str, object]:
        """What the worker logs at start-up: everything but the credentials."""
        if self.backend == "local":
            return {"backend": "local", "output_dir": str(self.output_dir.resolve()), "prefix": self.prefix}
        return {
            "backend": "s3",
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url or "AWS S3",
            "region": self.region,
            "addressing": self.addressing,
            "prefix": self.prefix,
            "urls": "public" if self.public_base_url else f"presigned ({self.presign_seconds}s)",
            "credentials": "key pair" if self.access_key_id else "default chain",
        }


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class StoredObject:
    """One stored result.

    ``url``: presigned or public URL (S3), or the absolute file path (local).
    ``key``: the full key including the prefix (the path under the output folder
    for local).
    """

    url: str
    key: str
    size: int
    content_type: str
    backend: Backend


@runtime_checkable
class Storage(Protocol):
    backend: Backend

    def put_bytes(self, key: ObjectKey, data: bytes, content_type: str) -> StoredObject: ...

    def put_file(self, key: ObjectKey, path: Path, content_type: str) -> StoredObject: ...

    def get_bytes(self, key: ObjectKey) -> bytes | None:
        """The object's bytes, ``None`` when there is none (a story's manifest, a stored scene to reuse)."""
        ...

    def exists(self, key: ObjectKey) -> bool: ...

    def url(self, key: ObjectKey) -> str:
        """A fresh URL for a stored key (presigned URLs expire: a reused scene gets a new one)."""
        ...


def _content_type(content_type: str) -> str:
    ct = (content_type or "").strip() or DEFAULT_CONTENT_TYPE
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in ct):
        raise StorageError(f"content type {ct!r} holds control characters")
    return ct


def _bytes_size(data: bytes) -> int:
    if not isinstance(data, (bytes, bytearray)):
        raise StorageError(f"put_bytes wants bytes, got {type(data).__name__}")
    return len(data)


class S3Storage:
    """Uploads to one bucket of an S3-compatible service through boto3."""

    backend: Backend = "s3"

    def __init__(self, settings: StorageSettings, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        if not settings.bucket:
            raise StorageError("S3Storage needs a bucket (STORYSTUDIO_S3_BUCKET)")
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.settings = settings
        self.bucket: str = settings.bucket
        self._where = settings.endpoint_url or f"AWS S3 ({settings.region})"
        extra = {}
        if settings.endpoint_url:
            # boto3 >= 1.36 adds CRC checksums (aws-chunked trailers) by default,
            # which several S3-compatible services reject; only send what S3 needs.
            extra = {"request_checksum_calculation": "when_required",
                     "response_checksum_validation": "when_required"}
        config = Config(
            region_name=settings.region,
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            tcp_keepalive=True,
            s3={"addressing_style": settings.addressing},
            **extra,
        )
        try:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.endpoint_url,
                aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=settings.secret_access_key,
                config=config,
            )
        except Exception as exc:  # bad endpoint/region strings surface here
            raise self._error("creating the S3 client", None, exc) from None
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            # R2 is reported to throttle more than a few parallel parts per upload.
            max_concurrency=2 if settings.is_r2 else 4,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._cache_control = CACHE_CONTROL_PUBLIC if settings.public_base_url else CACHE_CONTROL_PRIVATE

    @property
    def client(self):
        """The boto3 client (for checks and tooling; uploads go through the methods)."""
        return self._client

    def _full_key(self, key: str) -> str:
        return self.settings.prefix + check_key(key)

    def _scrub(self, text: str) -> str:
        secret = self.settings.secret_access_key
        return text.replace(secret, "***") if secret else text

    def _error(self, what: str, full_key: str | None, exc: BaseException) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            reason = f"{err.get('Code', 'error')}: {err.get('Message') or exc}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        target = f"bucket {self.settings.bucket!r}" + (f" key {full_key!r}" if full_key else "")
        return StorageError(self._scrub(f"{what} failed for {target} at {self._where}: {reason}"))

    def _errors(self) -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, Boto3Error, OSError, ValueError)

    def url_for(self, full_key: str) -> str:
        """Public URL (``STORYSTUDIO_S3_PUBLIC_BASE_URL``) or a presigned GET URL."""
        if self.settings.public_base_url:
            return f"{self.settings.public_base_url}/{quote(full_key, safe='/')}"
        try:
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full_key},
                ExpiresIn=self.settings.presign_seconds,
            )
        except self._errors() as exc:
            raise self._error("presigning", full_key, exc) from exc

    def put_bytes(self, key: ObjectKey, data: bytes, content_type: str) -> StoredObject:
        full = self._full_key(key)
        ct = _content_type(content_type)
        size = _bytes_size(data)
        extra = {"ContentType": ct, "CacheControl": self._cache_control}
        try:
            if size >= MULTIPART_THRESHOLD:
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, full, ExtraArgs=extra, Config=self._transfer)
            else:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), **extra)
        except self._errors() as exc:
            raise self._error("upload", full, exc) from exc
        log.info("stored %s (%d bytes, %s) in bucket %s", full, size, ct, self.bucket)
        return StoredObject(url=self.url_for(full), key=full, size=size, content_type=ct, backend="s3")

    def put_file(self, key: ObjectKey, path: Path, content_type: str) -> StoredObject:
        full = self._full_key(key)
        ct = _content_type(content_type)
        path = Path(path)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise IsADirectoryError(f"{path} is not a regular file")
            self._client.upload_file(
                str(path),
                self.bucket,
                full,
                ExtraArgs={"ContentType": ct, "CacheControl": self._cache_control},
                Config=self._transfer,
            )
        except self._errors() as exc:
            raise self._error(f"upload of {path}", full, exc) from exc
        log.info("stored %s (%d bytes, %s) in bucket %s", full, size, ct, self.bucket)
        return StoredObject(url=self.url_for(full), key=full, size=size, content_type=ct, backend="s3")


    def _head_or_get(self, key: ObjectKey, *, body: bool) -> bytes | bool | None:
        from botocore.exceptions import ClientError

        full = self._full_key(key)
        try:
            if body:
                return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            self._client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None if body else False
            raise self._error("download" if body else "head", full, exc) from exc
        except self._errors() as exc:
            raise self._error("download" if body else "head", full, exc) from exc

    def get_bytes(self, key: ObjectKey) -> bytes | None:
        got = self._head_or_get(key, body=True)
        return got if isinstance(got, bytes) else None

    def exists(self, key: ObjectKey) -> bool:
        return bool(self._head_or_get(key, body=False))

    def url(self, key: ObjectKey) -> str:
        return self.url_for(self._full_key(key))


class LocalStorage:
    """Writes results under one folder; the "URL" is the absolute file path."""

    backend: Backend = "local"

    def __init__(self, output_dir: Path | str, prefix: str = DEFAULT_PREFIX) -> None:
        self.root = Path(output_dir).expanduser().resolve()
        self.prefix = _normalise_prefix(prefix)

    def _target(self, key: str) -> tuple[str, Path]:
        full = self.prefix + check_key(key)
        target = self.root / full
        # The key is checked already; resolving also catches symlinks (folders or
        # the file itself) that point out of the folder. Checked before mkdir so
        # no folder is made through such a link, and again after it.
        self._check_inside(full, target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"creating folder {target.parent} under {self.root} failed: {exc}") from exc
        self._check_inside(full, target)
        return full, target

    def _check_inside(self, full: str, target: Path) -> None:
        resolved = target.resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise StorageError(f"key {full!r} resolves outside the output folder {self.root}")

    def _write(self, full: str, target: Path, fill) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(exc, (OSError, ValueError)):
                raise StorageError(f"writing {full!r} under {self.root} failed: {exc}") from exc
            raise

    def put_bytes(self, key: ObjectKey, data: bytes, content_type: str) -> StoredObject:
        ct = _content_type(content_type)
        size = _bytes_size(data)
        full, target = self._target(key)
        self._write(full, target, lambda f: f.write(data))
        log.info("stored %s (%d bytes, %s) in %s", full, size, ct, self.root)
        return StoredObject(url=str(target), key=full, size=size, content_type=ct, backend="local")

    def put_file(self, key: ObjectKey, path: Path, content_type: str) -> StoredObject:
        ct = _content_type(content_type)
        full, target = self._target(key)
        path = Path(path)
        try:
            src = path.open("rb")
        except OSError as exc:
            raise StorageError(f"reading {path} for {full!r} failed: {exc}") from exc
        with src:
            self._write(full, target, lambda f: shutil.copyfileobj(src, f, 1024 * 1024))
        size = target.stat().st_size
        log.info("stored %s (%d bytes, %s) in %s", full, size, ct, self.root)
        return StoredObject(url=str(target), key=full, size=size, content_type=ct, backend="local")


    def _existing(self, key: ObjectKey) -> Path:
        full = self.prefix + check_key(key)
        target = self.root / full
        self._check_inside(full, target)
        return target

    def get_bytes(self, key: ObjectKey) -> bytes | None:
        target = self._existing(key)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"reading {self.prefix + key!r} under {self.root} failed: {exc}") from exc

    def exists(self, key: ObjectKey) -> bool:
        return self._existing(key).is_file()

    def url(self, key: ObjectKey) -> str:
        return str(self._existing(key))


def make_storage(settings: StorageSettings | None = None) -> Storage:
    """The backend the settings ask for (read from the environment when omitted)."""
    settings = settings or StorageSettings.from_env()
    if settings.backend == "s3":
        return S3Storage(settings)
    if settings.endpoint_url or settings.access_key_id:
        log.warning(
            "S3 endpoint/credentials are set but no bucket: results go to the local folder %s; "
            "set STORYSTUDIO_S3_BUCKET to upload them",
            settings.output_dir,
        )
    return LocalStorage(settings.output_dir, settings.prefix)
