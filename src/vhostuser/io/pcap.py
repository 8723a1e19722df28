"""Frame capture into pcap files that tcpdump, tshark and Wireshark read.

:class:`PcapWriter` takes frames from the data path (:meth:`PcapWriter.capture` copies at
most ``snaplen`` bytes and returns at once) and writes them from a thread of its own, so a
slow disk never holds up forwarding. The queue between the two is bounded: when it is full,
frames are counted as dropped rather than waited for (``captured`` + ``dropped`` = frames
offered). The file format is classic pcap (LINKTYPE_ETHERNET, microsecond timestamps),
which every capture tool reads.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
import time
from typing import Any

__all__ = ["PcapWriter", "read_pcap"]

_MAGIC = 0xA1B2C3D4  # microsecond timestamps
_LINKTYPE_ETHERNET = 1
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class PcapWriter:
    """One pcap file fed from the data path (see the module docstring).

    Args:
        path: the file to create (replaced if it exists).
        snaplen: most bytes kept of each frame.
        queue_frames: frames waiting to be written before new ones are dropped.

    Raises:
        OSError: the file cannot be created.
        ValueError: ``snaplen`` or ``queue_frames`` below 1.
    """

    def __init__(self, path: str | os.PathLike[str], *, snaplen: int = 65535,
                 queue_frames: int = 65536) -> None:
        if snaplen < 1 or queue_frames < 1:
            raise ValueError(f"pcap: snaplen {snaplen} and queue_frames {queue_frames} must "
                             "be at least 1")
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self.queue_frames = queue_frames
        self.captured = 0
        """Frames accepted for writing."""
        self.dropped = 0
        """Frames refused because the queue was full (the writer fell behind)."""
        self.written = 0
        """Frames in the file so far."""
        self.error: str | None = None
        """Why writing stopped (a full disk...); frames are counted as dropped after it."""
        self._queue: collections.deque[tuple[float, bytes, int]] = collections.deque()
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close()
        self._file.write(_GLOBAL.pack(_MAGIC, 2, 4, 0, 0, snaplen, _LINKTYPE_ETHERNET))
        self._file.flush()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pcap {self.path}",
                                        daemon=True)
        self._thread.start()

    def capture(self, frame: Any, when: float | None = None) -> None:
        """Queue a copy of ``frame`` (bytes-like) stamped ``when`` (default: now)."""
        if self.error is not None or len(self._queue) >= self.queue_frames:
            self.dropped += 1
            return
        n = len(frame)
        data = bytes(frame[: self.snaplen]) if n > self.snaplen else bytes(frame)
        self._queue.append((time.time() if when is None else when, data, n))
        self.captured += 1

    def _run(self) -> None:
        q = self._queue
        while True:
            stopping = self._stop.is_set()
            batch: list[bytes] = []
            while q and len(batch) < 4096:
                when, data, orig = q.popleft()
                sec = int(when)
                batch.append(_RECORD.pack(sec, int((when - sec) * 1e6), len(data), orig))
                batch.append(data)
            if batch:
                try:
                    self._file.write(b"".join(batch))
                    self._file.flush()
                    self.written += len(batch) // 2
                except OSError as e:
                    self.error = f"writing {self.path} failed: {e.strerror or e}"
                    self.dropped += len(batch) // 2 + len(q)
                    self.captured -= len(batch) // 2 + len(q)
                    q.clear()
                    return
                continue
            if stopping:
                return
            self._stop.wait(0.02)

    def close(self) -> None:
        """Write what is queued, then close the file. Idempotent."""
        if self._file.closed:
            return
        self._stop.set()
        self._thread.join()
        self._file.close()

    def counters(self) -> dict[str, Any]:
        """``captured``, ``dropped``, ``written`` and ``file`` (and ``error`` if any)."""
        out: dict[str, Any] = {"file": self.path, "captured": self.captured,
                               "dropped": self.dropped, "written": self.written}
        if self.error is not None:
            out["error"] = self.error
        return out


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[float, bytes]]:
    """The frames of a classic pcap file as ``(timestamp, bytes)`` (tests and tools).

    Raises:
        ValueError: not a little-endian microsecond pcap file, or truncated.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _GLOBAL.size or _GLOBAL.unpack_from(data)[0] != _MAGIC:
        raise ValueError(f"{os.fspath(path)}: not a pcap file written by PcapWriter")
    out: list[tuple[float, bytes]] = []
    pos = _GLOBAL.size
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise ValueError(f"{os.fspath(path)}: truncated record header at {pos}")
        sec, usec, incl, _orig = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + incl > len(data):
            raise ValueError(f"{os.fspath(path)}: truncated record at {pos}")
        out.append((sec + usec / 1e6, data[pos:pos + incl]))
        pos += incl
    return out
