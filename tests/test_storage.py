"""Tests for storystudio.storage: keys, settings, and uploads to a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import requests

from storystudio.errors import StorageError
from storystudio.storage import (
    CACHE_CONTROL_PRIVATE,
    CACHE_CONTROL_PUBLIC,
    HASH_LEN,
    MAX_PART_LEN,
    MAX_PRESIGN_SECONDS,
    LocalStorage,
    S3Storage,
    Storage,
    StorageSettings,
    StoredObject,
    check_key,
    make_key,
    make_storage,
    safe_part,
)
from tests.s3server import S3Server, S3ServerError, running_s3_server

SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

HOSTILE = [
    "../../etc/passwd",
    "..",
    ".",
    "...",
    "a/b",
    "a\\b",
    "/abs/path",
    "%2e%2e",
    "%2e%2e%2fetc",
    "..%2f..%2f",
    "café",
    "日本語の物語",
    "emoji 🎬 scene",
    "x" * 300,
    "",
    "   ",
    "a\x00b",
    "\x00",
    ".hidden",
    "trailing.",
    "a..b",
    "line\nbreak",
    "C:\\windows",
    "~root",
    "$(rm -rf /)",
]


def job() -> str:
    return "job-" + uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("value", HOSTILE)
def test_safe_part_hostile_values(value: str) -> None:
    part = safe_part(value)
    assert SAFE_SEGMENT.fullmatch(part), part
    assert ".." not in part
    assert "/" not in part and "\\" not in part and "\x00" not in part and "%" not in part
    assert 1 <= len(part) <= MAX_PART_LEN
    assert safe_part(value) == part  # deterministic


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("story-1", "story-1"),
        ("Scene_02.v3", "Scene_02.v3"),
        ("a" * MAX_PART_LEN, "a" * MAX_PART_LEN),
        ("sync-1f0e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-e1", "sync-1f0e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-e1"),
    ],
)
def test_safe_part_keeps_plain_ids(value: str, expected: str) -> None:
    assert safe_part(value) == expected


def test_safe_part_changed_or_cut_values_get_a_hash() -> None:
    assert re.fullmatch(r"etc_passwd-[0-9a-f]{10}", safe_part("../../etc/passwd"))
    assert re.fullmatch(r"cafe-[0-9a-f]{10}", safe_part("café"))
    assert re.fullmatch(r"[0-9a-f]{%d}" % HASH_LEN, safe_part(""))
    assert re.fullmatch(r"[0-9a-f]{%d}" % HASH_LEN, safe_part("日本語"))
    long = safe_part("x" * 300)
    assert len(long) == MAX_PART_LEN and re.search(r"-[0-9a-f]{10}$", long)
    # Values that clean up to the same text stay apart.
    values = ["a/b", "a_b", "a b", "a\x00b", "a//b", "x" * 300, "x" * 301, "", " ", ".", ".."]
    assert len({safe_part(v) for v in values}) == len(values)


def test_make_key_layout() -> None:
    assert make_key(kind="video", job_id="j1", ext="mp4", project_id="story-1", scene_id="s1") == (
        "story-1/j1/s1/video.mp4"
    )
    assert make_key(kind="image", job_id="j1", ext=".PNG") == "jobs/j1/image.png"
    assert make_key(kind="image", job_id="j1", ext="png", scene_id="s2", name="first") == "jobs/j1/s2/image-first.png"


@pytest.mark.parametrize("value", HOSTILE)
def test_make_key_with_hostile_pieces_stays_inside(value: str, tmp_path: Path) -> None:
    key = make_key(kind="image", job_id=value, ext="png", project_id=value, scene_id=value, name=value)
    assert check_key(key) == key
    assert len(key.split("/")) == 4
    root = tmp_path.resolve()
    assert (root / key).resolve().is_relative_to(root)


@pytest.mark.parametrize(("kind", "ext"), [("../x", "png"), ("Image", "png"), ("image", "p/ng"), ("image", ""),
                                           ("image", "a" * 11), ("", "png"), ("image\n", "png"),
                                           ("image", "png\n")])
def test_make_key_rejects_bad_kind_or_ext(kind: str, ext: str) -> None:
    with pytest.raises(ValueError):
        make_key(kind=kind, job_id="j", ext=ext)


@pytest.mark.parametrize(
    "key",
    ["", "../x", "a/../b", "/etc/passwd", "a//b", ".x", "a/.x", "a\\b", "a/b/", "a\x00b", "a b", "x" * 2000, "a\n",
     "a/b\n"],
)
def test_check_key_rejects_unsafe_keys(key: str) -> None:
    with pytest.raises(StorageError) as info:
        check_key(key)
    assert info.value.code == "storage_failed"


# --------------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = StorageSettings.from_env({})
    assert s.backend == "local"
    assert s.bucket is None and s.endpoint_url is None
    assert s.prefix == "storystudio/"
    assert s.output_dir == Path("./output")
    assert s.presign_seconds == MAX_PRESIGN_SECONDS == 604800
    assert s.region == "us-east-1"


def test_settings_r2() -> None:
    s = StorageSettings.from_env(
        {
            "STORYSTUDIO_S3_ENDPOINT_URL": "https://0123abcd.r2.cloudflarestorage.com/",
            "STORYSTUDIO_S3_BUCKET": "stories",
            "STORYSTUDIO_S3_ACCESS_KEY_ID": "ak",
            "STORYSTUDIO_S3_SECRET_ACCESS_KEY": "sk",
        }
    )
    assert s.backend == "s3" and s.is_r2
    assert (s.endpoint_url, s.bucket, s.region, s.addressing) == (
        "https://0123abcd.r2.cloudflarestorage.com", "stories", "auto", "path"
    )
    # The dashboard's "S3 API" URL carries the bucket as its path.
    s = StorageSettings.from_env({"STORYSTUDIO_S3_ENDPOINT_URL": "https://0123abcd.r2.cloudflarestorage.com/stories"})
    assert (s.endpoint_url, s.bucket) == ("https://0123abcd.r2.cloudflarestorage.com", "stories")


def test_settings_runpod_fallbacks_and_precedence() -> None:
    env = {
        "BUCKET_ENDPOINT_URL": "https://my-bucket.s3.eu-west-1.amazonaws.com",
        "BUCKET_ACCESS_KEY_ID": "rp-ak",
        "BUCKET_SECRET_ACCESS_KEY": "rp-sk",
    }
    s = StorageSettings.from_env(env)
    # rp_upload's virtual-hosted URL: bucket and region from the host, AWS endpoint.
    assert (s.endpoint_url, s.bucket, s.region, s.addressing) == (None, "my-bucket", "eu-west-1", "virtual")
    assert (s.access_key_id, s.secret_access_key) == ("rp-ak", "rp-sk")
    s = StorageSettings.from_env(
        env
        | {
            "STORYSTUDIO_S3_ENDPOINT_URL": "http://minio:9000",
            "STORYSTUDIO_S3_BUCKET": "ours",
            "STORYSTUDIO_S3_SECRET_ACCESS_KEY": "ours-sk",
            "STORYSTUDIO_S3_ACCESS_KEY_ID": "",  # empty counts as unset: falls back
        }
    )
    assert (s.endpoint_url, s.bucket, s.region, s.addressing) == ("http://minio:9000", "ours", "us-east-1", "path")
    assert (s.access_key_id, s.secret_access_key) == ("rp-ak", "ours-sk")


@pytest.mark.parametrize(
    ("url", "endpoint", "bucket", "region"),
    [
        ("https://bk1.s3.amazonaws.com", None, "bk1", "us-east-1"),
        ("https://my.bucket.s3-eu-west-1.amazonaws.com/", None, "my.bucket", "eu-west-1"),
        ("https://s3.us-west-2.amazonaws.com", None, None, "us-west-2"),
        ("https://bk1.nyc3.digitaloceanspaces.com", "https://nyc3.digitaloceanspaces.com", "bk1", "nyc3"),
        ("https://s3.us-west-004.backblazeb2.com", "https://s3.us-west-004.backblazeb2.com", None, "us-west-004"),
        ("http://s3.minio.internal:9000/", "http://s3.minio.internal:9000", None, "us-east-1"),
        ("https://proj.supabase.co/storage/v1/s3", "https://proj.supabase.co/storage/v1/s3", None, "us-east-1"),
    ],
)
def test_settings_endpoint_forms(url: str, endpoint: str | None, bucket: str | None, region: str) -> None:
    s = StorageSettings.from_env({"BUCKET_ENDPOINT_URL": url})
    assert (s.endpoint_url, s.bucket, s.region) == (endpoint, bucket, region)
    assert s.addressing == ("path" if endpoint else "virtual")


def test_settings_options() -> None:
    s = StorageSettings.from_env(
        {
            "STORYSTUDIO_S3_BUCKET": "b",
            "STORYSTUDIO_S3_REGION": "ap-south-1",
            "STORYSTUDIO_S3_PREFIX": "/a/b",
            "STORYSTUDIO_S3_PUBLIC_BASE_URL": "https://cdn.example.com/media/",
            "STORYSTUDIO_S3_PRESIGN_SECONDS": "3600",
            "STORYSTUDIO_S3_ADDRESSING": "PATH",
            "STORYSTUDIO_OUTPUT_DIR": "/data/out",
        }
    )
    assert s.region == "ap-south-1" and s.prefix == "a/b/" and s.addressing == "path"
    assert s.public_base_url == "https://cdn.example.com/media" and s.presign_seconds == 3600
    assert s.output_dir == Path("/data/out")
    assert StorageSettings.from_env({"STORYSTUDIO_S3_PREFIX": ""}).prefix == ""


@pytest.mark.parametrize(
    "env",
    [
        {"STORYSTUDIO_S3_PRESIGN_SECONDS": "604801"},
        {"STORYSTUDIO_S3_PRESIGN_SECONDS": "0"},
        {"STORYSTUDIO_S3_PRESIGN_SECONDS": "7d"},
        {"STORYSTUDIO_S3_ADDRESSING": "dns"},
        {"STORYSTUDIO_S3_PREFIX": "a/../b"},
        {"STORYSTUDIO_S3_PREFIX": ".hidden/"},
        {"STORYSTUDIO_S3_PREFIX": "a b"},
        {"STORYSTUDIO_S3_ENDPOINT_URL": "ftp://example.com"},
        {"STORYSTUDIO_S3_PUBLIC_BASE_URL": "cdn.example.com"},
        {"STORYSTUDIO_S3_BUCKET": "b", "STORYSTUDIO_S3_ACCESS_KEY_ID": "ak"},
        {"STORYSTUDIO_S3_BUCKET": "other", "BUCKET_ENDPOINT_URL": "https://mine.s3.us-east-1.amazonaws.com"},
    ],
)
def test_settings_invalid(env: dict[str, str]) -> None:
    with pytest.raises(StorageError) as info:
        StorageSettings.from_env(env)
    assert info.value.code == "storage_failed"


def test_settings_never_show_the_secret() -> None:
    secret = "very-secret-" + uuid.uuid4().hex
    s = StorageSettings.from_env({"STORYSTUDIO_S3_BUCKET": "b", "STORYSTUDIO_S3_ACCESS_KEY_ID": "ak",
                                  "STORYSTUDIO_S3_SECRET_ACCESS_KEY": secret})
    assert secret not in repr(s) and secret not in str(s.describe())
    with pytest.raises(StorageError) as info:
        StorageSettings.from_env({"STORYSTUDIO_S3_SECRET_ACCESS_KEY": secret})
    assert secret not in str(info.value)
    for url in (f"ftp://ak:{secret}@host", f"https://ak:{secret}@host:9000"):
        with pytest.raises(StorageError, match="must not carry credentials") as info:
            StorageSettings.from_env({"STORYSTUDIO_S3_ENDPOINT_URL": url})
        assert secret not in str(info.value)
        with pytest.raises(StorageError, match="must not carry credentials"):
            StorageSettings(endpoint_url=url)


def test_make_storage_picks_backend(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local = make_storage(StorageSettings(output_dir=tmp_path))
    assert isinstance(local, LocalStorage) and isinstance(local, Storage)
    assert "no bucket" not in caplog.text
    # Credentials without a bucket are most likely a mistake: say so.
    local = make_storage(StorageSettings.from_env({"BUCKET_ENDPOINT_URL": "http://minio:9000",
                                                   "STORYSTUDIO_OUTPUT_DIR": str(tmp_path)}))
    assert isinstance(local, LocalStorage) and "no bucket" in caplog.text
    s3 = make_storage(StorageSettings(bucket="b", endpoint_url="http://127.0.0.1:9", access_key_id="a",
                                      secret_access_key="s"))
    assert isinstance(s3, S3Storage) and isinstance(s3, Storage)


# --------------------------------------------------------------------------- local backend


def test_local_put_bytes_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = make_storage(StorageSettings.from_env({}))  # ./output, relative
    key = make_key(kind="image", job_id="j1", ext="png", project_id="p1", scene_id="s1")
    got = storage.put_bytes(key, b"\x89PNG data", "image/png")
    out = (tmp_path / "output").resolve()
    assert got == StoredObject(url=str(out / "storystudio/p1/j1/s1/image.png"), key="storystudio/" + key,
                               size=9, content_type="image/png", backend="local")
    assert Path(got.url).is_absolute() and Path(got.url).read_bytes() == b"\x89PNG data"
    assert oct(Path(got.url).stat().st_mode & 0o777) == oct(0o644)

    src = tmp_path / "clip.mp4"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    got = storage.put_file(make_key(kind="video", job_id="j1", ext="mp4", project_id="p1"), src, "video/mp4")
    assert Path(got.url).read_bytes() == src.read_bytes() and got.size == src.stat().st_size
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_local_overwrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path / "out", prefix="")
    key = make_key(kind="image", job_id="j", ext="png")
    first = storage.put_bytes(key, b"old", "image/png")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError) as info:
        storage.put_bytes(key, b"new", "image/png")
    assert info.value.code == "storage_failed" and key in str(info.value)
    assert Path(first.url).read_bytes() == b"old"
    assert [p.name for p in Path(first.url).parent.iterdir()] == ["image.png"]
    monkeypatch.undo()
    assert Path(storage.put_bytes(key, b"new", "image/png").url).read_bytes() == b"new"


@pytest.mark.parametrize("key", ["../escape.png", "a/../../escape.png", "/etc/passwd", "a/.hidden", "a//b"])
def test_local_refuses_unsafe_keys(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "out", prefix="")
    with pytest.raises(StorageError):
        storage.put_bytes(key, b"x", "image/png")  # type: ignore[arg-type]
    assert not (tmp_path / "escape.png").exists()


def test_local_refuses_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    (root / "storystudio").mkdir(parents=True)
    (root / "storystudio" / "jobs").symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(root)
    with pytest.raises(StorageError, match="outside the output folder"):
        storage.put_bytes(make_key(kind="image", job_id="j", ext="png"), b"x", "image/png")
    assert list(outside.iterdir()) == []
    # A file symlink pointing out is refused too (it would be replaced, never followed).
    (root / "storystudio" / "p").mkdir()
    (root / "storystudio" / "p" / "j").mkdir()
    (root / "storystudio" / "p" / "j" / "image.png").symlink_to(outside / "target.png")
    with pytest.raises(StorageError, match="outside the output folder"):
        storage.put_bytes(make_key(kind="image", job_id="j", ext="png", project_id="p"), b"x", "image/png")
    assert list(outside.iterdir()) == []


def test_local_missing_source_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="nope.mp4") as info:
        storage.put_file(make_key(kind="video", job_id="j", ext="mp4"), tmp_path / "nope.mp4", "video/mp4")
    assert info.value.code == "storage_failed"


# --------------------------------------------------------------------------- S3 (SeaweedFS)


def s3_settings(server: S3Server, **overrides) -> StorageSettings:
    values = dict(
        bucket=server.bucket,
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region=server.region,
    )
    values.update(overrides)
    return StorageSettings(**values)


def test_s3_put_bytes_presigned(s3_server: S3Server) -> None:
    storage = make_storage(s3_settings(s3_server, presign_seconds=3600))
    data = os.urandom(1000) + b"image"
    key = make_key(kind="image", job_id=job(), ext="png", project_id="story-1", scene_id="s1")
    got = storage.put_bytes(key, data, "image/png")
    assert (got.key, got.size, got.content_type, got.backend) == ("storystudio/" + key, len(data), "image/png", "s3")

    obj = s3_server.client().get_object(Bucket=s3_server.bucket, Key=got.key)
    assert obj["Body"].read() == data
    assert obj["ContentType"] == "image/png"
    assert obj["CacheControl"] == CACHE_CONTROL_PRIVATE

    assert "X-Amz-Signature=" in got.url and "X-Amz-Expires=3600" in got.url
    assert got.url.startswith(f"{s3_server.endpoint_url}/{s3_server.bucket}/storystudio/")  # path style
    resp = requests.get(got.url, timeout=10)
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["Content-Type"] == "image/png"
    # The bucket is private: the same object without a signature is refused.
    unsigned = requests.get(got.url.split("?", 1)[0], timeout=10)
    assert unsigned.status_code == 403


def test_s3_put_file_multipart(s3_server: S3Server, tmp_path: Path) -> None:
    storage = S3Storage(s3_settings(s3_server))
    calls: list[str] = []
    storage.client.meta.events.register(
        "before-call.s3.*", lambda model, **kwargs: calls.append(model.name)
    )
    src = tmp_path / "video.mp4"
    data = os.urandom(12 * 1024 * 1024 + 123)
    src.write_bytes(data)
    key = make_key(kind="video", job_id=job(), ext="mp4", project_id="story-1", scene_id="s1")
    got = storage.put_file(key, src, "video/mp4")
    assert got.size == len(data) and got.content_type == "video/mp4"
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 2
    assert "CompleteMultipartUpload" in calls and "PutObject" not in calls

    obj = s3_server.client().get_object(Bucket=s3_server.bucket, Key=got.key)
    assert obj["Body"].read() == data
    assert obj["ContentType"] == "video/mp4"
    assert obj["CacheControl"] == CACHE_CONTROL_PRIVATE
    assert obj["ETag"].strip('"').endswith("-2")  # two parts
    resp = requests.get(got.url, timeout=30)
    assert resp.status_code == 200 and resp.content == data


def test_s3_put_big_bytes_multipart(s3_server: S3Server) -> None:
    storage = S3Storage(s3_settings(s3_server))
    calls: list[str] = []
    storage.client.meta.events.register("before-call.s3.*", lambda model, **kwargs: calls.append(model.name))
    data = os.urandom(9 * 1024 * 1024)
    got = storage.put_bytes(make_key(kind="video", job_id=job(), ext="mp4"), data, "video/mp4")
    assert calls.count("UploadPart") == 2 and "PutObject" not in calls
    obj = s3_server.client().get_object(Bucket=s3_server.bucket, Key=got.key)
    assert obj["Body"].read() == data and obj["ContentType"] == "video/mp4"


def test_s3_small_file_single_put(s3_server: S3Server, tmp_path: Path) -> None:
    storage = S3Storage(s3_settings(s3_server))
    calls: list[str] = []
    storage.client.meta.events.register("before-call.s3.*", lambda model, **kwargs: calls.append(model.name))
    src = tmp_path / "audio.wav"
    src.write_bytes(b"RIFF....WAVE")
    got = storage.put_file(make_key(kind="audio", job_id=job(), ext="wav"), src, "audio/wav")
    assert calls == ["PutObject"]
    assert requests.get(got.url, timeout=10).content == b"RIFF....WAVE"


def test_s3_public_base_url(s3_server: S3Server, tmp_path: Path) -> None:
    base = f"{s3_server.endpoint_url}/{s3_server.public_bucket}/"
    storage = make_storage(s3_settings(s3_server, bucket=s3_server.public_bucket, public_base_url=base))
    key = make_key(kind="image", job_id=job(), ext="png", project_id="story public", scene_id="s1")
    got = storage.put_bytes(key, b"public bytes", "image/png")
    assert got.url == base + got.key
    assert "X-Amz" not in got.url
    resp = requests.get(got.url, timeout=10)  # no signature: the bucket is public
    assert resp.status_code == 200 and resp.content == b"public bytes"
    head = s3_server.client().head_object(Bucket=s3_server.public_bucket, Key=got.key)
    assert head["CacheControl"] == CACHE_CONTROL_PUBLIC and head["ContentType"] == "image/png"

    src = tmp_path / "v.mp4"
    src.write_bytes(b"mp4")
    got = storage.put_file(make_key(kind="video", job_id=job(), ext="mp4"), src, "video/mp4")
    assert requests.get(got.url, timeout=10).content == b"mp4"


@pytest.mark.parametrize(("prefix", "expected"), [("custom/deep/", "custom/deep/"), ("/x", "x/"), ("", "")])
def test_s3_prefix_honoured(s3_server: S3Server, prefix: str, expected: str) -> None:
    storage = make_storage(s3_settings(s3_server, prefix=prefix))
    key = make_key(kind="image", job_id=job(), ext="png")
    got = storage.put_bytes(key, b"p", "image/png")
    assert got.key == expected + key
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=got.key)
    assert [o["Key"] for o in listed.get("Contents", [])] == [expected + key]


def test_s3_from_env_with_runpod_names(s3_server: S3Server) -> None:
    env = {
        "BUCKET_ENDPOINT_URL": s3_server.endpoint_url,
        "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
        "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
    }
    storage = make_storage(StorageSettings.from_env(env))
    got = storage.put_bytes(make_key(kind="image", job_id=job(), ext="png"), b"env", "image/png")
    assert requests.get(got.url, timeout=10).content == b"env"


def assert_clean_error(exc: StorageError, server: S3Server, secret: str, key: str) -> None:
    assert exc.code == "storage_failed"
    text = str(exc)
    assert server.bucket in text and key in text
    for shown in (text, repr(exc), str(exc.to_result()), str(exc.__cause__), repr(exc.__cause__)):
        assert secret not in shown


@pytest.mark.parametrize("wrong", ["secret", "key_id"])
def test_s3_wrong_credentials(s3_server: S3Server, tmp_path: Path, wrong: str) -> None:
    secret = "wrong-secret-" + uuid.uuid4().hex
    if wrong == "secret":
        settings = s3_settings(s3_server, secret_access_key=secret)
    else:
        settings = s3_settings(s3_server, access_key_id="NOSUCHKEY", secret_access_key=secret)
    storage = make_storage(settings)
    key = make_key(kind="image", job_id=job(), ext="png")
    with pytest.raises(StorageError) as info:
        storage.put_bytes(key, b"x", "image/png")
    assert_clean_error(info.value, s3_server, secret, key)
    assert ("SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId") in str(info.value)

    src = tmp_path / "f.mp4"
    src.write_bytes(b"f" * 100)
    with pytest.raises(StorageError) as info:
        storage.put_file(key, src, "video/mp4")
    assert_clean_error(info.value, s3_server, secret, key)
    # The real secret of the server never shows either.
    assert s3_server.secret_key not in str(info.value)


def test_s3_missing_bucket_and_unreachable_endpoint(s3_server: S3Server) -> None:
    key = make_key(kind="image", job_id=job(), ext="png")
    storage = make_storage(s3_settings(s3_server, bucket="no-such-bucket-here"))
    with pytest.raises(StorageError, match="no-such-bucket-here") as info:
        storage.put_bytes(key, b"x", "image/png")
    assert info.value.code == "storage_failed"

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    storage = S3Storage(s3_settings(s3_server, endpoint_url=f"http://127.0.0.1:{port}"), max_attempts=1)
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}") as info:
        storage.put_bytes(key, b"x", "image/png")
    assert_clean_error(info.value, s3_server, s3_server.secret_key, key)


# --------------------------------------------------------------------------- the S3 server helper


def fake_weed(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-weed"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_s3server_reports_a_dying_weed_with_its_log(tmp_path: Path) -> None:
    weed = fake_weed(tmp_path, 'echo "fatal: cannot bind, port taken"; exit 3')
    with pytest.raises(S3ServerError, match="exited with code 3") as info:
        with running_s3_server(tmp_path / "srv", timeout_s=10, weed=weed):
            pytest.fail("must not start")
    assert "fatal: cannot bind, port taken" in str(info.value)


def test_s3server_start_is_bounded_and_stops_the_process(tmp_path: Path) -> None:
    weed = fake_weed(tmp_path, 'echo "hanging"; echo $$ >> "$PWD/pids"; exec sleep 300')
    with pytest.raises(S3ServerError, match="not ready in time") as info:
        with running_s3_server(tmp_path / "srv", timeout_s=1, weed=weed):
            pytest.fail("must not start")
    assert "hanging" in str(info.value)
    pids = [int(p) for d in (tmp_path / "srv").glob("weed-*") for p in (d / "pids").read_text().split()]
    assert len(pids) == 2  # one per attempt
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
