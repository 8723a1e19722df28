"""virtio-net definitions shared by the device (back-end) and the driver (front-end). Pure.

The config space layout, the virtio_net_hdr and its flags, Ethernet sizes, and MAC
address text (virtio 1.2 §5.1). Both roles import them from here, so each fact has one
place; ``vhostuser.devices.net`` re-exports them for older imports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..protocol.enums import NetFeature, VirtioFeature

NET_CONFIG = struct.Struct("<6sHHH")
"""mac[6], status u16, max_virtqueue_pairs u16, mtu u16 (virtio 1.2 §5.1.4)."""

VIRTIO_NET_S_LINK_UP = 1

# virtio 1.2 §5.1.6: struct virtio_net_hdr (10 bytes) and the 12-byte variant with
# num_buffers, used with VERSION_1 or MRG_RXBUF.
NET_HDR: Final = struct.Struct("<BBHHHH")
"""flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16."""
NET_HDR_MRG: Final = struct.Struct("<BBHHHHH")
"""The same plus num_buffers u16."""
NET_HDR_LEGACY_LEN: Final = 10
NET_HDR_LEN: Final = 12

HDR_F_NEEDS_CSUM: Final = 1
HDR_F_DATA_VALID: Final = 2
HDR_F_RSC_INFO: Final = 4

GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80

ETH_HLEN: Final = 14
VLAN_HLEN: Final = 4
ETH_MIN_MTU: Final = 68  # virtio 1.2 §5.1.4.1: "mtu ... MUST be at least 68"
MAX_GSO_FRAME: Final = 65535 + ETH_HLEN + VLAN_HLEN
"""Largest frame accepted with a GSO header (a 64 KiB IP packet plus Ethernet/VLAN)."""

DEFAULT_MTU: Final = 1500


@dataclass(frozen=True, slots=True)
class NetConfig:
    """Decoded virtio-net config space (the fields present in the bytes given)."""

    mac: str | None
    status: int | None
    max_virtqueue_pairs: int | None
    mtu: int | None

    @classmethod
    def decode(cls, data: bytes) -> NetConfig:
        """Decode up to 12 bytes of config; missing trailing fields are None."""
        padded = data[: NET_CONFIG.size].ljust(NET_CONFIG.size, b"\0")
        mac, status, pairs, mtu = NET_CONFIG.unpack(padded)
        n = len(data)
        return cls(
            mac=":".join(f"{b:02x}" for b in mac) if n >= 6 else None,
            status=status if n >= 8 else None,
            max_virtqueue_pairs=pairs if n >= 10 else None,
            mtu=mtu if n >= 12 else None,
        )


def parse_mac(text: str) -> bytes:
    """Parse ``52:54:00:12:34:56``.

    Raises:
        ValueError: not six hex octets.
    """
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex octets")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex octets") from None


def format_mac(mac: bytes) -> str:
    """``b'RT\\x00\\x00\\x00\\x01'`` -> ``52:54:00:00:00:01``."""
    return ":".join(f"{b:02x}" for b in mac)


def net_header_len(features: int) -> int:
    """Size of the virtio-net header for the acked ``features`` (virtio 1.2 §5.1.6).

    12 bytes with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, else the legacy 10.
    """
    if features & (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return NET_HDR_LEN
    return NET_HDR_LEGACY_LEN
