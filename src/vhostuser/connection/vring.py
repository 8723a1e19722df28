"""Per-vring control state and the one table of ring state transitions. No I/O.

A ring is started/stopped and enabled/disabled independently (vhost-user.rst, "Ring
states"): it starts stopped and disabled; it is *started* by a kick (a readable kick fd or
VRING_KICK) and *stopped* by GET_VRING_BASE; SET_VRING_ENABLE flips enablement, and without
VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from ..protocol.payloads import VringAddr

FdT = TypeVar("FdT")


class RingEvent(Enum):
    """What can happen to a ring's run state."""

    KICK = "kick"
    GET_BASE = "get_vring_base"
    ENABLE = "enable"
    DISABLE = "disable"
    RESET = "reset"


State = tuple[bool, bool]  # (started, enabled)

TRANSITIONS: dict[tuple[State, RingEvent], State] = {}
"""(started, enabled) x event → next state. Every pair is defined (a test enumerates them)."""
for _started in (False, True):
    for _enabled in (False, True):
        _s = (_started, _enabled)
        TRANSITIONS[(_s, RingEvent.KICK)] = (True, _enabled)
        TRANSITIONS[(_s, RingEvent.GET_BASE)] = (False, _enabled)
        TRANSITIONS[(_s, RingEvent.ENABLE)] = (_started, True)
        TRANSITIONS[(_s, RingEvent.DISABLE)] = (_started, False)
        TRANSITIONS[(_s, RingEvent.RESET)] = (False, False)


@dataclass(slots=True)
class VringControl(Generic[FdT]):
    """What the control plane knows about one ring.

    ``engine`` is the data-path object (a split or packed device ring) built when the ring
    starts; the core never looks inside it except to ask for the base and in-flight count.
    """

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick: FdT | None = None
    call: FdT | None = None
    err: FdT | None = None
    kick_polled: bool = False
    call_polled: bool = False
    kick_inband: bool = False
    """SET_VRING_KICK had the invalid-fd flag while INBAND_NOTIFICATIONS was negotiated:
    kicks come as VRING_KICK messages (the ring is not polled)."""
    started: bool = False
    enabled: bool = False
    broken: str | None = None
    engine: Any = field(default=None, repr=False)

    @property
    def configured(self) -> bool:
        """True once size and addresses are known (GET_VRING_BASE is meaningful)."""
        return self.num != 0 and self.addr is not None

    def apply(self, event: RingEvent) -> tuple[bool, bool]:
        """Apply a run-state event through :data:`TRANSITIONS`; return (started, enabled)."""
        self.started, self.enabled = TRANSITIONS[((self.started, self.enabled), event)]
        return self.started, self.enabled

    def take_fds(self) -> list[FdT]:
        """Detach and return the ring's fds (kick, call, err) for release."""
        out = [f for f in (self.kick, self.call, self.err) if f is not None]
        self.kick = self.call = self.err = None
        return out
