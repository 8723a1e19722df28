"""The fast paths of the net device (split and packed rings) behave exactly like the ring
engine.

Random bursts of transmit chains (one descriptor or several, runts, oversized frames,
offload fields) and random receive buffers (big, small, split, smaller than a header) go
through two identical rigs, one with the fast paths and one without; what the receiver
gets, the used lengths, every counter and the ring indices (receive chains consumed, as
the engine may pop some earlier and hold them) must match.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.net_rig import EVENT_IDX, MRG, PACKED, V1, Rig, Wire, eth

A = "02:00:00:00:00:0a"
B = "02:00:00:00:00:0b"

tx_item = st.tuples(
    st.integers(min_value=0, max_value=1530),  # frame length (0..13: runt, >1518: oversize)
    st.integers(min_value=1, max_value=3),  # descriptors
    st.sampled_from([0, 0, 0, 1]),  # NEEDS_CSUM set (a bad header without offloads)
)
rx_item = st.tuples(
    st.sampled_from([8, 64, 200, 1024, 2048]),  # buffer size
    st.integers(min_value=1, max_value=2),  # descriptors
)


def _build(fast: bool, mrg: bool, event_idx: bool, packed: bool) -> tuple[Rig, Rig]:
    feats = (V1 | (MRG if mrg else 0) | (EVENT_IDX if event_idx else 0)
             | (PACKED if packed else 0))
    wire = Wire()
    tx = Rig(feats, sink=wire, fast=fast, size=64, mem_size=2 << 20)
    rx = Rig(feats, fast=fast, size=64, mem_size=2 << 20)
    wire.peer = rx.dev
    return tx, rx


def _run(fast: bool, mrg: bool, event_idx: bool, packed: bool,
         bursts: list[tuple[list[Any], list[Any]]]) -> tuple[Any, ...]:
    tx, rx = _build(fast, mrg, event_idx, packed)
    hl = tx.hdr_len
    received: list[tuple[bytes, bytes]] = []
    used_lens: list[int] = []
    for b, (tx_items, rx_items) in enumerate(bursts):
        for size, ndesc in rx_items:
            if size < 2 * ndesc:
                ndesc = 1
            pieces = [size // ndesc] * (ndesc - 1) + [size - size // ndesc * (ndesc - 1)]
            rx.post_rx(1, pieces=pieces)
        for i, (flen, ndesc, csum) in enumerate(tx_items):
            payload = bytes([b, i]) * 800
            frame = eth(B, A, payload)[:flen] if flen >= 14 else b"\x01" * flen
            if flen > len(frame):
                frame = frame + bytes(flen - len(frame))
            data = tx.header(flags=csum) + frame
            cut = [len(data) * k // ndesc for k in range(ndesc + 1)]
            pieces = [data[cut[k] : cut[k + 1]] for k in range(ndesc)]
            tx.tx_chain([p for p in pieces if p] or [b""])
        tx.kick_tx()
        tx.reap_tx()
        used = rx.used_rx()
        used_lens += [ln for _, ln in used]
        for tok, ln in used:
            received.append((tok.to_bytes(4, "little"), rx.read_rx_buffer(tok, ln)[hl:]))
    ring_tx = tx.access.rings[1]
    ring_rx = rx.access.rings[0]
    if packed:
        # Slots and wrap counters; receive chains the engine popped early and holds are
        # not used yet, so the used position is what must agree.
        positions: tuple[Any, ...] = (ring_tx.base(), ring_rx.used_idx, ring_rx.used_wrap)
    else:
        positions = (
            ring_tx.next_avail, ring_tx.used_idx,
            # Burst boundaries differ (the fast path stops at a multi-descriptor chain), so
            # the engine may pop receive chains earlier and hold them: compare chains
            # consumed.
            (ring_rx.next_avail - rx.dev.held_rx_chains) & 0xFFFF, ring_rx.used_idx,
        )
    result = (
        received, used_lens,
        tx.dev.counters.as_dict(), rx.dev.counters.as_dict(),
        positions,
        dict(tx.access.broken), dict(rx.access.broken),
        # Notification decisions (EVENT_IDX counts used entries since the last one).
        len(tx.access.notified), len(rx.access.notified),
    )
    tx.close()
    rx.close()
    return result


@settings(max_examples=150, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(st.lists(tx_item, max_size=12), st.lists(rx_item, max_size=12)),
        min_size=1, max_size=6,
    ),
    mrg=st.booleans(),
    event_idx=st.booleans(),
    packed=st.booleans(),
)
def test_fast_paths_match_the_engine(bursts: list[tuple[list[Any], list[Any]]], mrg: bool,
                                     event_idx: bool, packed: bool) -> None:
    assert (_run(True, mrg, event_idx, packed, bursts)
            == _run(False, mrg, event_idx, packed, bursts))
