"""SET_LOG_BASE against a real BackendServer over AF_UNIX, with real memfds (the shell's
``map_region``): a good log is mapped, answered with a u64 0 and unmapped when the session
ends; a hostile one (too big, past its fd, read-only, wrapping) gets a NACK, the
connection is closed, nothing stays mapped or open (/proc/self counts flat), and the
server goes on serving (docs/security.md "Cases").
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from vhostuser.connection.backend import MAX_LOG_BYTES
from vhostuser.frontends import BlkOp, VirtioBlkFrontend
from vhostuser.io.blkfile import BlkFile
from vhostuser.protocol import payloads as P

from .test_backend_hostile import (
    U64,
    VF,
    Case,
    Fds,
    R,
    Raw,
    Served,
    _with,
    handshake,
    msg,
    nothing_leaks,
    probe,
    run_case,
    served,  # noqa: F401 -- the fixture
    wait_until,
)
from .test_blk_frontend import make_image, serve


def _log(size: int, offset: int = 0) -> bytes:
    return msg(R.SET_LOG_BASE, P.LogBase(mmap_size=size, mmap_offset=offset).encode(), 0x9)


HOSTILE_LOGS = [
    Case("log-size-above-max", "memory", _with(_log(MAX_LOG_BYTES + 1), lambda f: [f.memfd(4096)]),
         True),
    Case("log-size-u64-max", "memory", _with(_log(2**64 - 1), lambda f: [f.memfd(4096)]), True),
    Case("log-past-its-fd", "memory", _with(_log(8192), lambda f: [f.memfd(4096)]), True),
    Case("log-offset-past-its-fd", "memory", _with(_log(4096, 8192), lambda f: [f.memfd(8192)]),
         True),
    Case("log-offset-above-max", "memory",
         _with(_log(4096, MAX_LOG_BYTES + 4096), lambda f: [f.memfd(4096)]), True),
    Case("log-fd-pipe", "memory", _with(_log(4096), lambda f: [f.pipe()]), True),
    Case("log-fd-eventfd", "memory", _with(_log(4096), lambda f: [f.eventfd()]), True),
    Case("log-no-fd", "memory", _with(_log(4096), lambda f: []), True),
]


@pytest.mark.parametrize("case", HOSTILE_LOGS, ids=[c.name for c in HOSTILE_LOGS])
def test_hostile_log_is_nacked_and_nothing_stays_mapped(served: Served,  # noqa: F811
                                                        case: Case) -> None:
    fds = Fds()
    with nothing_leaks(served):
        request, got = run_case(served, case, fds)
        assert got, "no NACK before the close"
        assert got[-1][0] == request and got[-1][1] == 0x5, got
        assert U64.unpack(got[-1][2])[0] != 0
        wait_until(lambda: served.server.closed_sessions >= 2, 5, "the session to close")
        assert "protocol violation" in (served.server.last_close_reason or "")
        probe(served)


def test_read_only_log_is_nacked(served: Served, tmp_path: os.PathLike[str]) -> None:  # noqa: F811
    fds = Fds()
    directory = os.fspath(tmp_path)
    case = Case("log-read-only", "memory",
                lambda f: (_log(4096), [f.readonly_file(directory)]), True)
    with nothing_leaks(served):
        _request, got = run_case(served, case, fds)
        assert got and got[-1][:2] == (R.SET_LOG_BASE, 0x5)
        assert U64.unpack(got[-1][2])[0] != 0
        probe(served)


def test_good_log_is_mapped_answered_and_unmapped_with_the_session(
        served: Served) -> None:  # noqa: F811
    fds = Fds()
    with nothing_leaks(served):
        peer = Raw(served.path)
        try:
            handshake(peer, "memory", fds)  # acks every offered feature: LOG_ALL included
            logfd = fds.memfd(4096)
            peer.send(msg(R.SET_LOG_BASE, P.LogBase(mmap_size=4096, mmap_offset=0).encode()),
                      [logfd])
            # vhost-user.rst SET_LOG_BASE (LOG_SHMFD): the front-end waits for a u64.
            assert peer.reply() == (R.SET_LOG_BASE, 0x5, U64.pack(0))
            (session,) = served.server.sessions
            mem = session.conn.mem
            assert mem.log is not None and len(mem.log.buf) == 4096
            assert session.conn.acked_features & VF.LOG_ALL
            # The back-end's bits land in the front-end's memfd (one shared bitmap).
            mem.mark_dirty(10 * 4096, 1)
            assert os.pread(logfd, 2, 0) == bytes([0, 0b100])
            # LOG_ALL cleared (migration over): writes are no longer logged.
            offered = session.conn.acked_features & ~int(VF.LOG_ALL)
            peer.acked(R.SET_FEATURES, U64.pack(offered))
            assert mem.log is None
        finally:
            peer.close()
            fds.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_get_vring_base_completes_a_slow_disks_requests_first(no_leaks: Any, packed: bool
                                                              ) -> None:
    """vhost-user.rst "Migrating back-end state": the destination resumes at the index
    GET_VRING_BASE returns. A disk with 5 s of latency holds six popped writes when the
    front-end stops the ring; the reply comes at once (the latency is cut short), by then
    every write is on the image and in the used ring, and the base is past all six."""
    d = Path(tempfile.mkdtemp(prefix="vhu-mig-", dir="/tmp"))
    try:
        img = make_image(d / "disk.raw", 1 << 20)
        sock = str(d / "blk.sock")
        with BlkFile.open(str(img)) as image, serve(sock, image, latency=5.0), \
                VirtioBlkFrontend(sock, depth=8, packed=packed) as disk:
            ops = [BlkOp("write", i * 4096, data=bytes([i + 1]) * 4096) for i in range(6)]
            disk.submit_many(ops)
            time.sleep(0.3)  # popped and waiting out the latency
            assert disk.poll() == []
            fe = disk._session.fe if disk._session is not None else None
            assert fe is not None
            t0 = time.monotonic()
            base = fe.stop_vring(0)
            took = time.monotonic() - t0
            done = disk.poll()
            assert {id(o) for o in done} == {id(o) for o in ops}, "requests left in flight"
            assert all(o.ok for o in ops) and took < 4.0, took
            if packed:  # avail index 6 and its wrap counter (bit 15), used the same
                assert base & 0x7FFF == 6 and (base >> 16) & 0x7FFF == 6, hex(base)
            else:
                assert base == 6
            assert img.read_bytes()[: 6 * 4096] == b"".join(bytes([i + 1]) * 4096
                                                            for i in range(6))
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
