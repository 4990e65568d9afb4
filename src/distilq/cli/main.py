"""The `distilq` command line: maps flags to configs and runs flows or registry operations.

Flags, their defaults and their help come from the config models (`distilq.config`), the
one source of both. Exit codes: 0 success (promoted, or a dry run that passed), 1 any other
failure, 2 bad usage or input, 3 rejected by the gate, unattested on this platform, or a
scoring run's FP32 audit that failed (evidence the version is below its bar).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distilq import __version__
from distilq.cli import models, quantize, score
from distilq.cli.api import EphemeralApi
from distilq.cli.output import EXIT_FAILED, EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from distilq.errors import DistilqError, InputError, Unattested

log = logging.getLogger("distilq")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="distilq",
        description="Validated INT8 sentiment classifiers and their registry, on CPU.",
    )
    parser.add_argument("--version", action="version", version=f"distilq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (quantize, score, models):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distilq` console script; it owns the process's settings."""
    from distilq.runtime import configure_logging, set_prefect_defaults

    args = build_parser().parse_args(argv)
    set_prefect_defaults()  # before prefect is imported
    configure_logging()
    api = EphemeralApi()
    try:
        if args.command == "quantize":
            api.start()  # first: its start-up overlaps all that follows
            return quantize.cmd_quantize(args, api)
        if args.command == "score":
            api.start()
            return score.cmd_score(args, api)
        return models.cmd_models(args)
    except InputError as e:
        print(f"distilq: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Unattested as e:
        print(f"distilq: {e}", file=sys.stderr)
        return EXIT_REJECTED
    except DistilqError as e:
        print(f"distilq: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader stopped (`| head`): not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:  # the machine said no (a full disk, a read-only mount): one line
        print(f"distilq: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        api.stop()
