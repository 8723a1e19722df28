"""The check registry and what a check gets to work with (:class:`Ctx`).

A check is a function of one :class:`Ctx`, registered with :func:`check` under an id
(``HS-01``), a one-line meaning, a reference into the spec and the devices it applies to.
It passes by returning, fails by raising :class:`~vhostuser.testing.outcome.CheckFailed`
(:func:`~vhostuser.testing.outcome.fail`) and skips with
:func:`~vhostuser.testing.outcome.skip`. The context hands out fresh connections
(:meth:`Ctx.session`), rigs with guest memory (:meth:`Ctx.rig`, :meth:`Ctx.started`) and
fds for hostile messages, and closes them all when the check ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol.enums import ProtocolFeature, VirtioFeature
from .backend import BackendProcess
from .outcome import fail, skip
from .rig import Rig, Session, choose_features, choose_protocol_features

__all__ = ["CHECKS", "Check", "Ctx", "Offer", "check"]

PF = ProtocolFeature
VF = VirtioFeature


@dataclass(frozen=True, slots=True)
class Offer:
    """What the back-end offered in the run's first handshake."""

    features: int
    protocol_features: int
    queue_num: int | None
    max_slots: int | None

    def has_pf(self, feature: ProtocolFeature) -> bool:
        """The protocol feature was offered (bit 30 offered too)."""
        return bool(self.features & VF.PROTOCOL_FEATURES and self.protocol_features & feature)

    def has(self, bit: int) -> bool:
        """The virtio feature bit(s) were offered."""
        return bool(self.features & bit) and self.features & bit == bit


@dataclass(frozen=True, slots=True)
class Check:
    """One conformance check.

    Attributes:
        id: ``AREA-NN``.
        meaning: one line: what a conforming back-end does.
        spec: where the rule is written (``vhost-user.rst: GET_FEATURES``).
        devices: the device types it applies to.
        func: the check itself.
        timeout: seconds the whole check may take (each socket operation is bounded by
            the run's timeout on top).
        restarts: the check kills and restarts the back-end itself.
    """

    id: str
    meaning: str
    spec: str
    devices: frozenset[str]
    func: Callable[[Ctx], None]
    timeout: float = 60.0
    restarts: bool = False

    @property
    def area(self) -> str:
        """The id's prefix (``HS``)."""
        return self.id.split("-", 1)[0]


CHECKS: list[Check] = []
"""Every registered check, in registration order."""


