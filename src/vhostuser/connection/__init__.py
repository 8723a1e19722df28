"""Sans-IO connection cores for both roles: negotiation, REPLY_ACK, vring states. No I/O."""

from .backend import BackendConnection, BackendHost, Dialect
from .vring import RingEvent, VringControl

__all__ = ["BackendConnection", "BackendHost", "Dialect", "RingEvent", "VringControl"]
