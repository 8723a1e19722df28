"""Kernel tap interfaces: a switch port into the host's network stack.

:class:`TapDevice` opens ``/dev/net/tun`` and attaches to the named interface with
``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI``: whole Ethernet frames, no packet-information
prefix). The kernel creates the interface if it does not exist; such an interface lives only
as long as our file descriptor, so closing it removes it again, while a persistent one
(``ip tuntap add dev NAME mode tap``) stays. The interface is brought up (``IFF_UP``) unless
told otherwise. Needs CAP_NET_ADMIN (root) for both.

Reads and writes are non-blocking: :meth:`TapDevice.read_into` returns None when no frame is
queued, :meth:`TapDevice.write` returns False when the kernel queue is full.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from types import TracebackType

from .fdpass import OwnedFd

__all__ = ["IFNAMSIZ", "TapDevice", "interface_exists"]

# <linux/if_tun.h>: _IOW('T', 202, int)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFNAMSIZ = 16
"""<linux/if.h>: interface names are at most 15 bytes plus the NUL."""

_IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq: name[16], short flags, padding to 40
_IFREQ_INT = struct.Struct("16si20x")
_IFREQ_HWADDR = struct.Struct("16sH6s16x")  # name, sa_family, sa_data[14] (first 6 used)


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise ValueError(
            f"interface name {name!r} must be 1..{IFNAMSIZ - 1} bytes without '/' or NUL"
        )
    return raw


def interface_exists(name: str) -> bool:
    """True if a network interface called ``name`` exists (``/sys/class/net/NAME``)."""
    return os.path.exists(f"/sys/class/net/{name}")


class TapDevice:
    """One open tap interface (see the module docstring).

    Attributes:
        name: the interface name the kernel gave (the one asked for).
        created: True if the interface did not exist before we opened it (it disappears
            when we close it, unless someone made it persistent meanwhile).
    """

    __slots__ = ("_fd", "created", "name")

    def __init__(self, name: str, *, up: bool = True) -> None:
        """Open (and create if absent) tap interface ``name``.

        Raises:
            ValueError: the name is empty, too long or contains '/'.
            PermissionError: no CAP_NET_ADMIN (run as root).
            OSError: /dev/net/tun is missing (ENOENT), the name is taken by an interface of
                another kind (EINVAL) or busy with another process (EBUSY).
        """
        raw = _check_name(name)
        existed = interface_exists(name)
        fd = OwnedFd(os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        try:
            ifr = _IFREQ_FLAGS.pack(raw, IFF_TAP | IFF_NO_PI)
            got = fcntl.ioctl(fd.fd, TUNSETIFF, ifr)
            self.name = got[:IFNAMSIZ].rstrip(b"\0").decode()
            self.created = not existed
            self._fd = fd
            if up:
                self.set_up(True)
        except BaseException:
            fd.close()
            raise

    # -- interface attributes -----------------------------------------------------------
    def _ifreq(self, request: int, data: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return fcntl.ioctl(s.fileno(), request, data)

    def set_up(self, up: bool) -> None:
        """Set or clear IFF_UP (``ip link set NAME up|down``).

        Raises:
            OSError: the ioctl failed (EPERM without CAP_NET_ADMIN).
        """
        raw = self.name.encode()
        (_, flags) = _IFREQ_FLAGS.unpack(self._ifreq(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0)))
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        self._ifreq(SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, flags & 0xFFFF))

    @property
    def is_up(self) -> bool:
        """True if IFF_UP is set."""
        raw = self.name.encode()
        (_, flags) = _IFREQ_FLAGS.unpack(self._ifreq(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0)))
        return bool(flags & IFF_UP)

    @property
    def mtu(self) -> int:
        """The interface MTU."""
        (_, mtu) = _IFREQ_INT.unpack(self._ifreq(SIOCGIFMTU, _IFREQ_INT.pack(self.name.encode(),
                                                                             0)))
        return int(mtu)

    @property
    def mac(self) -> bytes:
        """The interface's own MAC address (the host side of the tap)."""
        out = self._ifreq(SIOCGIFHWADDR, _IFREQ_HWADDR.pack(self.name.encode(), 0, bytes(6)))
        return bytes(_IFREQ_HWADDR.unpack(out)[2])

    # -- data -----------------------------------------------------------------------------
    def fileno(self) -> int:
        """The tap fd (for the reactor).

        Raises:
            ValueError: the device is closed.
        """
        return self._fd.fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd.closed

    def read_into(self, buf: bytearray | memoryview) -> int | None:
        """Read one frame into ``buf``; its length, or None if none is queued.

        A frame longer than ``buf`` is truncated by the kernel (size buffers for the MTU).

        Raises:
            OSError: the read failed (EBADF after close, EIO if the interface went away).
        """
        try:
            return os.readv(self._fd.fd, [buf])
        except BlockingIOError:
            return None

    def write(self, frame: bytes | bytearray | memoryview) -> bool:
        """Send one frame to the host stack; False if the kernel queue is full (EAGAIN).

        Raises:
            OSError: the write failed otherwise (EINVAL for a frame larger than the MTU
                allows, EIO when the interface is down is reported as success by Linux).
        """
        try:
            os.write(self._fd.fd, frame)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Close the fd (a tap we created disappears with it). Idempotent."""
        self._fd.close()

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"<TapDevice {self.name} {state}{' created' if self.created else ''}>"
