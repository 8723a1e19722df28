"""The January 2014 draft dialect in both numberings, and the other-dialect diagnostic.

Back-end side (BackendConnection over the fake host): ECHO, the draft's payloads
(24-byte regions, u64 SET_LOG_BASE, KICK/CALL/ERR with an optional fd, NET_SET_BACKEND),
the feature bits of 2014, and the hint that a front-end speaks another dialect: given
exactly when a message is malformed in ours but well formed in another, never for a
front-end that speaks ours (a Hypothesis test feeds well-formed messages in any order).
"""

from __future__ import annotations

import logging
import struct
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.connection import events as ev
from vhostuser.connection.backend import BackendConnection
from vhostuser.devices.net import NullNetDevice
from vhostuser.errors import RemoteProtocolError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import (
    BlkFeature,
    DeviceType,
    DraftCodeRequest,
    DraftTextRequest,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
    draft_feature_mask,
)
from vhostuser.protocol.table import (
    DRAFT_RULES,
    WIRE_IDS,
    Dialect,
    DraftMessage,
    Fds,
    Rule,
    rule_for,
    well_formed,
    wire_id,
)

from .fakes import (
    RAM_SIZE,
    RAM_UVA,
    FakeDevice,
    FakeHost,
    FdSource,
    StubRingFactory,
    feed,
    handshake,
    make_backend,
    ram_region,
    raw,
    replies,
    req,
    ring_addr,
    u64,
)

R = FrontendRequest
VF = VirtioFeature
D = Dialect
DRAFTS = [D.DRAFT_TEXT, D.DRAFT_CODE]

Setup = tuple[BackendConnection[int], FakeHost, StubRingFactory, FdSource]


def net_device() -> FakeDevice:
    return FakeDevice(virtio_features=int(NetFeature.MAC | NetFeature.MRG_RXBUF),
                      num_queues=2)


def wid(dialect: Dialect, meaning: Any) -> int:
    w = wire_id(dialect, meaning)
    assert w is not None, (dialect, meaning)
    return w


def draft(dialect: Dialect, meaning: Any, payload: bytes = b"", flags: int = 0x1) -> bytes:
    """One request of ``dialect``, by meaning."""
    return raw(wid(dialect, meaning), payload, flags)


def draft_setup(dialect: Dialect, *, memory: bool = True) -> Setup:
    """A draft back-end after SET_OWNER, SET_FEATURES and (with ``memory``) a memory table."""
    conn, host, factory, fds = make_backend(net_device(), dialect=dialect)
    feed(conn, draft(dialect, R.SET_OWNER))
    feed(conn, draft(dialect, R.SET_FEATURES, u64(int(NetFeature.MRG_RXBUF))))
    if memory:
        table = P.DraftMemoryTable(regions=(ram_region(),)).encode()
        feed(conn, draft(dialect, R.SET_MEM_TABLE, table), fds.take(1))
    replies(conn)
    return conn, host, factory, fds


# -- the numberings --------------------------------------------------------------------------


def test_code_numbering_pinned() -> None:
    # The v5/v6 patches' enum: the shipped ids 1-14, then the two that v7 removed.
    want = {"GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4,
            "SET_MEM_TABLE": 5, "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8,
            "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10, "GET_VRING_BASE": 11,
            "SET_VRING_KICK": 12, "SET_VRING_CALL": 13, "SET_VRING_ERR": 14,
            "NET_SET_BACKEND": 15, "ECHO": 16}
    assert {m.name: m.value for m in DraftCodeRequest} == want
    for name, value in want.items():
        if name in FrontendRequest.__members__:
            assert FrontendRequest[name] == value  # 1-14 unchanged since


