"""Exception hierarchy shared by every layer of vhostuser. No I/O.

Every message names the offending value, e.g.
``SET_VRING_NUM: num 1000 is not a power of two (ring 0)``.
"""

from __future__ import annotations


class VhostUserError(Exception):
    """Root of every error raised by vhostuser."""


class ProtocolError(VhostUserError):
    """A vhost-user protocol rule was broken (by us or by the peer)."""


class LocalProtocolError(ProtocolError):
    """Our caller asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids.

    The connection that raised it is in a sticky error state and must be closed.
    """


class GuestMemoryError(VhostUserError):
    """A guest address or a memory region is invalid (unmapped, out of range, overflowing)."""


class RingError(VhostUserError):
    """The guest broke a virtqueue (loop, bad index, unmapped buffer).

    The queue at fault is marked broken; every other queue keeps running.
    """


class PeerClosedError(VhostUserError):
    """The peer closed the connection."""


class MessageTimeoutError(VhostUserError):
    """A whole message or reply did not arrive before its deadline."""
