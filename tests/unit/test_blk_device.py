"""virtio-blk device over a bytearray with the driver ring (no sockets): every request type,
config space, features, and every malformed request ending in the right status byte."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from vhostuser.devices.blk import (
    BLK_CONFIG_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SECURE_ERASE,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkConfig,
    BlkDevice,
    BlkRequest,
    MemoryBackend,
    blk_config_size,
)
from vhostuser.frontends.blk import BlkOp
from vhostuser.protocol.enums import BlkFeature, ProtocolFeature

from .blk_rig import Rig, header, segment

MiB = 1 << 20


def rig(**kw: Any) -> Rig:
    dev_kw = kw.pop("dev", {})
    return Rig(lambda disk: BlkDevice(disk, **dev_kw), **kw)


def status_of(r: Rig, gpas: list[int]) -> int:
    return r.buf[gpas[-1] + 0]


# -- what the device offers --------------------------------------------------------------------


def test_features_and_protocol_features() -> None:
    d = BlkDevice(MemoryBackend(MiB))
    f = BlkFeature(d.virtio_features)
    for bit in (BlkFeature.FLUSH, BlkFeature.BLK_SIZE, BlkFeature.SEG_MAX, BlkFeature.MQ,
                BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
        assert bit in f
    assert BlkFeature.RO not in f
    assert d.protocol_features & ProtocolFeature.MQ
    assert d.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
    ro = BlkDevice(MemoryBackend(MiB), read_only=True, flush=False, inflight=False)
    f = BlkFeature(ro.virtio_features)
    assert BlkFeature.RO in f
    assert BlkFeature.FLUSH not in f
    assert BlkFeature.DISCARD not in f and BlkFeature.WRITE_ZEROES not in f
    assert not ro.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
    # A read-only backend makes the device read-only whatever was asked.
    assert BlkDevice(MemoryBackend(MiB, read_only=True), read_only=False).read_only


def test_config_space_layout() -> None:
    d = BlkDevice(MemoryBackend(3 * MiB), num_queues=4, blk_size=4096, seg_max=60,
                  max_discard_sectors=2048, max_discard_seg=3, max_write_zeroes_sectors=4096,
                  max_write_zeroes_seg=2)
    space = d.config_space()
    assert len(space) == BLK_CONFIG_SIZE == 60
    # Hand-written offsets from virtio 1.2 §5.2.4 (struct virtio_blk_config).
    assert struct.unpack_from("<Q", space, 0)[0] == 3 * MiB // 512  # capacity
    assert struct.unpack_from("<I", space, 8)[0] == 0  # size_max
    assert struct.unpack_from("<I", space, 12)[0] == 60  # seg_max
    assert struct.unpack_from("<I", space, 20)[0] == 4096  # blk_size
    assert struct.unpack_from("<H", space, 34)[0] == 4  # num_queues
    assert struct.unpack_from("<III", space, 36) == (2048, 3, 8)  # discard (alignment 8)
    assert struct.unpack_from("<IIB", space, 48) == (4096, 2, 1)  # write zeroes
    cfg = BlkConfig.decode(d.get_config(0, blk_config_size(d.virtio_features)))
    assert cfg.capacity_bytes == 3 * MiB
    assert cfg.num_queues == 4 and cfg.blk_size == 4096
    assert cfg.max_discard_seg == 3 and cfg.write_zeroes_may_unmap == 1
    # GET_CONFIG past the space is zero padded up to QEMU's 256-byte limit.
    assert d.get_config(56, 8) == space[56:] + bytes(4)
    with pytest.raises(ValueError, match="config range"):
        d.get_config(250, 10)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_queues": 0}, "num_queues 0"),
        ({"num_queues": 257}, "num_queues 257"),
        ({"blk_size": 1000}, "blk_size 1000"),
        ({"blk_size": 256}, "blk_size 256"),
        ({"serial": "x" * 21}, "longer than 20"),
        ({"serial": "dísk"}, "not ASCII"),
        ({"seg_max": 0}, "seg_max 0"),
        ({"max_discard_seg": 0}, "max_discard_seg 0"),
    ],
)
def test_bad_parameters_are_named(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlkDevice(MemoryBackend(MiB), **kw)


# -- requests ------------------------------------------------------------------------------------


def test_write_then_read_round_trip() -> None:
    r = rig()
    data = random.Random(1).randbytes(8192)
    w = r.one(BlkOp("write", 4096, data=data))
    assert w.status == VIRTIO_BLK_S_OK
    assert r.disk.data[4096 : 4096 + 8192] == data
    rd = r.one(BlkOp("read", 4096, 8192))
    assert rd.status == VIRTIO_BLK_S_OK and rd.data == data
    # The used length covers the whole writable part (data + status), as qsd reports it.
    assert rd.used_len == 8192 + 1
    assert w.used_len == 1
    assert r.dev.stats["OUT OK"] == 1 and r.dev.stats["IN OK"] == 1


def test_many_requests_in_one_burst_and_last_sector() -> None:
    r = rig(disk=64 * 512)
    ops = [BlkOp("write", i * 512, data=bytes([i]) * 512) for i in range(8)]
    r.run(*ops)
    assert all(o.ok for o in ops)
    last = r.one(BlkOp("write", 63 * 512, data=b"z" * 512))
    assert last.ok and r.disk.data[-512:] == b"z" * 512
    assert r.one(BlkOp("read", 0, 8 * 512)).data == b"".join(bytes([i]) * 512 for i in range(8))


def test_scattered_data_buffers() -> None:
    r = rig()
    r.disk.data[0:2048] = bytes(range(256)) * 8
    # Read into three writable buffers of odd sizes plus the status byte.
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_IN, 0), False), (100, True), (1000, True),
                        (948, True), (1, True)])
    r.process()
    (got,) = r.reap_raw()
    assert got[1] == 2049
    assert r.buf[gpas[4]] == VIRTIO_BLK_S_OK
    out = bytes(r.buf[gpas[1] : gpas[1] + 100]) + bytes(r.buf[gpas[2] : gpas[2] + 1000]) \
        + bytes(r.buf[gpas[3] : gpas[3] + 948])
    assert out == bytes(r.disk.data[:2048])
    # Write from a header split over two descriptors and data over two more.
    hdr = header(VIRTIO_BLK_T_OUT, 8)
    gpas = r.raw_chain([(hdr[:5], False), (hdr[5:], False), (b"a" * 300, False),
                        (b"b" * 212, False), (1, True)])
    r.process()
    r.reap_raw()
    assert r.buf[gpas[4]] == VIRTIO_BLK_S_OK
    assert r.disk.data[8 * 512 : 9 * 512] == b"a" * 300 + b"b" * 212


def test_flush_get_id_and_unknown_types() -> None:
    r = rig(dev={"serial": "disk-0042"})
    assert r.one(BlkOp("flush")).ok
    assert r.disk.flushes == 1
    gid = r.one(BlkOp("get_id"))
    assert gid.ok and gid.data == b"disk-0042".ljust(20, b"\0")
    for t in (VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_SECURE_ERASE, 3, 0x7FFF_FFFF):
        gpas = r.raw_chain([(header(t), False), (1, True)])
        r.process()
        r.reap_raw()
        assert r.buf[gpas[-1]] == VIRTIO_BLK_S_UNSUPP, t


def test_get_id_twenty_bytes_and_short_buffer() -> None:
    r = rig(dev={"serial": "A" * 20})
    assert r.one(BlkOp("get_id")).data == b"A" * 20  # unterminated at 20 bytes
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_GET_ID), False), (5, True), (1, True)])
    r.process()
    r.reap_raw()
    assert bytes(r.buf[gpas[1] : gpas[1] + 5]) == b"AAAAA"
    assert r.buf[gpas[2]] == VIRTIO_BLK_S_OK


def test_barrier_bit_is_ignored() -> None:
    r = rig()
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_OUT | 0x8000_0000, 2), False),
                        (b"q" * 512, False), (1, True)])
    r.process()
    r.reap_raw()
    assert r.buf[gpas[-1]] == VIRTIO_BLK_S_OK
    assert r.disk.data[1024:1536] == b"q" * 512


def test_discard_and_write_zeroes() -> None:
    r = rig()
    r.disk.data[:] = b"\xff" * len(r.disk.data)
    assert r.one(BlkOp("discard", 4096, 8192)).ok
    assert r.disk.data[4096 : 4096 + 8192] == bytes(8192)
    assert r.disk.discards == [(4096, 8192)]
    assert r.one(BlkOp("write_zeroes", 65536, 4096, unmap=True)).ok
    assert r.one(BlkOp("write_zeroes", 0, 512)).ok
    assert r.disk.data[:512] == bytes(512)
    assert r.disk.data[512:4096] == b"\xff" * 3584
    assert r.disk.data[65536 : 65536 + 4096] == bytes(4096)


def test_discard_several_segments_and_segment_limits() -> None:
    r = rig(dev={"max_discard_seg": 3})
    r.disk.data[:] = b"\xff" * len(r.disk.data)
    segs = segment(0, 1) + segment(10, 2) + segment(100, 1)
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_DISCARD), False), (segs, False), (1, True)])
    r.process()
    r.reap_raw()
    assert r.buf[gpas[-1]] == VIRTIO_BLK_S_OK
    assert r.disk.discards == [(0, 512), (5120, 1024), (51200, 512)]
    # One segment too many: UNSUPP (qemu-storage-daemon, which takes one, does the same).
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_DISCARD), False), (segs + segment(7, 1), False),
                        (1, True)])
    r.process()
    r.reap_raw()
    assert r.buf[gpas[-1]] == VIRTIO_BLK_S_UNSUPP
    assert len(r.disk.discards) == 3


@pytest.mark.parametrize(
    ("rtype", "payload", "status"),
    [
        # virtio 1.2 §5.2.6.1: unknown flag bits -> UNSUPP; discard with UNMAP -> UNSUPP.
        (VIRTIO_BLK_T_DISCARD, segment(0, 1, 2), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 0x8000_0000), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_DISCARD, segment(0, 1, 1), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 1), VIRTIO_BLK_S_OK),
        # Beyond the capacity (2048 sectors), wrapping, too many sectors: IOERR.
        (VIRTIO_BLK_T_DISCARD, segment(2047, 2), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, segment(2**64 - 1, 1), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 40000), VIRTIO_BLK_S_IOERR),
        # Segment area not a whole number of segments, or empty: IOERR.
        (VIRTIO_BLK_T_DISCARD, segment(0, 1)[:15], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, b"", VIRTIO_BLK_S_IOERR),
    ],
)
def test_discard_write_zeroes_validation(rtype: int, payload: bytes, status: int) -> None:
    r = rig()
    r.disk.data[:] = b"\xff" * len(r.disk.data)
    bufs: list[tuple[bytes | int, bool]] = [(header(rtype), False)]
    if payload:
        bufs.append((payload, False))
    bufs.append((1, True))
    gpas = r.raw_chain(bufs)
    r.process()
    r.reap_raw()
    assert r.buf[gpas[-1]] == status
    if status != VIRTIO_BLK_S_OK:
        assert r.disk.data == b"\xff" * len(r.disk.data)  # nothing touched


def test_discard_not_negotiated_is_unsupp() -> None:
    r = rig()
    r.dev.on_features(r.dev.virtio_features & ~int(BlkFeature.DISCARD))
    assert r.one(BlkOp("discard", 0, 512)).status == VIRTIO_BLK_S_UNSUPP
    assert r.one(BlkOp("write_zeroes", 0, 512)).ok


# -- malformed requests: a status byte, never an exception ----------------------------------


@pytest.mark.parametrize(
    ("bufs", "status"),
    [
        # Header shorter than 16 bytes.
        ([(header(VIRTIO_BLK_T_OUT)[:15], False), (1, True)], VIRTIO_BLK_S_IOERR),
        ([(1, True)], VIRTIO_BLK_S_IOERR),
        # Sector beyond the capacity (2048 sectors of 512), or running past its end.
        ([(header(VIRTIO_BLK_T_IN, 2048), False), (512, True), (1, True)], VIRTIO_BLK_S_IOERR),
        ([(header(VIRTIO_BLK_T_IN, 2047), False), (1024, True), (1, True)],
         VIRTIO_BLK_S_IOERR),
        ([(header(VIRTIO_BLK_T_OUT, 2**64 - 1), False), (b"x" * 512, False), (1, True)],
         VIRTIO_BLK_S_IOERR),
        ([(header(VIRTIO_BLK_T_OUT, 2**63), False), (b"x" * 512, False), (1, True)],
         VIRTIO_BLK_S_IOERR),
        # Data length not a multiple of 512.
        ([(header(VIRTIO_BLK_T_OUT, 0), False), (b"x" * 100, False), (1, True)],
         VIRTIO_BLK_S_IOERR),
        ([(header(VIRTIO_BLK_T_IN, 0), False), (511, True), (1, True)], VIRTIO_BLK_S_IOERR),
        # A zero-length read or write at the end is fine (nothing to do).
        ([(header(VIRTIO_BLK_T_IN, 2048), False), (1, True)], VIRTIO_BLK_S_OK),
        ([(header(VIRTIO_BLK_T_FLUSH, 99), False), (1, True)], VIRTIO_BLK_S_OK),
    ],
)
def test_malformed_requests_get_a_status(bufs: list[tuple[bytes | int, bool]],
                                        status: int) -> None:
    r = rig()
    before = bytes(r.disk.data)
    gpas = r.raw_chain(bufs)
    r.process()
    assert len(r.reap_raw()) == 1
    assert r.buf[gpas[-1]] == status
    assert bytes(r.disk.data) == before
    assert not r.queues.broken


def test_missing_status_byte_is_returned_with_nothing_written() -> None:
    r = rig()
    r.raw_chain([(header(VIRTIO_BLK_T_OUT, 0), False), (b"x" * 512, False)])
    r.process()
    assert r.reap_raw() == [("raw", 0)]
    assert r.disk.data[:512] == bytes(512)  # no status to report, so no write either
    assert r.dev.stats["no-status"] == 1
    assert not r.queues.broken


def test_misaligned_to_block_size() -> None:
    r = rig(dev={"blk_size": 4096})
    assert r.one(BlkOp("write", 512, data=b"x" * 4096)).status == VIRTIO_BLK_S_IOERR
    assert r.one(BlkOp("write", 4096, data=b"x" * 4096)).ok


def test_read_only_refuses_every_write() -> None:
    r = rig(read_only=True)
    assert r.one(BlkOp("write", 0, data=b"x" * 512)).status == VIRTIO_BLK_S_IOERR
    assert r.one(BlkOp("discard", 0, 512)).status == VIRTIO_BLK_S_IOERR
    assert r.one(BlkOp("write_zeroes", 0, 512)).status == VIRTIO_BLK_S_IOERR
    assert r.one(BlkOp("read", 0, 512)).ok
    assert r.one(BlkOp("flush")).ok
    assert r.disk.data == bytes(len(r.disk.data))


@pytest.mark.parametrize("kind", ["read", "write", "flush", "discard", "write_zeroes"])
def test_backend_failure_is_ioerr(kind: str) -> None:
    r = rig()
    r.disk.fail.add(kind)
    op = BlkOp(kind, 0, 512, data=b"x" * 512 if kind == "write" else None)
    assert r.one(op).status == VIRTIO_BLK_S_IOERR
    r.disk.fail.clear()
    assert r.one(BlkOp(kind, 0, 512, data=b"x" * 512 if kind == "write" else None)).ok


def test_device_bug_is_contained() -> None:
    class Buggy(BlkDevice):
        def execute(self, req: BlkRequest) -> int:
            if req.sector == 1:
                raise KeyError("bug")
            return super().execute(req)

    r = Rig(lambda disk: Buggy(disk))
    a, b = r.run(BlkOp("read", 512, 512), BlkOp("read", 1024, 512))
    assert a.status == VIRTIO_BLK_S_IOERR and b.ok
    assert not r.queues.broken


def test_ring_violation_breaks_only_that_queue() -> None:
    r = rig(num_queues=2, dev={"num_queues": 2})
    lay = r.layouts[0]
    # Avail entry pointing at head 99 of a 32-entry queue.
    struct.pack_into("<HH", r.buf, lay.avail + 2, 1, 0)
    struct.pack_into("<H", r.buf, lay.avail + 4, 99)
    r.process(0)
    assert "head 99" in r.queues.broken[0]
    assert r.one(BlkOp("read", 0, 512), index=1).ok


# -- ring states, queues, completion order -----------------------------------------------------


def test_disabled_ring_is_left_alone_until_enabled() -> None:
    r = rig()
    r.queues.enabled_set.discard(0)
    r.submit(BlkOp("write", 0, data=b"x" * 512))
    assert r.process() == 0
    assert r.disk.data[:512] == bytes(512)
    r.enable(0)  # the burst the shell schedules on SET_VRING_ENABLE takes it
    (op,) = r.driver.reap()
    assert op.ok and r.disk.data[:512] == b"x" * 512


def test_multiqueue() -> None:
    r = rig(num_queues=3, dev={"num_queues": 3})
    for q in range(3):
        assert r.one(BlkOp("write", q * 512, data=bytes([q + 1]) * 512), index=q).ok
    assert r.disk.data[:1536] == b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512


def test_out_of_order_completion() -> None:
    """A device that keeps requests and completes them later, in reverse order."""

    class Deferring(BlkDevice):
        def __init__(self, disk: MemoryBackend) -> None:
            super().__init__(disk)
            self.held: list[BlkRequest] = []

        def submit(self, req: BlkRequest) -> None:
            self.held.append(req)

    r = Rig(Deferring)
    dev: Deferring = r.dev
    ops = [BlkOp("write", i * 512, data=bytes([i + 1]) * 512) for i in range(4)]
    r.submit(*ops)
    assert r.process() == 4
    assert r.driver.reap() == []
    for req in reversed(dev.held):
        dev.complete(req, dev.execute(req))
        assert dev.flush_completions(0) == 1
        (done,) = r.driver.reap()
        assert done is ops[req.sector]
    assert all(o.ok for o in ops)
    assert r.queues.notified  # async completions notify on their own
    with pytest.raises(ValueError, match="twice"):
        dev.complete(dev.held[0], VIRTIO_BLK_S_OK)


@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_rings(event_idx: bool) -> None:
    r = rig(packed=True, event_idx=event_idx, num_queues=2, dev={"num_queues": 2})
    data = random.Random(4).randbytes(4096)
    for rnd in range(3):  # several laps of the 32-entry ring
        ops = [BlkOp("write", 4096 * i, data=data) for i in range(8)]
        r.run(*ops, index=rnd % 2)
        assert all(o.ok for o in ops)
    assert r.one(BlkOp("read", 4096 * 7, 4096)).data == data
    assert r.one(BlkOp("discard", 0, 4096), index=1).ok
    assert r.one(BlkOp("read", 0, 4096)).data == bytes(4096)
    gpas = r.raw_chain([(header(VIRTIO_BLK_T_IN, 5000), False), (512, True), (1, True)])
    r.process()
    r.reap_raw()
    assert r.buf[gpas[-1]] == VIRTIO_BLK_S_IOERR


def test_packed_rings_with_an_inflight_area_are_tracked() -> None:
    from vhostuser.virtq.inflight import InflightArea, inflight_area_bytes

    r = rig(packed=True)
    area = InflightArea(memoryview(bytearray(inflight_area_bytes(1, 32, True))), 1, 32, True)
    r.dev.on_inflight(area, fresh=True)
    r.start_ring(0)
    assert area.buf[8] == 1  # QueueRegionPacked.version: the ring started on the region
    assert r.one(BlkOp("write", 0, data=b"p" * 512)).ok
    # Completed: its entries are back on the free list and the position moved on.
    free_head, old_free_head, used_idx, old_used_idx = struct.unpack_from("<4H", area.buf, 12)
    # header, data and status: three ring descriptors
    assert (used_idx, old_used_idx) == (3, 3) and free_head == old_free_head


# -- migration state (DEVICE_STATE) ----------------------------------------------------------


def test_state_round_trip_carries_counters() -> None:
    from vhostuser.devices.blk import STATE_FORMAT

    src = BlkDevice(MemoryBackend(MiB), serial="disk-7", num_queues=2)
    assert src.supports_state()
    src.on_features(src.virtio_features)
    src.stats["in ok"] += 5
    blob = src.save_state()
    import json

    doc = json.loads(blob)
    assert doc["format"] == STATE_FORMAT and doc["version"] == 1
    assert doc["capacity_sectors"] == MiB // 512 and doc["in_flight"] == 0
    assert doc["serial"] == "disk-7" and doc["num_queues"] == 2
    assert doc["write_cache"] == "writeback"
    dst = BlkDevice(MemoryBackend(MiB), serial="disk-7", num_queues=2)
    dst.load_state(blob)
    assert dst.stats["in ok"] == 5


@pytest.mark.parametrize(("kw", "field"), [
    ({"size": 2 * MiB}, "capacity_sectors"),
    ({"read_only": True}, "read_only"),
    ({"serial": "other"}, "serial"),
    ({"num_queues": 1}, "num_queues"),
    ({"blk_size": 4096}, "blk_size"),
    ({"seg_max": 8}, "seg_max"),
])
def test_state_load_refuses_a_different_device(kw: dict[str, Any], field: str) -> None:
    from vhostuser.devices.base import DeviceStateError

    src = BlkDevice(MemoryBackend(MiB), serial="disk-7", num_queues=2)
    blob = src.save_state()
    args: dict[str, Any] = {"serial": "disk-7", "num_queues": 2, **kw}
    size = args.pop("size", MiB)
    dst = BlkDevice(MemoryBackend(size), **args)
    with pytest.raises(DeviceStateError, match=field):
        dst.load_state(blob)


def test_state_load_refuses_acked_features_the_destination_lacks() -> None:
    from vhostuser.devices.base import DeviceStateError

    src = BlkDevice(MemoryBackend(MiB))
    src.on_features(src.virtio_features | (1 << 32))  # VERSION_1 is not the device's
    blob = src.save_state()
    BlkDevice(MemoryBackend(MiB)).load_state(blob)  # same offer: fine
    with pytest.raises(DeviceStateError, match="acked_features"):
        BlkDevice(MemoryBackend(MiB), discard=False).load_state(blob)


@pytest.mark.parametrize(("blob", "why"), [
    (b"\xff\xfe", "not a JSON document"),
    (b"[1, 2]", "format"),
    (b'{"format": "vhostuser-blk-state", "version": 99}', "version 99"),
    (b'{"format": "vhostuser-blk-state", "version": 1}', "missing"),
])
def test_state_load_refuses_garbage(blob: bytes, why: str) -> None:
    from vhostuser.devices.base import DeviceStateError

    with pytest.raises(DeviceStateError, match=why):
        BlkDevice(MemoryBackend(MiB)).load_state(blob)


def test_state_load_refuses_a_wrong_type_and_in_flight_requests() -> None:
    import json

    from vhostuser.devices.base import DeviceStateError

    dev = BlkDevice(MemoryBackend(MiB))
    doc = json.loads(dev.save_state())
    with pytest.raises(DeviceStateError, match="read_only"):
        dev.load_state(json.dumps({**doc, "read_only": 0}).encode())
    with pytest.raises(DeviceStateError, match="in_flight"):
        dev.load_state(json.dumps({**doc, "in_flight": 3}).encode())
    with pytest.raises(DeviceStateError, match="stats"):
        dev.load_state(json.dumps({**doc, "stats": {"x": "y"}}).encode())
