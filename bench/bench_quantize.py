"""Recipes side by side: agreement, accuracy, bytes on disk and rows/s, in one run.

1. The real fine-tuned model in ../shared on GLUE SST-2 dev (agreement depends on values).
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

from distilq.autoquant import quantize_for_gate
from distilq.checkpoint import load_checkpoint, resolve_checkpoint
from distilq.config import BatchingPolicy
from distilq.hardware import cpu_features, cpu_model
from distilq.quantization import RECIPES, save_int8
from distilq.validation import (
    PACKAGED_VALIDATION,
    best_rows_per_second,
    compare,
    load_validation,
    predict,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "distilbert-sst2-minilm"
RESULTS = ROOT / "bench" / "RESULTS.md"
MIB = 2**20
POLICY = BatchingPolicy()  # batch 32, sorted by token length: the default policy


def real_model(tmp: Path) -> list[str]:
    found = resolve_checkpoint(str(SHARED_MODEL))
    model, tokenizer = load_checkpoint(found.path)
    data = load_validation(PACKAGED_VALIDATION, label2id=model.config.label2id)
    fp32 = predict(model, tokenizer, data.texts, POLICY, progress="FP32")
    rows, models = {}, {"FP32": model}
    for name in ("dynamic-int8", "dynamic-int8-pc", "auto"):
        start = time.perf_counter()
        candidate = quantize_for_gate(model, tokenizer, name, data, fp32, POLICY, 0.995)
        seconds = time.perf_counter() - start
        metrics = compare(fp32, candidate.predictions, data, model.config.id2label)
        model.config.save_pretrained(tmp / name)
        size = save_int8(candidate.model, candidate.recipe, tmp / name).stat().st_size
        rows[name] = (metrics, size, len(candidate.fp32_layers), seconds)
        models[name] = candidate.model
    speed = best_rows_per_second(models, tokenizer, data.texts, POLICY, passes=2)
    fp32_bytes = found.weight_bytes
    lines = [
        f"Real model `distilbert-sst2-minilm` (6 layers, dim 384), GLUE SST-2 dev "
        f"({len(data.texts)} rows), batch 32 sorted by token length. rows/s: best of 2 "
        "interleaved passes.",
        "",
        "| recipe | agreement | flips | accuracy | bytes on disk | of FP32 | FP32 layers "
        "| rows/s | vs FP32 | time to quantize+validate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| FP32 | 100% | 0 | {rows['dynamic-int8'][0].accuracy_fp32:.2%} | "
        f"{fp32_bytes / MIB:.1f} MiB | 100% | all | {speed['FP32']:.1f} | 1.00x | |",
    ]
    for name, (m, size, n_fp32, seconds) in rows.items():
        lines.append(
            f"| `{name}` | {m.agreement:.2%} | {m.flips} | {m.accuracy_int8:.2%} | "
            f"{size / MIB:.1f} MiB | {size / fp32_bytes:.1%} | {n_fp32} | {speed[name]:.1f} | "
            f"{speed[name] / speed['FP32']:.2f}x | {seconds:.0f} s |"
        )
    auto_layers = rows["auto"]
    lines += [
        "",
        f"`auto` (target 0.995, tuned and measured here on the same rows to compare recipes; "
        f"the gate itself tunes and judges on separate parts, see bench_gate) kept "
        f"{auto_layers[2]} Linear layer(s) in FP32.",
    ]
    return lines


def full_size(tmp: Path) -> list[str]:
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from distilq.quantization import quantize

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig()).eval()
    model.save_pretrained(tmp / "full-fp32")
    fp32_bytes = (tmp / "full-fp32" / "model.safetensors").stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODEL)  # the same uncased vocabulary
    texts = load_validation(PACKAGED_VALIDATION).texts
    models, sizes = {"FP32": model}, {"FP32": fp32_bytes}
    for name in ("dynamic-int8", "dynamic-int8-pc"):
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
