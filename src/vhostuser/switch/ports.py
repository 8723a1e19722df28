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

Live migration on one host (see :class:`VhostUserPort`): a listening port keeps a second,
standby front-end beside the active one - the destination QEMU of a migration connects to
the same socket path while the source still runs - and hands the port over when the
standby starts its receive queue while the active one's is stopped, or when the active one
goes away.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from ..connection import events as ev
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
STANDBY_DROP: Final = "standby"
"""Drop reason of frames a standby front-end transmitted (it is not the port's NIC yet)."""
_RING_EVENTS: Final = (ev.VringStarted, ev.VringStopped, ev.VringEnabled, ev.VringBroken,
                       ev.DeviceReset)
"""The events that may start or stop a front-end's receive queues."""


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

    One NIC, one set of counters, at most two front-ends at once (a listening port):

    * the **active** front-end is the NIC: frames for the port go into its receive queue,
      frames it transmits enter the switch;
    * a **standby** front-end is accepted beside it for a live migration on one host
      (libvirt, or QEMU started with ``-incoming``, connects the destination to the same
      socket path while the source still runs). It negotiates and shares its memory, but
      gets no frame, and what it transmits is dropped (counted ``standby``), until it
      takes the port over;
    * a third connection is refused (closed at once, with a warning naming the two).

    Handover rules (each one logged at INFO with both sessions named):

    * the standby starts a receive queue (started and enabled) while the active's receive
      queues are all stopped: the standby becomes active (the migration's switch-over: the
      source stops its rings with GET_VRING_BASE before the destination starts its own);
      the former active one stays connected as the standby (a source QEMU in
      "postmigrate" keeps its connection until it quits);
    * the active front-end stops its receive queues while the standby's run: likewise;
    * the active front-end disconnects: the standby (running or not) becomes active.

    A standby that starts its receive queue while the active one's still runs does NOT
    take the port: QEMU never does this in a correct migration (the source stops first),
    so it is a wrong set-up (a second guest on the same socket) or a hostile front-end, and
    the guest already running keeps its network. It is logged as a warning; the standby
    takes over as soon as the active one stops or goes away. Frames are never delivered
    to two front-ends. The standby slot is first come, first served: while one waits, no
    other front-end can connect (quit the source QEMU of a finished migration to free it).

    After the last front-end goes away the next one gets a fresh device (a reconnecting
    QEMU, a restarted DPDK) on the same counters, and the addresses learned on the port
    stay in the switch's table. A port that connects (``connect=True``) serves one
    front-end at a time.
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
        """The active front-end's NIC (None without a front-end)."""
        self.session: BackendSession | None = None
        """The active front-end's session."""
        self.standby: BackendSession | None = None
        """A second front-end waiting to take the port over (a migration's destination)."""
        self.sessions = 0
        self.handovers = 0
        self.refused = 0
        self.last_close_reason: str | None = None
        self._standby_warned = False  # the standby running beside the active was reported
        self._echo_sink = EchoSink()
        # Check the arguments before binding anything.
        self._make_device()
        # One more than we keep, so that a third front-end is turned away here, with a
        # message that says why (see _on_session).
        self.server = BackendServer(
            switch.reactor, path, self._make_device, connect=connect, max_sessions=3,
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
            dev.accelerator = self._compiled_burst
        return dev

    def _compiled_burst(self, dev: VirtioNetDevice, index: int, ring: Any,
                        budget: int) -> tuple[int, bool]:
        """The compiled transmit burst for the active front-end; a standby's transmit
        ring goes through the Python engine, which hands its frames to :meth:`on_frames`
        (dropped there)."""
        if dev is not self.device:
            return 0, False
        return self.switch.compiled_burst(self, dev, index, ring, budget)

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
        if self.session is not None and self.standby is not None:
            # Refused before anything is read: at most one standby (see the class doc).
            self.refused += 1
            reason = (f"refused: port {self.name} already has an active front-end "
                      f"({self.session.name}) and a standby one ({self.standby.name})")
            log.warning(
                "%s: refusing a third front-end on %s (%s): %s is active and %s stands by "
                "(a migration's destination or a finished migration's source); one port "
                "keeps at most one standby, so quit one of them first", self.name,
                self.path, s.name, self.session.name, self.standby.name)
            s.close(reason)
            return
        # BackendServer has no "session closed" hook of its own: chain ours in front.
        original = s.on_close

        def closed(sess: BackendSession) -> None:
            self._session_closed(sess)
            if original is not None:
                original(sess)

        s.on_close = closed
        # Heard after the device (which updates its receive pairs first) and the shell.
        s.conn.dispatcher.subscribe(functools.partial(self._on_event, s))
        self.sessions += 1
        if self.session is None:
            self._activate(s)
            log.info("%s: front-end connected (%s)", self.name, s.name)
        else:
            self.standby = s
            self._standby_warned = False
            log.info(
                "%s: second front-end connected (%s) while %s is active: it stands by and "
                "takes the port over when it starts its receive queue with %s's stopped "
                "(a live migration's destination), or when %s goes away", self.name,
                s.name, self.session.name, self.session.name, self.session.name)

    @staticmethod
    def _net_device(s: BackendSession | None) -> VirtioNetDevice | None:
        dev = None if s is None else s.device
        return dev if isinstance(dev, VirtioNetDevice) else None

    def _running(self, s: BackendSession | None) -> bool:
        """True while ``s`` has a receive queue started and enabled."""
        dev = self._net_device(s)
        return dev is not None and dev.link_up

    def _activate(self, s: BackendSession) -> None:
        """Make ``s`` the NIC. Frames the previous one was given are published first (its
        receive queues are stopped or stopping: nothing more goes there)."""
        old = self.device
        if old is not None:
            old.publish_rx()
        self.session = s
        self.device = self._net_device(s)

    def _handover(self, why: str, *, gone: bool = False) -> None:
        """Make the standby front-end active (it exists); the active one becomes the
        standby, or is forgotten (``gone``: it went away)."""
        new, old = self.standby, self.session
        assert new is not None and old is not None
        self.standby = None if gone else old
        self._standby_warned = False
        self._activate(new)
        self.handovers += 1
        log.info("%s: handover #%d: %s takes the port from %s: %s%s", self.name,
                 self.handovers, new.name, old.name, why,
                 "" if gone else f"; {old.name} stands by until it goes away")

    def _on_event(self, s: BackendSession, e: ev.Event) -> None:
        """A session's ring changed: apply the handover rules (see the class doc). Never
        raises (an exception here would be taken for the front-end's fault)."""
        if not isinstance(e, _RING_EVENTS) or s.closed or self.closed:
            return
        active, standby = self.session, self.standby
        if standby is None or s not in (active, standby):
            return
        if not self._running(standby):
            self._standby_warned = False
            return
        # vhost-user.rst "Migration": the source stops its rings (GET_VRING_BASE) before
        # the destination starts its own; "running" is a receive ring started and, with
        # VHOST_USER_F_PROTOCOL_FEATURES, enabled (vhost-user.rst "Ring states").
        if not self._running(active):
            if s is standby:
                self._handover("it started its receive queue; the active front-end's are "
                               "stopped: a live migration's switch-over")
            else:
                self._handover("the active front-end stopped its receive queues; the "
                               "standby's already run")
        elif not self._standby_warned:
            self._standby_warned = True
            assert active is not None
            log.warning(
                "%s: standby front-end %s started its receive queue while the active %s's "
                "still runs: %s keeps the port and %s gets no frames (what it sends is "
                "dropped) until %s stops its rings or goes away; QEMU never does this in a "
                "correct migration (the source stops first): two guests on one socket?",
                self.name, standby.name, active.name, active.name, standby.name,
                active.name)

    def _session_closed(self, s: BackendSession) -> None:
        dev = self._net_device(s)
        if s is self.session and self.standby is not None:
            self.last_close_reason = s.close_reason
            self._handover(f"{s.name} went away ({s.close_reason})", gone=True)
        elif s is self.session:
            self.session = None
            self.device = None
            self.last_close_reason = s.close_reason
            # The addresses learned here stay (aging removes them if nobody comes back): a
            # front-end that reconnects (QEMU reconnect=1, a --connect port dialing again)
            # is reached at once instead of by flooding. Frames for them meanwhile are
            # counted here as rx_down. The counters stay too: one port, one set.
            log.info("%s: front-end gone: %s", self.name, s.close_reason)
        elif s is self.standby:
            self.standby = None
            self._standby_warned = False
            log.info("%s: standby front-end %s gone: %s", self.name, s.name, s.close_reason)
        if dev is not None:
            # Release the device's views of guest memory so the mapping goes now.
            dev.close()
            reap_deferred()

    # -- FrameSink (the device hands us what its driver transmitted) ------------------------
    def on_frames(
        self,
        dev: VirtioNetDevice,
        pair: int,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
    ) -> None:
        """Forward a burst into the switch (published at :meth:`commit`); a standby's
        frames are dropped (counted ``standby``): it is not the port's NIC yet."""
        if dev is not self.device:
            self.counters.drop(STANDBY_DROP, len(frames))
            return
        self.switch.forward(self, frames, hdrs, pair)

    def commit(self, dev: VirtioNetDevice) -> None:
        """Our transmit buffers are back with the driver: publish the copies."""
        self.switch.commit()

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        """SEND_RARP from the front-end: re-learn and announce (from a standby too: it is
        the same NIC, and the announcement only re-learns the MAC on this port)."""
        if dev is not self.device:
            log.info("%s: RARP announcement from the standby front-end", self.name)
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
        """Port description: path, mode, front-end state (the active one, and the standby
        if any), counters."""
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
            "session": self.session.name if self.session is not None else None,
            "standby": self._standby_info(),
            "handovers": self.handovers,
            "refused": self.refused,
        })
        return out

    def _standby_info(self) -> dict[str, Any] | None:
        s = self.standby
        if s is None:
            return None
        dev = self._net_device(s)
        return {"session": s.name, "running": self._running(s),
                "rx_pairs": dev.rx_pairs if dev is not None else [],
                "features": dev.features if dev is not None else None}

    def close(self) -> None:
        """Close the session and the listener (the socket file is removed). Idempotent."""
        if self.closed:
            return
        super().close()
        self.server.close()
        self.device = None
        self.session = None
        self.standby = None


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
