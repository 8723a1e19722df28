"""pytest plugin ``vhostuser`` (entry point ``pytest11``): fixtures for testing a vhost-user
back-end, and the conformance suite as tests.

Options (the plugin does nothing unless ``--vhost-backend`` is given: its fixtures skip and
the suite is not generated):

``--vhost-backend CMD``   the back-end command, with ``{socket}`` where it must listen;
``--vhost-device net|blk``  the device it serves;
``--vhost-timeout S``     seconds any one socket operation may take (default 5);
``--vhost-only IDS``      comma-separated check ids or areas;
``--vhost-json FILE``     write the suite's results as JSON.

Fixtures: ``vhost_backend`` (session: the running :class:`BackendProcess`; its
``socket_path``), ``vhost_device``, ``vhost_frontend`` (a connected
:class:`~vhostuser.io.frontend.FrontendClient`, not negotiated), ``guest_ram`` (16 MiB of
shareable guest memory), ``net_frontend`` (a started
:class:`~vhostuser.frontends.net.VirtioNetFrontend`: ``send``/``recv`` frames) and
``blk_frontend`` (a :class:`~vhostuser.frontends.blk.VirtioBlkFrontend`:
``read``/``write``). Run the suite with::

    pytest --pyargs vhostuser.testing --vhost-backend 'CMD ... {socket} ...' --vhost-device net

A check that fails is a failed test with the check's reason; one that does not apply is a
skipped test with the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..frontends.blk import VirtioBlkFrontend
    from ..frontends.net import VirtioNetFrontend
    from ..io.frontend import FrontendClient
    from ..io.guestram import GuestRam
    from .backend import BackendProcess
    from .outcome import Result
    from .registry import Check, Offer

NO_BACKEND = ("no back-end to test: pass --vhost-backend 'CMD ... {socket} ...' and "
              "--vhost-device net|blk")


def pytest_addoption(parser: pytest.Parser) -> None:
    """The options in the module docstring."""
    group = parser.getgroup("vhostuser", "vhost-user back-end conformance (vhostuser.testing)")
    group.addoption("--vhost-backend", metavar="CMD", default=None,
                    help="back-end command with {socket} where it must listen")
    group.addoption("--vhost-device", choices=["net", "blk"], default=None,
                    help="the device the back-end serves")
    group.addoption("--vhost-timeout", type=float, default=5.0, metavar="S",
                    help="seconds any one socket operation may take (default 5)")
    group.addoption("--vhost-only", metavar="IDS", default=None,
                    help="comma-separated check ids or areas (e.g. HS,RT-02)")
    group.addoption("--vhost-json", metavar="FILE", default=None,
                    help="write the conformance results as JSON to FILE")


def _given(config: pytest.Config) -> bool:
    return bool(config.getoption("--vhost-backend", default=None))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize tests taking ``vhost_check`` with the selected checks."""
    if "vhost_check" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if not _given(config):
        metafunc.parametrize("vhost_check", [None], ids=["no-backend"])
        return
    from .checks import select_checks

    device = config.getoption("--vhost-device") or "net"
    only = config.getoption("--vhost-only")
    try:
        checks = select_checks(device, only.split(",") if only else None)
    except ValueError as e:
        raise pytest.UsageError(f"--vhost-only: {e}") from None
    metafunc.parametrize("vhost_check", checks, ids=[c.id for c in checks])


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vhost_device(pytestconfig: pytest.Config) -> str:
    """The device the back-end serves (``--vhost-device``); skips without one."""
    device = pytestconfig.getoption("--vhost-device")
    if not _given(pytestconfig) or device is None:
        pytest.skip(NO_BACKEND)
    return str(device)


@pytest.fixture(scope="session")
def vhost_backend(pytestconfig: pytest.Config) -> Iterator[BackendProcess]:
    """The back-end command of ``--vhost-backend``, started once for the session (and
    started again by the suite when it dies); skips without the option."""
    command = pytestconfig.getoption("--vhost-backend")
    if not command:
        pytest.skip(NO_BACKEND)
    from .backend import BackendProcess, BackendStartError

    try:
        backend = BackendProcess(command)
    except ValueError as e:
        raise pytest.UsageError(f"--vhost-backend: {e}") from None
    try:
        backend.start()
    except BackendStartError as e:
        backend.close()
        pytest.fail(f"the back-end did not start: {e}", pytrace=False)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def vhost_frontend(vhost_backend: BackendProcess, pytestconfig: pytest.Config
                   ) -> Iterator[FrontendClient]:
    """A :class:`FrontendClient` connected to the back-end (call ``negotiate()``)."""
    from ..io.frontend import FrontendClient

    timeout = float(pytestconfig.getoption("--vhost-timeout"))
    with FrontendClient.connect(vhost_backend.socket_path, timeout=timeout,
                                connect_timeout=timeout) as fe:
        yield fe


