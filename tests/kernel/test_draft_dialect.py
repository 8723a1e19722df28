"""The 2014 draft dialect over real sockets, memfds and eventfds: our front-end and our
back-end speaking it in both numberings, frames through a switch whose ports speak it,
and the draft's liveness probe (ECHO answered in time, or the back-end is dead; HUP).

Every test checks that this process's fds and mappings come back where they were.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.errors import LocalProtocolError, MessageTimeoutError, PeerClosedError
from vhostuser.frontends.net import VirtioNetFrontend, probe_template, stamp_probe
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import FrontendRequest, NetFeature, VirtioFeature
from vhostuser.protocol.table import Dialect
from vhostuser.switch import Switch, SwitchThread

DRAFTS = [Dialect.DRAFT_TEXT, Dialect.DRAFT_CODE]
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
HDR = struct.Struct("<III")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (AF_UNIX paths are limited to 108 bytes)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vhu-d-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def draft_nic(path: str, dialect: Dialect, **kw: Any) -> Iterator[VirtioNetFrontend]:
    """Our net front-end speaking ``dialect`` (it only needs a client that does)."""
    client = FrontendClient.connect(path, dialect=dialect)
    nic = VirtioNetFrontend(client, name=path, **kw)
    try:
        nic.start()
        yield nic
    finally:
        nic.close()


def frames(n: int, size: int, src: bytes, dst: bytes) -> list[bytes]:
    t = probe_template(size, src_mac=src, dst_mac=dst)
    out = []
    for i in range(n):
        stamp_probe(t, i, 0)
        out.append(bytes(t))
    return out


def receive(nic: VirtioNetFrontend, n: int) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(200):
        if len(got) >= n:
            break
        got += nic.recv(timeout=0.1)
    return got


# -- our front-end and our back-end, both in the draft ------------------------------------------


@pytest.mark.parametrize("dialect", DRAFTS)
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "legacy-hdr"])
def test_frames_through_a_switch_whose_ports_speak_the_draft(
        no_leaks: Any, sock_dir: Path, dialect: Dialect, mrg: bool) -> None:
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a", dialect=dialect)
        sw.add_vhost_user_port(b, name="b", dialect=dialect)

    with SwitchThread(setup) as st, draft_nic(a, dialect, mrg_rxbuf=mrg) as na, \
            draft_nic(b, dialect, mrg_rxbuf=mrg) as nb:
        # Only bits of 2014: no VERSION_1, so the header is the legacy one without MRG_RXBUF.
        assert not na.features & (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
        assert na.hdr_len == (12 if mrg else 10)
        assert na.client.sent[:3] == [FrontendRequest.GET_FEATURES, FrontendRequest.SET_OWNER,
                                      FrontendRequest.SET_FEATURES]
        # ECHO opens the handshake (as the draft's QEMU did) and ends it (a round trip)
        assert na.client.echoes == 2
        sent = frames(100, 200, MAC_A, MAC_B)
        assert na.send_all(sent) == len(sent)
        assert receive(nb, len(sent)) == sent
        back = frames(50, 1000, MAC_B, MAC_A)
        assert nb.send_all(back) == len(back)
        assert receive(na, len(back)) == back
        info = st.call(lambda: st.switch.port("a").info() if st.switch else {})
        assert info["dialect"] == dialect.value
        assert not info["features"] & NetFeature.MTU
    assert not st.errors, st.errors


@pytest.mark.parametrize("dialect", DRAFTS)
def test_echo_port_reflects_frames_in_the_draft(no_leaks: Any, sock_dir: Path,
                                                dialect: Dialect) -> None:
    e = str(sock_dir / "echo.sock")
    with SwitchThread(lambda sw: sw.add_echo_port(e, dialect=dialect)) as st, \
            draft_nic(e, dialect) as nic:
        sent = frames(20, 100, MAC_A, MAC_B)
        assert nic.send_all(sent) == len(sent)
        assert len(receive(nic, len(sent))) == len(sent)
    assert not st.errors


# -- liveness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DRAFTS)
def test_alive_and_watch_while_the_back_end_answers_then_hup(
        no_leaks: Any, sock_dir: Path, dialect: Dialect) -> None:
    path = str(sock_dir / "be.sock")
    srv = ServerThread(path, NullNetDevice, dialect=dialect).start()
    try:
        c = FrontendClient.connect(path, dialect=dialect)
        with c:
            c.negotiate()
            assert c.alive()
            assert c.watch(0.01, rounds=3) is None
            assert c.echoes == 1 + 1 + 3
            srv.stop()  # the back-end goes away: its sockets close
            assert c.watch(0.01) == "the back-end closed the connection (HUP)"
            assert not c.alive() and c.dead is not None
            with pytest.raises(PeerClosedError, match="back-end is dead"):
                c.send(FrontendRequest.GET_FEATURES)
    finally:
        srv.stop()


def test_current_protocol_liveness_is_hup_only(no_leaks: Any, sock_dir: Path) -> None:
    path = str(sock_dir / "be.sock")
    srv = ServerThread(path, NullNetDevice).start()
    try:
        with FrontendClient.connect(path) as c:
            c.negotiate()
            with pytest.raises(LocalProtocolError, match="ECHO does not exist"):
                c.echo()
            assert c.alive() and c.echoes == 0
            srv.stop()
            assert c.watch(5.0) == "the back-end closed the connection (HUP)"
    finally:
        srv.stop()


class SilentPeer:
    """The far end of a socketpair playing a draft back-end that answers the first
    ``answers`` ECHOes (text numbering: id 1) and then nothing."""

    def __init__(self, sock: socket.socket, answers: int) -> None:
        self.sock = sock
        self.answers = answers
        self.seen = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                hdr = self.sock.recv(12, socket.MSG_WAITALL)
                if len(hdr) < 12:
                    return
                request, _flags, size = HDR.unpack(hdr)
                if size:
                    self.sock.recv(size, socket.MSG_WAITALL)
                self.seen += 1
                if request == 1 and self.seen <= self.answers:
                    self.sock.sendall(HDR.pack(1, 0x5, 0))


@pytest.mark.parametrize("answers", [0, 2])
def test_an_unanswered_echo_means_the_back_end_is_dead(no_leaks: Any, answers: int) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = SilentPeer(theirs, answers)
    c = FrontendClient(ours, timeout=0.3, name="silent", dialect=Dialect.DRAFT_TEXT)
    try:
        why = c.watch(0.01)
        assert why == "no ECHO reply within 0.3 s"
        assert c.echoes == answers and c.dead == why
        assert ours.fileno() == -1  # the session is closed, as the draft's front-end did
        with pytest.raises(PeerClosedError, match="no ECHO reply"):
            c.echo()
    finally:
        c.close()
        theirs.close()
        peer.thread.join(5)


def test_echo_timeout_raises_and_closes(no_leaks: Any) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = SilentPeer(theirs, 0)
    c = FrontendClient(ours, timeout=5.0, name="silent", dialect=Dialect.DRAFT_CODE)
    try:
        with pytest.raises(MessageTimeoutError, match="back-end declared dead"):
            c.echo(timeout=0.2)
        assert c.dead == "no ECHO reply within 0.2 s"
        assert not c.alive()
    finally:
        c.close()
        theirs.close()
        peer.thread.join(5)


def test_hup_while_an_echo_waits_is_death_not_an_error(no_leaks: Any) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c = FrontendClient(ours, timeout=5.0, name="hup", dialect=Dialect.DRAFT_TEXT)

    def hang_up() -> None:
        theirs.recv(12, socket.MSG_WAITALL)
        theirs.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        assert not c.alive()
        assert c.dead is not None and "closed the connection while ECHO waited" in c.dead
    finally:
        t.join(5)
        c.close()


def test_draft_client_refuses_what_the_draft_lacks(no_leaks: Any) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with FrontendClient(ours, dialect=Dialect.DRAFT_TEXT) as c:
            with pytest.raises(LocalProtocolError, match="GET_PROTOCOL_FEATURES does not exist "
                                                         "in the 2014 draft"):
                c.send(FrontendRequest.GET_PROTOCOL_FEATURES)
            with pytest.raises(LocalProtocolError, match="the 2014 draft has no NEED_REPLY"):
                c.send(FrontendRequest.SET_OWNER, need_reply=True)
            theirs.setblocking(False)
            with pytest.raises(BlockingIOError):
                theirs.recv(1)  # nothing was sent
    finally:
        theirs.close()


def test_a_bad_draft_peer_is_closed_alone(no_leaks: Any, sock_dir: Path) -> None:
    """An ECHO with a payload is refused by name and closes that connection only; another
    draft session on the same socket keeps being answered."""
    path = str(sock_dir / "be.sock")
    with ServerThread(path, NullNetDevice, dialect=Dialect.DRAFT_CODE) as srv, \
            FrontendClient.connect(path, dialect=Dialect.DRAFT_CODE) as good:
        good.negotiate()
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bad.connect(path)
            bad.settimeout(10)
            bad.sendall(HDR.pack(16, 0x1, 4) + b"ping")
            assert bad.recv(12) == b""  # closed, nothing answered
        finally:
            bad.close()

        def reasons() -> list[str | None]:
            return [s.close_reason for s in srv.sessions_seen if s.closed]

        for _ in range(200):
            if srv.call(reasons):
                break
            time.sleep(0.05)
        (reason,) = srv.call(reasons)
        assert reason is not None and "ECHO: empty payload is 4 bytes, expected 0" in reason
        assert good.alive() and good.echoes == 2
    assert not srv.errors, srv.errors


def test_a_draft_front_end_acks_only_bits_of_2014(no_leaks: Any) -> None:
    """Even when a back-end offers VERSION_1 in the draft (no draft back-end could), the
    front-end acks only the bits a 2014 front-end knew."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    offered = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_PACKED
                  | VirtioFeature.RING_EVENT_IDX | NetFeature.MRG_RXBUF)
    acked: list[int] = []

    def back_end() -> None:  # text numbering: ECHO 1, GET_FEATURES 2, SET_FEATURES 3
        with contextlib.suppress(OSError):
            while True:
                hdr = theirs.recv(12, socket.MSG_WAITALL)
                if len(hdr) < 12:
                    return
                request, _flags, size = HDR.unpack(hdr)
                payload = theirs.recv(size, socket.MSG_WAITALL) if size else b""
                if request == 1:
                    theirs.sendall(HDR.pack(1, 0x5, 0))
                elif request == 2:
                    theirs.sendall(HDR.pack(2, 0x5, 8) + struct.pack("<Q", offered))
                elif request == 3:
                    acked.append(struct.unpack("<Q", payload)[0])

    t = threading.Thread(target=back_end)
    t.start()
    try:
        with FrontendClient(ours, dialect=Dialect.DRAFT_TEXT) as c:
            n = c.negotiate()
            assert n.backend_features == offered
            assert n.features == int(VirtioFeature.RING_EVENT_IDX | NetFeature.MRG_RXBUF)
    finally:
        ours.close()  # the peer reads what is left, then EOF
        t.join(5)
        theirs.close()
    assert acked == [n.features]
