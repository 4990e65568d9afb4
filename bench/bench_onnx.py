"""The onnxruntime engine against torch and against ONNX Runtime built by hand (#32), with
the CPU named.

- In process (2 threads, batches of 32 sorted by length), rows/s on SST-2 dev and on 120
  IMDB reviews, best of 2 interleaved passes: torch FP32, distilq `dynamic-int8-pc` and
  `dynamic-int8-token` (torch), ONNX Runtime per-channel dynamic INT8 built by hand as
  Optimum users do (TorchScript export, `quantize_dynamic`), distilq `ort-int8-pc` and
  `ort-int8-token`; agreement with FP32 on SST-2 dev (real model). For the real shared
  model and the full-size `DistilBertConfig()` shape (random weights).
- Whole process, full-size shape, 16,000 SST-2 training sentences: `distilq quantize`
  (defaults; the gate's bar lowered to 0.5, as random weights agree by chance) then
  `distilq score` (defaults, audit included), against bench/ort_script.py (ONNX Runtime
  by hand, its export and quantization timed apart) and bench/pipeline_script.py (the FP32
  transformers pipeline, batch 8).
- The default `quantize` of the real model as on an AVX2 CPU (features passed in): what
  `auto` kept, its certified bound, FP32 layers and bytes on disk.

Writes its tables between markers in bench/RESULTS.md. Usage: python bench/bench_onnx.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from distilq.config.shared import BatchingPolicy
from distilq.hardware import cpu_features
from distilq.inference import predict
from distilq.quantize.int8 import quantize
from distilq.recipes import for_cpu, get_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
sys.path.insert(0, str(ROOT / "bench"))
from bench_int8 import OrtClassifier, models_and_texts, rates_table, run_stamp  # noqa: E402
from bench_quantize import write_results  # noqa: E402
from bench_score import (  # noqa: E402
    quantize_into,
    read_sst2,
    run_measured,
    score_cmd,
    setup_full,
    write_texts,
)

POLICY = BatchingPolicy()
BY_HAND = "ONNX Runtime INT8 pc, by hand"
RECIPES = ("dynamic-int8-pc", "dynamic-int8-token", "ort-int8-pc", "ort-int8-token")


def _rate(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def in_process(model, tokenizer, texts: dict[str, list[str]], tmp: Path) -> tuple[dict, dict]:
    """rows/s of every path on every text set, and each path's labels on the first set."""
    paths = {"torch FP32": model}
    # get_recipe, not resolve_recipe: the retired dynamic-int8-pc is built for comparison only
    paths.update({n: quantize(model, for_cpu(get_recipe(n), cpu_features())) for n in RECIPES})
    by_hand = OrtClassifier(model, tokenizer, tmp)

    def run(name, batch):
        if name == BY_HAND:
            return by_hand.predict(batch)
        return predict(paths[name], tokenizer, batch, POLICY).probs

    names = [*paths, BY_HAND]
    rates = {(n, k): 0.0 for n in names for k in texts}
    for _ in range(2):
        for kind, batch in texts.items():
            for name in names:
                rates[name, kind] = max(
                    rates[name, kind], _rate(lambda n=name, b=batch: run(n, b), len(batch))
                )
    first = next(iter(texts.values()))
    return rates, {name: run(name, first).argmax(1) for name in names}


def speed_table(title: str, model, tokenizer, texts: dict, tmp: Path, agreement: bool) -> list:
    rates, labels = in_process(model, tokenizer, texts, tmp)
    names = list(dict.fromkeys(n for n, _ in rates))
    shares = None
    if agreement:
        fp32 = labels["torch FP32"]
        shares = {n: float((labels[n] == fp32).mean()) for n in names if n != "torch FP32"}
    return rates_table(title, names, list(texts), rates, (BY_HAND, "by hand"), shares)


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp / "prefect")
    return env


