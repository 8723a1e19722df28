"""Payload layouts of every vhost-user message, with exact sizes. No I/O.

Each payload is a frozen, slotted, keyword-only dataclass with its ``struct.Struct`` beside
the fields. ``decode`` checks syntax only (exact size, reserved bits, field ranges a layout
implies); the connection state machines check meaning (order, features, indices).
All integers are host-native little-endian (vhost-user.rst: "native byte order"; we target
x86-64 and arm64, both little-endian), so the structs use ``<`` explicitly.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from ..errors import RemoteProtocolError

U64 = struct.Struct("<Q")


def _need(name: str, data: bytes | memoryview, size: int) -> None:
    if len(data) != size:
        raise RemoteProtocolError(f"{name} payload is {len(data)} bytes, expected {size}")


class Payload(Protocol):
    """What every payload class provides."""

    SIZE: ClassVar[int | None]

    def encode(self) -> bytes: ...

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Empty:
    """No payload (size 0)."""

    SIZE: ClassVar[int | None] = 0

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("empty", data, 0)
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class U64Payload:
    """A single u64 (features, status, MTU, acks)."""

    value: int
    SIZE: ClassVar[int | None] = 8
    STRUCT: ClassVar[struct.Struct] = U64

    def encode(self) -> bytes:
        return U64.pack(self.value)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("u64", data, 8)
        return cls(value=U64.unpack(data)[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class VringState:
    """struct vhost_vring_state: index u32, num u32."""

    index: int
    num: int
    SIZE: ClassVar[int | None] = 8
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("vring state", data, 8)
        index, num = cls.STRUCT.unpack(data)
        return cls(index=index, num=num)


VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100


@dataclass(frozen=True, slots=True, kw_only=True)
class VringFile:
    """KICK/CALL/ERR payload: u64 with bits 0-7 the ring index, bit 8 NOFD, rest reserved."""

    index: int
    nofd: bool = False
    SIZE: ClassVar[int | None] = 8

    def encode(self) -> bytes:
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise ValueError(f"vring file index {self.index} does not fit in 8 bits")
        return U64.pack(self.index | (VRING_NOFD if self.nofd else 0))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("vring file", data, 8)
        (v,) = U64.unpack(data)
        if v & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise RemoteProtocolError(f"vring file u64 {v:#x} has reserved bits set")
        return cls(index=v & VRING_INDEX_MASK, nofd=bool(v & VRING_NOFD))


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftVringFile:
    """The 2014 draft's KICK/CALL/ERR and NET_SET_BACKEND payload: the ring index as a u64.

    The draft has no NOFD bit: its code (v6) attaches the fd only when it has a valid one
    and sends none otherwise. Rings are numbered as in the current protocol's
    8-bit index field, so a value of 256 or more names no ring (0x100 is the current
    protocol's NOFD bit).
    """

    index: int
    SIZE: ClassVar[int | None] = 8

    def encode(self) -> bytes:
        """Encode the index as a u64.

        Raises:
            ValueError: the index is outside 0..255.
        """
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise ValueError(f"draft vring file index {self.index} is outside 0..255")
        return U64.pack(self.index)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("draft vring file", data, 8)
        (v,) = U64.unpack(data)
        if v > VRING_INDEX_MASK:
            raise RemoteProtocolError(f"draft vring file index {v:#x} is outside 0..255")
        return cls(index=v)


VRING_F_LOG = 0x1


@dataclass(frozen=True, slots=True, kw_only=True)
class VringAddr:
    """struct vhost_vring_addr: index, flags (bit 0 LOG), desc, used, avail, log_guest_addr."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    SIZE: ClassVar[int | None] = 40
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(
            self.index, self.flags, self.desc, self.used, self.avail, self.log
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("vring address", data, 40)
        index, flags, desc, used, avail, log = cls.STRUCT.unpack(data)
        if flags & ~VRING_F_LOG:
            raise RemoteProtocolError(f"vring address flags {flags:#x} has reserved bits set")
        return cls(index=index, flags=flags, desc=desc, used=used, avail=avail, log=log)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRegion:
    """VhostUserMemoryRegion: guest_phys_addr, memory_size, userspace_addr, mmap_offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int | None] = 32
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("memory region", data, 32)
        g, s, u, o = cls.STRUCT.unpack(data)
        return cls(guest_phys_addr=g, memory_size=s, userspace_addr=u, mmap_offset=o)


MAX_MEM_TABLE_REGIONS = 8
"""VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most 8 regions."""

_NREGIONS = struct.Struct("<II")


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryTable:
    """SET_MEM_TABLE: nregions u32, padding u32, then nregions regions (8 + 32n bytes)."""

    regions: tuple[MemoryRegion, ...]
    SIZE: ClassVar[int | None] = None
    REGION_SIZE: ClassVar[int] = 32

    def encode(self) -> bytes:
        return _NREGIONS.pack(len(self.regions), 0) + b"".join(
            r.encode() for r in self.regions
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        if len(data) < 8:
            raise RemoteProtocolError(f"memory table payload is {len(data)} bytes, need >= 8")
        n, _pad = _NREGIONS.unpack_from(data)
        if n == 0 or n > MAX_MEM_TABLE_REGIONS:
            raise RemoteProtocolError(
                f"memory table nregions {n} is outside 1..{MAX_MEM_TABLE_REGIONS}"
            )
        want = 8 + cls.REGION_SIZE * n
        if len(data) != want:
            raise RemoteProtocolError(
                f"memory table with {n} regions is {len(data)} bytes, expected {want}"
            )
        mv = memoryview(data)
        return cls(regions=tuple(cls._region(mv[8 + cls.REGION_SIZE * i :][: cls.REGION_SIZE])
                                 for i in range(n)))

    @classmethod
    def _region(cls, data: memoryview) -> MemoryRegion:
        return MemoryRegion.decode(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftMemoryTable(MemoryTable):
    """The 2014 draft's SET_MEM_TABLE: 24-byte regions without mmap_offset (taken as 0).

    mmap_offset was added later (QEMU commit 3fd74b84); the draft maps each region's fd
    from offset 0.
    """

    REGION_SIZE: ClassVar[int] = 24
    _R24: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    def encode(self) -> bytes:
        """Encode nregions, padding and the 24-byte regions.

        Raises:
            ValueError: a region has a non-zero mmap_offset, which the layout cannot carry.
        """
        for r in self.regions:
            if r.mmap_offset:
                raise ValueError(
                    f"region at gpa {r.guest_phys_addr:#x} has mmap_offset {r.mmap_offset:#x}; "
                    "the draft's 24-byte regions have no mmap_offset"
                )
        return _NREGIONS.pack(len(self.regions), 0) + b"".join(
            self._R24.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr)
            for r in self.regions
        )

    @classmethod
    def _region(cls, data: memoryview) -> MemoryRegion:
        g, s, u = cls._R24.unpack(data)
        return MemoryRegion(guest_phys_addr=g, memory_size=s, userspace_addr=u, mmap_offset=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG: padding u64, then one region (40 bytes)."""

    region: MemoryRegion
    SIZE: ClassVar[int | None] = 40

    def encode(self) -> bytes:
        return U64.pack(0) + self.region.encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("single memory region", data, 40)
        return cls(region=MemoryRegion.decode(memoryview(data)[8:]))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogBase:
    """SET_LOG_BASE: mmap_size u64, mmap_offset u64."""

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int | None] = 16
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("log base", data, 16)
        s, o = cls.STRUCT.unpack(data)
        return cls(mmap_size=s, mmap_offset=o)


@dataclass(frozen=True, slots=True, kw_only=True)
class IotlbMsg:
    """struct vhost_iotlb_msg: iova, size, uaddr, perm u8, type u8, 6 bytes padding (32)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    SIZE: ClassVar[int | None] = 32
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")
    PERMS: ClassVar[range] = range(0, 4)
    TYPES: ClassVar[range] = range(1, 5)

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("IOTLB", data, 32)
        iova, size, uaddr, perm, typ = cls.STRUCT.unpack(data)
        if perm not in cls.PERMS:
            raise RemoteProtocolError(f"IOTLB perm {perm} is not 0..3")
        if typ not in cls.TYPES:
            raise RemoteProtocolError(f"IOTLB type {typ} is not 1..4")
        return cls(iova=iova, size=size, uaddr=uaddr, perm=perm, type=typ)


MAX_CONFIG_SIZE = 256
CONFIG_HEADER = struct.Struct("<III")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigPayload:
    """GET/SET_CONFIG: offset u32, size u32, flags u32 (0 writable, 1 migration), data[size]."""

    offset: int
    size: int
    flags: int
    data: bytes
    SIZE: ClassVar[int | None] = None

    def encode(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        if len(data) < 12:
            raise RemoteProtocolError(f"config payload is {len(data)} bytes, need >= 12")
        off, size, flags = CONFIG_HEADER.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise RemoteProtocolError(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(data) != 12 + size:
            raise RemoteProtocolError(
                f"config payload is {len(data)} bytes but its size field says 12 + {size}"
            )
        if flags > 1:
            raise RemoteProtocolError(f"config flags {flags:#x} is not 0 or 1")
        return cls(offset=off, size=size, flags=flags, data=bytes(data[12:]))


@dataclass(frozen=True, slots=True, kw_only=True)
class VringArea:
    """VRING_HOST_NOTIFIER_MSG: u64 (index | NOFD), size u64, offset u64 (24)."""

    index: int
    nofd: bool
    size: int
    offset: int
    SIZE: ClassVar[int | None] = 24
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(
            self.index | (VRING_NOFD if self.nofd else 0), self.size, self.offset
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("vring area", data, 24)
        v, size, off = cls.STRUCT.unpack(data)
        if v & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise RemoteProtocolError(f"vring area u64 {v:#x} has reserved bits set")
        return cls(index=v & VRING_INDEX_MASK, nofd=bool(v & VRING_NOFD), size=size, offset=off)


@dataclass(frozen=True, slots=True, kw_only=True)
class InflightPayload:
    """GET/SET_INFLIGHT_FD: mmap_size, mmap_offset, num_queues u16, queue_size u16, pad (24)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    SIZE: ClassVar[int | None] = 24
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("inflight", data, 24)
        s, o, nq, qs = cls.STRUCT.unpack(data)
        return cls(mmap_size=s, mmap_offset=o, num_queues=nq, queue_size=qs)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedObject:
    """A 16-byte UUID (first three fields big-endian, i.e. RFC 4122 byte order)."""

    uuid: _uuid.UUID
    SIZE: ClassVar[int | None] = 16

    def encode(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("shared object", data, 16)
        return cls(uuid=_uuid.UUID(bytes=bytes(data)))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStateParams:
    """SET_DEVICE_STATE_FD: direction u32 (0 save, 1 load), phase u32 (0 stopped)."""

    direction: int
    phase: int
    SIZE: ClassVar[int | None] = 8
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.direction, self.phase)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("device state params", data, 8)
        d, p = cls.STRUCT.unpack(data)
        if d > 1:
            raise RemoteProtocolError(f"device state direction {d} is not 0 (save) or 1 (load)")
        if p != 0:
            raise RemoteProtocolError(f"device state phase {p} is not 0 (stopped)")
        return cls(direction=d, phase=p)


SHMEM_MAX_REGIONS = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class ShmemConfig:
    """VhostUserShMemConfig: nregions u32, padding u32, memory_sizes[256] u64 (2056)."""

    nregions: int
    memory_sizes: tuple[int, ...]
    SIZE: ClassVar[int | None] = 8 + 8 * SHMEM_MAX_REGIONS
    STRUCT: ClassVar[struct.Struct] = struct.Struct(f"<II{SHMEM_MAX_REGIONS}Q")

    def encode(self) -> bytes:
        sizes = tuple(self.memory_sizes) + (0,) * (SHMEM_MAX_REGIONS - len(self.memory_sizes))
        return self.STRUCT.pack(self.nregions, 0, *sizes)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("shmem config", data, cls.SIZE or 0)
        n, _pad, *sizes = cls.STRUCT.unpack(data)
        if n > SHMEM_MAX_REGIONS:
            raise RemoteProtocolError(f"shmem config nregions {n} exceeds {SHMEM_MAX_REGIONS}")
        return cls(nregions=n, memory_sizes=tuple(sizes))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShmemMap:
    """VhostUserMMap: shmid u8, pad[7], fd_offset, shm_offset, len, flags (bit 0 RW) (40)."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    SIZE: ClassVar[int | None] = 40
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.shmid, self.fd_offset, self.shm_offset, self.len, self.flags)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        _need("shmem map", data, 40)
        sid, fo, so, ln, fl = cls.STRUCT.unpack(data)
        if fl & ~1:
            raise RemoteProtocolError(f"shmem map flags {fl:#x} has reserved bits set")
        return cls(shmid=sid, fd_offset=fo, shm_offset=so, len=ln, flags=fl)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawPayload:
    """An opaque payload we carry but do not interpret (crypto sessions)."""

    data: bytes
    SIZE: ClassVar[int | None] = None

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        return cls(data=bytes(data))
