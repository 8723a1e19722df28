"""Run someone's vhost-user back-end as a child process, for the conformance checks.

:class:`BackendProcess` takes a command line with ``{socket}`` where the back-end's
listening socket goes (``dpdk-testpmd ... --vdev 'net_vhost0,iface={socket}'``), splits it
with :func:`shlex.split`, substitutes a socket path in a fresh directory under /tmp and
starts it:

* in its own session (so a stop reaches any children it forks),
* with stdin a pipe that stays open until the stop (DPDK testpmd quits at EOF on stdin),
* with stdout and stderr appended to ``backend.log`` in the work directory,

then waits until the socket appears. It can tell whether the process died (and with what
status), kill it the way a crash would (SIGKILL) and start it again on the same socket (for
reconnection and inflight-recovery checks), count its open fds and mappings through
``/proc`` (for leak checks), and stop it: SIGTERM, then SIGKILL after a grace period.

Raises (from :meth:`BackendProcess.start`): :class:`BackendStartError` when the command
cannot be run, exits, or does not create its socket in time.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["SOCKET_PLACEHOLDER", "BackendProcess", "BackendStartError", "split_command"]

SOCKET_PLACEHOLDER = "{socket}"
"""Where the back-end's socket path goes in the command line."""

_POLL = 0.02


class BackendStartError(RuntimeError):
    """The back-end could not be started (the message says why and quotes its log)."""


def split_command(command: str) -> list[str]:
    """Split ``command`` as a shell would (without running one) and check it names
    ``{socket}``.

    Raises:
        ValueError: the command is empty, cannot be split (an unclosed quote), or has no
            ``{socket}`` placeholder.
    """
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"cannot split the back-end command {command!r}: {e}") from None
    if not argv:
        raise ValueError("the back-end command is empty")
    if not any(SOCKET_PLACEHOLDER in a for a in argv):
        raise ValueError(
            f"the back-end command {command!r} has no {SOCKET_PLACEHOLDER} placeholder "
            "(where the back-end must listen)"
        )
    return argv


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class BackendProcess:
    """One back-end command, started on a socket in its own work directory.

    Args:
        command: the command line, with ``{socket}`` (see the module docstring).
        workdir: directory for the socket and the log (default: a fresh /tmp directory,
            removed by :meth:`close`; a given one is kept).
        start_timeout: seconds to wait for the socket after each start.
        stop_timeout: seconds between SIGTERM and SIGKILL.
        socket_name: file name of the socket in the work directory.

    Raises:
        ValueError: the command is malformed (see :func:`split_command`).
    """

    def __init__(self, command: str, *, workdir: str | os.PathLike[str] | None = None,
                 start_timeout: float = 30.0, stop_timeout: float = 10.0,
                 socket_name: str = "vhost.sock") -> None:
        self.command = command
        self._template = split_command(command)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="vhu-check-", dir="/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(self.workdir / socket_name)
        self.log_path = self.workdir / "backend.log"
        self.argv = [a.replace(SOCKET_PLACEHOLDER, self.socket_path) for a in self._template]
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """How many times the command was started."""
        self.start_failures = 0
        """Starts in a row that failed (reset by a successful one)."""
        self.deaths: list[int] = []
        """Exit statuses of earlier runs that ended without our stop (crashes, exits)."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> BackendProcess:
        """Start the command and wait for its socket; returns self.

        A socket file left by an earlier run (killed) is removed first.

        Raises:
            BackendStartError: the command is not found or not executable, exited before
                its socket appeared, or did not create it within ``start_timeout``.
        """
        if self.running():
            raise BackendStartError(f"{self.argv[0]} is already running (pid {self.pid})")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"=== start {self.starts + 1}: {shlex.join(self.argv)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.workdir, start_new_session=True)
        except OSError as e:
            self.start_failures += 1
            raise BackendStartError(f"cannot run {self.argv[0]!r}: {e.strerror}") from None
        self.starts += 1
        self.start_failures += 1
        deadline = time.monotonic() + self.start_timeout
        while not _is_socket(self.socket_path):
            if not self.running():
                status = self.exit_status()
                self._reap()
                raise BackendStartError(
                    f"{self.argv[0]} exited with status {status} before creating its socket "
                    f"{self.socket_path}\n--- log ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendStartError(
                    f"{self.argv[0]} did not create its socket {self.socket_path} within "
                    f"{self.start_timeout:g} s\n--- log ---\n{self.log_tail()}")
            time.sleep(_POLL)
        self.start_failures = 0
        return self

    def running(self) -> bool:
        """True while the process started last is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """Process id of the current run.

        Raises:
            RuntimeError: never started.
        """
        if self.proc is None:
            raise RuntimeError("the back-end was never started")
        return self.proc.pid

    def exit_status(self) -> int | None:
        """The current run's exit status (negative: killed by that signal); None while it
        runs or before any start."""
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> str | None:
        """None while the back-end runs; else one line saying how it ended (and it is
        noted in :attr:`deaths`)."""
        if self.running():
            return None
        status = self.exit_status()
        if self.proc is not None and status is not None:
            self.deaths.append(status)
            self._reap()
        return f"the back-end process is gone ({describe_status(status)})"

    def wait_dead(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to end (a back-end that is crashing may
        take a moment); True if it is not running."""
        if self.proc is None:
            return True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        return not self.running()

    def kill(self) -> None:
        """SIGKILL the process group, as a crash would, and reap it. The socket file stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=self.stop_timeout)
        self._reap()

    def restart(self, *, crash: bool = True) -> BackendProcess:
        """Stop (``crash``: SIGKILL at once, else :meth:`stop`) and start again on the same
        socket.

        Raises:
            BackendStartError: as :meth:`start`.
        """
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after ``stop_timeout``; reap it, close its
        stdin. Idempotent. Returns the exit status of the run (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        status = proc.returncode
        self._reap()
        return status

    def _reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:  # only reached from kill() when SIGKILL did not take
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def close(self) -> None:
        """Stop the process and remove the work directory if we created it."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- observation ----------------------------------------------------------------------
    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the back-end's output."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def fd_count(self) -> int | None:
        """Open fds of the process (``/proc/PID/fd``), None when it cannot be read."""
        if not self.running():
            return None
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def map_count(self) -> int | None:
        """Shared memory mappings of the process (``/proc/PID/maps`` lines with ``s`` in
        their permissions: guest memory, log and inflight areas), None when unreadable."""
        if not self.running():
            return None
        try:
            with open(f"/proc/{self.pid}/maps", "rb") as f:
                return sum(1 for line in f if _shared(line))
        except OSError:
            return None

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<BackendProcess {self.argv[0]} {state} socket={self.socket_path}>"


def _shared(line: bytes) -> bool:
    parts = line.split(maxsplit=2)
    return len(parts) > 1 and parts[1].endswith(b"s")


def describe_status(status: int | None) -> str:
    """``exit status 3`` / ``killed by SIGSEGV`` / ``status unknown``."""
    if status is None:
        return "status unknown"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}"
    return f"exit status {status}"
