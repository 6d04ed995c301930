"""Waiting for a server process a test started: one start-up loop for the local RunPod API and ``serve``."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest
import requests


def wait_until_ready(proc: subprocess.Popen, probe: Callable[[], bool], *, what: str, timeout: float,
                     interval: float, log_tail: Callable[[], str]) -> None:
    """Poll ``probe`` (an HTTP check; a refused connection counts as not yet) until it is true.

    Fails the test with the tail of the process's log when the process exits first, or
    when ``timeout`` seconds pass (the process is killed then, so it cannot linger).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_tail()[-3000:]}")
        try:
            if probe():
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            pytest.fail(f"{what} did not become ready:\n{log_tail()[-3000:]}")
        time.sleep(interval)
