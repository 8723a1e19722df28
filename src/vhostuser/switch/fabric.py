"""The forwarding fabric of the learning switch: learn, look up, flood, age. No I/O.

The fabric decides where each frame of a burst goes; it never touches a socket, a ring or
a clock (``now`` is passed in, in seconds of any monotonic clock). Ports are opaque
members here: anything with the staging lists of :class:`Member`.

Forwarding (IEEE 802.1D, simplified): the source address of every frame is learned on its
ingress port; frames to a learned unicast address go to that port only (and are filtered
when it is the ingress port); broadcast, multicast and unknown unicast are flooded to every
other member. Entries age out after ``aging`` seconds without traffic and vanish when
their port is removed (:meth:`Fabric.forget_member`); a port whose front-end reconnects
keeps them. The table is bounded (``max_macs``; beyond it new addresses are flooded, not
learned).
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = ["DEFAULT_AGING", "DEFAULT_MAX_MACS", "Fabric", "Member"]

_MACS: Final = struct.Struct("6s6s")  # destination, source (IEEE 802.3 3.1.1)
_unpack_macs = _MACS.unpack_from
_key_of = struct.Struct("12s").unpack_from  # (destination + source,)

DEFAULT_AGING: Final = 300.0
"""Seconds an address stays learned without traffic (the IEEE 802.1D default)."""
DEFAULT_MAX_MACS: Final = 65536


class Member:
    """What the fabric needs of a port: lists it stages a burst's frames in.

    ``out`` holds the frames for this member during one :meth:`Fabric.forward`; ``out_hdrs``
    runs parallel with offload headers (or None) when ``out_has_hdr``. The caller hands
    them to the port and clears them (:meth:`clear_out`).
    """

    __slots__ = ("name", "out", "out_has_hdr", "out_hdrs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.out: list[memoryview] = []
        self.out_hdrs: list[bytes | None] = []
        self.out_has_hdr = False

    def staged_hdrs(self) -> list[bytes | None] | None:
        """The headers parallel to ``out`` (padded), or None when no frame has one."""
        if not self.out_has_hdr:
            return None
        h = self.out_hdrs
        h.extend([None] * (len(self.out) - len(h)))
        return h

    def clear_out(self) -> None:
        """Forget the staged frames (after the port copied them)."""
        self.out.clear()
        self.out_hdrs.clear()
        self.out_has_hdr = False


class Fabric:
    """The MAC table and the forwarding decision (see the module docstring).

    Args:
        aging: seconds a learned address lives without traffic.
        max_macs: most addresses learned at once.

    Attributes:
        members: the ports frames are switched between (echo ports are not members).
        macs: address -> [member, last seen].
        flooded, filtered, learn_refused: counters.

    Raises:
        ValueError: ``aging`` not positive or ``max_macs`` below 1 (the message names it).
    """

    def __init__(self, *, aging: float = DEFAULT_AGING, max_macs: int = DEFAULT_MAX_MACS) -> None:
        if not aging > 0:
            raise ValueError(f"aging {aging} must be positive")
        if max_macs < 1:
            raise ValueError(f"max_macs {max_macs} must be at least 1")
        self.aging = aging
        self.max_macs = max_macs
        self.members: list[Any] = []
        self.macs: dict[bytes, list[Any]] = {}
        self.flooded = 0
        self.filtered = 0
        self.learn_refused = 0
        self._touched: list[Any] = []

    def forward(
        self,
        src: Any,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
        now: float,
    ) -> list[Any]:
        """Learn every source address of a burst from ``src`` and stage each frame on its
        output member(s); return the members touched, each with its ``out`` lists filled
        (the caller delivers and then calls ``clear_out``; the list is reused).
        """
        decide = self.decide
        touched = self._touched
        touched.clear()
        members = self.members
        n = len(frames)
        if not n:
            return touched
        # Destination + source address of every frame (IEEE 802.3 3.1.1), one unpack each.
        keys = list(map(_key_of, frames))
        first = keys[0]
        flood_n = 0
        filtered = 0
        if keys.count(first) == n and hdrs is None:
            # One (destination, source) pair for the whole burst (the usual case): one
            # decision, and the burst is staged whole.
            out = decide(src, first[0], now)
            if out is src:
                filtered = n
            elif out is not None:
                if not out.out:
                    touched.append(out)
                out.out.extend(frames)
            else:
                flood_n = n
                for p in members:
                    if p is not src:
                        if not p.out:
                            touched.append(p)
                        p.out.extend(frames)
            self.flooded += flood_n
            self.filtered += filtered
            return touched
        last_key: tuple[bytes] | None = None
        # The decision for last_key: a member, or None to flood (src itself: filter).
        last_out: Any = None
        for i, frame in enumerate(frames):
            key = keys[i]
            if key != last_key:
                # A new (destination, source) pair: learn and decide; repeats in the burst
                # (the usual case) reuse the decision.
                last_key = key
                last_out = decide(src, key[0], now)
            out = last_out
            if out is src:
                filtered += 1
                continue
            if hdrs is None:
                # No offload fields in this burst (the usual case): frames only.
                if out is not None:
                    if not out.out:
                        touched.append(out)
                    out.out.append(frame)
                    continue
                flood_n += 1
                for p in members:
                    if p is not src:
                        if not p.out:
                            touched.append(p)
                        p.out.append(frame)
                continue
            hdr = hdrs[i]
            targets = (out,) if out is not None else [p for p in members if p is not src]
            if out is None:
                flood_n += 1
            for p in targets:
                if not p.out:
                    touched.append(p)
                # Headers run parallel to frames; pad for frames staged without one.
                p.out_hdrs.extend([None] * (len(p.out) - len(p.out_hdrs)))
                p.out.append(frame)
                p.out_hdrs.append(hdr)
                if hdr is not None:
                    p.out_has_hdr = True
        self.flooded += flood_n
        self.filtered += filtered
        return touched

    def decide(self, src: Any, key: bytes, now: float) -> Any:
        """Learn the source of a frame whose first 12 bytes are ``key`` (destination,
        source) from ``src``; return where it goes: a member, None to flood, or ``src``
        itself when it is to be filtered. The compiled engine calls this once per distinct
        key of a burst; :meth:`forward` makes the same decision inline."""
        dst, smac = _unpack_macs(key)
        macs = self.macs
        e = macs.get(smac)
        if e is None:
            if not smac[0] & 1:  # a group address is never a source (802.1D 7.8)
                if len(macs) < self.max_macs:
                    macs[smac] = [src, now]
                else:
                    self.learn_refused += 1
        else:
            e[0] = src
            e[1] = now
        if not dst[0] & 1:
            d = macs.get(dst)
            if d is not None:
                return d[0]
        return None

    def learn(self, member: Any, mac: bytes, now: float) -> None:
        """Learn ``mac`` on ``member`` whatever the table holds (a RARP announcement)."""
        self.macs[bytes(mac)] = [member, now]

    def forget_member(self, member: Any) -> int:
        """Forget every address learned on ``member`` (it is removed); how many."""
        gone = [m for m, e in self.macs.items() if e[0] is member]
        for mac in gone:
            del self.macs[mac]
        return len(gone)

    def age(self, now: float) -> int:
        """Drop addresses not seen for ``aging`` seconds before ``now``; how many."""
        limit = now - self.aging
        old = [m for m, e in self.macs.items() if e[1] < limit]
        for mac in old:
            del self.macs[mac]
        return len(old)

    def table(self, now: float) -> list[tuple[bytes, Any, float]]:
        """Learned addresses, sorted: (mac, member, age in seconds)."""
        return [(m, e[0], now - e[1]) for m, e in sorted(self.macs.items())]
