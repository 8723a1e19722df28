"""Issue 10 acceptance (back-end role of live migration): a QEMU guest on our switch,
pinging another guest, is live-migrated (QMP ``migrate`` over a unix socket) to a
destination QEMU on another port of the same switch.

QEMU 7.2 refuses to migrate a guest whose vhost-user back-end lacks VHOST_F_LOG_ALL /
LOG_SHMFD ("vhost lacks VHOST_F_LOG_ALL feature"), so the migration itself needs the
feature. The destination is started paused (``-S``): once the migration completed, the
source is stopped and the destination not yet running, so both guests' RAM (their memfds,
read through /proc) must be byte for byte the same; a page the switch wrote while RAM was
being copied and did not log would differ (QEMU would not have sent it again). Then the
destination runs, and the pings check the rest: GET_VRING_BASE handed over a consistent
index, and the switch learned the guest's MAC on its new port from QEMU's SEND_RARP
(the other guest's pings are answered from the new place).

A Linux guest re-dirties most receive buffers itself once it has read them, which hides
an unlogged write from the RAM comparison; the second test keeps A from reading them
(interface down) while B floods it, so that the switch's writes are the only ones in those
pages. With logging switched off in the back-end it fails (a few pages differ, run to
run), with logging on they are identical. Per-write marking is proven exhaustively by the
unit and property tests (tests/unit/test_migration_log.py, the engines' differential
tests).

Migration on one host as libvirt does it puts the destination QEMU on the SAME socket path
as the source, while the source runs: the switch port keeps it as a standby and hands the
port over at the switch-over (the same-socket test; the rules are tested without QEMU in
tests/kernel/test_port_handover.py), and a disk's destination is the blk back-end's second
session on the same image (the mid-write test, with the back-end in this process and as
the ``vhost-user blk`` command).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.cli.guest import BlkDisk, GuestVM, NetPort, pattern_bytes, pick_subnet
from vhostuser.devices.blk import BlkDevice
from vhostuser.io.blkfile import BlkFile

# Imported here, not in the test: the in-process back-end's modules make one eventfd for
# the process's lifetime at import (vhostuser.io.memguard), which no_leaks would count.
from vhostuser.io.thread import ServerThread

from .peers import QmpClient, require_peer, wait_for_socket
from .test_blk_interop import OurBlkBackend
from .test_vm_switch_restart import Replies, switch_process

pytestmark = pytest.mark.interop

BOOT_TIMEOUT = 150.0
PINGS = 100
INTERVAL = 0.2
MIGRATE_AFTER = 15
"""Replies each guest must have seen before the migration starts."""
MAX_LOST = 8
"""Pings that may be lost per direction (the migration's downtime, under TCG on a loaded
machine, plus the RARP's way through the switch): a handful, not a run to the end."""
MEM_MB = 128
FLOOD = 1250
"""Bigger pings B sends A meanwhile, 50 a second (25 s, the whole run)."""
MIGRATE_BANDWIDTH = 48 << 20
"""Bytes per second QEMU may send: 128 MiB of guest RAM take about two seconds."""
@contextlib.contextmanager
def _sockets(*paths: str) -> Iterator[None]:
    """Wait for the switch to listen on every path (QEMU connects once, at start)."""
    for p in paths:
        wait_for_socket(p, 30.0)
    yield


def _wait(cond: Any, timeout: float, what: str, tail: Any) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail()}")
        time.sleep(0.05)