def whole_process(tmp: Path) -> list[str]:
    (tmp / "whole").mkdir()
    full = setup_full(tmp / "whole")
    texts = read_sst2("train.tsv")[:16_000]
    (tmp / "sst2-16k").mkdir()
    data = write_texts(tmp / "sst2-16k" / "part.parquet", texts)
    env, registry = _env(tmp), tmp / "reg-full"
    start = time.perf_counter()
    version = quantize_into(registry, full, "--min-agreement", "0.5", env=env)
    quantized = time.perf_counter() - start
    manifest = json.loads((registry / "versions" / version / "manifest.json").read_text())
    kept = manifest["recipe"]["auto"]["base"]
    scored, rss, _ = run_measured(score_cmd(data, tmp / "out-distilq", registry), env)
    script = [sys.executable, str(ROOT / "bench" / "ort_script.py"), str(full), str(data)]
    threads = str(torch.get_num_threads())
    built, _, _ = run_measured([*script, str(tmp / "by-hand-build.parquet"), threads], env)
    by_hand, by_hand_rss, _ = run_measured([*script, str(tmp / "by-hand.parquet"), threads], env)
    pipe = [sys.executable, str(ROOT / "bench" / "pipeline_script.py"), str(full), str(data)]
    fp32, fp32_rss, _ = run_measured([*pipe, str(tmp / "pipeline.parquet"), "8"], env)
    n = len(texts)
    rows = [
        ("`distilq score` (defaults, audit included)", scored, rss),
        ("ONNX Runtime INT8 by hand (bench/ort_script.py)", by_hand, by_hand_rss),
        ("FP32 transformers pipeline, batch 8", fp32, fp32_rss),
    ]
    lines = [
        f"Whole process, full-size `DistilBertConfig()` (random weights), {n:,} SST-2 training "
        f"sentences, {threads} threads. `distilq quantize` (defaults, bar 0.5) took "
        f"{quantized:.1f} s and kept `{kept}`; the hand-built export and quantization "
        f"{built - by_hand:.1f} s more than its scoring run.",
        "",
        "| process | seconds | rows/s | peak RSS MiB "
        "| `distilq score` is this many times as fast |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds, peak in rows:
        lines.append(
            f"| {name} | {seconds:.1f} | {n / seconds:.0f} | {peak:.0f} | {seconds / scored:.2f}x |"
        )
    return lines


AS_AVX2 = """
import json, sys
import distilq.pipelines.quantize as q
from distilq.config.quantize import QuantizeConfig
q.cpu_features = lambda: ["avx2"]
result = q.quantize_and_promote(QuantizeConfig(source=sys.argv[1], registry=sys.argv[2]))
print(json.dumps(result.manifest.dump()))
"""


def default_as_on_avx2(tmp: Path) -> list[str]:
    """The real model's default `quantize`, `auto` resolved for an AVX2 CPU."""
    env = _env(tmp)
    cmd = [sys.executable, "-c", AS_AVX2, str(SHARED_MODEL), str(tmp / "reg-avx2")]
    seconds, _, out = run_measured(cmd, env)
    m = json.loads(out.splitlines()[-1])
    fp32_bytes, int8_bytes = m["metrics"]["size_bytes_fp32"], m["metrics"]["size_bytes_int8"]
    sets = m["metrics"]["sets"]
    bound = min(s["agreement_lower_bound"] for s in sets)
    tried = ", ".join(
        f"`{a['recipe']}` {a['rows_per_second']:.0f} rows/s, P(pass) "
        f"{a['predicted_pass_probability']:.3f}"
        for a in m["recipe"]["auto"]["attempts"]
        if not a["fp32_layers"]
    )
    return [
        f"Default `distilq quantize` of the real model with `auto` resolved for an AVX2 CPU "
        f"(features passed in; products and speed are this CPU's): kept "
        f"`{m['recipe']['auto']['base']}` ({tried}); agreement lower bound {bound:.4f} at "
        f"95% ({'APPROVED' if m['decision']['approved'] else 'REJECTED'}), "
        f"{len(m['recipe']['fp32_layers'])} FP32 Linear layer(s), {int8_bytes / 2**20:.1f} MiB "
        f"on disk = {int8_bytes / fp32_bytes:.1%} of FP32's; {seconds:.0f} s.",
    ]


def main() -> None:
    real, tokenizer, full, texts = models_and_texts()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "real").mkdir()
        (tmp / "full").mkdir()
        ort = f", ONNX Runtime {__import__('onnxruntime').__version__}"
        block = [
            f"{run_stamp('bench/bench_onnx.py', ort)} No FP32 layer in any INT8 path below.",
            "",
            *speed_table(
                "Real model `distilbert-sst2-minilm`:", real, tokenizer, texts, tmp / "real", True
            ),
            "",
            *speed_table(
                "Full-size `DistilBertConfig()`, random weights:",
                full,
                tokenizer,
                texts,
                tmp / "full",
                False,
            ),
            "",
            *whole_process(tmp),
            "",
            *default_as_on_avx2(tmp),
        ]
    write_results(block, "bench_onnx")
    print("\n".join(block))


if __name__ == "__main__":
    main()
