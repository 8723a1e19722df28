"""The learning Ethernet switch: an application over vhostuser.io, not a device.

``fabric`` is the pure forwarding logic (learn, look up, flood, age; ``now`` passed in);
``ports`` are the vhost-user, tap and echo ports around it; ``core`` puts them on a
reactor (:class:`Switch`, :class:`SwitchThread`).
"""

from .core import DEFAULT_AGING, DEFAULT_MAX_MACS, Switch, SwitchThread
from .fabric import Fabric, Member
from .ports import Port, TapPort, VhostUserPort

__all__ = [
    "DEFAULT_AGING",
    "DEFAULT_MAX_MACS",
    "Fabric",
    "Member",
    "Port",
    "Switch",
    "SwitchThread",
    "TapPort",
    "VhostUserPort",
]