def _guest_ram(pid: int, size: int) -> bytes:
    """The guest RAM of QEMU ``pid``: its ``memory-backend-memfd`` (a memfd of ``size``
    bytes) read through /proc/PID/fd."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if (os.readlink(entry).startswith("/memfd:memory-backend-memfd")
                    and entry.stat().st_size == size):
                with open(entry, "rb") as f:
                    return f.read()
    raise AssertionError(f"QEMU {pid} has no memory-backend-memfd of {size} bytes")


def _differing_pages(a: bytes, b: bytes) -> list[int]:
    """4 KiB page numbers where ``a`` and ``b`` differ (compared 1 MiB at a time)."""
    assert len(a) == len(b), (len(a), len(b))
    out: list[int] = []
    step = 1 << 20
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            out += [p // 4096 for p in range(off, min(off + step, len(a)), 4096)
                    if a[p:p + 4096] != b[p:p + 4096]]
    return out


def _migrate(qmp_path: Path, uri: str, timeout: float,
             bandwidth: int = MIGRATE_BANDWIDTH) -> dict[str, Any]:
    """Run ``migrate`` on the source's QMP socket and wait for it to complete; return the
    last ``query-migrate`` answer.

    Raises:
        AssertionError: it failed, was cancelled or did not complete in ``timeout`` s.
    """
    with QmpClient(qmp_path, timeout=30.0) as qmp:
        # A modest bandwidth: copying the guest's RAM takes a second or two, so that the
        # switch writes frames into it meanwhile (which only the dirty log tells QEMU of).
        qmp.execute("migrate-set-parameters", **{"max-bandwidth": bandwidth,
                                                 "downtime-limit": 300})
        qmp.execute("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise AssertionError(f"migration {status}: {json.dumps(info)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"migration not complete after {timeout} s: "
                                     f"{json.dumps(info)}")
            time.sleep(0.1)


def test_guest_migrates_to_another_switch_port(no_leaks: Any, sock_dir: Path) -> None:
    """Guest A (port vm1) and guest B (port vm2) ping each other, 5 pings a second. Once
    both saw 15 replies, A is live-migrated to a destination QEMU waiting on port
    vm1-dest. The migration completes; each direction loses at most a handful of pings;
    both pings run to their last sequence number, A's replies now arriving on the
    destination's console and B's requests reaching A at its new port, which the switch
    learned from the destination's RARP announcement."""
    require_peer("qemu")
    require_peer("guest")
    net = pick_subnet()
    p1, p2, p3 = (str(sock_dir / f"p{i}.sock") for i in (1, 2, 3))
    mig = sock_dir / "mig.sock"
    stats = sock_dir / "stats.json"
    args = ["--port", f"{p1},name=vm1", "--port", f"{p2},name=vm2",
            "--port", f"{p3},name=vm1-dest", "--stats-json", str(stats),
            "--stats-interval", "0.5", "-v"]
    ra, rb = Replies(), Replies()
    src = GuestVM(nets=[NetPort(socket=p1)], end="shell", on_line=ra.on_line, mem_mb=MEM_MB,
                  params={"ip": f"{net}.1/24"}, qmp=sock_dir / "src.qmp", name="vm1-src")
    # The destination is built like the source: the same NIC (MAC), memory and guest.
    dst = GuestVM(nets=[NetPort(socket=p3, mac=src.nets[0].mac)], end="shell",
                  on_line=ra.on_line, mem_mb=MEM_MB, params={"ip": f"{net}.1/24"},
                  qmp=sock_dir / "dst.qmp", name="vm1-dst", incoming=f"unix:{mig}",
                  extra_args=["-S"])  # stays paused after the migration, until "cont"
    with switch_process(args, sock_dir / "switch.log") as sw, \
            _sockets(p1, p2, p3), \
            GuestVM(nets=[NetPort(socket=p2)], end="shell", on_line=rb.on_line,
                    mem_mb=MEM_MB, params={"ip": f"{net}.2/24"}) as b, src, dst:
        def tail() -> str:
            return (f"--- switch ---\n{sw.tail()}\n--- source ---\n{src.tail(15)}\n"
                    f"--- destination ---\n{dst.tail(15)}\n--- B ---\n{b.tail(10)}")

        for vm, peer in ((src, f"{net}.2"), (b, f"{net}.1")):
            first = vm.run(f"vu_ping {peer} 2 60 0.2", timeout=BOOT_TIMEOUT)
            reach = [r for r in first.results if r.name == "reach"]
            assert reach and reach[0]["ok"] == "1", first.output + tail()
        ra.at.clear()
        rb.at.clear()
        ping = f"ping -c {PINGS} -i {INTERVAL} -W 2 {{peer}}; true"
        ca = src.submit(ping.format(peer=f"{net}.2"))
        # B also floods A with bigger pings (50 a second, quiet): many frames land in A's
        # receive buffers while its RAM is copied, each a page only the dirty log names.
        cb = b.submit(f"ping -q -s 1000 -i 0.02 -c {FLOOD} {net}.1 >/dev/null 2>&1 & "
                      + ping.format(peer=f"{net}.1") + "; wait")
        _wait(lambda: ra.seen() >= MIGRATE_AFTER and rb.seen() >= MIGRATE_AFTER, 90,
              "replies before the migration", tail)
        t_start = time.monotonic()
        info = _migrate(sock_dir / "src.qmp", f"unix:{mig}", 120.0)
        assert src.proc is not None and dst.proc is not None
        with QmpClient(sock_dir / "dst.qmp", timeout=30.0) as qmp:
            _wait(lambda: qmp.execute("query-status")["status"] == "paused", 30,
                  "the destination to hold the migrated guest", tail)
            ram_src = _guest_ram(src.proc.pid, MEM_MB << 20)
            ram_dst = _guest_ram(dst.proc.pid, MEM_MB << 20)
            qmp.execute("cont")
        t_done = time.monotonic()
        differ = _differing_pages(ram_src, ram_dst)
        del ram_src, ram_dst
        dst.take_over(src)
        done_a = dst.wait_command(ca, PINGS * INTERVAL + 90)
        done_b = b.wait_command(cb, PINGS * INTERVAL + 90)
        ports = {p["name"]: p for p in json.loads(stats.read_text())["ports"]}
        switch_log = (sock_dir / "switch.log").read_text(errors="replace")
        assert sw.alive(), tail()
        assert dst.poweroff() == 0, tail()
        assert b.poweroff() == 0, tail()
    print(f"migration: {t_done - t_start:.2f} s, downtime {info.get('downtime')} ms, "
          f"ram {json.dumps(info.get('ram', {}))}")
    # Every page written by anyone (the guest, QEMU, our switch) reached the destination.
    assert differ == [], f"{len(differ)} guest pages differ after the migration: {differ[:40]}"
    mac = src.nets[0].mac
    assert mac is not None
    print("\n".join(line for line in switch_log.splitlines() if "dirty" in line))
    # The source's session logged its writes while RAM was copied (LOG_ALL + SET_LOG_BASE).
    assert re.search(r"p1\.sock#\d+: dirty logging on", switch_log), switch_log
    # QEMU's announcement after the migration reached the switch on the new port.
    assert re.search(rf"vm1-dest: RARP announcement for {mac}", switch_log, re.I), switch_log
    assert ports["vm1-dest"]["rx_frames"] > 0 and ports["vm1-dest"]["tx_frames"] > 0, ports
    for name, replies, done in (("A->B", ra, done_a), ("B->A", rb, done_b)):
        got = sorted(replies.at)
        missing = sorted(set(range(PINGS)) - set(got))
        late = replies.after(t_done)
        print(f"{name}: {len(got)}/{PINGS} replies, lost {missing}, {len(late)} after the "
              "migration")
        assert f"{PINGS} packets transmitted" in done.output, done.output
        assert len(missing) <= MAX_LOST, f"{name}: lost {missing}\n{done.output}"
        assert PINGS - 1 in replies.at, f"{name}: pings did not go on to the end"
        # Replies kept coming from the new place, for a good while after the switch-over.
        assert len(late) >= 10, f"{name}: only {late} after the migration"


