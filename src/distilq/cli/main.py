"""The `distilq` command line: maps flags to configs and runs flows or registry operations.

Flags, their defaults and their help come from the config models (`distilq.config`), the
one source of both. Exit codes: 0 success (promoted, or a dry run that passed), 1 any other
failure, 2 bad usage or input, 3 rejected by the gate, unattested on this platform, or a
scoring run's FP32 audit below its bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from distilq import __version__
from distilq.cli.api import EphemeralApi, console_tracebacks
from distilq.cli.flags import add_config_flags, config_from
from distilq.config import QuantizeConfig, ScoreConfig, default_registry
from distilq.errors import DistilqError, GateRejected, InputError, IntegrityError, Unattested
from distilq.quantize.recipes import recipes_help

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
log = logging.getLogger("distilq")

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

SCORE_HELP = """\
Score Parquet files with a registry model (INT8, CPU) into one output Parquet file per input
file (or per row-group shard of a large file), plus _manifest.json. Runs the Prefect flow
`score_parquet`. Rows keep their order; a row whose text is null, empty or not a string is
kept with a null label and the reason in `error`. Re-running with the same inputs, model
and output skips what is done.

A sample of the rows (--audit-rate, chosen by a hash of the text) is re-run through the
FP32 model the version was gated against; _manifest.json says how many kept their label and
the lower bound that certifies, _audit.parquet holds every audited row.

