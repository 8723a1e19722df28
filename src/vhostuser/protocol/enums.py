"""Message ids and feature bits of vhost-user and virtio. No I/O.

Names follow the spec without the ``VHOST_USER_`` prefix; bit sets are ``IntFlag`` built
from bit numbers once, so a bit number is never used where a mask is meant.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class FrontendRequest(IntEnum):
    """Requests the front-end sends on the main socket (vhost-user.rst, front-end messages)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    # 44 and 45 moved while being merged; these follow QEMU's merged enum
    # (include/hw/virtio/vhost-user.h), not the snapshots taken while patches were in flight.
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45


class BackendRequest(IntEnum):
    """Requests sent by the back-end on the SET_BACKEND_REQ_FD socket."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class DraftTextRequest(IntEnum):
    """The 2014 draft's ids as its protocol text numbers them (DRAFT_TEXT dialect).

    The text posted with the vhost-user v6 patches (qemu-devel, January 2014) puts ECHO
    first and shifts every vhost ioctl by one; nothing above SET_VRING_ERR = 15 exists.
    """

    ECHO = 1
    GET_FEATURES = 2
    SET_FEATURES = 3
    SET_OWNER = 4
    RESET_OWNER = 5
    SET_MEM_TABLE = 6
    SET_LOG_BASE = 7
    SET_LOG_FD = 8
    SET_VRING_NUM = 9
    SET_VRING_ADDR = 10
    SET_VRING_BASE = 11
    GET_VRING_BASE = 12
    SET_VRING_KICK = 13
    SET_VRING_CALL = 14
    SET_VRING_ERR = 15


class DraftCodeRequest(IntEnum):
    """The 2014 draft's ids as its code numbered them (DRAFT_CODE dialect).

    The v5/v6 patches' ``VhostUserRequest`` enum (QEMU hw/virtio/vhost-backend.c of that
    series, and the vapp reference server): ids 1-14 are those that shipped, then
    NET_SET_BACKEND = 15 and ECHO = 16, both removed in v7. QEMU 2.4 later reused 15 and
    16 for GET/SET_PROTOCOL_FEATURES.
    """

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    NET_SET_BACKEND = 15
    ECHO = 16


def _bit(n: int) -> int:
    return 1 << n


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES). Bits 20-23 follow QEMU's merged header."""

    MQ = _bit(0)
    LOG_SHMFD = _bit(1)
    RARP = _bit(2)
    REPLY_ACK = _bit(3)
    MTU = _bit(4)
    BACKEND_REQ = _bit(5)
    CROSS_ENDIAN = _bit(6)
    CRYPTO_SESSION = _bit(7)
    PAGEFAULT = _bit(8)
    CONFIG = _bit(9)
    BACKEND_SEND_FD = _bit(10)
    HOST_NOTIFIER = _bit(11)
    INFLIGHT_SHMFD = _bit(12)
    RESET_DEVICE = _bit(13)
    INBAND_NOTIFICATIONS = _bit(14)
    CONFIGURE_MEM_SLOTS = _bit(15)
    STATUS = _bit(16)
    XEN_MMAP = _bit(17)
    SHARED_OBJECT = _bit(18)
    DEVICE_STATE = _bit(19)
    GET_VRING_BASE_INFLIGHT = _bit(20)
    GPA_ADDRESSES = _bit(21)
    SHMEM = _bit(22)
    GET_VRING_BASE_SKIP_DRAIN = _bit(23)


class VirtioFeature(IntFlag):
    """Device-independent virtio feature bits, plus the two vhost-specific ones."""

    NOTIFY_ON_EMPTY = _bit(24)
    LOG_ALL = _bit(26)  # VHOST_F_LOG_ALL
    ANY_LAYOUT = _bit(27)
    RING_INDIRECT_DESC = _bit(28)
    RING_EVENT_IDX = _bit(29)
    PROTOCOL_FEATURES = _bit(30)  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = _bit(32)
    ACCESS_PLATFORM = _bit(33)
    RING_PACKED = _bit(34)
    IN_ORDER = _bit(35)
    ORDER_PLATFORM = _bit(36)
    SR_IOV = _bit(37)
    NOTIFICATION_DATA = _bit(38)
    NOTIF_CONFIG_DATA = _bit(39)
    RING_RESET = _bit(40)
    ADMIN_VQ = _bit(41)


class NetFeature(IntFlag):
    """virtio-net device feature bits (virtio 1.2 §5.1.3)."""

    CSUM = _bit(0)
    GUEST_CSUM = _bit(1)
    CTRL_GUEST_OFFLOADS = _bit(2)
    MTU = _bit(3)
    MAC = _bit(5)
    GSO = _bit(6)
    GUEST_TSO4 = _bit(7)
    GUEST_TSO6 = _bit(8)
    GUEST_ECN = _bit(9)
    GUEST_UFO = _bit(10)
    HOST_TSO4 = _bit(11)
    HOST_TSO6 = _bit(12)
    HOST_ECN = _bit(13)
    HOST_UFO = _bit(14)
    MRG_RXBUF = _bit(15)
    STATUS = _bit(16)
    CTRL_VQ = _bit(17)
    CTRL_RX = _bit(18)
    CTRL_VLAN = _bit(19)
    CTRL_RX_EXTRA = _bit(20)
    GUEST_ANNOUNCE = _bit(21)
    MQ = _bit(22)
    CTRL_MAC_ADDR = _bit(23)
    DEVICE_STATS = _bit(50)
    VQ_NOTF_COAL = _bit(52)
    NOTF_COAL = _bit(53)
    GUEST_USO4 = _bit(54)
    GUEST_USO6 = _bit(55)
    HOST_USO = _bit(56)
    HASH_REPORT = _bit(57)
    GUEST_HDRLEN = _bit(59)
    RSS = _bit(60)
    RSC_EXT = _bit(61)
    STANDBY = _bit(62)
    SPEED_DUPLEX = _bit(63)


