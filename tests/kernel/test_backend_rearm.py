"""Event-driven back-end re-arms the driver's kicks after draining a ring.

With VIRTIO_F_EVENT_IDX a driver kicks only when ``avail.idx`` crosses ``avail_event``. A
back-end that never moves ``avail_event`` gets one kick and then silence (a Linux guest
sends one frame and stalls). The driver here follows the suppression rules exactly, so a
missing re-arm shows up as a batch that never arrives.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.guestram import GuestRam
from vhostuser.io.thread import ServerThread
from vhostuser.memory import FlatMemory
from vhostuser.protocol.enums import VirtioFeature
from vhostuser.virtq import SplitDriverRing, split_layout


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "flags"])
def test_kicks_rearmed_between_batches(no_leaks: Any, tmp_path: Path, event_idx: bool) -> None:
    sock = str(tmp_path / "rearm.sock")
    want = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
    if event_idx:
        want |= int(VirtioFeature.RING_EVENT_IDX)
    with ServerThread(sock, NullNetDevice) as srv, GuestRam.memfd(4 << 20) as ram, \
            FrontendClient.connect(sock) as fe:
        fe.negotiate(features=want)
        fe.set_memory(ram)
        mem = FlatMemory(ram.buf, va_base=ram.uva)
        rx = split_layout(64, 0x10000)
        tx = split_layout(64, 0x20000)
        fe.setup_vring(0, 64, desc=rx[0], avail=rx[1], used=rx[2])
        ring: SplitDriverRing[int] = SplitDriverRing(
            mem, 64, tx[0], tx[1], tx[2], event_idx=event_idx
        )
        fe.setup_vring(1, 64, desc=tx[0], avail=tx[1], used=tx[2])
        fe.driver_ok()
        sent = 0
        for batch in range(5):
            for _ in range(8):
                assert ring.add([(0x100000 + 64 * sent, 64, False)], sent)
                sent += 1
            ring.publish()
            if ring.should_kick():
                fe.kick(1)
            deadline = time.monotonic() + 5
            while srv.call(lambda: srv.devices[-1].tx_frames) < sent:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, (
                    f"batch {batch}: only {srv.call(lambda: srv.devices[-1].tx_frames)} "  # type: ignore[attr-defined]
                    f"of {sent} frames arrived: the back-end did not re-arm kicks"
                )
                time.sleep(0.01)
            ring.reap()
        ring.close()
        mem.clear()
        for q in (0, 1):
            fe.stop_vring(q)
    assert not srv.errors