def test_wire_ids_per_dialect() -> None:
    assert WIRE_IDS[D.DRAFT_TEXT][1] is DraftMessage.ECHO
    assert WIRE_IDS[D.DRAFT_TEXT][2] is R.GET_FEATURES
    assert WIRE_IDS[D.DRAFT_TEXT][15] is R.SET_VRING_ERR
    assert WIRE_IDS[D.DRAFT_CODE][1] is R.GET_FEATURES
    assert WIRE_IDS[D.DRAFT_CODE][15] is DraftMessage.NET_SET_BACKEND
    assert WIRE_IDS[D.DRAFT_CODE][16] is DraftMessage.ECHO
    assert WIRE_IDS[D.CURRENT][16] is R.SET_PROTOCOL_FEATURES
    assert wire_id(D.DRAFT_TEXT, DraftMessage.NET_SET_BACKEND) is None
    assert wire_id(D.DRAFT_TEXT, R.GET_PROTOCOL_FEATURES) is None
    assert set(WIRE_IDS[D.DRAFT_TEXT]) == set(range(1, 16))
    assert set(WIRE_IDS[D.DRAFT_CODE]) == set(range(1, 17))
    for d in DRAFTS:
        assert D.CURRENT.request_names is FrontendRequest
        assert d.request_names in (DraftTextRequest, DraftCodeRequest)
    with pytest.raises(KeyError):
        rule_for(D.DRAFT_TEXT, DraftMessage.NET_SET_BACKEND)
    with pytest.raises(KeyError):
        rule_for(D.CURRENT, DraftMessage.ECHO)


def test_draft_rules_differ_where_the_draft_did() -> None:
    assert DRAFT_RULES[R.SET_MEM_TABLE].payload is P.DraftMemoryTable
    assert DRAFT_RULES[R.SET_LOG_BASE].payload is P.U64Payload
    assert DRAFT_RULES[R.SET_LOG_BASE].fds is Fds.NONE
    for r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        assert DRAFT_RULES[r].payload is P.DraftVringFile
        assert DRAFT_RULES[r].fds is Fds.OPTIONAL
    assert DRAFT_RULES[DraftMessage.ECHO].payload is P.Empty
    assert not DRAFT_RULES[DraftMessage.ECHO].needs_owner


# -- payloads --------------------------------------------------------------------------------


def test_draft_vring_file_golden_and_range() -> None:
    assert P.DraftVringFile(index=3).encode() == struct.pack("<Q", 3)
    assert P.DraftVringFile.decode(struct.pack("<Q", 255)).index == 255
    with pytest.raises(RemoteProtocolError, match="0x100"):
        P.DraftVringFile.decode(struct.pack("<Q", 0x100))
    with pytest.raises(RemoteProtocolError, match="4 bytes"):
        P.DraftVringFile.decode(bytes(4))
    with pytest.raises(ValueError, match="256"):
        P.DraftVringFile(index=256).encode()


def test_draft_memory_table_cannot_carry_mmap_offset() -> None:
    with pytest.raises(ValueError, match="mmap_offset 0x1000"):
        P.DraftMemoryTable(regions=(ram_region(off=0x1000),)).encode()


# -- feature bits of 2014 --------------------------------------------------------------------


