"""`distilq score`: runs the `score_parquet` flow and prints its summary."""

from __future__ import annotations

import argparse
import sys

from distilq.cli.api import EphemeralApi, console_tracebacks
from distilq.cli.flags import add_flow_command, config_from
from distilq.cli.output import EXIT_FAILED, EXIT_OK, EXIT_REJECTED, print_json
from distilq.config.score import ScoreConfig

SUMMARY = "score Parquet files with a registry model"
SCORE_HELP = """\
Score Parquet files with a registry model (INT8, CPU) into one output Parquet file per input
file (or per row-group shard of a large file), plus _manifest.json. Runs the Prefect flow
`score_parquet`. Rows keep their order; a row whose text is null, empty or not a string is
kept with a null label and the reason in `error`. Re-running with the same inputs, model
and output skips what is done.

A sample of the rows (--audit-rate, chosen by a hash of the text) is re-run through the
FP32 model the version was gated against, each distinct text once; _manifest.json says how
many kept their label, both bounds and the verdict against the bar: certified, consistent
(the sample cannot decide) or failed (evidence the version is below it); _audit.parquet
holds every audited text.

exit codes: 0 every input file scored, 1 some file failed (the others are scored),
2 bad usage or input found before scoring, 3 the model fails its self-check here, or the
audit failed: its upper bound is below --min-audit-agreement (with --audit-fail-on
uncertified: it does not certify it); the scored files are kept.
"""


def add_parser(commands) -> None:
    """The `score` command."""
    add_flow_command(commands, "score", ScoreConfig, SUMMARY, SCORE_HELP, "summary")


def cmd_score(args: argparse.Namespace, api: EphemeralApi) -> int:
    """Run the scoring flow; print its summary."""
    from distilq.pipelines.score import preflight

    config = config_from(ScoreConfig, args)
    version, pending = preflight(config)  # seconds, and before any engine starts
    from distilq.errors import AuditFailed, ScoringFailed
    from flows.score_parquet import score_parquet

    console_tracebacks(args.verbose)
    if pending:
        # Load the model while the API starts (the local runner's tasks reuse it), and
        # refuse, exit 3, a version that fails its self-check here before any file is scored.
        from distilq.score.classifier import load_cached

        classifier = load_cached(config.registry, version, config.allow_unattested)
        print(f"model {version}: {classifier.attestation}", file=sys.stderr)
    with api.serving():
        try:
            summary, failed = score_parquet(config), None
        except (ScoringFailed, AuditFailed) as e:
            summary, failed = e.summary, e
    if failed is not None:
        print(f"distilq: {failed}", file=sys.stderr)
    if args.json:
        print_json(summary.model_dump())
    else:
        from distilq.report.render import score_summary_line

        print(score_summary_line(summary))
    if isinstance(failed, AuditFailed):
        return EXIT_REJECTED
    return EXIT_FAILED if failed is not None else EXIT_OK
