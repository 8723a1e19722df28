"""The switch's ports: vhost-user NICs, kernel taps and echoes, over vhostuser.io.

* :class:`VhostUserPort` - a virtio-net NIC for one front-end (QEMU, DPDK virtio-user,
  our :class:`~vhostuser.frontends.net.VirtioNetFrontend`), listening on a socket path
  (``-chardev socket,path=PATH`` connects to it) or connecting to a listening front-end and
  reconnecting whenever it goes away (``server=on``);
* :class:`TapPort` - a kernel tap interface, so guests reach the host's network stack;
* an echo port (:class:`VhostUserPort` with ``echo=True``) - reflects every frame back to
  its own front-end and is not connected to the others (the test server of the 2014
  vhost-user patches).

A vhost-user port speaks one dialect (``dialect=``): the current protocol, or the 2014
draft in either numbering.

A vhost-user port copies frames straight into its front-end's receive ring and holds them
back (unpublished) until :meth:`Switch.commit`: a frame never reaches its receiver before
its sender got the transmit buffer back (see ``FrameSink.commit``).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from ..devices.net import (
    DEFAULT_MTU,
    ETH_HLEN,
    GSO_NONE,
    HDR_F_NEEDS_CSUM,
    NET_HDR,
    EchoSink,
    NetCounters,
    VirtioNetDevice,
    complete_checksum,
    parse_mac,
)
from ..io.backend import BackendServer, BackendSession
from ..io.mapping import reap_deferred
from ..io.tap import TapDevice
from ..protocol.table import Dialect
from .fabric import Member

if TYPE_CHECKING:
    from .core import Switch

__all__ = ["Port", "TapPort", "VhostUserPort"]

log = logging.getLogger(__name__)

TAP_BURST: Final = 64
"""Frames read from a tap per readable event (a flood on the tap cannot starve rings)."""
TAP_SLOT: Final = 65536 + ETH_HLEN + 4
"""Bytes per tap read slot: the largest frame a tap can hand us."""


class Port(Member):
    """One switch port. Subclasses deliver frames with :meth:`send`.

    Attributes:
        name: unique within the switch.
        kind: ``vhost-user``, ``echo`` or ``tap``.
        counters: frames and bytes in and out, drops by reason (see NetCounters).
    """

    kind = "port"

    def publish(self) -> None:
        """Make what :meth:`send` delivered visible to the receiver (ports that copy
        straight into a receive ring hold it back until :meth:`Switch.commit`)."""

    def compiled_target(self) -> tuple[Any, ...] | None:
        """Where the compiled engine may copy frames for this port, or None (frames for
        it then go through the Python engine, which also counts their drops)."""
        return None

    def compiled_delivered(self, frames: int, nbytes: int, no_buffer: int) -> None:
        """Count what the compiled engine delivered to :meth:`compiled_target`."""

    def __init__(self, switch: Switch, name: str) -> None:
        super().__init__(name)
        self.switch = switch
        self.counters = NetCounters()
        self.closed = False

    @property
    def link_up(self) -> bool:
        """True when the port can take frames."""
        return False

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None, pair: int) -> None:
        """Deliver ``frames`` out of this port (copy them before returning)."""
        self.counters.drop("rx_down", len(frames))

    def info(self) -> dict[str, Any]:
        """A JSON-ready description with counters."""
        return {"name": self.name, "kind": self.kind, "link": self.link_up,
                **self.counters.as_dict()}

    def close(self) -> None:
        """Stop the port and release what it holds. Idempotent."""
        self.closed = True


class VhostUserPort(Port):
    """A virtio-net NIC served over vhost-user (see the module docstring).

    One front-end at a time: a second connection is refused while one is up; after it goes
    away the next one gets a fresh device (a reconnecting QEMU, a restarted DPDK) on the
    same counters, and the addresses learned on the port stay in the switch's table.
    """

    kind = "vhost-user"

    def __init__(
        self,
        switch: Switch,
        name: str,
        path: str,
        *,
        connect: bool = False,
        echo: bool = False,
        mac: str | None = None,
        mtu: int = DEFAULT_MTU,
        queue_pairs: int = 1,
        offloads: bool = False,
        offer_config: bool = False,
        mode: int = 0o600,
        reconnect_interval: float = 1.0,
        dialect: Dialect = Dialect.CURRENT,
    ) -> None:
        """Start serving a NIC on ``path``, speaking ``dialect``.

        Raises:
            ValueError: bad MAC, MTU or queue pairs.
            OSError, VhostUserError: the socket path cannot be bound (listen mode).
        """
        super().__init__(switch, name)
        self.kind = "echo" if echo else "vhost-user"
        self.path = path
        self.connect = connect
        self.echo = echo
        self.mac = mac if mac is not None else switch.next_mac()
        parse_mac(self.mac)
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.offloads = offloads
        self.offer_config = offer_config
        self.dialect = dialect
        self.device: VirtioNetDevice | None = None
        self.session: BackendSession | None = None
        self.sessions = 0
        self.last_close_reason: str | None = None
        self._echo_sink = EchoSink()
        # Check the arguments before binding anything.
        self._make_device()
        self.server = BackendServer(
            switch.reactor, path, self._make_device, connect=connect, max_sessions=1,
            mode=mode, on_session=self._on_session, reconnect_interval=reconnect_interval,
            busy_poll=switch.busy_poll, dialect=dialect,
        )

    def _make_device(self) -> VirtioNetDevice:
        dev = VirtioNetDevice(
            self._echo_sink if self.echo else self,
            mac=self.mac, mtu=self.mtu, queue_pairs=self.queue_pairs, offloads=self.offloads,
            offer_config=self.offer_config, counters=self.counters, name=self.name,
        )
        if self.switch.engine == "compiled" and not self.echo:
            dev.accelerator = functools.partial(self.switch.compiled_burst, self)
        return dev

    def compiled_target(self) -> tuple[Any, ...] | None:
        """The receive ring of the attached NIC, when the compiled engine can use it."""
        dev = self.device
        return None if dev is None else dev.compiled_rx_target()

    def compiled_delivered(self, frames: int, nbytes: int, no_buffer: int) -> None:
        """Counters and publication for what the compiled engine delivered."""
        dev = self.device
        if dev is not None:
            dev.compiled_delivered(frames, nbytes, no_buffer)

    def _on_session(self, s: BackendSession) -> None:
        # BackendServer has no "session closed" hook of its own: chain ours in front.
        original = s.on_close

        def closed(sess: BackendSession) -> None:
            self._session_closed(sess)
            if original is not None:
                original(sess)

        s.on_close = closed
        self.session = s
        self.sessions += 1
        dev = s.device
        if isinstance(dev, VirtioNetDevice):
            self.device = dev
        log.info("%s: front-end connected (%s)", self.name, s.name)

    def _session_closed(self, s: BackendSession) -> None:
        dev = s.device
        if isinstance(dev, VirtioNetDevice):
            # Release the device's views of guest memory so the mapping goes now.
            dev.close()
            reap_deferred()
        if s is self.session:
            self.session = None
            self.device = None
            self.last_close_reason = s.close_reason
            # The addresses learned here stay (aging removes them if nobody comes back): a
            # front-end that reconnects (QEMU reconnect=1, a --connect port dialing again)
            # is reached at once instead of by flooding. Frames for them meanwhile are
            # counted here as rx_down. The counters stay too: one port, one set.
            log.info("%s: front-end gone: %s", self.name, s.close_reason)

    # -- FrameSink (the device hands us what its driver transmitted) ------------------------
    def on_frames(
        self,
        dev: VirtioNetDevice,
        pair: int,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
    ) -> None:
        """Forward a burst into the switch (published at :meth:`commit`)."""
        self.switch.forward(self, frames, hdrs, pair)

    def commit(self, dev: VirtioNetDevice) -> None:
        """Our transmit buffers are back with the driver: publish the copies."""
        self.switch.commit()

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        """SEND_RARP from the front-end: re-learn and announce."""
        self.switch.announce(self, mac)

    # -- Port -------------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        """True when a front-end has a receive queue running."""
        dev = self.device
        return dev is not None and dev.link_up

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None, pair: int) -> None:
        """Copy frames into the front-end's receive queue (counted drops otherwise)."""
        dev = self.device
        if dev is None:
            self.counters.drop("rx_down", len(frames))
            return
        dev.deliver(frames, hdrs, pair, defer=True)
        self.switch.to_publish(self)

    def publish(self) -> None:
        """Publish the frames :meth:`send` delivered (see ``VirtioNetDevice.publish_rx``)."""
        dev = self.device
        if dev is not None:
            dev.publish_rx()

    def info(self) -> dict[str, Any]:
        """Port description: path, mode, front-end state, counters."""
        dev = self.device
        out = super().info()
        out.update({
            "path": self.path,
            "mode": "connect" if self.connect else "listen",
            "dialect": self.dialect.value,
            "mac": self.mac,
            "connected": self.session is not None,
            "sessions": self.sessions,
            "queue_pairs": self.queue_pairs,
            "rx_pairs": dev.rx_pairs if dev is not None else [],
            "features": dev.features if dev is not None else None,
            "mtu": dev.mtu if dev is not None else self.mtu,
            "last_close_reason": self.last_close_reason,
        })
        return out

    def close(self) -> None:
        """Close the session and the listener (the socket file is removed). Idempotent."""
        if self.closed:
            return
        super().close()
        self.server.close()
        self.device = None
        self.session = None


