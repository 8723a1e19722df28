"""Start real vhost-user peers (DPDK testpmd, QEMU, qemu-storage-daemon) for interop tests.

Every peer is a context manager around one subprocess:

* it runs in its own session with a private work directory (a fresh ``/tmp/vhu-peer-*``
  directory unless ``workdir`` is given), stdin held open by a pipe (testpmd and QEMU's
  ``-serial stdio`` need it), stdout and stderr appended to ``<workdir>/<name>.log``;
* leaving the ``with`` block stops it (a polite request first: SIGINT for testpmd, QMP
  ``quit`` for QEMU, SIGTERM for qsd; then SIGKILL), reaps it, closes the pipe, removes the
  sockets it listened on, DPDK's runtime directory for its ``--file-prefix`` and the work
  directory it created;
* when the block exits with an exception, or a ``wait_for`` times out, the tail of the log
  is printed to stderr (pytest shows it with the failure) and put in the exception text.

The log strings matched here were observed with Debian 12's DPDK 22.11.11 and QEMU 7.2.22;
see ``test_peers_selfcheck.py`` for the scenarios that pin them down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import pytest

__all__ = [
    "PeerError",
    "PeerExited",
    "PeerTimeout",
    "PortStats",
    "QemuStorageDaemon",
    "QemuVhostUserNet",
    "QmpClient",
    "TestpmdVhost",
    "TestpmdVirtioUser",
    "guest_kernel",
    "make_raw_image",
    "peer_available",
    "require_peer",
    "short_tmpdir",
    "wait_for_socket",
]

INSTALL_HINT = "run scripts/install-peers.sh"
DPDK_PMD_DIR = Path("/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_prefix_counter = itertools.count()
_T = TypeVar("_T")


# --------------------------------------------------------------------------- availability


@dataclasses.dataclass(frozen=True, slots=True)
class _PeerSpec:
    binaries: tuple[str, ...]
    packages: tuple[str, ...]
    files: tuple[str, ...] = ()  # glob patterns that must match something


_PEERS: dict[str, _PeerSpec] = {
    "testpmd": _PeerSpec(
        ("dpdk-testpmd",),
        ("dpdk", "dpdk-dev", "librte-net-vhost23", "librte-net-virtio23", "librte-mempool-ring23"),
        (
            f"{DPDK_PMD_DIR}/librte_net_vhost.so*",
            f"{DPDK_PMD_DIR}/librte_net_virtio.so*",
            f"{DPDK_PMD_DIR}/librte_mempool_ring.so*",
        ),
    ),
    "qemu": _PeerSpec(("qemu-system-x86_64",), ("qemu-system-x86", "qemu-system-common")),
    "qemu-storage-daemon": _PeerSpec(("qemu-storage-daemon",), ("qemu-system-common",)),
    "qemu-img": _PeerSpec(("qemu-img",), ("qemu-utils",)),
    "tcpdump": _PeerSpec(("tcpdump",), ("tcpdump",)),
    "guest": _PeerSpec(
        ("busybox", "cpio", "modprobe"),
        ("linux-image-amd64", "busybox-static", "cpio", "kmod"),
        ("/boot/vmlinuz-*",),
    ),
}
_ALIASES = {
    "dpdk": "testpmd",
    "dpdk-testpmd": "testpmd",
    "qemu-system-x86_64": "qemu",
    "qsd": "qemu-storage-daemon",
}


def peer_available(name: str) -> str | None:
    """None if peer ``name`` can run here, else a skip message saying how to install it.

    Names: ``testpmd`` (alias ``dpdk``), ``qemu``, ``qemu-storage-daemon`` (``qsd``),
    ``qemu-img``, ``guest`` (kernel, busybox, cpio, modprobe for a test initramfs).
    """
    spec = _PEERS.get(_ALIASES.get(name, name))
    if spec is None:
        raise ValueError(f"unknown peer {name!r}; known: {sorted(_PEERS)}")
    missing = [b for b in spec.binaries if shutil.which(b) is None]
    missing += [pat for pat in spec.files if not _glob_any(pat)]
    if not missing:
        return None
    return (
        f"peer {name!r} not available (missing {', '.join(missing)}): {INSTALL_HINT} "
        f"(apt-get install --no-install-recommends {' '.join(spec.packages)})"
    )


def _glob_any(pattern: str) -> bool:
    path = Path(pattern)
    return any(path.parent.glob(path.name))


def require_peer(name: str) -> None:
    """Skip the calling test if peer ``name`` is missing; in CI (CI=true) fail instead."""
    message = peer_available(name)
    if message is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} [CI=true: interop peers must be installed, not skipped]")
    pytest.skip(message)


def guest_kernel() -> Path | None:
    """The newest /boot/vmlinuz-* or None."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    return kernels[-1] if kernels else None


