"""Guest memory that a front-end truncates under our mappings (SIGBUS) ends that connection,
not the process: memfds are sealed against shrinking when we map them, other files are
guarded by the compiled SIGBUS handler (vhostuser.io.memguard)."""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.io import memguard
from vhostuser.io.fdpass import OwnedFd
from vhostuser.io.guestram import GuestRam
from vhostuser.io.mapping import map_region_fd

from .test_net_switch import MAC_A, MAC_B, frames_seq, receive_n, running, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
MAC_C = bytes.fromhex("02000000000c")
SHM = "/dev/shm"

needs_guard = pytest.mark.skipif(
    not memguard.available(),
    reason="the SIGBUS guard (vhostuser._memguard) is not built: install gcc and "
    "python3-dev, then reinstall the package (bash scripts/setup.sh)")


def test_unsealed_memfd_is_sealed_when_mapped(no_leaks: Any) -> None:
    fd = os.memfd_create("guard-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        with map_region_fd(OwnedFd(os.dup(fd)), mmap_offset=0, size=1 << 20) as m:
            assert m.shrink_sealed and m.guard is None
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)
            os.ftruncate(fd, 2 << 20)  # growing is still allowed: only shrinking is sealed
    finally:
        os.close(fd)


@needs_guard
def test_memfd_closed_to_sealing_is_guarded(no_leaks: Any) -> None:
    fd = os.memfd_create("guard-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        with map_region_fd(OwnedFd(os.dup(fd)), mmap_offset=0, size=1 << 20) as m:
            assert not m.shrink_sealed and m.guard is not None
            g = m.guard
        assert g.slot == -1 and m.guard is None  # released with the unmap
    finally:
        os.close(fd)


_TRUNCATE = textwrap.dedent("""
    import os, sys
    from vhostuser.io.fdpass import OwnedFd
    from vhostuser.io.mapping import map_region_fd
    from vhostuser.io import memguard
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.unlink(sys.argv[1])
    os.ftruncate(fd, 1 << 20)
    m = map_region_fd(OwnedFd(os.dup(fd)), mmap_offset=0, size=1 << 20)
    m.buf[0x5000] = 7
    os.ftruncate(fd, 4096)
    lost = []
    if m.guard is not None:
        m.guard.on_fault = lost.append
    print(m.buf[0x5000], m.buf[0x80000], flush=True)  # both pages are gone
    m.buf[0x9000] = 1
    memguard.dispatch()
    print(lost, flush=True)
    m.close()
    print("alive", memguard.dispatch(), flush=True)
""")


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_truncated_file_faults_are_caught(tmp_path: Path, guarded: bool) -> None:
    if guarded and not memguard.available():
        pytest.skip("the SIGBUS guard (vhostuser._memguard) is not built: install gcc and "
                    "python3-dev, then reinstall the package (bash scripts/setup.sh)")
    env = dict(os.environ, PYTHONPATH=SRC)
    if not guarded:
        env["VHOSTUSER_NO_MEMGUARD"] = "1"
    path = os.path.join(SHM, f"vhostuser-guard-test.{os.getpid()}")
    p = subprocess.run([sys.executable, "-c", _TRUNCATE, path], env=env, capture_output=True,
                       text=True, timeout=60)
    if guarded:
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [
            "0 0", "[Fault(count=3, offset=20480)]", "alive 0"], p.stdout
    else:
        # What every back-end without a guard suffers: the whole process dies.
        assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout, p.stderr)
        assert "SIGBUS guard (vhostuser._memguard) is not built" in p.stderr


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _switch(*args: str, guarded: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    if not guarded:
        env["VHOSTUSER_NO_MEMGUARD"] = "1"
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", "switch", *args],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_switch_survives_a_guest_that_truncates_its_memory(
        no_leaks: Any, sock_dir: Path, monkeypatch: pytest.MonkeyPatch, guarded: bool) -> None:
    """A front-end with tmpfs-file guest RAM (-mem-path style) truncates it, then traffic
    is switched towards it: only its port's session ends; the others keep forwarding."""
    if guarded and not memguard.available():
        pytest.skip("the SIGBUS guard (vhostuser._memguard) is not built: install gcc and "
                    "python3-dev, then reinstall the package (bash scripts/setup.sh)")
    a, b, c = (str(sock_dir / f"{n}.sock") for n in "abc")
    with running(_switch("--port", a, "--port", b, "--port", c, guarded=guarded)) as sw:
        wait_until(lambda: all(os.path.exists(x) for x in (a, b, c)) or sw.poll() is not None,
                   20, "sockets")
        assert sw.poll() is None, sw.communicate()
        # Port a's guest RAM is a file on tmpfs, which cannot be sealed.
        with monkeypatch.context() as mp:
            mp.setattr(GuestRam, "memfd",
                       classmethod(lambda cls, size, **kw: GuestRam.file(SHM, size)))
            na = VirtioNetFrontend.connect(a)
        assert na.ram is not None and not na.ram.sealed
        # Our own mapping of it goes too when the file shrinks: guard it in this process.
        own = memguard.guard(na.ram.mmap, mmap.PAGESIZE, "test front-end RAM")
        try:
            with VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(c) as nc:
                fr = frames_seq(10, 64, MAC_A, MAC_B)
                na.send_all(fr)
                assert receive_n(nb, 10) == fr
                nb.send_all(frames_seq(10, 64, MAC_B, MAC_A))
                assert len(receive_n(na, 10)) == 10  # the switch has learnt every port
                nc.send_all(frames_seq(1, 64, MAC_C, MAC_B))
                assert len(receive_n(nb, 1)) == 1

                for nic in (nb, nc):  # what was flooded while the switch learnt
                    nic.recv(timeout=0.5)
                os.ftruncate(na.ram.fd, 0)
                nb.send_all(frames_seq(5, 64, MAC_B, MAC_A))  # into a's lost RX ring
                if not guarded:
                    sw.wait(timeout=30)
                    assert sw.returncode == -signal.SIGBUS
                    return
                # b and c still forward both ways through the same switch process.
                fr = frames_seq(20, 64, MAC_B, MAC_C)
                nb.send_all(fr)
                assert receive_n(nc, 20) == fr
                fr = frames_seq(20, 64, MAC_C, MAC_B)
                nc.send_all(fr)
                assert receive_n(nb, 20) == fr
                assert sw.poll() is None
        finally:
            na.close()
            if own is not None:
                own.release()
        sw.send_signal(signal.SIGTERM)
        _, err = sw.communicate(timeout=20)
        assert sw.returncode == 0, err
        assert "guest memory lost: the front-end shrank the file" in err, err
