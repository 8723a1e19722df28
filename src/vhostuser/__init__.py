"""vhostuser: vhost-user in pure Python, back-end and front-end roles.

The protocol core (``vhostuser.protocol``, ``vhostuser.connection``, ``vhostuser.memory``,
``vhostuser.virtq``) is sans-IO; ``vhostuser.io`` is the only layer that makes syscalls.
"""

from .errors import (
    GuestMemoryError,
    LocalProtocolError,
    MessageTimeoutError,
    PeerClosedError,
    ProtocolError,
    RemoteProtocolError,
    RingError,
    VhostUserError,
)

__version__ = "0.1.0"

__all__ = [
    "GuestMemoryError",
    "LocalProtocolError",
    "MessageTimeoutError",
    "PeerClosedError",
    "ProtocolError",
    "RemoteProtocolError",
    "RingError",
    "VhostUserError",
    "__version__",
]
