"""The conformance suite: every check, how to choose some, and how to run them.

Each :class:`~vhostuser.testing.registry.Check` has an id (``HS-01``), a one-line meaning,
a reference into the spec and the devices it applies to. Areas:

* ``HS``  handshake and feature words;      ``ACK``  REPLY_ACK;
* ``RT``  the per-request rules of the protocol table (payload size, fds, feature gate,
  reply, ring index, order);
* ``MEM`` memory table and slots;           ``RING`` ring set-up, bases, notifications;
* ``DESC`` descriptor chains, legal and hostile;
* ``NET`` / ``BLK`` the device's data path;  ``IF``  inflight recovery (blk);
* ``DL``  dirty logging (when offered);     ``RC``  reconnection;
* ``SURV`` fd and process survival;          ``HOS`` hostile framing;
* ``MIG`` migration: every write logged, rings resumed at GET_VRING_BASE's index.

:func:`run_check` runs one check against a running :class:`BackendProcess`: a fresh
:class:`~vhostuser.testing.registry.Ctx` (fresh connections), a time limit (every socket
operation is bounded by ``timeout``; the check as a whole by its own limit, enforced with
SIGALRM in the main thread as a backstop), and afterwards a look at the process: if it
died, the check fails saying so and the back-end is started again for the next one.
:func:`run_checks` runs a selection and reports each result as it comes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from struct import error as struct_error
from types import FrameType

from ..errors import (
    LocalProtocolError,
    MessageTimeoutError,
    PeerClosedError,
    RemoteProtocolError,
    VhostUserError,
)
from . import control, datapath, mig
from .backend import BackendProcess, BackendStartError
from .outcome import CheckFailed, CheckSkipped, Outcome, Result
from .registry import CHECKS, Check, Ctx, Offer
from .rig import DEVICES, Session

__all__ = [
    "AREAS",
    "CHECKS",
    "Check",
    "all_checks",
    "probe_offer",
    "run_check",
    "run_checks",
    "select_checks",
    "summary",
]

_ = (control, datapath, mig)  # imported for their registrations

AREAS = ("HS", "ACK", "RT", "MEM", "RING", "DESC", "NET", "BLK", "IF", "DL", "MIG", "RC",
         "SURV", "HOS")
"""Areas in the order the suite runs them."""

DEFAULT_TIMEOUT = 5.0
"""Seconds any one socket operation may take."""


def all_checks() -> list[Check]:
    """Every check, area by area (:data:`AREAS`), ids in order within an area."""
    order = {a: i for i, a in enumerate(AREAS)}
    return sorted(CHECKS, key=lambda c: (order.get(c.area, len(order)), c.id))


def select_checks(device: str, only: Iterable[str] | None = None) -> list[Check]:
    """The checks to run: all of them, or those whose id or area is in ``only``
    (``HS-01``, ``RT``); device applicability is left to the runner (a SKIP).

    Raises:
        ValueError: an unknown device, or an entry of ``only`` that names no check.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    checks = all_checks()
    if only is None:
        return checks
    wanted = [w.strip().upper() for w in only if w.strip()]
    known = {c.id for c in checks} | {c.area for c in checks}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"no check or area named {', '.join(unknown)} (see --list)")
    return [c for c in checks if c.id in wanted or c.area in wanted]