class TapPort(Port):
    """A kernel tap interface as a switch port (see :class:`~vhostuser.io.tap.TapDevice`).

    Frames with offload fields cannot go to a tap (no vnet header): partial checksums are
    completed in software, GSO frames are dropped (``offload``).
    """

    kind = "tap"

    def __init__(self, switch: Switch, name: str, ifname: str, *, up: bool = True) -> None:
        """Open (create if absent) the tap and start reading it.

        Raises:
            ValueError: bad interface name.
            OSError: no permission (root needed), or /dev/net/tun is missing.
        """
        super().__init__(switch, name)
        self.tap = TapDevice(ifname, up=up)
        self.ifname = self.tap.name
        self._slots = [bytearray(TAP_SLOT) for _ in range(TAP_BURST)]
        self._views = [memoryview(b) for b in self._slots]
        self._frames: list[memoryview] = []
        switch.reactor.add_reader(self.tap.fileno(), self._on_readable)

    @property
    def link_up(self) -> bool:
        """True while the tap is open."""
        return not self.tap.closed

    def _on_readable(self) -> None:
        """Read up to TAP_BURST frames and forward them as one burst."""
        if self.closed:
            return
        frames = self._frames
        tap = self.tap
        nbytes = 0
        try:
            for v in self._views:
                n = tap.read_into(v)
                if n is None:
                    break
                if n < ETH_HLEN:
                    self.counters.drop("runt")
                    continue
                frames.append(v[:n])
                nbytes += n
        except OSError as e:
            log.warning("%s: reading tap %s failed: %s", self.name, self.ifname, e)
            self.counters.last_error = f"read: {e}"
        if frames:
            self.counters.rx_frames += len(frames)
            self.counters.rx_bytes += nbytes
            try:
                self.switch.forward(self, frames, None, 0)
                self.switch.commit()
            finally:
                for f in frames:
                    f.release()
                frames.clear()

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None, pair: int) -> None:
        """Write each frame to the tap (kernel queue full: counted ``tap_full``)."""
        tap = self.tap
        counters = self.counters
        if tap.closed:
            counters.drop("rx_down", len(frames))
            return
        for i, f in enumerate(frames):
            data: memoryview | bytearray = f
            hdr = hdrs[i] if hdrs is not None else None
            if hdr is not None:
                flags, gso, _hl, _gs, cstart, coff = NET_HDR.unpack(hdr)
                if gso != GSO_NONE:
                    counters.drop("offload")
                    continue
                if flags & HDR_F_NEEDS_CSUM:
                    data = bytearray(f)
                    try:
                        complete_checksum(data, cstart, coff)
                    except ValueError:
                        counters.drop("bad_header")
                        continue
            try:
                ok = tap.write(data)
            except OSError as e:
                counters.last_error = f"write: {e}"
                counters.drop("tap_full")
                continue
            if ok:
                counters.tx_frames += 1
                counters.tx_bytes += len(data)
            else:
                counters.drop("tap_full")

    def info(self) -> dict[str, Any]:
        """Port description: interface name, whether we created it, counters."""
        out = super().info()
        out.update({"ifname": self.ifname, "created": self.tap.created})
        return out

    def close(self) -> None:
        """Stop reading and close the tap (one we created disappears). Idempotent."""
        if self.closed:
            return
        super().close()
        if not self.tap.closed:
            self.switch.reactor.remove_reader(self.tap.fileno())
            self.tap.close()
        for v in self._views:
            v.release()
