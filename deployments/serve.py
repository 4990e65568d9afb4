"""Serve distilq's deployments from one long-lived process: one machine, no work pool.

    DISTILQ_WORKDIR=/srv/distilq python deployments/serve.py

The deployments (names, schedules, parameters, triggers) are read from prefect.yaml beside
this file, so serving and `prefect deploy` never drift apart. Flow runs execute in this
process's machine, in DISTILQ_WORKDIR (default: the current directory), where relative
paths in the parameters resolve. Stop with Ctrl-C; the API is PREFECT_API_URL's server
(or an ephemeral one when it is unset, which lives only as long as this process).
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import yaml

from distilq.runtime import configure_logging, set_prefect_defaults

PREFECT_FILE = Path(__file__).with_name("prefect.yaml")


def load_deployments(prefect_file: Path = PREFECT_FILE) -> list:
    """Runner deployments for every deployment declared in `prefect_file`."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    spec = yaml.safe_load(prefect_file.read_text())
    deployments = []
    for entry in spec["deployments"]:
        module, name = entry["entrypoint"].rsplit(".", 1)
        flow = getattr(importlib.import_module(module), name)
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in entry.get("schedules", [])
        ]
        triggers = [
            DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
            for t in entry.get("triggers", [])
        ]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters"),
                schedules=schedules or None,
                triggers=triggers or None,
                # Runs import the installed flows, whatever directory they start in.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE)
    args = parser.parse_args()
    set_prefect_defaults()  # this process owns its settings: before prefect is imported
    configure_logging()
    deployments = load_deployments(args.prefect_file)
    os.chdir(os.environ.get("DISTILQ_WORKDIR", "."))

    from prefect import serve

    serve(*deployments)


if __name__ == "__main__":
    main()