def _port(stats: Path, name: str) -> dict[str, Any]:
    """Port ``name`` as the switch's stats file describes it now."""
    for p in json.loads(stats.read_text())["ports"]:
        if p["name"] == name:
            return dict(p)
    raise AssertionError(f"no port {name} in {stats}")


SAME_PINGS = 150
"""Pings each way in the same-socket test (30 s): they outlast a destination started and
killed, a second one started, the migration, and the source quitting."""


def test_guest_migrates_to_a_destination_on_the_same_socket(no_leaks: Any,
                                                            sock_dir: Path) -> None:
    """Live migration on one host as libvirt does it: the destination QEMU connects to the
    SAME switch socket as the source, while the source runs. Guest A (port vm1) and guest
    B (port vm2) ping each other, 5 pings a second. A first destination QEMU (-incoming)
    connects to vm1's socket, stands by, and is SIGKILLed: A's pings are not disturbed.
    A second destination connects and stands by; A is migrated to it. The switch hands vm1
    over when the destination starts its rings (the source stopped its own), the guest
    carries on there with at most a handful of pings lost each way, and its replies come
    from the destination. Then the source QEMU (left in "postmigrate", still connected)
    quits, and the pings go on to the end."""
    require_peer("qemu")
    require_peer("guest")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")
    mig1, mig2 = sock_dir / "mig1.sock", sock_dir / "mig2.sock"
    stats = sock_dir / "stats.json"
    args = ["--port", f"{p1},name=vm1", "--port", f"{p2},name=vm2", "--stats-json",
            str(stats), "--stats-interval", "0.2", "-v"]
    ra, rb = Replies(), Replies()
    src = GuestVM(nets=[NetPort(socket=p1)], end="shell", on_line=ra.on_line, mem_mb=MEM_MB,
                  params={"ip": f"{net}.1/24"}, qmp=sock_dir / "src.qmp", name="vm1-src")
    mac = src.nets[0].mac
    assert mac is not None

    def destination(n: int, mig: Path) -> GuestVM:
        # Built like the source, on the same socket path: libvirt's command line for a
        # migration on one host.
        return GuestVM(nets=[NetPort(socket=p1, mac=mac)], end="shell", on_line=ra.on_line,
                       mem_mb=MEM_MB, params={"ip": f"{net}.1/24"},
                       qmp=sock_dir / f"dst{n}.qmp", name=f"vm1-dst{n}",
                       incoming=f"unix:{mig}")

    doomed, dst = destination(1, mig1), destination(2, mig2)
    with switch_process(args, sock_dir / "switch.log") as sw, _sockets(p1, p2), \
            GuestVM(nets=[NetPort(socket=p2)], end="shell", on_line=rb.on_line,
                    mem_mb=MEM_MB, params={"ip": f"{net}.2/24"}) as b, src:
        def tail() -> str:
            return (f"--- switch ---\n{sw.tail()}\n--- source ---\n{src.tail(15)}\n"
                    f"--- destination ---\n{dst.tail(15)}\n--- B ---\n{b.tail(10)}")

        def standby() -> Any:
            return _port(stats, "vm1")["standby"]

        for vm, peer in ((src, f"{net}.2"), (b, f"{net}.1")):
            first = vm.run(f"vu_ping {peer} 2 60 0.2", timeout=BOOT_TIMEOUT)
            reach = [r for r in first.results if r.name == "reach"]
            assert reach and reach[0]["ok"] == "1", first.output + tail()
        ra.at.clear()
        rb.at.clear()
        ping = f"ping -c {SAME_PINGS} -i {INTERVAL} -W 2 {{peer}}; true"
        ca = src.submit(ping.format(peer=f"{net}.2"))
        cb = b.submit(ping.format(peer=f"{net}.1"))
        _wait(lambda: ra.seen() >= MIGRATE_AFTER and rb.seen() >= MIGRATE_AFTER, 90,
              "replies before the migration", tail)

        # A destination that never receives the guest: it stands by, then dies.
        with doomed:
            _wait(lambda: standby() is not None, 60, "the first destination to stand by",
                  tail)
            killed_at = ra.seen()
            assert doomed.proc is not None
            doomed.proc.kill()
        _wait(lambda: standby() is None, 30, "the killed destination to be forgotten", tail)
        _wait(lambda: ra.seen() >= killed_at + 5, 30, "pings after the kill", tail)

        with dst:
            _wait(lambda: standby() is not None, 60, "the destination to stand by", tail)
            assert _port(stats, "vm1")["handovers"] == 0
            t_start = time.monotonic()
            info = _migrate(sock_dir / "src.qmp", f"unix:{mig2}", 120.0)
            t_done = time.monotonic()
            dst.take_over(src)
            _wait(lambda: len(ra.after(t_done)) >= 10 and len(rb.after(t_done)) >= 10, 60,
                  "replies from the destination", tail)
            after_migration = _port(stats, "vm1")
            with QmpClient(sock_dir / "src.qmp", timeout=30.0) as qmp:
                src_status = qmp.execute("query-status")["status"]
            src.stop()  # the source QEMU quits: libvirt's last step
            t_quit = time.monotonic()
            _wait(lambda: standby() is None, 30, "the source to be forgotten", tail)
            done_a = dst.wait_command(ca, SAME_PINGS * INTERVAL + 90)
            done_b = b.wait_command(cb, SAME_PINGS * INTERVAL + 90)
            final = _port(stats, "vm1")
            switch_log = (sock_dir / "switch.log").read_text(errors="replace")
            assert sw.alive(), tail()
            assert dst.poweroff() == 0, tail()
        assert b.poweroff() == 0, tail()
    print(f"migration: {t_done - t_start:.2f} s, downtime {info.get('downtime')} ms")
    print("\n".join(line for line in switch_log.splitlines()
                    if "vm1:" in line and ("front-end" in line or "handover" in line
                                          or "RARP" in line)))
    assert src_status == "postmigrate", src_status
    # The killed destination was the standby; the source kept the port meanwhile.
    assert re.search(r"vm1: standby front-end p1\.sock#1 gone", switch_log), switch_log
    # The switch-over: the destination took the port from the source, once.
    assert re.search(r"vm1: handover #1: p1\.sock#2 takes the port from p1\.sock#0: it "
                     r"started its receive queue", switch_log), switch_log
    assert re.search(r"vm1: standby front-end p1\.sock#0 gone", switch_log), switch_log
    assert "refusing" not in switch_log and "handover #2" not in switch_log, switch_log
    assert re.search(rf"vm1: RARP announcement for {mac}", switch_log, re.I), switch_log
    assert after_migration["session"] == "p1.sock#2", after_migration
    assert after_migration["standby"]["session"] == "p1.sock#0", after_migration
    assert after_migration["standby"]["running"] is False, after_migration
    assert final["session"] == "p1.sock#2" and final["standby"] is None, final
    assert final["handovers"] == 1 and final["sessions"] == 3, final
    for name, replies, done in (("A->B", ra, done_a), ("B->A", rb, done_b)):
        got = sorted(replies.at)
        missing = sorted(set(range(SAME_PINGS)) - set(got))
        print(f"{name}: {len(got)}/{SAME_PINGS} replies, lost {missing}, "
              f"{len(replies.after(t_done))} after the migration, "
              f"{len(replies.after(t_quit))} after the source quit")
        assert f"{SAME_PINGS} packets transmitted" in done.output, done.output
        assert len(missing) <= MAX_LOST, f"{name}: lost {missing}\n{done.output}"
        assert SAME_PINGS - 1 in replies.at, f"{name}: pings did not go on to the end"
        assert len(replies.after(t_quit)) >= 10, f"{name}: few replies after the quit"


