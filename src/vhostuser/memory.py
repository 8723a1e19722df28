"""Guest memory: region table and address translation. No I/O.

The back-end sees guest RAM as up to N regions, each a file descriptor mapped by the I/O
shell (``io/mapping.py``) from offset 0 for ``mmap_offset + size`` bytes. This module only
sees the resulting buffers (any object supporting the buffer protocol: an ``mmap`` in
production, a ``bytearray`` in tests) and translates:

* guest-physical addresses (``GPA``: descriptor buffers) and
* front-end virtual addresses (``FrontendVA``: ring addresses from SET_VRING_ADDR)

into ``memoryview`` slices, bounds-checked against the region (docs/security.md rule 5: "every
guest address is translated through one function that clamps to the region and splits
across regions").

Dirty logging: every write the back-end makes to guest memory is reported through
:meth:`GuestMemory.mark_dirty`, which sets bits in the memory's :class:`DirtyLog` (the
bitmap of vhost-user.rst "Live migration", one bit per 4 KiB page of guest-physical
memory) when logging is on. The log is looked up at every write, never captured earlier,
so logging switched on at any moment sees every later write; the compiled engine sets the
same bits in the same buffer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NewType, Protocol

from .errors import GuestMemoryError

GPA = NewType("GPA", int)
FrontendVA = NewType("FrontendVA", int)

U64_MAX = (1 << 64) - 1


class GuestMemory(Protocol):
    """What rings and devices need from guest memory."""

    def view(self, gpa: int, length: int) -> memoryview:
        """Return a writable view of ``length`` bytes at ``gpa``, inside one region.

        Raises:
            GuestMemoryError: the range is unmapped, overflows, or crosses a region boundary.
        """
        ...

    def segments(self, gpa: int, length: int) -> list[memoryview]:
        """Return views covering ``length`` bytes at ``gpa``, split across adjacent regions.

        Raises:
            GuestMemoryError: any byte of the range is unmapped, or the range overflows.
        """
        ...

    def va_to_gpa(self, va: int, length: int) -> int:
        """Translate a front-end virtual address range (ring addresses) to a GPA.

        Raises:
            GuestMemoryError: the range is not inside one region's front-end mapping.
        """
        ...

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that the back-end wrote ``length`` bytes at ``gpa`` (dirty logging)."""
        ...


LOG_PAGE = 4096
"""Bytes of guest memory per dirty-log bit (VHOST_LOG_PAGE)."""


def _atomic_marker() -> Callable[[Any, int, int], bool] | None:
    """The compiled ``log_mark`` (atomic OR per byte), or None when it is not built."""
    try:
        mod = importlib.import_module("vhostuser._fastpath")
    except ImportError:
        return None
    fn: Callable[[Any, int, int], bool] | None = getattr(mod, "log_mark", None)
    return fn


_ATOMIC_MARK = _atomic_marker()