def check(id: str, meaning: str, spec: str, *, devices: tuple[str, ...] = ("net", "blk"),
          timeout: float = 60.0, restarts: bool = False
          ) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Register the decorated function as a check (see :class:`Check`).

    Raises:
        ValueError: the id is taken.
    """
    def deco(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        if any(c.id == id for c in CHECKS):
            raise ValueError(f"check id {id} is registered twice")
        if fn.__doc__ is None:
            fn.__doc__ = f"{id}: {meaning} [{spec}]"
        CHECKS.append(Check(id, meaning, spec, frozenset(devices), fn, timeout, restarts))
        return fn
    return deco


@dataclass
class Ctx:
    """What a running check works with (see the module docstring)."""

    backend: BackendProcess
    device: str
    timeout: float
    deadline: float
    offer_or_error: Offer | str
    _sessions: list[Session] = field(default_factory=list)
    _rigs: list[Rig] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)
    _dirs: list[str] = field(default_factory=list)
    _finalizers: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Details a check wants in its result even when it passes."""

    # -- the offer ------------------------------------------------------------------------
    @property
    def offer(self) -> Offer:
        """The back-end's offer (FAIL when the run's first handshake failed)."""
        if isinstance(self.offer_or_error, str):
            fail(f"the first handshake failed: {self.offer_or_error}")
        return self.offer_or_error

    def require_pf(self, feature: ProtocolFeature) -> None:
        """SKIP unless the protocol feature is offered."""
        if not self.offer.has_pf(feature):
            skip(f"protocol feature {feature.name} not offered")

    def require_feature(self, bit: int, name: str) -> None:
        """SKIP unless the virtio feature bit is offered."""
        if not self.offer.has(bit):
            skip(f"{name} not offered")

    # -- time and the process -------------------------------------------------------------
    def check_time(self) -> None:
        """FAIL (timeout) once the check's time is up."""
        if time.monotonic() > self.deadline:
            fail("timeout: the check did not finish within its time limit")

    def alive(self, during: str) -> None:
        """FAIL when the back-end process is gone (``during`` says what it was doing)."""
        gone = self.backend.check_alive()
        if gone is not None:
            fail(f"{gone} during {during}")

    # -- connections ------------------------------------------------------------------------
    def connect(self) -> Session:
        """A fresh connection the back-end serves (a GET_FEATURES round trip was answered;
        a connection turned away at once, as a one-front-end back-end does while it tears
        the previous one down, is retried).

        Raises:
            MessageTimeoutError, PeerClosedError: no connection served in time.
        """
        self.check_time()
        s = Session(self.backend.socket_path, self.device, timeout=self.timeout, ready=True)
        self._sessions.append(s)
        return s

    def session(self, *, upto: str = "features", features: int | None = None,
                add_pf: int = 0, remove_pf: int = 0, pf: int | None = None,
                status: bool = True, legacy: bool = False, **feature_kw: bool) -> Session:
        """A fresh connection after QEMU's handshake up to ``upto`` (see
        :meth:`Session.handshake`); features from :func:`choose_features` with
        ``feature_kw`` unless ``features`` is given; protocol features the defaults plus
        ``add_pf`` minus ``remove_pf`` unless ``pf`` is given; ``legacy``: no protocol
        features at all (bit 30 not acked).

        Raises:
            VhostUserError: the handshake failed.
        """
        s = self.connect()
        offer = self.offer
        if legacy:
            feature_kw["protocol"] = False
        if features is None:
            features = choose_features(self.device, offer.features, **feature_kw)
        if pf is None:
            pf = choose_protocol_features(offer.protocol_features, add=add_pf,
                                          remove=remove_pf)
        s.handshake(upto=upto, features=features, pf=pf, status=status, legacy=legacy)
        return s

    def rig(self, s: Session, *, queue_size: int = 64, rams: Sequence[int] | None = None,
            regions: Sequence[tuple[int, int, int, int]] | None = None) -> Rig:
        """Guest memory and rings over ``s`` (closed with the check; see :class:`Rig`)."""
        r = Rig(s, queue_size=queue_size, rams=rams, regions=regions)
        self._rigs.append(r)
        return r

    def started(self, *, base: int = 0, rx: int = 16, queue_size: int = 64,
                **session_kw: Any) -> Rig:
        """A session whose device runs: handshake, memory, rings, DRIVER_OK (and, for net,
        receive buffers); ``session_kw`` go to :meth:`session`.

        Raises:
            VhostUserError: a request was refused or unanswered.
        """
        s = self.session(**session_kw)
        r = self.rig(s, queue_size=queue_size)
        r.start(base=base, rx_buffers=rx)
        return r

    def drop(self, s: Session) -> None:
        """Close ``s`` now (and the rigs over it)."""
        for r in [r for r in self._rigs if r.s is s]:
            r.close()
            self._rigs.remove(r)
        s.close()
        with contextlib.suppress(ValueError):
            self._sessions.remove(s)

    # -- fds for hostile messages -------------------------------------------------------------
    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def eventfd(self) -> int:
        """A fresh eventfd (closed with the check)."""
        return self._keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

    def memfd(self, size: int = 1 << 20) -> int:
        """A fresh memfd of ``size`` bytes."""
        fd = self._keep(os.memfd_create("vhost-user-check", os.MFD_CLOEXEC))
        os.ftruncate(fd, size)
        return fd

    def pipe(self) -> int:
        """The read end of a fresh pipe."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._keep(w)
        return self._keep(r)

    def socket_fd(self) -> int:
        """One end of a fresh socketpair (the other closed)."""
        a, b = socket.socketpair()
        b.close()
        return self._keep(a.detach())

    def readonly_file(self, size: int = 1 << 20) -> int:
        """A regular file of ``size`` bytes opened read-only."""
        d = tempfile.mkdtemp(prefix="vhu-check-ro-", dir="/tmp")
        self._dirs.append(d)
        path = os.path.join(d, "ro")
        with open(path, "wb") as f:
            f.truncate(size)
        return self._keep(os.open(path, os.O_RDONLY | os.O_CLOEXEC))

    def adopt_fd(self, fd: int) -> int:
        """Close ``fd`` (one the check received) when the check ends."""
        return self._keep(fd)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the check ends (before its sessions close)."""
        self._finalizers.append(fn)

    def close_fds(self) -> None:
        """Close every fd handed out so far."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every rig, session and fd of the check."""
        for fn in self._finalizers:
            with contextlib.suppress(Exception):
                fn()
        self._finalizers = []
        for r in self._rigs:
            with contextlib.suppress(Exception):
                r.close()
        self._rigs = []
        for s in self._sessions:
            with contextlib.suppress(Exception):
                s.close()
        self._sessions = []
        self.close_fds()
        import shutil

        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs = []

    @contextlib.contextmanager
    def sub(self, label: str) -> Iterator[None]:
        """Around one sub-case: time checked before, the process after (also when the
        sub-case raised: a back-end that is dying takes the blame for what followed)."""
        self.check_time()
        try:
            yield
        except BaseException:
            self.backend.wait_dead(1.0)
            self.alive(label)
            raise
        self.alive(label)
