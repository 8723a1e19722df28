"""The back-end's I/O shell: sockets, kick/call eventfds and mappings around the core.

:class:`BackendSession` drives one :class:`~vhostuser.connection.BackendConnection` over a
connected AF_UNIX socket on a :class:`~vhostuser.io.reactor.Reactor`: it reads with
``recvmsg`` (fds wrapped at once), feeds the core, sends its replies, registers kick fds,
runs ring bursts and signals call fds. :class:`BackendServer` accepts front-ends on a
listening socket (like QEMU's ``-chardev socket,server=on``) or connects to a listening
front-end and reconnects when it goes away (like ``reconnect=``).

A violation by one front-end closes that session only; every fd and mapping it held is
released, and the reactor and other sessions go on.

With ``inband_notifications=True`` INBAND_NOTIFICATIONS is offered: rings whose kick or
call was set with the invalid-fd flag are kicked by VRING_KICK and called by
BACKEND_VRING_CALL, written to the back-end channel without ever blocking the reactor (a
bounded queue, see :data:`CHANNEL_QUEUE`). A device with a state (``Device.save_state``)
gets DEVICE_STATE: its state moves through the front-end's pipe on the reactor, never
blocking it either.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from ..connection import events as ev
from ..connection.backend import STATE_SAVE, BackendConnection, Dialect, StateTransfer
from ..connection.frontend import BackendChannel
from ..connection.snapshot import SessionSnapshot, snapshot_backend
from ..devices.base import Device
from ..errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError, VhostUserError
from ..protocol import payloads as P
from ..protocol.enums import BackendRequest, ProtocolFeature
from ..virtq.burst import BurstResult
from ..virtq.runner import QueueRunner
from . import memguard
from .fdpass import (
    OwnedFd,
    connect_unix,
    listen_unix,
    recv_some,
    send_msg,
    socket_identity,
    unlink_socket,
)
from .mapping import Mapping, map_region_fd, reap_deferred
from .reactor import Reactor, Timer

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")

DEFAULT_BUDGET = 256
"""Chains per ring per pass: a flood on one queue cannot starve the others."""

MESSAGE_DEADLINE = 5.0
"""Seconds a started message may take to arrive whole (docs/security.md rule 6)."""

UNSHARED_GRACE = 1.0
"""Seconds after a kick fd is set during which a ring's first empty kick is not taken as
a sign of unshared memory: QEMU kicks every ring once when it starts it, before the
driver published anything (so that no kick is lost across the switch of notifiers)."""

UNSHARED_GAP = 0.05
"""A second empty kick on the same ring at least this long after its first one counts
even within the grace period: QEMU's start-up kick comes once per ring."""

UNSHARED_KICKS = 1
"""Kicks that found nothing, with no ring ever having moved (and past the start-up kicks:
:data:`UNSHARED_GRACE`, :data:`UNSHARED_GAP`), after which a session says (once) that the
guest's memory is probably not shared with us. A driver kicks only after publishing a
buffer, so such a kick means we look at a copy of guest RAM the guest does not write
(QEMU's RAM mapped MAP_PRIVATE). One is enough, and needed: such a driver kicks each ring
about once, since with EVENT_IDX it reads our ``avail_event`` from its own copy, where it
stays 0 (virtio 1.2 2.7.10)."""

LOOP_WINDOW = 2.0
LOOP_SESSIONS = 20
"""A listener that starts LOOP_SESSIONS sessions within LOOP_WINDOW seconds is being
reconnected to in a tight loop (a front-end that retries at once whatever went wrong)."""

LOOP_LOG_INTERVAL = 10.0
"""Seconds between two reports of a tight reconnect loop."""

CHANNEL_QUEUE = 64
"""Back-end requests other than VRING_CALL that may wait for the back-end channel (a
front-end that does not read it); more are dropped, counted and logged. In-band calls
wait at most one per ring: a call still queued already covers every later used buffer."""

CHANNEL_UNACKED = 32
"""Requests sent on the back-end channel whose REPLY_ACK ack has not come back, after
which more wait in the queue (vhost-user.rst "In-band notifications" wants the acks to
pace the sender; waiting in the reactor is never an option)."""

CHANNEL_RETRY = (0.005, 0.2)
"""First and longest delay (s) between tries to write to a full back-end channel."""

STATE_CHUNK = 65536
"""Bytes per read or write of a device-state pipe."""

STATE_DEADLINE = 30.0
"""Seconds a device-state save may wait for the front-end to read the pipe; then the
transfer fails and the pipe is closed (CHECK_DEVICE_STATE reports it)."""


