"""Resource snapshots of this process (fds, mappings, threads) for leak checks.

docs/security.md rule 7: "After any of these, the counts of fds, mappings and threads return to
where they were. Tests measure this through /proc/self/fd and /proc/self/maps."

Shared mappings (the ``s`` in ``rw-s``) are listed separately: guest memory is always
MAP_SHARED, while the interpreter's own heap (pymalloc arenas, malloc's large blocks) is
private and may grow or shrink between two snapshots without anything having leaked.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from dataclasses import dataclass

__all__ = ["Snapshot", "snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counts of open fds, memory mappings and threads at one moment.

    ``fd_targets`` are the sorted ``/proc/self/fd`` link targets (``socket:[123]``,
    ``anon_inode:[eventfd]``, ``/memfd:x (deleted)``); ``shared_maps`` the sorted
    ``perms path`` of every MAP_SHARED line of ``/proc/self/maps``.
    """

    fd_count: int
    fd_targets: tuple[str, ...]
    maps_count: int
    shared_maps: tuple[str, ...]
    threads: int

    def diff(self, other: Snapshot, *, maps_slack: int = 0) -> str:
        """Describe what *grew* from ``other`` (earlier) to ``self`` (later).

        Returns "" when no fd, shared mapping or thread was added and the total mapping
        count grew by at most ``maps_slack`` (private heap mappings come and go; see the
        module docstring). Shrinking is not a leak: garbage from earlier work may be
        collected meanwhile. So tests write ``assert not after.diff(before)``.
        """
        parts: list[str] = []
        fds_added = Counter(self.fd_targets) - Counter(other.fd_targets)
        if self.fd_count > other.fd_count or fds_added:
            parts.append(
                f"fds {other.fd_count} -> {self.fd_count}"
                + _multiset_delta(other.fd_targets, self.fd_targets)
            )
        if Counter(self.shared_maps) - Counter(other.shared_maps):
            parts.append(
                f"shared mappings {len(other.shared_maps)} -> {len(self.shared_maps)}"
                + _multiset_delta(other.shared_maps, self.shared_maps)
            )
        if self.maps_count - other.maps_count > maps_slack:
            parts.append(f"mappings {other.maps_count} -> {self.maps_count}")
        if self.threads > other.threads:
            parts.append(f"threads {other.threads} -> {self.threads}")
        return "; ".join(parts)

    def settled_diff(self, *, maps_slack: int = 0, timeout: float = 2.0) -> str:
        """Take fresh snapshots (collecting garbage) until nothing grew from ``self``, or
        ``timeout`` passes; return the last :meth:`diff`. Threads that were just joined and
        fds released by finalizers need a moment to disappear."""
        deadline = time.monotonic() + timeout
        while True:
            gc.collect()
            d = snapshot().diff(self, maps_slack=maps_slack)
            if not d or time.monotonic() > deadline:
                return d
            time.sleep(0.02)


def _multiset_delta(before: tuple[str, ...], after: tuple[str, ...]) -> str:
    b, a = Counter(before), Counter(after)
    added = sorted((a - b).elements())
    removed = sorted((b - a).elements())
    out = ""
    if added:
        out += f" (+{len(added)}: {', '.join(added)})"
    if removed:
        out += f" (-{len(removed)}: {', '.join(removed)})"
    return out


def _fd_targets() -> list[str]:
    targets = []
    # listdir opens a directory fd of its own; it is closed again before the readlinks,
    # so its entry fails with FileNotFoundError and is skipped below.
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except FileNotFoundError:
            continue
    return targets


def _maps() -> tuple[int, list[str]]:
    count = 0
    shared = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            count += 1
            fields = line.split(maxsplit=5)
            if len(fields) >= 2 and fields[1].endswith("s"):
                path = fields[5].strip() if len(fields) == 6 else "[anonymous]"
                shared.append(f"{fields[1]} {path}")
    return count, shared


def _threads() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def snapshot() -> Snapshot:
    """Take a snapshot of this process's fds, mappings and threads (Linux /proc).

    Raises:
        OSError: /proc is not mounted.
    """
    targets = _fd_targets()
    maps_count, shared = _maps()
    return Snapshot(
        fd_count=len(targets),
        fd_targets=tuple(sorted(targets)),
        maps_count=maps_count,
        shared_maps=tuple(sorted(shared)),
        threads=_threads(),
    )
