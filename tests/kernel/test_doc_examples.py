"""The examples under docs/ work: the entropy device of ``docs/writing-a-device.md``
(``docs/examples/rng_device.py``) served by ``BackendServer`` and driven by our front-end,
over split and packed rings, with and without EVENT_IDX; the guide's code blocks are the
example's own code."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import VirtioFeature

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
GUIDE = ROOT / "docs" / "writing-a-device.md"

# docs/examples is not a package: import the example as the top-level module it is (mypy
# checks it as such, see [tool.mypy] files).
sys.path.insert(0, str(EXAMPLES))
try:
    import rng_device
finally:
    sys.path.remove(str(EXAMPLES))


class CountingSource:
    """A predictable entropy source: byte ``k`` of everything given is ``k & 0xFF``."""

    def __init__(self) -> None:
        self.given = 0

    def __call__(self, n: int) -> bytes:
        out = bytes((self.given + i) & 0xFF for i in range(n))
        self.given += n
        return out


def expected(sizes: list[int]) -> list[bytes]:
    """What a fresh :class:`CountingSource` gives for buffers of ``sizes``, in order."""
    source = CountingSource()
    return [source(n) for n in sizes]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-doc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "flags"])
def test_rng_device_fills_buffers(no_leaks: Any, sock_dir: Path, packed: bool,
                                  event_idx: bool) -> None:
    sock = str(sock_dir / "rng.sock")
    source = CountingSource()
    with ServerThread(sock, lambda: rng_device.RngDevice(source)) as srv, \
            rng_device.EntropyClient(sock, packed=packed, event_idx=event_idx) as client:
        assert bool(client.features & VirtioFeature.RING_PACKED) == packed
        assert bool(client.features & VirtioFeature.RING_EVENT_IDX) == event_idx
        batches = [[16], [64, 1, 4096], [32] * 40, [8] * 64]  # 40 + 64 entries: wraps
        sizes = [n for batch in batches for n in batch]
        got = [data for batch in batches for data in client.read(batch)]
        assert got == expected(sizes)
        device = srv.devices[-1]
        assert isinstance(device, rng_device.RngDevice)
        assert srv.call(lambda: (device.requests, device.bytes_given)) == (len(sizes),
                                                                          sum(sizes))
    assert not srv.errors


def test_rng_device_caps_one_buffer(no_leaks: Any, sock_dir: Path) -> None:
    """A buffer larger than ``max_fill`` gets ``max_fill`` bytes (the device may use less
    than the whole buffer), and the driver sees the length written."""
    sock = str(sock_dir / "rng.sock")
    source = CountingSource()
    with ServerThread(sock, lambda: rng_device.RngDevice(source, max_fill=100)) as srv, \
            rng_device.EntropyClient(sock) as client:
        assert client.read([1000, 50]) == expected([100, 50])
    assert not srv.errors


def test_readable_buffer_breaks_only_the_ring(no_leaks: Any, sock_dir: Path) -> None:
    """A driver-readable buffer is a guest fault: the queue is marked broken with the
    device's message, the session stays up (GET_VRING_BASE still answers)."""
    sock = str(sock_dir / "rng.sock")
    with ServerThread(sock, lambda: rng_device.RngDevice(CountingSource())) as srv, \
            rng_device.EntropyClient(sock) as client:
        ring = client.ring
        assert ring is not None
        ring.add([(client.data_gpa, 16, False)], 0)  # device-readable: not allowed
        ring.publish()
        client.fe.kick(0)
        session = srv.sessions_seen[-1]
        deadline = time.monotonic() + 5
        while (broken := srv.call(lambda: session.conn.vrings[0].broken)) is None:
            assert time.monotonic() < deadline, "the ring was never marked broken"
            time.sleep(0.01)
        assert "device-readable" in broken
        assert not srv.call(lambda: session.closed)
        client.fe.stop_vring(0)
    assert not srv.errors


def _reap_one(client: Any, timeout: float = 5.0) -> tuple[int, int]:
    """Wait for the one buffer in flight to be used: (token, bytes written)."""
    ring = client.ring
    deadline = time.monotonic() + timeout
    while not (used := ring.reap()):
        assert time.monotonic() < deadline, "the buffer was never used"
        time.sleep(0.005)
    assert len(used) == 1
    token, written = used[0]
    return int(token), int(written)


def _until(srv: ServerThread, probe: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not srv.call(probe):
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_disabled_ring_keeps_its_buffers(no_leaks: Any, sock_dir: Path) -> None:
    """A ring started but not yet enabled (as QEMU starts them) is not taken from, nor is
    one disabled after it ran: its buffers wait, untouched, until it is enabled again."""
    sock = str(sock_dir / "rng.sock")
    source = CountingSource()
    with ServerThread(sock, lambda: rng_device.RngDevice(source)) as srv, \
            rng_device.EntropyClient(sock, enabled=False) as client:
        ring = client.ring
        assert ring is not None
        session = srv.sessions_seen[-1]
        device = srv.devices[-1]
        assert isinstance(device, rng_device.RngDevice)
        ring.add([(client.data_gpa, 8, True)], 0)
        ring.publish()
        client.fe.kick(0)
        # The kick is handled in one reactor callback: once the ring is started, any burst
        # that kick could cause has run.
        _until(srv, lambda: session.conn.vrings[0].started, "the ring never started")
        assert srv.call(lambda: device.requests) == 0
        assert not ring.has_used()
        client.set_enabled(True)
        assert _reap_one(client) == (0, 8)

        client.set_enabled(False)
        ring.add([(client.data_gpa, 16, True)], 1)
        ring.publish()
        client.fe.kick(0)
        for _ in range(3):  # let the reactor handle the kick
            srv.call(lambda: None)
        # consumes() is asked again: no burst runs, the buffer waits on the ring.
        assert srv.call(lambda: (device.requests, len(device.held))) == (1, 0)
        assert not ring.has_used()
        client.set_enabled(True)
        assert _reap_one(client) == (1, 16)
        assert srv.call(lambda: (device.requests, device.held)) == (2, [])
        data = bytes(client.ram.buf[client.data_gpa:client.data_gpa + 16])
        assert data == expected([8, 16])[1]
    assert not srv.errors


def test_command_line_serves_and_reads(sock_dir: Path) -> None:
    """``rng_device.py serve`` in a process of its own, ``read`` from another; SIGTERM
    stops the server and removes its socket."""
    sock = str(sock_dir / "rng.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script = str(EXAMPLES / "rng_device.py")
    server = subprocess.Popen([sys.executable, script, "serve", "--socket", sock], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 8
        while not os.path.exists(sock):
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.02)
        for extra in ([], ["--packed"]):
            out = subprocess.run([sys.executable, script, "read", "--socket", sock,
                                  "--bytes", "24", *extra], env=env, capture_output=True,
                                 text=True, timeout=15, check=True).stdout
            assert re.fullmatch(r"[0-9a-f]{48}\n", out), out
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=15)
    assert server.returncode == 0, err
    assert not os.path.exists(sock)


def test_guide_shows_the_example_code() -> None:
    """Every ``python`` block of the guide that says it is from the example is a verbatim
    part of it, so the guide cannot drift from the code CI runs."""
    example = (EXAMPLES / "rng_device.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    quoted = [b for b in blocks if b.startswith("# from docs/examples/rng_device.py\n")]
    assert len(quoted) >= 2, "the guide quotes the device and the driver"
    for block in quoted:
        body = block.split("\n", 1)[1]
        assert body in example, f"not in docs/examples/rng_device.py:\n{body}"
