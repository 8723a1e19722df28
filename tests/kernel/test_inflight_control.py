"""GET/SET_INFLIGHT_FD through real sockets: repeated allocation leaks nothing, and hostile
SET_INFLIGHT_FD payloads are refused with a clear error and the connection closed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.base import Device
from vhostuser.errors import PeerClosedError, RemoteProtocolError
from vhostuser.io.fdpass import OwnedFd, close_all
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.thread import ServerThread
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature
from vhostuser.virtq.inflight import inflight_area_bytes

REPEAT = int(os.environ.get("VHOSTUSER_INFLIGHT_REPEAT", "10000"))


class InflightDevice(Device):
    """A two-queue device that offers INFLIGHT_SHMFD and records what it was given."""

    num_queues = 2
    protocol_features = int(ProtocolFeature.INFLIGHT_SHMFD)

    def __init__(self) -> None:
        self.areas: list[tuple[int, int, bool]] = []

    def on_inflight(self, area: Any, *, fresh: bool) -> None:
        self.areas.append((area.num_queues, area.queue_size, fresh))


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "inflight.sock")


def _get_inflight(fe: FrontendClient, nq: int, qs: int) -> tuple[P.InflightPayload, OwnedFd]:
    reply = fe.send(FrontendRequest.GET_INFLIGHT_FD, P.InflightPayload(
        mmap_size=0, mmap_offset=0, num_queues=nq, queue_size=qs))
    assert reply is not None
    (fd,) = reply.fds
    assert isinstance(fd, OwnedFd)
    return P.InflightPayload.decode(reply.payload), fd


def test_get_inflight_fd_repeated_leaks_nothing(no_leaks: Any, sock: str) -> None:
    with ServerThread(sock, InflightDevice) as srv, FrontendClient.connect(sock) as fe:
        fe.negotiate()
        assert fe.conn.has(ProtocolFeature.INFLIGHT_SHMFD)
        first, fd = _get_inflight(fe, 2, 256)
        fd.close()
        packed = bool((fe.conn.features or 0) & VirtioFeature.RING_PACKED)
        assert first.mmap_size == inflight_area_bytes(2, 256, packed)
        assert first.mmap_offset == 0
        no_leaks.reset()  # the session's steady state is the baseline
        for _ in range(REPEAT):
            _info, fd = _get_inflight(fe, 2, 256)
            assert os.fstat(fd.fd).st_size == first.mmap_size
            fd.close()
        no_leaks.check()
        dev = srv.call(lambda: srv.devices[-1])
        assert isinstance(dev, InflightDevice)
        assert srv.call(lambda: len(dev.areas)) == REPEAT + 1


@pytest.mark.parametrize(
    ("nq", "qs", "size_delta", "why"),
    [
        (0, 256, 0, "num_queues 0"),
        (3, 256, 0, "num_queues 3"),
        (2, 0, 0, "queue_size 0"),
        (2, 40000, 0, "queue_size 40000"),
        (2, 256, -64, "smaller than"),
        (2, 128, 0, "disagrees with SET_VRING_NUM 256"),
    ],
)
def test_hostile_set_inflight_fd(
    no_leaks: Any, sock: str, nq: int, qs: int, size_delta: int, why: str
) -> None:
    with ServerThread(sock, InflightDevice) as srv, FrontendClient.connect(sock) as fe:
        fe.negotiate()
        fe.send(FrontendRequest.SET_VRING_NUM, P.VringState(index=0, num=256))
        info, fd = _get_inflight(fe, 2, 256)
        try:
            payload = P.InflightPayload(
                mmap_size=info.mmap_size + size_delta, mmap_offset=0, num_queues=nq,
                queue_size=qs,
            )
            with pytest.raises((RemoteProtocolError, PeerClosedError)):
                fe.send(FrontendRequest.SET_INFLIGHT_FD, payload, [fd.fd], need_reply=True)
        finally:
            fd.close()
            close_all(fe.conn.take_fds())

        def reason() -> str | None:
            s = srv.sessions_seen[-1]
            return s.close_reason if s.closed else None

        import time

        deadline = time.monotonic() + 5
        while (r := srv.call(reason)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r is not None and why in r, r
        assert "SET_INFLIGHT_FD" in r
