"""Gating on your own data (the own-data issue): does `auto` still chase single flips?

The real shared model is gated on 1,821 labelled SST-2 sentences the package does not ship
(SST-2 train sentences outside `builtin:sst2-gate`; see src/distilq/data/PROVENANCE.md),
by the steps `quantize_and_promote` runs (split, FP32 on the tuning part, `auto`'s search
towards --pass-probability 0.9, both models on the confirmation part, the gate), for
`auto` started as on this CPU and, its features passed in as a value, as on a CPU with
VNNI (per-token INT8; here it runs the exact float32 GEMMs, so labels can differ from a
real VNNI CPU's in the last bits of the float layers). Measured:

- the default split: FP32 layers kept, bytes on disk against FP32's, the verdict;
- 20 other splits (the split's hash salted; 5 for this CPU's start, whose search is longer):
  how often `auto`'s choice then passes the confirmation gate (target >= 85%; the rule
  predicts at least 90%);
- the default data (`builtin:sst2-gate`): what the default gate certifies.

Writes its tables between markers in bench/RESULTS.md, again after each start is done.
Usage: python bench/bench_own_data.py [--splits 20] [--cpu-splits 5]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distilq.config.shared import BatchingPolicy, GateThresholds
from distilq.gate.compare import compare
from distilq.gate.data import load_validation, split
from distilq.gate.decide import decide
from distilq.hardware import cpu_features, cpu_model
from distilq.inference import predict
from distilq.quantize.autoquant import PassTarget, quantize_for_gate
from distilq.quantize.checkpoint import load_checkpoint, resolve_checkpoint
from distilq.recipes import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
sys.path.insert(0, str(ROOT / "bench"))
from bench_quantize import write_results  # noqa: E402

OWN_ROWS = 1821
THRESHOLDS = GateThresholds()  # 0.99 certified at 95%, accuracy drop <= 0.01
PASS_PROBABILITY = 0.9


def own_set(directory: Path, n: int = OWN_ROWS) -> Path:
    """`n` labelled SST-2 train sentences the package does not ship, as a user's TSV."""
    rows = []
    for line in (SHARED / "data" / "sst2" / "stsa" / "stsa.binary.train").read_text().splitlines():
        label, text = line[0], line[2:]
        shipped = int(hashlib.sha256(("ship:" + text).encode()).hexdigest()[:16], 16) / 2**64
        if shipped >= 0.45 and "\t" not in text:
            rows.append((hashlib.sha256(("own:" + text).encode()).hexdigest(), text, label))
    rows.sort()
    path = directory / "own.tsv"
    names = {"0": "negative", "1": "positive"}
    path.write_text(
        "text\tlabel\n" + "".join(f"{text}\t{names[label]}\n" for _, text, label in rows[:n])
    )
    return path


def gate(model, tokenizer, data, recipe, salt: str = "") -> dict:
    """`quantize_and_promote`'s gate on `data` split by `salt`, without publishing."""
    policy = BatchingPolicy()
    tuning, confirmation = split(data, salt)
    fp32_tuning = predict(model, tokenizer, tuning.texts, policy)
    target = PassTarget.for_gate(confirmation, THRESHOLDS, PASS_PROBABILITY)
    candidate = quantize_for_gate(model, tokenizer, recipe, tuning, fp32_tuning, policy, target)
    fp32 = predict(model, tokenizer, confirmation.texts, policy)
    int8 = predict(candidate.model, tokenizer, confirmation.texts, policy)
    metrics = compare(fp32, int8, confirmation, model.config.id2label, None, THRESHOLDS.confidence)
    chosen = candidate.attempts[candidate.chosen]
    return {
        "layers": len(candidate.fp32_layers),
        "bytes": chosen.size_bytes,
        "tuning": f"{chosen.tuning_flips} of {len(tuning.texts)}",
        "predicted": chosen.predicted_pass_probability,
        "flips": f"{metrics.flips} of {metrics.n_examples} (at most {target.allowed[0]})",
        "bound": metrics.agreement_lower_bound,
        "drop": metrics.accuracy_drop,
        "passed": decide(metrics, THRESHOLDS).approved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=20, help="splits, VNNI start")
    parser.add_argument("--cpu-splits", type=int, default=5, help="splits, this CPU's start")
    args = parser.parse_args()
    if not SHARED_MODEL.is_dir():
        sys.exit(f"the shared model is not at {SHARED_MODEL}")
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(SHARED_MODEL)
    fp32_bytes = resolve_checkpoint(str(SHARED_MODEL)).weight_bytes
    label2id = model.config.label2id
    with tempfile.TemporaryDirectory() as tmp:
        own = load_validation(str(own_set(Path(tmp))), label2id=label2id)
    builtin = load_validation("builtin:sst2-gate", label2id=label2id)
    starts = {
        "as on a VNNI CPU (features passed in)": resolve_recipe("auto", ["avx2", "avx512_vnni"]),
        f"this CPU ({', '.join(f for f in cpu_features() if 'avx' in f or 'amx' in f)})": (
            resolve_recipe("auto", cpu_features())
        ),
    }
    main_rows, split_rows = [], []
    for (where, recipe), splits in zip(starts.items(), (args.splits, args.cpu_splits), strict=True):
        for name, data in (("own 1,821 sentences", own), ("default `builtin:sst2-gate`", builtin)):
            r = gate(model, tokenizer, data, recipe)
            main_rows.append(
                f"| {where} | {recipe.base} | {name} | {r['layers']} | "
                f"{r['bytes'] / 2**20:.1f} MiB | {r['bytes'] / fp32_bytes:.1%} | {r['tuning']} | "
                f"{r['predicted']:.3f} | {r['flips']} | {r['bound']:.2%} | "
                f"{'pass' if r['passed'] else 'FAIL'} |"
            )
            print(main_rows[-1], flush=True)
        runs = [gate(model, tokenizer, own, recipe, f"split-{i}:") for i in range(splits)]
        passed = sum(r["passed"] for r in runs)
        layers = [r["layers"] for r in runs]
        split_rows.append(
            f"| {where} | {splits} | {passed} ({passed / splits:.0%}) | "
            f"{statistics.mean(r['predicted'] for r in runs):.3f} | "
            f"{min(layers)}-{max(layers)} (mean {statistics.mean(layers):.2f}; "
            f"{sum(n <= 1 for n in layers)} with at most 1) | "
            f"{max(r['bytes'] for r in runs) / fp32_bytes:.1%} |"
        )
        print(split_rows[-1], flush=True)
        _write(main_rows, split_rows, fp32_bytes, time.perf_counter() - start)


def _write(main_rows: list[str], split_rows: list[str], fp32_bytes: int, seconds: float) -> None:
    block = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`python bench/bench_own_data.py` on {cpu_model()} ({', '.join(cpu_features())}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{seconds:.0f} s in all. Real model, FP32 weights "
        f"{fp32_bytes / 2**20:.1f} MiB on disk; gate 0.99 certified at 95%, "
        f"--pass-probability {PASS_PROBABILITY}.",
        "",
        "| `auto` started | from | validation | FP32 layers | INT8 size | of FP32 | tuning "
        "flips | predicted P(pass) | confirmation flips | lower bound | gate |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *main_rows,
        "",
        "The own 1,821 sentences split other ways (salted hash):",
        "",
        "| `auto` started | splits | gate passed | mean predicted P(pass) | FP32 layers | "
        "largest size, of FP32 |",
        "|---|---:|---:|---:|---:|---:|",
        *split_rows,
    ]
    write_results(block, "bench_own_data")
    print("\n".join(block), flush=True)


if __name__ == "__main__":
    main()