def _port_tx(stats: Path, name: str) -> int:
    """Frames the switch has put into port ``name``'s guest so far (its stats file)."""
    for p in json.loads(stats.read_text())["ports"]:
        if p["name"] == name:
            return int(p["tx_frames"])
    raise AssertionError(f"no port {name} in {stats}")


def test_frames_the_guest_has_not_read_yet_reach_the_destination(no_leaks: Any,
                                                                 sock_dir: Path) -> None:
    """The writes only the dirty log can tell QEMU about, made deterministic: guest A
    takes its interface down (its receive buffers stay posted, nothing reads them) and B,
    with a static neighbour entry for A, floods it with 1000-byte pings, which the switch
    writes into A's receive buffers while A's RAM is being copied. The guest never touches
    those pages, so only the log makes QEMU send them again: after the migration the
    source's and the destination's RAM must be identical, then A's interface comes up on
    the destination and reaches B."""
    require_peer("qemu")
    require_peer("guest")
    net = pick_subnet()
    p1, p2, p3 = (str(sock_dir / f"p{i}.sock") for i in (1, 2, 3))
    mig = sock_dir / "mig.sock"
    stats = sock_dir / "stats.json"
    args = ["--port", f"{p1},name=vm1", "--port", f"{p2},name=vm2",
            "--port", f"{p3},name=vm1-dest", "--stats-json", str(stats),
            "--stats-interval", "0.2", "-v"]
    src = GuestVM(nets=[NetPort(socket=p1)], end="shell", mem_mb=MEM_MB,
                  params={"ip": f"{net}.1/24"}, qmp=sock_dir / "src.qmp", name="vm1-src")
    mac = src.nets[0].mac
    assert mac is not None
    dst = GuestVM(nets=[NetPort(socket=p3, mac=mac)], end="shell", mem_mb=MEM_MB,
                  params={"ip": f"{net}.1/24"}, qmp=sock_dir / "dst.qmp", name="vm1-dst",
                  incoming=f"unix:{mig}", extra_args=["-S"])
    with switch_process(args, sock_dir / "switch.log") as sw, _sockets(p1, p2, p3), \
            GuestVM(nets=[NetPort(socket=p2)], end="shell", mem_mb=MEM_MB,
                    params={"ip": f"{net}.2/24", "arp": f"{net}.1@{mac}"}) as b, src, dst:
        def tail() -> str:
            return (f"--- switch ---\n{sw.tail()}\n--- source ---\n{src.tail(15)}\n"
                    f"--- destination ---\n{dst.tail(15)}\n--- B ---\n{b.tail(10)}")

        first = src.run(f"vu_ping {net}.2 2 60 0.2", timeout=BOOT_TIMEOUT)
        assert [r["ok"] for r in first.results if r.name == "reach"] == ["1"], first.output
        b.wait_ready(BOOT_TIMEOUT)
        assert src.run("ip link set eth0 down").rc == 0, tail()
        flood = b.submit(f"ping -q -s 1000 -i 0.02 -c 500 {net}.1 >/dev/null 2>&1; true")
        before = _port_tx(stats, "vm1")
        _wait(lambda: _port_tx(stats, "vm1") >= before + 10, 30, "the flood to reach A", tail)
        at_start = _port_tx(stats, "vm1")
        # Slower still: more frames land in pages QEMU has already sent (some 150 in all,
        # within the 256 receive buffers A posted).
        _migrate(sock_dir / "src.qmp", f"unix:{mig}", 120.0, bandwidth=24 << 20)
        assert src.proc is not None and dst.proc is not None
        with QmpClient(sock_dir / "dst.qmp", timeout=30.0) as qmp:
            _wait(lambda: qmp.execute("query-status")["status"] == "paused", 30,
                  "the destination to hold the migrated guest", tail)
            ram_src = _guest_ram(src.proc.pid, MEM_MB << 20)
            ram_dst = _guest_ram(dst.proc.pid, MEM_MB << 20)
            qmp.execute("cont")
        written = _port_tx(stats, "vm1") - at_start
        differ = _differing_pages(ram_src, ram_dst)
        del ram_src, ram_dst
        dst.take_over(src)
        again = dst.run(f"ip link set eth0 up; vu_ping {net}.2 2 60 0.2", timeout=90)
        b.wait_command(flood, 60)
        assert dst.poweroff() == 0, tail()
        assert b.poweroff() == 0, tail()
    print(f"frames written into A's unread buffers during the migration: {written}; "
          f"pages differing: {len(differ)}")
    assert written >= 10, "the flood did not overlap the migration"
    assert differ == [], f"{len(differ)} guest pages differ after the migration: {differ[:40]}"
    assert [r["ok"] for r in again.results if r.name == "reach"] == ["1"], again.output


