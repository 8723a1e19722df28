"""``vhost-user trace``: watch a live front-end <-> back-end session, decoded."""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
from typing import Any

from ..connection.observer import Record, SessionObserver
from ..errors import VhostUserError
from ..io.fdpass import connect_unix, listen_unix, socket_identity, unlink_socket
from ..io.proxy import TraceSession
from ..io.reactor import Reactor
from ..protocol.enums import DeviceType
from ._common import (
    add_verbose,
    connect_error,
    path_error,
    positive,
    seconds,
    setup_logging,
    stop_on_signals,
)
from .probe import guess_device

EXAMPLES = """\
examples:
  # QEMU (-chardev socket,path=/tmp/trace.sock) -> trace -> our switch on /tmp/sw.sock
  vhost-user switch --port /tmp/sw.sock &
  vhost-user trace --listen /tmp/trace.sock --connect /tmp/sw.sock

  # one JSON object per message, into a file, for the first session only
  vhost-user trace --listen /tmp/t.sock --connect /tmp/qsd.sock --json --sessions 1 > s.jsonl

  # QEMU as server (server=on) and DPDK in client mode (client=1): we connect to QEMU and
  # wait for DPDK to connect to us
  vhost-user trace --frontend-listens /tmp/qemu.sock --backend-connects /tmp/dpdk.sock

Each line: seconds since the session began, direction (FE->BE: front-end to back-end),
the request (a reply says "reply" and how long it took), its fields (feature words with
their bits by name) and fds. Lines starting with "!!" name a rule of the protocol the
message breaks; it was forwarded anyway. "#" lines are about sessions.
"""


def _accept(reactor: Reactor, listener: socket.socket) -> socket.socket | None:
    """Wait on ``reactor`` for one connection (None if the reactor was stopped)."""
    got: list[socket.socket] = []

    def on_accept() -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        got.append(sock)

    reactor.add_reader(listener.fileno(), on_accept)
    try:
        reactor.run(until=lambda: bool(got))
    finally:
        reactor.remove_reader(listener.fileno())
    return got[0] if got else None


class _Side:
    """How we reach one peer: we listen (it connects) or we connect (it listens)."""

    def __init__(self, path: str, listen: bool, what: str, wait: float) -> None:
        self.path = path
        self.listen = listen
        self.what = what
        self.wait = wait
        self.listener: socket.socket | None = None
        self.identity: tuple[int, int, int] | None = None

    def open(self) -> None:
        if self.listen:
            self.listener = listen_unix(self.path)
            self.listener.setblocking(False)
            self.identity = socket_identity(self.path)

    def get(self, reactor: Reactor) -> socket.socket | None:
        """A connection to the peer, or None when interrupted.

        Raises:
            OSError, VhostUserError: connecting failed (the message says why).
        """
        if self.listener is not None:
            return _accept(reactor, self.listener)
        return connect_unix(self.path, timeout=self.wait)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unlink_socket(self.path, self.identity)


