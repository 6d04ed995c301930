"""A real ``storystudio serve`` process on loopback, on the tiny checkpoints (CPU).

The server is started as a subprocess (``python -m storystudio.serve``) on a free
port, exactly as an operator would start it, and can be SIGKILLed and started again
on the same job database and output folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from storystudio.media import encode_audio, encode_png, synth_speech
from tests.process_ready import wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
KEY_ONE, KEY_TWO, LEGACY_KEY = "key-one-0123456789", "key-two-0123456789", "legacy-wan2-key"
# Tiny settings for the earlier API's requests (which carry none): one step, one 12-frame
# clip at 64x64; the audio is 0.5 s = 8 frames, +3 dropped motion frames <= 12 -> one clip.
VIDEO_DEFAULTS = {"steps": 1, "max_area": 64 * 64, "infer_frames": 12}
AUDIO_SECONDS = 0.5
FPS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    starts: int = 0
    _logs: list = field(default_factory=list)

    def start(self, timeout: float = 300) -> None:
        port = free_port()
        self.env["STORYSTUDIO_PORT"] = str(port)
        self.starts += 1
        out = open(self.log.with_suffix(f".{self.starts}.log"), "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(out)
        self.proc = subprocess.Popen([sys.executable, "-m", "storystudio.serve"], cwd=ROOT, env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            health = requests.get(f"{self.url}/health", timeout=2)
            return health.status_code == 200 and not health.json()["warming"]

        wait_until_ready(self.proc, ready, what="server", timeout=timeout, interval=0.3, log_tail=self.log_text)

    def log_text(self) -> str:
        return self.log.with_suffix(f".{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when the kernel's OOM killer strikes."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in self._logs:
            f.close()

    # ------------------------------------------------------------------ requests
    def get(self, path: str, key: str | None = KEY_ONE, **kw) -> requests.Response:
        headers = {**({"X-API-Key": key} if key else {}), **kw.pop("headers", {})}
        return requests.get(f"{self.url}{path}", headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, key: str | None = KEY_ONE, **kw) -> requests.Response:
        headers = {**({"X-API-Key": key} if key else {}), **kw.pop("headers", {})}
        return requests.post(f"{self.url}{path}", headers=headers, timeout=kw.pop("timeout", 600), **kw)

    def queue(self) -> dict[str, int]:
        return self.get("/health", key=None).json()["queue"]

    def wait_status(self, job_id: str, *, until=("completed", "failed"), timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(f"/status/{job_id}").json()
            if body["state"] in until or body["status"] in until:
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['state']}"
            time.sleep(0.2)


@dataclass(frozen=True)
class Media:
    root: Path
    portrait: bytes
    speech: bytes

    @property
    def portrait_path(self) -> Path:
        return self.root / "portrait.png"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Media:
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    portrait = encode_png(Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)))
    speech = encode_audio(synth_speech(AUDIO_SECONDS, seed=1), "wav")
    (root / "portrait.png").write_bytes(portrait)
    (root / "speech.wav").write_bytes(speech)
    return Media(root, portrait, speech)


@pytest.fixture(scope="module")
def server(tiny_models, media, tmp_path_factory) -> Iterator[Server]:
    zdir, wdir = tiny_models
    work = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORYSTUDIO_", "BUCKET_", "WAN2_"))}
    env.update({
        "STORYSTUDIO_ZIMAGE_DIR": str(zdir),
        "STORYSTUDIO_WAN_DIR": str(wdir),
        "STORYSTUDIO_DEVICE": "cpu",
        "STORYSTUDIO_PREWARM": "video",
        "STORYSTUDIO_OUTPUT_DIR": str(work / "output"),
        "STORYSTUDIO_MEDIA_ROOT": str(media.root),
        "STORYSTUDIO_API_KEYS": f"{KEY_ONE}, {KEY_TWO}",
        "WAN2_API_KEYS": LEGACY_KEY,
        "STORYSTUDIO_MAX_JOBS_PER_KEY": "2",
        "STORYSTUDIO_MAX_IMAGE_MB": "1",
        "STORYSTUDIO_SERVE_VIDEO_DEFAULTS": json.dumps(VIDEO_DEFAULTS),
        "STORYSTUDIO_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    })
    srv = Server(env=env, log=work / "server")
    srv.start()
    yield srv
    srv.stop()
