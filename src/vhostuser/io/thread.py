"""Run a back-end server on its own reactor thread, for tests and embedding.

The reactor stays single-threaded: every interaction from other threads goes through
:meth:`ServerThread.call`, which queues a function for the reactor thread and wakes it
through a socketpair, then waits for the result.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from ..devices.base import Device
from .backend import BackendServer, BackendSession
from .reactor import Reactor

T = TypeVar("T")


class ServerThread:
    """A :class:`BackendServer` on a reactor in a background thread.

    Use as a context manager; ``server_kwargs`` go to :class:`BackendServer` (``connect``,
    ``dialect``, ``mode``...). Sessions and devices may be inspected from the caller's
    thread only through :meth:`call`.
    """

    def __init__(self, path: str, device_factory: Callable[[], Device], **server_kwargs: Any):
        self.path = path
        self.device_factory = device_factory
        self.server_kwargs = server_kwargs
        self.devices: list[Device] = []
        self.sessions_seen: list[BackendSession] = []
        self.errors: list[BaseException] = []
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vhost-user {path}", daemon=True)
        self.reactor: Reactor | None = None
        self.server: BackendServer | None = None

    def _factory(self) -> Device:
        d = self.device_factory()
        self.devices.append(d)
        return d

    def _run(self) -> None:
        reactor = Reactor(on_error=lambda exc, cb: self.errors.append(exc))
        self.reactor = reactor
        try:
            self.server = BackendServer(
                reactor, self.path, self._factory,
                on_session=self.sessions_seen.append, **self.server_kwargs,
            )
        except BaseException as e:
            self.errors.append(e)
            self._ready.set()
            reactor.close()
            return
        reactor.add_reader(self._wake_r.fileno(), self._on_wake)
        self._ready.set()
        try:
            reactor.run(until=lambda: self._stop)
        finally:
            self.server.close()
            reactor.remove_reader(self._wake_r.fileno())
            reactor.close()

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the reactor thread and return its result.

        Raises:
            Whatever ``fn`` raises; TimeoutError if the reactor does not run it in time.
        """
        if not self._thread.is_alive():
            return fn()  # no reactor thread any more: nothing can race us
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")
        return fut.result(timeout)

    def start(self) -> ServerThread:
        """Start the thread and wait until the server listens (or has begun connecting).

        Raises:
            Whatever creating the server raised (e.g. the socket path is taken).
        """
        self._thread.start()
        self._ready.wait(10)
        if self.errors:
            self._thread.join(5)
            self._close_wake()
            raise self.errors[0]
        return self

    def stop(self) -> None:
        """Stop the reactor, close every session and the listener, join the thread."""
        if self._thread.is_alive():
            self._stop = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(10)
        self._close_wake()

    def _close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
