"""virtio-blk definitions shared by the device (back-end) and the driver (front-end). Pure.

The config space, request types and status codes, the request header and the
discard/write-zeroes segment (virtio 1.2 §5.2). Both roles import them from here, so each
fact has one place; ``vhostuser.devices.blk`` re-exports them for older imports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..protocol.enums import BlkFeature

BLK_CONFIG_HEAD = struct.Struct("<QII4sI8sBBH")
"""capacity, size_max, seg_max, geometry, blk_size, topology, writeback, unused, num_queues."""
BLK_DISCARD = struct.Struct("<III")
BLK_WZ = struct.Struct("<IIB")


def blk_config_size(features: int) -> int:
    """Config bytes a driver reads for these features (as QEMU's virtio_blk_cfg_size_params).

    Up to ``num_queues`` always (36); through the discard fields with DISCARD (48); through
    ``write_zeroes_may_unmap`` with WRITE_ZEROES (57).
    """
    if features & BlkFeature.WRITE_ZEROES:
        return 57
    if features & BlkFeature.DISCARD:
        return 48
    return 36


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """Decoded virtio-blk config space."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    num_queues: int
    max_discard_sectors: int | None = None
    max_discard_seg: int | None = None
    discard_sector_alignment: int | None = None
    max_write_zeroes_sectors: int | None = None
    max_write_zeroes_seg: int | None = None
    write_zeroes_may_unmap: int | None = None

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes (capacity is in 512-byte sectors whatever blk_size says)."""
        return self.capacity * 512

    @classmethod
    def decode(cls, data: bytes) -> BlkConfig:
        """Decode at least 36 bytes of config.

        Raises:
            ValueError: fewer than 36 bytes.
        """
        if len(data) < BLK_CONFIG_HEAD.size:
            raise ValueError(f"blk config is {len(data)} bytes, need >= {BLK_CONFIG_HEAD.size}")
        cap, size_max, seg_max, _geo, blk_size, _topo, _wce, _u, nq = BLK_CONFIG_HEAD.unpack_from(
            data
        )
        extra: dict[str, int] = {}
        if len(data) >= 48:
            d = BLK_DISCARD.unpack_from(data, 36)
            extra.update(max_discard_sectors=d[0], max_discard_seg=d[1],
                         discard_sector_alignment=d[2])
        if len(data) >= 57:
            w = BLK_WZ.unpack_from(data, 48)
            extra.update(max_write_zeroes_sectors=w[0], max_write_zeroes_seg=w[1],
                         write_zeroes_may_unmap=w[2])
        return cls(capacity=cap, size_max=size_max, seg_max=seg_max, blk_size=blk_size,
                   num_queues=nq, **extra)


# ---------------------------------------------------------------------------------------
# The virtio-blk device (virtio 1.2 §5.2)
# ---------------------------------------------------------------------------------------

SECTOR_SIZE: Final = 512
"""virtio 1.2 §5.2.6: sectors are 512 bytes whatever ``blk_size`` says."""

# virtio 1.2 §5.2.6 request types.
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_GET_LIFETIME: Final = 10
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_T_SECURE_ERASE: Final = 14
VIRTIO_BLK_T_BARRIER: Final = 0x8000_0000
"""Legacy barrier bit (virtio 1.2 §5.2.6.3); ignored, as qemu-storage-daemon does."""

# virtio 1.2 §5.2.6 status values.
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2

VIRTIO_BLK_ID_BYTES: Final = 20
"""GET_ID answers with up to 20 bytes, NUL-padded (virtio 1.2 §5.2.6)."""

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1

REQ_HEADER: Final = struct.Struct("<IIQ")
"""``struct virtio_blk_req`` head: type u32, reserved u32, sector u64 (16 bytes)."""
DWZ_SEGMENT: Final = struct.Struct("<QII")
"""``struct virtio_blk_discard_write_zeroes``: sector u64, num_sectors u32, flags u32."""

BLK_CONFIG_SIZE: Final = 60
"""virtio_blk_config through ``unused1[3]`` after ``write_zeroes_may_unmap``."""


STATUS_NAMES: Final = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR",
                       VIRTIO_BLK_S_UNSUPP: "UNSUPP"}