exit codes: 0 every input file scored, 1 some file failed (the others are scored),
2 bad usage or input found before scoring, 3 the model fails its self-check here, or the
audit's lower bound is below --min-audit-agreement (the scored files are kept).
"""


# Flags not spelled as their field is (repeated flags are singular).
def _common_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print only the {what} JSON")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the tracebacks of failed steps here too (they are always in the run's "
        "Prefect logs)",
    )


def _registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        default=default_registry(),
        help="registry directory or fsspec URI (env DISTILQ_REGISTRY; default %(default)s)",
    )


def _ref_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", nargs="?", default="production", help="version or alias (default production)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="distilq",
        description="Validated INT8 sentiment classifiers and their registry, on CPU.",
    )
    parser.add_argument("--version", action="version", version=f"distilq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, model, summary, description, what in (
        ("quantize", QuantizeConfig, "quantize, validate, publish and promote a checkpoint",
         QUANTIZE_HELP, "manifest"),
        ("score", ScoreConfig, "score Parquet files with a registry model", SCORE_HELP,
         "summary"),
    ):  # fmt: skip
        command = commands.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_flags(command, model)
        _common_flags(command, what)
    _models_parser(commands)
    return parser


def _models_parser(commands) -> None:
    models = commands.add_parser("models", help="list, show, promote and roll back versions")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every version, newest first, with its gate and size")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    show = actions.add_parser("show", help="one version's manifest")
    _ref_arg(show)
    show.add_argument("--json", action="store_true", help="print the manifest JSON")
    promote = actions.add_parser("promote", help="point production at VERSION")
    promote.add_argument("version")
    promote.add_argument(
        "--force", action="store_true", help="promote even if the gate rejected it (recorded)"
    )
    promote.add_argument("--reason", default="manual promotion", help="recorded in the history")
    attest = actions.add_parser(
        "attest",
        help="self-check a version on this machine's platform (as a worker would before "
        "scoring) and record it; exit 3 if it fails",
    )
    _ref_arg(attest)
    attest.add_argument("--json", action="store_true", help="print the attestation JSON")
    rollback = actions.add_parser("rollback", help="point production back at the previous version")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the history")
    audits = actions.add_parser(
        "audits", help="the FP32 audits of a version's scoring runs, oldest first"
    )
    _ref_arg(audits)
    audits.add_argument("--json", action="store_true", help="print a JSON list")
    sync = actions.add_parser(
        "sync-mlflow",
        help="register in MLflow the versions it lacks and point its production alias where "
        "distilq's is (safe any time: nothing is registered twice or deleted)",
    )
    sync.add_argument("--json", action="store_true", help="print what was done as JSON")
    for action in (ls, show, promote, attest, rollback, audits, sync):
        _registry_arg(action)
    follows = "; with both, MLflow's production alias follows the move"
    for action, note in ((promote, follows), (rollback, follows), (sync, "")):
        _mlflow_args(action, note)


def _mlflow_args(parser: argparse.ArgumentParser, note: str) -> None:
    for flag, metavar, env, what in (
        ("--mlflow-tracking-uri", "URI", "DISTILQ_MLFLOW_TRACKING_URI", "MLflow tracking server"),
        ("--mlflow-model", "NAME", "DISTILQ_MLFLOW_MODEL", "registered model in MLflow"),
    ):
        default = os.environ.get(env) or None
        parser.add_argument(
            flag, metavar=metavar, default=default, help=f"{what} (env {env}){note}"
        )


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


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
            _print_json(rejected.manifest.dump())
        print(f"distilq: {rejected}", file=sys.stderr)
        return EXIT_REJECTED
    if args.json:
        _print_json(result.manifest.dump())
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
        f"  {_agreement_line(m, m.confidence)}, "
        f"{m.size_bytes_int8 / 2**20:.1f} MiB on disk "
        f"({m.size_bytes_int8 / m.size_bytes_fp32:.1%} of FP32)"
    )
    if len(m.sets) > 1:
        for part in m.sets:
            print(f"    {part.name}: {_agreement_line(part, m.confidence)}")
    if result.location:
        print(f"  artifact: {result.location}/model")
    print(f"  report:   {result.report}")
    if result.mirror:
        print(f"  {result.mirror}")


def _agreement_line(figures, confidence: float | None) -> str:
    """`agreement 0.9952 (lower bound 0.9924 at 95%, n=2729)`; just the point when the
    version was gated before bounds."""
    line = f"agreement {figures.agreement:.4f}"
    if figures.agreement_lower_bound is None:
        return line
    return (
        f"{line} (lower bound {figures.agreement_lower_bound:.4f} at {confidence:.0%}, "
        f"n={figures.n_examples})"
    )


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
        _print_json(summary.model_dump())
    else:
        from distilq.report.render import score_summary_line

        print(score_summary_line(summary))
    if isinstance(failed, AuditFailed):
        return EXIT_REJECTED
    return EXIT_FAILED if failed is not None else EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    """Registry operations; none of them needs Prefect."""
    from distilq.registry.registry import Registry

    registry = Registry(args.registry)
    if not registry.exists():
        raise InputError(f"registry {args.registry} does not exist")
    action = {
        "list": _models_list,
        "show": _models_show,
        "attest": _models_attest,
        "promote": _models_promote,
        "rollback": _models_rollback,
        "audits": _models_audits,
        "sync-mlflow": _models_sync_mlflow,
    }[args.action]
    action(registry, args)
    return EXIT_OK


def _models_list(registry, args: argparse.Namespace) -> None:
    rows = _list_rows(registry)
    if args.json:
        _print_json(rows)
    elif not rows:
        print(f"no versions in {args.registry}")
    else:
        print(_columns(rows))


def _models_show(registry, args: argparse.Namespace) -> None:
    from distilq.score.audit import live_audit, live_audit_line

    manifest = registry.manifest(registry.resolve(args.ref))
    runs = registry.audits(manifest.version)
    live = live_audit(runs, manifest.decision.thresholds)
    if args.json:
        _print_json({**manifest.dump(), "live_audit": live})
        return
    from distilq.report.render import render_report

    print(render_report(manifest))
    attested = [
        f"`{a['platform']['key']}` ({a['platform']['cpu']}; "
        f"{', '.join(a['platform']['features'])}): agreement {a['agreement']:.4f}"
        for a in registry.attestations(manifest.version)
    ]
    print(f"Attested platforms: {'; '.join(attested) or 'none recorded'}.")
    gate = _agreement_line(manifest.metrics, manifest.metrics.confidence)
    print(f"Gate: {gate}. {live_audit_line(live)}")
    for run in runs:
        if run.passed is False:
            print(f"  FAILED audit: {_audit_row(run)}")


def _models_audits(registry, args: argparse.Namespace) -> None:
    version = registry.resolve(args.ref)
    runs = registry.audits(version)
    if args.json:
        _print_json([run.model_dump(mode="json") for run in runs])
    elif not runs:
        print(f"no audited scoring runs of {version}")
    else:
        for run in runs:
            print(_audit_row(run))


def _audit_row(run) -> str:
    """`<run id>  ./scored  400 rows  99.50% agree (lower bound 98.73% at 95%)  passed`: the
    output's audit as the run ended (a run is recorded only when it audited rows)."""
    from distilq.score.audit import VERDICTS

    verdict = VERDICTS[run.passed]
    return (
        f"{run.run_id}  {run.output}  {run.rows:,} rows  {run.agreement:.2%} agree (lower "
        f"bound {run.agreement_lower_bound:.2%} at {run.confidence:.0%})  {verdict}"
    )


