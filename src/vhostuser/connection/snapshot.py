"""Snapshots of a back-end session's protocol state, to compare one with the next. No I/O.

A :class:`SessionSnapshot` is a frozen, hashable picture of what the control plane of one
:class:`~vhostuser.connection.backend.BackendConnection` knows: the negotiated features,
owner and status, the memory table (by guest address, size, front-end address and offset:
not by our mappings, which change from one session to the next), and per ring its size,
addresses, base or live position, fds present, run state, in-flight count and whether it
broke. Two snapshots compare equal exactly when a front-end left the session in the same
state, so "did the front-end restore everything after reconnecting?" and "what did this
message change?" are one ``==`` and one :meth:`SessionSnapshot.diff` away. The device's own
state (counters, learned addresses) is not in it: that is the device's business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..protocol.enums import feature_names, protocol_feature_names

__all__ = ["RegionSnapshot", "RingSnapshot", "SessionSnapshot", "snapshot_backend"]


@dataclass(frozen=True, slots=True)
class RegionSnapshot:
    """One memory region as the front-end described it."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class RingSnapshot:
    """One ring's control-plane state and, once started, its position."""

    index: int
    num: int
    base: int
    """GET_VRING_BASE's ``num`` now: the live position of a started ring, else the base set."""
    desc: int | None
    avail: int | None
    used: int | None
    log: int | None
    flags: int | None
    kick: str
    """``fd``, ``polled`` (the NOFD bit) or ``none``; likewise ``call`` and ``err``."""
    call: str
    err: str
    started: bool
    enabled: bool
    in_flight: int
    broken: str | None


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """The control-plane state of one back-end session (see the module docstring)."""

    dialect: str
    owner: bool
    features: int | None
    protocol_features: int
    status: int
    regions: tuple[RegionSnapshot, ...]
    rings: tuple[RingSnapshot, ...]
    backend_channel: bool
    inflight: bool
    log_fd: bool
    error: str | None

    def diff(self, newer: SessionSnapshot) -> list[str]:
        """What changed from this snapshot to ``newer``, one line per change, in words."""
        out: list[str] = []
        for f in fields(self):
            name = f.name
            if name in ("regions", "rings"):
                continue
            a, b = getattr(self, name), getattr(newer, name)
            if a != b:
                out.append(f"{name}: {_word(name, a)} -> {_word(name, b)}")
        old_r, new_r = set(self.regions), set(newer.regions)
        for r in sorted(old_r - new_r, key=lambda r: r.guest_phys_addr):
            out.append(f"region gone: gpa {r.guest_phys_addr:#x} size {r.size:#x}")
        for r in sorted(new_r - old_r, key=lambda r: r.guest_phys_addr):
            out.append(f"region added: gpa {r.guest_phys_addr:#x} size {r.size:#x} "
                       f"uva {r.userspace_addr:#x} offset {r.mmap_offset:#x}")
        for ra, rb in zip(self.rings, newer.rings, strict=False):
            for f in fields(ra):
                a, b = getattr(ra, f.name), getattr(rb, f.name)
                if a != b:
                    out.append(f"ring {ra.index} {f.name}: {_word(f.name, a)} -> "
                               f"{_word(f.name, b)}")
        if len(self.rings) != len(newer.rings):
            out.append(f"rings: {len(self.rings)} -> {len(newer.rings)}")
        return out

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (feature words also by name)."""
        d = asdict(self)
        if self.features is not None:
            d["feature_names"] = feature_names(self.features)
        d["protocol_feature_names"] = protocol_feature_names(self.protocol_features)
        return d


def _word(name: str, v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        if name == "protocol_features":
            return f"{v:#x} ({'|'.join(protocol_feature_names(v)) or 'none'})"
        return f"{v:#x}" if v > 9 else str(v)
    return repr(v)


def _fd_state(fd: Any, polled: bool) -> str:
    if fd is not None:
        return "fd"
    return "polled" if polled else "none"


def snapshot_backend(conn: Any) -> SessionSnapshot:
    """Snapshot a :class:`~vhostuser.connection.backend.BackendConnection` (any fd type).

    Reads only; safe at any time, also on a closed connection.
    """
    rings = []
    for v in conn.vrings:
        engine = v.engine
        live = engine is not None and v.started
        addr = v.addr
        rings.append(RingSnapshot(
            index=v.index, num=v.num,
            base=int(engine.base()) if live else v.base,
            desc=None if addr is None else addr.desc,
            avail=None if addr is None else addr.avail,
            used=None if addr is None else addr.used,
            log=None if addr is None else addr.log,
            flags=None if addr is None else addr.flags,
            kick=_fd_state(v.kick, v.kick_polled), call=_fd_state(v.call, v.call_polled),
            err=_fd_state(v.err, False),
            started=v.started, enabled=v.enabled,
            in_flight=int(getattr(engine, "in_flight", 0) or 0) if live else 0,
            broken=v.broken,
        ))
    regions = tuple(sorted(
        (RegionSnapshot(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
         for r in conn.mem.regions),
        key=lambda r: r.guest_phys_addr))
    return SessionSnapshot(
        dialect=str(getattr(conn.dialect, "value", conn.dialect)),
        owner=bool(conn.owner),
        features=conn.features,
        protocol_features=int(conn.protocol_features),
        status=int(conn.status),
        regions=regions,
        rings=tuple(rings),
        backend_channel=conn.backend_channel is not None,
        inflight=conn.inflight is not None,
        log_fd=conn.log_fd is not None,
        error=conn.error,
    )

