"""Process-wide settings, made by the entry points that own a process (the CLI, a worker
starting a shard, deployments/serve.py), never by importing a module. This module never
imports Prefect or torch itself."""

import os

# How long a run waits for its temporary API (Prefect's setting; the CLI reads it too).
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_DEFAULTS = {
    # The ephemeral API can take 30 s or more to start the first time on a fresh machine;
    # Prefect's default wait is 20 s.
    STARTUP_TIMEOUT: "180",
    # No analytics leave the machine (server and client side).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # distilq's own log lines show up in Prefect's run logs, and stay local (no warning)
    # when the library is used outside a flow run.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "distilq",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def set_prefect_defaults() -> None:
    """Set distilq's Prefect defaults in the environment; values the user set win."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def configure_logging() -> None:
    """distilq's progress notes (INFO) go to the console and the run logs."""
    import logging

    logging.getLogger("distilq").setLevel(logging.INFO)


def configure_worker(threads: int) -> None:
    """A scoring worker's torch threads (workers x threads stay within the cores given)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
