"""The back-end core's in-band notifications, DEVICE_STATE transfer and refusal of
postcopy, sans-IO over the fake host (integer fd tokens).

Each hostile case checks the error names the value, and that every fd token given to the
core is released exactly once.
"""

from __future__ import annotations

import pytest

from vhostuser.connection import events as ev
from vhostuser.connection.backend import (
    STATE_REPLY_NOFD,
    BackendConnection,
    StateTransfer,
)
from vhostuser.devices.base import DeviceStateError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature

from .fakes import (
    FakeDevice,
    FakeHost,
    FdSource,
    StubRingFactory,
    configure_ring,
    feed,
    handshake,
    make_backend,
    raw,
    replies,
    req,
    u64,
)
from .test_backend_core import expect_violation

R = FrontendRequest
PF = ProtocolFeature

Setup = tuple[BackendConnection[int], FakeHost, StubRingFactory, FdSource]

INBAND_SET = int(PF.INBAND_NOTIFICATIONS | PF.BACKEND_REQ | PF.REPLY_ACK)


def inband_backend(num_queues: int = 2) -> Setup:
    """A core offering INBAND_NOTIFICATIONS, after a handshake that acked it."""
    host = FakeHost()
    factory = StubRingFactory()
    conn: BackendConnection[int] = BackendConnection(
        FakeDevice(num_queues=num_queues), host, ring_factory=factory,
        inband_notifications=True)
    fds = FdSource()
    handshake(conn, fds)
    feed(conn, req(R.SET_BACKEND_REQ_FD), fds.take(1))
    conn.data_to_send()
    return conn, host, factory, fds


def configure_inband(conn: BackendConnection[int], index: int) -> None:
    """Size and addresses, then kick and call with the invalid-fd flag (no fds)."""
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=index, num=256)))
    from .fakes import ring_addr
    feed(conn, req(R.SET_VRING_ADDR, ring_addr(index)))
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=index, nofd=True)))
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=index, nofd=True)))
    conn.data_to_send()


# -- in-band notifications ---------------------------------------------------------------


def test_inband_is_offered_only_when_asked_for() -> None:
    plain = make_backend(FakeDevice())[0]
    assert not plain.offered_protocol_features & PF.INBAND_NOTIFICATIONS
    conn = inband_backend()[0]
    assert conn.offered_protocol_features & PF.INBAND_NOTIFICATIONS
    assert conn.has(PF.INBAND_NOTIFICATIONS)


def test_vring_kick_without_inband_is_refused() -> None:
    setup = make_backend(FakeDevice())
    conn, _h, _f, fds = setup
    handshake(conn, fds)
    configure_ring(conn, fds, 0)
    expect_violation(setup, req(R.VRING_KICK, P.VringState(index=0, num=0), need_reply=True),
                     names=["VRING_KICK", "INBAND_NOTIFICATIONS"])


def test_nofd_kick_with_inband_waits_for_messages() -> None:
    conn, _host, factory, _fds = inband_backend()
    configure_inband(conn, 0)
    v = conn.vrings[0]
    assert v.kick_inband and not v.kick_polled and not v.call_polled
    assert not v.started and factory.built == []
    got = feed(conn, req(R.VRING_KICK, P.VringState(index=0, num=0), need_reply=True))
    assert got == [ev.VringStarted(0), ev.VringKicked(0)]
    assert replies(conn) == [(int(R.VRING_KICK), 0x5, u64(0))]
    assert v.started and len(factory.built) == 1
    # A second kick only wakes the running ring.
    assert feed(conn, req(R.VRING_KICK, P.VringState(index=0, num=0))) == [ev.VringKicked(0)]
    assert len(factory.built) == 1


def test_nofd_kick_without_inband_polls_and_starts_once() -> None:
    dev = FakeDevice()
    conn, _host, _factory, fds = make_backend(dev)
    handshake(conn, fds)
    configure_ring(conn, fds, 0, kick=False)
    dev.events.clear()
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0, nofd=True)))
    assert conn.vrings[0].kick_polled and conn.vrings[0].started
    # The device hears of the start once (not once from kick() and again from the message).
    assert dev.events.count(ev.VringStarted(0)) == 1