class BlkFeature(IntFlag):
    """virtio-blk device feature bits (virtio 1.2 §5.2.3)."""

    BARRIER = _bit(0)
    SIZE_MAX = _bit(1)
    SEG_MAX = _bit(2)
    GEOMETRY = _bit(4)
    RO = _bit(5)
    BLK_SIZE = _bit(6)
    SCSI = _bit(7)
    FLUSH = _bit(9)
    TOPOLOGY = _bit(10)
    CONFIG_WCE = _bit(11)
    MQ = _bit(12)
    DISCARD = _bit(13)
    WRITE_ZEROES = _bit(14)
    LIFETIME = _bit(15)
    SECURE_ERASE = _bit(16)
    ZONED = _bit(17)


class DeviceType(IntEnum):
    """Virtio device ids that matter for naming device-specific feature bits."""

    NET = 1
    BLK = 2


DEVICE_FEATURES: dict[DeviceType, type[IntFlag]] = {
    DeviceType.NET: NetFeature,
    DeviceType.BLK: BlkFeature,
}

DEVICE_FEATURE_BITS = (1 << 24) - 1 | (0xFFFF << 48)
"""Bits 0-23 and 48-63 are device-specific (virtio 1.2 §6)."""

# -- what existed when the 2014 draft was written (January 2014) -----------------------------
# Legacy virtio (0.9.5 and the Linux/QEMU headers of the time) had 32 feature bits: nothing
# at or above bit 32 (VERSION_1 came with virtio 1.0, packed rings in 2018), and bit 30 was
# VIRTIO_F_BAD_FEATURE, not yet VHOST_USER_F_PROTOCOL_FEATURES (2015).

DRAFT_VIRTIO_FEATURES = int(
    VirtioFeature.NOTIFY_ON_EMPTY
    | VirtioFeature.LOG_ALL
    | VirtioFeature.ANY_LAYOUT  # QEMU 1.6, 2013
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_EVENT_IDX
)
"""Device-independent bits a 2014 draft peer knew."""

DRAFT_DEVICE_FEATURES: dict[DeviceType, int] = {
    # Every net bit below 24 but MTU (bit 3, 2016) and bit 4 (never defined).
    DeviceType.NET: ((1 << 24) - 1) & ~int(NetFeature.MTU) & ~(1 << 4),
    # Up to CONFIG_WCE (bit 11, 2012); blk MQ came in mid-2014, DISCARD and later in 2018.
    DeviceType.BLK: int(
        BlkFeature.BARRIER | BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.GEOMETRY
        | BlkFeature.RO | BlkFeature.BLK_SIZE | BlkFeature.SCSI | BlkFeature.FLUSH
        | BlkFeature.TOPOLOGY | BlkFeature.CONFIG_WCE
    ),
}
"""Device-specific bits defined by January 2014, per device type."""


def draft_feature_mask(device: DeviceType | None) -> int:
    """The virtio feature bits a 2014 draft dialect may offer for ``device``.

    For a device type we have no table for, every device-specific bit below 24 is kept
    (only its own definition can say when it appeared); bits 32 and up never are.
    """
    unknown = (1 << 24) - 1
    device_bits = unknown if device is None else DRAFT_DEVICE_FEATURES.get(device, unknown)
    return DRAFT_VIRTIO_FEATURES | device_bits


def feature_names(value: int, device: DeviceType | None = None) -> list[str]:
    """Name every set bit of a virtio feature word; unknown bits become ``bit<N>``.

    Device-specific bits are named only when ``device`` is given.
    """
    names: list[str] = []
    dev_cls = DEVICE_FEATURES.get(device) if device is not None else None
    for n in range(64):
        mask = 1 << n
        if not value & mask:
            continue
        name: str | None = None
        if mask & DEVICE_FEATURE_BITS:
            if dev_cls is not None:
                try:
                    name = dev_cls(mask).name
                except ValueError:
                    name = None
        else:
            try:
                name = VirtioFeature(mask).name
            except ValueError:
                name = None
        names.append(name if name is not None else f"bit{n}")
    return names


def protocol_feature_names(value: int) -> list[str]:
    """Name every set bit of a protocol feature word; unknown bits become ``bit<N>``."""
    out: list[str] = []
    for n in range(64):
        mask = 1 << n
        if value & mask:
            try:
                name = ProtocolFeature(mask).name
            except ValueError:
                name = None
            out.append(name if name is not None else f"bit{n}")
    return out
