"""A driver and a device in two processes over a memfd, kicking and calling through eventfds.

The driver (a forked child) adds buffers carrying sequence numbers, publishes in batches and
kicks only when the device's suppression state asks for it; it reaps with interrupts
suppressed and re-enables them (re-checking after the full barrier) before it sleeps on the
call eventfd. The device (this process) sleeps on the kick eventfd, polls with kicks
suppressed, re-enables them and re-checks before sleeping. Both check every sequence
number, in order, exactly once, and the device's reply in each buffer. A lost wake-up
shows up as a sleeper whose poll times out: more than 10 s without an eventfd means a stall
and the test fails.

N is 5_000_000 buffers per EVENT_IDX case (the issue's acceptance run; about 25 s each
here); set ``VHOSTUSER_TWOPROC_N`` to change it, e.g. to 200000 for a quick local run.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import time
import warnings

import pytest

from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    Chain,
    PackedDeviceRing,
    PackedDriverRing,
    SplitDeviceRing,
    SplitDriverRing,
    packed_layout,
    run_burst,
    split_layout,
)

N = int(os.environ.get("VHOSTUSER_TWOPROC_N", "5000000"))
STALL_S = 10.0
QSIZE = 256
DATA = 0x10000  # QSIZE slots of 16 bytes: 8 readable (sequence), 8 writable (reply)
MEM_SIZE = 0x20000
MAGIC = 0x5A5A_A5A5_0F0F_F0F0
BATCH = 64  # buffers added per publish
BUDGET = 256  # chains per device burst

_Q = struct.Struct("<Q")

Driver = SplitDriverRing[int] | PackedDriverRing[int]
Device = SplitDeviceRing | PackedDeviceRing


def _wait(fds: list[int], what: str) -> list[int]:
    """Poll ``fds``; fail after STALL_S seconds with nothing readable."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    ready = p.poll(STALL_S * 1000)
    if not ready:
        raise AssertionError(f"stall: {what} waited {STALL_S:.0f} s for an eventfd")
    return [fd for fd, _ in ready]


def _driver(drv: Driver, data: memoryview, kick: int, call: int, n: int) -> str:
    """The child: add N buffers, reap N replies, sleep only on the call eventfd."""
    t0 = time.perf_counter()
    sent = reaped = 0
    sleeps = kicks = 0
    pack = _Q.pack_into
    unpack = _Q.unpack_from
    drv.disable_interrupts()  # we start by polling
    while reaped < n:
        added = 0
        while sent < n and added < BATCH and drv.num_free >= 2:
            slot = sent % QSIZE
            off = slot * 16
            pack(data, off, sent)
            gpa = DATA + off
            if not drv.add(((gpa, 8, False), (gpa + 8, 8, True)), sent):
                raise AssertionError(f"add failed with {drv.num_free} free descriptors")
            sent += 1
            added += 1
        if added:
            drv.publish()
            if drv.should_kick():
                os.eventfd_write(kick, 1)
                kicks += 1
        got = drv.reap()
        for tok, ln in got:
            if tok != reaped or ln != 8:
                raise AssertionError(f"reaped token {tok} length {ln}, expected {reaped} length 8")
            (reply,) = unpack(data, (tok % QSIZE) * 16 + 8)
            if reply != tok ^ MAGIC:
                raise AssertionError(f"token {tok}: reply {reply:#x} is wrong")
            reaped += 1
        if got or added:
            continue
        # Nothing to add, nothing used: re-enable interrupts, re-check, then sleep.
        if drv.enable_interrupts():
            drv.disable_interrupts()
            continue
        _wait([call], f"driver ({reaped}/{n} reaped, {drv.in_flight} in flight)")
        os.eventfd_read(call)
        sleeps += 1
        drv.disable_interrupts()
    dt = time.perf_counter() - t0
    return f"driver {n} buffers in {dt:.2f} s, {kicks} kicks, {sleeps} sleeps"


def _device(dev: Device, kick: int, call: int, child_done: int, n: int) -> str:
    """This process: sleep on kicks, poll in bursts, check sequence numbers, reply."""
    expect = 0
    calls = wakeups = 0
    pack = _Q.pack_into
    unpack = _Q.unpack_from

    def handler(chains: list[Chain]) -> list[tuple[int, int]]:
        nonlocal expect
        out = []
        for c in chains:
            (seq,) = unpack(c.readable[0], 0)
            if seq != expect:
                raise AssertionError(f"device popped sequence {seq}, expected {expect}")
            expect += 1
            pack(c.writable[0], 0, seq ^ MAGIC)
            out.append((c.head, 8))
        return out

    while expect < n:
        ready = _wait([kick, child_done], f"device ({expect}/{n} popped)")
        if child_done in ready:
            raise AssertionError("the driver exited before the device saw every buffer")
        os.eventfd_read(kick)
        wakeups += 1
        dev.disable_notifications()
        while True:
            res = run_burst(dev, handler, BUDGET)
            if res.broken is not None:
                raise AssertionError(f"ring broken: {res.broken}")
            if res.notify:
                os.eventfd_write(call, 1)
                calls += 1
            if res.popped:
                continue
            # Empty: re-enable kicks, re-check after the full barrier, else sleep.
            if dev.enable_notifications():
                dev.disable_notifications()
                continue
            break
    return f"device {n} buffers, {wakeups} wake-ups, {calls} calls"


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_two_processes_no_loss_no_stall(fmt: str, event_idx: bool) -> None:
    n = N if event_idx else max(1, N // 4)  # the flags variant is a lighter second check
    fd = os.memfd_create("virtq-twoproc", os.MFD_CLOEXEC)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    done_r, done_w = os.pipe()
    os.ftruncate(fd, MEM_SIZE)
    mm = mmap.mmap(fd, MEM_SIZE)
    mem = FlatMemory(memoryview(mm))
    drv: Driver
    dev: Device
    if fmt == "split":
        d, a, u, _ = split_layout(QSIZE, 0)
        drv = SplitDriverRing(mem, QSIZE, d, a, u, event_idx=event_idx)
        dev = SplitDeviceRing(mem, QSIZE, d, a, u, event_idx=event_idx, indirect=False)
    else:
        d, a, u, _ = packed_layout(QSIZE, 0)
        drv = PackedDriverRing(mem, QSIZE, d, a, u, event_idx=event_idx)
        dev = PackedDeviceRing(mem, QSIZE, d, a, u, event_idx=event_idx, indirect=False)
    data = mem.view(DATA, QSIZE * 16)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the driver: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(done_r)
            msg = _driver(drv, data, kick, call, n)
            code = 0
        except BaseException as e:
            msg = f"driver failed: {e!r}"
        try:
            os.write(done_w, msg.encode()[:4000])
        finally:
            os._exit(code)
    os.close(done_w)
    try:
        dev_msg = _device(dev, kick, call, done_r, n)
        _wait([done_r], "device waiting for the driver to finish")
        drv_msg = os.read(done_r, 4096).decode()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, drv_msg
        dt = time.perf_counter() - t0
        print(
            f"\n{fmt} event_idx={event_idx}: {n} buffers in {dt:.2f} s "
            f"({n / dt:,.0f}/s); {dev_msg}; {drv_msg}"
        )
        assert dev.in_flight == 0 and drv.in_flight == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        drv.close()
        dev.close()
        data.release()
        for region in mem.clear():
            region.buf.release()
        mm.close()
        for f in (fd, kick, call, done_r):
            os.close(f)