# --------------------------------------------------------------------------- helpers


class PeerError(RuntimeError):
    """A peer misbehaved; the message carries the tail of its log."""


class PeerTimeout(PeerError):
    pass


class PeerExited(PeerError):
    pass


@contextlib.contextmanager
def short_tmpdir(prefix: str = "vhu-") -> Iterator[Path]:
    """A fresh directory under /tmp with a short path (AF_UNIX paths must fit 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_raw_image(path: str | os.PathLike[str], size: int) -> Path:
    """Create a raw disk image of ``size`` bytes (qemu-img if present, else a sparse file)."""
    out = Path(path)
    qemu_img = shutil.which("qemu-img")
    if qemu_img is not None:
        subprocess.run(
            [qemu_img, "create", "-q", "-f", "raw", str(out), str(size)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    else:
        with open(out, "wb") as f:
            f.truncate(size)
    return out


def _pick_cpu(cpu: int) -> int:
    """Map a wanted CPU index onto the CPUs this process may use (CI may have fewer)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[cpu % len(allowed)]


def _dpdk_runtime_dir(prefix: str) -> Path:
    # EAL: /var/run/dpdk/<prefix> as root, else $XDG_RUNTIME_DIR/dpdk/<prefix> or /tmp/dpdk.
    if os.geteuid() == 0:
        base = Path("/var/run")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp"))
    return base / "dpdk" / prefix


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def wait_for_socket(path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Wait until ``path`` is a listening-capable unix socket file."""
    p = Path(path)
    deadline = time.monotonic() + timeout
    while not _is_socket(p):
        if time.monotonic() > deadline:
            raise PeerTimeout(f"socket {p} did not appear within {timeout} s")
        time.sleep(0.02)


# --------------------------------------------------------------------------- base class


class Peer:
    """One peer subprocess with a log file; see the module docstring."""

    name: ClassVar[str] = "peer"
    #: Log lines meaning the peer is useless although it keeps running (fail fast on them).
    fatal_re: ClassVar[re.Pattern[str] | None] = None
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_timeout: ClassVar[float] = 10.0
    log_tail_lines: ClassVar[int] = 150

    def __init__(self, *, workdir: str | os.PathLike[str] | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log_cache = ""
        self.command_line = ""
        self._log_offset = 0
        self._cleanup_paths: list[Path] = []  # sockets/files this peer owns, removed on stop
        self._cleanup_dirs: list[Path] = []

    # subclasses -----------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Hook: prepare files in self.workdir."""

    def _request_stop(self) -> None:
        """Hook: ask the peer to exit on its own (default: send stop_signal)."""
        assert self.proc is not None
        self.proc.send_signal(self.stop_signal)

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"vhu-{self.name}-", dir="/tmp"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        try:
            self._before_start()
            argv = self.argv()
            self.command_line = shlex.join(argv)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
        except BaseException:
            self._remove_files()
            raise
        return self

    def stop(self) -> int | None:
        """Stop the peer (idempotent); return its exit status (negative: killed by signal)."""
        proc = self.proc
        if proc is not None and self.returncode is None:
            try:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, OSError, PeerError):
                        self._request_stop()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.stop_timeout)
            finally:
                # also reached on KeyboardInterrupt: never leave a running child or a zombie
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                self.returncode = proc.returncode
        self._remove_files()
        return self.returncode

    def _remove_files(self) -> None:
        for path in self._cleanup_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for d in self._cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if self._own_workdir and self.workdir is not None:
            self._log_snapshot_before_rmtree()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_snapshot_before_rmtree(self) -> None:
        # Keep the log readable (log_text/tail) after the work directory is gone.
        with contextlib.suppress(OSError):
            self.log_text()
        self.log_path = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            if exc_type is not None and not isinstance(exc, PeerError):
                self.dump_log()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # log access -----------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the peer printed so far (ANSI escapes removed)."""
        if self.log_path is not None:
            with contextlib.suppress(FileNotFoundError), open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
                # keep a partial trailing line for the next read
                cut = data.rfind(b"\n") + 1
                if cut and self.proc is not None and self.proc.poll() is None:
                    data = data[:cut]
                self._log_offset += len(data)
                self._log_cache += _ANSI_RE.sub("", data.decode("utf-8", "replace"))
        return self._log_cache

    def mark(self) -> int:
        """A position in the log; pass it as ``since`` to match only later output."""
        return len(self.log_text())

    def tail(self, lines: int | None = None) -> str:
        n = self.log_tail_lines if lines is None else lines
        return "\n".join(self.log_text().splitlines()[-n:])

    def dump_log(self) -> None:
        print(
            f"\n===== {self.name} log (pid {self.proc.pid if self.proc else '-'}, "
            f"exit {self.returncode}) last {self.log_tail_lines} lines =====\n"
            f"$ {self.command_line}\n{self.tail()}\n===== end of {self.name} log =====",
            file=sys.stderr,
        )

    def _fail(self, cls: type[PeerError], what: str) -> PeerError:
        self.dump_log()
        return cls(
            f"{self.name}: {what}\n$ {self.command_line}\n--- last log lines ---\n{self.tail(40)}"
        )

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """Wait until ``pattern`` (multiline regex) matches the log after offset ``since``."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        return self.wait_until(
            lambda: regex.search(self.log_text(), since), timeout, f"no match for {regex.pattern!r}"
        )

    def wait_until(self, probe: Callable[[], _T | None], timeout: float, what: str) -> _T:
        """Poll ``probe`` until it returns something not None/False; fail if the peer dies."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.running()
            result = probe()
            if result is not None and result is not False:
                return result
            if self.fatal_re is not None and (bad := self.fatal_re.search(self.log_text())):
                raise self._fail(PeerError, f"fatal log line {bad[0]!r} while waiting: {what}")
            if not alive:
                code = self.proc.returncode if self.proc is not None else None
                raise self._fail(PeerExited, f"exited with {code} while waiting: {what}")
            if time.monotonic() > deadline:
                raise self._fail(PeerTimeout, f"timeout after {timeout} s: {what}")
            time.sleep(0.05)

    def send_stdin(self, data: bytes) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"{self.name} not started")
        self.proc.stdin.write(data)
        self.proc.stdin.flush()


