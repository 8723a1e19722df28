"""A learning Ethernet switch whose ports are vhost-user NICs, kernel taps and echoes.

:class:`Switch` forwards frames between ports on one :class:`~vhostuser.io.reactor.Reactor`
(DESIGN.md: one thread serves every control socket and ring). Each port is

* :class:`VhostUserPort` - a virtio-net NIC for one front-end (QEMU, DPDK virtio-user,
  our :class:`~vhostuser.frontends.net.VirtioNetFrontend`), listening on a socket path
  (``-chardev socket,path=PATH`` connects to it) or connecting to a listening front-end and
  reconnecting whenever it goes away (``server=on``);
* :class:`TapPort` - a kernel tap interface, so guests reach the host's network stack;
* an echo port (:class:`VhostUserPort` with ``echo=True``) - reflects every frame back to
  its own front-end and is not connected to the others (the seed's test server).

Forwarding (IEEE 802.1D, simplified): the source address of every frame is learned on its
ingress port; frames to a learned unicast address go to that port only (and are filtered
when it is the ingress port); broadcast, multicast and unknown unicast are flooded to every
other port. Entries age out after ``aging`` seconds without traffic, vanish when their port
goes down, and the table is bounded (``max_macs``; beyond it new addresses are flooded,
not learned). SEND_RARP re-learns the address on the port and floods a RARP announcement.

Two modes: event-driven (default; the switch sleeps in epoll until a kick) and busy-poll
(``busy_poll=True``; a reactor poller spins over every transmit queue with kicks
suppressed, Snabb's model). Every per-queue burst goes through
:meth:`VirtioNetDevice.poll_queue` or the session's kick handler, both ending in
:meth:`VirtioNetDevice.handle_burst` and :meth:`Switch.forward`.

:class:`SwitchThread` runs a switch on its own reactor thread for tests and embedding.

No syscalls here: sockets, eventfds and taps are done by ``vhostuser.io``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any, Final

from ..io.backend import BackendServer, BackendSession
from ..io.mapping import reap_deferred
from ..io.reactor import Reactor, Timer
from ..io.tap import TapDevice
from ..io.thread import ReactorThread
from .net import (
    DEFAULT_MTU,
    ETH_HLEN,
    GSO_NONE,
    HDR_F_NEEDS_CSUM,
    NET_HDR,
    EchoSink,
    NetCounters,
    VirtioNetDevice,
    build_rarp,
    complete_checksum,
    format_mac,
    parse_mac,
)

__all__ = ["Port", "Switch", "SwitchThread", "TapPort", "VhostUserPort"]

log = logging.getLogger(__name__)

_MACS: Final = struct.Struct("6s6s")  # destination, source (IEEE 802.3 §3.1.1)
_unpack_macs = _MACS.unpack_from

DEFAULT_AGING: Final = 300.0
"""Seconds an address stays learned without traffic (the IEEE 802.1D default)."""
DEFAULT_MAX_MACS: Final = 65536
TAP_BURST: Final = 64
"""Frames read from a tap per readable event (a flood on the tap cannot starve rings)."""
TAP_SLOT: Final = 65536 + ETH_HLEN + 4
"""Bytes per tap read slot: the largest frame a tap can hand us."""



class Port:
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

    def __init__(self, switch: Switch, name: str) -> None:
        self.switch = switch
        self.name = name
        self.counters = NetCounters()
        self.closed = False
        # Frames staged for this port during one forwarding pass (reused lists).
        self._out: list[memoryview] = []
        self._out_hdrs: list[bytes | None] = []
        self._out_has_hdr = False

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
    away the next one gets a fresh device (a reconnecting QEMU, a restarted DPDK).
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
    ) -> None:
        """Start serving a NIC on ``path``.

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
            busy_poll=switch.busy_poll,
        )

    def _make_device(self) -> VirtioNetDevice:
        return VirtioNetDevice(
            self._echo_sink if self.echo else self,
            mac=self.mac, mtu=self.mtu, queue_pairs=self.queue_pairs, offloads=self.offloads,
            offer_config=self.offer_config, counters=self.counters, name=self.name,
        )

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
            self.switch.port_down(self)
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


