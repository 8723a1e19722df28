"""Describe the machine a benchmark ran on (CPU model, cores, load, Python, kernel)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """One line naming the CPU, usable cores, load average, kernel and Python."""
    load = os.getloadavg()
    return (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, "
        f"load {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, Linux {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


if __name__ == "__main__":
    print(describe_machine())