# --------------------------------------------------------------------------- DPDK testpmd


@dataclasses.dataclass(frozen=True, slots=True)
class PortStats:
    """Totals from one testpmd "NIC statistics for port N" block (printed every second)."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int
    rx_pps: int
    tx_pps: int


_STATS_RE = re.compile(
    r"NIC statistics for port (?P<port>\d+)\s+#+\s*\n"
    r"\s*RX-packets:\s*(?P<rx_packets>\d+)\s+RX-missed:\s*(?P<rx_missed>\d+)\s+"
    r"RX-bytes:\s*(?P<rx_bytes>\d+)\s*\n"
    r"\s*RX-errors:\s*(?P<rx_errors>\d+)\s*\n"
    r"\s*RX-nombuf:\s*(?P<rx_nombuf>\d+)\s*\n"
    r"\s*TX-packets:\s*(?P<tx_packets>\d+)\s+TX-errors:\s*(?P<tx_errors>\d+)\s+"
    r"TX-bytes:\s*(?P<tx_bytes>\d+)\s*\n"
    r"\s*\n\s*Throughput \(since last show\)\s*\n"
    r"\s*Rx-pps:\s*(?P<rx_pps>\d+)\s+Rx-bps:\s*\d+\s*\n"
    r"\s*Tx-pps:\s*(?P<tx_pps>\d+)\s+Tx-bps:\s*\d+"
)


class _Testpmd(Peer):
    """dpdk-testpmd without a terminal: ``--auto-start --stats-period=1``, stdin a pipe.

    With ``--stats-period`` testpmd loops printing statistics until SIGINT/SIGTERM (it does
    not read stdin then, but we hold it open anyway: without a stats period it would exit
    on stdin EOF). SIGINT makes it print the forward statistics, close the port and exit 0.
    """

    stop_signal = signal.SIGINT
    # testpmd keeps running (and exits 0 later) when its vdev fails to probe.
    fatal_re = re.compile(
        r"^(?:testpmd: No probed ethernet devices|EAL: FATAL.*|EAL: Error - exiting.*"
        r"|vdev_probe\(\): failed to initialize .*)$",
        re.MULTILINE,
    )
    #: Extra EAL log options for the subclass (e.g. vhost debug).
    eal_log_levels: ClassVar[tuple[str, ...]] = ()
    prefix_tag: ClassVar[str] = "pmd"

    def __init__(
        self,
        vdev: str,
        *,
        forward_mode: str,
        cpu: int,
        txpkts: int | None,
        extra: Sequence[str],
        workdir: str | os.PathLike[str] | None,
    ) -> None:
        super().__init__(workdir=workdir)
        self.vdev = vdev
        self.forward_mode = forward_mode
        self.cpu = _pick_cpu(cpu)
        self.txpkts = txpkts
        self.extra = tuple(extra)
        # Unique per instance: EAL refuses a second primary process with the same prefix.
        self.file_prefix = f"vhu{os.getpid()}x{next(_prefix_counter)}{self.prefix_tag}"

    def argv(self) -> list[str]:
        binary = shutil.which("dpdk-testpmd") or "dpdk-testpmd"
        c = self.cpu
        eal = [
            binary,
            "--no-pci",
            "--lcores",
            f"0@{c},1@{c}",
            "--file-prefix",
            self.file_prefix,
            "--no-huge",
            "-m",
            "256",
            "--no-shconf",
        ]
        for level in self.eal_log_levels:
            eal.append(f"--log-level={level}")
        eal += ["--vdev", self.vdev]
        app = [
            "--nb-cores=1",
            "--total-num-mbufs=16384",
            f"--forward-mode={self.forward_mode}",
            "--stats-period=1",
            "--auto-start",
        ]
        if self.txpkts is not None:
            app.append(f"--txpkts={self.txpkts}")
        return [*eal, "--", *app, *self.extra]

    def _before_start(self) -> None:
        self._cleanup_dirs.append(_dpdk_runtime_dir(self.file_prefix))

    def started(self, timeout: float = 15.0) -> None:
        """Wait until forwarding has started (the port is configured and probed)."""
        self.wait_for(r"^Logical Core \d+ \(socket \d+\) forwards packets", timeout)

    def port_stats(self, port: int = 0) -> PortStats | None:
        """The most recent periodic statistics of ``port`` or None before the first print."""
        last: re.Match[str] | None = None
        for m in _STATS_RE.finditer(self.log_text()):
            if int(m["port"]) == port:
                last = m
        if last is None:
            return None
        return PortStats(**{k: int(v) for k, v in last.groupdict().items()})

    def wait_stats(
        self, predicate: Callable[[PortStats], bool], timeout: float = 10.0, port: int = 0
    ) -> PortStats:
        """Wait for periodic statistics of ``port`` that satisfy ``predicate``."""

        def probe() -> PortStats | None:
            s = self.port_stats(port)
            return s if s is not None and predicate(s) else None

        return self.wait_until(
            probe,
            timeout,
            f"port {port} statistics matching predicate (last: {self.port_stats(port)})",
        )


class TestpmdVirtioUser(_Testpmd):
    """DPDK virtio-user front-end (no VM) driving a vhost-user back-end at ``sock_path``.

    ``server=True``: virtio-user listens at ``sock_path`` and its probe *blocks* until a
    back-end connects, so nothing (not even the EAL banner after the probe) appears before.
    ``server=False``: the back-end must already listen, else the port probe fails.

    Link state comes from the virtio PMD's init log (``pmd.net.virtio.init:debug``):
    ``virtio_dev_link_update(): Port 0 is up`` / ``... is down``.
    """

    __test__ = False  # not a pytest test class despite the name
    name = "testpmd-virtio-user"
    prefix_tag = "fe"
    eal_log_levels = ("pmd.net.virtio.init:debug",)
    LINK_RE = re.compile(r"virtio_dev_link_update\(\): Port (\d+) is (up|down)")

    def __init__(
        self,
        sock_path: str | os.PathLike[str],
        *,
        queues: int = 1,
        packed: bool = False,
        mrg_rxbuf: bool | None = None,
        server: bool = False,
        forward_mode: str = "rxonly",
        txpkts: int = 64,
        cpu: int = 0,
        extra: Sequence[str] = (),
        queue_size: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.sock_path = Path(sock_path)
        vdev = f"net_virtio_user0,path={self.sock_path},queues={queues}"
        if packed:
            vdev += ",packed_vq=1"
        if mrg_rxbuf is not None:
            vdev += f",mrg_rxbuf={int(mrg_rxbuf)}"
        if server:
            vdev += ",server=1"
        if queue_size is not None:
            vdev += f",queue_size={queue_size}"
        self.server = server
        super().__init__(
            vdev, forward_mode=forward_mode, cpu=cpu, txpkts=txpkts, extra=extra, workdir=workdir
        )
        if server:
            self._cleanup_paths.append(self.sock_path)

    def link_state(self, port: int = 0) -> bool | None:
        """Last link state virtio reported for ``port`` (None: not reported yet)."""
        state: bool | None = None
        for m in self.LINK_RE.finditer(self.log_text()):
            if int(m[1]) == port:
                state = m[2] == "up"
        return state

    def link_up(self, port: int = 0) -> bool:
        return self.link_state(port) is True

    def wait_link_up(self, timeout: float = 15.0, port: int = 0) -> None:
        self.wait_until(lambda: self.link_up(port), timeout, f"virtio-user port {port} link up")


class TestpmdVhost(_Testpmd):
    """DPDK vhost PMD (net_vhost) back-end at ``sock_path`` with the vhost config debug log.

    Observed DPDK 22.11 lines (each prefixed ``VHOST_CONFIG: (<sock>) ``):
    ``read message VHOST_USER_<NAME>`` for every front-end request,
    ``negotiated Virtio features: 0x...``, ``negotiated Vhost-user protocol features: 0x...``,
    ``set queue enable: <0|1> to qp idx: <vring>``,
    ``virtio is now ready for processing.`` once every ring of the device is ready,
    ``vhost peer closed`` when the front-end disconnects.
    The PMD's own INFO log (``pmd.net.vhost:info``) adds ``Vhost device <vid> created`` /
    ``... destroyed`` and ``vring<N> is enabled|disabled``; testpmd itself prints
    ``Port 0: link state change event`` and ``Port 0: queue state event``.
    """

    __test__ = False
    name = "testpmd-vhost"
    prefix_tag = "be"
    eal_log_levels = ("lib.vhost.config:debug", "pmd.net.vhost:info")
    MESSAGE_RE = re.compile(r"read message VHOST_USER_(\w+)")
    READY_RE = re.compile(r"virtio is now ready for processing\.")
    CLOSED_RE = re.compile(r"vhost peer closed")
    ENABLE_RE = re.compile(r"set queue enable: (\d+) to qp idx: (\d+)")
    FEATURES_RE = re.compile(r"negotiated Virtio features: (0x[0-9a-fA-F]+)")
    PROTOCOL_RE = re.compile(r"negotiated Vhost-user protocol features: (0x[0-9a-fA-F]+)")
    CREATED_RE = re.compile(r"Vhost device (\d+) (created|destroyed)")

    def __init__(
        self,
        sock_path: str | os.PathLike[str],
        *,
        queues: int = 1,
        client: bool = False,
        forward_mode: str = "io",
        cpu: int = 1,
        extra: Sequence[str] = (),
        txpkts: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.sock_path = Path(sock_path)
        self.queues = queues
        vdev = f"net_vhost0,iface={self.sock_path},queues={queues}"
        if client:
            vdev += ",client=1"
        self.client = client
        super().__init__(
            vdev, forward_mode=forward_mode, cpu=cpu, txpkts=txpkts, extra=extra, workdir=workdir
        )
        if not client:
            self._cleanup_paths.append(self.sock_path)

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Server mode: wait until the socket is bound (front-ends may connect then)."""
        self.wait_for(r"vhost-user server: socket created|binding succeeded", timeout)
        wait_for_socket(self.sock_path, timeout)

    def messages(self, since: int = 0) -> list[str]:
        """Front-end requests received so far, in order, without the ``VHOST_USER_`` prefix."""
        return self.MESSAGE_RE.findall(self.log_text(), since)

    def negotiated_features(self) -> int | None:
        found = self.FEATURES_RE.findall(self.log_text())
        return int(found[-1], 16) if found else None

    def negotiated_protocol_features(self) -> int | None:
        found = self.PROTOCOL_RE.findall(self.log_text())
        return int(found[-1], 16) if found else None

    def ring_enabled(self) -> dict[int, bool]:
        """Last SET_VRING_ENABLE state per vring index."""
        state: dict[int, bool] = {}
        for m in self.ENABLE_RE.finditer(self.log_text()):
            state[int(m[2])] = m[1] == "1"
        return state

    def ready(self) -> bool:
        """The device is up: "virtio is now ready" seen after the last peer close/destroy."""
        text = self.log_text()
        ready = [m.end() for m in self.READY_RE.finditer(text)]
        down = [m.end() for m in self.CLOSED_RE.finditer(text)]
        down += [m.end() for m in self.CREATED_RE.finditer(text) if m[2] == "destroyed"]
        return bool(ready) and max(ready) > max(down, default=-1)

    def rings_ready(self, queues: int | None = None) -> bool:
        """Device ready and all 2*queues vrings enabled."""
        n = self.queues if queues is None else queues
        enabled = self.ring_enabled()
        return self.ready() and all(enabled.get(i, False) for i in range(2 * n))

    def wait_ready(self, timeout: float = 15.0, queues: int | None = None) -> None:
        self.wait_until(
            lambda: self.rings_ready(queues), timeout, "vhost device ready with all rings enabled"
        )

    link_up = ready


