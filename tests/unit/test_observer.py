"""The passive observer behind ``vhost-user trace``, and the reply pairing it shares with
the front-end core: decoding, pairing, latency, and the rules it reports (never raises)."""

from __future__ import annotations

from typing import Any

import pytest

from vhostuser.connection.observer import Channel, SessionObserver
from vhostuser.connection.pairing import Answer, PairingError, ReplyPairing, expected_answer
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import (
    BackendRequest,
    DeviceType,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
)
from vhostuser.protocol.framing import FLAG_NEED_REPLY, FLAG_REPLY, VERSION, Message
from vhostuser.protocol.table import FRONTEND_RULES

R = FrontendRequest
PF = ProtocolFeature
MAIN = Channel.MAIN


def req(r: int, payload: bytes = b"", fds: int = 0, flags: int = VERSION) -> Message[Any]:
    return Message(int(r), flags, payload, tuple(range(fds)))


def rep(r: int, payload: bytes = b"", fds: int = 0) -> Message[Any]:
    return Message(int(r), VERSION | FLAG_REPLY, payload, tuple(range(fds)))


def u64(v: int) -> bytes:
    return P.U64Payload(value=v).encode()


def test_handshake_is_decoded_and_paired() -> None:
    o = SessionObserver(guess=lambda f: DeviceType.NET if f & NetFeature.MRG_RXBUF else None)
    offered = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | NetFeature.MRG_RXBUF)
    a = o.observe(MAIN, True, req(R.GET_FEATURES), 1.0)
    b = o.observe(MAIN, False, rep(R.GET_FEATURES, u64(offered)), 1.25)
    assert (a.name, a.is_reply, a.problems) == ("GET_FEATURES", False, [])
    assert b.answers == a.seq and b.latency == pytest.approx(0.25)
    assert b.fields["value"] == offered
    assert b.fields["value_names"] == ["MRG_RXBUF", "PROTOCOL_FEATURES", "VERSION_1"]
    assert o.device is DeviceType.NET and o.offered_features == offered
    o.observe(MAIN, True, req(R.SET_PROTOCOL_FEATURES, u64(PF.REPLY_ACK | PF.MQ)), 1.3)
    assert o.protocol_features == PF.REPLY_ACK | PF.MQ
    c = o.observe(MAIN, True, req(R.SET_OWNER, flags=VERSION | FLAG_NEED_REPLY), 1.4)
    assert "NEED_REPLY" in c.text() and o.waiting() == ["SET_OWNER"]
    d = o.observe(MAIN, False, rep(R.SET_OWNER, u64(1)), 1.5)
    assert d.answers == c.seq and d.problems == ["NACK (0x1): the request failed"]
    assert o.waiting() == [] and o.problems == 1
    line = b.text()
    assert "BE->FE GET_FEATURES reply" in line and "MRG_RXBUF" in line and "(250.000 ms)" in line
    js = b.as_json()
    assert js["answers"] == a.seq and js["latency_ms"] == 250.0 and js["direction"] == "BE->FE"


@pytest.mark.parametrize(("msg", "problem"), [
    (req(R.SET_VRING_NUM, P.VringState(index=0, num=256).encode(), fds=1),
     "1 fds attached to a message that takes none"),
    (req(R.SET_MEM_TABLE, b"\x00" * 4), "payload: memory table payload is 4 bytes"),
    (req(R.GET_QUEUE_NUM), "needs protocol feature MQ, not negotiated"),
    (req(R.SET_OWNER, flags=VERSION | FLAG_NEED_REPLY), "NEED_REPLY without REPLY_ACK"),
    (req(99), "request id 99 is not in the protocol"),
    (req(R.SET_OWNER, flags=0x2), "header version 2, not 1"),
    (rep(R.GET_FEATURES, u64(0)), "unexpected reply for request 1: no request is waiting"),
    (req(R.SET_OWNER, flags=VERSION | 0x40), "unknown flag bits 0x40"),
])
def test_rule_breaks_are_reported_not_raised(msg: Message[Any], problem: str) -> None:
    o = SessionObserver()
    rec = o.observe(MAIN, not msg.flags & FLAG_REPLY, msg, 0.0)
    assert any(problem in p for p in rec.problems), rec.problems
    assert "!! " in rec.text()


def test_reply_to_the_wrong_request_leaves_the_waiting_one() -> None:
    o = SessionObserver()
    o.observe(MAIN, True, req(R.GET_FEATURES), 0.0)
    bad = o.observe(MAIN, False, rep(R.GET_QUEUE_NUM, u64(2)), 0.1)
    assert bad.problems == ["reply for request 17 while GET_FEATURES (1) waits"]
    good = o.observe(MAIN, False, rep(R.GET_FEATURES, u64(0), fds=1), 0.2)
    assert good.answers == 0 and good.problems == ["reply carries 1 fds, expected 0"]


def test_backend_channel_requests_and_acks() -> None:
    o = SessionObserver()
    o.observe(MAIN, True, req(R.SET_PROTOCOL_FEATURES, u64(PF.REPLY_ACK | PF.BACKEND_REQ
                                                          | PF.CONFIG)), 0.0)
    r = o.observe(Channel.BACKEND, False, req(BackendRequest.CONFIG_CHANGE_MSG,
                                              flags=VERSION | FLAG_NEED_REPLY), 0.1)
    assert r.name == "CONFIG_CHANGE_MSG" and "[backend channel]" in r.text()
    assert o.waiting(Channel.BACKEND) == ["CONFIG_CHANGE_MSG"] and o.waiting() == []
    a = o.observe(Channel.BACKEND, True, rep(BackendRequest.CONFIG_CHANGE_MSG, u64(0)), 0.2)
    assert a.answers == r.seq and a.problems == []
    # A front-end request sent on the back-end channel is in the wrong place.
    w = o.observe(Channel.BACKEND, True, req(BackendRequest.CONFIG_CHANGE_MSG), 0.3)
    assert "a request from the front-end on the backend channel" in w.problems


def test_pairing_rules() -> None:
    rule = FRONTEND_RULES[R.SET_LOG_BASE]
    assert expected_answer(rule, VERSION, 0) is None
    assert expected_answer(rule, VERSION, int(PF.LOG_SHMFD)) is Answer.ACK
    assert expected_answer(FRONTEND_RULES[R.GET_VRING_BASE], VERSION, 0) is Answer.OWN
    assert expected_answer(FRONTEND_RULES[R.SET_OWNER], VERSION | FLAG_NEED_REPLY, 0) is (
        Answer.ACK)
    p = ReplyPairing()
    e = p.expect(int(R.GET_VRING_BASE), "GET_VRING_BASE", Answer.OWN,
                 FRONTEND_RULES[R.GET_VRING_BASE])
    assert e.payload_type is P.VringState and e.fds == 0 and len(p) == 1
    with pytest.raises(PairingError, match="while GET_VRING_BASE"):
        p.match(int(R.GET_FEATURES))
    assert p.match(int(R.GET_VRING_BASE)) is e and p.oldest() is None
    with pytest.raises(PairingError, match="no request is waiting"):
        p.match(1)
