"""What the FP32 audit of a scoring run costs, and what it measures.

The real shared model, quantized and gated on the default data (`distilq quantize`, recipe
`auto`), scores 2,000 IMDB reviews with `distilq score` at `--audit-rate` 0 (no audit),
0.01, 0.05 and 0.2: whole-process wall time of each (runs interleaved, median of
`--repeats`), and the audit's rows, agreement, both bounds and verdict. Then a one-row
`distilq score` with the audit off and at the default rate, side by side.

Writes its table between markers in bench/RESULTS.md. Usage: python bench/bench_audit.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distilq.hardware import cpu_features, cpu_model
from distilq.manifest import AuditRecord
from distilq.report.audit import bounds, verdict_word

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
DISTILQ = str(Path(sys.executable).parent / "distilq")
RATES = (0.0, 0.01, 0.05, 0.2)
REVIEWS = 2000
csv.field_size_limit(1 << 24)

sys.path.insert(0, str(ROOT / "bench"))
from bench_quantize import write_results  # noqa: E402


def read_imdb(n: int) -> list[str]:
    with open(SHARED / "data" / "imdb" / "imdb_test_sample_3000.csv", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)][:n]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    """Whole-process wall seconds and stdout; fails loudly."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: an audit below its bar, still a measurement
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def score(inputs: Path, output: Path, registry: Path, rate: float, env: dict):
    cmd = [DISTILQ, "score", "--input", str(inputs), "--output", str(output)]
    cmd += ["--registry", str(registry), "--audit-rate", str(rate), "--json"]
    seconds, out = timed(cmd, env)
    return seconds, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per rate, interleaved")
    parser.add_argument("--registry", type=Path, help="reuse a registry made by this bench")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of distilq before the audit: one-row runs of it too, side by side",
    )
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = args.registry or tmp / "registry"
        if not (registry / "aliases").exists():
            cmd = [DISTILQ, "quantize", "--source", str(SHARED_MODEL), "--registry", str(registry)]
            seconds, out = timed([*cmd, "--json"], env)
            gated = json.loads(out)
            print(f"quantized in {seconds:.0f} s: {gated['version']}", flush=True)
        reviews = pa.table({"id": list(range(REVIEWS)), "text": read_imdb(REVIEWS)})
        pq.write_table(reviews, tmp / "imdb.parquet")
        one = tmp / "one.parquet"
        pq.write_table(pa.table({"id": [0], "text": ["a charming and often moving film"]}), one)
        times: dict[float, list[float]] = {r: [] for r in RATES}
        fp32_seconds: dict[float, list[float]] = {r: [] for r in RATES}
        audits: dict[float, dict] = {}
        for repeat in range(args.repeats):
            order = RATES if repeat % 2 == 0 else tuple(reversed(RATES))
            for rate in order:
                out = tmp / f"out-{rate}-{repeat}"
                seconds, summary = score(tmp / "imdb.parquet", out, registry, rate, env)
                times[rate].append(seconds)
                fp32_seconds[rate].append(summary["audit"]["seconds"])
                audits[rate] = summary["audit"]
                print(f"rate {rate}: {seconds:.1f} s, audit {summary['audit']}", flush=True)
        one_row: dict[str, list[float]] = {"off": [], "0.01": [], "before": []}
        for repeat in range(3):
            for rate in (0.0, 0.01) if repeat % 2 == 0 else (0.01, 0.0):
                seconds, summary = score(one, tmp / f"one-{rate}-{repeat}", registry, rate, env)
                one_row["0.01" if rate else "off"].append(seconds)
                assert summary["audit"]["rows"] == 0  # this text is not in a 1% sample
            if args.baseline:  # the same command, by the code before the audit
                code = f"{args.baseline / 'src'}:{args.baseline}"
                cmd = [sys.executable, "-m", "distilq.cli", "score", "--input", str(one)]
                cmd += ["--output", str(tmp / f"before-{repeat}"), "--registry", str(registry)]
                one_row["before"].append(timed(cmd, {**env, "PYTHONPATH": code})[0])
        version = summary["model_version"]
    base = statistics.median(times[0.0])
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench` on "
        f"{cpu_model()} ({', '.join(cpu_features())}), {os.cpu_count()} cores, torch "
        f"{torch.__version__}. Model: the shared model, `auto`, gated on `builtin:sst2-gate` "
        f"({version}); {REVIEWS:,} IMDB reviews (512 tokens at most); `distilq score`, whole "
        f"process, median of {args.repeats} interleaved runs.",
        "",
        "| --audit-rate | texts audited | seconds | vs no audit | of which the audit | agree | "
        "agreement | bounds (95%) | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for rate in RATES:
        a, seconds = audits[rate], statistics.median(times[rate])
        own = statistics.median(fp32_seconds[rate])  # FP32 loaded and run, timed in the run
        record = AuditRecord.model_validate(a)
        bound = "" if not record.rows else bounds(record)
        agreement = "" if a["agreement"] is None else f"{a['agreement']:.2%}"
        lines.append(
            f"| {rate:g} | {a['rows']:,} | {seconds:.1f} | {seconds / base - 1:+.1%} | "
            f"{own:.1f} s ({own / seconds:.1%}) | {a['agreeing']:,} | {agreement} | {bound} | "
            f"{verdict_word(record) if rate else 'off'} |"
        )
    off, on = statistics.median(one_row["off"]), statistics.median(one_row["0.01"])
    before = (
        f"; distilq before the audit {statistics.median(one_row['before']):.2f} s"
        if one_row["before"]
        else ""
    )
    lines += [
        "",
        f"One-row `distilq score` (3 runs each, interleaved): audit off {off:.2f} s, default "
        f"rate 0.01 {on:.2f} s ({on / off - 1:+.1%}){before}. The row is not in the sample, "
        "so no FP32 model is loaded.",
        "",
        "Whole-process times on these shared machines vary by several percent from run to "
        "run (compare the 0.01 and 0.05 rows); `of which the audit` is timed inside the run "
        "(`audit.seconds`: FP32 loaded and run), and is the audit's cost.",
    ]
    print("\n".join(lines))
    write_results(lines, "bench_audit")


if __name__ == "__main__":
    main()
