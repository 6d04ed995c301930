"""Shared fixtures."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.s3server import S3Server, running_s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, on a machine without it."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def sigint_raises_keyboard_interrupt() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it, however pytest was started.

    Why: a shell without job control starts background commands (``cmd &``, CI wrappers)
    with SIGINT ignored, Python keeps an inherited ``SIG_IGN``, and so do the processes it
    spawns; the Ctrl-C tests of the backend client would then see nothing. A Python
    handler (unlike ``SIG_IGN``) is reset to the default in exec'd children.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the whole session (started on first use).

    Not skipped when weed cannot start: the S3 tests must run, so a missing
    binary or a failed start fails the tests that use it, with weed's log tail.
    """
    with running_s3_server(tmp_path_factory.mktemp("s3server")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Tiny synthetic checkpoints in both official layouts, written once per session.

    Returns ``(zimage_dir, wan_dir)``; the same writer the demo uses.
    """
    from storystudio.demo import ensure_tiny_checkpoints

    return ensure_tiny_checkpoints(tmp_path_factory.mktemp("models"))