def run(args: argparse.Namespace) -> int:
    """Proxy sessions until Ctrl-C (or ``--sessions`` of them); returns the exit status."""
    setup_logging(args.verbose)
    front = _Side(args.listen or args.frontend_listens, args.listen is not None,
                  "front-end", args.wait)
    back = _Side(args.connect or args.backend_connects, args.backend_connects is not None,
                 "back-end", args.wait)
    device = {"auto": None, "net": DeviceType.NET, "blk": DeviceType.BLK}[args.device]

    def say(obj: dict[str, Any], text: str) -> None:
        if args.json:
            print(json.dumps(obj), flush=True)
        else:
            print(text, flush=True)

    try:
        for side in (front, back):
            try:
                side.open()
            except (OSError, ValueError) as e:
                print(f"vhost-user trace: {path_error(side.path, e)}", file=sys.stderr)
                return 2
        with Reactor() as reactor, stop_on_signals(reactor) as signals:
            done = 0
            while not signals and (args.sessions is None or done < args.sessions):
                if not args.json:
                    how = "listening on" if front.listen else "connecting to"
                    print(f"# waiting for a front-end ({how} {front.path})", flush=True)
                fsock = _get(front, reactor)
                if fsock is None:
                    break
                bsock = _get(back, reactor)
                if bsock is None:
                    fsock.close()
                    break
                n = done
                say({"event": "session", "session": n, "frontend": front.path,
                     "backend": back.path},
                    f"# session {n}: front-end {front.path} <-> back-end {back.path}")
                observer = SessionObserver(device, guess=guess_device)

                def emit(rec: Record, n: int = n) -> None:
                    if args.json:
                        say({"session": n, **rec.as_json()}, "")
                    else:
                        say({}, rec.text())

                def note(text: str, n: int = n) -> None:
                    say({"event": "note", "session": n, "text": text}, f"# {text}")

                session = TraceSession(reactor, fsock, bsock, emit=emit, observer=observer,
                                       on_note=note)
                reactor.run(until=functools.partial(_ended, session))
                if not session.closed:
                    session.end("trace stopped (Ctrl-C)")
                st = session.stats
                say({"event": "session_end", "session": n, "reason": st.ended,
                     "messages": st.messages, "fds": st.fds, "problems": st.problems,
                     "waiting": st.waiting},
                    f"# session {n} ended: {st.ended}; {st.messages} messages, {st.fds} fds, "
                    f"{st.problems} with problems"
                    + (f"; still waiting for replies to {', '.join(st.waiting)}"
                       if st.waiting else ""))
                done += 1
            return 130 if signals else 0
    except _PeerError as e:
        print(f"vhost-user trace: {e}", file=sys.stderr)
        return 1
    finally:
        front.close()
        back.close()


def _ended(session: TraceSession) -> bool:
    return session.closed


class _PeerError(Exception):
    """A peer could not be reached (the message says which and why)."""


def _get(side: _Side, reactor: Reactor) -> socket.socket | None:
    try:
        return side.get(reactor)
    except (OSError, VhostUserError) as e:
        raise _PeerError(f"{side.what}: {connect_error(side.path, e)}") from e


def add_parser(sub: Any) -> None:
    """Register ``trace`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "trace",
        help="proxy a front-end <-> back-end session and print every message decoded",
        description=(
            "Sit between a vhost-user front-end (QEMU, DPDK virtio-user, our probe) and a "
            "back-end (DPDK's vhost, qemu-storage-daemon, virtiofsd, ours), forward every "
            "message and fd unchanged, and print both directions decoded: request names, "
            "flags, payload fields, feature bits by name, fds, replies paired with their "
            "requests and their latency. The back-end channel (SET_BACKEND_REQ_FD) is "
            "followed too. Messages that break a rule of the protocol are reported and "
            "still forwarded: the proxy observes, it does not judge. Sessions follow one "
            "another (a front-end that reconnects gets a new one)."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fe = p.add_mutually_exclusive_group(required=True)
    fe.add_argument("--listen", metavar="FRONT_PATH",
                    help="listen here; point the front-end at this path (QEMU's default "
                         "client mode)")
    fe.add_argument("--frontend-listens", metavar="FRONT_PATH",
                    help="connect to a front-end that listens here (QEMU server=on)")
    be = p.add_mutually_exclusive_group(required=True)
    be.add_argument("--connect", metavar="BACK_PATH",
                    help="connect to the back-end listening here")
    be.add_argument("--backend-connects", metavar="BACK_PATH",
                    help="listen here for a back-end that connects to us (DPDK client=1, "
                         "our switch --connect)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: each message, and session events")
    p.add_argument("--device", choices=("auto", "net", "blk"), default="auto",
                   help="name device-specific feature bits as this device's (default: "
                        "guessed from the back-end's features)")
    p.add_argument("--sessions", type=positive(int), default=None, metavar="N",
                   help="stop after N sessions (default: run until Ctrl-C)")
    p.add_argument("--wait", type=seconds, default=5.0, metavar="SECONDS",
                   help="how long to keep trying to connect to a peer that should listen "
                        "(default 5)")
    add_verbose(p, "the proxy's own events")
    p.set_defaults(func=run)
