"""FrontendConnection in the 2014 draft (both numberings), and its side of the
other-dialect diagnostic: a reply malformed for us but well formed as another dialect's
reply, a hang-up on the code numbering's ECHO, silence after it; never with a back-end
that speaks our dialect (our own back-end core, wired to it, in every dialect).
"""

from __future__ import annotations

import logging
import struct
import uuid

import pytest

from vhostuser.connection import events as ev
from vhostuser.connection.backend import BackendConnection
from vhostuser.connection.frontend import FrontendConnection
from vhostuser.errors import LocalProtocolError, RemoteProtocolError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, NetFeature
from vhostuser.protocol.table import Dialect

from .fakes import FakeDevice, make_backend, ram_region, raw, ring_addr, split_messages, u64

R = FrontendRequest
D = Dialect
Front = FrontendConnection[int]


def header(data: bytes) -> tuple[int, int, int]:
    request, flags, size = struct.unpack_from("<III", data)
    return request, flags, size


def reply(request: int, payload: bytes = b"") -> bytes:
    return raw(request, payload, 0x5)


# -- requests in draft ids --------------------------------------------------------------------


@pytest.mark.parametrize(("dialect", "owner", "echo"), [
    (D.DRAFT_TEXT, 4, 1), (D.DRAFT_CODE, 3, 16)])
def test_draft_requests_use_draft_ids(dialect: Dialect, owner: int, echo: int) -> None:
    fe: Front = FrontendConnection(dialect=dialect)
    assert header(fe.request(R.SET_OWNER)) == (owner, 0x1, 0)
    assert header(fe.echo()) == (echo, 0x1, 0)
    assert fe.waiting == 1
    (got,) = fe.receive_data(reply(echo))
    assert got == ev.ReplyReceived(echo, b"", ())
    data = fe.request(R.SET_VRING_KICK, P.DraftVringFile(index=1), nfds=0)
    assert data[12:] == u64(1)
    fe.request(R.SET_VRING_CALL, P.DraftVringFile(index=1), nfds=1)
    with pytest.raises(LocalProtocolError, match="at most 1 fd"):
        fe.request(R.SET_VRING_ERR, P.DraftVringFile(index=1), nfds=2)


def test_draft_get_features_reply_is_learnt() -> None:
    fe: Front = FrontendConnection(dialect=D.DRAFT_TEXT)
    fe.request(R.GET_FEATURES)
    fe.receive_data(reply(2, u64(0x1234)))
    assert fe.backend_features == 0x1234
    fe.request(R.SET_FEATURES, P.U64Payload(value=0x1234))
    assert fe.features == 0x1234


def test_each_dialect_takes_its_own_layouts() -> None:
    table = P.MemoryTable(regions=(ram_region(),))
    draft_table = P.DraftMemoryTable(regions=(ram_region(),))
    fe: Front = FrontendConnection(dialect=D.DRAFT_CODE)
    with pytest.raises(LocalProtocolError, match="takes DraftMemoryTable, not MemoryTable"):
        fe.request(R.SET_MEM_TABLE, table, nfds=1)
    assert len(fe.request(R.SET_MEM_TABLE, draft_table, nfds=1)) == 12 + 8 + 24
    assert len(fe.request(R.SET_LOG_BASE, P.U64Payload(value=0x1000))) == 12 + 8
    cur: Front = FrontendConnection()
    with pytest.raises(LocalProtocolError, match="takes MemoryTable, not DraftMemoryTable"):
        cur.request(R.SET_MEM_TABLE, draft_table, nfds=1)
    with pytest.raises(LocalProtocolError, match="takes VringFile, not DraftVringFile"):
        cur.request(R.SET_VRING_KICK, P.DraftVringFile(index=0), nfds=1)


def test_echo_and_draft_only_requests_are_refused_where_they_do_not_exist() -> None:
    cur: Front = FrontendConnection()
    with pytest.raises(LocalProtocolError, match="ECHO does not exist in the current"):
        cur.echo()
    text: Front = FrontendConnection(dialect=D.DRAFT_TEXT)
    for req in (R.GET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE, R.GET_CONFIG):
        with pytest.raises(LocalProtocolError, match=f"{req.name} does not exist in the 2014"):
            text.request(req)
    with pytest.raises(LocalProtocolError, match="no NEED_REPLY"):
        text.request(R.SET_OWNER, need_reply=True)


def test_echo_reply_must_be_the_same_empty_message() -> None:
    fe: Front = FrontendConnection(dialect=D.DRAFT_CODE)
    fe.echo()
    with pytest.raises(RemoteProtocolError, match="ECHO reply: empty payload is 4 bytes"):
        fe.receive_data(reply(16, b"ping"))
    fe = FrontendConnection(dialect=D.DRAFT_CODE)
    fe.echo()
    with pytest.raises(RemoteProtocolError, match="reply for request 1 while ECHO"):
        fe.receive_data(reply(1))


# -- the other dialect --------------------------------------------------------------------------


