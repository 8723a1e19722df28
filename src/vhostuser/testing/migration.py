"""Audit a back-end's dirty logging from the front-end, as a migration depends on it.

vhost-user.rst "Migration": while VHOST_F_LOG_ALL is acked, every write the back-end makes
to guest memory must be marked in the log (the used ring at ``log_guest_addr``, and "all
the modifications to memory pointed by vring descriptor"). :func:`audit_net_echo` checks
that the way a migration would fail without it: a shadow copy of guest memory is taken,
frames go out to a back-end that sends them back (our switch's echo port, DPDK testpmd in
macswap mode), and once memory has settled every page whose bytes changed must be in the
log. The copy is taken before the frames are queued, since a polling back-end (DPDK)
takes them at once; the only bytes the front-end writes in between are the transmit
side's descriptors, available ring and frame slots, and those byte ranges are left out of
the comparison (not their pages: a split ring's used ring shares a page with its
available ring, and its changes still count). A packed ring's descriptors are written by
both sides, so the transmit descriptor ring of a packed queue is left out as a whole; its
receive ring is fully audited. A page marked but unchanged is allowed (the back-end may
write the bytes that were there, or mark a page first and write it later):
:attr:`LogAudit.extra` lists them for the record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..frontends.blk import BlkOp, VirtioBlkFrontend
from ..frontends.net import RingArea, VirtioNetFrontend
from ..io.dirtylog import LOG_PAGE, FrontendDirtyLog, changed_pages

__all__ = ["LogAudit", "audit_blk_reads", "audit_net_echo", "settle"]


@dataclass(slots=True)
class LogAudit:
    """What one audited round found (page numbers, ``gpa // 4096``)."""

    changed: set[int]
    marked: set[int]
    ring_pages: set[int] = field(default_factory=set)
    """Pages the device writes ring state into: used rings (split) or descriptor rings
    (packed)."""
    rx_pages: set[int] = field(default_factory=set)
    """Pages of receive buffers."""

    @property
    def missing(self) -> set[int]:
        """Changed but not marked: a migration would lose these writes."""
        return self.changed - self.marked

    @property
    def extra(self) -> set[int]:
        """Marked but unchanged (allowed)."""
        return self.marked - self.changed

    def describe(self) -> str:
        """One line for reports."""
        return (f"{len(self.changed)} pages changed ({len(self.changed & self.ring_pages)} "
                f"ring, {len(self.changed & self.rx_pages)} receive buffers), "
                f"{len(self.marked)} marked, {len(self.missing)} changed but not marked "
                f"{sorted(self.missing)[:8]}, {len(self.extra)} marked but unchanged")


def _pages(start: int, size: int) -> set[int]:
    return set(range(start // LOG_PAGE, (start + max(size, 1) - 1) // LOG_PAGE + 1))


def settle(buf: memoryview, *, quiet: float = 0.3, timeout: float = 10.0) -> bytes:
    """Copy ``buf`` once it stopped changing for ``quiet`` seconds (or ``timeout``
    passed); return the copy."""
    deadline = time.monotonic() + timeout
    last = bytes(buf)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = bytes(buf)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def audit_net_echo(nic: VirtioNetFrontend, log: FrontendDirtyLog, frames: Sequence[bytes],
                   *, timeout: float = 20.0) -> tuple[LogAudit, list[bytes]]:
    """Send ``frames`` to a back-end that echoes them, with logging on (the caller started
    it with ``log``), and compare guest memory before and after (see the module).

    Returns the audit and the frames that came back (taken after the second copy).

    Raises:
        ValueError: the front-end has no guest RAM (not started), or more frames than
            its transmit ring takes at once.
    """
    ram = nic.ram
    if ram is None:
        raise ValueError(f"{nic.name}: not started")
    if len(frames) > nic.queue_size:
        raise ValueError(f"{len(frames)} frames do not fit a ring of {nic.queue_size}")
    buf = ram.buf
    areas: list[RingArea] = nic.ring_areas()
    ring_pages: set[int] = set()
    rx_pages: set[int] = set()
    for a in areas:
        if nic.packed:
            ring_pages |= _pages(a.desc, 16 * nic.queue_size)
        else:
            ring_pages |= _pages(a.used, 6 + 8 * nic.queue_size)
        if a.rx:
            rx_pages |= _pages(a.data, a.data_size)
    ours: list[tuple[int, int]] = []  # byte ranges the front-end writes in send()
    for a in areas:
        if a.rx:
            continue
        if nic.packed:
            ours.append((a.desc, 16 * nic.queue_size))
        else:
            ours.append((a.desc, 16 * nic.queue_size))
            ours.append((a.avail, 6 + 2 * nic.queue_size))
        ours.append((a.data, a.data_size))
    log.take()  # what was marked before the first copy is no part of the audit
    before = bytearray(buf)
    sent = nic.send(frames)
    if sent != len(frames):
        raise ValueError(f"{nic.name}: only {sent} of {len(frames)} frames found a slot")
    after = bytearray(settle(buf, timeout=timeout))
    time.sleep(0.05)  # a mark that follows its write (DPDK logs the used index after it)
    marked = log.take()
    for start, size in ours:
        after[start : start + size] = before[start : start + size]
    audit = LogAudit(changed_pages(before, after), marked, ring_pages, rx_pages)
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < len(frames) and time.monotonic() < deadline:
        got += nic.recv(timeout=0.2)
    return audit, got


def audit_blk_reads(disk: VirtioBlkFrontend, log: FrontendDirtyLog, ops: Sequence[BlkOp],
                    *, timeout: float = 20.0) -> LogAudit:
    """Submit ``ops`` (reads, writes, ...) on a disk whose back-end logs into ``log``, and
    compare guest memory from just before they are published (every request laid out,
    none visible to the back-end) with memory once it settled: every page changed must be
    marked (see the module). The front-end's only write in between is publishing: the
    available ring of a split queue (those bytes are left out) or the descriptors of a
    packed one (its descriptor ring is left out). Waits for the completions.

    Raises:
        ValueError: the disk has no guest RAM.
        LocalProtocolError: more requests than free slots.
    """
    ram = disk.ram
    if ram is None:
        raise ValueError(f"{disk.path}: no guest RAM")
    buf: memoryview = ram.buf
    ours: list[tuple[int, int]] = []
    ring_pages: set[int] = set()
    rx_pages: set[int] = set()
    for q in disk.queues:
        lay = q.layout
        if disk.packed:
            ours.append((lay.desc, 16 * lay.size))
            ring_pages |= _pages(lay.desc, 16 * lay.size)
        else:
            ours.append((lay.avail, 6 + 2 * lay.size))
            ring_pages |= _pages(lay.used, 6 + 8 * lay.size)
        rx_pages |= _pages(lay.meta, lay.data - lay.meta) | _pages(lay.data, lay.end - lay.data)
    copies: list[bytearray] = []

    def snap() -> None:
        log.take()
        copies.append(bytearray(buf))

    disk.submit_many(ops, before_publish=snap)
    after = bytearray(settle(buf, timeout=timeout))
    time.sleep(0.05)
    marked = log.take()
    before = copies[0]
    for start, size in ours:
        after[start : start + size] = before[start : start + size]
    disk.wait_for(ops)
    return LogAudit(changed_pages(before, after), marked, ring_pages, rx_pages)
