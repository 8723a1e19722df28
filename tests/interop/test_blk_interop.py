"""Issue "Blk" acceptance with real peers: our blk front-end against qemu-storage-daemon
and against our back-end (identical data after identical random writes, flush, discard,
write-zeroes), and crash consistency: a back-end SIGKILLed mid-stream at queue depth 32
and restarted, the front-end reconnecting and handing the inflight area back.

Our back-end runs as it ships, ``python -m vhostuser.cli.main blk`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.frontends import BlkOp, VirtioBlkFrontend
from vhostuser.protocol.enums import BlkFeature, ProtocolFeature

from .peers import Peer, QemuStorageDaemon, make_raw_image, require_peer

pytestmark = pytest.mark.interop

MiB = 1 << 20


class OurBlkBackend(Peer):
    """``vhost-user blk`` (this project's back-end) in its own process, logging with -v."""

    name = "vhost-user-blk"
    stop_signal = signal.SIGTERM

    def __init__(self, sock_path: str | os.PathLike[str], image: str | os.PathLike[str], *,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.sock_path = Path(sock_path)
        self.image = Path(image)
        self.extra = extra
        self._cleanup_paths.append(self.sock_path)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(self.image),
                "--socket", str(self.sock_path), "-v", *self.extra]

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_for(r"listening on", timeout)


class QsdUnmap(QemuStorageDaemon):
    """qemu-storage-daemon passing discards to the file (``discard=unmap``; QEMU's default
    ``ignore`` would keep discarded data, which virtio allows but makes images differ)."""

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--blockdev") + 1
        argv[i] += ",discard=unmap"
        return argv


def backend(kind: str, sock: Path, image: Path) -> Peer:
    if kind == "qsd":
        require_peer("qemu-storage-daemon")
        return QsdUnmap(sock, image)
    return OurBlkBackend(sock, image)


def wait_ready(peer: Peer) -> None:
    if isinstance(peer, QemuStorageDaemon | OurBlkBackend):
        peer.wait_ready()


def random_ops(rnd: random.Random, size: int, n: int) -> list[tuple[str, int, int]]:
    """Writes of 4 KiB to 1 MiB at random offsets, flushes, 4 KiB-aligned discards and
    write-zeroes."""
    ops: list[tuple[str, int, int]] = []
    for _ in range(n):
        kind = rnd.choices(["write", "flush", "discard", "write_zeroes"], [12, 1, 2, 2])[0]
        if kind == "write":
            length = rnd.randrange(4096, MiB + 1, 512)
            off = rnd.randrange(0, size - length + 1, 512)
        elif kind == "flush":
            off = length = 0
        else:
            length = rnd.randrange(4096, 1024 * 1024 + 1, 4096)
            off = rnd.randrange(0, size - length + 1, 4096)
        ops.append((kind, off, length))
    return ops


def run_ops(disk: VirtioBlkFrontend, ops: list[tuple[str, int, int]], seed: int,
            model: bytearray) -> None:
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
            unmap = rnd.random() < 0.5
            disk.write_zeroes(off, length, unmap=unmap)
            model[off : off + length] = bytes(length)


def test_identical_data_on_qsd_and_ours(no_leaks: Any, sock_dir: Path) -> None:
    """The same random writes (4 KiB-1 MiB at random offsets), flushes, discards and
    write-zeroes through our front-end give byte-identical images on qemu-storage-daemon
    and on our back-end, equal to the model."""
    require_peer("qemu-storage-daemon")
    size = 32 * MiB
    ops = random_ops(random.Random(20), size, 80)
    images: dict[str, bytes] = {}
    for kind in ("qsd", "ours"):
        image = make_raw_image(sock_dir / f"{kind}.raw", size)
        sock = sock_dir / f"{kind}.sock"
        model = bytearray(size)
        with backend(kind, sock, image) as peer:
            wait_ready(peer)
            with VirtioBlkFrontend(str(sock), depth=16) as disk:
                assert disk.capacity == size
                assert disk.features & BlkFeature.FLUSH
                assert disk.features & BlkFeature.DISCARD
                assert disk.features & BlkFeature.WRITE_ZEROES
                # qemu-storage-daemon 7.2 offers protocol features 0x8f2b: no
                # INFLIGHT_SHMFD (bit 12); ours does.
                assert bool(disk.protocol_features & ProtocolFeature.INFLIGHT_SHMFD) == (
                    kind == "ours")
                run_ops(disk, ops, seed=9, model=model)
                disk.flush()
                assert disk.read(0, size) == model, f"{kind}: read-back differs from model"
                disk.get_id()  # answers (qsd: its default serial; ours: empty)
            images[kind] = image.read_bytes()
            assert images[kind] == model, f"{kind}: image differs from the model"
    assert images["qsd"] == images["ours"]


# -- crash consistency ---------------------------------------------------------------------------


BS = 4096
DEPTH = 32
QUEUE_SIZE = 128


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def any_in_flight(area: mmap.mmap, packed: bool) -> bool:
    """Queue 0 of the inflight area has an entry marked in flight:
    ``DescStateSplit.inflight`` at byte 16 + 16 i, ``DescStatePacked.inflight`` at byte
    32 + 32 i (vhost-user.rst)."""
    if packed:
        return any(area[32 : 32 + 32 * QUEUE_SIZE : 32])
    return any(area[16 : 16 + 16 * QUEUE_SIZE : 16])


def stop_mid_burst(pid: int, area: mmap.mmap, packed: bool, timeout: float = 5.0) -> bool:
    """SIGSTOP the back-end; True if it stopped with requests marked in flight in the
    inflight area (:func:`any_in_flight`), i.e. inside a burst.
    Otherwise it is continued (SIGCONT) and False returned.

    Spinning on the area from here cannot see a burst when both processes share a CPU (the
    back-end runs its whole burst before we are scheduled again); a stopped process can be
    looked at at leisure."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not _stopped(pid):
        assert time.monotonic() < deadline, "the back-end did not stop"
        time.sleep(0.0005)
    if any_in_flight(area, packed):
        return True
    os.kill(pid, signal.SIGCONT)
    return False


@contextlib.contextmanager
def apart(pid: int) -> Iterator[bool]:
    """Run the back-end ``pid`` and this process on different CPUs for a while (True), if
    there are two. On a shared CPU the back-end, woken by our kick, runs its whole burst
    before we get to look at it."""
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    if len(cpus) < 2:
        yield False
        return
    theirs = os.sched_getaffinity(pid)
    os.sched_setaffinity(pid, {cpus[0]})
    os.sched_setaffinity(0, {cpus[1]})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, mine)
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, theirs)


def catch_inside_burst(s: Stream, pid: int, area: mmap.mmap, packed: bool) -> bool:
    """Hand the back-end 32 writes at once and probe it (SIGSTOP, look, SIGCONT) until it
    is caught inside the burst, retrying with new bursts; True if caught (left stopped)."""
    with apart(pid):
        for _attempt in range(100):
            s.drain()
            s.fill()
            for _probe in range(100):
                if stop_mid_burst(pid, area, packed):
                    return True
                if s.disk.queues[0].ring.has_used():
                    break  # that burst is over: try the next one
                time.sleep(0.0001)
    return False


class Stream:
    """Writes of distinct 4 KiB blocks kept at queue depth 32, with the bookkeeping to check
    a crash: what was submitted, acknowledged, and is in flight."""

    def __init__(self, disk: VirtioBlkFrontend, blocks: int, seed: int) -> None:
        self.disk = disk
        self.blocks = blocks
        self.rnd = random.Random(seed)
        self.seq = 0
        self.model: dict[int, bytes] = {}  # block -> last submitted data
        self.acked: dict[int, bytes] = {}  # block -> last acknowledged data
        self.inflight: dict[int, BlkOp] = {}  # block -> op (one at a time per block)
        self.completions: Counter[int] = Counter()  # token -> times completed

    def data(self, block: int) -> bytes:
        return (self.seq.to_bytes(8, "little") + block.to_bytes(8, "little")) * (BS // 16)

    def fill(self) -> None:
        ops: list[BlkOp] = []
        while len(self.inflight) + len(ops) < DEPTH:
            blk = self.rnd.randrange(self.blocks)
            if blk in self.inflight or any(o.offset == blk * BS for o in ops):
                continue
            data = self.data(blk)
            op = BlkOp("write", blk * BS, data=data, token=self.seq)
            self.seq += 1
            self.model[blk] = data
            ops.append(op)
        for op in ops:
            self.inflight[op.offset // BS] = op
        self.disk.submit_many(ops)

    def record(self, ops: list[BlkOp]) -> None:
        for op in ops:
            assert op.ok, f"write at {op.offset} failed: status {op.status}"
            self.completions[op.token] += 1
            blk = op.offset // BS
            assert self.inflight.pop(blk) is op
            assert op.data is not None
            self.acked[blk] = op.data

    def pump(self, n: int) -> None:
        """Keep DEPTH in flight until ``n`` more writes are acknowledged."""
        done = 0
        while done < n:
            self.fill()
            got = self.disk.wait(self.disk.timeout)
            assert got, "no completion"
            self.record(got)
            done += len(got)

    def drain(self) -> None:
        while self.inflight:
            got = self.disk.wait(self.disk.timeout)
            assert got, f"{len(self.inflight)} writes never completed"
            self.record(got)

    def check_image_after_crash(self, image: bytes) -> None:
        """Every acknowledged write is on disk; an in-flight one is old or new, nothing
        else."""
        zero = bytes(BS)
        for blk in range(self.blocks):
            have = image[blk * BS : blk * BS + BS]
            old = self.acked.get(blk, zero)
            op = self.inflight.get(blk)
            if op is None:
                assert have == old, f"block {blk}: an acknowledged write is not on disk"
            else:
                assert have in (old, op.data), f"block {blk}: torn or foreign data"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_crash_consistency(no_leaks: Any, sock_dir: Path, packed: bool) -> None:
    """Stream writes at queue depth 32; SIGKILL the back-end mid-stream and restart it, a
    few times; the front-end reconnects and hands the inflight area back. Every write
    acknowledged before a kill is on disk, every write in flight completes exactly once,
    and the final image is exactly what was written. Split and packed rings (each with
    its own layout of the inflight area)."""
    kind = "ours"
    size = 16 * MiB
    image = make_raw_image(sock_dir / "disk.raw", size)
    sock = sock_dir / "blk.sock"
    peer = backend(kind, sock, image)
    peer.start()
    resubmitted = 0
    kills = 0
    caught = 0  # kills that found the back-end inside a burst
    try:
        wait_ready(peer)
        with contextlib.ExitStack() as stack:
            disk = stack.enter_context(VirtioBlkFrontend(
                str(sock), depth=DEPTH, queue_size=QUEUE_SIZE, max_io=64 * 1024,
                timeout=20.0, reconnect_timeout=30.0, packed=packed))
            assert disk.has_inflight and disk.inflight_fd is not None
            area = mmap.mmap(disk.inflight_fd, os.fstat(disk.inflight_fd).st_size,
                             mmap.MAP_SHARED, mmap.PROT_READ)
            stack.callback(area.close)
            s = Stream(disk, size // BS, seed=17)
            s.pump(200)
            while kills < 5 or (resubmitted == 0 and kills < 25):
                rnd = random.Random(kills)
                s.pump(rnd.randrange(100, 400))
                # Every other kill lands inside a burst (requests popped, not completed);
                # the others at a random moment (before, during or after a burst).
                if kills % 2 == 0:
                    caught += catch_inside_burst(s, peer.pid, area, packed)
                else:
                    s.drain()
                    s.fill()
                    time.sleep(rnd.uniform(0.0, 0.001))
                assert peer.proc is not None
                os.kill(peer.pid, signal.SIGKILL)
                peer.proc.wait()
                kills += 1
                s.record(disk.poll())  # completions published before the kill
                s.check_image_after_crash(image.read_bytes())
                peer.stop()  # reap, remove the stale socket
                resubmitted += sum(int(n) for n in re.findall(r"resubmitting (\d+) requests",
                                                              peer.log_text()))
                peer = backend(kind, sock, image)
                peer.start()
                wait_ready(peer)
                s.pump(50)  # wait() reconnects, the back-end resubmits
            s.drain()
            assert disk.reconnects == kills
            disk.flush()
            assert sorted(s.completions) == list(range(s.seq)), "a write never completed"
            assert set(s.completions.values()) == {1}, "a write completed twice"
            want = bytearray(size)
            for blk, data in s.model.items():
                want[blk * BS : blk * BS + BS] = data
            assert image.read_bytes() == want
            assert disk.read(0, size) == want
        resubmitted += sum(int(n) for n in re.findall(r"resubmitting (\d+) requests",
                                                      peer.log_text()))
    finally:
        peer.stop()
    if len(os.sched_getaffinity(0)) > 1:
        assert caught >= 3, f"only {caught} kills landed inside a burst"
    assert resubmitted > 0, "no kill ever found requests in flight in the back-end"


def test_reconnect_to_a_restarted_qsd(no_leaks: Any, sock_dir: Path) -> None:
    """qemu-storage-daemon has no INFLIGHT_SHMFD, so only a restart with nothing in flight
    is safe: our front-end reconnects (ring bases at used.idx, as QEMU) and goes on."""
    require_peer("qemu-storage-daemon")
    image = make_raw_image(sock_dir / "disk.raw", 8 * MiB)
    sock = sock_dir / "blk.sock"
    peer = backend("qsd", sock, image)
    peer.start()
    try:
        wait_ready(peer)
        with VirtioBlkFrontend(str(sock), depth=8, reconnect_timeout=30.0) as disk:
            assert not disk.has_inflight
            disk.write(0, b"1" * 65536)
            os.kill(peer.pid, signal.SIGKILL)
            assert peer.proc is not None
            peer.proc.wait()
            peer.stop()
            peer = backend("qsd", sock, image)
            peer.start()
            wait_ready(peer)
            op = disk.submit(BlkOp("write", 65536, data=b"2" * 65536))
            (got,) = disk.wait(20.0)
            assert got is op and op.ok and disk.reconnects == 1
            assert disk.read(0, 131072) == b"1" * 65536 + b"2" * 65536
    finally:
        peer.stop()


def test_shutdown_signal_removes_socket(no_leaks: Any, sock_dir: Path) -> None:
    image = make_raw_image(sock_dir / "disk.raw", 4 * MiB)
    sock = sock_dir / "blk.sock"
    with OurBlkBackend(sock, image) as peer:
        peer.wait_ready()
        with VirtioBlkFrontend(str(sock)) as disk:
            disk.write(0, b"s" * 4096)
        assert peer.stop() == 0
    assert not sock.exists()
    assert "stopped after 1 session" in peer.log_text()
    assert shutil.which(sys.executable)