@pytest.mark.parametrize(("index", "names"), [
    (1, ["ring 1", "not configured"]),
    (7, ["ring index 7", "out of range"]),
])
def test_vring_kick_for_a_ring_that_cannot_run(index: int, names: list[str]) -> None:
    setup = inband_backend()
    configure_inband(setup[0], 0)
    expect_violation(setup, req(R.VRING_KICK, P.VringState(index=index, num=0),
                                need_reply=True), names=["VRING_KICK", *names])


def test_vring_kick_reserved_num_must_be_zero() -> None:
    setup = inband_backend()
    configure_inband(setup[0], 0)
    expect_violation(setup, req(R.VRING_KICK, P.VringState(index=0, num=3), need_reply=True),
                     names=["ring 0", "0x3", "reserved"])


def test_call_is_inband_only_without_a_call_fd() -> None:
    conn, _host, _factory, fds = inband_backend()
    configure_inband(conn, 0)
    assert conn.call_inband(0)
    assert conn.call_inband(1)  # never set: with INBAND, calls go as messages
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=1)), fds.take(1))
    assert not conn.call_inband(1)  # an fd is preferred over messages
    assert not conn.call_inband(5)


def test_call_is_not_inband_without_the_feature_or_channel() -> None:
    conn, _host, _factory, fds = make_backend(FakeDevice())
    handshake(conn, fds)
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=0, nofd=True)))
    assert conn.vrings[0].call_polled and not conn.call_inband(0)
    conn2, _h2, _f2, fds2 = make_backend(FakeDevice())
    handshake(conn2, fds2)  # INBAND not offered: no channel, no in-band calls
    assert not conn2.call_inband(0)


def test_suspended_follows_the_rings() -> None:
    conn, _host, _factory, _fds = inband_backend()
    assert conn.suspended
    configure_inband(conn, 0)
    feed(conn, req(R.VRING_KICK, P.VringState(index=0, num=0)))
    assert not conn.suspended
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)))
    assert conn.suspended


# -- DEVICE_STATE --------------------------------------------------------------------------


class StateDevice(FakeDevice):
    """A device with a state: ``saved`` is what it saves, ``loaded`` what it was given."""

    max_state_size = 64

    def __init__(self, saved: bytes = b"state-v1") -> None:
        super().__init__(num_queues=2)
        self.saved = saved
        self.loaded: list[bytes] = []

    def save_state(self) -> bytes:
        return self.saved

    def load_state(self, data: bytes) -> None:
        if not data.startswith(b"state-"):
            raise DeviceStateError(f"field 'magic' is {data[:6]!r}, not b'state-'")
        self.loaded.append(data)


def state_backend() -> tuple[Setup, StateDevice]:
    dev = StateDevice()
    setup = make_backend(dev)
    handshake(setup[0], setup[3])
    return setup, dev


def set_state_fd(conn: BackendConnection[int], fd: int, direction: int, phase: int = 0
                 ) -> tuple[int, list[ev.Event]]:
    got = feed(conn, req(R.SET_DEVICE_STATE_FD,
                         P.DeviceStateParams(direction=direction, phase=phase)), [fd])
    ((request, flags, payload),) = replies(conn)
    assert (request, flags) == (int(R.SET_DEVICE_STATE_FD), 0x5)
    return int.from_bytes(payload, "little"), got


def check(conn: BackendConnection[int]) -> tuple[int, list[ev.Event]]:
    got = feed(conn, req(R.CHECK_DEVICE_STATE))
    ((request, flags, payload),) = replies(conn)
    assert (request, flags) == (int(R.CHECK_DEVICE_STATE), 0x5)
    return int.from_bytes(payload, "little"), got


def test_device_state_is_offered_only_by_devices_that_have_one() -> None:
    assert not make_backend(FakeDevice())[0].offered_protocol_features & PF.DEVICE_STATE
    assert make_backend(StateDevice())[0].offered_protocol_features & PF.DEVICE_STATE


def test_device_state_requests_need_the_feature() -> None:
    setup = make_backend(FakeDevice())
    handshake(setup[0], setup[3])
    fd = setup[3].one()
    expect_violation(setup, req(R.SET_DEVICE_STATE_FD,
                                P.DeviceStateParams(direction=0, phase=0), need_reply=True),
                     [fd], names=["SET_DEVICE_STATE_FD", "DEVICE_STATE"])


