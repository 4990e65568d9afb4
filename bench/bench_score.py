"""Scoring speed, agreement, start-up cost and memory, measured side by side in one run.

- rows/s of the transformers pipeline (FP32, best batch size), distilq FP32 and distilq
  INT8, on SST-2 dev sentences and IMDB reviews, for the full-size DistilBertConfig()
  shape (random weights) and the real shared model;
- whole-process wall time of `distilq score` vs a whole-process pipeline script on ~5k
  sentences (full-size shape);
- agreement of distilq INT8 labels (through `distilq score`) with the FP32 pipeline's labels,
  real model, SST-2 dev and 2,500 IMDB reviews, for the model gated on SST-2 dev and for
  one gated on SST-2 dev and the sample's other 500 reviews;
- peak RSS of `distilq score` on 10k vs 40k rows; the fixed cost of a run on one row;
- scale-out: a dask scheduler with 1 and 2 worker processes vs the local runner.

Writes its tables between markers in bench/RESULTS.md. Usage: python bench/bench_score.py
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distilq.hardware import cpu_features, cpu_model
from distilq.registry.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
DISTILQ = str(Path(sys.executable).parent / "distilq")
IMDB_SPEED_ROWS = 120  # long reviews are slow; enough for a rate
csv.field_size_limit(1 << 24)


def read_sst2(name: str) -> list[str]:
    with open(SHARED / "data" / "sst2" / name, newline="") as f:
        return [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]


def read_imdb(labels: bool = False) -> list:
    """The IMDB sample's texts, or (text, label) pairs."""
    with open(SHARED / "data" / "imdb" / "imdb_test_sample_3000.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["text"], int(r["label"])) if labels else r["text"] for r in rows]


def write_texts(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)
    return path


# A child's ru_maxrss starts from its parent's high-water mark (kept across fork and exec),
# and this process holds models: measure through a small launcher instead.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))"
)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a whole process; its wall seconds, its own peak RSS in MiB, and its stdout."""
    with tempfile.NamedTemporaryFile() as rss:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", LAUNCHER, rss.name, *cmd],
            capture_output=True,
            env=env,
            text=True,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return seconds, int(Path(rss.name).read_text()) / 1024, done.stdout


def quantize_into(registry: Path, source: Path, *extra: str, env: dict) -> str:
    """`distilq quantize` into a bench registry; the new version."""
    args = ["quantize", "--source", str(source), "--registry", str(registry), "--json", *extra]
    _, _, out = run_measured([DISTILQ, *args], env)
    return json.loads(out)["version"]


def score_cmd(inputs: Path, output: Path, registry: Path, *flags: str) -> list[str]:
    """The `distilq score` command line for one bench run."""
    args = ["score", "--input", str(inputs), "--output", str(output), "--registry", str(registry)]
    return [DISTILQ, *args, *flags]


def in_process_rates(model_dir: Path, registry: Path, texts: dict[str, list[str]]) -> dict:
    """rows/s in one process: pipeline at batch 1/8/32, distilq FP32 and INT8 (policy)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    import distilq
    from distilq.inference import predict

    fp32 = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    int8 = distilq.load(registry)
    classify = pipeline("text-classification", model=fp32, tokenizer=tokenizer, device=-1)
    rates = {}
    for name, rows in texts.items():
        pipe = {}
        for bs in (1, 8, 32):
            start = time.perf_counter()
            classify(rows, batch_size=bs, truncation=True)
            pipe[bs] = len(rows) / (time.perf_counter() - start)
        best = max(pipe, key=pipe.get)
        ours = {}
        for label, model in (("FP32", fp32), ("INT8", int8.model)):
            start = time.perf_counter()
            predict(model, tokenizer, rows, int8.batching)
            ours[label] = len(rows) / (time.perf_counter() - start)
        rates[name] = {"pipeline": pipe, "best_bs": best, **ours}
    return rates


