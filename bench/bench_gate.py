"""Does the gate's promise hold on texts it never saw? (the certified-gate issue)

Quantizes the real shared model with `distilq quantize` on its defaults (the gate certifies
agreement >= 0.99 at 95% on the confirmation part of `builtin:sst2-gate`), then measures the
promoted model's agreement with FP32 on data kept out of the package:
- the 3,914 whole SST-2 train sentences not shipped in `builtin:sst2-gate`
  (see src/distilq/data/PROVENANCE.md), texts of the same kind as the gate's;
- 2,500 IMDB test reviews, long texts of another kind, which the default gate says nothing
  about (gate on them with --validation to cover them).

Writes its table between markers in bench/RESULTS.md. Usage: python bench/bench_gate.py
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import distilq
from distilq.gate.stats import agreement_lower_bound
from distilq.hardware import cpu_features, cpu_model
from distilq.inference import predict
from distilq.quantize.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
sys.path.insert(0, str(ROOT / "bench"))
from bench_quantize import write_results  # noqa: E402

csv.field_size_limit(1 << 24)


def held_out_sentences() -> list[str]:
    """SST-2 train sentences the package does not ship (the complement of its selection)."""
    texts = []
    for line in (SHARED / "data" / "sst2" / "stsa" / "stsa.binary.train").read_text().splitlines():
        text = line[2:]
        digest = int(hashlib.sha256(("ship:" + text).encode()).hexdigest()[:16], 16)
        if digest / 2**64 >= 0.45:
            texts.append(text)
    return texts


def imdb_reviews(n: int = 2500) -> list[str]:
    with open(SHARED / "data" / "imdb" / "imdb_test_sample_3000.csv", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)][:n]


def main() -> None:  # one top-down run: quantize by the CLI, then measure held-out texts
    if not SHARED_MODEL.is_dir():
        sys.exit(f"the shared model is not at {SHARED_MODEL}")
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "reg"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(Path(tmp) / "home"), DISTILQ_SOURCE=str(SHARED_MODEL))
        start = time.perf_counter()
        done = subprocess.run(
            [str(Path(sys.executable).parent / "distilq"), "quantize", "--json"]
            + ["--registry", str(registry)],
            capture_output=True,
            text=True,
            env=env,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"distilq quantize exited {done.returncode}:\n{done.stderr[-3000:]}")
        manifest = json.loads(done.stdout)
        int8 = distilq.load(registry)
        fp32, tokenizer = load_checkpoint(SHARED_MODEL)
        m = manifest["metrics"]
        rows = [
            (
                "gate: confirmation part of `builtin:sst2-gate`",
                m["n_examples"],
                m["agreement"],
                m["agreement_lower_bound"],
            )
        ]
        for name, texts in (
            ("held out: SST-2 sentences not shipped", held_out_sentences()),
            ("held out: IMDB test reviews (another kind of text)", imdb_reviews()),
        ):
            reference = predict(fp32, tokenizer, texts, int8.batching).labels
            labels = int8.predict_proba(texts).argmax(axis=1)
            agree = int((labels == reference).sum())
            rows.append(
                (
                    name,
                    len(texts),
                    agree / len(texts),
                    agreement_lower_bound(agree, len(texts), 0.95),
                )
            )
    block = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/bench_gate.py`"
        f" on {cpu_model()} ({', '.join(cpu_features())}), torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}.",
        "",
        f"`distilq quantize` on its defaults, real model: {manifest['version']}, "
        f"{len(manifest['recipe']['fp32_layers'])} Linear layers FP32, "
        f"{m['size_bytes_int8'] / 2**20:.1f} MiB on disk, {seconds:.0f} s whole process; "
        f"gate {'APPROVED' if manifest['decision']['approved'] else 'REJECTED'}.",
        "",
        "| texts | n | agreement with FP32 | lower bound (95%) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {n} | {a:.2%} | {b:.2%} |" for name, n, a, b in rows],
    ]
    write_results(block, "bench_gate")
    print("\n".join(block))


if __name__ == "__main__":
    main()
