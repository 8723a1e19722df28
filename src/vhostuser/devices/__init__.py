"""Device logic behind the :class:`~vhostuser.devices.base.Device` plug point."""

from .base import Device

__all__ = ["Device"]
