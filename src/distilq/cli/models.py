"""`distilq models ...`: registry operations (list, show, audits, attest, promote, rollback,
sync-mlflow); none of them runs a flow."""

from __future__ import annotations

import argparse
import os
import sys

from distilq.cli.flags import mlflow_args, ref_arg, registry_arg
from distilq.cli.output import EXIT_OK, agreement_line, print_json
from distilq.errors import DistilqError, InputError, IntegrityError


def add_parser(commands) -> None:
    """The `models` command and its actions."""
    models = commands.add_parser("models", help="list, show, promote and roll back versions")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every version, newest first, with its gate and size")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    show = actions.add_parser("show", help="one version's manifest")
    ref_arg(show)
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
    ref_arg(attest)
    attest.add_argument("--json", action="store_true", help="print the attestation JSON")
    rollback = actions.add_parser("rollback", help="point production back at the previous version")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the history")
    audits = actions.add_parser(
        "audits", help="the FP32 audits of a version's scoring runs, oldest first"
    )
    ref_arg(audits)
    audits.add_argument("--json", action="store_true", help="print a JSON list")
    sync = actions.add_parser(
        "sync-mlflow",
        help="register in MLflow the versions it lacks and point its production alias where "
        "distilq's is now (safe any time: nothing is registered twice; versions that cannot be "
        "mirrored faithfully are skipped, named)",
    )
    sync.add_argument("--json", action="store_true", help="print what was done as JSON")
    for action in (ls, show, promote, attest, rollback, audits, sync):
        registry_arg(action)
    follows = (
        "; with both, MLflow's production alias follows the move (without them: the mirror "
        "the registry's last sync recorded)"
    )
    recorded = " (default: the mirror the registry's last sync recorded)"
    for action, note in ((promote, follows), (rollback, follows), (sync, recorded)):
        mlflow_args(action, note)


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
        print_json(rows)
    elif not rows:
        print(f"no versions in {args.registry}")
    else:
        print(_columns(rows))


def _models_show(registry, args: argparse.Namespace) -> None:
    from distilq.report.audit import live_audit_line, run_row
    from distilq.score.evidence import live_audit

    manifest = registry.manifest(registry.resolve(args.ref))
    runs = registry.audits(manifest.version)
    live = live_audit(runs, manifest.decision.thresholds)
    if args.json:
        print_json({**manifest.dump(), "live_audit": live})
        return
    from distilq.report.render import render_report

    print(render_report(manifest))
    attested = [
        f"`{a['platform']['key']}` ({a['platform']['cpu']}; "
        f"{', '.join(a['platform']['features'])}): agreement {a['agreement']:.4f}"
        for a in registry.attestations(manifest.version)
    ]
    print(f"Attested platforms: {'; '.join(attested) or 'none recorded'}.")
    gate = agreement_line(manifest.metrics, manifest.metrics.confidence)
    print(f"Gate: {gate}. {live_audit_line(live)}")
    for run in runs:
        if run.passed is False:
            print(f"  FAILED audit: {run_row(run)}")
    target = registry.mirror_target()
    if target is not None:
        from distilq.integrations.mlflow.mirror import alias_line

        print(alias_line(registry, *target))


def _models_audits(registry, args: argparse.Namespace) -> None:
    version = registry.resolve(args.ref)
    runs = registry.audits(version)
    if args.json:
        print_json([run.model_dump(mode="json") for run in runs])
    elif not runs:
        print(f"no audited scoring runs of {version}")
    else:
        from distilq.report.audit import run_row

        for run in runs:
            print(run_row(run))


def _models_attest(registry, args: argparse.Namespace) -> None:
    import distilq
    from distilq.hardware import platform_record

    classifier = distilq.load(args.registry, args.ref)  # a failed self-check: exit 3
    platform = classifier.manifest.platform
    key = platform_record(platform.quantized_engine if platform else "x86")["key"]
    if args.json:
        record = registry.attestation(classifier.version, key)
        print_json(record or {"version": classifier.version, "status": classifier.attestation})
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
    from distilq.config.shared import check_mlflow

    try:
        check_mlflow(args.mlflow_tracking_uri, args.mlflow_model)
    except ValueError as e:
        raise InputError(str(e)) from None


def _follow_in_mlflow(registry, args: argparse.Namespace) -> None:
    """Move MLflow's production where distilq's now is (distilq's has moved either way): the
    mirror the flags name, else the one the registry records."""
    target = registry.mirror_target(args.mlflow_tracking_uri, args.mlflow_model)
    if target is None:
        return
    from distilq.integrations.mlflow.mirror import follow

    line, _ = follow(registry, *target)
    print(line)


def _models_sync_mlflow(registry, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from distilq.integrations.mlflow.mirror import MlflowMirror

    _check_mlflow(args)
    target = registry.mirror_target(args.mlflow_tracking_uri, args.mlflow_model)
    if target is None:
        raise InputError(
            "sync-mlflow needs --mlflow-tracking-uri and --mlflow-model (this registry "
            "records no mirror yet)"
        )
    try:
        result = MlflowMirror(*target).sync(registry)
    except DistilqError:
        raise
    except Exception as e:  # MLflow's own errors: one line, not a traceback
        raise DistilqError(f"MLflow at {target[0]}: {e}") from e
    if args.json:
        print_json(asdict(result))
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
