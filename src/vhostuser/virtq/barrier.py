"""The one full memory barrier of the ring engine. No I/O.

This is the only module that names a memory barrier. Everything else in ``virtq`` relies
on the ordering described here.

Target: x86-64 (also called AMD64), little-endian, running CPython. The ring engine is not
supported elsewhere; on a weakly ordered CPU (arm64, POWER) the read/write orderings listed
below would need real fences too.

What x86-64 (TSO, "total store order") already guarantees
-----------------------------------------------------------
* Loads are not reordered with older loads (load->load): reading ``avail.idx`` and then the
  ring entries and descriptors it covers, or reading a packed descriptor's ``flags`` and then
  its address, length and id, needs no fence. (The virtio spec's "read memory barrier".)
* Stores are not reordered with older stores (store->store): writing used elements (or the
  descriptors and avail ring entries, on the driver side) before ``used.idx`` (``avail.idx``),
  or a packed descriptor's id and length before its ``flags``, needs no fence. (The spec's
  "write memory barrier".)
* Loads are not reordered with older stores to the same location, and stores are not
  reordered with older loads.

CPython executes the ring code in program order: every ring access is a separate
``memoryview`` item access or ``struct`` call, each an opaque C function call reached through
the interpreter loop, so the C compiler cannot move one shared-memory access across another.
A 16-bit ring index goes through ``memoryview.cast('H')``, whose item get/set is a 2-byte
``memcpy`` that the compiler emits as a single aligned ``mov`` - never two byte copies, so the
index is never torn.

What x86-64 does NOT guarantee: store->load
-------------------------------------------
A load may be satisfied before an older store to a *different* location becomes visible to
the other CPU. The virtio protocol has exactly these places where that matters, and each
calls :func:`full_barrier`:

* device: after publishing ``used.idx`` (split) or a used descriptor's flags (packed), before
  reading ``avail.flags`` / ``used_event`` / the driver event suppression structure
  (virtio 1.2 2.7.7 "Used Buffer Notification Suppression", 2.8 "Driver and Device Event
  Suppression"; otherwise a needed used-buffer notification is lost);
* device: after re-enabling available-buffer notifications (``used.flags``, ``avail_event``,
  device event suppression), before re-reading ``avail.idx`` / the next descriptor's flags;
* driver: after publishing ``avail.idx`` / a head descriptor's flags, before reading
  ``used.flags`` / ``avail_event`` / the device event suppression structure
  (virtio 1.2 2.7.13.4.1 and the packed "Sending Available Buffer Notifications" driver
  requirement: "MUST perform a suitable memory barrier");
* driver: after re-enabling used-buffer notifications, before re-reading ``used.idx`` / the
  next used descriptor (virtio 1.2 2.7.14 note).

How the full barrier is made
----------------------------
A ``threading.Lock`` acquire followed by a release. On Linux, CPython 3.11's lock is a POSIX
semaphore: an uncontended acquire is ``sem_trywait`` (glibc: an atomic compare-and-swap,
``lock cmpxchg``) and the release is ``sem_post`` (an atomic add/CAS, ``lock``-prefixed).
Any ``lock``-prefixed read-modify-write instruction is a full barrier on x86-64 (Intel SDM
vol. 3, 8.2.2: "locked instructions have a total order" and loads/stores are not reordered
with them), exactly what ``mfence`` would give, so the store before the call is globally
visible before any load after it. Measured cost on the development machine (2-vCPU AMD
EPYC, CPython 3.11): 100-250 ns per call including the Python call
(``benchmarks/ring_bench.py`` prints it), paid at most a few times per burst, never per
chain - against 2-6 microseconds per chain for the rest of pop+push.
"""

from __future__ import annotations

import threading

__all__ = ["BARRIER_TARGETS", "full_barrier"]

#: ``platform.machine()`` values this barrier (and the TSO reasoning above) is written for.
BARRIER_TARGETS = ("x86_64", "AMD64")

_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release


def full_barrier() -> None:
    """Order every earlier load and store before every later one (x86-64 ``mfence``-like).

    Implemented by a lock acquire/release pair, i.e. ``lock``-prefixed atomic instructions.
    Never raises.
    """
    _acquire()
    _release()
