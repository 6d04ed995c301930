"""Fixtures for the backend client tests: a fresh fake RunPod per test, fast clients."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from storystudio.backend.client import PollSettings, RetryPolicy, RunPodClient

from .fake_runpod import FakeRunPod

#: Distinctive so a leak is easy to grep for; never a real key.
API_KEY = "rpa_TESTSECRET_3f9c1e7d5b2a48e6a0c4d9f1b8e7a6c5"
ENDPOINT = "ep-test1"

FAST_RETRY = RetryPolicy(max_attempts=4, backoff_base=0.001, backoff_max=0.005, retry_after_max=0.01)
FAST_POLL = PollSettings(initial=0.002, maximum=0.01, factor=2.0)


@pytest.fixture
def fake() -> Iterator[FakeRunPod]:
    with FakeRunPod(API_KEY, endpoint_id=ENDPOINT) as server:
        yield server


def make_client(fake: FakeRunPod, **kw) -> RunPodClient:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("timeout", (2.0, 2.0))
    return RunPodClient(API_KEY, api_base=fake.api_base, rest_base=fake.rest_base, **kw)


@pytest.fixture
def client(fake: FakeRunPod) -> Iterator[RunPodClient]:
    with make_client(fake) as c:
        yield c


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything (all loggers, DEBUG) so secret-leak checks see every line."""
    caplog.set_level(logging.DEBUG)
    return caplog
