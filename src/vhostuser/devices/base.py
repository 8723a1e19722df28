"""The plug point a back-end device implements in one file. No I/O.

A device says what it offers (virtio feature bits, extra protocol features, queue count,
config space) and handles bursts of descriptor chains. Every method has a default, so the
smallest device is a subclass that sets ``device_type`` and overrides :meth:`handle_burst`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.enums import DeviceType
from ..virtq.burst import BurstResult, run_burst

if TYPE_CHECKING:
    from ..connection.events import Event
    from ..memory import GuestMemory
    from ..virtq.inflight import InflightArea


class QueueAccess(Protocol):
    """What a device may do with its session's rings (implemented by the I/O shell)."""

    def ring(self, index: int) -> Any:
        """The started, unbroken device ring ``index`` (split or packed), or None."""
        ...

    def enabled(self, index: int) -> bool:
        """True if ring ``index`` is enabled."""
        ...

    def notify(self, index: int) -> None:
        """Signal the call fd of ring ``index`` (after pushing used buffers)."""
        ...

    def ring_broken(self, index: int, reason: str) -> None:
        """Report that the guest broke ring ``index``."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Cancellable:
        """Run ``callback`` on the session's thread after ``delay`` seconds (for devices
        that complete requests later); the returned handle cancels it."""
        ...


class Cancellable(Protocol):
    """A scheduled callback (``QueueAccess.call_later``)."""

    def cancel(self) -> None:
        """Do not run it (nothing happens if it already ran)."""
        ...


class DeviceStateError(ValueError):
    """A device state blob cannot be saved or loaded (DEVICE_STATE); the message names
    the field that is wrong (e.g. the disk's capacity differs from the source's)."""


DEFAULT_MAX_STATE_SIZE = 1 << 20
"""The largest state blob a device accepts on load unless it says otherwise."""


class Device:
    """Base class of back-end devices; override what you need.

    Attributes:
        device_type: virtio device id, used to name feature bits and decode config.
        virtio_features: device-specific feature bits offered (ring and version bits are
            added by the connection).
        protocol_features: protocol features beyond the ones every back-end offers
            (e.g. ``ProtocolFeature.RARP | ProtocolFeature.MTU`` for net).
        num_queues: how many virtqueues the device has (GET_QUEUE_NUM).
    """

    device_type: DeviceType | None = None
    offer_config: bool = True
    """Offer the CONFIG protocol feature when config space is non-empty. QEMU's net
    front-end warns that it cannot use CONFIG, so net devices turn this off."""
    virtio_features: int = 0
    protocol_features: int = 0
    num_queues: int = 1

    max_state_size: int = DEFAULT_MAX_STATE_SIZE
    """The largest state blob :meth:`load_state` is handed (DEVICE_STATE): a front-end
    that writes more fails the transfer instead of making the back-end grow."""

    def supports_state(self) -> bool:
        """True if the device overrides :meth:`save_state` and :meth:`load_state`; the
        connection offers the DEVICE_STATE protocol feature only then."""
        cls = type(self)
        return (cls.save_state is not Device.save_state
                and cls.load_state is not Device.load_state)

    def save_state(self) -> bytes:
        """The device's internal state, for the destination of a migration
        (SET_DEVICE_STATE_FD, direction save). Called only while every ring is stopped
        (vhost-user.rst "Suspended device state"), so nothing is in flight.

        Raises:
            DeviceStateError: the device cannot describe its state.
        """
        raise DeviceStateError(f"{type(self).__name__} has no state to save")

    def load_state(self, data: bytes) -> None:
        """Adopt the state a source back-end saved (SET_DEVICE_STATE_FD, direction load),
        checking that this device can take over from it. Called only while every ring is
        stopped, before the front-end starts them again.

        Raises:
            DeviceStateError: the blob is malformed, of an unknown version, or describes a
                device this one cannot stand in for (the message names the field).
        """
        raise DeviceStateError(f"{type(self).__name__} cannot load state")

    def config_space(self) -> bytes:
        """Return the whole device config space (empty: the device has none)."""
        return b""

    def get_config(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes of config space at ``offset`` (zero-padded past its end).

        Raises:
            ValueError: the range is not inside the config space.
        """
        space = self.config_space()
        if offset > len(space) or offset + size > 256:
            raise ValueError(f"config range {offset}+{size} outside {len(space)}-byte space")
        chunk = space[offset : offset + size]
        return chunk + bytes(size - len(chunk))

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Write config space (SET_CONFIG). Default: refuse.

        Raises:
            ValueError: the device has no writable config.
        """
        raise ValueError(f"config space is read-only (write of {len(data)} bytes at {offset})")

    def consumes(self, index: int) -> bool:
        """True if the device takes chains from queue ``index`` as soon as they are kicked.

        A net device's RX queues return False: their buffers are filled only when a frame
        arrives, so no runner drives them and kicks on them are only drained.
        """
        return True

    def on_features(self, features: int) -> None:
        """The front-end acked ``features`` (SET_FEATURES)."""

    def on_memory(self, mem: GuestMemory) -> None:
        """The memory table changed; ``mem`` translates guest addresses."""

    def attach(self, queues: QueueAccess) -> None:
        """The session serving this device: gives the device its rings to push into on
        its own initiative (a switch delivering a frame to an RX queue)."""

    def on_inflight(self, area: InflightArea, *, fresh: bool) -> None:
        """The inflight area (INFLIGHT_SHMFD): ``fresh`` for a new zeroed one from
        GET_INFLIGHT_FD, False for one adopted with SET_INFLIGHT_FD after a reconnect."""

    def close(self) -> None:
        """The session ends: drop every view of guest memory (chains held, cached rings),
        so the shell can unmap at once instead of deferring."""

    def on_event(self, event: Event) -> None:
        """Any connection event (started/stopped/enabled rings, status, RARP, MTU...)."""

    def run_queue(self, index: int, ring: Any, budget: int, enabled: bool) -> BurstResult:
        """One burst on queue ``index``: pop at most ``budget`` chains from ``ring``, handle
        them, push what was completed, say whether to notify. Called only by the queue's
        :class:`~vhostuser.virtq.runner.QueueRunner`, which decides when.

        The default runs :func:`~vhostuser.virtq.run_burst` over :meth:`handle_burst`;
        a device with a faster path over the same ring overrides this. Guest faults come
        back in the result (``broken``), never as exceptions.

        Raises:
            ValueError: a handler bug (a head not in flight, a bad length).
        """
        return run_burst(ring, lambda chains: self.handle_burst(index, chains, enabled), budget)

    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        """Handle chains popped from queue ``index``; return ``(head, bytes_written)``.

        ``enabled`` is False for a started but disabled ring: process without side
        effects (vhost-user.rst: "process the ring without side effects"). The default
        consumes every chain and writes nothing (a null device).
        """
        return [(c.head, 0) for c in chains]
