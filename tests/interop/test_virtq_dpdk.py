"""Issue "Virtqueues" real-peer check: the frames DPDK's virtio-user transmits are popped by
our device side byte for byte.

testpmd txonly with ``--txonly-multi-flow`` varies the IPv4 source address for every frame
it builds: DPDK 22.11 adds its per-lcore counter to the address in network byte order, so
the third octet counts frames modulo 256 (198.18.0.x, 198.18.1.x, ...). Consecutive frames
must carry consecutive values: a lost, duplicated or reordered chain shows as a gap. Every frame's
headers are checked field by field, including the IPv4 header checksum.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.io.thread import ServerThread

from .peers import TestpmdVirtioUser, require_peer

pytestmark = pytest.mark.interop

FRAMES = 3000
NET_HDR = 12  # virtio-net header with VERSION_1 (virtio 1.2 §5.1.6)
ETH = struct.Struct("!6s6sH")
IPV4 = struct.Struct("!BBHHHBBH4s4s")
UDP = struct.Struct("!HHHH")


class RecordingNet(NullNetDevice):
    """A null net device that keeps a copy of the first FRAMES transmitted chains."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        if enabled and len(self.frames) < FRAMES:
            self.frames.extend(c.read_bytes() for c in chains[: FRAMES - len(self.frames)])
        return super().handle_burst(index, chains, enabled)


def _ip_checksum(hdr: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("mrg_rxbuf", [False, True], ids=["mrg0", "mrg1"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_txonly_frames_arrive_exactly(
    no_leaks: Any, sock_dir: Path, packed: bool, mrg_rxbuf: bool
) -> None:
    require_peer("testpmd")
    sock = str(sock_dir / "tx.sock")
    with ServerThread(sock, RecordingNet) as srv, TestpmdVirtioUser(
        sock, packed=packed, mrg_rxbuf=mrg_rxbuf, forward_mode="txonly", txpkts=64,
        extra=("--txonly-multi-flow",),
    ) as fe:
        fe.wait_link_up(timeout=20)
        deadline = time.monotonic() + 30
        while srv.call(lambda: len(srv.devices[-1].frames)) < FRAMES:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "DPDK frames did not arrive"
            time.sleep(0.05)
        frames: list[bytes] = srv.call(lambda: list(srv.devices[-1].frames))  # type: ignore[attr-defined]
    assert not srv.errors
    seqs = []
    for i, chain in enumerate(frames):
        assert len(chain) == NET_HDR + 64, f"frame {i}: chain of {len(chain)} bytes"
        hdr, frame = chain[:NET_HDR], chain[NET_HDR:]
        flags, gso_type = hdr[0], hdr[1]
        assert (flags, gso_type) == (0, 0), f"frame {i}: virtio-net header {hdr.hex()}"
        _dst, _src, ethertype = ETH.unpack_from(frame)
        assert ethertype == 0x0800, f"frame {i}: ethertype {ethertype:#x}"
        ip = frame[14:34]
        vihl, _tos, tot_len, _id, _frag, ttl, proto, _csum, src, dst = IPV4.unpack(ip)
        assert vihl == 0x45 and proto == 17, f"frame {i}: IPv4 header {ip.hex()}"
        assert tot_len == 64 - 14, f"frame {i}: IPv4 total length {tot_len}"
        assert ttl > 0
        assert _ip_checksum(ip) == 0xFFFF, f"frame {i}: bad IPv4 checksum in {ip.hex()}"
        assert src[:2] == bytes((198, 18)), f"frame {i}: source {src.hex()}"
        seqs.append(src[2])
        assert dst == bytes((198, 18, 0, 2)), f"frame {i}: destination {dst.hex()}"
        sport, dport, ulen, _ucsum = UDP.unpack_from(frame, 34)
        assert ulen == tot_len - 20, f"frame {i}: UDP length {ulen}"
        assert (sport, dport) == (9, 9), f"frame {i}: UDP ports {sport}->{dport}"

    # Consecutive frames carry consecutive sequence numbers (mod 256): nothing lost,
    # duplicated or reordered between DPDK's TX ring and our device.
    gaps = [
        (i, a, b) for i, (a, b) in enumerate(itertools.pairwise(seqs), 1)
        if (b - a) % 256 != 1
    ]
    assert not gaps, f"sequence gaps at (index, prev, next): {gaps[:10]} in {seqs[:40]}"