class Switch:
    """A learning Ethernet switch on a reactor (see the module docstring).

    Args:
        reactor: the reactor every port runs on.
        aging: seconds a learned address lives without traffic.
        max_macs: most addresses learned at once.
        busy_poll: spin over transmit queues instead of sleeping on kicks.
        mac_prefix: first three bytes of the MACs given to ports without one.
    """

    def __init__(
        self,
        reactor: Reactor,
        *,
        aging: float = DEFAULT_AGING,
        max_macs: int = DEFAULT_MAX_MACS,
        busy_poll: bool = False,
        mac_prefix: bytes = b"\x52\x54\x00",
    ) -> None:
        if aging <= 0:
            raise ValueError(f"aging {aging} must be positive")
        if max_macs < 1:
            raise ValueError(f"max_macs {max_macs} must be at least 1")
        self.reactor = reactor
        self.aging = aging
        self.max_macs = max_macs
        self.busy_poll = busy_poll
        self.ports: list[Port] = []
        self._fabric: list[Port] = []  # the ports frames are switched between (no echoes)
        self.macs: dict[bytes, list[Any]] = {}
        """address -> [port, last seen (monotonic seconds)]."""
        self.flooded = 0
        self.filtered = 0
        self.learn_refused = 0
        self.started = time.monotonic()
        self._mac_prefix = mac_prefix
        self._mac_seq = 0
        self._touched: list[Port] = []
        self._unpublished: list[Port] = []
        self._closed = False
        self._aging_timer: Timer | None = reactor.call_later(
            min(self.aging / 4, 10.0), self._age)

    # -- ports ------------------------------------------------------------------------------
    def next_mac(self) -> str:
        """A locally unique MAC for a port that was given none (52:54:00:5e:NN:NN)."""
        self._mac_seq += 1
        n = self._mac_seq
        return format_mac(self._mac_prefix + bytes([0x5E, (n >> 8) & 0xFF, n & 0xFF]))

    def _check_path(self, path: str) -> None:
        for p in self.ports:
            if isinstance(p, VhostUserPort) and p.path == path:
                raise ValueError(f"socket path {path} is already used by port {p.name}")

    def _name(self, name: str | None, default: str) -> str:
        taken = {p.name for p in self.ports}
        if name is not None:
            if name in taken:
                raise ValueError(f"port name {name!r} is already used")
            return name
        base, k = default, 1
        while default in taken:
            k += 1
            default = f"{base}{k}"
        return default

    def add_vhost_user_port(
        self, path: str, *, connect: bool = False, name: str | None = None, **kw: Any
    ) -> VhostUserPort:
        """Add a vhost-user NIC listening on (or, with ``connect``, connecting to) ``path``.

        Keyword arguments go to :class:`VhostUserPort` (mac, mtu, queue_pairs, offloads,
        offer_config, mode, reconnect_interval).

        Raises:
            ValueError: a duplicate name or path, or a bad option.
            OSError, VhostUserError: the socket cannot be bound.
        """
        self._check_path(path)
        port = VhostUserPort(self, self._name(name, f"p{len(self.ports)}"), path,
                             connect=connect, **kw)
        self.ports.append(port)
        self._fabric.append(port)
        return port

    def add_echo_port(self, path: str, *, name: str | None = None, **kw: Any) -> VhostUserPort:
        """Add an echo port: a vhost-user NIC that reflects every frame to its sender.

        Raises:
            ValueError, OSError, VhostUserError: as :meth:`add_vhost_user_port`.
        """
        self._check_path(path)
        port = VhostUserPort(self, self._name(name, "echo"), path, echo=True, **kw)
        self.ports.append(port)
        return port

    def add_tap_port(self, ifname: str, *, name: str | None = None, up: bool = True) -> TapPort:
        """Add a kernel tap interface (created if absent; needs root).

        Raises:
            ValueError: bad or duplicate name.
            OSError: no permission or no /dev/net/tun.
        """
        port = TapPort(self, self._name(name, ifname), ifname, up=up)
        self.ports.append(port)
        self._fabric.append(port)
        return port

    def remove_port(self, port: Port) -> None:
        """Close a port and forget it."""
        port.close()
        self.port_down(port)
        if port in self.ports:
            self.ports.remove(port)
        if port in self._fabric:
            self._fabric.remove(port)

    def port(self, name: str) -> Port:
        """The port called ``name``.

        Raises:
            KeyError: no such port.
        """
        for p in self.ports:
            if p.name == name:
                return p
        raise KeyError(f"no port named {name!r}")

    # -- forwarding -----------------------------------------------------------------------
    def forward(
        self,
        src: Port,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
        pair: int = 0,
    ) -> None:
        """Switch a burst of frames that arrived on ``src`` (the hot path).

        Learns every source address, stages each frame for its output port(s), then hands
        each output port its frames in one call (one receive burst, one notification).
        Frames are copied into the output ports before this returns.
        """
        macs = self.macs
        now = time.monotonic()
        touched = self._touched
        fabric = self._fabric
        last_key = b""
        # The decision for last_key: a port, or None to flood, or src itself to filter.
        last_out: Port | None = None
        flood_n = 0
        filtered = 0
        for i, frame in enumerate(frames):
            key = frame[:12].tobytes()  # destination + source address (IEEE 802.3 3.1.1)
            if key != last_key:
                # A new (destination, source) pair: learn and decide; repeats in the burst
                # (the usual case) reuse the decision.
                last_key = key
                dst, smac = _unpack_macs(key)
                e = macs.get(smac)
                if e is None:
                    if not smac[0] & 1:  # a group address is never a source (802.1D 7.8)
                        if len(macs) < self.max_macs:
                            macs[smac] = [src, now]
                        else:
                            self.learn_refused += 1
                else:
                    e[0] = src  # refreshed, or the station moved
                    e[1] = now
                last_out = None
                if not dst[0] & 1:
                    d = macs.get(dst)
                    if d is not None:
                        last_out = d[0]
            out = last_out
            if out is src:
                filtered += 1
                continue
            if hdrs is None:
                # No offload fields in this burst (the usual case): frames only.
                if out is not None:
                    if not out._out:
                        touched.append(out)
                    out._out.append(frame)
                    continue
                flood_n += 1
                for p in fabric:
                    if p is not src:
                        if not p._out:
                            touched.append(p)
                        p._out.append(frame)
                continue
            hdr = hdrs[i]
            targets = (out,) if out is not None else [p for p in fabric if p is not src]
            if out is None:
                flood_n += 1
            for p in targets:
                if not p._out:
                    touched.append(p)
                # Headers run parallel to frames; pad for frames staged without one.
                p._out_hdrs.extend([None] * (len(p._out) - len(p._out_hdrs)))
                p._out.append(frame)
                p._out_hdrs.append(hdr)
                if hdr is not None:
                    p._out_has_hdr = True
        self.flooded += flood_n
        self.filtered += filtered
        if touched:
            for p in touched:
                try:
                    h: list[bytes | None] | None = None
                    if p._out_has_hdr:
                        h = p._out_hdrs
                        h.extend([None] * (len(p._out) - len(h)))
                    p.send(p._out, h, pair)
                finally:
                    p._out.clear()
                    p._out_hdrs.clear()
                    p._out_has_hdr = False
            touched.clear()

    def announce(self, src: Port, mac: bytes) -> None:
        """SEND_RARP: learn ``mac`` on ``src`` and flood a RARP announcement from it."""
        self.macs[bytes(mac)] = [src, time.monotonic()]
        src.counters.rx_frames += 1
        frame = build_rarp(bytes(mac))
        src.counters.rx_bytes += len(frame)
        self.forward(src, [memoryview(frame)], None, 0)
        self.commit()
        log.info("%s: RARP announcement for %s", src.name, format_mac(bytes(mac)))

    def port_down(self, port: Port) -> None:
        """Forget every address learned on ``port`` (its front-end went away)."""
        for mac in [m for m, e in self.macs.items() if e[0] is port]:
            del self.macs[mac]

    def _age(self) -> None:
        self._aging_timer = None
        if self._closed:
            return
        limit = time.monotonic() - self.aging
        for mac in [m for m, e in self.macs.items() if e[1] < limit]:
            del self.macs[mac]
        self._aging_timer = self.reactor.call_later(min(self.aging / 4, 10.0), self._age)

    def to_publish(self, port: Port) -> None:
        """``port`` holds delivered frames back until :meth:`commit`."""
        if port not in self._unpublished:
            self._unpublished.append(port)

    def commit(self) -> None:
        """Publish every frame delivered since the last commit. Called once the frames'
        sources gave their buffers back (after a transmit burst completed, or after a tap
        read), so a frame never reaches its receiver while its sender's buffer is still
        busy: in a loop (A -> switch -> B -> A) the sender would otherwise find its ring
        full and drop the frame for good."""
        pending = self._unpublished
        if not pending:
            return
        try:
            for p in pending:
                p.publish()
        finally:
            pending.clear()

    # -- state ------------------------------------------------------------------------------
    def mac_table(self) -> list[dict[str, Any]]:
        """Learned addresses: mac, port name, age in seconds."""
        now = time.monotonic()
        return [{"mac": format_mac(m), "port": e[0].name, "age": round(now - e[1], 1)}
                for m, e in sorted(self.macs.items())]

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot: every port with its counters, and switch totals."""
        return {
            "time": time.time(),
            "uptime": round(time.monotonic() - self.started, 3),
            "mode": "busy-poll" if self.busy_poll else "event",
            "macs": len(self.macs),
            "flooded": self.flooded,
            "filtered": self.filtered,
            "learn_refused": self.learn_refused,
            "ports": [p.info() for p in self.ports],
        }

    def close(self) -> None:
        """Close every port (sockets removed, taps closed) and stop polling. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._aging_timer is not None:
            self._aging_timer.cancel()
            self._aging_timer = None
        for p in self.ports:
            try:
                p.close()
            except Exception:  # keep closing the others
                log.exception("closing port %s", p.name)
        self.macs.clear()


class SwitchThread(ReactorThread):
    """A :class:`Switch` on its own reactor thread, for tests and embedding.

    ``setup(switch)`` runs on the reactor thread before the loop starts (add ports there).
    Everything else touching the switch must go through :meth:`call`. Use as a context
    manager; leaving it closes every port and joins the thread.
    """

    thread_name = "vhost-user switch"

    def __init__(self, setup: Callable[[Switch], object] | None = None, **switch_kw: Any) -> None:
        super().__init__()
        self.setup = setup
        self.switch_kw = switch_kw
        self.switch: Switch | None = None

    def _build(self, reactor: Reactor) -> Callable[[], None]:
        sw = Switch(reactor, **self.switch_kw)
        self.switch = sw
        try:
            if self.setup is not None:
                self.setup(sw)
        except BaseException:
            sw.close()
            raise
        return sw.close

    def stats(self) -> dict[str, Any]:
        """:meth:`Switch.stats`, taken on the reactor thread."""
        sw = self.switch
        if sw is None:
            return {}
        return self.call(sw.stats)