class ShellHost:
    """The :class:`~vhostuser.connection.BackendHost` of the real shell.

    ``on_mapped`` is called with every guest memory mapping made (the session watches the
    SIGBUS guard of unsealed ones).
    """

    def __init__(self, on_mapped: Callable[[Mapping], None] | None = None) -> None:
        self.on_mapped = on_mapped

    def map_region(self, fd: OwnedFd, *, mmap_offset: int, size: int) -> Mapping:
        """Map a region fd (consumes it). See :func:`map_region_fd`.

        Raises:
            GuestMemoryError: see :func:`map_region_fd`.
        """
        mapping = map_region_fd(fd, mmap_offset=mmap_offset, size=size)
        if self.on_mapped is not None:
            self.on_mapped(mapping)
        return mapping

    def release_fd(self, fd: OwnedFd) -> None:
        """Close an fd the core owned."""
        fd.close()

    def alloc_shared(self, size: int) -> tuple[OwnedFd, Mapping]:
        """A zeroed, shrink-sealed memfd of ``size`` bytes and our mapping of it.

        Raises:
            OSError: memfd_create, ftruncate or mmap failed.
        """
        fd = OwnedFd(os.memfd_create("vhostuser-inflight",
                                     os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        try:
            os.ftruncate(fd.fd, size)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd.fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapping = map_region_fd(OwnedFd(os.dup(fd.fd)), mmap_offset=0, size=size)
        except BaseException:
            fd.close()
            raise
        return fd, mapping

    def check_notify_fd(self, fd: OwnedFd, what: str) -> None:
        """Refuse kick/call/err fds that are not an eventfd or a pipe.

        A socket or regular file would be readable forever and spin the reactor.

        Raises:
            RemoteProtocolError: the fd is of another kind (named in the message).
        """
        st = os.fstat(fd.fd)
        if stat.S_ISFIFO(st.st_mode):
            return
        try:
            target = os.readlink(f"/proc/self/fd/{fd.fd}")
        except OSError:
            target = "?"
        if target == "anon_inode:[eventfd]":
            return
        raise RemoteProtocolError(f"{what} is {target}, not an eventfd or a pipe")

    def check_state_fd(self, fd: OwnedFd, what: str) -> None:
        """Refuse a device-state fd that is not a pipe or a socket (the reactor can only
        wait on those; vhost-user.rst asks for something that "behaves like a pipe").

        Raises:
            RemoteProtocolError: the fd is of another kind (named in the message).
        """
        mode = os.fstat(fd.fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise RemoteProtocolError(f"{what} is not a pipe or a socket (mode {mode:#o})")

    def check_socket_fd(self, fd: OwnedFd, what: str) -> None:
        """Refuse a back-end channel fd that is not a connected AF_UNIX stream socket.

        Raises:
            RemoteProtocolError: the fd is of another kind (named in the message).
        """
        st = os.fstat(fd.fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise RemoteProtocolError(f"{what} is not a socket (mode {st.st_mode:#o})")
        with socket.socket(fileno=os.dup(fd.fd)) as probe:
            if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
                raise RemoteProtocolError(
                    f"{what} is a {probe.family.name}/{probe.type.name} socket, "
                    "not AF_UNIX stream"
                )


def signal_fd(fd: OwnedFd | None) -> None:
    """Write one notification to an eventfd (call/err); a full counter is fine."""
    if fd is None or fd.closed:
        return
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(fd.fd, _ONE)


def drain_fd(fd: OwnedFd) -> None:
    """Read (and discard) a pending notification from an eventfd or pipe."""
    with contextlib.suppress(BlockingIOError, InterruptedError):
        os.read(fd.fd, 8)


class BackendSession:
    """One connected front-end, served on a reactor."""

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        device: Device,
        *,
        on_close: Callable[[BackendSession], None] | None = None,
        dialect: Dialect = Dialect.CURRENT,
        budget: int = DEFAULT_BUDGET,
        name: str = "vhost-user",
        busy_poll: bool = False,
        inband_notifications: bool = False,
    ) -> None:
        sock.setblocking(False)
        self.reactor = reactor
        self.sock = sock
        self.device = device
        self.name = name
        self.budget = budget
        self.busy_poll = busy_poll
        self.on_close = on_close
        self.conn: BackendConnection[OwnedFd] = BackendConnection(
            device, ShellHost(self._watch_mapping), dialect=dialect, name=name,
            inband_notifications=inband_notifications,
        )
        # The shell hears every event right after the device, in order, as it happens
        # (one dispatcher: connection/dispatch.py), also in the middle of a chunk.
        self.conn.dispatcher.subscribe(self._on_event)
        self.closed = False
        self.close_reason: str | None = None
        self.final_snapshot: SessionSnapshot | None = None
        """The session's protocol state as it was when it closed (see :meth:`snapshot`)."""
        self._kick_fds: dict[int, int] = {}  # ring index -> registered fd number
        self._deadline: Timer | None = None
        self._polled: set[int] = set()  # queues the poller steps (busy-poll, or no kick fd)
        self._nofd: set[int] = set()  # queues without a kick fd (VRING_NOFD_MASK)
        self._runners: dict[int, QueueRunner] = {}
        self._poller_added = False
        self.events: list[ev.Event] = []
        """Recent events, for tests and tools (bounded)."""
        self._channel: BackendChannel[OwnedFd] | None = None
        self._channel_sock: socket.socket | None = None
        # Back-end channel output, never written with a blocking call: whole requests
        # waiting (request, payload, ring of a VRING_CALL), the unsent rest of the one
        # being written, the rings with a call queued, and acks still to come.
        self._chan_queue: collections.deque[
            tuple[BackendRequest, P.Payload | None, int | None]] = collections.deque()
        self._chan_partial: memoryview | None = None
        self._chan_calls: set[int] = set()
        self._chan_unacked = 0
        self._chan_timer: Timer | None = None
        self._chan_delay = CHANNEL_RETRY[0]
        self.channel_drops = 0
        """Back-end requests dropped: queue full, or an in-band call of a ring that
        stopped before the front-end read the channel."""
        self.inband_calls = 0
        """BACKEND_VRING_CALL messages written to the back-end channel."""
        # Device-state transfer: our duplicate of the pipe fd, its timers.
        self._state_fd: int | None = None
        self._state: StateTransfer[OwnedFd] | None = None
        self._state_timer: Timer | None = None
        self._state_deadline = 0.0
        self.empty_kicks = 0
        """Kicks that found nothing available while no ring had ever shown a buffer."""
        self._work_seen = False
        self._first_avail: dict[int, int] = {}  # ring -> next_avail when it started
        self._kick_set_at = 0.0  # reactor time the last kick fd was set
        self._empty_kick_at: dict[int, float] = {}  # ring -> time of its first empty kick
        reactor.add_reader(sock.fileno(), self._on_readable)
        device.attach(self)

    def snapshot(self) -> SessionSnapshot:
        """The session's protocol state now (features, memory table, rings), comparable
        with ``==`` and :meth:`SessionSnapshot.diff` to another session's."""
        if self.final_snapshot is not None:
            return self.final_snapshot
        return snapshot_backend(self.conn)

    # -- QueueAccess (what the device may do with our rings) ------------------------------
    def ring(self, index: int) -> Any:
        """The started, unbroken engine of ring ``index``, or None."""
        if self.closed or not 0 <= index < len(self.conn.vrings):
            return None
        v = self.conn.vrings[index]
        if not v.started or v.broken is not None:
            return None
        return v.engine

    def enabled(self, index: int) -> bool:
        """True if ring ``index`` is enabled."""
        return 0 <= index < len(self.conn.vrings) and self.conn.vrings[index].enabled

    def notify(self, index: int) -> None:
        """Signal ring ``index``'s call fd, or send BACKEND_VRING_CALL when its calls are
        in-band (see :meth:`BackendConnection.call_inband`)."""
        if not self.closed and 0 <= index < len(self.conn.vrings):
            self._signal_call(index)

    def _signal_call(self, index: int) -> None:
        call = self.conn.vrings[index].call
        if call is not None:
            signal_fd(call)
        elif self.conn.call_inband(index):
            self._queue_call(index)

    def ring_broken(self, index: int, reason: str) -> None:
        """The device found ring ``index`` broken by the guest."""
        if not self.closed and self.conn.vrings[index].broken is None:
            self.conn.ring_broken(index, reason)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on this session's reactor after ``delay`` seconds."""
        return self.reactor.call_later(delay, callback)

    # -- guest memory that shrinks under us --------------------------------------------------
    def _watch_mapping(self, mapping: Mapping) -> None:
        """Close this session (only) if the front-end truncates an unsealed region's file."""
        if mapping.guard is not None:
            mapping.guard.watch(self.reactor, functools.partial(self._memory_lost, mapping))

    def _memory_lost(self, mapping: Mapping, fault: memguard.Fault) -> None:
        # docs/security.md "memory": a truncated region must end this connection, not the process.
        if self.closed:
            return
        reason = (
            f"guest memory lost: the front-end shrank the file behind a memory region "
            f"under our mapping ({mapping.length:#x} bytes mapped, file offset "
            f"{fault.offset:#x} gone, {fault.count} fault(s) caught); give guest memory "
            "as a sealed memfd (QEMU: memory-backend-memfd) or never truncate it")
        log.error("%s: %s; closing this session only", self.name, reason)
        self.close(reason)

    # -- control socket ---------------------------------------------------------------------
    def _on_readable(self) -> None:
        if self.closed:
            return
        try:
            data, fds = recv_some(self.sock, self.conn.wanted())
        except BlockingIOError:
            return
        except (PeerClosedError, RemoteProtocolError, OSError) as exc:
            self.close(f"receive failed: {exc}")
            return
        try:
            # Events reach _on_event as they happen (it subscribes to the core).
            self.conn.receive_data(data, fds)
        except RemoteProtocolError as err:
            self._flush()
            self.close(f"protocol violation: {err}")
            return
        self._flush()
        if not data:
            self.close("front-end closed the connection")
            return
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.conn.in_message:
            self._deadline = self.reactor.call_later(MESSAGE_DEADLINE, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.conn.in_message and not self.closed:
            self.close(
                f"a message did not arrive whole within {MESSAGE_DEADLINE} s "
                f"({self.conn._decoder.bytes_pending} bytes pending)"
            )

    def _flush(self) -> None:
        for data, fds in self.conn.data_to_send():
            try:
                send_msg(self.sock, data, [f.fd for f in fds])
            except (PeerClosedError, MessageTimeoutError, OSError) as e:
                log.warning("%s: send failed: %s", self.name, e)
            finally:
                for f in fds:
                    f.close()

    # -- events -----------------------------------------------------------------------------
    def _on_event(self, e: ev.Event) -> None:
        self.events.append(e)
        if len(self.events) > 1000:
            del self.events[:500]
        if isinstance(e, ev.VringFdSet) and e.kind == "kick":
            self._kick_set_at = self.reactor.time()
            self._set_kick(e.index, e.fd)
        elif isinstance(e, ev.VringStarted | ev.VringEnabled):
            if isinstance(e, ev.VringStarted) and (ring := self.ring(e.index)) is not None:
                self._first_avail[e.index] = ring.next_avail
            self._wake(e.index)
        elif isinstance(e, ev.VringKicked):
            # In-band kick: run the first burst now, so that the ack a front-end asked
            # for (REPLY_ACK) goes out after the ring was processed.
            self._wake(e.index, now=True)
        elif isinstance(e, ev.VringStopped):
            self._drop_queued_call(e.index)
            self._unregister_kick(e.index)
            self._nofd.discard(e.index)
            runner = self._runners.get(e.index)
            if runner is not None:
                runner.forget()
        elif isinstance(e, ev.VringBroken):
            err = self.conn.vrings[e.index].err
            if err is not None:
                signal_fd(err)
            elif self.conn.err_inband(e.index):
                # vhost-user.rst BACKEND_VRING_ERR: state.num is reserved, 0.
                self.send_backend_request(BackendRequest.VRING_ERR,
                                          P.VringState(index=e.index, num=0))
        elif isinstance(e, ev.DeviceReset):
            for i in list(self._kick_fds):
                self._unregister_kick(i)
            self._polled.clear()
            self._nofd.clear()
            self._runners.clear()
            self._close_channel()
            self._end_state_io()
        elif isinstance(e, ev.BackendChannelSet):
            self._open_channel(e.fd)
        elif isinstance(e, ev.DeviceStateTransfer):
            self._start_state_io(e.fd, e.transfer)
        elif isinstance(e, ev.DeviceStateChecking):
            # The front-end is done with the pipe: take what it holds, then close ours.
            self._state_step(final=True)
            self._end_state_io()

    # -- back-end -> front-end channel ------------------------------------------------------
    def _open_channel(self, fd: OwnedFd) -> None:
        self._close_channel()
        # The core owns ``fd``; the shell talks through its own duplicate.
        sock = socket.socket(fileno=os.dup(fd.fd))
        sock.setblocking(False)
        self._channel_sock = sock
        self._channel = BackendChannel(
            "backend", reply_ack=self.conn.has(ProtocolFeature.REPLY_ACK), name=self.name
        )
        self.reactor.add_reader(sock.fileno(), self._on_channel_readable)

    def _close_channel(self) -> None:
        if self._channel_sock is not None:
            self.reactor.remove_reader(self._channel_sock.fileno())
            self._channel_sock.close()
        self._channel_sock = None
        self._channel = None
        if self._chan_queue or self._chan_partial is not None:
            log.debug("%s: back-end channel closed with %d request(s) unsent", self.name,
                      len(self._chan_queue) + (self._chan_partial is not None))
        self._chan_queue.clear()
        self._chan_calls.clear()
        self._chan_partial = None
        self._chan_unacked = 0
        if self._chan_timer is not None:
            self._chan_timer.cancel()
            self._chan_timer = None

    def _on_channel_readable(self) -> None:
        if self._channel_sock is None or self._channel is None:
            return
        try:
            data, fds = recv_some(self._channel_sock)
        except BlockingIOError:
            return
        except (PeerClosedError, RemoteProtocolError, OSError) as e:
            log.warning("%s: back-end channel: %s", self.name, e)
            self._close_channel()
            return
        try:
            for got in self._channel.receive_data(data, fds):
                if isinstance(got, ev.ReplyReceived):
                    self._chan_unacked = max(0, self._chan_unacked - 1)
                    if P.U64.unpack(got.payload)[0] != 0:
                        log.warning("%s: front-end NACKed back-end request %d", self.name,
                                    got.request)
        except RemoteProtocolError as err:
            for f in self._channel.take_fds():
                f.close()
            log.warning("%s: back-end channel: %s", self.name, err)
            self._close_channel()
            return
        if not data:
            self._close_channel()
            return
        self._pump_channel()  # acks came back: what waited for them may go

    def send_backend_request(self, req: BackendRequest, payload: P.Payload | None = None) -> bool:
        """Queue a request for the back-end channel and write what the channel accepts
        now, never waiting for it; False if there is no channel or the queue is full
        (:data:`CHANNEL_QUEUE`: the request is dropped and counted in
        :attr:`channel_drops`).

        Acks (with REPLY_ACK) are read asynchronously by the reactor, so the front-end can
        keep sending us requests meanwhile.
        """
        if self._channel is None or self._channel_sock is None:
            return False
        if sum(1 for q in self._chan_queue if q[2] is None) >= CHANNEL_QUEUE:
            self._count_drop(f"{req.name}: {CHANNEL_QUEUE} requests already wait for the "
                             "front-end to read its back-end channel")
            return False
        self._chan_queue.append((req, payload, None))
        self._pump_channel()
        return True

    def _queue_call(self, index: int) -> None:
        """BACKEND_VRING_CALL for ring ``index`` (in-band used-buffer notification)."""
        if self._channel is None or index in self._chan_calls:
            return  # one queued call covers every buffer used before it is written
        if not self.conn.vrings[index].started:
            # vhost-user.rst "Suspended device state": no notifications from a stopped
            # ring (and no messages at all while every ring is stopped).
            return
        self._chan_calls.add(index)
        # vhost-user.rst BACKEND_VRING_CALL: state.num "is currently reserved and must be
        # set to 0".
        self._chan_queue.append((BackendRequest.VRING_CALL, P.VringState(index=index, num=0),
                                 index))
        self._pump_channel()

    def _drop_queued_call(self, index: int) -> None:
        """Ring ``index`` stopped: a call it still has queued must not go out any more."""
        if index not in self._chan_calls:
            return
        self._chan_calls.discard(index)
        self._chan_queue = collections.deque(q for q in self._chan_queue if q[2] != index)
        self._count_drop(f"in-band call of ring {index}: the ring stopped before the "
                         "front-end read its back-end channel", level=logging.DEBUG)

    def _count_drop(self, why: str, *, level: int = logging.WARNING) -> None:
        self.channel_drops += 1
        n = self.channel_drops
        if n == 1 or n % 1000 == 0:
            log.log(level, "%s: back-end request dropped (%d so far): %s", self.name, n, why)

    def _pump_channel(self) -> None:
        """Write queued back-end requests until the channel is full, the ack window
        (:data:`CHANNEL_UNACKED`) is used up or the queue is empty; retry later on a
        full channel. Never blocks."""
        sock, chan = self._channel_sock, self._channel
        if sock is None or chan is None or self.closed:
            return
        while True:
            if self._chan_partial is None:
                if not self._chan_queue or self._chan_unacked >= CHANNEL_UNACKED:
                    return
                req, payload, ring = self._chan_queue.popleft()
                if ring is not None:
                    self._chan_calls.discard(ring)
                    if not self.conn.vrings[ring].started:
                        continue
                    self.inband_calls += 1
                self._chan_partial = memoryview(chan.request(req, payload))
                if chan.reply_ack:
                    self._chan_unacked += 1
            try:
                n = sock.send(self._chan_partial, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self._retry_channel()
                return
            except OSError as e:
                log.warning("%s: back-end channel send failed: %s", self.name, e)
                self._close_channel()
                return
            rest = self._chan_partial[n:]
            self._chan_partial = rest if len(rest) else None
            self._chan_delay = CHANNEL_RETRY[0]

    def _retry_channel(self) -> None:
        if self._chan_timer is None:
            self._chan_timer = self.reactor.call_later(self._chan_delay, self._channel_timer)
            self._chan_delay = min(self._chan_delay * 2, CHANNEL_RETRY[1])

    def _channel_timer(self) -> None:
        self._chan_timer = None
        self._pump_channel()

    # -- device state (SET_DEVICE_STATE_FD) -------------------------------------------------
    def _start_state_io(self, fd: OwnedFd, transfer: StateTransfer[OwnedFd]) -> None:
        """Move the device state through the pipe on the reactor, never blocking it: a
        front-end that never reads (save) or never writes (load) stalls only itself."""
        self._end_state_io()
        dup = os.dup(fd.fd)
        os.set_blocking(dup, False)
        self._state_fd, self._state = dup, transfer
        self._state_deadline = self.reactor.time() + STATE_DEADLINE
        if transfer.direction == STATE_SAVE:
            self._state_step()
        else:
            self.reactor.add_reader(dup, self._state_step)

    def _state_step(self, final: bool = False) -> None:
        """Move what the pipe takes or holds now; ``final`` (CHECK_DEVICE_STATE): the
        front-end says it is done, so a save that cannot go on fails."""
        t, fd = self._state, self._state_fd
        if t is None or fd is None:
            return
        try:
            if t.direction == STATE_SAVE:
                while not t.finished:
                    chunk = t.pending()[:STATE_CHUNK]
                    t.wrote(os.write(fd, chunk))
            else:
                for _ in range(64):  # bounded per wake-up: other fds get their turn
                    data = os.read(fd, STATE_CHUNK)
                    if not data:
                        t.eof()
                    else:
                        t.received(data)
                    if t.finished:
                        break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # EPIPE: the front-end closed its end before reading it all
            t.fail(f"pipe error: {e}")
        if t.finished:
            self._end_state_io()
        elif t.direction == STATE_SAVE and not final:
            if self.reactor.time() >= self._state_deadline:
                t.fail(f"the front-end read only {t.sent} of {len(t.outgoing)} state bytes "
                       f"in {STATE_DEADLINE} s")
                self._end_state_io()
            else:
                self._state_timer = self.reactor.call_later(0.01, self._state_step)

    def _end_state_io(self) -> None:
        """Stop moving state: close our duplicate and the core's fd (the reader then sees
        the end of the data)."""
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        fd = self._state_fd
        if fd is not None:
            self.reactor.remove_reader(fd)
            os.close(fd)
        self._state_fd = None
        if self._state is not None and self._state is self.conn.state_transfer:
            self.conn.release_state_fd()
        self._state = None

    def notify_config_change(self) -> bool:
        """BACKEND_CONFIG_CHANGE_MSG: tell the front-end to re-read config space."""
        return self.send_backend_request(BackendRequest.CONFIG_CHANGE_MSG)

    def _set_kick(self, index: int, fd: Any) -> None:
        self._unregister_kick(index)
        if fd is None and self.conn.vrings[index].kick_inband:
            # Kicks come as VRING_KICK messages: nothing to watch, nothing to poll.
            self._nofd.discard(index)
            runner = self._runners.get(index)
            if runner is not None:
                runner.poll = self.busy_poll
            return
        if fd is None:
            # vhost-user.rst SET_VRING_KICK: with the invalid-fd flag "the back-end must
            # poll" the ring instead of waiting for kicks.
            self._nofd.add(index)
            self._start_polling(index)
        else:
            self._nofd.discard(index)
        runner = self._runners.get(index)
        if runner is not None:
            runner.poll = self.busy_poll or index in self._nofd
        if fd is None:
            return
        self._kick_fds[index] = fd.fd
        self.reactor.add_reader(fd.fd, functools.partial(self._on_kick, index))

    def _unregister_kick(self, index: int) -> None:
        fdnum = self._kick_fds.pop(index, None)
        if fdnum is not None:
            self.reactor.remove_reader(fdnum)
        self._polled.discard(index)

    def _start_polling(self, index: int) -> None:
        self._polled.add(index)
        if not self._poller_added:
            self.reactor.add_poller(self._poll)
            self._poller_added = True

    def _on_kick(self, index: int) -> None:
        v = self.conn.vrings[index]
        if v.kick is not None:
            drain_fd(v.kick)
        self.conn.kick(index)
        if not self._work_seen:
            self._check_shared(index)
        self._wake(index, now=True)

    def _check_shared(self, index: int) -> None:
        """Diagnose guest memory that is not shared with us (see :data:`UNSHARED_KICKS`).

        With QEMU's RAM mapped privately (``-mem-path`` or a memory backend without
        ``share=on``) the handshake completes, the guest kicks, and every ring stays empty
        as seen from here: each frame is lost and only ``no_rx_buffer`` drops are counted.
        """
        if any(r.chains for r in self._runners.values()):
            self._work_seen = True
            return
        for i in range(len(self.conn.vrings)):
            ring = self.ring(i)
            if ring is not None and (ring.pending() or ring.in_flight or ring.next_avail
                                     != self._first_avail.get(i, ring.next_avail)):
                self._work_seen = True
                return
        if self.ring(index) is None:
            return
        now = self.reactor.time()
        first = self._empty_kick_at.setdefault(index, now)
        if now - self._kick_set_at < UNSHARED_GRACE and now - first < UNSHARED_GAP:
            return  # maybe QEMU's start-up kick
        self.empty_kicks += 1
        if self.empty_kicks == UNSHARED_KICKS:
            log.warning(
                "%s: %d kicks arrived, but the front-end never made a buffer available in "
                "any ring: guest memory is probably not shared with this back-end, so "
                "every frame or request is lost (or the ring addresses point at memory "
                "the driver does not use). QEMU needs a shared memory backend: "
                "-object memory-backend-memfd,id=mem,size=SIZE,share=on (or "
                "memory-backend-file,...,mem-path=DIR,share=on) with -numa node,memdev=mem; "
                "a plain -mem-path maps guest RAM privately",
                self.name, self.empty_kicks)

    def _poll(self) -> bool:
        worked = False
        for i in list(self._polled):
            if not self.conn.vrings[i].started:
                self.conn.kick(i)
            worked |= self._step(i) > 0
        return worked

    # -- data path --------------------------------------------------------------------------
    def _runner(self, index: int) -> QueueRunner | None:
        """The runner of queue ``index`` (made on first use), or None if the device does
        not consume it (a net receive queue)."""
        runner = self._runners.get(index)
        if runner is None:
            if self.closed or not 0 <= index < len(self.conn.vrings):
                return None
            if not self.device.consumes(index):
                return None
            device = self.device
            vrings = self.conn.vrings

            def burst(ring: Any, budget: int) -> BurstResult:
                return device.run_queue(index, ring, budget, vrings[index].enabled)

            poll = self.busy_poll or index in self._nofd
            runner = self._runners[index] = QueueRunner(index, burst, budget=self.budget,
                                                        poll=poll)
        return runner

    def _wake(self, index: int, *, now: bool = False) -> None:
        """Queue ``index`` was kicked, started or enabled: get its runner going (``now``:
        run the first burst at once, from the kick's handler, instead of on the next
        reactor iteration; a burst is bounded by the budget, so other fds still get
        their turn)."""
        runner = self._runner(index)
        if runner is None or not self.device.consumes(index):
            return
        if runner.poll:
            if self.conn.vrings[index].started:
                self._start_polling(index)
            return
        if runner.kicked():
            if now:
                self._step(index)
            else:
                self.reactor.call_soon(functools.partial(self._step, index))

    def _step(self, index: int) -> int:
        """Run one burst on queue ``index`` through its runner; chains taken.

        A burst function that raises (a device bug, never a guest fault) breaks that
        queue with the exception named, so it is visible in counters instead of stalling.
        """
        runner = self._runners.get(index)
        if runner is None:
            return 0
        ring = self.ring(index)
        if ring is None:
            runner.forget()
            return 0
        if not self.device.consumes(index):
            # Asked again at every step, not only when the runner was made: a queue the
            # device holds (a disabled blk queue) keeps its requests until enabled.
            runner.hold(ring)
            return 0
        v = self.conn.vrings[index]
        try:
            result, again = runner.step(ring)
        except Exception as exc:
            log.exception("%s: ring %d: device error", self.name, index)
            self.ring_broken(index, f"ring {index}: device error: {exc!r}")
            return 0
        if result.notify:
            # Before a break is reported: what completed in this burst is the driver's.
            self._signal_call(index)
        if result.broken is not None:
            if v.broken is None:
                self.conn.ring_broken(index, result.broken)
            return result.popped
        if again:
            # More may be waiting: yield to other fds and queues first (call_soon runs
            # on the next reactor iteration).
            self.reactor.call_soon(functools.partial(self._step, index))
        return result.popped

    # -- teardown ---------------------------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        """Close the session: unregister fds, release every fd and mapping. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("%s: session closed: %s", self.name, reason)
        if self._deadline is not None:
            self._deadline.cancel()
        for i in list(self._kick_fds):
            self._unregister_kick(i)
        if self._poller_added:
            self.reactor.remove_poller(self._poll)
        self._runners.clear()
        self._polled.clear()
        self._close_channel()
        self._end_state_io()
        self.final_snapshot = snapshot_backend(self.conn)
        self.reactor.remove_reader(self.sock.fileno())
        try:
            self.device.close()
        except Exception:  # a device bug must not keep fds and mappings alive
            log.exception("%s: device close failed", self.name)
        self.conn.close()
        # Tell the owner before the peer can see the socket close, so whoever watches
        # both (a test, a supervisor) finds the reason already recorded.
        if self.on_close is not None:
            self.on_close(self)
        self.sock.close()
        reap_deferred()


class BackendServer:
    """Serve a device on a socket path, as listener (default) or as connecting client.

    ``device_factory`` builds a fresh device for each session, so per-connection state is
    rebuilt from nothing when a front-end reconnects.
    """

    def __init__(
        self,
        reactor: Reactor,
        path: str,
        device_factory: Callable[[], Device],
        *,
        connect: bool = False,
        reconnect_interval: float = 1.0,
        max_sessions: int = 16,
        mode: int = 0o600,
        dialect: Dialect = Dialect.CURRENT,
        on_session: Callable[[BackendSession], None] | None = None,
        busy_poll: bool = False,
        inband_notifications: bool = False,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.device_factory = device_factory
        self.connect_mode = connect
        self.reconnect_interval = reconnect_interval
        self.max_sessions = max_sessions
        self.dialect = dialect
        self.on_session = on_session
        self.busy_poll = busy_poll
        self.inband_notifications = inband_notifications
        """Offer INBAND_NOTIFICATIONS (opt-in; see BackendConnection)."""
        self.sessions: list[BackendSession] = []
        self.closed_sessions = 0
        self.last_close_reason: str | None = None
        self._listener: socket.socket | None = None
        self._timer: Timer | None = None
        self._closing = False
        self._identity: tuple[int, int, int] | None = None
        self._starts: collections.deque[float] = collections.deque()
        self._loop_logged = 0.0
        self._loop_count = 0
        if connect:
            self._try_connect()
        else:
            self._listener = listen_unix(path, mode=mode)
            self._identity = socket_identity(path)
            reactor.add_reader(self._listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                log.error("accept failed: %s", e)
                return
            raise
        if len(self.sessions) >= self.max_sessions:
            log.warning("%s: refusing connection: %d sessions already", self.path,
                        len(self.sessions))
            sock.close()
            return
        self._start(sock)

    def _start(self, sock: socket.socket) -> BackendSession:
        self._note_start()
        s = BackendSession(
            self.reactor, sock, self.device_factory(), on_close=self._session_closed,
            dialect=self.dialect, busy_poll=self.busy_poll,
            inband_notifications=self.inband_notifications,
            name=f"{os.path.basename(self.path)}#{self.closed_sessions + len(self.sessions)}",
        )
        self.sessions.append(s)
        if self.on_session is not None:
            self.on_session(s)
        return s

    def _note_start(self) -> None:
        """Report, at most every :data:`LOOP_LOG_INTERVAL` s, a front-end that reconnects
        in a tight loop, with the reason the last session ended (what it keeps tripping on)."""
        now = self.reactor.time()
        starts = self._starts
        starts.append(now)
        while starts and starts[0] < now - LOOP_WINDOW:
            starts.popleft()
        self._loop_count += 1
        if len(starts) < LOOP_SESSIONS or now - self._loop_logged < LOOP_LOG_INTERVAL:
            return
        since = "" if self._loop_logged == 0.0 else (
            f" ({self._loop_count} sessions since the last report)")
        log.warning(
            "%s: the front-end is reconnecting in a tight loop: %d sessions in the last "
            "%.0f s%s; the last one ended with: %s", self.path, len(starts), LOOP_WINDOW,
            since, self.last_close_reason or "(still open)")
        self._loop_logged = now
        self._loop_count = 0

    def _session_closed(self, s: BackendSession) -> None:
        if s in self.sessions:
            self.sessions.remove(s)
        self.closed_sessions += 1
        self.last_close_reason = s.close_reason
        if self.connect_mode and not self._closing:
            self._timer = self.reactor.call_later(self.reconnect_interval, self._try_connect)

    def _try_connect(self) -> None:
        self._timer = None
        if self._closing:
            return
        try:
            sock = connect_unix(self.path, timeout=0.0)
        except (VhostUserError, OSError) as e:
            log.debug("connect to %s failed (%s); retrying", self.path, e)
            self._timer = self.reactor.call_later(self.reconnect_interval, self._try_connect)
            return
        self._start(sock)

    def close(self) -> None:
        """Stop serving: close every session and the listener; remove the socket file."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for s in list(self.sessions):
            s.close("server shutting down")
        if self._listener is not None:
            self.reactor.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            # Only if the file is still ours: another server may have replaced it.
            unlink_socket(self.path, self._identity)