@pytest.fixture
def guest_ram() -> Iterator[GuestRam]:
    """16 MiB of guest memory in a sealed memfd, shareable with a back-end."""
    from ..io.guestram import GuestRam

    with GuestRam.memfd(16 << 20, name="vhost-user-test") as ram:
        yield ram


@pytest.fixture
def net_frontend(vhost_backend: BackendProcess, vhost_device: str,
                 pytestconfig: pytest.Config) -> Iterator[VirtioNetFrontend]:
    """A virtio-net front-end on the back-end, started (``send``, ``recv``)."""
    if vhost_device != "net":
        pytest.skip("net_frontend needs --vhost-device net")
    from ..frontends.net import VirtioNetFrontend

    timeout = float(pytestconfig.getoption("--vhost-timeout"))
    with VirtioNetFrontend.connect(vhost_backend.socket_path, timeout=timeout,
                                   reconnect=False) as nic:
        yield nic


@pytest.fixture
def blk_frontend(vhost_backend: BackendProcess, vhost_device: str,
                 pytestconfig: pytest.Config) -> Iterator[VirtioBlkFrontend]:
    """A virtio-blk front-end on the back-end (``read``, ``write``, ``flush``)."""
    if vhost_device != "blk":
        pytest.skip("blk_frontend needs --vhost-device blk")
    from ..frontends.blk import VirtioBlkFrontend

    timeout = float(pytestconfig.getoption("--vhost-timeout"))
    with VirtioBlkFrontend(vhost_backend.socket_path, timeout=timeout,
                           reconnect=False) as disk:
        yield disk


class _Suite:
    """What the conformance tests share in one session: the offer and the results."""

    def __init__(self) -> None:
        self.offer: Offer | str | None = None
        self.results: list[tuple[Check, Result]] = []
        self.started = time.monotonic()


_SUITE_KEY = pytest.StashKey[_Suite]()


@pytest.fixture(scope="session")
def vhost_suite(pytestconfig: pytest.Config) -> _Suite:
    """The conformance run's shared state (offer, results)."""
    suite = _Suite()
    pytestconfig.stash[_SUITE_KEY] = suite
    return suite


def run_conformance_check(check: Check | None, request: pytest.FixtureRequest) -> None:
    """Run one check as a test: skip or fail with its reason.

    Raises:
        pytest.skip.Exception, pytest.fail.Exception: the check skipped or failed.
    """
    if check is None:
        pytest.skip(NO_BACKEND)
    backend: BackendProcess = request.getfixturevalue("vhost_backend")
    device: str = request.getfixturevalue("vhost_device")
    suite: _Suite = request.getfixturevalue("vhost_suite")
    timeout = float(request.config.getoption("--vhost-timeout"))
    from .checks import probe_offer, run_check
    from .outcome import Outcome

    if suite.offer is None:
        suite.offer = probe_offer(backend, device, timeout)
    result = run_check(check, backend, device, timeout=timeout, offer=suite.offer)
    suite.results.append((check, result))
    if result.outcome is Outcome.SKIP:
        pytest.skip(result.reason)
    if result.outcome is Outcome.FAIL:
        pytest.fail(f"{check.id} ({check.meaning}) [{check.spec}]: {result.reason}",
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write ``--vhost-json`` when the suite ran."""
    path = session.config.getoption("--vhost-json", default=None)
    suite = session.config.stash.get(_SUITE_KEY, None)
    if not path or suite is None:
        return
    from .checks import summary

    results = [r for _c, r in suite.results]
    doc: dict[str, Any] = {
        "backend": session.config.getoption("--vhost-backend"),
        "device": session.config.getoption("--vhost-device"),
        "summary": summary(results),
        "seconds": round(time.monotonic() - suite.started, 1),
        "results": [{**r.as_dict(), "meaning": c.meaning, "spec": c.spec}
                    for c, r in suite.results],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
