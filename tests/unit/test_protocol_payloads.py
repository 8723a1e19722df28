"""Golden byte vectors for every payload layout (vhost-user.rst "Message types") and the
real traces.

Every expected byte string below was written out by hand from the struct layouts
(little-endian, packed, C sizeof), never produced by the code under test.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest

from vhostuser.errors import RemoteProtocolError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest
from vhostuser.protocol.framing import encode_message


def hx(text: str) -> bytes:
    """Bytes from hex with any whitespace (groups are fields)."""
    return bytes.fromhex("".join(text.split()))


# (payload object, its exact encoding)
GOLDEN: list[tuple[str, Any, bytes]] = [
    ("empty", P.Empty(), b""),
    ("u64", P.U64Payload(value=0x0123456789ABCDEF), hx("ef cd ab 89 67 45 23 01")),
    # trace qemu72-net-to-testpmd: GET_FEATURES reply u64=0xd7c66e7cb
    ("u64 net features", P.U64Payload(value=0xD7C66E7CB), hx("cb e7 66 7c 0d 00 00 00")),
    # trace qemu72-blk-to-qsd: GET_FEATURES reply u64=0x175007e46
    ("u64 blk features", P.U64Payload(value=0x175007E46), hx("46 7e 00 75 01 00 00 00")),
    ("u64 all ones", P.U64Payload(value=2**64 - 1), hx("ff ff ff ff ff ff ff ff")),
    ("vring state", P.VringState(index=1, num=256), hx("01000000 00010000")),
    # trace dpdk-virtio-user: GET_VRING_BASE reply index=1 num=32736
    ("vring state trace", P.VringState(index=1, num=32736), hx("01000000 e07f0000")),
    (
        "vring state packed base",
        P.VringState(index=0, num=0x8001_8002),
        hx("00000000 02800180"),
    ),
    ("vring file", P.VringFile(index=1), hx("01 00 00 00 00 00 00 00")),
    ("vring file nofd", P.VringFile(index=0, nofd=True), hx("00 01 00 00 00 00 00 00")),
    ("vring file 255 nofd", P.VringFile(index=255, nofd=True), hx("ff 01 00 00 00 00 00 00")),
    # trace qemu72-net-to-testpmd: SET_VRING_ADDR index=0 flags=0 desc=0x7f259ea7d000
    # used=0x7f259ea7e240 avail=0x7f259ea7e000 log=0x2a7f240 (order: desc, used, avail, log)
    (
        "vring addr trace",
        P.VringAddr(index=0, flags=0, desc=0x7F259EA7D000, used=0x7F259EA7E240,
                    avail=0x7F259EA7E000, log=0x2A7F240),
        hx("00000000 00000000"
           "00d0a79e257f0000"
           "40e2a79e257f0000"
           "00e0a79e257f0000"
           "40f2a70200000000"),
    ),
    (
        "vring addr log flag",
        P.VringAddr(index=3, flags=1, desc=0x1000, used=0x3000, avail=0x2000, log=0x4000),
        hx("03000000 01000000"
           "0010000000000000"
           "0030000000000000"
           "0020000000000000"
           "0040000000000000"),
    ),
    # trace qemu72-net-to-testpmd: region gpa=0x0 size=0x10000000 uva=0x7f259bfff000 off=0x0
    (
        "memory region trace",
        P.MemoryRegion(guest_phys_addr=0, memory_size=0x10000000,
                       userspace_addr=0x7F259BFFF000, mmap_offset=0),
        hx("0000000000000000 0000001000000000 00f0ff9b257f0000 0000000000000000"),
    ),
    (
        "memory region offset",
        P.MemoryRegion(guest_phys_addr=0x100000000, memory_size=0x40000000,
                       userspace_addr=0x7F0040000000, mmap_offset=0x80000000),
        hx("0000000001000000 0000004000000000 00000040007f0000 0000008000000000"),
    ),
    # trace qemu72-net-to-testpmd: SET_MEM_TABLE size=40 nregions=1 [...]
    (
        "memory table trace",
        P.MemoryTable(regions=(P.MemoryRegion(guest_phys_addr=0, memory_size=0x10000000,
                                              userspace_addr=0x7F259BFFF000, mmap_offset=0),)),
        hx("01000000 00000000"
           "0000000000000000 0000001000000000 00f0ff9b257f0000 0000000000000000"),
    ),
    # trace dpdk-virtio-user: nregions=1 [gpa=0x100331000 size=0x10000000 uva=0x100331000]
    (
        "memory table dpdk trace",
        P.MemoryTable(regions=(P.MemoryRegion(guest_phys_addr=0x100331000,
                                              memory_size=0x10000000,
                                              userspace_addr=0x100331000, mmap_offset=0),)),
        hx("01000000 00000000"
           "0010330001000000 0000001000000000 0010330001000000 0000000000000000"),
    ),
    (
        "memory table two regions",
        P.MemoryTable(regions=(
            P.MemoryRegion(guest_phys_addr=0, memory_size=0x1000, userspace_addr=0x10000,
                           mmap_offset=0),
            P.MemoryRegion(guest_phys_addr=0x2000, memory_size=0x3000,
                           userspace_addr=0x20000, mmap_offset=0x1000),
        )),
        hx("02000000 00000000"
           "0000000000000000 0010000000000000 0000010000000000 0000000000000000"
           "0020000000000000 0030000000000000 0000020000000000 0010000000000000"),
    ),
    (
        "draft memory table (24-byte regions)",
        P.DraftMemoryTable(regions=(
            P.MemoryRegion(guest_phys_addr=0, memory_size=0x10000000,
                           userspace_addr=0x7F259BFFF000, mmap_offset=0),
        )),
        hx("01000000 00000000"
           "0000000000000000 0000001000000000 00f0ff9b257f0000"),
    ),
    # trace qemu72-blk-to-qsd: ADD_MEM_REG size=40 region gpa=0x0 size=0x10000000
    # uva=0x7fb44bfff000 off=0x0
    (
        "single region trace",
        P.SingleRegion(region=P.MemoryRegion(guest_phys_addr=0, memory_size=0x10000000,
                                             userspace_addr=0x7FB44BFFF000, mmap_offset=0)),
        hx("0000000000000000"
           "0000000000000000 0000001000000000 00f0ff4bb47f0000 0000000000000000"),
    ),
    ("log base", P.LogBase(mmap_size=0x1000, mmap_offset=0x20),
     hx("0010000000000000 2000000000000000")),
    (
        "iotlb",
        P.IotlbMsg(iova=0x1000, size=0x2000, uaddr=0x7F0000000000, perm=3, type=2),
        hx("0010000000000000 0020000000000000 0000000000 7f0000 03 02 000000000000"),
    ),
    (
        "iotlb miss",
        P.IotlbMsg(iova=0xFFFF0000, size=0, uaddr=0, perm=1, type=1),
        hx("0000ffff00000000 0000000000000000 0000000000000000 01 01 000000000000"),
    ),
    (
        "config",
        P.ConfigPayload(offset=4, size=2, flags=1, data=b"\xab\xcd"),
        hx("04000000 02000000 01000000 abcd"),
    ),
    ("config empty", P.ConfigPayload(offset=0, size=0, flags=0, data=b""),
     hx("00000000 00000000 00000000")),
    (
        "vring area",
        P.VringArea(index=2, nofd=False, size=0x1000, offset=0x3000),
        hx("0200000000000000 0010000000000000 0030000000000000"),
    ),
    (
        "vring area nofd",
        P.VringArea(index=1, nofd=True, size=0, offset=0),
        hx("0101000000000000 0000000000000000 0000000000000000"),
    ),
    (
        "inflight",
        P.InflightPayload(mmap_size=0x2040, mmap_offset=0, num_queues=2, queue_size=128),
        hx("4020000000000000 0000000000000000 0200 8000 00000000"),
    ),
    (
        "shared object (RFC byte order)",
        P.SharedObject(uuid=uuid.UUID("12345678-9abc-def0-1122-334455667788")),
        hx("12345678 9abc def0 1122 334455667788"),
    ),
    ("device state save", P.DeviceStateParams(direction=0, phase=0), hx("00000000 00000000")),
    ("device state load", P.DeviceStateParams(direction=1, phase=0), hx("01000000 00000000")),
    (
        "shmem config",
        P.ShmemConfig(nregions=2, memory_sizes=(0x1000, 0x200000) + (0,) * 254),
        hx("02000000 00000000 0010000000000000 0000200000000000") + bytes(8 * 254),
    ),
    (
        "shmem map",
        P.ShmemMap(shmid=1, fd_offset=0x1000, shm_offset=0x2000, len=0x3000, flags=1),
        hx("01 00000000000000 0010000000000000 0020000000000000 0030000000000000"
           "0100000000000000"),
    ),
    ("raw", P.RawPayload(data=b"\x01\x02\x03"), b"\x01\x02\x03"),
]


@pytest.mark.parametrize(("name", "obj", "wire"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_encode(name: str, obj: Any, wire: bytes) -> None:
    assert obj.encode() == wire


@pytest.mark.parametrize(("name", "obj", "wire"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode_round_trip(name: str, obj: Any, wire: bytes) -> None:
    decoded = type(obj).decode(wire)
    assert decoded == obj
    assert decoded.encode() == wire
    # decode accepts a memoryview as well as bytes
    assert type(obj).decode(memoryview(wire)) == obj


def test_fixed_sizes_match_protocol_md() -> None:
    sizes: dict[type[Any], int] = {
        P.Empty: 0,
        P.U64Payload: 8,
        P.VringState: 8,
        P.VringFile: 8,
        P.VringAddr: 40,
        P.MemoryRegion: 32,
        P.SingleRegion: 40,
        P.LogBase: 16,
        P.IotlbMsg: 32,
        P.VringArea: 24,
        P.InflightPayload: 24,
        P.SharedObject: 16,
        P.DeviceStateParams: 8,
        P.ShmemConfig: 2056,
        P.ShmemMap: 40,
    }
    for cls, size in sizes.items():
        assert size == cls.SIZE, cls.__name__
    for var in (P.MemoryTable, P.DraftMemoryTable, P.ConfigPayload, P.RawPayload):
        assert var.SIZE is None
    assert P.MemoryTable.REGION_SIZE == 32
    assert P.DraftMemoryTable.REGION_SIZE == 24


def test_memory_table_size_is_8_plus_32n() -> None:
    for n in range(1, 9):
        regions = tuple(
            P.MemoryRegion(guest_phys_addr=i << 20, memory_size=1 << 20,
                           userspace_addr=(1 << 40) + (i << 20), mmap_offset=0)
            for i in range(n)
        )
        wire = P.MemoryTable(regions=regions).encode()
        assert len(wire) == 8 + 32 * n
        assert wire[:8] == struct.pack("<II", n, 0)
        assert P.MemoryTable.decode(wire).regions == regions
        draft = P.DraftMemoryTable(regions=regions).encode()
        assert len(draft) == 8 + 24 * n
        assert P.DraftMemoryTable.decode(draft).regions == regions


def test_shared_object_uuid_is_big_endian_not_windows_guid_order() -> None:
    u = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    wire = P.SharedObject(uuid=u).encode()
    assert wire == bytes(range(0x00, 0x100, 0x11))
    assert wire != u.bytes_le


def test_shmem_config_short_sizes_are_zero_padded() -> None:
    cfg = P.ShmemConfig(nregions=1, memory_sizes=(0x4000,))
    wire = cfg.encode()
    assert len(wire) == 2056
    assert wire[:16] == hx("01000000 00000000 0040000000000000")
    assert wire[16:] == bytes(2040)
    back = P.ShmemConfig.decode(wire)
    assert back.memory_sizes[0] == 0x4000
    assert len(back.memory_sizes) == 256


def test_vring_file_encode_refuses_an_index_beyond_8_bits() -> None:
    with pytest.raises(ValueError, match="256"):
        P.VringFile(index=256).encode()


# -- values from the traces' GET_CONFIG -----------------------------------------------------

BLK_CFG_HEX = (
    "0000020000000000000000007e0000000000000000020000000001000100000000000100008000000100"
    "000001000000008000000100000000"
)


def test_trace_blk_get_config_reply() -> None:
    """qemu72-blk-to-qsd: GET_CONFIG reply, size=69, offset=0 size=57 flags=0 cfg=..."""
    cfg = bytes.fromhex(BLK_CFG_HEX)
    assert len(cfg) == 57
    wire = hx("00000000 39000000 00000000") + cfg
    assert len(wire) == 69
    got = P.ConfigPayload.decode(wire)
    assert got == P.ConfigPayload(offset=0, size=57, flags=0, data=cfg)
    # virtio-blk config: capacity u64 = 0x20000 sectors (64 MiB), seg_max 0x7e, blk_size 512
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg)
    assert capacity == 0x20000
    assert size_max == 0
    assert seg_max == 0x7E
    (blk_size,) = struct.unpack_from("<I", cfg, 20)
    assert blk_size == 512
    # and the request it answered: the same header with an all-zero data field
    request = P.ConfigPayload(offset=0, size=57, flags=0, data=bytes(57)).encode()
    assert request == hx("00000000 39000000 00000000") + bytes(57)


# -- rejects: wrong sizes ---------------------------------------------------------------------

FIXED: list[tuple[type[Any], int]] = [
    (P.Empty, 0),
    (P.U64Payload, 8),
    (P.VringState, 8),
    (P.VringFile, 8),
    (P.VringAddr, 40),
    (P.MemoryRegion, 32),
    (P.SingleRegion, 40),
    (P.LogBase, 16),
    (P.IotlbMsg, 32),
    (P.VringArea, 24),
    (P.InflightPayload, 24),
    (P.SharedObject, 16),
    (P.DeviceStateParams, 8),
    (P.ShmemConfig, 2056),
    (P.ShmemMap, 40),
]


def _valid_body(cls: type[Any], size: int) -> bytes:
    body = bytearray(size)
    if cls is P.IotlbMsg:
        body[25] = 1  # type 1 (miss); an all-zero type is invalid on its own
    return bytes(body)


@pytest.mark.parametrize(("cls", "size"), FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_fixed_size_payload_rejects_every_other_size(cls: type[Any], size: int) -> None:
    cls.decode(_valid_body(cls, size))  # the right size is accepted
    for bad in sorted({0, 1, 4, size - 1, size + 1, size + 8, 4096} - {size}):
        if bad < 0:
            continue
        with pytest.raises(RemoteProtocolError) as info:
            cls.decode(bytes(bad))
        msg = str(info.value)
        assert str(bad) in msg, msg
        assert str(size) in msg, msg


def test_memory_table_rejects_region_counts() -> None:
    region = bytes(32)
    for n in (0, 9, 264, 0xFFFFFFFF):
        wire = struct.pack("<II", n, 0) + region * min(n, 9)
        with pytest.raises(RemoteProtocolError, match=str(n)):
            P.MemoryTable.decode(wire)
    with pytest.raises(RemoteProtocolError, match="4294967295"):
        P.MemoryTable.decode(struct.pack("<II", 0xFFFFFFFF, 0))


def test_memory_table_rejects_size_mismatch() -> None:
    one = struct.pack("<II", 1, 0) + bytes(32)
    P.MemoryTable.decode(one)
    for wire in (one[:-1], one + b"\0", one + bytes(32), one[:8]):
        with pytest.raises(RemoteProtocolError, match=str(len(wire))):
            P.MemoryTable.decode(wire)
    for short in (b"", b"\x01\0\0\0", bytes(7)):
        with pytest.raises(RemoteProtocolError, match=str(len(short))):
            P.MemoryTable.decode(short)


def test_draft_memory_table_rejects_current_32_byte_regions() -> None:
    current = struct.pack("<II", 1, 0) + bytes(32)
    with pytest.raises(RemoteProtocolError, match="40"):
        P.DraftMemoryTable.decode(current)
    draft = struct.pack("<II", 1, 0) + bytes(24)
    with pytest.raises(RemoteProtocolError, match="32"):
        P.MemoryTable.decode(draft)


def test_config_rejects_bad_headers() -> None:
    with pytest.raises(RemoteProtocolError, match="257"):
        P.ConfigPayload.decode(struct.pack("<III", 0, 257, 0) + bytes(257))
    with pytest.raises(RemoteProtocolError, match="57"):
        P.ConfigPayload.decode(struct.pack("<III", 0, 57, 0) + bytes(56))
    with pytest.raises(RemoteProtocolError, match="57"):
        P.ConfigPayload.decode(struct.pack("<III", 0, 57, 0) + bytes(58))
    with pytest.raises(RemoteProtocolError, match="0x2"):
        P.ConfigPayload.decode(struct.pack("<III", 0, 1, 2) + b"\0")
    with pytest.raises(RemoteProtocolError, match="11"):
        P.ConfigPayload.decode(bytes(11))
    # the largest QEMU size is accepted
    P.ConfigPayload.decode(struct.pack("<III", 0, 256, 1) + bytes(256))


# -- rejects: reserved bits and out-of-range fields -------------------------------------------


@pytest.mark.parametrize("value", [0x200, 0x1FF | 0x400, 1 << 32, 1 << 63, 2**64 - 1])
def test_vring_file_rejects_reserved_bits(value: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"{value:#x}"):
        P.VringFile.decode(struct.pack("<Q", value))


def test_vring_file_decodes_index_and_nofd() -> None:
    assert P.VringFile.decode(struct.pack("<Q", 0x1FF)) == P.VringFile(index=255, nofd=True)
    assert P.VringFile.decode(struct.pack("<Q", 0x100)) == P.VringFile(index=0, nofd=True)
    assert P.VringFile.decode(struct.pack("<Q", 0x7)) == P.VringFile(index=7, nofd=False)


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x80000000])
def test_vring_addr_rejects_reserved_flags(flags: int) -> None:
    wire = struct.pack("<IIQQQQ", 0, flags, 0, 0, 0, 0)
    with pytest.raises(RemoteProtocolError, match=f"{flags:#x}"):
        P.VringAddr.decode(wire)


@pytest.mark.parametrize("value", [0x200, 1 << 40])
def test_vring_area_rejects_reserved_bits(value: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"{value:#x}"):
        P.VringArea.decode(struct.pack("<QQQ", value, 0, 0))


@pytest.mark.parametrize(("perm", "typ", "bad"), [(4, 1, "4"), (0xFF, 1, "255"),
                                                   (0, 0, "0"), (0, 5, "5"), (3, 0xFF, "255")])
def test_iotlb_rejects_perm_and_type(perm: int, typ: int, bad: str) -> None:
    wire = struct.pack("<QQQBB6x", 0, 0, 0, perm, typ)
    with pytest.raises(RemoteProtocolError, match=bad):
        P.IotlbMsg.decode(wire)


def test_iotlb_accepts_every_defined_perm_and_type() -> None:
    for perm in range(4):
        for typ in range(1, 5):
            wire = struct.pack("<QQQBB6x", 1, 2, 3, perm, typ)
            assert P.IotlbMsg.decode(wire) == P.IotlbMsg(iova=1, size=2, uaddr=3, perm=perm,
                                                          type=typ)


@pytest.mark.parametrize(("direction", "phase", "bad"), [(2, 0, "2"), (0xFFFFFFFF, 0,
                                                          "4294967295"), (0, 1, "1"),
                                                         (1, 7, "7")])
def test_device_state_params_rejects(direction: int, phase: int, bad: str) -> None:
    with pytest.raises(RemoteProtocolError, match=bad):
        P.DeviceStateParams.decode(struct.pack("<II", direction, phase))


def test_shmem_config_rejects_too_many_regions() -> None:
    wire = struct.pack("<II", 257, 0) + bytes(2048)
    with pytest.raises(RemoteProtocolError, match="257"):
        P.ShmemConfig.decode(wire)


@pytest.mark.parametrize("flags", [2, 0x8000000000000000])
def test_shmem_map_rejects_reserved_flags(flags: int) -> None:
    wire = struct.pack("<B7xQQQQ", 0, 0, 0, 0, flags)
    with pytest.raises(RemoteProtocolError, match=f"{flags:#x}"):
        P.ShmemMap.decode(wire)


# -- whole messages: header golden vectors ----------------------------------------------------


def test_header_golden_vectors() -> None:
    R = FrontendRequest
    assert encode_message(R.GET_FEATURES) == hx("01000000 01000000 00000000")
    assert encode_message(R.SET_MEM_TABLE, bytes(40), need_reply=True)[:12] == hx(
        "05000000 09000000 28000000"
    )
    # trace: BE->FE GET_FEATURES flags=0x5 (reply) size=8 u64=0xd7c66e7cb
    assert encode_message(R.GET_FEATURES, P.U64Payload(value=0xD7C66E7CB).encode(),
                          reply=True) == hx("01000000 05000000 08000000 cbe7667c0d000000")
    # trace: FE->BE SET_VRING_KICK index=1, fds=1
    assert encode_message(R.SET_VRING_KICK, P.VringFile(index=1).encode()) == hx(
        "0c000000 01000000 08000000 0100000000000000"
    )
    # trace: FE->BE GET_CONFIG size=69
    assert encode_message(R.GET_CONFIG, bytes(69))[:12] == hx("18000000 01000000 45000000")
    with pytest.raises(ValueError, match="4097"):
        encode_message(R.SET_CONFIG, bytes(4097))
