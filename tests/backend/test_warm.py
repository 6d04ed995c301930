"""WarmWorkers: workersMin goes back to its previous value whatever happens."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from storystudio.backend.client import RetryPolicy
from storystudio.backend.errors import RequestTimeout, RestoreFailed, WorkersNotReady
from storystudio.backend.warm import Terminated, WarmWorkers

from .conftest import ENDPOINT, make_client


def test_sets_and_restores(fake, client):
    with WarmWorkers(client, ENDPOINT, 2) as warm:
        assert fake.workers_min() == 2
        assert warm.previous == 0 and warm.changed
    assert fake.workers_min() == 0 and warm.restored
    assert fake.workers_min_history[ENDPOINT] == [2, 0]


def test_restores_on_exception(fake, client):
    with pytest.raises(ZeroDivisionError):
        with WarmWorkers(client, ENDPOINT, 1):
            1 / 0
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


def test_restores_on_keyboard_interrupt(fake, client):
    with pytest.raises(KeyboardInterrupt):
        with WarmWorkers(client, ENDPOINT, 1):
            raise KeyboardInterrupt
    assert fake.workers_min() == 0


def test_does_not_lower_a_higher_setting(fake, client):
    fake.set_workers_min(3)
    with WarmWorkers(client, ENDPOINT, 1) as warm:
        assert not warm.changed
    assert fake.workers_min() == 3 and fake.calls("PATCH") == []


def test_waits_for_a_ready_worker(fake, client):
    fake.health_ready_after = 2
    with WarmWorkers(client, ENDPOINT, 1, wait_ready=True, ready_timeout=5, ready_poll_interval=0.001):
        assert client.health(ENDPOINT).workers.warm == 1
    assert fake.workers_min() == 0


def test_ready_timeout_restores_before_raising(fake, client):
    fake.health_never_ready = True
    with pytest.raises(WorkersNotReady):
        with WarmWorkers(client, ENDPOINT, 1, wait_ready=True, ready_timeout=0.03, ready_poll_interval=0.005):
            pytest.fail("body must not run")
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


def test_patch_applied_but_answer_lost_is_still_restored(fake):
    """RunPod applies the PATCH, the answer never arrives (client timeout every try):
    entering fails, and the restore puts the value back anyway."""
    client = make_client(fake, timeout=(1.0, 0.15), retry=RetryPolicy(max_attempts=2, backoff_base=0.001))
    fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 200, delay=0.4, apply=True, times=2)
    with pytest.raises(RequestTimeout):
        with WarmWorkers(client, ENDPOINT, 2):
            pytest.fail("body must not run")
    assert fake.workers_min_history[ENDPOINT] == [2, 2, 0]
    assert fake.workers_min() == 0


def test_restore_survives_5xx_and_429(fake, client):
    fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 503, times=2)
    fake.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 429, headers={"Retry-After": "0"}, times=1)
    with WarmWorkers(client, ENDPOINT, 1):
        fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 500, times=3)
    assert fake.workers_min() == 0


def test_restore_failure_names_the_fix(fake, client, caplog):
    with pytest.raises(RestoreFailed) as info:
        with WarmWorkers(client, ENDPOINT, 1, restore_rounds=2):
            fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 500, times=100)
    assert f"storystudio warm set 0 --endpoint {ENDPOINT}" in str(info.value)
    assert fake.workers_min() == 1  # really not restored: the message is the only way out
    assert len(fake.calls("PATCH")) == 1 + 2 * 4  # set + 2 rounds x 4 attempts


def test_restore_failure_does_not_mask_the_original_error(fake, client, caplog):
    with pytest.raises(ValueError):
        with WarmWorkers(client, ENDPOINT, 1, restore_rounds=1):
            fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 500, times=100)
            raise ValueError("job went wrong")
    assert "storystudio warm set 0" in caplog.text


def test_someone_else_changed_it_meanwhile(fake, client, caplog):
    with caplog.at_level(logging.WARNING):
        with WarmWorkers(client, ENDPOINT, 1):
            fake.set_workers_min(4)  # an operator
    assert fake.workers_min() == 4 and "someone else" in caplog.text


def test_overlapping_runs_with_different_values_known_limit(fake, client):
    a = WarmWorkers(client, ENDPOINT, 1, handle_signals=False)
    b = WarmWorkers(client, ENDPOINT, 2, handle_signals=False)
    a.__enter__()
    b.__enter__()
    assert fake.workers_min() == 2
    a.__exit__(None, None, None)  # a sees 2 (not its 1): leaves it to b
    assert fake.workers_min() == 2
    b.__exit__(None, None, None)  # b restores its previous (1)...
    assert fake.workers_min() == 1  # ...which was a's value, though a already left (documented limit)


def test_overlapping_runs_with_the_same_value_end_at_zero(fake, client):
    a = WarmWorkers(client, ENDPOINT, 1, handle_signals=False)
    b = WarmWorkers(client, ENDPOINT, 1, handle_signals=False)
    a.__enter__()
    b.__enter__()  # already 1: b changes nothing and will restore nothing
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert fake.workers_min() == 0 and fake.workers_min_history[ENDPOINT] == [1, 0]


def test_overlapping_runs_lifo_end_at_zero(fake, client):
    with WarmWorkers(client, ENDPOINT, 1):
        with WarmWorkers(client, ENDPOINT, 2):
            assert fake.workers_min() == 2
        assert fake.workers_min() == 1
    assert fake.workers_min() == 0


# --------------------------------------------------------------------------- signals


def test_sigterm_in_block_restores_and_exits_143(fake, client):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with WarmWorkers(client, ENDPOINT, 1):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt the block")
    assert info.value.code == 143
    assert fake.workers_min() == 0
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back


def test_sigint_in_block_is_keyboard_interrupt(fake, client):
    with pytest.raises(KeyboardInterrupt):
        with WarmWorkers(client, ENDPOINT, 1):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert fake.workers_min() == 0


def test_signal_during_restore_waits_for_the_restore(fake, client):
    """A second Ctrl-C while the restore PATCH is in flight must not abort it."""
    sent = []

    def on_request(record):
        if record["method"] == "PATCH" and b'"workersMin":0' in record["raw"] and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # let the handler run while the client waits for the answer

    fake.on_request = on_request
    with pytest.raises(KeyboardInterrupt):
        with WarmWorkers(client, ENDPOINT, 1):
            pass
    assert sent and fake.workers_min() == 0


def test_ignored_signals_stay_ignored(fake, client):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with WarmWorkers(client, ENDPOINT, 1):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # like nohup: nothing happens
            time.sleep(0.01)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert fake.workers_min() == 0


def test_no_signal_handlers_outside_main_thread(fake, client):
    import threading

    errors = []

    def run():
        try:
            with WarmWorkers(client, ENDPOINT, 1) as w:
                assert not w.guard.installed
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not errors and fake.workers_min() == 0
