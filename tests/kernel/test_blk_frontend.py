"""Our blk front-end against our blk back-end through real sockets, memfds and eventfds
(the back-end on a reactor thread, ``ServerThread``), on a real image file: identical data
after identical random writes, flush, discard, write-zeroes, many requests in flight,
several queues, read-only, and a reconnect that hands the inflight area back. The
``vhost-user blk`` and ``blkbench`` commands run as subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.blk import BlkDevice, BlkRequest
from vhostuser.frontends import BlkError, BlkOp, VirtioBlkFrontend
from vhostuser.io.blkfile import BlkFile
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import BlkFeature, ProtocolFeature

MiB = 1 << 20
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (AF_UNIX paths must fit 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-blk-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def random_ops(rnd: random.Random, size: int, n: int) -> list[tuple[str, int, int]]:
    """Writes of 4 KiB to 1 MiB at random 512-byte aligned offsets, with some flushes,
    discards and write-zeroes (4 KiB aligned) among them."""
    ops: list[tuple[str, int, int]] = []
    for _ in range(n):
        kind = rnd.choices(["write", "flush", "discard", "write_zeroes"], [10, 1, 2, 2])[0]
        if kind == "write":
            length = rnd.randrange(4096, MiB + 1, 512)
            off = rnd.randrange(0, size - length + 1, 512)
        elif kind == "flush":
            off = length = 0
        else:
            length = rnd.randrange(4096, 512 * 1024 + 1, 4096)
            off = rnd.randrange(0, size - length + 1, 4096)
        ops.append((kind, off, length))
    return ops


def apply_ops(disk: VirtioBlkFrontend, model: bytearray, ops: list[tuple[str, int, int]],
              seed: int) -> None:
    """Run ``ops`` on ``disk`` and on ``model`` (discarded ranges read back as zeroes on a
    file system that punches holes, as tmpfs and ext4 do)."""
    rnd = random.Random(seed)
    for kind, off, length in ops:
        if kind == "write":
            data = rnd.randbytes(length)
            disk.write(off, data)
            model[off : off + length] = data
        elif kind == "flush":
            disk.flush()
        elif kind == "discard":
            disk.discard(off, length)
            model[off : off + length] = bytes(length)
        else:
            disk.write_zeroes(off, length, unmap=rnd.random() < 0.5)
            model[off : off + length] = bytes(length)


def serve(sock: str, image: BlkFile, **kw: Any) -> ServerThread:
    return ServerThread(sock, lambda: BlkDevice(image, **kw))


def test_random_writes_flush_discard_write_zeroes(no_leaks: Any, workdir: Path) -> None:
    size = 16 * MiB
    img = make_image(workdir / "disk.raw", size)
    sock = str(workdir / "blk.sock")
    model = bytearray(size)
    ops = random_ops(random.Random(11), size, 60)
    with BlkFile.open(str(img)) as image, serve(sock, image, serial="kernel-test") as srv, \
            VirtioBlkFrontend(sock) as disk:
        assert disk.capacity == size
        assert disk.features & BlkFeature.DISCARD and disk.features & BlkFeature.WRITE_ZEROES
        assert disk.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
        assert disk.get_id() == "kernel-test"
        apply_ops(disk, model, ops, seed=3)
        disk.flush()
        # Read back through the front-end, in 1 MiB pieces, and straight from the file.
        assert disk.read(0, size) == model
        assert img.read_bytes() == model
        assert srv.errors == []


def test_many_requests_in_flight(no_leaks: Any, workdir: Path) -> None:
    size = 8 * MiB
    img = make_image(workdir / "disk.raw", size)
    sock = str(workdir / "blk.sock")
    rnd = random.Random(2)
    model = bytearray(size)
    blocks = size // 4096
    with BlkFile.open(str(img)) as image, serve(sock, image), \
            VirtioBlkFrontend(sock, depth=32, max_io=64 * 1024) as disk:
        busy: set[int] = set()
        done = 0
        submitted = 0
        while done < 2000:
            while submitted < 2000 and disk.free_slots:
                blk = rnd.randrange(blocks)
                while blk in busy:
                    blk = rnd.randrange(blocks)
                busy.add(blk)
                data = rnd.randbytes(4096)
                model[blk * 4096 : blk * 4096 + 4096] = data
                disk.submit(BlkOp("write", blk * 4096, data=data))
                submitted += 1
            assert disk.in_flight <= 32
            for op in disk.wait(5.0):
                assert op.ok, op
                busy.discard(op.offset // 4096)
                done += 1
        assert disk.read(0, size) == model


def test_packed_rings(no_leaks: Any, workdir: Path) -> None:
    size = 4 * MiB
    img = make_image(workdir / "disk.raw", size)
    sock = str(workdir / "blk.sock")
    model = bytearray(size)
    with BlkFile.open(str(img)) as image, serve(sock, image), \
            VirtioBlkFrontend(sock, packed=True, queue_size=64, depth=16,
                              max_io=256 * 1024) as disk:
        assert disk.features & (1 << 34)  # VIRTIO_F_RING_PACKED
        assert disk.has_inflight  # packed rings are tracked too
        ops = random_ops(random.Random(5), size, 40)
        apply_ops(disk, model, [(k, o, min(n, 256 * 1024)) for k, o, n in ops], seed=8)
        assert disk.read(0, size) == model


def test_several_queues(no_leaks: Any, workdir: Path) -> None:
    img = make_image(workdir / "disk.raw", 4 * MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img)) as image, serve(sock, image, num_queues=4), \
            VirtioBlkFrontend(sock, num_queues=4, depth=4) as disk:
        assert len(disk.queues) == 4 and disk.config.num_queues == 4
        ops = [BlkOp("write", i * 4096, data=bytes([i]) * 4096) for i in range(16)]
        disk.submit_many(ops)
        while disk.in_flight:
            disk.wait(5.0)
        assert all(o.ok for o in ops)
        assert disk.read(0, 16 * 4096) == b"".join(bytes([i]) * 4096 for i in range(16))


def test_read_only(no_leaks: Any, workdir: Path) -> None:
    img = make_image(workdir / "disk.raw", MiB)
    img.write_bytes(b"r" * MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img), read_only=True) as image, serve(sock, image), \
            VirtioBlkFrontend(sock) as disk:
        assert disk.read_only
        assert not disk.features & BlkFeature.DISCARD
        with pytest.raises(BlkError, match="status IOERR"):
            disk.write(0, b"x" * 512)
        assert disk.read(0, 512) == b"r" * 512
    assert img.read_bytes() == b"r" * MiB


def test_requests_out_of_range_are_refused_locally(no_leaks: Any, workdir: Path) -> None:
    img = make_image(workdir / "disk.raw", MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img)) as image, serve(sock, image), VirtioBlkFrontend(sock) as disk:
        with pytest.raises(ValueError, match="beyond the capacity"):
            disk.read(MiB - 512, 1024)
        with pytest.raises(ValueError, match="whole 512-byte sectors"):
            disk.write(100, b"x" * 512)
        # A request the front-end lets through but the back-end refuses: IOERR.
        op = disk.submit(BlkOp("read", MiB, 512))
        (got,) = disk.wait(5.0)
        assert got is op and op.status == 1


def blk(d: object) -> BlkDevice:
    assert isinstance(d, BlkDevice)
    return d


class Holding(BlkDevice):
    """A disk so slow that nothing completes: requests stay in flight."""

    def submit(self, req: BlkRequest) -> None:
        self.stats["held"] += 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reconnect_resubmits_what_was_in_flight(no_leaks: Any, workdir: Path,
                                                packed: bool) -> None:
    """The back-end goes away with requests in flight; a new one on the same socket gets
    the inflight area back and completes them, each exactly once."""
    img = make_image(workdir / "disk.raw", 4 * MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img)) as image:
        first = ServerThread(sock, lambda: Holding(image)).start()
        try:
            with VirtioBlkFrontend(sock, depth=16, reconnect_timeout=10.0,
                                   packed=packed) as disk:
                assert disk.has_inflight
                ops = [BlkOp("write", i * 4096, data=bytes([i + 1]) * 4096) for i in range(12)]
                disk.submit_many(ops)
                deadline = time.monotonic() + 5
                while first.call(lambda: sum(blk(d).stats["held"] for d in first.devices)) < 12:
                    assert time.monotonic() < deadline, "the requests never reached the disk"
                    time.sleep(0.01)
                first.stop()  # the back-end goes away; nothing was completed
                with serve(sock, image) as second:
                    got: list[BlkOp] = []
                    while len(got) < 12:
                        more = disk.wait(5.0)
                        assert more, "no completion after reconnecting"
                        got.extend(more)
                    assert disk.reconnects == 1
                    assert sorted(id(o) for o in got) == sorted(id(o) for o in ops)
                    assert all(o.ok for o in ops)
                    assert disk.wait(0.2) == []  # nothing completes twice
                    assert second.call(lambda: blk(second.devices[-1]).resubmitted) == 12
                    want = b"".join(bytes([i + 1]) * 4096 for i in range(12))
                    assert disk.read(0, 12 * 4096) == want
                    assert img.read_bytes()[: 12 * 4096] == want
                    disk.close()  # while the back-end is there: rings stopped cleanly
        finally:
            first.stop()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_memory_table_change_while_requests_wait(no_leaks: Any, workdir: Path,
                                                 packed: bool) -> None:
    """A region is added (ADD_MEM_REG, as on memory hotplug) while the back-end holds
    requests (--latency): the rings are rebuilt on the new table, keep what they had in
    flight, and the held requests complete when their time comes."""
    from vhostuser.io.guestram import GuestRam
    from vhostuser.protocol import payloads as P
    from vhostuser.protocol.enums import FrontendRequest

    img = make_image(workdir / "disk.raw", 1 * MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img)) as image, \
            serve(sock, image, latency=0.4) as server, \
            VirtioBlkFrontend(sock, depth=8, packed=packed) as disk, \
            GuestRam.memfd(1 * MiB, name="hotplug") as extra:
        ops = [BlkOp("write", i * 4096, data=bytes([i + 7]) * 4096) for i in range(6)]
        disk.submit_many(ops)
        time.sleep(0.1)  # popped and waiting
        assert disk.poll() == []
        fe = disk._session.fe if disk._session is not None else None
        assert fe is not None and fe.conn.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        region = P.MemoryRegion(guest_phys_addr=1 << 40, memory_size=extra.size,
                                userspace_addr=extra.uva, mmap_offset=0)
        fe.send(FrontendRequest.ADD_MEM_REG, P.SingleRegion(region=region), [extra.fd])
        got: list[BlkOp] = []
        while len(got) < len(ops):
            more = disk.wait(5.0)
            assert more, "held requests never completed after the memory change"
            got.extend(more)
        assert all(o.ok for o in ops)
        assert disk.read(0, 6 * 4096) == b"".join(bytes([i + 7]) * 4096 for i in range(6))
        assert len(server.sessions_seen) == 1  # the same session throughout
        disk.close()


# -- the commands ----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_blk(img: Path, sock: str, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(img), "--socket",
         sock, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0].decode()
            raise AssertionError(f"vhost-user blk did not start: {out}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_blk_command_serves_and_stops_cleanly(no_leaks: Any, workdir: Path, sig: int) -> None:
    img = make_image(workdir / "disk.raw", 2 * MiB)
    sock = str(workdir / "blk.sock")
    proc = _start_blk(img, sock, "--serial", "cli-disk", "--queues", "2")
    try:
        with VirtioBlkFrontend(sock, num_queues=2) as disk:
            assert disk.get_id() == "cli-disk" and len(disk.queues) == 2
            disk.write(4096, b"c" * 8192)
            disk.flush()
    finally:
        proc.send_signal(sig)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "stopped after 1 session" in out
    assert not os.path.exists(sock)
    assert img.read_bytes()[4096 : 4096 + 8192] == b"c" * 8192


def test_blk_command_refuses_bad_arguments(workdir: Path) -> None:
    img = make_image(workdir / "disk.raw", 1000 * 512 + 100)
    r = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(img), "--socket",
         str(workdir / "x.sock")], capture_output=True, text=True, env=_env(), timeout=30)
    assert r.returncode == 2 and "not a multiple of the 512-byte sector" in r.stderr
    img2 = make_image(workdir / "ok.raw", MiB)
    r = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(img2), "--socket",
         str(workdir / "x.sock"), "--serial", "x" * 30], capture_output=True, text=True,
        env=_env(), timeout=30)
    assert r.returncode == 2 and "longer than 20 bytes" in r.stderr
    assert not (workdir / "x.sock").exists()


def test_blkbench_json_and_verify(workdir: Path) -> None:
    img = make_image(workdir / "disk.raw", 8 * MiB)
    sock = str(workdir / "blk.sock")
    proc = _start_blk(img, sock)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "vhostuser.cli.main", "blkbench", sock, "--rw", "randwrite",
             "--bs", "4k", "--iodepth", "8", "--time", "0.5", "--size", "2m", "--verify",
             "--json"], capture_output=True, text=True, env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["rw"] == "randwrite" and res["iodepth"] == 8 and res["ops"] > 0
        assert res["verify_blocks"] == 512 and res["verify_mismatches"] == 0
        assert res["lat_p50_us"] <= res["lat_p99_us"] <= res["lat_p999_us"]
        r = subprocess.run(
            [sys.executable, "-m", "vhostuser.cli.main", "blkbench", sock, "--rw", "read",
             "--bs", "64k", "--time", "0.3"], capture_output=True, text=True, env=_env(),
            timeout=60)
        assert r.returncode == 0, r.stderr
        assert "IOPS" in r.stdout and "p999" in r.stdout and "\r" not in r.stdout
        for extra in (["--packed"], ["--packed", "--no-inflight"]):
            r = subprocess.run(
                [sys.executable, "-m", "vhostuser.cli.main", "blkbench", sock, "--rw",
                 "randwrite", "--iodepth", "4",
                 "--time", "0.3", "--size", "1m", "--verify", "--json", *extra],
                capture_output=True, text=True, env=_env(), timeout=60)
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["ops"] > 0 and res["verify_mismatches"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_disabled_queue_keeps_its_requests_until_enabled_again(no_leaks: Any,
                                                                 workdir: Path) -> None:
    """vhost-user.rst: a started ring that is disabled is processed without side effects;
    for a disk its requests wait. Here the ring ran (enabled) before it was disabled: the
    requests submitted while disabled must neither complete nor fail, and they complete
    once the ring is enabled again."""
    from vhostuser.protocol import payloads as P
    from vhostuser.protocol.enums import FrontendRequest

    img = make_image(workdir / "disk.raw", 1 * MiB)
    sock = str(workdir / "blk.sock")
    with BlkFile.open(str(img)) as image, serve(sock, image), \
            VirtioBlkFrontend(sock, depth=8) as disk:
        disk.write(0, b"\x5a" * 4096)  # the ring has run enabled
        fe = disk._session.fe if disk._session is not None else None
        assert fe is not None
        fe.send(FrontendRequest.SET_VRING_ENABLE, P.VringState(index=0, num=0))
        ops = [BlkOp("read", 0, length=4096), BlkOp("write", 8192, data=b"\x33" * 4096)]
        disk.submit_many(ops)
        assert disk.wait(1.0) == []  # held, not failed with IOERR
        fe.send(FrontendRequest.SET_VRING_ENABLE, P.VringState(index=0, num=1))
        got: list[BlkOp] = []
        while len(got) < len(ops):
            more = disk.wait(5.0)
            assert more, "the requests never completed after the ring was enabled again"
            got.extend(more)
        assert all(o.ok for o in ops), [o.status for o in ops]
        assert disk.read(8192, 4096) == b"\x33" * 4096
