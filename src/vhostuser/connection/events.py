"""Events the connection cores report to the I/O shell and to devices. No I/O.

Events are past-tense nouns. Fd-carrying events hold opaque tokens that the core still
owns; the shell may register them (e.g. with its reactor) but never closes them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

FdT = TypeVar("FdT")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class OwnerSet(Event):
    """SET_OWNER arrived: a session starts."""


@dataclass(frozen=True, slots=True)
class FeaturesAcked(Event):
    """SET_FEATURES: the virtio features the front-end acked."""

    features: int


@dataclass(frozen=True, slots=True)
class ProtocolFeaturesAcked(Event):
    """SET_PROTOCOL_FEATURES: the protocol features now in force."""

    features: int


@dataclass(frozen=True, slots=True)
class MemTableSet(Event):
    """The region table changed (SET_MEM_TABLE, ADD_MEM_REG or REM_MEM_REG).

    Delivered before running rings are re-pointed at the new table; ``memory`` is the
    table (a :class:`~vhostuser.memory.RegionTable`), for devices (``on_memory``).
    """

    nregions: int
    memory: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class InflightSet(Event):
    """The inflight area is in place: ``fresh`` from GET_INFLIGHT_FD (zeroed), else
    adopted with SET_INFLIGHT_FD after a reconnect; ``area`` is the
    :class:`~vhostuser.virtq.inflight.InflightArea` (devices: ``on_inflight``)."""

    fresh: bool
    area: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class VringConfigured(Event):
    """A ring's size, base or addresses changed."""

    index: int


@dataclass(frozen=True, slots=True)
class VringFdSet(Event, Generic[FdT]):
    """A kick, call or err fd was set (``fd`` is None with NOFD: poll instead)."""

    index: int
    kind: str
    fd: FdT | None


@dataclass(frozen=True, slots=True)
class VringStarted(Event):
    """The ring started (first kick, vhost-user.rst "Starting and stopping rings")."""

    index: int


@dataclass(frozen=True, slots=True)
class VringStopping(Event):
    """GET_VRING_BASE is about to stop the ring: a device completes every request it
    still holds on it now (delayed ones included), so that the base returned next is
    consistent (vhost-user.rst "Migrating back-end state": the front-end resumes the
    destination at that index, and a request popped but never completed would be lost)."""

    index: int


@dataclass(frozen=True, slots=True)
class VringKicked(Event):
    """VRING_KICK (INBAND_NOTIFICATIONS): the front-end says, in-band, that ring ``index``
    has new buffers. The ring was started first if it was not yet (vhost-user.rst "Ring
    states"); the shell runs it at once, so a front-end that asked for an ack
    (REPLY_ACK) gets it after the ring was processed."""

    index: int


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Event, Generic[FdT]):
    """SET_DEVICE_STATE_FD accepted (DEVICE_STATE): move the device's state through
    ``fd``, the front-end's end of a pipe (the core owns it). ``direction`` is 0 (save:
    the back-end writes ``transfer.outgoing`` and closes) or 1 (load: the back-end reads
    until end of file). ``transfer`` is the core's
    :class:`~vhostuser.connection.backend.StateTransfer` the shell feeds."""

    direction: int
    fd: FdT
    transfer: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeviceStateChecking(Event):
    """CHECK_DEVICE_STATE arrived: delivered while the message is handled, so the shell
    can finish the transfer with what the pipe already holds (without blocking) before
    the core answers."""


@dataclass(frozen=True, slots=True)
class DeviceStateChecked(Event):
    """CHECK_DEVICE_STATE answered: ``ok``, or ``error`` saying why not."""

    direction: int | None
    ok: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LogChanged(Event):
    """Dirty logging changed: ``active`` says whether writes to guest memory are logged
    now (SET_LOG_BASE mapped a log and VHOST_F_LOG_ALL is acked); ``size`` is the log's
    size in bytes (0 when none is mapped)."""

    active: bool
    size: int


@dataclass(frozen=True, slots=True)
class VringStopped(Event):
    """GET_VRING_BASE stopped the ring; ``base`` is what was returned."""

    index: int
    base: int


@dataclass(frozen=True, slots=True)
class VringEnabled(Event):
    """SET_VRING_ENABLE (or SET_FEATURES without PROTOCOL_FEATURES) changed ring enablement."""

    index: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class VringBroken(Event):
    """The guest broke a ring; it is stopped until the front-end resets it."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class BackendChannelSet(Event, Generic[FdT]):
    """SET_BACKEND_REQ_FD gave us the back-end → front-end socket."""

    fd: FdT


@dataclass(frozen=True, slots=True)
class ConfigWritten(Event):
    """SET_CONFIG wrote device config space."""

    offset: int
    data: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class StatusSet(Event):
    """SET_STATUS: the virtio device status byte."""

    status: int


@dataclass(frozen=True, slots=True)
class RarpRequested(Event):
    """SEND_RARP: announce this MAC (after migration)."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class MtuSet(Event):
    """NET_SET_MTU."""

    mtu: int


@dataclass(frozen=True, slots=True)
class DeviceReset(Event):
    """RESET_OWNER or RESET_DEVICE: per-session state was torn down."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """The peer broke the protocol; the connection is in ERROR and must be closed."""

    reason: str


# Front-end side: what arrives from the back-end.


@dataclass(frozen=True, slots=True)
class ReplyReceived(Event):
    """A reply to the oldest outstanding request."""

    request: int
    payload: bytes
    fds: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigChanged(Event):
    """BACKEND_CONFIG_CHANGE_MSG: re-read the device config."""


@dataclass(frozen=True, slots=True)
class VringCalled(Event):
    """BACKEND_VRING_CALL: in-band used-buffer notification."""

    index: int


@dataclass(frozen=True, slots=True)
class VringErrored(Event):
    """BACKEND_VRING_ERR: in-band error notification."""

    index: int


@dataclass(frozen=True, slots=True)
class BackendRequestReceived(Event):
    """Any other back-end request, decoded but left to the application (which owns fds)."""

    request: int
    payload: bytes
    fds: tuple[object, ...] = ()
