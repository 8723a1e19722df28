"""What QEMU 7.2 acks of the protocol features this project added to the back-end.

Why INBAND_NOTIFICATIONS is opt-in: QEMU 7.2 acks every offered protocol feature below its
own VHOST_USER_PROTOCOL_F_MAX (17), bit 14 included, although it neither sends VRING_KICK
nor handles BACKEND_VRING_CALL. Its start-up still gives every ring call and err fds, so
our back-end (which uses in-band calls only on rings without a call fd) stays on eventfds.
DEVICE_STATE (bit 19) is above that limit: QEMU 7.2 does not ack it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vhostuser.connection import events as ev
from vhostuser.devices.net import NullNetDevice
from vhostuser.io.backend import BackendSession
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import ProtocolFeature

from .peers import QemuVhostUserNet, require_peer

PF = ProtocolFeature


class StatefulNet(NullNetDevice):
    """A null NIC that also has a (trivial) device state, so DEVICE_STATE is offered."""

    def save_state(self) -> bytes:
        return b"{}"

    def load_state(self, data: bytes) -> None:
        pass


def test_qemu_acks_inband_but_keeps_eventfds(no_leaks: Any, sock_dir: Path) -> None:
    require_peer("qemu")
    sock = str(sock_dir / "net.sock")
    with ServerThread(sock, StatefulNet, inband_notifications=True) as srv, \
            QemuVhostUserNet(sock) as q:
        deadline = time.monotonic() + 30

        def enabled() -> BackendSession | None:
            for s in srv.sessions_seen:
                if all(v.enabled for v in s.conn.vrings):
                    return s
            return None

        while (s := srv.call(enabled)) is None:
            assert time.monotonic() < deadline, "QEMU never enabled the rings"
            time.sleep(0.1)
        offered, acked, calls = srv.call(lambda: (
            s.conn.offered_protocol_features, s.conn.protocol_features,
            [e for e in s.events if isinstance(e, ev.VringFdSet) and e.kind == "call"]))
        assert offered & PF.INBAND_NOTIFICATIONS and offered & PF.DEVICE_STATE
        assert acked & PF.INBAND_NOTIFICATIONS  # QEMU 7.2 acks bit 14 when offered
        assert not acked & PF.DEVICE_STATE  # bit 19: above QEMU 7.2's F_MAX
        # Every ring got a real call fd: no in-band call will be sent to QEMU.
        assert calls and all(e.fd is not None for e in calls)
        assert srv.call(lambda: [s.conn.call_inband(i) for i in range(2)]) == [False, False]
        q.stop()
    assert not srv.errors, srv.errors
