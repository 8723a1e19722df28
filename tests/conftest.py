"""Fixtures shared by every test directory.

``no_leaks``: fail a test that leaves file descriptors or memory mappings behind.
Markers are declared in pyproject.toml only (``--strict-markers``); none are added here.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Iterator

import pytest


def _open_fds() -> dict[int, str]:
    """fd -> what it points to, for this process (the listing's own fd is left out)."""
    fds: dict[int, str] = {}
    dir_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(dir_fd):
            fd = int(name)
            if fd == dir_fd:
                continue
            try:
                fds[fd] = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:  # closed meanwhile
                continue
    finally:
        os.close(dir_fd)
    return fds


def _is_tracked_mapping(line: str) -> bool:
    """Mappings a leak shows up as: anything with a name except the heap, stack and libraries.

    Anonymous private mappings come and go with the allocator (pymalloc arenas, malloc), and
    loading an extension module maps a ``.so`` for good, so neither is a leak; a forgotten
    ``mmap`` of a memfd, file or ``/dev/zero`` (shared anonymous) is.
    """
    parts = line.split(maxsplit=5)
    if len(parts) < 6:
        return False
    path = parts[5].strip()
    if path in ("[heap]", "[stack]", "[vvar]", "[vdso]", "[vsyscall]"):
        return False
    base = os.path.basename(path.removesuffix(" (deleted)"))
    return not (base.endswith(".so") or ".so." in base or path.startswith("/usr/lib/locale/"))


def _mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    return [line for line in lines if _is_tracked_mapping(line)]


def _describe(line: str) -> str:
    parts = line.split(maxsplit=5)
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return f"{parts[0]} {parts[1]} {end - start:#x} bytes {parts[5].strip()}"


@dataclasses.dataclass(slots=True)
class LeakSnapshot:
    fds: dict[int, str]
    maps: list[str]

    @classmethod
    def take(cls, *, collect: bool = True) -> LeakSnapshot:
        if collect:
            gc.collect()
        return cls(fds=_open_fds(), maps=_mappings())


class LeakChecker:
    """Baseline taken at creation; :meth:`check` compares the current state with it.

    ``collect`` (default True) runs ``gc.collect()`` before each snapshot so objects that
    only a reference cycle keeps alive have released their fds and mappings. Tests may call
    :meth:`reset` after a warm-up (first-use imports, caches) and :meth:`check` mid-test.
    """

    def __init__(self, *, collect: bool = True) -> None:
        self.collect = collect
        self.before = LeakSnapshot.take(collect=collect)

    def reset(self) -> None:
        self.before = LeakSnapshot.take(collect=self.collect)

    def report(self) -> str | None:
        """A description of what grew since the baseline, or None."""
        after = LeakSnapshot.take(collect=self.collect)
        problems: list[str] = []
        if len(after.fds) > len(self.before.fds):
            new = {fd: t for fd, t in after.fds.items() if self.before.fds.get(fd) != t}
            problems.append(
                f"open fds grew from {len(self.before.fds)} to {len(after.fds)}; new or changed:"
            )
            problems += [f"  fd {fd} -> {target}" for fd, target in sorted(new.items())]
        if len(after.maps) > len(self.before.maps):
            old = set(self.before.maps)
            problems.append(
                f"mappings grew from {len(self.before.maps)} to {len(after.maps)}; new:"
            )
            problems += [f"  {_describe(line)}" for line in after.maps if line not in old]
        return "\n".join(problems) if problems else None

    def check(self) -> None:
        problem = self.report()
        if problem is not None:
            pytest.fail(f"resource leak:\n{problem}", pytrace=False)


@pytest.fixture
def no_leaks() -> Iterator[LeakChecker]:
    """Fail the test if it leaves more fds or (named) memory mappings than it found.

    Request it before other fixtures that open resources, so that they are torn down first.
    """
    checker = LeakChecker()
    yield checker
    checker.check()
