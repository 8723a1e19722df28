"""An entropy source (virtio-rng, virtio device id 4) as a vhost-user back-end, in one file.

The guide ``docs/writing-a-device.md`` walks through this file. It holds three things:

* :class:`RngDevice`, the device: it fills every device-writable buffer the driver offers
  with random bytes. It does no I/O of its own (the bytes come from the ``source`` it was
  given), so it could live in ``src/vhostuser/devices/`` under the layering rule;
* :class:`EntropyClient`, a minimal virtio-rng driver built on our front-end
  (:class:`~vhostuser.io.frontend.FrontendClient`, guest RAM in a memfd, one driver ring,
  split or packed), to drive any virtio-rng back-end without a VM;
* :func:`main`, a command line: serve the device on a socket, or read from one.

Run it from the repository's root::

    python docs/examples/rng_device.py serve --socket /tmp/rng.sock
    python docs/examples/rng_device.py read --socket /tmp/rng.sock --bytes 32 --packed

QEMU's ``vhost-user-rng-pci`` device drives the same back-end for a guest::

    -chardev socket,id=rng0,path=/tmp/rng.sock -device vhost-user-rng-pci,chardev=rng0

``tests/kernel/test_doc_examples.py`` runs all of this.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType

from vhostuser.connection.events import Event, VringEnabled, VringStopping
from vhostuser.devices import Device
from vhostuser.devices.base import QueueAccess
from vhostuser.errors import RingError, VhostUserError
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.guestram import GuestRam
from vhostuser.io.thread import ServerThread
from vhostuser.memory import FlatMemory
from vhostuser.protocol.enums import FrontendRequest, VirtioFeature
from vhostuser.protocol.payloads import VringState
from vhostuser.virtq import (
    INITIAL_BASE,
    Chain,
    PackedDriverRing,
    SplitDriverRing,
    packed_layout,
    split_layout,
)

VIRTIO_ID_RNG = 4
"""virtio 1.2 §5: the entropy device's id. ``vhostuser.protocol.enums.DeviceType`` names
only net and blk (it exists to name their feature bits), so the device leaves
``device_type`` at None."""

MAX_FILL = 64 * 1024
"""Most bytes given for one buffer. virtio 1.2 §5.4.6.2 lets the device use less than the
whole buffer; a cap keeps one huge buffer from making a long burst."""


# -- the device ---------------------------------------------------------------------------

class RngDevice(Device):
    """virtio-rng: one request queue of device-writable buffers, filled with entropy.

    Args:
        source: gives ``n`` random bytes (``os.urandom`` when served by :func:`main`); the
            device itself makes no syscall.
        max_fill: most bytes written into one buffer.
    """

    device_type = None  # virtio id 4; see VIRTIO_ID_RNG
    virtio_features = 0  # virtio-rng defines no device feature bits
    num_queues = 1  # requestq

    def __init__(self, source: Callable[[int], bytes], *, max_fill: int = MAX_FILL) -> None:
        self.source = source
        self.max_fill = max_fill
        self.requests = 0
        self.bytes_given = 0
        self.queues: QueueAccess | None = None
        self.held: list[Chain] = []  # taken while the ring was disabled, not filled yet

    def attach(self, queues: QueueAccess) -> None:
        self.queues = queues

    def consumes(self, index: int) -> bool:
        # A started but disabled ring must be processed without side effects, and taking
        # a buffer from this queue is one: until the ring is enabled, no burst runs at all.
        # (QEMU starts a ring before it enables it.)
        return self.queues is None or self.queues.enabled(index)

    def handle_burst(
        self, index: int, chains: Sequence[Chain], enabled: bool
    ) -> list[tuple[int, int]]:
        for chain in chains:
            if chain.readable_len:
                # §5.4.6.1: the driver offers device-writable buffers only. A RingError is a
                # guest fault: run_burst marks this queue broken (the shell signals its err
                # eventfd); the session and every other queue carry on.
                raise RingError(
                    f"virtio-rng: buffer {chain.head} has {chain.readable_len} device-readable "
                    "bytes; the driver may offer only device-writable buffers")
        if not enabled:
            # Only for a device without consumes(): keep the buffers of a disabled ring,
            # untouched, until it is enabled again (or stopped); _complete_held() fills them.
            self.held.extend(chains)
            return []
        return [self._fill(chain) for chain in chains]

    def _fill(self, chain: Chain) -> tuple[int, int]:
        """Write random bytes into ``chain``; return its used entry (head, bytes written)."""
        n = min(chain.writable_len, self.max_fill)
        written = chain.write_bytes(self.source(n))
        self.requests += 1
        self.bytes_given += written
        return chain.head, written

    def on_event(self, event: Event) -> None:
        # Buffers held for a disabled ring are completed when it is enabled again, and
        # before GET_VRING_BASE reads the ring's position (VringStopping): a buffer taken
        # and never given back would be lost to a front-end that resumes there.
        enabled_again = isinstance(event, VringEnabled) and event.enabled
        if enabled_again or isinstance(event, VringStopping):
            self._complete_held()

    def _complete_held(self) -> None:
        held, self.held = self.held, []
        queues = self.queues
        ring = queues.ring(0) if queues is not None else None
        if queues is None or ring is None or not held:
            return
        ring.push([self._fill(chain) for chain in held])
        if ring.should_notify():
            queues.notify(0)

    def close(self) -> None:
        self.held.clear()  # the session ends: no view of guest memory may outlive it


# -- a driver for it (or for any other virtio-rng back-end) --------------------------------

RAM_SIZE = 2 << 20
RING_GPA = 0x0


class EntropyClient:
    """A virtio-rng driver on the back-end at ``path``: :meth:`read` offers buffers and
    returns what the device wrote into them.

    Args:
        path: the back-end's socket.
        packed: use a packed ring (VIRTIO_F_RING_PACKED); else a split ring.
        event_idx: negotiate VIRTIO_F_EVENT_IDX (when offered).
        queue_size: entries in the ring (a power of two for a split ring).
        timeout: seconds to wait for a reply or for the device to use the buffers.
        enabled: start with the ring enabled (see :meth:`set_enabled`).

    Raises:
        VhostUserError: the handshake failed, or ``packed`` was asked for and the back-end
            does not offer VIRTIO_F_RING_PACKED.
    """

    def __init__(self, path: str, *, packed: bool = False, event_idx: bool = True,
                 queue_size: int = 64, timeout: float = 5.0, enabled: bool = True) -> None:
        self.timeout = timeout
        self.queue_size = queue_size
        self.fe = FrontendClient.connect(path, timeout=timeout)
        self.ram = GuestRam.memfd(RAM_SIZE)
        self.mem: FlatMemory | None = None
        self.ring: SplitDriverRing[int] | PackedDriverRing[int] | None = None
        self.features = 0
        self.data_gpa = 0  # where buffers start: the first page after the ring
        try:
            self._start(packed, event_idx, enabled)
        except BaseException:
            self.close()
            raise

    def _start(self, packed: bool, event_idx: bool, enabled: bool) -> None:
        fe = self.fe
        want = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        if packed:
            want |= VirtioFeature.RING_PACKED
        if event_idx:
            want |= VirtioFeature.RING_EVENT_IDX
        # negotiate() masks what we want with what the back-end offers.
        self.features = fe.negotiate(features=int(want)).features
        if packed and not self.features & VirtioFeature.RING_PACKED:
            raise VhostUserError("the back-end does not offer VIRTIO_F_RING_PACKED")
        use_event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        fe.set_memory(self.ram)
        # The driver sees guest RAM through the same GPAs it gives the back-end.
        self.mem = FlatMemory(self.ram.buf, va_base=self.ram.uva)
        size = self.queue_size
        if packed:
            desc, driver_area, device_area, ring_bytes = packed_layout(size, RING_GPA)
            self.ring = PackedDriverRing(self.mem, size, desc, driver_area, device_area,
                                         event_idx=use_event_idx)
            # A packed ring's areas travel in SET_VRING_ADDR's avail and used fields.
            fe.setup_vring(0, size, desc=desc, avail=driver_area, used=device_area,
                           base=INITIAL_BASE, enable=enabled)
        else:
            desc, avail, used, ring_bytes = split_layout(size, RING_GPA)
            self.ring = SplitDriverRing(self.mem, size, desc, avail, used,
                                        event_idx=use_event_idx)
            fe.setup_vring(0, size, desc=desc, avail=avail, used=used, enable=enabled)
        self.data_gpa = (RING_GPA + ring_bytes + 0xFFF) & ~0xFFF
        fe.driver_ok()

    def set_enabled(self, on: bool) -> None:
        """SET_VRING_ENABLE: a disabled ring's buffers wait until it is enabled again."""
        self.fe.send(FrontendRequest.SET_VRING_ENABLE, VringState(index=0, num=int(on)))

    def read(self, sizes: Sequence[int]) -> list[bytes]:
        """Offer one device-writable buffer per entry of ``sizes`` and return, in the same
        order, the bytes the device wrote into each (it may write fewer than offered).

        Raises:
            ValueError: more buffers than the ring holds, or more bytes than guest RAM.
            RingError: the device broke the ring (a bad used entry).
            TimeoutError: the device did not use every buffer within ``timeout``.
        """
        ring = self.ring
        assert ring is not None
        if not 0 < len(sizes) <= self.queue_size:
            raise ValueError(f"{len(sizes)} buffers: the ring holds 1..{self.queue_size}")
        if self.data_gpa + sum(sizes) > RAM_SIZE:
            raise ValueError(f"{sum(sizes)} bytes do not fit in guest RAM")
        where: list[int] = []
        gpa = self.data_gpa
        for token, n in enumerate(sizes):
            where.append(gpa)
            ring.add([(gpa, n, True)], token)  # (gpa, length, device-writable)
            gpa += n
        ring.publish()
        if ring.should_kick():  # EVENT_IDX or NO_NOTIFY may say the device is awake
            self.fe.kick(0)
        written = self._wait_used(len(sizes))
        return [bytes(self.ram.buf[where[t]:where[t] + written[t]]) for t in range(len(sizes))]

    def _wait_used(self, count: int) -> dict[int, int]:
        """Reap until ``count`` buffers are back: token -> bytes written."""
        ring = self.ring
        assert ring is not None
        call = self.fe.vrings[0].call
        got: dict[int, int] = {}
        deadline = time.monotonic() + self.timeout
        while True:
            for token, n in ring.reap():
                got[token] = n
            if len(got) == count:
                return got
            # Ask for a notification, then look again: a buffer used in between would
            # otherwise wait for a notification that is never sent.
            if ring.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{count - len(got)} of {count} buffers not used in time")
            readable, _, _ = select.select([call.fd], [], [], left)
            if readable:
                call.drain()

    def close(self) -> None:
        """Stop the ring, disconnect, release guest RAM. Idempotent."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
            # A back-end that is gone already has nothing left to stop.
            with contextlib.suppress(VhostUserError, OSError):
                self.fe.stop_vring(0)
        if self.mem is not None:
            self.mem.clear()  # drops the table's view of guest RAM
            self.mem = None
        self.fe.close()
        self.ram.close()

    def __enter__(self) -> EntropyClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- command line --------------------------------------------------------------------------

def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``serve`` the device on a socket until SIGINT/SIGTERM, or ``read`` from one."""
    ap = argparse.ArgumentParser(description="virtio-rng over vhost-user: serve or read")
    ap.add_argument("mode", choices=("serve", "read"))
    ap.add_argument("--socket", required=True, help="socket path, e.g. /tmp/rng.sock")
    ap.add_argument("--bytes", type=int, default=32, help="read: buffer size (default 32)")
    ap.add_argument("--packed", action="store_true", help="read: use a packed ring")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.mode == "read":
        with EntropyClient(args.socket, packed=args.packed) as client:
            print(client.read([args.bytes])[0].hex())
        return 0
    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    # A fresh device per session; ServerThread runs BackendServer on a reactor thread.
    with ServerThread(args.socket, lambda: RngDevice(os.urandom)):
        print(f"virtio-rng back-end on {args.socket}; Ctrl-C to stop", file=sys.stderr)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