def test_draft_mask_keeps_only_bits_of_2014() -> None:
    net = draft_feature_mask(DeviceType.NET)
    for bit in (VF.VERSION_1, VF.RING_PACKED, VF.PROTOCOL_FEATURES, VF.ACCESS_PLATFORM,
                NetFeature.MTU, NetFeature.SPEED_DUPLEX, NetFeature.HASH_REPORT):
        assert not net & bit, bit
    for bit in (VF.RING_EVENT_IDX, VF.RING_INDIRECT_DESC, VF.NOTIFY_ON_EMPTY, NetFeature.MAC,
                NetFeature.MRG_RXBUF, NetFeature.STATUS, NetFeature.MQ, NetFeature.CSUM):
        assert net & bit, bit
    blk = draft_feature_mask(DeviceType.BLK)
    assert blk & BlkFeature.FLUSH and blk & BlkFeature.SEG_MAX
    assert not blk & (BlkFeature.MQ | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
    assert draft_feature_mask(None) >> 32 == 0


@pytest.mark.parametrize("dialect", DRAFTS)
def test_draft_back_end_offers_only_bits_of_2014(dialect: Dialect) -> None:
    conn, _h, _f, _fds = make_backend(NullNetDevice(), dialect=dialect)
    feed(conn, draft(dialect, R.GET_FEATURES))
    ((wire, flags, payload),) = replies(conn)
    assert (wire, flags) == (wid(dialect, R.GET_FEATURES), 0x5)
    (offered,) = struct.unpack("<Q", payload)
    assert offered == conn.offered_features
    assert offered >> 32 == 0
    assert not offered & (VF.PROTOCOL_FEATURES | NetFeature.MTU)
    assert offered & NetFeature.MRG_RXBUF and offered & VF.RING_EVENT_IDX
    assert conn.offered_protocol_features == 0
    current, _h2, _f2, _fds2 = make_backend(NullNetDevice())
    assert current.offered_features & (VF.VERSION_1 | VF.PROTOCOL_FEATURES | NetFeature.MTU)


# -- ECHO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DRAFTS)
def test_echo_answered_with_reply_set_at_any_time(dialect: Dialect) -> None:
    conn, _host, _f, _fds = make_backend(net_device(), dialect=dialect)
    echo = wid(dialect, DraftMessage.ECHO)
    assert echo == (1 if dialect is D.DRAFT_TEXT else 16)
    feed(conn, draft(dialect, DraftMessage.ECHO))  # before SET_OWNER: legal
    assert replies(conn) == [(echo, 0x5, b"")]
    conn2, _host2, _f2, _fds2 = draft_setup(dialect)
    feed(conn2, draft(dialect, DraftMessage.ECHO))
    assert replies(conn2) == [(echo, 0x5, b"")]
    assert conn2.error is None


@pytest.mark.parametrize("dialect", DRAFTS)
def test_echo_with_a_payload_or_fd_is_refused(dialect: Dialect) -> None:
    conn, host, _f, fds = make_backend(net_device(), dialect=dialect)
    with pytest.raises(RemoteProtocolError, match="ECHO: empty payload is 4 bytes"):
        feed(conn, draft(dialect, DraftMessage.ECHO, b"ping"))
    assert replies(conn) == []
    conn, host, _f, fds = make_backend(net_device(), dialect=dialect)
    with pytest.raises(RemoteProtocolError, match="ECHO: 1 fds attached"):
        feed(conn, draft(dialect, DraftMessage.ECHO), fds.take(1))
    host.assert_all_released(fds.given)


# -- the draft's payloads --------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DRAFTS)
def test_set_mem_table_uses_24_byte_regions(dialect: Dialect) -> None:
    conn, host, _f, fds = draft_setup(dialect, memory=False)
    table = P.DraftMemoryTable(regions=(ram_region(),)).encode()
    assert len(table) == 8 + 24
    assert feed(conn, draft(dialect, R.SET_MEM_TABLE, table), fds.take(1)) == [
        ev.MemTableSet(1)]
    (r,) = conn.mem.regions
    assert (r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset) == (
        0, RAM_SIZE, RAM_UVA, 0)
    with pytest.raises(RemoteProtocolError, match="expected 32"):
        feed(conn, draft(dialect, R.SET_MEM_TABLE, P.MemoryTable(
            regions=(ram_region(),)).encode()), fds.take(1))
    host.assert_all_released(fds.given)


@pytest.mark.parametrize("dialect", DRAFTS)
def test_set_log_base_takes_the_u64_of_the_text(dialect: Dialect) -> None:
    conn, host, _f, fds = draft_setup(dialect)
    assert feed(conn, draft(dialect, R.SET_LOG_BASE, u64(0x7F00_1234_0000))) == []
    assert conn.log_base == 0x7F00_1234_0000
    assert replies(conn) == []  # the draft's SET_LOG_BASE has no reply
    # the current protocol's 16-byte payload with an fd is not the draft's
    with pytest.raises(RemoteProtocolError, match="SET_LOG_BASE: u64 payload is 16 bytes"):
        feed(conn, draft(dialect, R.SET_LOG_BASE, P.LogBase(mmap_size=4096, mmap_offset=0)
                         .encode()), fds.take(1))
    host.assert_all_released(fds.given)


def test_current_set_log_base_is_refused_without_log_shmfd() -> None:
    conn, _host, _f, fds = make_backend(net_device())
    handshake(conn, fds, protocol_features=conn.offered_protocol_features
              & ~int(ProtocolFeature.LOG_SHMFD))
    with pytest.raises(RemoteProtocolError, match="LOG_SHMFD"):
        feed(conn, req(R.SET_LOG_BASE, P.LogBase(mmap_size=4096, mmap_offset=0)), fds.take(1))


@pytest.mark.parametrize("dialect", DRAFTS)
def test_ring_set_up_and_stopped_in_draft_ids(dialect: Dialect) -> None:
    conn, host, _factory, fds = draft_setup(dialect)
    feed(conn, draft(dialect, R.SET_VRING_NUM, P.VringState(index=0, num=64).encode()))
    feed(conn, draft(dialect, R.SET_VRING_BASE, P.VringState(index=0, num=4).encode()))
    feed(conn, draft(dialect, R.SET_VRING_ADDR, ring_addr(0, 64).encode()))
    call = fds.take(1)
    got = feed(conn, draft(dialect, R.SET_VRING_CALL, P.DraftVringFile(index=0).encode()), call)
    assert got == [ev.VringFdSet(0, "call", call[0])]
    kick = fds.take(1)
    got = feed(conn, draft(dialect, R.SET_VRING_KICK, P.DraftVringFile(index=0).encode()), kick)
    assert got == [ev.VringFdSet(0, "kick", kick[0])]
    assert conn.vrings[0].enabled  # no PROTOCOL_FEATURES: enabled at SET_FEATURES
    assert [type(e) for e in conn.kick(0)] == [ev.VringStarted]
    feed(conn, draft(dialect, R.GET_VRING_BASE, P.VringState(index=0, num=0).encode()))
    assert replies(conn) == [(wid(dialect, R.GET_VRING_BASE), 0x5,
                              P.VringState(index=0, num=4).encode())]
    conn.close()
    host.assert_all_released(fds.given)


@pytest.mark.parametrize("dialect", DRAFTS)
def test_vring_file_without_fd_means_polled(dialect: Dialect) -> None:
    # The draft's code sends the fd only when it has one; the ring is then polled, as with
    # the current protocol's NOFD bit (and starts at once, being polled).
    conn, _host, _factory, _fds = draft_setup(dialect)
    feed(conn, draft(dialect, R.SET_VRING_NUM, P.VringState(index=1, num=64).encode()))
    feed(conn, draft(dialect, R.SET_VRING_ADDR, ring_addr(1, 64).encode()))
    got = feed(conn, draft(dialect, R.SET_VRING_KICK, P.DraftVringFile(index=1).encode()))
    assert got[0] == ev.VringFdSet(1, "kick", None)
    assert conn.vrings[1].kick_polled and conn.vrings[1].started


@pytest.mark.parametrize("dialect", DRAFTS)
@pytest.mark.parametrize("value", [0x100, 0x101, 2**32])
def test_vring_file_index_beyond_a_ring_is_refused(dialect: Dialect, value: int) -> None:
    conn, host, _f, fds = draft_setup(dialect)
    with pytest.raises(RemoteProtocolError, match=f"SET_VRING_CALL: .*{value:#x}"):
        feed(conn, draft(dialect, R.SET_VRING_CALL, u64(value)), fds.take(1))
    host.assert_all_released(fds.given)


def test_net_set_backend_closes_its_fd() -> None:
    dialect = D.DRAFT_CODE
    conn, host, _f, fds = draft_setup(dialect)
    tap = fds.take(1)
    assert feed(conn, raw(15, u64(1)), tap) == []
    assert host.released[tap[0]] == 1
    assert feed(conn, raw(15, u64(0))) == []  # no fd: detach
    assert replies(conn) == []
    with pytest.raises(RemoteProtocolError, match="NET_SET_BACKEND: ring index 7 is out of"):
        feed(conn, raw(15, u64(7)))
    host.assert_all_released(fds.given)


def test_net_set_backend_needs_an_owner() -> None:
    conn, _h, _f, _fds = make_backend(net_device(), dialect=D.DRAFT_CODE)
    with pytest.raises(RemoteProtocolError, match="NET_SET_BACKEND: received before SET_OWNER"):
        feed(conn, raw(15, u64(0)))


@pytest.mark.parametrize(("dialect", "code"), [
    (D.DRAFT_TEXT, 0), (D.DRAFT_TEXT, 16), (D.DRAFT_TEXT, 17), (D.DRAFT_TEXT, 99),
    (D.DRAFT_CODE, 0), (D.DRAFT_CODE, 17), (D.DRAFT_CODE, 24),
])
def test_unknown_draft_code_is_refused(dialect: Dialect, code: int) -> None:
    conn, host, _f, fds = make_backend(net_device(), dialect=dialect)
    with pytest.raises(RemoteProtocolError, match=f"request code {code} is unknown in the "
                                                   "2014 draft"):
        feed(conn, raw(code, b"", 0x1), fds.take(1))
    assert conn.error is not None and conn.closed
    host.assert_all_released(fds.given)


@pytest.mark.parametrize("dialect", DRAFTS)
def test_need_reply_is_not_in_the_draft(dialect: Dialect) -> None:
    # No NACK either: the draft has no acks.
    conn, _host, _f, _fds = make_backend(net_device(), dialect=dialect)
    with pytest.raises(RemoteProtocolError, match="flags 0x9 set NEED_REPLY"):
        feed(conn, draft(dialect, R.SET_OWNER, flags=0x9))
    assert replies(conn) == []


# -- the other dialect: a malformed message that another dialect reads -----------------------


def hint_of(setup: Setup, data: bytes, nfds: int = 0) -> str | None:
    conn, host, _f, fds = setup
    with pytest.raises(RemoteProtocolError):
        feed(conn, data, fds.take(nfds))
    host.assert_all_released(fds.given)
    return conn.dialect_hint


def test_current_back_end_names_a_text_numbered_draft_front_end(
        caplog: pytest.LogCaptureFixture) -> None:
    setup = make_backend(net_device())
    conn = setup[0]
    conn.hint_key = f"test-{uuid.uuid4()}"
    with caplog.at_level(logging.WARNING, logger="vhostuser.connection.backend"):
        # The draft's first request, ECHO (1), is our GET_FEATURES: answered, no hint.
        feed(conn, raw(1))
        assert conn.dialect_hint is None and len(replies(conn)) == 1
        # Its GET_FEATURES (2, no payload) is our SET_FEATURES without its u64.
        hint = hint_of(setup, raw(2))
    assert hint is not None
    assert "another dialect" in hint and "GET_FEATURES in the 2014 draft numbered as its text" \
        in hint and "--draft" in hint and "request id 2" in hint
    assert [r.getMessage() for r in caplog.records].count(f"vhost-user: {hint}") == 1


def test_current_back_end_names_a_code_numbered_draft_front_end() -> None:
    # The draft's code opens a session with ECHO (16): our SET_PROTOCOL_FEATURES, no u64.
    hint = hint_of(make_backend(net_device()), raw(16))
    assert hint is not None and "ECHO in the 2014 draft numbered as its code" in hint
    assert "--draft-numbering code" in hint
    assert "DRAFT_TEXT" not in hint


def test_current_back_end_names_draft_memory_regions() -> None:
    setup = make_backend(net_device())
    handshake(setup[0], setup[3], memory=False)
    table = P.DraftMemoryTable(regions=(ram_region(),)).encode()
    hint = hint_of(setup, req(R.SET_MEM_TABLE, table), 1)
    assert hint is not None and "SET_MEM_TABLE in the 2014 draft numbered as its code" in hint


def test_draft_back_end_names_current_memory_regions() -> None:
    setup = draft_setup(D.DRAFT_CODE, memory=False)
    table = P.MemoryTable(regions=(ram_region(),)).encode()
    hint = hint_of(setup, raw(5, table), 1)
    assert hint is not None and "SET_MEM_TABLE in the current vhost-user protocol" in hint
    assert "no --draft" in hint


def test_draft_back_end_names_the_nofd_bit() -> None:
    setup = draft_setup(D.DRAFT_CODE)
    hint = hint_of(setup, raw(13, u64(0x100)))
    assert hint is not None and "SET_VRING_CALL in the current vhost-user protocol" in hint


def test_draft_back_end_names_need_reply() -> None:
    setup = draft_setup(D.DRAFT_CODE)
    hint = hint_of(setup, raw(8, P.VringState(index=0, num=64).encode(), 0x9))
    assert hint is not None and "SET_VRING_NUM in the current vhost-user protocol" in hint


def test_text_back_end_names_every_reading() -> None:
    # SET_OWNER (3, empty) of the current protocol and of the draft's code is the text's
    # SET_FEATURES without its u64.
    hint = hint_of(make_backend(net_device(), dialect=D.DRAFT_TEXT), raw(3))
    assert hint is not None
    assert "SET_OWNER in the current vhost-user protocol" in hint
    assert "SET_OWNER in the 2014 draft numbered as its code" in hint


def test_text_back_end_names_a_code_numbered_echo() -> None:
    hint = hint_of(make_backend(net_device(), dialect=D.DRAFT_TEXT), raw(16))
    assert hint is not None and "ECHO in the 2014 draft numbered as its code" in hint


def test_code_back_end_names_a_text_numbered_front_end() -> None:
    setup = make_backend(net_device(), dialect=D.DRAFT_CODE)
    feed(setup[0], raw(1))  # the text's ECHO is the code's GET_FEATURES: answered
    hint = hint_of(setup, raw(2))
    assert hint is not None and "GET_FEATURES in the 2014 draft numbered as its text" in hint


def test_text_back_end_names_a_current_front_end_that_gives_up_after_one_echo(
        caplog: pytest.LogCaptureFixture) -> None:
    # QEMU's GET_FEATURES is the text's ECHO; the empty answer makes QEMU close at once.
    conn, _h, _f, _fds = make_backend(net_device(), dialect=D.DRAFT_TEXT)
    conn.hint_key = f"test-{uuid.uuid4()}"
    with caplog.at_level(logging.WARNING, logger="vhostuser.connection.backend"):
        feed(conn, raw(1))
        assert conn.dialect_hint is None
        feed(conn, b"")
    assert conn.dialect_hint is not None
    assert "a front-end speaking the current protocol sends GET_FEATURES as id 1" \
        in conn.dialect_hint
    assert "closed the connection right after its first request" in conn.dialect_hint
    assert conn.dialect_hint.startswith("the front-end may speak another dialect")
    assert "Dialect.CURRENT (command line: no --draft)" in conn.dialect_hint
    assert len(caplog.records) == 1


def test_a_front_end_reconnecting_in_a_loop_is_named_once_per_socket(
        caplog: pytest.LogCaptureFixture) -> None:
    # QEMU retries at once after a failed start: every session gets the hint, the log
    # gets it once per socket (BackendServer names sessions "socket#n").
    sock = f"test-{uuid.uuid4()}.sock"
    with caplog.at_level(logging.DEBUG, logger="vhostuser.connection.backend"):
        for n in range(3):
            conn = BackendConnection(net_device(), FakeHost(), name=f"{sock}#{n}")
            with pytest.raises(RemoteProtocolError):
                feed(conn, raw(16))
            assert conn.dialect_hint is not None
        other = BackendConnection(net_device(), FakeHost(), name=f"other-{sock}#0")
        with pytest.raises(RemoteProtocolError):
            feed(other, raw(16))
    said = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records
            if "another dialect" in r.getMessage()]
    assert said == [(logging.WARNING, f"{sock}#0"), (logging.DEBUG, f"{sock}#1"),
                    (logging.DEBUG, f"{sock}#2"), (logging.WARNING, f"other-{sock}#0")]