class DirtyLog:
    """The dirty-page bitmap: bit ``n`` (byte ``n // 8``, bit ``n % 8``) set means guest
    page ``n`` (``gpa // 4096``) was written (vhost-user.rst "Live migration").

    The buffer is shared with the front-end, which collects and clears bits concurrently
    (QEMU with atomic exchanges), and with every other back-end of the same guest (QEMU
    hands all its vhost-user devices one log). vhost-user.rst "Live migration": "updates
    to the log must be atomic". Bits are only ever set here, each with an atomic OR (the
    compiled ``log_mark``, the same operation the compiled bursts use), so neither a
    front-end clearing a word nor another writer setting a bit in the same byte loses a
    bit; the worst case is a page sent twice. Without the compiled module the fallback is
    one read-modify-write per byte (atomic against the front-end's clearing, not against
    another process writing the same byte). Writes past the end of the log (a front-end
    that sized it too small) are counted in ``beyond``, not made.
    """

    __slots__ = ("_atomic", "beyond", "buf", "pages")

    def __init__(self, buf: bytearray | memoryview, *, atomic: bool = True) -> None:
        """Wrap ``buf`` (writable). ``atomic=False`` uses the pure-Python fallback even
        when the compiled ``log_mark`` is built (tests compare both).

        Raises:
            ValueError: ``buf`` is read-only.
        """
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        if self.buf.readonly:
            raise ValueError("the dirty log must be writable")
        self.pages = 8 * len(self.buf)
        self.beyond = 0
        self._atomic = _ATOMIC_MARK if atomic else None

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page ``length`` bytes at ``gpa`` touch."""
        if length <= 0:
            return
        atomic = self._atomic
        if atomic is not None and gpa >= 0:
            if atomic(self.buf, gpa, length):
                self.beyond += 1
            return
        first = gpa >> 12
        last = (gpa + length - 1) >> 12
        if last >= self.pages:
            self.beyond += 1
            if first >= self.pages:
                return
            last = self.pages - 1
        buf = self.buf
        if first == last:
            buf[first >> 3] |= 1 << (first & 7)
            return
        for page in range(first, last + 1):
            buf[page >> 3] |= 1 << (page & 7)

    def dirty_pages(self) -> list[int]:
        """The page numbers whose bit is set (for tests and tools)."""
        out: list[int] = []
        for i, b in enumerate(self.buf):
            if b:
                out.extend(8 * i + k for k in range(8) if b >> k & 1)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """One guest memory region as the shell mapped it.

    ``buf`` covers the region's fd from file offset 0 and holds at least
    ``mmap_offset + size`` bytes; guest byte ``gpa`` lives at
    ``buf[mmap_offset + gpa - guest_phys_addr]``.
    """

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    buf: memoryview = field(repr=False, compare=False)

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    @property
    def va_end(self) -> int:
        """One past the last front-end virtual address of the region."""
        return self.userspace_addr + self.size


def check_region_geometry(
    guest_phys_addr: int, size: int, userspace_addr: int, mmap_offset: int
) -> None:
    """Validate a region's numbers before anything is mapped.

    Raises:
        GuestMemoryError: size 0, or any of address+size / offset+size wrapping 64 bits.
    """
    if size == 0:
        raise GuestMemoryError(f"memory region at gpa {guest_phys_addr:#x} has size 0")
    for name, base in (
        ("guest_phys_addr", guest_phys_addr),
        ("userspace_addr", userspace_addr),
        ("mmap_offset", mmap_offset),
    ):
        if base + size - 1 > U64_MAX:
            raise GuestMemoryError(
                f"memory region {name} {base:#x} + size {size:#x} wraps past 2**64"
            )


class RegionTable:
    """The back-end's table of mapped regions, implementing :class:`GuestMemory`.

    The table never maps or unmaps: the shell hands it regions whose buffers are already
    mapped, and takes them back on removal to unmap them.
    """

    __slots__ = ("_dirty_hook", "_last", "_regions", "_spans", "log", "max_regions")

    def __init__(self, max_regions: int = 8) -> None:
        self._regions: list[Region] = []
        self._last: Region | None = None
        self._dirty_hook: Callable[[int, int], None] | None = None
        self._spans: list[tuple[int, int, memoryview, int]] | None = None
        self.log: DirtyLog | None = None
        """The dirty log while logging is on (SET_LOG_BASE with VHOST_F_LOG_ALL)."""
        self.max_regions = max_regions

    # -- table maintenance -------------------------------------------------------------
    @property
    def regions(self) -> tuple[Region, ...]:
        """The current regions, sorted by guest-physical address."""
        return tuple(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, region: Region) -> None:
        """Add one region (ADD_MEM_REG or one entry of SET_MEM_TABLE).

        Raises:
            GuestMemoryError: the table is full, the geometry is invalid, the buffer is too
                small, or the region overlaps an existing one in GPA space.
        """
        if len(self._regions) >= self.max_regions:
            raise GuestMemoryError(
                f"memory region at gpa {region.guest_phys_addr:#x}: all {self.max_regions} "
                "slots are in use"
            )
        check_region_geometry(
            region.guest_phys_addr, region.size, region.userspace_addr, region.mmap_offset
        )
        if len(region.buf) < region.mmap_offset + region.size:
            raise GuestMemoryError(
                f"memory region at gpa {region.guest_phys_addr:#x}: mapping of {len(region.buf)}"
                f" bytes is smaller than mmap_offset {region.mmap_offset:#x} + size "
                f"{region.size:#x}"
            )
        for r in self._regions:
            if region.guest_phys_addr < r.gpa_end and r.guest_phys_addr < region.gpa_end:
                raise GuestMemoryError(
                    f"memory region gpa {region.guest_phys_addr:#x}+{region.size:#x} overlaps "
                    f"region gpa {r.guest_phys_addr:#x}+{r.size:#x}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.guest_phys_addr)
        self._last = None
        self._spans = None

    def find_exact(self, guest_phys_addr: int, size: int, userspace_addr: int) -> Region | None:
        """Return the region with exactly these numbers (REM_MEM_REG matching), if any."""
        for r in self._regions:
            if (
                r.guest_phys_addr == guest_phys_addr
                and r.size == size
                and r.userspace_addr == userspace_addr
            ):
                return r
        return None

    def remove(self, region: Region) -> None:
        """Remove a region previously added; the caller unmaps its buffer afterwards.

        Raises:
            GuestMemoryError: the region is not in the table.
        """
        for i, r in enumerate(self._regions):
            if r is region:
                del self._regions[i]
                self._last = None
                self._spans = None
                return
        raise GuestMemoryError(f"no memory region at gpa {region.guest_phys_addr:#x}")

    def clear(self) -> list[Region]:
        """Empty the table and return what it held (for the shell to unmap)."""
        old, self._regions, self._last, self._spans = self._regions, [], None, None
        return old

    def replace(self, regions: Iterable[Region]) -> list[Region]:
        """Swap in a whole new table (SET_MEM_TABLE); return the old regions.

        The new table is validated completely before anything changes.

        Raises:
            GuestMemoryError: any new region is invalid; the old table is then kept.
        """
        fresh = RegionTable(self.max_regions)
        for r in regions:
            fresh.add(r)
        old = self._regions
        self._regions = fresh._regions
        self._last = None
        self._spans = None
        return old

    def set_dirty_hook(self, hook: Callable[[int, int], None] | None) -> None:
        """Install (or remove) a function told about every back-end write, as (gpa,
        length): an observer for tests and tools. While one is installed the compiled
        engine leaves every burst to the Python engine, which calls it."""
        self._dirty_hook = hook

    @property
    def has_observer(self) -> bool:
        """True while a :meth:`set_dirty_hook` observer is installed."""
        return self._dirty_hook is not None

    @property
    def logging(self) -> bool:
        """True if writes must be reported (a dirty log or an observer is installed)."""
        return self.log is not None or self._dirty_hook is not None

    @property
    def spans(self) -> list[tuple[int, int, memoryview, int]]:
        """Every region as ``(gpa_start, gpa_end, mapping, mmap_offset)``: the form the
        fast paths and the compiled engine look addresses up in (rebuilt when the table
        changes; do not modify)."""
        spans = self._spans
        if spans is None:
            spans = self._spans = [
                (r.guest_phys_addr, r.gpa_end, r.buf, r.mmap_offset) for r in self._regions
            ]
        return spans

    def engine_memory(self) -> tuple[list[tuple[int, int, memoryview, int]], Any] | None:
        """What the compiled engine needs: (:attr:`spans`, the dirty log's bitmap or None).

        None while an observer hook is installed: it must see every write, so the Python
        engine does them. Looked up at every burst, never kept: logging may be switched on
        or off at any time.
        """
        if self._dirty_hook is not None:
            return None
        log = self.log
        return self.spans, (log.buf if log is not None else None)

    # -- translation -------------------------------------------------------------------
    def _find_gpa(self, gpa: int) -> Region:
        last = self._last
        if last is not None and last.guest_phys_addr <= gpa < last.gpa_end:
            return last
        for r in self._regions:
            if r.guest_phys_addr <= gpa < r.gpa_end:
                self._last = r
                return r
        raise GuestMemoryError(f"guest address {gpa:#x} is not in any memory region")

    def view(self, gpa: int, length: int) -> memoryview:
        """See :meth:`GuestMemory.view`."""
        if length < 0 or gpa < 0 or gpa + length - 1 > U64_MAX:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is invalid")
        r = self._find_gpa(gpa)
        if gpa + length > r.gpa_end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} runs past the end of its region "
                f"({r.gpa_end:#x})"
            )
        off = r.mmap_offset + gpa - r.guest_phys_addr
        return r.buf[off : off + length]

    def segments(self, gpa: int, length: int) -> list[memoryview]:
        """See :meth:`GuestMemory.segments`."""
        if length < 0 or gpa < 0 or gpa + length - 1 > U64_MAX:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is invalid")
        out: list[memoryview] = []
        while length > 0:
            r = self._find_gpa(gpa)
            n = min(length, r.gpa_end - gpa)
            off = r.mmap_offset + gpa - r.guest_phys_addr
            out.append(r.buf[off : off + n])
            gpa += n
            length -= n
        return out

    def va_to_gpa(self, va: int, length: int) -> int:
        """See :meth:`GuestMemory.va_to_gpa`."""
        for r in self._regions:
            if r.userspace_addr <= va and va + length <= r.va_end:
                return r.guest_phys_addr + (va - r.userspace_addr)
        raise GuestMemoryError(
            f"front-end address range {va:#x}+{length:#x} is not inside any memory region"
        )

    def mark_dirty(self, gpa: int, length: int) -> None:
        """See :meth:`GuestMemory.mark_dirty`."""
        log = self.log
        if log is not None:
            log.mark(gpa, length)
        hook = self._dirty_hook
        if hook is not None:
            hook(gpa, length)


class FlatMemory(RegionTable):
    """A single-region :class:`GuestMemory` over one buffer; GPA 0 at offset 0.

    Used by tests (over a ``bytearray``) and by the front-end, which owns guest RAM and
    gives the ring driver the same view the back-end gets. Front-end virtual addresses are
    ``va_base + gpa``.
    """

    __slots__ = ("va_base",)

    def __init__(self, buf: bytearray | memoryview, *, va_base: int = 0x7F00_0000_0000) -> None:
        super().__init__(max_regions=1)
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        self.va_base = va_base
        self.add(
            Region(guest_phys_addr=0, size=len(mv), userspace_addr=va_base, mmap_offset=0, buf=mv)
        )