def test_current_front_end_names_a_text_numbered_back_end(
        caplog: pytest.LogCaptureFixture) -> None:
    # Our GET_FEATURES (1) is the text's ECHO: it comes back empty.
    name = f"fe-{uuid.uuid4()}"
    fe: Front = FrontendConnection(name=name)
    fe.request(R.GET_FEATURES)
    with caplog.at_level(logging.WARNING, logger="vhostuser.connection.frontend"), \
            pytest.raises(RemoteProtocolError, match="GET_FEATURES reply: u64 payload is 0"):
        fe.receive_data(reply(1))
    hint = fe.dialect_hint
    assert hint is not None and hint.startswith("the back-end looks like it speaks another")
    assert "reply to ECHO in the 2014 draft numbered as its text" in hint
    assert "Dialect.DRAFT_TEXT (command line: --draft)" in hint
    assert [r.getMessage() for r in caplog.records] == [f"{name}: {hint}"]
    again: Front = FrontendConnection(name=name)  # the same back-end, a new session
    again.request(R.GET_FEATURES)
    with caplog.at_level(logging.WARNING, logger="vhostuser.connection.frontend"), \
            pytest.raises(RemoteProtocolError):
        again.receive_data(reply(1))
    assert again.dialect_hint == hint and len(caplog.records) == 1


def test_text_front_end_names_a_back_end_that_answers_id_1_with_features() -> None:
    fe: Front = FrontendConnection(dialect=D.DRAFT_TEXT)
    fe.echo()
    with pytest.raises(RemoteProtocolError, match="ECHO reply: empty payload is 8 bytes"):
        fe.receive_data(reply(1, u64(0x3000_0000)))
    hint = fe.dialect_hint
    assert hint is not None
    assert "GET_FEATURES in the current vhost-user protocol" in hint
    assert "GET_FEATURES in the 2014 draft numbered as its code" in hint


def test_code_front_end_names_a_back_end_that_hangs_up_on_echo() -> None:
    fe: Front = FrontendConnection(dialect=D.DRAFT_CODE)
    fe.echo()
    with pytest.raises(RemoteProtocolError, match="closed the connection while ECHO waited"):
        fe.receive_data(b"")
    hint = fe.dialect_hint
    assert hint is not None and "in answer to ECHO (id 16)" in hint
    assert "Dialect.CURRENT" in hint and "Dialect.DRAFT_TEXT" in hint


@pytest.mark.parametrize(("dialect", "first"), [
    (D.DRAFT_TEXT, "echo"), (D.DRAFT_CODE, "features"), (D.CURRENT, "features")])
def test_no_hint_when_hanging_up_on_anything_else(dialect: Dialect, first: str) -> None:
    fe: Front = FrontendConnection(dialect=dialect)
    if first == "echo":
        fe.echo()
    else:
        fe.request(R.GET_FEATURES)
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        fe.receive_data(b"")
    assert fe.dialect_hint is None


def test_silence_after_the_first_code_echo_may_be_the_current_protocol() -> None:
    fe: Front = FrontendConnection(dialect=D.DRAFT_CODE)
    fe.echo()
    hint = fe.hint_no_reply()
    assert hint is not None and hint.startswith("the back-end may speak another dialect")
    assert "SET_PROTOCOL_FEATURES, which has no reply" in hint
    # Later silences say nothing about dialects (a back-end that hung).
    late: Front = FrontendConnection(dialect=D.DRAFT_CODE)
    late.request(R.SET_OWNER)
    late.echo()
    assert late.hint_no_reply() is None
    text: Front = FrontendConnection(dialect=D.DRAFT_TEXT)
    text.echo()
    assert text.hint_no_reply() is None


# -- never with a back-end speaking our dialect -------------------------------------------------


def _pump(fe: Front, be: BackendConnection[int], data: bytes, fds: list[int]) -> list[ev.Event]:
    be.receive_data(data, fds)
    out: list[ev.Event] = []
    for chunk, rfds in be.data_to_send():
        for request, flags, payload in split_messages(chunk):
            out += fe.receive_data(raw(request, payload, flags), rfds)
    return out


@pytest.mark.parametrize("dialect", list(Dialect))
def test_a_whole_session_with_our_back_end_gives_no_hint(dialect: Dialect) -> None:
    fe: Front = FrontendConnection(dialect=dialect)
    be, host, _f, fds = make_backend(
        FakeDevice(virtio_features=int(NetFeature.MRG_RXBUF), num_queues=2), dialect=dialect)
    if dialect.is_draft:
        assert _pump(fe, be, fe.echo(), []) == [ev.ReplyReceived(
            1 if dialect is D.DRAFT_TEXT else 16, b"", ())]
    _pump(fe, be, fe.request(R.GET_FEATURES), [])
    assert fe.backend_features == be.offered_features
    _pump(fe, be, fe.request(R.SET_OWNER), [])
    _pump(fe, be, fe.request(R.SET_FEATURES, P.U64Payload(value=int(NetFeature.MRG_RXBUF))), [])
    table: P.MemoryTable = (P.DraftMemoryTable if dialect.is_draft else P.MemoryTable)(
        regions=(ram_region(),))
    _pump(fe, be, fe.request(R.SET_MEM_TABLE, table, nfds=1), fds.take(1))
    _pump(fe, be, fe.request(R.SET_VRING_NUM, P.VringState(index=0, num=64)), [])
    _pump(fe, be, fe.request(R.SET_VRING_ADDR, ring_addr(0, 64)), [])
    (base,) = _pump(fe, be, fe.request(R.GET_VRING_BASE, P.VringState(index=0, num=0)), [])
    assert isinstance(base, ev.ReplyReceived)
    assert P.VringState.decode(base.payload) == P.VringState(index=0, num=0)
    assert fe.waiting == 0 and fe.error is None and be.error is None
    assert fe.dialect_hint is None and be.dialect_hint is None
    be.close()
    host.assert_all_released(fds.given)