@pytest.mark.parametrize("dialect", [D.DRAFT_CODE, D.DRAFT_TEXT])
def test_no_close_hint_after_a_draft_session(dialect: Dialect) -> None:
    conn, _h, _f, _fds = make_backend(net_device(), dialect=dialect)
    feed(conn, draft(dialect, DraftMessage.ECHO))
    feed(conn, draft(dialect, R.GET_FEATURES))
    feed(conn, b"")
    assert conn.dialect_hint is None
    conn, _h, _f, _fds = make_backend(net_device(), dialect=dialect)
    feed(conn, b"")  # nothing at all: nothing to say either
    assert conn.dialect_hint is None


def test_no_hint_for_a_state_error_or_an_unknown_id() -> None:
    # SET_VRING_NUM before SET_FEATURES is a state error (well formed everywhere): no hint.
    conn, _h, _f, _fds = make_backend(net_device())
    feed(conn, req(R.SET_OWNER))
    with pytest.raises(RemoteProtocolError, match="before SET_FEATURES"):
        feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=64)))
    assert conn.dialect_hint is None
    # An id nobody has (a future request) says nothing about dialects.
    conn, _h, _f, _fds = make_backend(net_device())
    with pytest.raises(RemoteProtocolError, match="request code 46 is unknown"):
        feed(conn, raw(46))
    assert conn.dialect_hint is None