# --------------------------------------------------------------------------- QEMU


class QmpClient:
    """Minimal synchronous QMP client over a unix socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(os.fspath(path))
            self._file = self._sock.makefile("rwb")
        except BaseException:
            self._sock.close()
            raise
        try:
            self.greeting = self._read()
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise PeerError(f"QMP {command}: {msg['error']}")
            elif "return" in msg:
                return msg["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuVhostUserNet(Peer):
    """qemu-system-x86_64 (q35, TCG) with a vhost-user virtio-net-pci at ``sock_path``.

    Guest RAM is a shared memfd; ``vectors=0`` (MSI-X under TCG crashes QEMU 7.2);
    ``romfile=`` (no iPXE). The serial console goes to stdout, i.e. the log. A QMP socket
    in the work directory serves :meth:`qmp` and a clean ``quit`` on stop.

    Without ``kernel`` the firmware finds nothing to boot and no driver touches the device:
    QEMU only does the realize-time handshake (observed: GET_FEATURES, GET_PROTOCOL_FEATURES,
    SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_SLAVE_REQ_FD, SET_OWNER, GET_FEATURES, then per
    vring SET_VRING_CALL + SET_VRING_ERR, then SET_VRING_ENABLE 1 per vring; no memory table).
    ``server=True`` adds ``server=on,wait=off``: QEMU listens at ``sock_path`` but machine
    start-up still waits for a back-end to connect.
    """

    name = "qemu"

    def __init__(
        self,
        sock_path: str | os.PathLike[str],
        *,
        server: bool = False,
        reconnect: int | None = None,
        queues: int = 1,
        mem_mb: int = 256,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        append: str = "",
        mac: str = "52:54:00:00:00:01",
        extra: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir=workdir)
        self.sock_path = Path(sock_path)
        self.server = server
        self.reconnect = reconnect
        self.queues = queues
        self.mem_mb = mem_mb
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.mac = mac
        self.extra = tuple(extra)
        self._qmp: QmpClient | None = None
        if server:
            self._cleanup_paths.append(self.sock_path)

    @property
    def qmp_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "qmp.sock"

    def _before_start(self) -> None:
        self._cleanup_paths.append(self.qmp_path)

    def argv(self) -> list[str]:
        m = self.mem_mb
        chardev = f"socket,id=c0,path={self.sock_path}"
        if self.server:
            chardev += ",server=on,wait=off"
        if self.reconnect is not None:
            chardev += f",reconnect={self.reconnect}"
        netdev = "vhost-user,id=n0,chardev=c0"
        device = f"virtio-net-pci,netdev=n0,mac={self.mac},romfile=,vectors=0"
        if self.queues > 1:
            netdev += f",queues={self.queues}"
            device += ",mq=on"
        argv = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            f"{m}M",
            "-object",
            f"memory-backend-memfd,id=mem,size={m}M,share=on",
            "-numa",
            "node,memdev=mem",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev",
            chardev,
            "-netdev",
            netdev,
            "-device",
            device,
        ]
        if self.kernel is not None:
            argv += ["-no-reboot", "-kernel", os.fspath(self.kernel)]
            if self.initrd is not None:
                argv += ["-initrd", os.fspath(self.initrd)]
            argv += ["-append", self.append or "console=ttyS0 panic=-1 quiet"]
        return [*argv, *self.extra]

    def qmp(self, timeout: float = 10.0) -> QmpClient:
        """A connected QMP client (kept open until stop)."""
        if self._qmp is None:
            path = self.qmp_path
            self.wait_until(lambda: _is_socket(path), timeout, f"QMP socket {path}")
            self._qmp = QmpClient(path, timeout=timeout)
        return self._qmp

    def _request_stop(self) -> None:
        try:
            if self._qmp is None and not _is_socket(self.qmp_path):
                raise FileNotFoundError(self.qmp_path)
            self.qmp(timeout=3.0).execute("quit")
        except (OSError, EOFError, ValueError, PeerError):
            assert self.proc is not None
            self.proc.terminate()

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None


# --------------------------------------------------------------------------- qsd


class QemuStorageDaemon(Peer):
    """qemu-storage-daemon exporting ``image_path`` (raw) as vhost-user-blk at ``sock_path``.

    It prints nothing when healthy; readiness is the socket appearing (:meth:`wait_ready`).
    SIGTERM makes it exit cleanly and remove the socket.
    """

    name = "qsd"

    def __init__(
        self,
        sock_path: str | os.PathLike[str],
        image_path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        writable: bool = True,
        logical_block_size: int = 512,
        extra: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir=workdir)
        self.sock_path = Path(sock_path)
        self.image_path = Path(image_path)
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.extra = tuple(extra)
        self._cleanup_paths.append(self.sock_path)

    def argv(self) -> list[str]:
        export = (
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={self.sock_path},writable={'on' if self.writable else 'off'},"
            f"num-queues={self.num_queues},logical-block-size={self.logical_block_size}"
        )
        return [
            shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image_path},cache.direct=off",
            "--export",
            export,
            *self.extra,
        ]

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.wait_until(
            lambda: _is_socket(self.sock_path), timeout, f"vhost-user-blk socket {self.sock_path}"
        )