def test_save_then_check() -> None:
    (conn, host, _f, fds), dev = state_backend()
    fd = fds.one()
    value, got = set_state_fd(conn, fd, 0)
    assert value == STATE_REPLY_NOFD  # success, and the front-end keeps its own end
    (event,) = got
    assert isinstance(event, ev.DeviceStateTransfer) and event.direction == 0 and event.fd == fd
    t = event.transfer
    assert isinstance(t, StateTransfer)
    assert bytes(t.pending()) == dev.saved
    t.wrote(3)
    assert not t.done
    t.wrote(len(dev.saved) - 3)
    assert t.done
    conn.release_state_fd()
    assert fd in host.released
    value, got = check(conn)
    assert value == 0 and got[-1] == ev.DeviceStateChecked(0, True, None)
    conn.close()
    host.assert_all_released(fds.given)


def test_load_then_check() -> None:
    (conn, host, _f, fds), dev = state_backend()
    value, got = set_state_fd(conn, fds.one(), 1)
    assert value == STATE_REPLY_NOFD
    t = got[0].transfer  # type: ignore[attr-defined]
    t.received(b"state-")
    t.received(b"v7")
    t.eof()
    assert dev.loaded == [b"state-v7"]
    value, got = check(conn)  # the core releases the fd if the shell did not
    assert value == 0 and got[-1] == ev.DeviceStateChecked(1, True, None)
    conn.close()
    host.assert_all_released(fds.given)


def test_load_of_garbage_fails_the_check_naming_the_field() -> None:
    (conn, host, _f, fds), dev = state_backend()
    _v, got = set_state_fd(conn, fds.one(), 1)
    t = got[0].transfer  # type: ignore[attr-defined]
    t.received(b"\x00garbage")
    t.eof()
    assert dev.loaded == []
    value, got = check(conn)
    assert value != 0
    done = got[-1]
    assert isinstance(done, ev.DeviceStateChecked) and not done.ok
    assert done.error is not None and "magic" in done.error
    assert not conn.closed  # a failed transfer is an answer, not a violation
    conn.close()
    host.assert_all_released(fds.given)


def test_load_larger_than_the_device_accepts_fails() -> None:
    (conn, host, _f, fds), dev = state_backend()
    _v, got = set_state_fd(conn, fds.one(), 1)
    t = got[0].transfer  # type: ignore[attr-defined]
    t.received(b"state-" + bytes(40))
    t.received(bytes(40))  # 86 > 64
    assert t.incoming == bytearray()  # nothing kept once over the limit
    t.eof()
    assert dev.loaded == []
    value, got = check(conn)
    assert value != 0 and "64 bytes" in (got[-1].error or "")  # type: ignore[attr-defined]
    conn.close()
    host.assert_all_released(fds.given)


@pytest.mark.parametrize(("direction", "phase", "why"), [
    (2, 0, "direction 2"),
    (0xFFFFFFFF, 0, "direction 4294967295"),
    (0, 1, "phase 1"),
    (1, 7, "phase 7"),
])
def test_bad_parameters_are_a_violation(direction: int, phase: int, why: str) -> None:
    # The payload itself is malformed (payloads.DeviceStateParams): the connection closes
    # without an answer (the request has a reply of its own, so no u64 NACK) and the fd
    # is released.
    setup, dev = state_backend()
    fd = setup[3].one()
    expect_violation(setup, req(R.SET_DEVICE_STATE_FD,
                                P.DeviceStateParams(direction=direction, phase=phase),
                                need_reply=True),
                     [fd], names=["SET_DEVICE_STATE_FD", why])
    assert dev.loaded == []


def test_state_cannot_move_while_a_ring_runs() -> None:
    (conn, host, _f, fds), _dev = state_backend()
    configure_ring(conn, fds, 1)
    conn.kick(1)
    value, _got = set_state_fd(conn, fds.one(), 0)
    assert value == STATE_REPLY_NOFD | 1
    value, got = check(conn)
    assert value != 0 and "ring(s) 1 still run" in (got[-1].error or "")  # type: ignore
    # Once stopped, it may.
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=1, num=0)))
    conn.data_to_send()
    value, _got = set_state_fd(conn, fds.one(), 0)
    assert value == STATE_REPLY_NOFD
    conn.close()
    host.assert_all_released(fds.given)


