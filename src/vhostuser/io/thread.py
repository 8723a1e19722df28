"""Run a reactor (a back-end server, a switch) on its own thread, for tests and embedding.

The reactor stays single-threaded: every interaction from other threads goes through
:meth:`ReactorThread.call`, which queues a function for the reactor thread and wakes it
through an eventfd, then waits for the result.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from ..devices.base import Device
from .backend import BackendServer, BackendSession
from .eventfd import EventFd
from .reactor import Reactor

T = TypeVar("T")


class ReactorThread:
    """A reactor on a background thread; subclasses build what runs on it.

    :meth:`_build` runs on the reactor thread before the loop starts and returns the
    function that tears it down again when the thread stops.
    """

    thread_name = "vhost-user reactor"
    start_timeout = 30.0

    def __init__(self) -> None:
        self.reactor: Reactor | None = None
        self.errors: list[BaseException] = []
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = EventFd()
        self._stop = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def _build(self, reactor: Reactor) -> Callable[[], None]:
        """Create what runs on ``reactor``; return its clean-up. Runs on the thread."""
        raise NotImplementedError

    def _run(self) -> None:
        reactor = Reactor(on_error=lambda exc, cb: self.errors.append(exc))
        self.reactor = reactor
        try:
            teardown = self._build(reactor)
        except BaseException as e:
            self.errors.append(e)
            self._ready.set()
            reactor.close()
            return
        reactor.add_reader(self._wake.fd, self._on_wake)
        self._ready.set()
        try:
            reactor.run(until=lambda: self._stop)
        finally:
            teardown()
            reactor.remove_reader(self._wake.fd)
            reactor.close()

    def _on_wake(self) -> None:
        self._wake.drain()
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
        self._wake.notify()
        return fut.result(timeout)

    def start(self) -> Self:
        """Start the thread and wait until :meth:`_build` ran.

        Raises:
            Whatever :meth:`_build` raised (e.g. the socket path is taken).
        """
        self._thread.start()
        self._ready.wait(self.start_timeout)
        if self.errors:
            self._thread.join(10)
            self._wake.close()
            raise self.errors[0]
        return self

    def stop(self) -> None:
        """Stop the reactor, tear down what runs on it, join the thread. Idempotent."""
        if self._thread.is_alive():
            self._stop = True
            self._wake.notify()
            self._thread.join(30)
        if not self._wake.closed:
            self._wake.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerThread(ReactorThread):
    """A :class:`BackendServer` on a reactor in a background thread.

    Use as a context manager; ``server_kwargs`` go to :class:`BackendServer` (``connect``,
    ``dialect``, ``mode``...). Sessions and devices may be inspected from the caller's
    thread only through :meth:`call`.
    """

    def __init__(self, path: str, device_factory: Callable[[], Device], **server_kwargs: Any):
        self.thread_name = f"vhost-user {path}"
        super().__init__()
        self.path = path
        self.device_factory = device_factory
        self.server_kwargs = server_kwargs
        self.devices: list[Device] = []
        self.sessions_seen: list[BackendSession] = []
        self.server: BackendServer | None = None

    def _factory(self) -> Device:
        d = self.device_factory()
        self.devices.append(d)
        return d

    def _build(self, reactor: Reactor) -> Callable[[], None]:
        server = BackendServer(
            reactor, self.path, self._factory,
            on_session=self.sessions_seen.append, **self.server_kwargs,
        )
        self.server = server
        return server.close
