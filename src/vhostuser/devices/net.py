"""virtio-net device basics: config space, feature bits and a minimal (sink) device. No I/O.

The full switch comes later; this module gives the config layout (virtio 1.2 §5.1.4) and
:class:`NullNetDevice`, a back-end that completes the handshake with any net front-end,
reports the link up and consumes every transmitted frame (counting them) while offering
no receive traffic.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..protocol.enums import DeviceType, NetFeature, ProtocolFeature
from .base import Device

NET_CONFIG = struct.Struct("<6sHHH")
"""mac[6], status u16, max_virtqueue_pairs u16, mtu u16 (virtio 1.2 §5.1.4)."""

VIRTIO_NET_S_LINK_UP = 1


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
    return bytes(int(p, 16) for p in parts)


class NullNetDevice(Device):
    """A virtio-net back-end that sinks TX frames and offers no RX traffic."""

    device_type = DeviceType.NET

    def __init__(self, *, queue_pairs: int = 1, mac: str = "52:54:00:00:00:01",
                 mtu: int = 1500, offer_config: bool = False) -> None:
        self.offer_config = offer_config
        if not 1 <= queue_pairs <= 128:
            raise ValueError(f"queue_pairs {queue_pairs} is outside 1..128")
        self.num_queues = 2 * queue_pairs
        self.mac = parse_mac(mac)
        self.mtu = mtu
        self.virtio_features = int(
            NetFeature.MAC | NetFeature.STATUS | NetFeature.MRG_RXBUF | NetFeature.MTU
            | (NetFeature.MQ if queue_pairs > 1 else 0)
        )
        self.protocol_features = int(ProtocolFeature.RARP | ProtocolFeature.MTU
                                     | ProtocolFeature.MQ)
        self.tx_frames = 0
        self.tx_bytes = 0

    def config_space(self) -> bytes:
        """mac, status (LINK_UP), max_virtqueue_pairs, mtu."""
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.num_queues // 2, self.mtu)

    def consumes(self, index: int) -> bool:
        """Only TX queues (odd indices) are drained on a kick."""
        return index % 2 == 1

    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        """Count and drop transmitted frames (header included)."""
        if enabled:
            for c in chains:
                self.tx_frames += 1
                self.tx_bytes += c.readable_len
        return [(c.head, 0) for c in chains]