@pytest.mark.parametrize("nfds", [0, 2])
def test_set_device_state_fd_needs_exactly_one_fd(nfds: int) -> None:
    setup, _dev = state_backend()
    fds = setup[3].take(nfds)
    expect_violation(setup, req(R.SET_DEVICE_STATE_FD, P.DeviceStateParams(direction=0,
                                                                           phase=0)),
                     fds, names=["SET_DEVICE_STATE_FD", "fd"], check_nack=False)


def test_check_without_a_transfer_fails() -> None:
    (conn, _host, _f, _fds), _dev = state_backend()
    value, got = check(conn)
    assert value != 0 and "no SET_DEVICE_STATE_FD" in (got[-1].error or "")  # type: ignore


def test_check_of_a_save_not_read_to_the_end_fails() -> None:
    (conn, host, _f, fds), dev = state_backend()
    _v, got = set_state_fd(conn, fds.one(), 0)
    got[0].transfer.wrote(2)  # type: ignore[attr-defined]
    value, got = check(conn)
    assert value != 0
    assert f"only 2 of {len(dev.saved)}" in (got[-1].error or "")  # type: ignore
    conn.close()
    host.assert_all_released(fds.given)


def test_check_of_a_load_without_end_of_file_fails() -> None:
    (conn, host, _f, fds), dev = state_backend()
    _v, got = set_state_fd(conn, fds.one(), 1)
    got[0].transfer.received(b"state-x")  # type: ignore[attr-defined]
    value, got = check(conn)
    assert value != 0 and "end of file" in (got[-1].error or "")  # type: ignore
    assert dev.loaded == []
    conn.close()
    host.assert_all_released(fds.given)


def test_a_second_set_replaces_the_first_and_reset_releases() -> None:
    (conn, host, _f, fds), _dev = state_backend()
    first, second = fds.one(), fds.one()
    set_state_fd(conn, first, 0)
    set_state_fd(conn, second, 1)
    assert first in host.released and second not in host.released
    feed(conn, req(R.RESET_DEVICE))
    assert second in host.released
    conn.close()
    host.assert_all_released(fds.given)


def test_checking_event_comes_before_the_answer() -> None:
    (conn, _host, _f, fds), _dev = state_backend()
    _v, got = set_state_fd(conn, fds.one(), 1)
    t = got[0].transfer  # type: ignore[attr-defined]
    seen: list[ev.Event] = []

    def shell(e: ev.Event) -> None:
        # What a shell does on DeviceStateChecking: finish with what the pipe holds.
        seen.append(e)
        if isinstance(e, ev.DeviceStateChecking):
            t.received(b"state-late")
            t.eof()

    conn.dispatcher.subscribe(shell)
    value, _got = check(conn)
    assert value == 0
    assert [type(e) for e in seen] == [ev.DeviceStateChecking, ev.DeviceStateChecked]


# -- postcopy: never offered, so refused ---------------------------------------------------


@pytest.mark.parametrize("request_", [R.POSTCOPY_ADVISE, R.POSTCOPY_LISTEN, R.POSTCOPY_END])
def test_postcopy_without_pagefault_is_a_violation(request_: FrontendRequest) -> None:
    setup = make_backend(FakeDevice())
    conn = setup[0]
    handshake(conn, setup[3])
    assert not conn.offered_protocol_features & PF.PAGEFAULT
    expect_violation(setup, raw(request_, b"", 0x9), names=[request_.name, "PAGEFAULT"])


def test_err_is_inband_only_without_an_err_fd() -> None:
    conn, _host, _factory, fds = inband_backend()
    assert conn.err_inband(0)
    feed(conn, req(R.SET_VRING_ERR, P.VringFile(index=0)), fds.take(1))
    assert not conn.err_inband(0) and conn.err_inband(1) and not conn.err_inband(9)
    plain = make_backend(FakeDevice())[0]
    assert not plain.err_inband(0)
