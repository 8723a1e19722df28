"""One dispatcher: every event of the back-end core reaches the device, then any other
subscriber, in the order produced; the core never calls the device itself, and the device
hears of a new memory table while the old ring engines still stand."""

from __future__ import annotations

from typing import Any

from vhostuser.connection import events as ev
from vhostuser.connection.dispatch import Dispatcher
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest

from .fakes import FakeDevice, configure_ring, feed, handshake, make_backend, ram_region, req

R = FrontendRequest


class RecordingDevice(FakeDevice):
    """Notes the order of its hooks and which engine ring 0 had at on_memory time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.conn: Any = None
        self.engine_at_memory: list[Any] = []

    def on_features(self, features: int) -> None:
        self.calls.append("on_features")

    def on_memory(self, mem: Any) -> None:
        self.calls.append("on_memory")
        if self.conn is not None:
            self.engine_at_memory.append(self.conn.vrings[0].engine)

    def on_event(self, event: ev.Event) -> None:
        self.calls.append(type(event).__name__)
        super().on_event(event)


def test_device_first_then_subscribers_in_order() -> None:
    dev = RecordingDevice()
    conn, _host, _factory, fds = make_backend(dev)
    seen: list[ev.Event] = []
    conn.dispatcher.subscribe(seen.append)
    handshake(conn, fds)
    # Typed hook first, then on_event, for the same event; the subscriber sees it after.
    i = dev.calls.index("on_features")
    assert dev.calls[i + 1] == "FeaturesAcked"
    assert dev.calls.index("on_memory") + 1 == dev.calls.index("MemTableSet")
    assert seen == dev.events  # the same events, in the same order
    assert any(isinstance(e, ev.MemTableSet) and e.memory is conn.mem for e in seen)


def test_returned_events_are_the_delivered_ones() -> None:
    dev = RecordingDevice()
    conn, _host, _factory, fds = make_backend(dev)
    handshake(conn, fds, memory=False)
    before = len(dev.events)
    out = feed(conn, req(R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),))), fds.take(1))
    assert out == dev.events[before:] and isinstance(out[0], ev.MemTableSet)


def test_memory_change_reaches_the_device_before_rings_are_rebuilt() -> None:
    dev = RecordingDevice()
    conn, _host, factory, fds = make_backend(dev)
    dev.conn = conn
    handshake(conn, fds)
    configure_ring(conn, fds, 0)
    conn.kick(0)
    old = conn.vrings[0].engine
    assert old is not None and factory.built[-1] is old
    feed(conn, req(R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),))), fds.take(1))
    assert dev.engine_at_memory[-1] is old  # told while the old engine still stood
    assert conn.vrings[0].engine is not old  # then the ring was rebuilt on the new table


def test_kick_and_ring_broken_go_through_the_dispatcher() -> None:
    dev = RecordingDevice()
    conn, _host, _factory, fds = make_backend(dev)
    seen: list[ev.Event] = []
    conn.dispatcher.subscribe(seen.append)
    handshake(conn, fds)
    configure_ring(conn, fds, 0)
    seen.clear()
    assert conn.kick(0) == [ev.VringStarted(0)] == seen
    conn.dispatcher.unsubscribe(seen.append)
    e = conn.ring_broken(0, "test")
    assert dev.events[-1] == e and seen == [ev.VringStarted(0)]


def test_dispatcher_order_and_unsubscribe() -> None:
    got: list[tuple[str, ev.Event]] = []

    def a(e: ev.Event) -> None:
        got.append(("a", e))

    def b(e: ev.Event) -> None:
        got.append(("b", e))

    d = Dispatcher(a)
    d.subscribe(b)
    d.deliver([ev.OwnerSet(), ev.StatusSet(1)])
    assert got == [("a", ev.OwnerSet()), ("b", ev.OwnerSet()), ("a", ev.StatusSet(1)),
                   ("b", ev.StatusSet(1))]
    d.unsubscribe(a)
    d.unsubscribe(a)
    d.deliver([ev.OwnerSet()])
    assert got[-1] == ("b", ev.OwnerSet()) and len(got) == 5