def _models_attest(registry, args: argparse.Namespace) -> None:
    import distilq
    from distilq.hardware import platform_record

    classifier = distilq.load(args.registry, args.ref)  # a failed self-check: exit 3
    platform = classifier.manifest.platform
    key = platform_record(platform.quantized_engine if platform else "x86")["key"]
    if args.json:
        record = registry.attestation(classifier.version, key)
        _print_json(record or {"version": classifier.version, "status": classifier.attestation})
    else:
        print(f"{classifier.version}: {classifier.attestation}")


def _models_promote(registry, args: argparse.Namespace) -> None:
    _check_mlflow(args)  # before production moves
    entry = registry.promote(args.version, args.reason, force=args.force)
    if entry is None:
        print(f"production already is {args.version}")
    else:
        print(f"production: {entry['from']} -> {entry['to']}")
        _announce_promotion(args.version, args.registry, entry)
    _follow_in_mlflow(registry, args)


def _models_rollback(registry, args: argparse.Namespace) -> None:
    _check_mlflow(args)
    entry = registry.rollback(args.reason)
    print(f"production: {entry['from']} -> {entry['to']} (rolled back)")
    _follow_in_mlflow(registry, args)


def _check_mlflow(args: argparse.Namespace) -> None:
    from distilq.config import check_mlflow

    try:
        check_mlflow(args.mlflow_tracking_uri, args.mlflow_model)
    except ValueError as e:
        raise InputError(str(e)) from None


def _follow_in_mlflow(registry, args: argparse.Namespace) -> None:
    """Move MLflow's production where distilq's now is (distilq's has moved either way)."""
    if not args.mlflow_tracking_uri:
        return
    from distilq.registry.mirror import follow

    line, _ = follow(registry, args.mlflow_tracking_uri, args.mlflow_model)
    print(line)


def _models_sync_mlflow(registry, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from distilq.registry.mirror import MlflowMirror

    if not (args.mlflow_tracking_uri and args.mlflow_model):
        raise InputError("sync-mlflow needs --mlflow-tracking-uri and --mlflow-model")
    _check_mlflow(args)
    try:
        result = MlflowMirror(args.mlflow_tracking_uri, args.mlflow_model).sync(registry)
    except DistilqError:
        raise
    except Exception as e:  # MLflow's own errors: one line, not a traceback
        raise DistilqError(f"MLflow at {args.mlflow_tracking_uri}: {e}") from e
    if args.json:
        _print_json(asdict(result))
    else:
        print(result.line())


def _list_rows(registry) -> list[dict]:
    """One row a version, newest first; a version whose manifest fails its check is listed
    with the reason instead of its figures."""
    from distilq.gate.decide import decide_manifest

    try:
        production = registry.alias()
    except IntegrityError as e:
        print(f"distilq: {e}", file=sys.stderr)
        production = None
    rows = []
    for version in reversed(registry.versions()):
        row = {"version": version, "production": version == production}
        try:
            m = registry.manifest(version)
        except IntegrityError as e:
            rows.append({**row, "error": str(e)})
            continue
        rows.append(
            {
                **row,
                "approved": decide_manifest(m).approved,
                "recipe": m.recipe.name,
                "agreement": m.metrics.agreement,
                "size_bytes_int8": m.metrics.size_bytes_int8,
                "source": m.source.id,
            }
        )
    return rows


def _columns(rows: list[dict]) -> str:
    """`models list` as aligned columns; numbers right-aligned."""
    header = ["version", "gate", "recipe", "agreement", "MiB", "source"]
    table, marks = [header], [""]
    for r in rows:
        marks.append("*" if r["production"] else "")
        if "error" in r:
            table.append([r["version"], "DAMAGED", "", "", "", r["error"]])
            continue
        table.append(
            [
                r["version"],
                "approved" if r["approved"] else "rejected",
                r["recipe"],
                f"{r['agreement']:.4f}",
                f"{r['size_bytes_int8'] / 2**20:.1f}",
                r["source"],
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    right = {3, 4}
    lines = []
    for mark, row in zip(marks, table, strict=True):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append(f"{mark:2}" + "  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _announce_promotion(version: str, registry: str, entry: dict) -> None:
    """Send `distilq.model.promoted` to the Prefect server in PREFECT_API_URL, so deployment
    triggers re-score as after an automatic promotion. Without a server nobody listens."""
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return
    from tasks.runner import PROMOTED_EVENT, emit_promoted

    emit_promoted(version, registry, entry)  # delivered before this process exits
    print(f"sent {PROMOTED_EVENT} to {api}", file=sys.stderr)


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
            return cmd_quantize(args, api)
        if args.command == "score":
            api.start()
            return cmd_score(args, api)
        return cmd_models(args)
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
