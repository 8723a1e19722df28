"""BackendConnection (sans-IO back-end core) over a fake host with integer fd tokens.

Every protocol violation must give a RemoteProtocolError whose message names the value, a
NACK when NEED_REPLY was set (u64 non-zero, flags 0x5, same request id), and every fd
token the core was given released exactly once once the connection errors or closes.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.connection import events as ev
from vhostuser.connection.backend import (
    BASE_PROTOCOL_FEATURES,
    BASE_VIRTIO_FEATURES,
    BackendConnection,
)
from vhostuser.connection.vring import TRANSITIONS, RingEvent, VringControl
from vhostuser.errors import LocalProtocolError, RemoteProtocolError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import (
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
)
from vhostuser.protocol.table import FRONTEND_RULES, Reply

from .fakes import (
    RAM_SIZE,
    RAM_UVA,
    FakeDevice,
    FakeHost,
    FdSource,
    StubRingFactory,
    configure_ring,
    feed,
    handshake,
    make_backend,
    ram_region,
    raw,
    replies,
    req,
    ring_addr,
    split_messages,
    u64,
)

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature

Conn = BackendConnection[int]


def net_device(num_queues: int = 2) -> FakeDevice:
    return FakeDevice(
        virtio_features=int(NetFeature.MAC | NetFeature.MRG_RXBUF | NetFeature.STATUS),
        protocol_features=int(PF.RARP | PF.MTU),
        num_queues=num_queues,
        config=bytes(range(12)),
    )


Setup = tuple[Conn, FakeHost, StubRingFactory, FdSource]


@pytest.fixture
def fresh() -> Setup:
    """A back-end core that has seen nothing yet."""
    return make_backend(net_device())


@pytest.fixture
def ready() -> Setup:
    """A back-end core after a full handshake with one 1 MiB memory region."""
    conn, host, factory, fds = make_backend(net_device())
    handshake(conn, fds)
    return conn, host, factory, fds


def ack(request: int, value: int = 0) -> tuple[int, int, bytes]:
    return (int(request), 0x5, u64(value))


def expect_violation(
    setup: Setup,
    data: bytes,
    fds: Sequence[int] = (),
    *,
    names: Sequence[str] = (),
    nack: bool | None = None,
    check_nack: bool = True,
) -> RemoteProtocolError:
    """Feed a violation; check the error, the NACK and that every fd was released.

    ``nack``: None derives it from the NEED_REPLY flag and the request's rule (requests with
    a reply of their own get no u64 NACK).
    """
    conn, host, _factory, src = setup
    request, flags, _size = struct.unpack_from("<III", data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(data, list(fds))
    text = str(info.value)
    for n in names:
        assert n in text, f"{n!r} not in {text!r}"
    out = replies(conn)
    if nack is None:
        rule = FRONTEND_RULES.get(FrontendRequest(request)) if request in range(1, 46) else None
        nack = bool(flags & 0x8) and (rule is None or rule.reply is not Reply.ALWAYS)
    if not check_nack:
        pass
    elif nack:
        assert out, "no NACK queued"
        got_req, got_flags, payload = out[-1]
        assert (got_req, got_flags, len(payload)) == (request, 0x5, 8)
        assert struct.unpack("<Q", payload)[0] != 0
    else:
        assert all(r[0] != request or r[2] != u64(1) for r in out)
    assert conn.error is not None
    assert conn.closed
    host.assert_all_released(src.given)
    # sticky: anything later raises and its fds are released too
    late = src.take(1)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(req(R.GET_FEATURES), late)
    host.assert_all_released(src.given)
    return info.value


# -- the happy path ------------------------------------------------------------------------


def test_full_qemu_style_handshake(fresh: Setup) -> None:
    conn, host, factory, fds = fresh
    dev = conn.device
    assert isinstance(dev, FakeDevice)

    feed(conn, req(R.GET_FEATURES))
    (r,) = replies(conn)
    offered = struct.unpack("<Q", r[2])[0]
    assert r[:2] == (R.GET_FEATURES, 0x5)
    assert offered == BASE_VIRTIO_FEATURES | VF.LOG_ALL | dev.virtio_features
    assert offered & VF.PROTOCOL_FEATURES and offered & VF.VERSION_1

    feed(conn, req(R.GET_PROTOCOL_FEATURES))
    (r,) = replies(conn)
    pf = struct.unpack("<Q", r[2])[0]
    assert pf == BASE_PROTOCOL_FEATURES | PF.RARP | PF.MTU | PF.MQ | PF.CONFIG
    assert pf & PF.REPLY_ACK

    assert feed(conn, req(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=pf))) == [
        ev.ProtocolFeaturesAcked(pf)
    ]
    feed(conn, req(R.GET_QUEUE_NUM))
    assert replies(conn) == [(R.GET_QUEUE_NUM, 0x5, u64(2))]
    feed(conn, req(R.GET_MAX_MEM_SLOTS))
    assert replies(conn) == [(R.GET_MAX_MEM_SLOTS, 0x5, u64(32))]

    chan = fds.one()
    assert feed(conn, req(R.SET_BACKEND_REQ_FD, need_reply=True), [chan]) == [
        ev.BackendChannelSet(chan)
    ]
    assert replies(conn) == [ack(R.SET_BACKEND_REQ_FD)]
    assert feed(conn, req(R.SET_OWNER)) == [ev.OwnerSet()]

    calls = fds.take(2)
    for i in (0, 1):
        assert feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=i)), [calls[i]]) == [
            ev.VringFdSet(i, "call", calls[i])
        ]
    features = offered & ~int(VF.RING_PACKED)
    assert feed(conn, req(R.SET_FEATURES, P.U64Payload(value=features))) == [
        ev.FeaturesAcked(features)
    ]
    assert dev.features_seen == [features]
    assert not conn.vrings[0].enabled  # PROTOCOL_FEATURES acked: rings wait for ENABLE

    mem_fd = fds.one()
    region = ram_region(off=0x1000)
    got = feed(conn, req(R.SET_MEM_TABLE, P.MemoryTable(regions=(region,)), need_reply=True),
               [mem_fd])
    assert got == [ev.MemTableSet(1)]
    assert replies(conn) == [ack(R.SET_MEM_TABLE)]
    (mapping,) = host.mapped
    assert mapping.fd == mem_fd and mapping.length == 0x1000 + RAM_SIZE
    assert dev.memory_changes == 1

    for i, base in ((0, 3), (1, 5)):
        feed(conn, req(R.SET_VRING_NUM, P.VringState(index=i, num=256)))
        feed(conn, req(R.SET_VRING_BASE, P.VringState(index=i, num=base)))
        feed(conn, req(R.SET_VRING_ADDR, ring_addr(i)))
        kick = fds.one()
        assert feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=i)), [kick]) == [
            ev.VringFdSet(i, "kick", kick)
        ]
        assert feed(conn, req(R.SET_VRING_ENABLE, P.VringState(index=i, num=1))) == [
            ev.VringEnabled(i, True)
        ]
    assert replies(conn) == []
    assert factory.built == []  # engines are built lazily, on the first kick

    assert conn.kick(0) == [ev.VringStarted(0)]
    assert conn.kick(0) == []  # already started
    (engine,) = factory.built
    assert engine.start_base == 3
    assert conn.vrings[0].started and conn.vrings[0].engine is engine
    assert ev.VringStarted(0) in dev.events

    engine.next_base = 7
    kick0 = conn.vrings[0].kick
    assert kick0 is not None
    got = feed(conn, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)))
    assert got == [ev.VringStopping(0), ev.VringStopped(0, 7)]
    assert replies(conn) == [(R.GET_VRING_BASE, 0x5, P.VringState(index=0, num=7).encode())]
    assert not conn.vrings[0].started and conn.vrings[0].engine is None
    assert host.released[kick0] == 1  # a stopped ring forgets its kick fd

    # ring 1 was configured but never kicked: its base is what SET_VRING_BASE said
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=1, num=0)))
    assert replies(conn) == [(R.GET_VRING_BASE, 0x5, P.VringState(index=1, num=5).encode())]

    assert feed(conn, b"") == []  # the front-end closed the socket
    assert conn.closed and conn.error is None
    host.assert_all_released(fds.given)
    assert host.live_mappings() == []


def test_close_is_idempotent_and_releases_everything(ready: Setup) -> None:
    conn, host, _f, fds = ready
    configure_ring(conn, fds, 0)
    configure_ring(conn, fds, 1)
    feed(conn, req(R.SET_VRING_ERR, P.VringFile(index=0)), fds.take(1))
    feed(conn, req(R.SET_BACKEND_REQ_FD), fds.take(1))
    feed(conn, req(R.SET_LOG_FD), fds.take(1))
    conn.kick(0)
    conn.close()
    conn.close()
    host.assert_all_released(fds.given)
    assert host.live_mappings() == []


def test_replacing_fds_releases_the_old_ones(ready: Setup) -> None:
    conn, host, _f, fds = ready
    first, second = fds.take(2)
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=0)), [first])
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=0)), [second])
    assert host.released[first] == 1 and host.released[second] == 0
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=0, nofd=True)))
    assert host.released[second] == 1
    assert conn.vrings[0].call is None and conn.vrings[0].call_polled


def test_new_memory_table_unmaps_the_old_one(ready: Setup) -> None:
    conn, host, _f, fds = ready
    (old,) = host.mapped
    regions = (ram_region(), ram_region(gpa=RAM_SIZE, uva=RAM_UVA + RAM_SIZE))
    feed(conn, req(R.SET_MEM_TABLE, P.MemoryTable(regions=regions)), fds.take(2))
    assert old.closes == 1
    assert len(host.live_mappings()) == 2
    assert len(conn.mem) == 2
    conn.close()
    host.assert_all_released(fds.given)


def test_nofd_kick_starts_a_polled_ring(ready: Setup) -> None:
    conn, _h, factory, fds = ready
    configure_ring(conn, fds, 0, kick=False)
    got = feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0, nofd=True)))
    assert ev.VringFdSet(0, "kick", None) in got
    assert ev.VringStarted(0) in got
    assert conn.vrings[0].kick_polled and len(factory.built) == 1


def test_kick_before_the_ring_exists_is_ignored(ready: Setup) -> None:
    conn, _h, factory, _fds = ready
    assert conn.kick(0) == []  # QEMU's courtesy kick right after SET_VRING_KICK
    assert not conn.vrings[0].started and factory.built == []


# -- REPLY_ACK -------------------------------------------------------------------------------


def _acked_cases(conn: Conn, fds: FdSource) -> list[tuple[FrontendRequest, bytes, list[int]]]:
    region = P.MemoryRegion(guest_phys_addr=0x10000000, memory_size=0x1000,
                            userspace_addr=0x7E00_0000_0000, mmap_offset=0)
    return [
        (R.SET_OWNER, b"", []),
        (R.SET_FEATURES, u64(int(VF.VERSION_1 | VF.PROTOCOL_FEATURES)), []),
        (R.SET_PROTOCOL_FEATURES, u64(conn.offered_protocol_features), []),
        (R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),)).encode(), fds.take(1)),
        (R.SET_VRING_NUM, P.VringState(index=0, num=64).encode(), []),
        (R.SET_VRING_BASE, P.VringState(index=1, num=9).encode(), []),
        (R.SET_VRING_ADDR, ring_addr(0).encode(), []),
        (R.SET_VRING_KICK, P.VringFile(index=1).encode(), fds.take(1)),
        (R.SET_VRING_CALL, P.VringFile(index=1).encode(), fds.take(1)),
        (R.SET_VRING_ERR, P.VringFile(index=1).encode(), fds.take(1)),
        (R.SET_VRING_ENABLE, P.VringState(index=1, num=1).encode(), []),
        (R.SET_BACKEND_REQ_FD, b"", fds.take(1)),
        (R.SET_LOG_FD, b"", fds.take(1)),
        (R.ADD_MEM_REG, P.SingleRegion(region=region).encode(), fds.take(1)),
        (R.REM_MEM_REG, P.SingleRegion(region=region).encode(), []),
        (R.SET_STATUS, u64(0xF), []),
        (R.NET_SET_MTU, u64(9000), []),
        (R.SEND_RARP, bytes.fromhex("525400123456") + b"\0\0", []),
        (R.RESET_DEVICE, b"", []),
        (R.RESET_OWNER, b"", []),
    ]


def test_need_reply_gets_exactly_one_ack_0(ready: Setup) -> None:
    conn, host, _f, fds = ready
    for request, payload, tokens in _acked_cases(conn, fds):
        feed(conn, raw(request, payload, 0x9), tokens)
        assert replies(conn) == [ack(request)], request.name
    conn.close()
    host.assert_all_released(fds.given)


def test_without_need_reply_no_ack(ready: Setup) -> None:
    conn, host, _f, fds = ready
    for request, payload, tokens in _acked_cases(conn, fds):
        feed(conn, raw(request, payload, 0x1), tokens)
        assert replies(conn) == [], request.name
    conn.close()
    host.assert_all_released(fds.given)


def test_requests_with_a_reply_get_no_extra_ack(ready: Setup) -> None:
    conn, _h, _f, fds = ready
    configure_ring(conn, fds, 0)
    cases: list[tuple[FrontendRequest, bytes, int]] = [
        (R.GET_FEATURES, b"", 8),
        (R.GET_PROTOCOL_FEATURES, b"", 8),
        (R.GET_QUEUE_NUM, b"", 8),
        (R.GET_MAX_MEM_SLOTS, b"", 8),
        (R.GET_STATUS, b"", 8),
        (R.GET_CONFIG, P.ConfigPayload(offset=0, size=6, flags=0, data=bytes(6)).encode(), 18),
        (R.GET_VRING_BASE, P.VringState(index=0, num=0).encode(), 8),
    ]
    for request, payload, size in cases:
        feed(conn, raw(request, payload, 0x9))
        out = replies(conn)
        assert len(out) == 1, request.name
        assert out[0][0] == request and out[0][1] == 0x5 and len(out[0][2]) == size


def test_get_config_returns_the_device_config(ready: Setup) -> None:
    conn, _h, _f, _fds = ready
    feed(conn, req(R.GET_CONFIG, P.ConfigPayload(offset=2, size=4, flags=0, data=bytes(4))))
    assert replies(conn) == [
        (R.GET_CONFIG, 0x5, P.ConfigPayload(offset=2, size=4, flags=0,
                                            data=bytes([2, 3, 4, 5])).encode())
    ]


def test_get_config_error_is_an_empty_reply(ready: Setup) -> None:
    # vhost-user.rst GET_CONFIG: "a reply with size 0 means an error"
    _conn, _h, _f, _fds = ready
    bad = P.ConfigPayload(offset=200, size=100, flags=0, data=bytes(100))
    expect_violation(ready, raw(R.GET_CONFIG, bad.encode(), 0x9), names=["200"], nack=False)


# -- PROTOCOL_FEATURES rules -----------------------------------------------------------------


def test_features_without_bit_30_enable_every_ring_at_once(fresh: Setup) -> None:
    conn, _h, _f, _fds = fresh
    feed(conn, req(R.SET_OWNER))
    got = feed(conn, req(R.SET_FEATURES, P.U64Payload(value=int(VF.VERSION_1))))
    assert got == [ev.FeaturesAcked(int(VF.VERSION_1)), ev.VringEnabled(0, True),
                   ev.VringEnabled(1, True)]
    assert all(v.enabled and not v.started for v in conn.vrings)


def test_set_vring_enable_after_features_without_bit_30(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.GET_FEATURES))
    feed(conn, req(R.GET_PROTOCOL_FEATURES))
    feed(conn, req(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=int(PF.REPLY_ACK))))
    feed(conn, req(R.SET_OWNER))
    feed(conn, req(R.SET_FEATURES, P.U64Payload(value=int(VF.VERSION_1))))
    expect_violation(fresh, raw(R.SET_VRING_ENABLE, P.VringState(index=0, num=1).encode(),
                                0x9), names=["SET_VRING_ENABLE", "PROTOCOL_FEATURES"])


def test_get_protocol_features_after_features_without_bit_30(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.SET_FEATURES, P.U64Payload(value=int(VF.VERSION_1))))
    expect_violation(fresh, req(R.GET_PROTOCOL_FEATURES), names=["PROTOCOL_FEATURES"])


def test_with_bit_30_rings_wait_for_enable(ready: Setup) -> None:
    conn = ready[0]
    assert not any(v.enabled for v in conn.vrings)
    feed(conn, req(R.SET_VRING_ENABLE, P.VringState(index=1, num=1)))
    assert [v.enabled for v in conn.vrings] == [False, True]
    feed(conn, req(R.SET_VRING_ENABLE, P.VringState(index=1, num=0)))
    assert [v.enabled for v in conn.vrings] == [False, False]


def test_set_vring_enable_before_set_protocol_features(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.GET_FEATURES))
    feed(conn, req(R.SET_OWNER))
    expect_violation(fresh, raw(R.SET_VRING_ENABLE, P.VringState(index=0, num=1).encode(),
                                0x9), names=["SET_PROTOCOL_FEATURES"])


@pytest.mark.parametrize("num", [2, 0xFFFFFFFF])
def test_set_vring_enable_value_must_be_0_or_1(ready: Setup, num: int) -> None:
    expect_violation(ready, raw(R.SET_VRING_ENABLE, P.VringState(index=0, num=num).encode(),
                                0x9), names=[str(num), "ring 0"])


def test_set_protocol_features_with_bits_never_offered(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.GET_FEATURES))
    bad = int(PF.REPLY_ACK | PF.PAGEFAULT)
    expect_violation(fresh, raw(R.SET_PROTOCOL_FEATURES, u64(bad), 0x9),
                     names=[f"{int(PF.PAGEFAULT):#x}"])


def test_inband_notifications_need_backend_req_and_reply_ack() -> None:
    dev = net_device()
    dev.protocol_features |= int(PF.INBAND_NOTIFICATIONS)
    setup = make_backend(dev)
    expect_violation(setup, req(R.SET_PROTOCOL_FEATURES,
                                P.U64Payload(value=int(PF.INBAND_NOTIFICATIONS | PF.REPLY_ACK))),
                     names=["INBAND_NOTIFICATIONS"])


def test_gated_request_without_its_protocol_feature(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=int(PF.REPLY_ACK))))
    feed(conn, req(R.SET_OWNER))
    expect_violation(fresh, raw(R.SET_STATUS, u64(1), 0x9), names=["STATUS"])


def test_features_cannot_change_while_a_ring_runs(ready: Setup) -> None:
    conn, _h, _f, fds = ready
    configure_ring(conn, fds, 0)
    conn.kick(0)
    feats = conn.acked_features
    # toggling LOG_ALL is allowed while running (migration)
    feed(conn, req(R.SET_FEATURES, P.U64Payload(value=feats)))
    expect_violation(ready, req(R.SET_FEATURES,
                                P.U64Payload(value=feats & ~int(VF.RING_EVENT_IDX))),
                     names=[f"{feats:#x}"])


# -- ring state transitions -------------------------------------------------------------------

STATES = [(s, e) for s in (False, True) for e in (False, True)]


def test_transition_table_is_complete() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in STATES for e in RingEvent}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", list(RingEvent))
def test_transition_table_follows_the_spec(state: tuple[bool, bool], event: RingEvent) -> None:
    started, enabled = state
    expected = {
        RingEvent.KICK: (True, enabled),
        RingEvent.GET_BASE: (False, enabled),
        RingEvent.ENABLE: (started, True),
        RingEvent.DISABLE: (started, False),
        RingEvent.RESET: (False, False),
    }[event]
    assert TRANSITIONS[(state, event)] == expected
    v: VringControl[int] = VringControl(0, started=started, enabled=enabled)
    assert v.apply(event) == expected
    assert (v.started, v.enabled) == expected


def _bring_to(setup: Setup, started: bool, enabled: bool) -> None:
    conn, _h, _f, fds = setup
    configure_ring(conn, fds, 0)
    if enabled:
        feed(conn, req(R.SET_VRING_ENABLE, P.VringState(index=0, num=1)))
    if started:
        conn.kick(0)
    assert (conn.vrings[0].started, conn.vrings[0].enabled) == (started, enabled)


_EVENT_ACTIONS: dict[RingEvent, Callable[[Conn], list[ev.Event]]] = {
    RingEvent.KICK: lambda c: c.kick(0),
    RingEvent.GET_BASE: lambda c: feed(c, req(R.GET_VRING_BASE, P.VringState(index=0, num=0))),
    RingEvent.ENABLE: lambda c: feed(c, req(R.SET_VRING_ENABLE, P.VringState(index=0, num=1))),
    RingEvent.DISABLE: lambda c: feed(c, req(R.SET_VRING_ENABLE,
                                             P.VringState(index=0, num=0))),
    RingEvent.RESET: lambda c: feed(c, req(R.RESET_DEVICE)),
}


@pytest.mark.parametrize("state", STATES, ids=lambda s: f"started={s[0]},enabled={s[1]}")
@pytest.mark.parametrize("event", list(RingEvent), ids=lambda e: e.name)
def test_every_state_event_pair_through_the_connection(
    ready: Setup, state: tuple[bool, bool], event: RingEvent
) -> None:
    conn, host, _f, fds = ready
    _bring_to(ready, *state)
    events = _EVENT_ACTIONS[event](conn)
    v = conn.vrings[0]
    assert (v.started, v.enabled) == TRANSITIONS[(state, event)]
    if event is RingEvent.KICK and not state[0]:
        assert ev.VringStarted(0) in events
    if event is RingEvent.GET_BASE:
        # a running ring is told it is about to stop first (its device completes what
        # it holds), then that it stopped
        stopping: list[ev.Event] = [ev.VringStopping(0)] if state[0] else []
        assert events == [*stopping, ev.VringStopped(0, 0)]
        assert v.engine is None
    if event is RingEvent.RESET:
        assert events == [ev.DeviceReset()]
        assert len(conn.mem) == 0 and conn.vrings[0].kick is None
    conn.close()
    host.assert_all_released(fds.given)


# -- GET_VRING_BASE --------------------------------------------------------------------------


def test_get_vring_base_on_a_ring_never_configured(ready: Setup) -> None:
    expect_violation(ready, raw(R.GET_VRING_BASE, P.VringState(index=1, num=0).encode(), 0x9),
                     names=["ring 1"])


def test_get_vring_base_twice(ready: Setup) -> None:
    conn, _h, _f, fds = ready
    configure_ring(conn, fds, 0, base=11)
    conn.kick(0)
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)))
    assert replies(conn) == [(R.GET_VRING_BASE, 0x5, P.VringState(index=0, num=11).encode())]
    expect_violation(ready, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)),
                     names=["ring 0"])


def test_ring_restarts_after_get_vring_base(ready: Setup) -> None:
    conn, host, factory, fds = ready
    configure_ring(conn, fds, 0, base=1)
    conn.kick(0)
    factory.built[0].next_base = 40
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)))
    # the front-end sends addresses and a kick fd again, then kicks
    feed(conn, req(R.SET_VRING_BASE, P.VringState(index=0, num=40)))
    feed(conn, req(R.SET_VRING_ADDR, ring_addr(0)))
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0)), fds.take(1))
    assert conn.kick(0) == [ev.VringStarted(0)]
    assert factory.built[-1].start_base == 40
    conn.close()
    host.assert_all_released(fds.given)


def test_size_and_base_cannot_change_on_a_started_ring(ready: Setup) -> None:
    conn, _h, _f, fds = ready
    configure_ring(conn, fds, 0)
    conn.kick(0)
    expect_violation(ready, raw(R.SET_VRING_NUM, P.VringState(index=0, num=128).encode(), 0x9),
                     names=["ring 0", "started"])


def test_set_vring_base_on_a_started_ring(ready: Setup) -> None:
    conn, _h, _f, fds = ready
    configure_ring(conn, fds, 0)
    conn.kick(0)
    expect_violation(ready, req(R.SET_VRING_BASE, P.VringState(index=0, num=3)),
                     names=["ring 0", "started"])


def test_split_ring_base_must_fit_16_bits(ready: Setup) -> None:
    expect_violation(ready, req(R.SET_VRING_BASE, P.VringState(index=0, num=0x10000)),
                     names=["0x10000"])


# -- SET_VRING_NUM -------------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 1000, 32769, 65536, 0xFFFFFFFF])
def test_set_vring_num_invalid(ready: Setup, num: int) -> None:
    expect_violation(ready, raw(R.SET_VRING_NUM, P.VringState(index=0, num=num).encode(), 0x9),
                     names=[f"num {num}", "ring 0"])


@pytest.mark.parametrize("num", [1, 2, 256, 32768])
def test_set_vring_num_valid_split(ready: Setup, num: int) -> None:
    conn = ready[0]
    assert feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=num))) == [
        ev.VringConfigured(0)
    ]
    assert conn.vrings[0].num == num


def test_packed_rings_take_any_size() -> None:
    setup = make_backend(net_device())
    conn, _h, _f, fds = setup
    handshake(conn, fds, features=conn.offered_features)
    assert conn.packed
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=1000)))
    assert conn.vrings[0].num == 1000
    expect_violation(setup, req(R.SET_VRING_NUM, P.VringState(index=0, num=32769)),
                     names=["32769"])


def test_switching_from_packed_to_split_revalidates_the_ring_size() -> None:
    """SET_VRING_NUM 1000 is legal for a packed ring; if SET_FEATURES then drops RING_PACKED
    (legal while no ring runs), the size must not reach a split ring engine unchecked."""
    setup = make_backend(net_device())
    conn, _h, factory, fds = setup
    handshake(conn, fds, features=conn.offered_features)
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=1000)))
    try:
        feed(conn, req(R.SET_FEATURES,
                       P.U64Payload(value=conn.offered_features & ~int(VF.RING_PACKED))))
    except RemoteProtocolError as e:
        assert "1000" in str(e)
        return
    feed(conn, req(R.SET_VRING_ADDR, ring_addr(0, 1000)))
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0)), fds.take(1))
    events = conn.kick(0)
    started_split_1000 = [r for r in factory.built if not conn.packed and conn.vrings[0].num
                          == 1000]
    assert any(isinstance(e, ev.VringBroken) for e in events) or not started_split_1000, (
        "a split ring of size 1000 was started"
    )


# -- ring indices -----------------------------------------------------------------------------

BAD_INDICES = [2, 0x100, 0x10000, 0xFFFFFFFF]  # the device has 2 queues


@pytest.mark.parametrize("index", BAD_INDICES, ids=hex)
@pytest.mark.parametrize(
    "request_",
    [R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE],
    ids=lambda r: r.name,
)
def test_vring_state_index_out_of_range(ready: Setup, request_: FrontendRequest,
                                        index: int) -> None:
    payload = P.VringState(index=index, num=1).encode()
    expect_violation(ready, raw(request_, payload, 0x9), names=[f"ring index {index}"])


@pytest.mark.parametrize("index", BAD_INDICES, ids=hex)
def test_vring_addr_index_out_of_range(ready: Setup, index: int) -> None:
    addr = ring_addr(0)
    payload = struct.pack("<IIQQQQ", index, 0, addr.desc, addr.used, addr.avail, 0)
    expect_violation(ready, raw(R.SET_VRING_ADDR, payload, 0x9), names=[f"ring index {index}"])


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR],
                         ids=lambda r: r.name)
@pytest.mark.parametrize(("value", "name"), [(2, "ring index 2"), (0xFF, "ring index 255"),
                                             (0x10000, "0x10000"),
                                             (0xFFFFFFFF, "0xffffffff"),
                                             (0x100, "NOFD")],
                         ids=lambda v: hex(v) if isinstance(v, int) else "")
def test_vring_file_index_out_of_range(ready: Setup, request_: FrontendRequest, value: int,
                                       name: str) -> None:
    # one fd attached: for 0x100 (ring 0 with NOFD) that fd is itself the violation
    fd = ready[3].take(1)
    expect_violation(ready, raw(request_, u64(value), 0x9), fd, names=[name])


def test_device_with_too_many_queues_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="257"):
        make_backend(FakeDevice(num_queues=257))
    with pytest.raises(LocalProtocolError, match="0"):
        make_backend(FakeDevice(num_queues=0))


def test_ring_index_255_is_usable_with_256_queues() -> None:
    setup = make_backend(FakeDevice(num_queues=256))
    conn, _host, _f, fds = setup
    handshake(conn, fds)
    fd = fds.one()
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=255)), [fd])
    assert conn.vrings[255].call == fd
    expect_violation(setup, req(R.SET_VRING_NUM, P.VringState(index=256, num=8)),
                     names=["ring index 256"])


# -- KICK/CALL/ERR fds -------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR],
                         ids=lambda r: r.name)
def test_nofd_bit_with_an_fd(ready: Setup, request_: FrontendRequest) -> None:
    fd = ready[3].take(1)
    expect_violation(ready, raw(request_, P.VringFile(index=0, nofd=True).encode(), 0x9), fd,
                     names=["NOFD", "1"])


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR],
                         ids=lambda r: r.name)
def test_no_nofd_bit_and_no_fd(ready: Setup, request_: FrontendRequest) -> None:
    expect_violation(ready, raw(request_, P.VringFile(index=1).encode(), 0x9), names=["NOFD",
                                                                                      "0"])


def test_two_fds_on_set_vring_kick(ready: Setup) -> None:
    fds = ready[3].take(2)
    expect_violation(ready, raw(R.SET_VRING_KICK, P.VringFile(index=0).encode(), 0x9), fds,
                     names=["2 fds"])


def test_fds_on_a_message_that_takes_none(ready: Setup) -> None:
    fds = ready[3].take(3)
    expect_violation(ready, raw(R.SET_STATUS, u64(1), 0x9), fds, names=["3 fds"])


# -- order -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (R.SET_VRING_CALL, P.VringFile(index=0).encode(), 1),
        (R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),)).encode(), 1),
        (R.SET_LOG_FD, b"", 1),
        (R.RESET_OWNER, b"", 0),
        (R.SET_STATUS, u64(1), 0),
        (R.SEND_RARP, u64(1), 0),
    ],
    ids=lambda v: v.name if isinstance(v, FrontendRequest) else "",
)
def test_messages_before_set_owner(fresh: Setup, request_: FrontendRequest, payload: bytes,
                                   nfds: int) -> None:
    conn = fresh[0]
    feed(conn, req(R.GET_FEATURES))
    feed(conn, req(R.GET_PROTOCOL_FEATURES))
    feed(conn, req(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=conn.offered_protocol_features)))
    feed(conn, req(R.SET_FEATURES, P.U64Payload(value=int(VF.VERSION_1 | VF.PROTOCOL_FEATURES))))
    replies(conn)
    expect_violation(fresh, raw(request_, payload, 0x9), fresh[3].take(nfds),
                     names=["SET_OWNER"])


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),)).encode(), 1),
        (R.SET_VRING_NUM, P.VringState(index=0, num=8).encode(), 0),
        (R.SET_VRING_BASE, P.VringState(index=0, num=0).encode(), 0),
        (R.SET_VRING_ADDR, ring_addr(0).encode(), 0),
    ],
    ids=lambda v: v.name if isinstance(v, FrontendRequest) else "",
)
def test_messages_before_set_features(fresh: Setup, request_: FrontendRequest, payload: bytes,
                                      nfds: int) -> None:
    conn = fresh[0]
    feed(conn, req(R.SET_OWNER))
    expect_violation(fresh, raw(request_, payload, 0x9), fresh[3].take(nfds),
                     names=["SET_FEATURES"])


def test_set_features_with_bits_never_offered(fresh: Setup) -> None:
    conn = fresh[0]
    feed(conn, req(R.SET_OWNER))
    bad = conn.offered_features | (1 << 63) | int(VF.ACCESS_PLATFORM)
    err = expect_violation(fresh, raw(R.SET_FEATURES, u64(bad), 0x9), names=[f"{bad:#x}"])
    assert f"{(1 << 63) | int(VF.ACCESS_PLATFORM):#x}" in str(err)


@pytest.mark.parametrize("code", [0, 46, 99, 0xFFFFFFFF])
def test_unknown_request_code(ready: Setup, code: int) -> None:
    expect_violation(ready, raw(code, b"", 0x9), names=[str(code)], nack=True)


@pytest.mark.parametrize(
    ("request_", "size"),
    [(R.SET_FEATURES, 4), (R.SET_VRING_NUM, 4), (R.SET_OWNER, 8), (R.SET_VRING_ADDR, 32),
     (R.SET_VRING_KICK, 16), (R.SET_MEM_TABLE, 39)],
    ids=lambda v: v.name if isinstance(v, FrontendRequest) else str(v),
)
def test_payload_of_the_wrong_size(ready: Setup, request_: FrontendRequest, size: int) -> None:
    data = bytes(size)
    if request_ is R.SET_MEM_TABLE:
        data = struct.pack("<II", 1, 0) + bytes(size - 8)
    expect_violation(ready, raw(request_, data, 0x9), names=[request_.name, str(size)])


def test_header_violations_are_errors_with_everything_released(ready: Setup) -> None:
    fds = ready[3].take(2)
    expect_violation(ready, raw(R.SET_VRING_KICK, u64(0), 0x5), fds, names=["REPLY"],
                     nack=False)


def test_eof_in_the_middle_of_a_message(ready: Setup) -> None:
    conn, host, _f, fds = ready
    fd = fds.one()
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=0))[:15], [fd])
    with pytest.raises(RemoteProtocolError, match="3 of 8"):
        conn.receive_data(b"")
    host.assert_all_released(fds.given)


def test_set_log_base_is_refused_without_log_shmfd(ready: Setup) -> None:
    fd = ready[3].take(1)
    expect_violation(ready, raw(R.SET_LOG_BASE, P.LogBase(mmap_size=0, mmap_offset=0).encode(),
                                0x9), fd, names=["SET_LOG_BASE"], nack=True)


# -- ring addresses ----------------------------------------------------------------------------


def test_ring_addresses_before_any_memory_table() -> None:
    setup = make_backend(net_device())
    handshake(setup[0], setup[3], memory=False)
    expect_violation(setup, raw(R.SET_VRING_ADDR, ring_addr(0).encode(), 0x9),
                     names=["memory table"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("desc", RAM_UVA + 8), ("avail", RAM_UVA + 0x1001), ("used", RAM_UVA + 0x2002)],
)
def test_misaligned_ring_addresses(ready: Setup, field: str, value: int) -> None:
    fields: dict[str, Any] = {"index": 0, "flags": 0, "desc": RAM_UVA, "avail": RAM_UVA + 0x1000,
                              "used": RAM_UVA + 0x2000, "log": 0}
    fields[field] = value
    expect_violation(ready, raw(R.SET_VRING_ADDR, P.VringAddr(**fields).encode(), 0x9),
                     names=[field, f"{value:#x}"])


@pytest.mark.parametrize("desc", [RAM_UVA - 0x1000, RAM_UVA + RAM_SIZE - 0x800, 0])
def test_unmapped_ring_addresses(ready: Setup, desc: int) -> None:
    conn = ready[0]
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=256)))
    addr = P.VringAddr(index=0, flags=0, desc=desc, avail=RAM_UVA, used=RAM_UVA + 0x1000, log=0)
    expect_violation(ready, raw(R.SET_VRING_ADDR, addr.encode(), 0x9), names=[f"{desc:#x}"])


def test_vring_log_flag_with_a_misaligned_log_address(ready: Setup) -> None:
    # VHOST_VRING_F_LOG is accepted now that LOG_ALL is offered (tests/unit/
    # test_migration_log.py); its log_guest_addr must be a used ring's (4-aligned).
    addr = P.VringAddr(index=0, flags=1, desc=RAM_UVA, avail=RAM_UVA + 0x1000,
                       used=RAM_UVA + 0x2000, log=0x2002)
    expect_violation(ready, raw(R.SET_VRING_ADDR, addr.encode(), 0x9), names=["log_guest_addr"])


# -- memory table -------------------------------------------------------------------------------


def _table(n: int, nregions: int | None = None) -> bytes:
    regions = b"".join(
        ram_region(gpa=i * RAM_SIZE, uva=RAM_UVA + i * RAM_SIZE).encode() for i in range(n)
    )
    return struct.pack("<II", n if nregions is None else nregions, 0) + regions


@pytest.mark.parametrize(("n", "nregions", "nfds"), [(0, None, 0), (9, None, 8),
                                                     (0, 0xFFFFFFFF, 0), (1, 0xFFFFFFFF, 1),
                                                     (8, 9, 8)])
def test_memory_table_region_counts(ready: Setup, n: int, nregions: int | None,
                                    nfds: int) -> None:
    count = n if nregions is None else nregions
    expect_violation(ready, raw(R.SET_MEM_TABLE, _table(n, nregions), 0x9),
                     ready[3].take(nfds), names=[str(count)])


def test_nine_fds_are_refused_by_the_framing(ready: Setup) -> None:
    # more than MAX_FDS (8) fds: the decoder refuses the message before it is decoded
    expect_violation(ready, raw(R.SET_MEM_TABLE, _table(9), 0x9), ready[3].take(9),
                     names=["9 fds"], nack=False)


def test_memory_table_with_eight_regions_is_fine(ready: Setup) -> None:
    conn, host, _f, fds = ready
    feed(conn, raw(R.SET_MEM_TABLE, _table(8), 0x9), fds.take(8))
    assert replies(conn) == [ack(R.SET_MEM_TABLE)]
    assert len(conn.mem) == 8
    conn.close()
    host.assert_all_released(fds.given)


@pytest.mark.parametrize(("nregions", "nfds"), [(2, 1), (2, 3), (1, 0)])
def test_memory_table_fd_count_mismatch(ready: Setup, nregions: int, nfds: int) -> None:
    expect_violation(ready, raw(R.SET_MEM_TABLE, _table(nregions), 0x9), ready[3].take(nfds),
                     names=[f"{nregions} regions", f"{nfds} fds"])


def test_memory_region_of_size_0(ready: Setup) -> None:
    table = P.MemoryTable(regions=(ram_region(), ram_region(gpa=RAM_SIZE, size=0)))
    expect_violation(ready, raw(R.SET_MEM_TABLE, table.encode(), 0x9), ready[3].take(2),
                     names=["size 0", f"{RAM_SIZE:#x}"])
    assert ready[1].live_mappings() == []


@pytest.mark.parametrize(
    ("gpa", "size", "uva", "off", "what"),
    [
        (2**64 - 0x1000, 0x2000, RAM_UVA, 0, "guest_phys_addr"),
        (0, 0x2000, 2**64 - 0x1000, 0, "userspace_addr"),
        (0, 0x2000, RAM_UVA, 2**64 - 0x1000, "mmap_offset"),
        (0, 2**64 - 1, RAM_UVA, 0, "userspace_addr"),
    ],
)
def test_memory_region_wrapping_past_2_64(ready: Setup, gpa: int, size: int, uva: int, off: int,
                                          what: str) -> None:
    table = P.MemoryTable(regions=(P.MemoryRegion(guest_phys_addr=gpa, memory_size=size,
                                                  userspace_addr=uva, mmap_offset=off),))
    expect_violation(ready, raw(R.SET_MEM_TABLE, table.encode(), 0x9), ready[3].take(1),
                     names=[what, "2**64"])


def test_overlapping_regions(ready: Setup) -> None:
    table = P.MemoryTable(regions=(ram_region(), ram_region(gpa=RAM_SIZE // 2,
                                                            uva=RAM_UVA + RAM_SIZE)))
    expect_violation(ready, raw(R.SET_MEM_TABLE, table.encode(), 0x9), ready[3].take(2),
                     names=["overlaps"])
    assert ready[1].live_mappings() == []


def test_region_fd_too_small(ready: Setup) -> None:
    _conn, host, _f, fds = ready
    (old,) = host.mapped
    small = fds.one()
    host.fd_sizes[small] = RAM_SIZE // 2
    table = P.MemoryTable(regions=(ram_region(gpa=RAM_SIZE * 4, uva=RAM_UVA * 2),
                                   ram_region()))
    expect_violation(ready, raw(R.SET_MEM_TABLE, table.encode(), 0x9), [fds.one(), small],
                     names=[f"{RAM_SIZE // 2:#x}"])
    assert old.closes == 1 and host.live_mappings() == []


def test_region_fd_that_cannot_be_mapped(ready: Setup) -> None:
    _conn, host, _f, fds = ready
    pipe = fds.one()
    host.unmappable.add(pipe)
    region = P.MemoryRegion(guest_phys_addr=RAM_SIZE, memory_size=0x1000,
                            userspace_addr=RAM_UVA + RAM_SIZE, mmap_offset=0)
    expect_violation(ready, raw(R.ADD_MEM_REG, P.SingleRegion(region=region).encode(), 0x9),
                     [pipe], names=["pipe"])


def _slot(i: int) -> P.SingleRegion:
    return P.SingleRegion(region=P.MemoryRegion(
        guest_phys_addr=0x1_0000_0000 + i * 0x1000, memory_size=0x1000,
        userspace_addr=0x7E00_0000_0000 + i * 0x1000, mmap_offset=0))


def test_add_mem_reg_past_max_slots() -> None:
    setup = make_backend(net_device(), max_mem_slots=4)
    conn, host, _f, fds = setup
    handshake(conn, fds, memory=False)
    feed(conn, req(R.GET_MAX_MEM_SLOTS))
    assert replies(conn) == [(R.GET_MAX_MEM_SLOTS, 0x5, u64(4))]
    for i in range(4):
        feed(conn, req(R.ADD_MEM_REG, _slot(i), need_reply=True), fds.take(1))
        assert replies(conn) == [ack(R.ADD_MEM_REG)]
    assert len(conn.mem) == 4
    expect_violation(setup, req(R.ADD_MEM_REG, _slot(4), need_reply=True), fds.take(1),
                     names=["4"])
    assert host.live_mappings() == []


def test_add_mem_reg_needs_exactly_one_fd(ready: Setup) -> None:
    expect_violation(ready, req(R.ADD_MEM_REG, _slot(0), need_reply=True), ready[3].take(2),
                     names=["2 fds"])


def test_rem_mem_reg_removes_and_unmaps(ready: Setup) -> None:
    conn, host, _f, fds = ready
    feed(conn, req(R.ADD_MEM_REG, _slot(0)), fds.take(1))
    added = host.mapped[-1]
    feed(conn, req(R.REM_MEM_REG, _slot(0), need_reply=True))
    assert replies(conn) == [ack(R.REM_MEM_REG)]
    assert added.closes == 1 and len(conn.mem) == 1


def test_rem_mem_reg_of_a_missing_region(ready: Setup) -> None:
    expect_violation(ready, req(R.REM_MEM_REG, _slot(3), need_reply=True),
                     names=[f"{_slot(3).region.guest_phys_addr:#x}"])


def test_rem_mem_reg_with_the_fd_older_qemu_sends(ready: Setup) -> None:
    """QEMU <= 7.0 sends the region's fd with REM_MEM_REG; libvhost-user accepts and closes
    it (REM_MEM_REG takes no fd; one that arrives is closed)."""
    conn, host, _f, fds = ready
    feed(conn, req(R.ADD_MEM_REG, _slot(0)), fds.take(1))
    extra = fds.one()
    feed(conn, req(R.REM_MEM_REG, _slot(0), need_reply=True), [extra])
    assert replies(conn) == [ack(R.REM_MEM_REG)]
    assert host.released[extra] == 1
    assert len(conn.mem) == 1


# -- notification fds and small requests ----------------------------------------------------


@pytest.mark.parametrize("kind", ["kick", "call", "err"])
def test_notify_fd_refused_by_the_host(ready: Setup, kind: str) -> None:
    conn, host, _f, fds = ready
    request = {"kick": R.SET_VRING_KICK, "call": R.SET_VRING_CALL, "err": R.SET_VRING_ERR}[kind]
    first = fds.one()
    feed(conn, req(request, P.VringFile(index=0)), [first])
    bad = fds.one()
    host.not_notify_fds.add(bad)
    # the previous fd of the ring must be released once, not once more at close
    expect_violation(ready, req(request, P.VringFile(index=0), need_reply=True), [bad],
                     names=[f"ring 0 {kind} fd"])


def test_set_status_must_fit_8_bits(ready: Setup) -> None:
    conn = ready[0]
    feed(conn, req(R.SET_STATUS, P.U64Payload(value=0xF)))
    feed(conn, req(R.GET_STATUS))
    assert replies(conn) == [(R.GET_STATUS, 0x5, u64(0xF))]
    expect_violation(ready, raw(R.SET_STATUS, u64(0x100), 0x9), names=["0x100"])


@pytest.mark.parametrize("mtu", [0, 67, 65536])
def test_net_set_mtu_range(ready: Setup, mtu: int) -> None:
    expect_violation(ready, raw(R.NET_SET_MTU, u64(mtu), 0x9), names=[str(mtu)])


def test_send_rarp_reports_the_mac(ready: Setup) -> None:
    conn = ready[0]
    mac = bytes.fromhex("525400abcdef")
    assert feed(conn, req(R.SEND_RARP, mac + b"\0\0")) == [ev.RarpRequested(mac)]


def test_set_config_on_a_read_only_device(ready: Setup) -> None:
    cfg = P.ConfigPayload(offset=0, size=6, flags=0, data=bytes(6))
    expect_violation(ready, raw(R.SET_CONFIG, cfg.encode(), 0x9), names=["SET_CONFIG", "6"])


def test_reset_owner_keeps_the_owner_and_releases_the_session(ready: Setup) -> None:
    conn, host, _f, fds = ready
    configure_ring(conn, fds, 0)
    conn.kick(0)
    assert feed(conn, req(R.RESET_OWNER)) == [ev.DeviceReset()]
    assert conn.owner and conn.features is None and len(conn.mem) == 0
    assert not conn.vrings[0].started
    host.assert_all_released(fds.given)
    assert host.live_mappings() == []


# -- Hypothesis: any message sequence --------------------------------------------------------

_INTERESTING = [R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.SET_MEM_TABLE,
                R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
                R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.GET_PROTOCOL_FEATURES,
                R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_VRING_ENABLE,
                R.SET_BACKEND_REQ_FD, R.GET_CONFIG, R.SET_CONFIG, R.RESET_DEVICE,
                R.VRING_KICK, R.GET_MAX_MEM_SLOTS, R.ADD_MEM_REG, R.REM_MEM_REG,
                R.SET_STATUS, R.GET_STATUS, R.SET_LOG_FD, R.NET_SET_MTU, R.GET_INFLIGHT_FD]


@st.composite
def _messages(draw: st.DrawFn) -> tuple[bytes, int, str]:
    request = draw(st.sampled_from(_INTERESTING) | st.integers(0, 50))
    index = draw(st.sampled_from([0, 1, 2, 255, 0x100]))
    kind = draw(st.sampled_from(["state", "file", "u64", "addr", "table", "region", "config",
                                 "empty", "junk"]))
    if kind == "state":
        payload = P.VringState(index=index, num=draw(st.sampled_from([0, 1, 8, 256, 1000]))
                               ).encode()
    elif kind == "file":
        payload = u64(index | draw(st.sampled_from([0, 0x100])))
    elif kind == "u64":
        payload = u64(draw(st.sampled_from([0, 1, 0xF, int(VF.VERSION_1 | VF.PROTOCOL_FEATURES),
                                            int(PF.REPLY_ACK | PF.MQ | PF.STATUS), 2**64 - 1])))
    elif kind == "addr":
        payload = ring_addr(index % 2).encode()
    elif kind == "table":
        payload = _table(draw(st.integers(1, 2)))
    elif kind == "region":
        payload = _slot(draw(st.integers(0, 2))).encode()
    elif kind == "config":
        payload = P.ConfigPayload(offset=0, size=4, flags=0, data=bytes(4)).encode()
    elif kind == "empty":
        payload = b""
    else:
        payload = draw(st.binary(max_size=48))
    flags = draw(st.sampled_from([0x1, 0x9, 0x9, 0x5, 0x0]))
    return raw(request, payload, flags), draw(st.integers(0, 3)), draw(
        st.sampled_from(["none", "kick", "eof"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages(), max_size=25), st.booleans())
def test_any_message_sequence(msgs: list[tuple[bytes, int, str]], good_start: bool) -> None:
    conn, host, _f, fds = make_backend(net_device())
    if good_start:
        handshake(conn, fds)
    for data, nfds, after in msgs:
        try:
            conn.receive_data(data, fds.take(nfds))
        except RemoteProtocolError as e:
            assert str(e)
            assert conn.error is not None and conn.closed
        if after == "kick" and not conn.closed:
            for i in range(len(conn.vrings)):
                conn.kick(i)
        elif after == "eof":
            with contextlib.suppress(RemoteProtocolError):
                conn.receive_data(b"")
            break
        for payload, out_fds in conn.data_to_send():
            assert out_fds == []
            for _req, flags, _p in split_messages(payload):
                assert flags == 0x5
    conn.close()
    host.assert_all_released(fds.given)
    assert host.live_mappings() == []


def test_add_mem_reg_repeated_by_each_queue_pair(ready: Setup) -> None:
    """QEMU 7.2 sends ADD_MEM_REG once per vhost_dev (per net queue pair): the same region
    twice is counted, not refused, and it stays mapped until removed as often."""
    conn, host, _f, fds = ready
    first, second = fds.take(1), fds.take(1)
    feed(conn, req(R.ADD_MEM_REG, _slot(0), need_reply=True), first)
    feed(conn, req(R.ADD_MEM_REG, _slot(0), need_reply=True), second)
    assert replies(conn) == [ack(R.ADD_MEM_REG), ack(R.ADD_MEM_REG)]
    assert host.released[second[0]] == 1  # the duplicate's fd is closed at once
    added = host.mapped[-1]
    regions = len(conn.mem)
    feed(conn, req(R.REM_MEM_REG, _slot(0), need_reply=True))
    assert replies(conn) == [ack(R.REM_MEM_REG)]
    assert added.closes == 0 and len(conn.mem) == regions
    feed(conn, req(R.REM_MEM_REG, _slot(0), need_reply=True))
    assert replies(conn) == [ack(R.REM_MEM_REG)]
    assert added.closes == 1 and len(conn.mem) == regions - 1
