"""`distilq quantize`: runs the `quantize_and_promote` flow and prints its outcome."""

from __future__ import annotations

import argparse
import sys

from distilq.cli.api import EphemeralApi, console_tracebacks
from distilq.cli.flags import add_flow_command, config_from
from distilq.cli.output import EXIT_OK, EXIT_REJECTED, agreement_line, print_json
from distilq.config.quantize import QuantizeConfig
from distilq.errors import GateRejected
from distilq.recipes import recipes_help

SUMMARY = "quantize, validate, publish and promote a checkpoint"
QUANTIZE_HELP = f"""\
Quantize a sentiment classifier to INT8, measure its agreement with FP32 on a validation
set, publish it to the registry and promote it to `production` if the gate passes.
Runs the Prefect flow `quantize_and_promote` on an ephemeral local API (or on the server
named by PREFECT_API_URL).

recipes:
{recipes_help()}

exit codes: 0 promoted (or dry run passed), 3 rejected by the gate, 2 bad usage or input,
1 any other failure.
"""


def add_parser(commands) -> None:
    """The `quantize` command."""
    add_flow_command(commands, "quantize", QuantizeConfig, SUMMARY, QUANTIZE_HELP, "manifest")


def cmd_quantize(args: argparse.Namespace, api: EphemeralApi) -> int:
    """Run the flow; map its outcome to an exit code."""
    config = config_from(QuantizeConfig, args)
    from flows.quantize_and_promote import quantize_and_promote

    console_tracebacks(args.verbose)
    with api.serving():
        try:
            result, rejected = quantize_and_promote(config), None
        except GateRejected as e:
            result, rejected = None, e
    if rejected is not None:
        if args.json:
            print_json(rejected.manifest.dump())
        print(f"distilq: {rejected}", file=sys.stderr)
        return EXIT_REJECTED
    if args.json:
        print_json(result.manifest.dump())
    else:
        _print_quantized(result)
    if result.dry_run and not result.approved:
        return EXIT_REJECTED
    return EXIT_OK


def _print_quantized(result) -> None:
    m = result.manifest.metrics
    status = (
        "unchanged inputs, reusing"
        if result.reused
        else "dry run, not published:"
        if result.dry_run
        else "promoted to production:"
        if result.promoted
        else "published (production holds a newer version):"
    )
    print(f"{status} {result.version}")
    print(
        f"  {agreement_line(m, m.confidence)}, "
        f"{m.size_bytes_int8 / 2**20:.1f} MiB on disk "
        f"({m.size_bytes_int8 / m.size_bytes_fp32:.1%} of FP32)"
    )
    if len(m.sets) > 1:
        for part in m.sets:
            print(f"    {part.name}: {agreement_line(part, m.confidence)}")
    if result.location:
        print(f"  artifact: {result.location}/model")
    print(f"  report:   {result.report}")
    if result.mirror:
        print(f"  {result.mirror}")
