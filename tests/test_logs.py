"""cypaxos.logs.RateLimitedLog with a fake clock: once, then once per interval, counted."""
from __future__ import annotations

import logging

import pytest

from cypaxos.logs import OVERFLOW_KEY, RateLimitedLog


pytestmark = pytest.mark.fast


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.DEBUG, logger="test.ratelimit")

    def messages():
        return [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]
    return messages


def make(clock, **kw) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger("test.ratelimit"), 60.0, clock=clock, **kw)


def test_first_then_once_per_interval_with_count(clock, lines):
    log = make(clock)
    assert log.warning("10.0.0.1", "auth failed from %s: %s", "10.0.0.1", "wrong secret")
    for _ in range(41):
        clock.now += 1
        assert not log.warning("10.0.0.1", "auth failed from %s: %s", "10.0.0.1", "wrong secret")
    assert log.pending("10.0.0.1") == 41
    clock.now += 19   # 60 s after the first line
    assert log.warning("10.0.0.1", "auth failed from %s: %s", "10.0.0.1", "bad hello")
    assert lines() == [
        "auth failed from 10.0.0.1: wrong secret",
        "auth failed from 10.0.0.1: bad hello (and 41 more like it in the last 60 s)",
    ]
    assert log.pending("10.0.0.1") == 0
    assert (log.events, log.lines) == (43, 2)


def test_keys_are_independent(clock, lines):
    log = make(clock)
    for source in ("a", "b", "a", "b", "c"):
        log.warning(source, "from %s", source)
    assert lines() == ["from a", "from b", "from c"]
    assert log.pending("a") == log.pending("b") == 1 and log.pending("c") == 0


def test_flush_reports_quiet_keys_and_forgets_them(clock, lines):
    log = make(clock)
    log.warning("a", "from a")
    log.warning("a", "from a again")
    log.warning("b", "from b")
    clock.now += 59.9
    assert log.flush() == 0          # not a whole interval yet
    clock.now += 0.1
    assert log.flush() == 1          # a's held-back event; b had none
    assert lines()[-1] == "from a again (and 1 more like it in the last 60 s)"
    assert len(log) == 0
    assert log.warning("a", "from a")  # forgotten: logged at once
    assert log.flush() == 0


def test_level_and_percent_signs(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="test.ratelimit")
    log = make(clock)
    log.log(logging.ERROR, "k", "100% bad")
    log.log(logging.ERROR, "k", "100% bad")
    clock.now += 60
    log.log(logging.INFO, "k", "100% bad")
    records = [r for r in caplog.records if r.name == "test.ratelimit"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "100% bad"),
        (logging.INFO, "100% bad (and 1 more like it in the last 60 s)")]


def test_table_is_bounded(clock, lines):
    log = make(clock, keys_max=3)
    for source in range(10):
        log.warning(source, "from %d", source)
    assert len(log) == 4   # three sources and the overflow key
    assert lines() == ["from 0", "from 1", "from 2", "from 3"]
    assert log.pending(OVERFLOW_KEY) == 6
    clock.now += 60
    log.warning("new", "from new")   # quiet keys are flushed and forgotten to make room
    assert lines()[-2:] == ["from 9 (and 6 more like it in the last 60 s)", "from new"]
    assert len(log) == 1


def test_bad_settings(clock):
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), 0, clock=clock)
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), 1, clock=clock, keys_max=0)


def test_a_traceback_goes_with_the_lines_logged_now(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="test.ratelimit")
    log = make(clock)
    for _ in range(3):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.log(logging.ERROR, "k", "unexpected", exc_info=True)
    log.info("other", "connected")
    clock.now += 60
    assert log.flush() == 1
    records = [r for r in caplog.records if r.name == "test.ratelimit"]
    assert [(r.levelno, bool(r.exc_info) and r.exc_info[0] is RuntimeError)
            for r in records] == [(logging.ERROR, True), (logging.INFO, False),
                                  (logging.ERROR, False)]
    assert records[-1].getMessage() == "unexpected (and 2 more like it in the last 60 s)"
