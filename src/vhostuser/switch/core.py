"""The learning switch: a forwarding fabric and its ports on one reactor.

:class:`Switch` forwards frames between ports on one :class:`~vhostuser.io.reactor.Reactor`
(one thread serves every control socket and ring). The decisions (learning, lookup,
flooding, aging) are the pure :class:`~vhostuser.switch.fabric.Fabric`; this module
supplies the clock, the ports (:mod:`vhostuser.switch.ports`) and the publication rule:
frames delivered during a transmit burst are published once the burst's transmit buffers
are back (:meth:`Switch.commit`).

Two modes: event-driven (default; sessions sleep in epoll until a kick) and busy-poll
(``busy_poll=True``; each port's session polls its transmit queues with kicks suppressed,
Snabb's model). Either way every transmit burst runs through the queue's
:class:`~vhostuser.virtq.runner.QueueRunner`, then ``VirtioNetDevice.run_queue`` and
:meth:`Switch.forward`.

:class:`SwitchThread` runs a switch on its own reactor thread for tests and embedding.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import engine as engines
from ..devices.net import VirtioNetDevice, build_rarp, format_mac
from ..io.pcap import PcapWriter
from ..io.reactor import Reactor, Timer
from ..io.thread import ReactorThread
from .fabric import DEFAULT_AGING, DEFAULT_MAX_MACS, Fabric
from .ports import Port, TapPort, VhostUserPort

__all__ = ["DEFAULT_AGING", "DEFAULT_MAX_MACS", "Switch", "SwitchThread"]

log = logging.getLogger(__name__)


class Switch:
    """A learning Ethernet switch on a reactor (see the module docstring).

    Args:
        reactor: the reactor every port runs on.
        aging: seconds a learned address lives without traffic.
        max_macs: most addresses learned at once.
        busy_poll: spin over transmit queues instead of sleeping on kicks.
        mac_prefix: first three bytes of the MACs given to ports without one.
        engine: ``auto``, ``python`` or ``compiled`` (see :mod:`vhostuser.engine`; None:
            ``$VHOSTUSER_ENGINE``, else auto).

    Raises:
        ValueError: bad aging or table size; EngineUnavailableError (a ValueError) for an
            engine that is unknown or not built.
    """

    def __init__(
        self,
        reactor: Reactor,
        *,
        aging: float = DEFAULT_AGING,
        max_macs: int = DEFAULT_MAX_MACS,
        busy_poll: bool = False,
        mac_prefix: bytes = b"\x52\x54\x00",
        engine: str | None = None,
    ) -> None:
        self.fabric = Fabric(aging=aging, max_macs=max_macs)
        self.engine = engines.select(engine)
        """The burst engine that runs: ``python`` or ``compiled``."""
        self._fp = engines.compiled() if self.engine == "compiled" else None
        self.reactor = reactor
        self.aging = aging
        self.max_macs = max_macs
        self.busy_poll = busy_poll
        self.ports: list[Port] = []
        self.started = time.monotonic()
        self._mac_prefix = mac_prefix
        self._mac_seq = 0
        self._unpublished: list[Port] = []
        self._closed = False
        self._aging_timer: Timer | None = reactor.call_later(
            min(self.aging / 4, 10.0), self._age)
        self._capture_dir: str | None = None
        self._snaplen = 65535
        self._captures: dict[int, PcapWriter] = {}  # id(port) -> its pcap file

    # -- capture ------------------------------------------------------------------------------
    def start_capture(self, directory: str, *, snaplen: int = 65535) -> None:
        """Write every port's frames, both directions, to ``directory``/PORT.pcap.

        A port's file holds what it received (from its guest, tap or peer) and what the
        switch delivered to it, in order, with timestamps: as many frames as its
        ``rx_frames`` and ``tx_frames`` counters say (frames dropped on the way out, for a
        full ring or a port without a front-end, are counted as drops, not captured). The
        files are written by threads of their own from bounded queues, so a slow disk never
        holds forwarding up: when a queue is full the frame is counted as dropped
        (``capture`` in each port's :meth:`stats`). While capturing, every frame goes
        through the Python engine (the compiled one hands frames straight from ring to ring
        and never sees them). Ports added later are captured too; echo ports are not (their
        frames never enter the switch: the port reflects them itself).

        Raises:
            OSError: the directory is missing or not writable (named in the message).
            ValueError: ``snaplen`` below 1.
        """
        if snaplen < 1:
            raise ValueError(f"snaplen {snaplen} must be at least 1")
        if not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "no such directory for pcap files",
                                    directory)
        self.stop_capture()
        self._capture_dir = directory
        self._snaplen = snaplen
        for p in self.ports:
            self._capture_port(p)

    def _capture_port(self, port: Port) -> None:
        if self._capture_dir is None or id(port) in self._captures:
            return
        path = os.path.join(self._capture_dir, f"{port.name}.pcap")
        self._captures[id(port)] = PcapWriter(path, snaplen=self._snaplen)

    def stop_capture(self) -> dict[str, dict[str, Any]]:
        """Finish and close every pcap file; return each port's capture counters."""
        out: dict[str, dict[str, Any]] = {}
        names = {id(p): p.name for p in self.ports}
        for key, w in self._captures.items():
            w.close()
            out[names.get(key, w.path)] = w.counters()
        self._captures.clear()
        self._capture_dir = None
        return out

    def capture_counters(self, port: Port) -> dict[str, Any] | None:
        """The capture counters of ``port`` (None when not capturing)."""
        w = self._captures.get(id(port))
        return None if w is None else w.counters()

    # -- the fabric's state, for scripts and tests -------------------------------------------
    @property
    def macs(self) -> dict[bytes, list[Any]]:
        """address -> [port, last seen (monotonic seconds)]."""
        return self.fabric.macs

    @property
    def flooded(self) -> int:
        """Frames flooded (broadcast, multicast, unknown unicast)."""
        return self.fabric.flooded

    @property
    def filtered(self) -> int:
        """Frames dropped because their destination is on their ingress port."""
        return self.fabric.filtered

    @property
    def learn_refused(self) -> int:
        """Source addresses not learned because the table was full."""
        return self.fabric.learn_refused

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
        self._capture_port(port)
        self.fabric.members.append(port)
        return port

    def add_echo_port(self, path: str, *, name: str | None = None, **kw: Any) -> VhostUserPort:
        """Add an echo port: a vhost-user NIC that reflects every frame to its sender.

        Raises:
            ValueError, OSError, VhostUserError: as :meth:`add_vhost_user_port`.
        """
        self._check_path(path)
        port = VhostUserPort(self, self._name(name, "echo"), path, echo=True, **kw)
        self.ports.append(port)
        self._capture_port(port)
        return port

    def add_tap_port(self, ifname: str, *, name: str | None = None, up: bool = True) -> TapPort:
        """Add a kernel tap interface (created if absent; needs root).

        Raises:
            ValueError: bad or duplicate name.
            OSError: no permission or no /dev/net/tun.
        """
        port = TapPort(self, self._name(name, ifname), ifname, up=up)
        self.ports.append(port)
        self._capture_port(port)
        self.fabric.members.append(port)
        return port

    def remove_port(self, port: Port) -> None:
        """Close a port and forget it (its pcap file, if capturing, is finished)."""
        w = self._captures.pop(id(port), None)
        if w is not None:
            w.close()
        port.close()
        self.port_down(port)
        if port in self.ports:
            self.ports.remove(port)
        if port in self.fabric.members:
            self.fabric.members.remove(port)

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

        The fabric learns every source address and stages each frame for its output
        port(s); each output port then gets its frames in one call (one receive burst).
        Frames are copied into the output ports before this returns; vhost-user ports
        hold them back until :meth:`commit`.
        """
        captures = self._captures
        if captures:
            w = captures.get(id(src))
            if w is not None:
                for f in frames:
                    w.capture(f)
        touched = self.fabric.forward(src, frames, hdrs, time.monotonic())
        for p in touched:
            try:
                if captures and (w := captures.get(id(p))) is not None:
                    # Only what reached the port: a full ring or a port without a
                    # front-end drops from the end of the burst (counted there).
                    before = p.counters.tx_frames
                    p.send(p.out, p.staged_hdrs(), pair)
                    for f in p.out[: p.counters.tx_frames - before]:
                        w.capture(f)
                else:
                    p.send(p.out, p.staged_hdrs(), pair)
            finally:
                p.clear_out()
        touched.clear()

    def announce(self, src: Port, mac: bytes) -> None:
        """SEND_RARP: learn ``mac`` on ``src`` and flood a RARP announcement from it."""
        self.fabric.learn(src, mac, time.monotonic())
        src.counters.rx_frames += 1
        frame = build_rarp(bytes(mac))
        src.counters.rx_bytes += len(frame)
        self.forward(src, [memoryview(frame)], None, 0)
        self.commit()
        log.info("%s: RARP announcement for %s", src.name, format_mac(bytes(mac)))

    def port_down(self, port: Port) -> None:
        """Forget every address learned on ``port`` (it is being removed). A front-end
        that merely goes away keeps them: it may reconnect (see VhostUserPort)."""
        self.fabric.forget_member(port)

    def _age(self) -> None:
        self._aging_timer = None
        if self._closed:
            return
        self.fabric.age(time.monotonic())
        self._aging_timer = self.reactor.call_later(min(self.aging / 4, 10.0), self._age)

    def compiled_burst(self, port: Port, dev: VirtioNetDevice, index: int, ring: Any,
                       budget: int) -> tuple[int, bool]:
        """One transmit burst of ``port`` through the compiled engine: frames are switched
        straight from the transmit ring into the destinations' receive rings (published at
        :meth:`commit`). Returns ``(taken, complete)``: the chains taken, and False when
        the Python engine must take the next chain (a layout, a destination or a state the
        compiled engine leaves to it)."""
        fp = self._fp
        if fp is None or self._captures:  # capture needs every frame in Python's hands
            return 0, False
        fabric = self.fabric
        members = [m for m in fabric.members if m is not port]
        if len(members) > 64:
            return 0, False
        dsts = [m.compiled_target() for m in members]
        flood = tuple(range(len(members)))
        index_of = {id(m): i for i, m in enumerate(members)}
        now = time.monotonic()
        fabric_decide = fabric.decide

        def decide(key: bytes) -> tuple[tuple[int, ...], int]:
            out = fabric_decide(port, key, now)
            if out is None:
                return flood, 1
            if out is port:
                return (), 2
            return (index_of[id(out)],), 0

        src = dev.compiled_tx_source(ring)
        if src is None:
            return 0, False
        taken, rx_bytes, flooded, filtered, per, stop = fp.forward(
            src, dsts, decide, budget)
        if taken:
            port.counters.rx_frames += taken
            port.counters.rx_bytes += rx_bytes
            fabric.flooded += flooded
            fabric.filtered += filtered
        for m, (frames, nbytes, nobuf) in zip(members, per, strict=True):
            if frames or nobuf:
                m.compiled_delivered(frames, nbytes, nobuf)
                if frames:
                    self.to_publish(m)
        return int(taken), stop in ("done", "empty")

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
        return [{"mac": format_mac(m), "port": port.name, "age": round(age, 1)}
                for m, port, age in self.fabric.table(time.monotonic())]

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot: every port with its counters, and switch totals."""
        return {
            "time": time.time(),
            "uptime": round(time.monotonic() - self.started, 3),
            "mode": "busy-poll" if self.busy_poll else "event",
            "engine": self.engine,
            "macs": len(self.macs),
            "flooded": self.flooded,
            "filtered": self.filtered,
            "learn_refused": self.learn_refused,
            "ports": [self._port_info(p) for p in self.ports],
        }

    def _port_info(self, port: Port) -> dict[str, Any]:
        info = port.info()
        counters = self.capture_counters(port)
        if counters is not None:
            info["capture"] = counters
        return info

    def close(self) -> None:
        """Close every port (sockets removed, taps closed) and stop polling. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._aging_timer is not None:
            self._aging_timer.cancel()
            self._aging_timer = None
        self.stop_capture()
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