BLK_DISK = 16 << 20
BLK_LATENCY = 0.2
"""Seconds each burst of requests waits in our blk back-end. With eight writers at once
some requests are always held there, so the source's GET_VRING_BASE finds some."""
BLK_WRITERS = 8
_BLK_SCRIPT = r"""
blocks=$(( $(blockdev --getsz /dev/vda) / 128 ))
vu_pattern 4242 $((blocks * 128)) > /tmp/pattern
per=$((blocks / WRITERS))
i=0
while [ $i -lt WRITERS ]; do
  dd if=/tmp/pattern of=/dev/vda bs=64k skip=$((i * per)) seek=$((i * per)) count=$per \
    iflag=fullblock oflag=direct conv=notrunc 2>/dev/null &
  i=$((i + 1))
done
wait
rm -f /tmp/pattern
sync; blockdev --flushbufs /dev/vda
vu_blk_check vda 4242
""".replace("WRITERS", str(BLK_WRITERS))


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_guest_writing_its_disk_is_migrated_mid_write(no_leaks: Any, sock_dir: Path,
                                                      backend: str) -> None:
    """A guest writes a known pattern over its whole vhost-user-blk disk (O_DIRECT, 64 KiB
    at a time, eight writers at once) on our blk back-end, slowed by a latency so that
    requests are always held there. Mid-write the guest is live-migrated to a destination
    QEMU connected to the same back-end socket (a second session on the same image). The
    source's GET_VRING_BASE completes the requests the back-end still holds before
    answering, so the destination resumes at a consistent index: the write finishes there,
    the guest reads back exactly the pattern, and so does the host from the image.

    The back-end is a ``ServerThread`` in this process (``thread``) or the ``vhost-user
    blk`` command (``process``), which serves the destination as its second session
    (--sessions 2, the default) and must not take it for two drivers at once."""
    require_peer("qemu")
    require_peer("guest")
    img = sock_dir / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(BLK_DISK)
    sock = str(sock_dir / "blk.sock")
    mig = sock_dir / "mig.sock"
    want = pattern_bytes(4242, BLK_DISK // 512)
    src = GuestVM(blks=[BlkDisk(socket=sock)], end="shell", mem_mb=MEM_MB,
                  qmp=sock_dir / "src.qmp", name="blk-src")
    dst = GuestVM(blks=[BlkDisk(socket=sock)], end="shell", mem_mb=MEM_MB,
                  qmp=sock_dir / "dst.qmp", name="blk-dst", incoming=f"unix:{mig}")
    with contextlib.ExitStack() as stack:
        server: ServerThread | None = None
        command: OurBlkBackend | None = None
        if backend == "thread":
            image = stack.enter_context(BlkFile.open(str(img)))
            server = stack.enter_context(
                ServerThread(sock, lambda: BlkDevice(image, latency=BLK_LATENCY)))
        else:
            command = stack.enter_context(OurBlkBackend(
                sock, img, extra=("--latency", str(int(BLK_LATENCY * 1000)))))
            command.wait_ready()
        stack.enter_context(src)
        stack.enter_context(dst)

        def tail() -> str:
            text = f"--- source ---\n{src.tail(15)}\n--- destination ---\n{dst.tail(15)}"
            if command is not None:
                text += f"\n--- vhost-user blk ---\n{command.log_text()[-3000:]}"
            return text

        src.wait_ready(BOOT_TIMEOUT)
        cid = src.submit(_BLK_SCRIPT)

        def progress() -> int:
            data = img.read_bytes()
            return sum(data[o:o + 65536] == want[o:o + 65536]
                       for o in range(0, BLK_DISK, 65536))

        _wait(lambda: progress() >= 16, 120, "the guest to be writing", tail)
        at_start = progress()
        info = _migrate(sock_dir / "src.qmp", f"unix:{mig}", 120.0)
        at_end = progress()
        dst.take_over(src)
        done = dst.wait_command(cid, 120)
        assert dst.poweroff() == 0, tail()
        if server is not None:
            assert server.errors == []
            held = sum(d.stats["completed-at-stop"] for d in server.devices
                       if isinstance(d, BlkDevice))
        else:
            assert command is not None
            src.stop()
            assert command.stop() == 0, tail()
            text = command.log_text()
            held = sum(int(n) for n in re.findall(
                r"stopping; (\d+) delayed requests completed first", text))
            # The destination was served as the second session, beside the source.
            assert re.search(r"front-end connected \(blk\.sock#1\) while blk\.sock#0 is "
                             "connected", text), text
            assert "refusing" not in text and "two drivers" not in text, text
    print(f"migrated after {at_start} of {BLK_DISK // 65536} blocks written, {at_end} at "
          f"the end ({info.get('total-time')} ms); {done.output.strip()[-300:]}")
    assert at_start < BLK_DISK // 65536, "the write was over before the migration"
    assert held >= 1, "no request was held at the source's GET_VRING_BASE"
    results = {r.name: r for r in done.results}
    assert results["blkcheck"]["match"] == "1", done.output
    assert img.read_bytes() == want
