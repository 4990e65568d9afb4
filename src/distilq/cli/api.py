"""The Prefect side of the command line: a temporary local API server for one run, and
Prefect's console tracebacks kept to the run logs. The library never imports this module.

It relies on Prefect details that are not public API (listed in PREFECT_DETAILS, checked by
tests/test_house.py), so pyproject.toml pins Prefect's minor version.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from distilq.errors import DistilqError
from distilq.runtime import STARTUP_TIMEOUT

log = logging.getLogger("distilq")

# Prefect details distilq relies on that are not its public API: pyproject.toml pins the
# minor version they hold for, and tests/test_house.py checks each against the installed one.
# The server's environment, as Prefect's SubprocessASGIServer sets it (no UI, an ephemeral
# server's services), less block-type registration: a third of the server's start-up,
# checked at every start, for block types only a UI or a long-lived server's users look up.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
}
# The settings those variables must reach (the other two are read by the server's module).
SERVER_SETTINGS = {
    "PREFECT_UI_ENABLED": "server.ui.enabled",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "server.register_blocks_on_start",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "server.memoize_block_auto_registration",
    STARTUP_TIMEOUT: "server.ephemeral.startup_timeout_seconds",
}
SERVER_APP = "prefect.server.api.server:create_app"
PREFECT_CALLABLES = (
    SERVER_APP,
    "prefect.context:refresh_global_settings_context",
    "prefect.logging.handlers:APILogWorker.drain_all",
    "prefect.events.worker:EventsWorker.drain_all",
    "prefect.logging.handlers:PrefectConsoleHandler",
)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out its traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record) + " (traceback: run logs, or --verbose)"
        finally:
            record.exc_info, record.exc_text = saved


def console_tracebacks(show: bool) -> None:
    """Prefect prints a failed step's traceback on the console, ahead of distilq's one-line
    message. Keep it in the run's logs (sent to the API by another handler) and, unless
    --verbose, off the console."""
    if show:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


class EphemeralApi:
    """Prefect's temporary local API server for one `distilq` run, started before anything
    else so that its start-up (several seconds of its own CPU) overlaps the run's imports,
    checks and model load.

    It is the server Prefect would start (the same `uvicorn` command and environment), but
    launched without importing `prefect.server` here (2.5 s of the run's own CPU) and only
    when the user has named no API: with PREFECT_API_URL in the environment nothing starts,
    and one named in a Prefect profile wins over this server, which is then stopped. A
    thread waits for it to answer and warms it up (its first queries are slow) while the run
    goes on. A reaper stops the server if this process dies without stopping it (SIGKILL).
    """

    PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self._ready: threading.Thread | None = None
        self._problem: str | None = None  # why the server never answered
        self._reaper = None

    def start(self) -> None:
        """Launch the server unless an API is named in the environment; do not wait."""
        if os.environ.get("PREFECT_API_URL"):
            return
        self._launch()
        self._ready = threading.Thread(target=self._wait_ready, name="prefect-api", daemon=True)
        self._ready.start()

    def _launch(self) -> None:
        from distilq.cli.reaper import Reaper

        self._reaper = self._reaper or Reaper()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefect_dir = importlib.util.find_spec("prefect").submodule_search_locations[0]
        env = {**os.environ, **SERVER_ENV}
        serve = ["--factory", SERVER_APP, "--host", "127.0.0.1", "--port", str(port)]
        self._reaper.guard(" ".join(serve))  # this port's server, before it exists
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect_dir).parent),
             *serve, "--log-level", "error", "--lifespan", "on"],
            env=env,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/api"

    def _wait_ready(self) -> None:
        """Until the server answers (relaunched on another port if its port was taken),
        then the queries a flow run's start makes, so that they find it warm."""
        import httpx

        timeout = float(os.environ.get(STARTUP_TIMEOUT, "20"))
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=timeout) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == self.PORT_IN_USE:  # another process took the port meanwhile
                    self._launch()
                elif code is not None:
                    self._problem = f"exited with code {code} before answering (see above)"
                    return
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"{self.url}/admin/version")
                            client.post(f"{self.url}/flows/filter", json={"limit": 1})
                            client.post(f"{self.url}/flow_runs/filter", json={"limit": 1})
                        return
                time.sleep(0.05)
        self._problem = f"did not answer within {timeout:.0f} s ({STARTUP_TIMEOUT})"

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a flow run: point Prefect at this server once it answers (unless the user
        named another API), deliver the run's last logs and events, then stop the server,
        so that its closing lines come before distilq's own last line."""
        from prefect.context import refresh_global_settings_context
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_UI_URL,
            get_current_settings,
            temporary_settings,
        )

        settings = get_current_settings()
        if self.process is None or settings.api.url or not settings.server.ephemeral.enabled:
            self.stop()  # the user named an API, or wants no temporary one: Prefect decides
            yield
            return
        self._ready.join()
        if self._problem:
            self.stop()
            raise DistilqError(f"the temporary Prefect API server {self._problem}")
        log.info("temporary Prefect API on %s (PREFECT_API_URL names a lasting one)", self.url)
        # No "View at" links (this server has no UI) and no heartbeats (they tell a lasting
        # server that a run died; this one dies with the run).
        updates = {
            PREFECT_API_URL: self.url,
            PREFECT_UI_URL: "",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        }
        # For worker processes this run starts, and for Prefect's own threads (its process
        # pool forwards its workers' logs and events from one), which read the global
        # settings, not this thread's temporary ones.
        os.environ["PREFECT_API_URL"] = self.url
        refresh_global_settings_context()
        try:
            with temporary_settings(updates=updates):
                try:
                    yield
                finally:  # a failed run's last lines matter most
                    from prefect.events.worker import EventsWorker
                    from prefect.logging.handlers import APILogWorker

                    APILogWorker.drain_all(timeout=30)
                    EventsWorker.drain_all(timeout=30)
        finally:
            del os.environ["PREFECT_API_URL"]
            refresh_global_settings_context()
            self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
