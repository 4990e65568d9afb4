"""Recipes side by side: agreement, accuracy, bytes on disk and rows/s, in one run.

1. The real fine-tuned model in ../shared on GLUE SST-2 dev (agreement depends on values),
   each recipe run through the library pipeline `distilq.pipelines.quantize_and_promote`.
2. A full-size DistilBertConfig() with random weights (bytes and speed do not).

Writes its tables between markers in bench/RESULTS.md. Usage: python bench/bench_quantize.py
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from distilq.config.quantize import QuantizeConfig
from distilq.config.shared import BatchingPolicy
from distilq.gate.compare import best_rows_per_second
from distilq.gate.data import PACKAGED_VALIDATION, load_validation
from distilq.hardware import cpu_features, cpu_model
from distilq.pipelines.quantize import quantize_and_promote
from distilq.quantize.int8 import save_int8
from distilq.recipes import CURRENT_NAMES, RECIPES

# The packaged SST-2 set's labels as the shared model's classes (texts only are read here).
SST2_CLASSES = {"negative": 0, "positive": 1}
ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "distilbert-sst2-minilm"
RESULTS = ROOT / "bench" / "RESULTS.md"
MIB = 2**20
POLICY = BatchingPolicy()  # batch 32, sorted by token length: the default policy


def real_model(tmp: Path) -> list[str]:
    """Every recipe through the library pipeline itself (a dry run each, as `distilq
    quantize --dry-run --recipe R` would): the figures are the gate's own."""
    runs = {}
    for name in CURRENT_NAMES:
        config = QuantizeConfig(
            source=str(SHARED_MODEL),
            recipe=name,
            validation=[PACKAGED_VALIDATION],
            registry=str(tmp / "registry"),
            dry_run=True,
        )
        start = time.perf_counter()
        result = quantize_and_promote(config)
        runs[name] = (result, time.perf_counter() - start)
        Path(result.report).unlink()
    first = next(iter(runs.values()))[0].manifest
    split = first.validation.split
    lines = [
        "Real model `distilbert-sst2-minilm` (6 layers, dim 384), GLUE SST-2 dev through the "
        f"library pipeline (a dry run per recipe): tuned on {split.tuning} rows, measured on "
        f"the {split.confirmation} confirmation rows; batch 32 sorted by token length. "
        "rows/s: warm, best of interleaved passes, INT8 against FP32 within each run.",
        "",
        "| recipe | gate | agreement | lower bound (95%) | flips | accuracy FP32 -> INT8 "
        "| bytes on disk | of FP32 | FP32 layers | rows/s FP32 | rows/s INT8 | INT8 / FP32 "
        "| time to quantize+validate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (result, seconds) in runs.items():
        m = result.manifest.metrics
        ratio = m.rows_per_second_int8 / m.rows_per_second_fp32
        lines.append(
            f"| `{name}` | {'approved' if result.approved else 'rejected'} | {m.agreement:.2%} "
            f"| {m.agreement_lower_bound:.2%} | {m.flips} "
            f"| {m.accuracy_fp32:.2%} -> {m.accuracy_int8:.2%} "
            f"| {m.size_bytes_int8 / MIB:.1f} MiB | {m.size_bytes_int8 / m.size_bytes_fp32:.1%} "
            f"| {len(result.manifest.recipe.fp32_layers)} | {m.rows_per_second_fp32:.1f} "
            f"| {m.rows_per_second_int8:.1f} | {ratio:.2f}x "
            f"| {seconds:.0f} s |"
        )
    return lines


def full_size(tmp: Path) -> list[str]:
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from distilq.quantize.int8 import quantize

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig()).eval()
    model.save_pretrained(tmp / "full-fp32")
    fp32_bytes = (tmp / "full-fp32" / "model.safetensors").stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODEL)  # the same uncased vocabulary
    texts = load_validation(PACKAGED_VALIDATION, label2id=SST2_CLASSES).texts
    models, sizes = {"FP32": model}, {"FP32": fp32_bytes}
    for name in RECIPES:
        models[name] = quantize(model, name)
        model.config.save_pretrained(tmp / f"full-{name}")
        sizes[name] = save_int8(models[name], RECIPES[name], tmp / f"full-{name}").stat().st_size
    speed = best_rows_per_second(models, tokenizer, texts, POLICY, passes=2)
    lines = [
        "Full-size `DistilBertConfig()` (the hub model's shape: 6 layers, dim 768, 66.9 M "
        "parameters), random weights, SST-2 dev sentences.",
        "",
        "| recipe | bytes on disk | MiB | of FP32 | rows/s | vs FP32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        lines.append(
            f"| {name if name == 'FP32' else f'`{name}`'} | {sizes[name]:,} | "
            f"{sizes[name] / MIB:.1f} | {sizes[name] / fp32_bytes:.1%} | {speed[name]:.1f} | "
            f"{speed[name] / speed['FP32']:.2f}x |"
        )
    return lines


def write_results(block: list[str], name: str = "bench_quantize") -> None:
    """Replace the block between `<!-- name:start -->` and `<!-- name:end -->` in RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    body = "\n".join([start, *block, end])
    RESULTS.write_text(
        re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S)
    )


def main() -> None:
    if not SHARED_MODEL.is_dir():
        sys.exit(f"the shared model is not at {SHARED_MODEL}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        header = [
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench` on "
            f"{cpu_model()} ({', '.join(cpu_features())}), {os.cpu_count()} cores, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads).",
            "",
        ]
        block = header + real_model(tmp) + [""] + full_size(tmp)
    write_results(block)
    print("\n".join(block))


if __name__ == "__main__":
    main()