# -- never for a front-end speaking our dialect ----------------------------------------------


def _payload_for(rule: Rule, data: st.DataObject) -> tuple[bytes, int]:
    """A well-formed payload of the rule's layout and a fitting fd count."""
    rule_payload = rule.payload
    plain_fds = {Fds.NONE: 0, Fds.ONE: 1}.get(rule.fds, data.draw(st.integers(0, 1)))
    if rule_payload is P.Empty:
        return b"", plain_fds
    if rule_payload is P.U64Payload:
        value = data.draw(st.sampled_from([0, 1, int(NetFeature.MRG_RXBUF), 2**64 - 1]))
        return u64(value), plain_fds
    if rule_payload is P.VringState:
        return P.VringState(index=data.draw(st.integers(0, 3)),
                            num=data.draw(st.sampled_from([0, 1, 64, 256]))).encode(), 0
    if rule_payload is P.VringAddr:
        return ring_addr(data.draw(st.integers(0, 1))).encode(), 0
    if rule_payload is P.VringFile:
        nofd = data.draw(st.booleans())
        return P.VringFile(index=data.draw(st.integers(0, 3)), nofd=nofd).encode(), int(not nofd)
    if rule_payload is P.DraftVringFile:
        return P.DraftVringFile(index=data.draw(st.integers(0, 3))).encode(), data.draw(
            st.integers(0, 1))
    if rule_payload is P.MemoryTable:
        return P.MemoryTable(regions=(ram_region(),)).encode(), 1
    if rule_payload is P.DraftMemoryTable:
        return P.DraftMemoryTable(regions=(ram_region(),)).encode(), 1
    if rule_payload is P.LogBase:
        return P.LogBase(mmap_size=4096, mmap_offset=0).encode(), 1
    raise AssertionError(rule_payload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(Dialect)), st.data())