class _Overdue(Exception):
    """The check's own time limit passed (raised by the SIGALRM backstop)."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_Overdue` in the main thread after ``seconds`` (elsewhere: nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(_signum: int, _frame: FrameType | None) -> None:
        raise _Overdue()

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def probe_offer(backend: BackendProcess, device: str, timeout: float) -> Offer | str:
    """The back-end's offer from one handshake (up to SET_OWNER), or why it failed."""
    try:
        s = Session(backend.socket_path, device, timeout=timeout, ready=True)
    except (VhostUserError, OSError) as e:
        return f"cannot connect: {e}"
    try:
        s.handshake(upto="owner")
        return Offer(s.offered, s.offered_pf, s.queue_num, s.max_slots)
    except (VhostUserError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        s.close()


def _classify(e: BaseException) -> str:
    if isinstance(e, MessageTimeoutError):
        return f"timeout: {e}"
    if isinstance(e, PeerClosedError):
        return f"the back-end closed the connection: {e}"
    if isinstance(e, RemoteProtocolError):
        return f"protocol violation: {e}"
    if isinstance(e, LocalProtocolError):
        return f"the front-end could not go on: {e}"
    return f"{type(e).__name__}: {e}"


def run_check(check: Check, backend: BackendProcess, device: str, *,
              timeout: float = DEFAULT_TIMEOUT, offer: Offer | str | None = None) -> Result:
    """Run one check (see the module docstring) and return its result; never raises for
    what the back-end does (KeyboardInterrupt passes through)."""
    start = time.monotonic()
    if device not in check.devices:
        return Result(check.id, Outcome.SKIP, f"applies to {'/'.join(sorted(check.devices))} "
                      "back-ends only", 0.0)
    if not backend.running():
        if backend.start_failures >= 2:
            return Result(check.id, Outcome.FAIL, "the back-end could not be started again "
                          "(see the checks before)", 0.0)
        try:
            backend.start()
        except BackendStartError as e:
            return Result(check.id, Outcome.FAIL, f"the back-end could not be started: {e}",
                          time.monotonic() - start)
    if offer is None:
        offer = probe_offer(backend, device, timeout)
    ctx = Ctx(backend, device, timeout, start + check.timeout, offer)
    outcome, reason = Outcome.PASS, ""
    try:
        with _alarm(check.timeout + 2 * timeout):
            check.func(ctx)
    except CheckSkipped as e:
        outcome, reason = Outcome.SKIP, str(e)
    except CheckFailed as e:
        outcome, reason = Outcome.FAIL, str(e)
    except _Overdue:
        outcome, reason = Outcome.FAIL, f"timeout: the check ran past {check.timeout:g} s"
    except (VhostUserError, OSError, ValueError, AssertionError, struct_error) as e:
        outcome, reason = Outcome.FAIL, _classify(e)
    except Exception as e:  # a bug of the kit's: report it, finish the run
        outcome, reason = Outcome.FAIL, (f"internal error of the check (a bug of the kit, "
                                         f"not necessarily of the back-end): {_classify(e)}")
    finally:
        ctx.close()
    if outcome is Outcome.FAIL:
        # A back-end that is crashing may take a moment to go: it takes the blame here,
        # not in the next check.
        lost = any(w in reason for w in ("closed the connection", "reset", "Broken pipe",
                                          "gone"))
        backend.wait_dead(1.0 if lost else 0.2)
    gone = backend.check_alive()
    if gone is not None:
        if "process is gone" not in reason:
            reason = f"{gone} after the check; {reason}" if reason else f"{gone} after the check"
        outcome = Outcome.FAIL
        try:
            backend.start()
        except BackendStartError as e:
            reason += f"; it could not be started again: {e}"
    if outcome is Outcome.PASS and ctx.notes:
        reason = "; ".join(ctx.notes)
    return Result(check.id, outcome, reason, time.monotonic() - start)


def run_checks(backend: BackendProcess, device: str, checks: Iterable[Check], *,
               timeout: float = DEFAULT_TIMEOUT,
               progress: Callable[[Check, Result], None] | None = None) -> list[Result]:
    """Run ``checks`` in order against the started ``backend``; call ``progress`` after
    each. The offer is probed once, before the first check."""
    offer = probe_offer(backend, device, timeout)
    out: list[Result] = []
    for c in checks:
        r = run_check(c, backend, device, timeout=timeout, offer=offer)
        out.append(r)
        if progress is not None:
            progress(c, r)
    return out


def summary(results: Iterable[Result]) -> dict[str, int]:
    """Counts of passed, failed and skipped checks."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results:
        counts[{Outcome.PASS: "passed", Outcome.FAIL: "failed",
                Outcome.SKIP: "skipped"}[r.outcome]] += 1
    return counts
