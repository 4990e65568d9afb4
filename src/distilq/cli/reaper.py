"""Stop helper processes when the process that started them dies, however it dies.

`distilq quantize` and `distilq score` start Prefect's ephemeral API server, a `uvicorn`
subprocess that Prefect stops at a normal exit. A run killed with SIGKILL (or SIGTERM,
which skips exit handlers) leaves it running, holding a port and ~200 MiB. The reaper is
a small process of its own session that reads a pipe only the run writes to: when the run
ends, by any means, the kernel closes the pipe, and the reaper stops what it was told to
guard. Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


class Reaper:
    """A reaper process watching this one; `guard` names a process for it to stop after us."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "distilq.cli.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the run's process group does not reach it
        )

    def guard(self, marker: str) -> None:
        """Stop, once this process has ended, every process whose command line contains
        `marker`. Said before that process starts, so no kill can fall in between."""
        assert self._process.stdin is not None
        self._process.stdin.write(f"{marker}\n".encode())
        self._process.stdin.flush()


def _command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def stop(pid: int, marker: str, grace: float = 5.0) -> None:
    """SIGTERM `pid` if it still runs the command marked by `marker`; SIGKILL after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if marker not in (_command_line(pid) or ""):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and marker in (_command_line(pid) or ""):
            time.sleep(0.1)


def _pids_running(marker: str) -> list[int]:
    """Processes (not this one) whose command line contains `marker`."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    return [pid for pid in pids if marker in (_command_line(pid) or "")]


def main() -> None:
    """Read marker lines until the watched process closes the pipe, then stop every
    process whose command line contains one."""
    markers = [line.decode().strip() for line in sys.stdin.buffer]  # ends with every writer
    for marker in filter(None, markers):
        for pid in _pids_running(marker):
            stop(pid, marker)


if __name__ == "__main__":
    main()
