"""virtio-net device logic over a bytearray: headers, mergeable buffers, multiqueue, MTU,
config, RARP, offloads, and every malformed case dropped and counted (never raised)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from vhostuser.connection import events as ev
from vhostuser.devices import base as basemod
from vhostuser.devices.net import (
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NET_CONFIG,
    EchoSink,
    NetConfig,
    NetCounters,
    NullNetDevice,
    VirtioNetDevice,
    build_rarp,
    complete_checksum,
    flow_hash,
    inet_sum,
    net_header_len,
)
from vhostuser.protocol.enums import NetFeature, ProtocolFeature
from vhostuser.virtq import DESC_F_NEXT, DESC_F_WRITE

from .net_rig import EVENT_IDX, INDIRECT, MRG, PACKED, V1, Collect, Rig, Wire, eth

A = "02:00:00:00:00:0a"
B = "02:00:00:00:00:0b"
FRAME = eth(B, A, bytes(range(46)))  # 60 bytes

RINGS = [pytest.param(0, id="split"), pytest.param(PACKED, id="packed")]
PATHS = [pytest.param(True, id="fast"), pytest.param(False, id="engine")]


def drops(c: NetCounters) -> dict[str, int]:
    return {k: v for k, v in c.drops.items() if v}


# -- pure helpers ------------------------------------------------------------------------


def test_header_length_follows_features() -> None:
    assert net_header_len(0) == 10
    assert net_header_len(MRG) == 12
    assert net_header_len(V1) == 12
    assert net_header_len(V1 | MRG) == 12


def test_config_space_layout() -> None:
    dev = VirtioNetDevice(mac="52:54:00:12:34:56", mtu=9000, queue_pairs=4)
    raw = dev.config_space()
    assert raw == bytes.fromhex("525400123456") + struct.pack("<HHH", 1, 4, 9000)
    cfg = NetConfig.decode(raw)
    assert (cfg.mac, cfg.status, cfg.max_virtqueue_pairs, cfg.mtu) == (
        "52:54:00:12:34:56", 1, 4, 9000)
    assert dev.get_config(6, 2) == b"\x01\x00"
    assert dev.num_queues == 8
    assert dev.virtio_features & NetFeature.MQ
    assert dev.protocol_features & ProtocolFeature.RARP
    assert dev.protocol_features & ProtocolFeature.MTU
    assert not dev.virtio_features & NetFeature.CSUM  # offloads are opt-in


@pytest.mark.parametrize("kw, match", [
    ({"queue_pairs": 0}, "queue_pairs 0"),
    ({"mtu": 67}, "mtu 67"),
    ({"mac": "52:54:00"}, "not six"),
    ({"mac": "zz:54:00:00:00:01"}, "not six"),
])
def test_bad_device_arguments_name_the_value(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VirtioNetDevice(**kw)


def test_rarp_frame_golden() -> None:
    mac = bytes.fromhex("525400abcdef")
    f = build_rarp(mac)
    assert len(f) == 60
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x80\x35"
    # htype 1, ptype 0x0800, hlen 6, plen 4, op 3 (reverse request), sha, spa, tha, tpa
    assert f[14:22] == bytes.fromhex("0001080006040003")
    assert f[22:28] == mac and f[28:32] == bytes(4) and f[32:38] == mac
    assert f[38:] == bytes(22)
    with pytest.raises(ValueError, match="not 6 bytes"):
        build_rarp(b"\x01")


def _udp_packet(payload: bytes) -> bytearray:
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0,
                               bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    struct.pack_into("!H", ip, 10, ~inet_sum(ip) & 0xFFFF)
    udp = bytearray(struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)) + payload
    return bytearray(eth(B, A, bytes(ip + udp)))


def _reference_udp_checksum(frame: bytes) -> int:
    ip = frame[14:34]
    udp = bytearray(frame[34:])
    udp[6:8] = b"\0\0"
    pseudo = ip[12:20] + b"\x00\x11" + len(udp).to_bytes(2, "big")
    data = pseudo + bytes(udp) + (b"\0" if len(udp) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1200])
def test_complete_checksum_matches_reference(n: int) -> None:
    frame = _udp_packet(bytes((i * 7) & 0xFF for i in range(n)))
    want = _reference_udp_checksum(bytes(frame))
    # As a guest with CSUM offload sends it: the pseudo-header sum in the checksum field.
    ip = frame[14:34]
    pseudo = bytes(ip[12:20]) + b"\x00\x11" + (len(frame) - 34).to_bytes(2, "big")
    struct.pack_into("!H", frame, 40, inet_sum(pseudo))
    complete_checksum(frame, 34, 6)
    assert struct.unpack_from("!H", frame, 40)[0] == want
    with pytest.raises(ValueError, match="outside"):
        complete_checksum(frame, len(frame) - 1, 6)


def test_flow_hash_uses_addresses_only() -> None:
    a = _udp_packet(b"one")
    b = _udp_packet(b"another payload")
    assert flow_hash(a) == flow_hash(b)
    c = bytearray(a)
    c[29] = 9  # another IPv4 source
    assert flow_hash(c) != flow_hash(a)
    assert isinstance(flow_hash(b"\x01" * 5), int)  # short frames do not raise


# -- transmit and receive through an echo --------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("features", [
    pytest.param(0, id="legacy-10"), pytest.param(MRG, id="mrg-12"),
    pytest.param(V1, id="v1-12"), pytest.param(V1 | MRG | EVENT_IDX, id="v1-mrg-eventidx"),
])
def test_echo_round_trip(features: int, ring: int, fast: bool) -> None:
    rig = Rig(features | ring, sink=EchoSink(), fast=fast)
    hl = 12 if features & (V1 | MRG) else 10
    assert rig.dev.hdr_len == hl
    frames = [eth(B, A, bytes([i]) * (46 + i)) for i in range(20)]
    rig.post_rx(32, size=hl + 1518)
    rig.tx(frames)
    assert rig.kick_tx() == 20
    assert len(rig.reap_tx()) == 20
    got = rig.reap_rx()
    assert [f for _, f in got] == frames
    for hdr, _ in got:
        # plain frames: no offload fields; num_buffers 1 whenever the field exists
        assert hdr[:10] == bytes(10)
        if hl == 12:
            assert struct.unpack_from("<H", hdr, 10)[0] == 1
    c = rig.dev.counters
    assert (c.rx_frames, c.tx_frames) == (20, 20)
    assert c.rx_bytes == c.tx_bytes == sum(len(f) for f in frames)
    assert drops(c) == {}
    assert 0 in rig.access.notified  # the receive queue was notified
    assert rig.dev.held_rx_chains == 0


@pytest.mark.parametrize("fast", PATHS)
def test_fast_path_handles_the_common_layout(fast: bool, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """With the fast path on, one-descriptor chains never reach the ring engine."""
    calls: list[int] = []
    real = getattr(basemod, "run_burst")  # noqa: B009 (not re-exported)

    def spy(ring: Any, handler: Any, budget: int = 256) -> Any:
        calls.append(budget)
        return real(ring, handler, budget)

    monkeypatch.setattr(basemod, "run_burst", spy)
    rig = Rig(V1 | MRG, sink=EchoSink(), fast=fast)
    rig.post_rx(8)
    rig.tx([FRAME] * 8)
    assert rig.kick_tx() == 8
    assert len(rig.reap_rx()) == 8
    assert (calls == []) is fast


@pytest.mark.parametrize("ring", RINGS)
def test_transmit_layouts_are_gathered(ring: int) -> None:
    """Header alone in its own descriptor, a header split over 12 one-byte descriptors,
    the frame split too, and an indirect table: every layout is legal (virtio 1.2 2.6.4)."""
    sink = Collect()
    rig = Rig(V1 | MRG | INDIRECT | ring, sink=sink)
    hdr = bytes(12)
    rig.tx_chain([hdr, FRAME], indirect=False)
    rig.tx_chain([bytes([b]) for b in hdr] + [FRAME[:7], FRAME[7:]], indirect=False)
    rig.tx_chain([hdr[:5], hdr[5:] + FRAME[:20], FRAME[20:]], indirect=True)
    rig.tx_chain([hdr + FRAME])
    assert rig.kick_tx() == 4
    assert [f for _, f, _ in sink.frames] == [FRAME] * 4
    assert drops(rig.dev.counters) == {}


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("ring", RINGS)
def test_runts_and_oversize_are_dropped_and_counted(ring: int, fast: bool) -> None:
    sink = Collect()
    rig = Rig(V1 | MRG | ring, sink=sink, fast=fast)
    rig.tx_chain([b"\x00" * 5])  # shorter than the header
    rig.tx_chain([bytes(12)])  # a header and nothing else
    rig.tx_chain([bytes(12) + FRAME[:13]])  # 13 bytes: no Ethernet header
    rig.tx_chain([bytes(12), FRAME[:13]])  # the same, header in its own descriptor
    rig.tx_chain([bytes(12) + eth(B, A, bytes(1500 + 4))])  # 1518 bytes: the limit, kept
    rig.tx_chain([bytes(12) + eth(B, A, bytes(1500 + 5))])  # 1519 bytes: oversize
    rig.tx([FRAME])
    assert rig.kick_tx() == 7
    assert len(rig.reap_tx()) == 7  # every chain is completed, dropped or not
    assert [len(f) for _, f, _ in sink.frames] == [1518, 60]
    assert drops(rig.dev.counters) == {"runt": 4, "oversize": 1}
    # NET_SET_MTU raises the limit.
    rig.dev.on_event(ev.MtuSet(9000))
    rig.tx_chain([bytes(12) + eth(B, A, bytes(1500 + 5))])
    assert rig.kick_tx() == 1
    assert len(sink.frames) == 3


@pytest.mark.parametrize("fast", PATHS)
def test_offload_fields_without_offloads_are_bad_headers(fast: bool) -> None:
    sink = Collect()
    rig = Rig(V1 | MRG, sink=sink, fast=fast)
    rig.tx([FRAME], hdr=rig.header(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
    rig.tx([FRAME], hdr=rig.header(gso=GSO_TCPV4, gso_size=1448))
    rig.tx([FRAME], hdr=rig.header(flags=HDR_F_DATA_VALID))  # meaningless on TX: ignored
    assert rig.kick_tx() == 3
    assert len(sink.frames) == 1 and sink.frames[0][2] is None
    assert drops(rig.dev.counters) == {"bad_header": 2}


@pytest.mark.parametrize("ring", RINGS)
def test_disabled_transmit_queue_drops_without_side_effects(ring: int) -> None:
    sink = Collect()
    rig = Rig(V1 | MRG | ring, sink=sink)
    rig.access.enabled_set.discard(1)
    rig.dev.on_event(ev.VringEnabled(1, False))
    rig.tx([FRAME] * 3)
    assert rig.kick_tx() == 3
    assert len(rig.reap_tx()) == 3
    assert sink.frames == []
    assert drops(rig.dev.counters) == {"queue_disabled": 3}


# -- receive ----------------------------------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("ring", RINGS)
def test_receive_without_buffers_or_queue(ring: int, fast: bool) -> None:
    rig = Rig(V1 | MRG | ring, fast=fast)
    assert rig.dev.deliver([FRAME] * 3) == 0
    assert drops(rig.dev.counters) == {"no_rx_buffer": 3}
    rig.post_rx(2)
    assert rig.dev.deliver([FRAME] * 3) == 2
    assert drops(rig.dev.counters) == {"no_rx_buffer": 4}
    assert len(rig.reap_rx()) == 2
    rig.access.enabled_set.discard(0)
    rig.dev.on_event(ev.VringEnabled(0, False))
    assert not rig.dev.link_up
    assert rig.dev.deliver([FRAME]) == 0
    assert drops(rig.dev.counters)["rx_down"] == 1


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("ring", RINGS)
def test_non_mergeable_small_buffer_keeps_the_chain(ring: int, fast: bool) -> None:
    rig = Rig(V1 | ring, fast=fast)  # no MRG_RXBUF
    rig.post_rx(1, size=12 + 100)
    big = eth(B, A, bytes(200))
    assert rig.dev.deliver([big, FRAME]) == 1
    assert drops(rig.dev.counters) == {"rx_buffer_small": 1}
    got = rig.reap_rx()
    assert [f for _, f in got] == [FRAME]
    assert rig.dev.held_rx_chains == 0


@pytest.mark.parametrize("ring", RINGS)
def test_mergeable_frame_spans_buffers(ring: int) -> None:
    rig = Rig(V1 | MRG | ring)
    rig.post_rx(4, size=1024)
    big = eth(B, A, bytes(i & 0xFF for i in range(2986)))  # 3000 bytes + 12 = 3 buffers
    assert rig.dev.deliver([big]) == 1
    used = rig.used_rx()
    assert [ln for _, ln in used] == [1024, 1024, 12 + 3000 - 2048]
    tok0 = used[0][0]
    hdr = rig.read_rx_buffer(tok0, 12)
    assert struct.unpack_from("<H", hdr, 10)[0] == 3
    body = b"".join(rig.read_rx_buffer(t, w) for t, w in used)[12:]
    assert body == big
    assert rig.dev.counters.tx_frames == 1


@pytest.mark.parametrize("ring", RINGS)
def test_mergeable_waits_for_enough_buffers(ring: int) -> None:
    """A frame needing more buffers than posted is dropped (counted) and the chains taken
    are kept for the next frame, not lost."""
    rig = Rig(V1 | MRG | ring)
    rig.post_rx(2, size=1024)
    big = eth(B, A, bytes(2986))
    assert rig.dev.deliver([big]) == 0
    assert drops(rig.dev.counters) == {"no_rx_buffer": 1}
    assert rig.dev.held_rx_chains == 2
    rig.post_rx(2, size=1024)
    assert rig.dev.deliver([big]) == 1
    got = rig.reap_rx()
    assert [f for _, f in got] == [big]
    assert rig.dev.held_rx_chains == 0  # three used, the fourth still on the ring
    assert rig.dev.deliver([FRAME]) == 1
    assert [f for _, f in rig.reap_rx()] == [FRAME]


@pytest.mark.parametrize("ring", RINGS)
def test_receive_buffer_split_over_descriptors(ring: int) -> None:
    """Legacy receive buffers (header descriptor + data descriptor) and tiny pieces."""
    rig = Rig(0 | ring)  # legacy: 10-byte header
    rig.post_rx(1, pieces=[10, 1518])
    rig.post_rx(1, pieces=[3, 4, 3, 50, 1500])
    assert rig.dev.deliver([FRAME, FRAME]) == 2
    got = rig.reap_rx()
    assert [f for _, f in got] == [FRAME, FRAME]
    assert all(h == bytes(10) for h, _ in got)


@pytest.mark.parametrize("ring", RINGS)
def test_receive_buffer_smaller_than_a_header_is_returned_empty(ring: int) -> None:
    rig = Rig(V1 | MRG | ring)
    rig.post_rx(1, size=8)
    rig.post_rx(1, size=2048)
    assert rig.dev.deliver([FRAME]) == 1
    used = rig.used_rx()
    assert [ln for _, ln in used] == [0, 12 + 60]
    assert "smaller than the 12-byte header" in (rig.dev.counters.last_error or "")


@pytest.mark.parametrize("ring", RINGS)
def test_multiqueue_spreads_flows_and_keeps_their_order(ring: int) -> None:
    rig = Rig(V1 | MRG | ring, pairs=2)
    assert rig.dev.rx_pairs == [0, 1]
    rig.post_rx(64, pair=0)
    rig.post_rx(64, pair=1)
    flows = []
    for k in range(8):
        p = _udp_packet(bytes([k]))
        p[29] = k  # IPv4 source varies per flow
        flows.append(p)
    frames = [bytes(flows[i % 8]) + bytes([i]) for i in range(40)]
    assert rig.dev.deliver(frames) == 40
    q0 = [f for _, f in rig.reap_rx(0)]
    q1 = [f for _, f in rig.reap_rx(1)]
    assert q0 and q1 and len(q0) + len(q1) == 40
    for q in (q0, q1):
        for k in range(8):
            seqs = [f[-1] for f in q if f[29] == k]
            assert seqs == sorted(seqs)
        assert {f[29] for f in q0}.isdisjoint({f[29] for f in q1})
    # Only pair 0 enabled: everything goes there.
    rig2 = Rig(V1 | MRG | ring, pairs=2, enabled_pairs=[0])
    rig2.post_rx(8)
    assert rig2.dev.deliver(frames[:8]) == 8
    assert rig2.dev.rx_pairs == [0]


# -- offloads between two devices ---------------------------------------------------------


def _pair(sender_features: int, receiver_features: int) -> tuple[Rig, Rig]:
    wire = Wire()
    tx = Rig(sender_features, sink=wire, offloads=True)
    rx = Rig(receiver_features, offloads=True)
    wire.peer = rx.dev
    rx.post_rx(8, size=4096)
    return tx, rx


CSUM = int(NetFeature.CSUM)
GUEST_CSUM = int(NetFeature.GUEST_CSUM)
TSO4 = int(NetFeature.HOST_TSO4)
GTSO4 = int(NetFeature.GUEST_TSO4)


def _partial_udp() -> tuple[bytes, bytes]:
    frame = _udp_packet(b"payload with a partial checksum")
    ip = frame[14:34]
    pseudo = bytes(ip[12:20]) + b"\x00\x11" + (len(frame) - 34).to_bytes(2, "big")
    struct.pack_into("!H", frame, 40, inet_sum(pseudo))
    return bytes(frame), bytes(_reference_udp_checksum(bytes(frame)).to_bytes(2, "big"))


def test_partial_checksum_passes_to_a_port_that_negotiated_it() -> None:
    tx, rx = _pair(V1 | MRG | CSUM, V1 | MRG | GUEST_CSUM)
    frame, _ = _partial_udp()
    hdr = tx.header(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    tx.tx([frame], hdr=hdr)
    tx.kick_tx()
    [(h, f)] = rx.reap_rx()
    assert f == frame  # unchanged, still partial
    assert h[:10] == hdr[:10]


def test_partial_checksum_is_completed_for_a_port_without_it() -> None:
    tx, rx = _pair(V1 | MRG | CSUM, V1 | MRG)
    frame, want = _partial_udp()
    tx.tx([frame], hdr=tx.header(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
    tx.kick_tx()
    [(h, f)] = rx.reap_rx()
    assert h[:10] == bytes(10)  # an ordinary frame now
    assert f[40:42] == want and f[:40] == frame[:40] and f[42:] == frame[42:]


def test_gso_goes_only_where_negotiated() -> None:
    frame, _ = _partial_udp()
    gso = dict(flags=HDR_F_NEEDS_CSUM, gso=GSO_TCPV4, gso_size=1448, csum_start=34,
               csum_offset=16)
    tx, rx = _pair(V1 | MRG | CSUM | TSO4, V1 | MRG)
    tx.tx([frame], hdr=tx.header(**gso))
    tx.kick_tx()
    assert rx.reap_rx() == []
    assert drops(rx.dev.counters) == {"offload": 1}
    tx, rx = _pair(V1 | MRG | CSUM | TSO4, V1 | MRG | GUEST_CSUM | GTSO4)
    tx.tx([frame], hdr=tx.header(**gso))
    tx.kick_tx()
    [(h, f)] = rx.reap_rx()
    assert f == frame and h[1] == GSO_TCPV4


@pytest.mark.parametrize("hdr_kw", [
    pytest.param(dict(flags=HDR_F_NEEDS_CSUM, csum_start=58, csum_offset=6), id="csum-beyond"),
    pytest.param(dict(gso=GSO_TCPV4, gso_size=1448), id="gso-without-csum"),
    pytest.param(dict(flags=HDR_F_NEEDS_CSUM, gso=7, gso_size=1, csum_start=34,
                      csum_offset=6), id="unknown-gso"),
    pytest.param(dict(flags=HDR_F_NEEDS_CSUM, gso=GSO_TCPV4, gso_size=0, csum_start=34,
                      csum_offset=16), id="gso-size-0"),
])
def test_bad_offload_headers_are_dropped(hdr_kw: dict[str, int]) -> None:
    tx, rx = _pair(V1 | MRG | CSUM | TSO4, V1 | MRG | GUEST_CSUM | GTSO4)
    tx.tx([FRAME], hdr=tx.header(**hdr_kw))
    assert tx.kick_tx() == 1
    assert drops(tx.dev.counters) == {"bad_header": 1}
    assert rx.reap_rx() == []


# -- guest faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
def test_broken_transmit_ring_is_reported_not_raised(fast: bool) -> None:
    sink = Collect()
    rig = Rig(V1 | MRG, sink=sink, fast=fast)
    rig.tx([FRAME])
    # A head outside the queue behind a good chain (docs/security.md "Rings"): the good frame
    # is forwarded, then the ring breaks at the bad entry.
    drv = rig.drivers[1]
    avail = drv._avail_h
    avail[2 + 1] = 0x7FFF
    avail[1] = 2
    rig.kick_tx()
    assert 1 in rig.access.broken
    assert ">= queue size" in rig.access.broken[1]
    assert rig.dev.counters.ring_errors == 1
    assert len(sink.frames) == 1


@pytest.mark.parametrize("fast", PATHS)
def test_avail_index_jump_breaks_the_ring(fast: bool) -> None:
    rig = Rig(V1 | MRG, fast=fast)
    rig.drivers[1]._avail_h[1] = 1000  # more than the queue size ahead
    assert rig.kick_tx() == 0
    assert "more than the queue size" in rig.access.broken[1]


@pytest.mark.parametrize("fast", PATHS)
def test_broken_receive_ring_is_reported_not_raised(fast: bool) -> None:
    rig = Rig(V1 | MRG, fast=fast)
    rig.post_rx(2)
    # Make the second buffer a chain whose next points past the queue.
    drv = rig.drivers[0]
    head = drv._avail_h[2 + 1]
    desc = drv._desc
    addr, ln, _fl, _nx = struct.unpack_from("<QIHH", desc, 16 * head)
    struct.pack_into("<QIHH", desc, 16 * head, addr, ln, DESC_F_WRITE | DESC_F_NEXT, 999)
    got = rig.dev.deliver([FRAME, FRAME, FRAME])
    assert got <= 1
    assert 0 in rig.access.broken and "next 999" in rig.access.broken[0]
    assert rig.dev.counters.drops["ring_broken"] >= 2
    assert rig.dev.deliver([FRAME]) == 0  # the queue stays stopped
    assert rig.dev.counters.ring_errors == 1


# -- RARP, MTU, reset, notifications ------------------------------------------------------


def test_send_rarp_reaches_the_sink_and_echo_delivers_it() -> None:
    sink = Collect()
    rig = Rig(V1 | MRG, sink=sink)
    rig.dev.on_event(ev.RarpRequested(bytes.fromhex("525400000042")))
    assert sink.rarps == [bytes.fromhex("525400000042")]
    echo = Rig(V1 | MRG, sink=EchoSink())
    echo.post_rx(1)
    echo.dev.on_event(ev.RarpRequested(bytes.fromhex("525400000042")))
    [(_, f)] = echo.reap_rx()
    assert f == build_rarp(bytes.fromhex("525400000042"))


def test_memory_change_gives_back_held_chains() -> None:
    rig = Rig(V1 | MRG)
    rig.post_rx(2, size=1024)
    rig.dev.deliver([eth(B, A, bytes(3000))])
    assert rig.dev.held_rx_chains == 2
    rig.dev.on_memory(rig.mem)
    assert rig.dev.held_rx_chains == 0
    assert [ln for _, ln in rig.used_rx()] == [0, 0]


def test_device_reset_forgets_ring_state() -> None:
    rig = Rig(V1 | MRG)
    assert rig.dev.link_up
    rig.dev.on_event(ev.DeviceReset())
    assert not rig.dev.link_up and rig.dev.hdr_len == 10


@pytest.mark.parametrize("ring", RINGS)
def test_event_mode_drains_then_rearms_kicks(ring: int) -> None:
    """After a kick the runner stops kicks and drains until the ring is empty, then asks
    for kicks again - no lost wake-up with EVENT_IDX."""
    rig = Rig(V1 | MRG | EVENT_IDX | ring, sink=Collect())
    drv = rig.drivers[1]
    runner = rig.runners[1]
    runner.budget = 1
    rig.tx([FRAME, FRAME])
    assert drv.should_kick()
    assert runner.kicked()
    res, again = runner.step(rig.access.rings[1])  # the burst the kick asked for
    assert res.popped == 1 and again  # a full burst: kicks stay off, it runs again
    rig.tx([FRAME])  # published while draining: no kick needed
    assert not drv.should_kick()
    while again:
        res, again = runner.step(rig.access.rings[1])
    assert rig.dev.counters.rx_frames == 3
    rig.tx([FRAME])
    assert drv.should_kick()  # kicks are wanted again


def test_null_device_counts_transmitted_frames() -> None:
    dev = NullNetDevice()
    assert dev.config_space()[6:8] == b"\x01\x00"
    assert NET_CONFIG.size == 12
    assert dev.handle_burst(0, [], True) == []
