"""One place where a connection's events reach whoever consumes them. No I/O.

The back-end core (:class:`~vhostuser.connection.backend.BackendConnection`) is a state
machine: it turns messages into state changes, replies and :mod:`events
<vhostuser.connection.events>`, and it never calls a device itself. Every event it
produces goes through its :class:`Dispatcher`, in the order produced, to each subscriber:
first the device (:func:`device_subscriber` turns the events a device has a typed hook
for into that hook: ``on_features``, ``on_memory``, ``on_inflight``; then every event into
``on_event``), then any other subscriber (a recorder, a test, a tool). The events are
also returned to the caller of the core, for its own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import events as ev

__all__ = ["Dispatcher", "Subscriber", "device_subscriber"]

Subscriber = Callable[[ev.Event], None]
"""Something that wants every event of a connection, in order."""


class Dispatcher:
    """Delivers events, in order, to every subscriber, in the order they subscribed."""

    __slots__ = ("_subscribers",)

    def __init__(self, *subscribers: Subscriber) -> None:
        self._subscribers: list[Subscriber] = list(subscribers)

    def subscribe(self, fn: Subscriber) -> None:
        """Add a subscriber (after the existing ones)."""
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        """Remove a subscriber (no error if it was not there)."""
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def deliver(self, events: Iterable[ev.Event]) -> None:
        """Hand each event to every subscriber; an exception from one propagates."""
        subs = self._subscribers
        for e in events:
            for fn in subs:
                fn(e)


def device_subscriber(device: Any) -> Subscriber:
    """The subscriber that keeps a :class:`~vhostuser.devices.Device` informed."""

    def deliver(e: ev.Event) -> None:
        if isinstance(e, ev.FeaturesAcked):
            device.on_features(e.features)
        elif isinstance(e, ev.MemTableSet) and e.memory is not None:
            device.on_memory(e.memory)
        elif isinstance(e, ev.InflightSet):
            device.on_inflight(e.area, fresh=e.fresh)
        device.on_event(e)

    return deliver
