"""Virtqueues: split and packed rings, device and driver sides, over a GuestMemory. No I/O.

The back-end builds a :class:`SplitDeviceRing` or :class:`PackedDeviceRing` from the
negotiated state (size, GPAs of the ring areas, EVENT_IDX, INDIRECT_DESC, VRING_BASE) and
runs :func:`run_burst` on each kick. The front-end (and the tests) use the driver sides.
Guest ring violations raise or record :class:`vhostuser.errors.RingError`; see
docs/security.md "Rings" for the list.
"""

from .barrier import full_barrier
from .burst import BurstResult, DeviceRing, Handler, run_burst
from .chain import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    Chain,
    vring_need_event,
)
from .packed import (
    INITIAL_BASE,
    PackedBase,
    PackedDeviceRing,
    PackedDriverRing,
    decode_base,
    encode_base,
    packed_layout,
)
from .split import SplitDeviceRing, SplitDriverRing, split_layout

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "INITIAL_BASE",
    "MAX_QUEUE_SIZE",
    "BurstResult",
    "Chain",
    "DeviceRing",
    "Handler",
    "PackedBase",
    "PackedDeviceRing",
    "PackedDriverRing",
    "SplitDeviceRing",
    "SplitDriverRing",
    "decode_base",
    "encode_base",
    "full_barrier",
    "packed_layout",
    "run_burst",
    "split_layout",
    "vring_need_event",
]
