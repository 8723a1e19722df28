"""Kernel tests for io/reactor.py: epoll readiness on real eventfds, timers, pollers."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator

import pytest

from vhostuser.io import fdcount
from vhostuser.io.eventfd import EventFd
from vhostuser.io.reactor import Reactor


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    try:
        yield r
    finally:
        r.close()


def test_reader_fires_on_notify_and_stops_after_remove(reactor: Reactor) -> None:
    with EventFd() as ev:
        seen: list[int] = []
        reactor.add_reader(ev.fd, lambda: seen.append(ev.drain()))
        assert reactor.has_reader(ev.fd)
        assert reactor.run_once(0) is False  # nothing pending
        ev.notify()
        ev.notify()
        assert reactor.run_once(1.0) is True
        assert seen == [2]
        assert reactor.remove_reader(ev.fd) is True
        assert reactor.remove_reader(ev.fd) is False
        ev.notify()
        assert reactor.run_once(0) is False
        assert seen == [2]


def test_add_reader_replaces_the_callback(reactor: Reactor) -> None:
    with EventFd() as ev:
        seen: list[str] = []
        reactor.add_reader(ev.fd, lambda: seen.append("old"))

        def new() -> None:
            seen.append("new")
            ev.drain()

        reactor.add_reader(ev.fd, new)
        ev.notify()
        reactor.run_once(1.0)
        assert seen == ["new"]


def test_reader_removed_by_an_earlier_callback_in_the_same_batch(reactor: Reactor) -> None:
    with EventFd() as a, EventFd() as b:
        ran: list[str] = []

        def on_a() -> None:
            ran.append("a")
            a.drain()
            reactor.remove_reader(b.fd)

        def on_b() -> None:
            ran.append("b")
            b.drain()
            reactor.remove_reader(a.fd)

        reactor.add_reader(a.fd, on_a)
        reactor.add_reader(b.fd, on_b)
        a.notify()
        b.notify()
        reactor.run_once(1.0)
        assert ran in (["a"], ["b"])  # whichever ran first unregistered the other


def test_fd_closed_without_remove_then_number_reused(reactor: Reactor) -> None:
    old = EventFd()
    number = old.fd
    reactor.add_reader(number, lambda: None)
    old.close()  # epoll forgets it; our table still has the number
    new = EventFd()
    assert new.fd == number  # the lowest free number is reused
    seen: list[int] = []
    reactor.add_reader(new.fd, lambda: seen.append(new.drain()))
    new.notify()
    reactor.run_once(1.0)
    assert seen == [1]
    reactor.remove_reader(new.fd)
    new.close()


def test_timers_run_in_order_and_cancel(reactor: Reactor) -> None:
    order: list[str] = []
    reactor.call_later(0.03, lambda: order.append("c"))
    reactor.call_later(0.01, lambda: order.append("a"))
    t = reactor.call_later(0.02, lambda: order.append("cancelled"))
    reactor.call_later(0.02, lambda: order.append("b"))
    t.cancel()
    t.cancel()
    assert t.cancelled
    t0 = time.monotonic()
    assert reactor.run(until=lambda: len(order) == 3, timeout=2.0) is True
    assert order == ["a", "b", "c"]
    assert time.monotonic() - t0 >= 0.03


def test_many_cancelled_timers_do_not_fire(reactor: Reactor) -> None:
    fired: list[int] = []
    timers = [reactor.call_later(0.001, functools.partial(fired.append, i)) for i in range(1000)]
    for t in timers[:-1]:
        t.cancel()
    reactor.run(timeout=0.05)
    assert fired == [999]


def test_call_soon_is_fifo_and_deferred_to_the_next_iteration(reactor: Reactor) -> None:
    order: list[int] = []

    def first() -> None:
        order.append(1)
        reactor.call_soon(lambda: order.append(3))

    reactor.call_soon(first)
    reactor.call_soon(lambda: order.append(2))
    cancelled = reactor.call_soon(lambda: order.append(99))
    cancelled.cancel()
    reactor.run_once(0)
    assert order == [1, 2]
    reactor.run_once(0)
    assert order == [1, 2, 3]


def test_pollers_spin_without_sleeping(reactor: Reactor) -> None:
    calls = 0

    def poller() -> bool:
        nonlocal calls
        calls += 1
        return calls % 2 == 0

    reactor.add_poller(poller)
    reactor.call_later(3600, lambda: None)  # a far timer must not make the loop sleep
    t0 = time.monotonic()
    assert reactor.run(until=lambda: calls >= 1000, timeout=5.0) is True
    assert time.monotonic() - t0 < 2.0
    assert reactor.run_once(None) in (True, False)  # never blocks while polling
    assert reactor.remove_poller(poller) is True
    assert reactor.remove_poller(poller) is False


def test_poller_sees_work_alongside_fds(reactor: Reactor) -> None:
    with EventFd() as ev:
        polled: list[int] = []

        def poll() -> bool:
            polled.append(ev.drain())
            return True

        reactor.add_poller(poll)
        ev.notify()
        reactor.run_once(None)
        assert polled == [1]


def test_errors_are_logged_recorded_and_contained(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    hooked: list[tuple[Exception, object]] = []
    reactor.on_error = lambda exc, cb: hooked.append((exc, cb))
    ran: list[str] = []

    def bad() -> None:
        raise RuntimeError("boom from a callback")

    def bad_poller() -> bool:
        raise KeyError("poller")

    with EventFd() as ev:

        def reader() -> None:
            ev.drain()
            ran.append("reader")

        reactor.add_reader(ev.fd, reader)
        reactor.call_soon(bad)
        reactor.call_later(0, bad)
        reactor.call_soon(lambda: ran.append("soon"))
        reactor.add_poller(bad_poller)
        ev.notify()
        with caplog.at_level(logging.ERROR, logger="vhostuser.io.reactor"):
            reactor.run_once(0.5)
            reactor.run_once(0.5)
        assert "reader" in ran and "soon" in ran
        kinds = [type(e) for e in reactor.errors]
        assert kinds.count(RuntimeError) == 2
        assert kinds.count(KeyError) == 2  # the poller failed on both iterations
        assert [e for e, _ in hooked] == reactor.errors
        assert any("boom from a callback" in r.getMessage() for r in caplog.records)
        reactor.remove_reader(ev.fd)


def test_error_hook_that_raises_is_contained(reactor: Reactor) -> None:
    def hook(exc: Exception, cb: object) -> None:
        raise ValueError("hook broke")

    reactor.on_error = hook
    reactor.call_soon(lambda: 1 / 0)
    reactor.run_once(0)
    assert isinstance(reactor.errors[0], ZeroDivisionError)


def test_errors_list_is_bounded() -> None:
    with Reactor(max_errors=5) as r:

        def fail(i: int) -> None:
            raise ValueError(i)

        for i in range(20):
            r.call_soon(functools.partial(fail, i))
        r.run_once(0)
        assert [e.args[0] for e in r.errors] == [15, 16, 17, 18, 19]


def test_keyboard_interrupt_propagates(reactor: Reactor) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    reactor.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        reactor.run_once(0)


def test_run_stop_timeout_and_empty(reactor: Reactor) -> None:
    assert reactor.run() is True  # nothing registered: returns instead of blocking forever
    assert reactor.run(until=lambda: False) is False  # ...or spinning on until() forever
    assert reactor.run_once(None) is False
    t0 = time.monotonic()
    assert reactor.run(timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.05
    reactor.call_later(0.01, reactor.stop)
    reactor.call_later(10, lambda: None)
    assert reactor.run() is True
    # stop() only ends the run it was called in.
    assert reactor.run(timeout=0.02) is False


def test_closed_reactor_refuses_use_and_frees_its_epoll_fd() -> None:
    before = fdcount.snapshot()
    r = Reactor()
    with EventFd() as ev:
        r.add_reader(ev.fd, lambda: None)
        r.close()
        r.close()
        assert r.closed
        with pytest.raises(ValueError, match="closed"):
            r.add_reader(ev.fd, lambda: None)
        with pytest.raises(ValueError, match="closed"):
            r.run_once(0)
        os.fstat(ev.fd)  # the watched fd belongs to its owner, not the reactor
    assert not fdcount.snapshot().diff(before)


def test_negative_fd_is_refused(reactor: Reactor) -> None:
    with pytest.raises(ValueError, match="-1"):
        reactor.add_reader(-1, lambda: None)