def rate_rows(title: str, rates: dict) -> list[str]:
    lines = [
        f"**{title}** (rows/s, one process, {torch.get_num_threads()} threads)",
        "",
        "| data | pipeline bs 1 | bs 8 | bs 32 | distilq FP32 | distilq INT8 "
        "| INT8 vs pipeline's best |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rates.items():
        best = r["pipeline"][r["best_bs"]]
        lines.append(
            f"| {name} | {r['pipeline'][1]:.1f} | {r['pipeline'][8]:.1f} | {r['pipeline'][32]:.1f} "
            f"| {r['FP32']:.1f} | {r['INT8']:.1f} "
            f"| **{r['INT8'] / best:.2f}x** (vs bs {r['best_bs']}) |"
        )
    return lines


def setup_full(tmp: Path) -> Path:
    """The full-size checkpoint: DistilBertConfig() with random weights, the real tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    full = tmp / "full"
    labels = {
        "id2label": {0: "NEGATIVE", 1: "POSITIVE"},
        "label2id": {"NEGATIVE": 0, "POSITIVE": 1},
    }
    DistilBertForSequenceClassification(DistilBertConfig(**labels)).save_pretrained(full)
    AutoTokenizer.from_pretrained(SHARED_MODEL).save_pretrained(full)
    return full


def setup(tmp: Path, env: dict) -> tuple[Path, Path, Path]:
    """The full-size checkpoint and two registries."""
    full = setup_full(tmp)
    # Random weights make agreement meaningless, so the gate is opened for this one.
    open_gate = ["--recipe", "ort-int8-token", "--min-agreement", "0", "--max-accuracy-drop", "1"]
    quantize_into(tmp / "reg-full", full, *open_gate, env=env)
    quantize_into(tmp / "reg-real", SHARED_MODEL, env=env)  # auto, default gate
    return full, tmp / "reg-full", tmp / "reg-real"


def section_speed(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    texts = {
        "SST-2 dev (872)": sst2_dev,
        f"IMDB ({IMDB_SPEED_ROWS} reviews)": imdb[:IMDB_SPEED_ROWS],
    }
    return (
        rate_rows("Full-size DistilBertConfig()", in_process_rates(full, reg_full, texts))
        + [""]
        + rate_rows(
            "Real model distilbert-sst2-minilm", in_process_rates(SHARED_MODEL, reg_real, texts)
        )
    )


def section_whole(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    five_k = write_texts(tmp / "sst2-5k.parquet", read_sst2("train.tsv")[:5000])
    script = [sys.executable, str(ROOT / "bench" / "pipeline_script.py")]
    pipe_s, pipe_rss, _ = run_measured(
        [*script, str(full), str(five_k), str(tmp / "p.parquet"), "8"], env
    )
    ours_s, ours_rss, _ = run_measured(score_cmd(five_k, tmp / "o5k", reg_full), env)
    return [
        "**Whole process, 5,000 SST-2 train sentences, full-size shape** (start-up included)",
        "",
        "| command | wall s | rows/s | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| pipeline script (FP32, batch 8) | {pipe_s:.1f} | {5000 / pipe_s:.1f} "
        f"| {pipe_rss:.0f} |",
        f"| `distilq score` (INT8) | {ours_s:.1f} | {5000 / ours_s:.1f} | {ours_rss:.0f} |",
        "",
        f"`distilq score` is **{pipe_s / ours_s:.2f}x** faster, whole process.",
    ]


IMDB_GATE_ROWS = 500  # the sample's last reviews gate the long-text model; the rest test it


def section_agreement(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    """Agreement with the FP32 pipeline's labels, for the model gated on SST-2 dev alone and
    for one gated on SST-2 dev and 500 IMDB reviews (each set on its own); the IMDB figures
    are on the other 2,500 reviews, which no gate saw."""
    held_out = imdb[:-IMDB_GATE_ROWS]
    gate_reviews = tmp / "imdb-gate.parquet"
    pairs = read_imdb(labels=True)[-IMDB_GATE_ROWS:]
    pq.write_table(
        pa.table({"text": [t for t, _ in pairs], "label": [y for _, y in pairs]}), gate_reviews
    )
    start = time.perf_counter()
    long_gate = quantize_into(
        tmp / "reg-long", SHARED_MODEL, "--validation", "builtin:sst2-validation",
        "--validation", str(gate_reviews), env=env,
    )  # fmt: skip
    quantize_minutes = (time.perf_counter() - start) / 60
    script = [sys.executable, str(ROOT / "bench" / "pipeline_script.py")]
    references = []  # (input file, the FP32 pipeline's labels)
    for rows in (sst2_dev, held_out):
        src = write_texts(tmp / f"agree-{len(rows)}.parquet", rows)
        run_measured([*script, str(SHARED_MODEL), str(src), str(tmp / "pipe.parquet"), "8"], env)
        references.append((src, pq.read_table(tmp / "pipe.parquet").column("label").to_pylist()))
    lines = [
        "**Agreement of `distilq score` INT8 labels with the FP32 pipeline's, real model (auto)**",
        "",
        f"| gated on | FP32 layers | MiB on disk | SST-2 dev | IMDB, {len(held_out):,} reviews "
        "no gate saw |",
        "|---|---:|---:|---:|---:|",
    ]
    models = {"SST-2 dev": reg_real, f"SST-2 dev + {IMDB_GATE_ROWS} IMDB reviews": tmp / "reg-long"}
    for gate_name, registry in models.items():
        cells = []
        for src, reference in references:
            out = tmp / f"agree-{registry.name}-{len(reference)}"
            run_measured(score_cmd(src, out, registry), env)
            ours = pq.read_table(out / src.name).column("label").to_pylist()
            agree = sum(a == b for a, b in zip(reference, ours, strict=True)) / len(ours)
            cells.append(f"{agree:.2%}")
        models_in = Registry(registry)
        manifest = models_in.manifest(models_in.alias())
        layers = len(manifest.recipe.fp32_layers)
        mib = manifest.metrics.size_bytes_int8 / 2**20
        lines.append(f"| {gate_name} | {layers} | {mib:.1f} | {' | '.join(cells)} |")
    return lines + [
        "",
        f"Quantizing with both gate sets took {quantize_minutes:.0f} min ({long_gate}).",
    ]


def section_memory(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    lines = [
        "**Peak RSS of the `distilq score` process, real model, repeated SST-2 sentences**",
        "",
        "| rows | wall s | peak RSS MiB |",
        "|---:|---:|---:|",
    ]
    short = [t for t in sst2_dev if len(t) < 60][:250]
    peaks = {}
    for n in (10_000, 40_000):
        src = write_texts(tmp / f"mem-{n}.parquet", (short * (n // len(short) + 1))[:n])
        seconds, rss, _ = run_measured(score_cmd(src, tmp / f"om-{n}", reg_real), env)
        peaks[n] = rss
        lines.append(f"| {n:,} | {seconds:.1f} | {rss:.0f} |")
    return lines + [
        "",
        f"Growth from 10k to 40k rows: **{peaks[40_000] / peaks[10_000] - 1:+.1%}**.",
    ]


def section_startup(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    one = write_texts(tmp / "one.parquet", ["a fine film"])
    seconds, _, _ = run_measured(score_cmd(one, tmp / "o1", reg_full), env)
    return [
        "Fixed cost of a `distilq score` run (one row, full-size model, ephemeral Prefect API, "
        f"warm disk cache): **{seconds:.1f} s**."
    ]


def score_rate(inputs: Path, output: Path, registry: Path, env: dict, *flags: str) -> float:
    """rows/s of one `distilq score` run, over the flow's own wall time (no imports or
    API start-up: a deployment or a long-lived worker does not pay those per run)."""
    _, _, out = run_measured(score_cmd(inputs, output, registry, "--json", *flags), env)
    summary = json.loads(out)
    return summary["rows_scored"] / summary["seconds"]


def section_dask(tmp, env, full, reg_full, reg_real, sst2_dev, imdb) -> list[str]:
    """Scale-out: a real dask scheduler with 1, then 2 worker processes (1 thread each), vs
    the local runner with 2 threads, on the same 8 files."""
    from distributed import Client

    data = tmp / "dask-data"
    data.mkdir()
    train = read_sst2("train.tsv")
    files, per_file = 8, 500
    for i in range(files):
        write_texts(data / f"part-{i}.parquet", train[i * per_file : (i + 1) * per_file])
    dask = str(Path(sys.executable).parent / "dask")
    address = "tcp://127.0.0.1:8786"
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    worker = [dask, "worker", address, "--nthreads", "1", *loopback]
    logs = open(tmp / "dask.log", "w")  # noqa: SIM115  (closed with the processes)
    procs = [
        subprocess.Popen([dask, "scheduler", "--port", "8786", *loopback], env=env, stderr=logs)
    ]
    rates = {}
    try:
        rates["local runner, 1 process x 2 threads"] = score_rate(
            data, tmp / "dask-local", reg_real, env, "--threads", "2"
        )
        for n in (1, 2):
            procs.append(subprocess.Popen(worker, env=env, stderr=logs))
            with Client(address, timeout=60) as client:
                client.wait_for_workers(n, timeout=120)
            # A new worker process imports torch and loads the model on its first task; a
            # long-lived cluster pays that once, so the second run shows the steady state.
            for run in ("first run", "second run"):
                rates[f"dask, {n} worker(s) x 1 thread, {run}"] = score_rate(
                    data, tmp / f"dask-{n}-{run[:3]}", reg_real, env, "--runner", "dask",
                    "--dask-address", address, "--threads", "1",
                )  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait()
        logs.close()
    base = rates["local runner, 1 process x 2 threads"]
    lines = [
        f"**Scale-out, real model, {files} files x {per_file} SST-2 train sentences** "
        "(rows/s over the flow's wall time, model loading per worker included)",
        "",
        "| runner | rows/s | vs local 2 threads |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rate:.1f} | {rate / base:.2f}x |" for name, rate in rates.items()]
    return lines


SECTIONS = {
    "speed": section_speed,
    "whole": section_whole,
    "agreement": section_agreement,
    "memory": section_memory,
    "startup": section_startup,
    "dask": section_dask,
}


def main() -> None:
    """Run the sections named on the command line (default: all)."""
    from bench_quantize import write_results

    if not SHARED_MODEL.is_dir():
        sys.exit(f"the shared model is not at {SHARED_MODEL}")
    names = sys.argv[1:] or list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        sys.exit(
            f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )
    sst2_dev, imdb = read_sst2("dev.tsv"), read_imdb()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
        full, reg_full, reg_real = setup(tmp, env)
        for name in names:
            stamp = (
                f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by bench/bench_score.py"
                f" on {cpu_model()} ({', '.join(cpu_features())}), {os.cpu_count()} cores."
            )
            lines = SECTIONS[name](tmp, env, full, reg_full, reg_real, sst2_dev, imdb)
            write_results([stamp, "", *lines], f"bench_score_{name}")
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