def test_well_formed_messages_in_any_order_never_give_a_hint(dialect: Dialect,
                                                             data: st.DataObject) -> None:
    """Whatever a front-end speaking our dialect sends, in whatever order (so that state
    errors happen), the back-end never says it looks like another dialect."""
    conn, host, _f, fds = make_backend(net_device(), dialect=dialect)
    ids = [w for w, m in WIRE_IDS[dialect].items()
           if rule_for(dialect, m).payload in (P.Empty, P.U64Payload, P.VringState, P.VringAddr,
                                               P.VringFile, P.DraftVringFile, P.MemoryTable,
                                               P.DraftMemoryTable, P.LogBase)]
    for _ in range(data.draw(st.integers(1, 12))):
        wire = data.draw(st.sampled_from(ids))
        meaning = WIRE_IDS[dialect][wire]
        payload, nfds = _payload_for(rule_for(dialect, meaning), data)
        assert well_formed(dialect, wire, 0x1, payload, nfds) is meaning
        try:
            feed(conn, raw(wire, payload), fds.take(nfds))
        except RemoteProtocolError:
            break
    if data.draw(st.booleans()) and not conn.closed:
        feed(conn, b"")
    assert conn.dialect_hint is None or (
        # the one hint that is not about a malformed message: see _hint_on_close
        dialect is D.DRAFT_TEXT and conn._requests_seen == 1)
    conn.close()
    host.assert_all_released(fds.given)
