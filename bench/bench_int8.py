"""INT8 paths side by side in one run (the per-token issue): rows/s, agreement, batch
independence and one-row start-up, with the CPU named.

- In-process rows/s, best of interleaved passes: transformers pipeline FP32 (best of batch
  8 and 32), distilq FP32, `dynamic-int8-pc`, `dynamic-int8-token` (eager, and with its
  kernel compiled), and ONNX Runtime dynamic INT8 per-channel (exported and quantized
  here only; not a distilq dependency), on SST-2 dev and on 120 IMDB reviews, for the real
  shared model and the full-size DistilBertConfig() shape (random weights).
- Agreement with FP32 on SST-2 dev (real model), no FP32 layer for any of them.
- Batch independence: `distilq score --probabilities` of SST-2 dev with a per-token version
  at batch sizes 1, 7 and 32, largest probability difference.
- Whole process, one row, `distilq score`: a per-token version vs a per-channel one; 1,000
  IMDB reviews by default and with DISTILQ_COMPILE=1; compiling alone, cold and warm cache.

Writes its tables between markers in bench/RESULTS.md. Usage: python bench/bench_int8.py
(ONNX Runtime comes with the dev extra).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distilq.config.shared import BatchingPolicy
from distilq.gate.data import PACKAGED_VALIDATION, load_validation
from distilq.hardware import cpu_features, cpu_model
from distilq.inference import predict
from distilq.quantize.int8 import quantize
from distilq.quantize.kernels.token_linear import TOKEN_KERNELS, token_linear

# The packaged SST-2 set's labels as the shared model's classes (texts only are read here).
SST2_CLASSES = {"negative": 0, "positive": 1}
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "distilbert-sst2-minilm"
sys.path.insert(0, str(ROOT / "bench"))
from bench_quantize import write_results  # noqa: E402
from bench_score import quantize_into, run_measured, score_cmd  # noqa: E402

csv.field_size_limit(1 << 24)
POLICY = BatchingPolicy()
RECIPES = ("dynamic-int8-pc", "dynamic-int8-token")
COMPILED = ", compiled kernel"
COMPILE_ONLY = (
    "import time; from distilq.quantize.kernels.token_linear import TOKEN_KERNELS; "
    "start = time.perf_counter(); "
    "assert TOKEN_KERNELS.compile(); print(time.perf_counter() - start)"
)


def imdb_reviews(n: int = 120) -> list[str]:
    with open(SHARED / "data" / "imdb" / "imdb_test_sample_3000.csv", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)][:n]


class OrtClassifier:
    """ONNX Runtime dynamic INT8 of an FP32 model as Optimum builds it for this CPU (per-channel
    weights of its preset's type, `ort_script.optimum_weights`), batched as distilq."""

    def __init__(self, model, tokenizer, directory: Path):
        import onnxruntime as ort
        from ort_script import export_fp32, optimum_weights, quantize_by_hand

        fp32_path = export_fp32(model, tokenizer, directory / "model.onnx")
        weights = optimum_weights(cpu_features())
        int8_path = quantize_by_hand(fp32_path, directory / "model.int8.onnx", weights)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(int8_path), options)
        self.tokenizer = tokenizer

    def predict(self, texts: list[str]) -> np.ndarray:
        """Probabilities, in sorted-by-length batches of 32 like distilq's policy."""
        order = sorted(range(len(texts)), key=lambda i: len(self.tokenizer.tokenize(texts[i])))
        probs = np.zeros((len(texts), 2), dtype=np.float32)
        for start in range(0, len(order), POLICY.batch_size):
            rows = order[start : start + POLICY.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=POLICY.max_length,
                return_tensors="np",
            )
            (logits,) = self.session.run(
                None, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            )
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs[rows] = e / e.sum(1, keepdims=True)
        return probs


def _rate(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def rates_and_agreement(model, tokenizer, texts: dict[str, list[str]], tmp: Path) -> tuple:
    """rows/s of every path on every text set (best of 2 interleaved passes), and each INT8
    path's labels on the first set."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1)
    runners = {
        "pipeline FP32": lambda t: max(
            _rate(lambda b=b: classify(t, batch_size=b, truncation=True), len(t)) for b in (8, 32)
        ),
        "distilq FP32": lambda t: _rate(lambda: predict(model, tokenizer, t, POLICY), len(t)),
    }
    # Each INT8 path with the per-token kernel it runs (set before each run: one model, two
    # kernels, for the per-token recipe).
    int8 = {name: (quantize(model, name), token_linear) for name in RECIPES}
    if TOKEN_KERNELS.compile():
        int8[f"dynamic-int8-token{COMPILED}"] = (
            int8["dynamic-int8-token"][0],
            TOKEN_KERNELS.compiled,
        )

    def int8_predict(t, name):
        q, TOKEN_KERNELS.linear = int8[name]
        return predict(q, tokenizer, t, POLICY)

    for name in int8:
        runners[name] = lambda t, name=name: _rate(lambda: int8_predict(t, name), len(t))
    ort_model = OrtClassifier(model, tokenizer, tmp)
    runners["ONNX Runtime INT8 pc"] = lambda t: _rate(lambda: ort_model.predict(t), len(t))
    rates = {(name, kind): 0.0 for name in runners for kind in texts}
    for _ in range(2):
        for kind, batch in texts.items():
            for name, run in runners.items():
                rates[name, kind] = max(rates[name, kind], run(batch))
    first = next(iter(texts.values()))
    labels = {name: int8_predict(first, name).labels for name in int8}
    labels["ONNX Runtime INT8 pc"] = ort_model.predict(first).argmax(1)
    return rates, labels, list(runners)


def speed_table(title: str, model, tokenizer, texts: dict, tmp: Path, fp32_labels=None):
    rates, labels, names = rates_and_agreement(model, tokenizer, texts, tmp)
    agreement = None
    if fp32_labels is not None:  # paths without labels of their own (FP32) show none
        agreement = {n: float((labels[n] == fp32_labels).mean()) for n in labels}
    return rates_table(title, names, list(texts), rates, ("dynamic-int8-pc", "pc"), agreement)


def rates_table(title, names, kinds, rates, against, agreement=None) -> list[str]:
    """A Markdown table of rows/s per path and text set, each also as a ratio to the path
    `against` = (name, its label); with `agreement` (path -> share), a column of it for
    the first set."""
    base, label = against
    header = ["path", *[f"rows/s {k}" for k in kinds], *[f"vs {label}, {k}" for k in kinds]]
    if agreement is not None:
        header.append(f"agreement with FP32, {kinds[0]}")
    lines = [title, "", "| " + " | ".join(header) + " |"]
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    for name in names:
        cells = [f"{rates[name, k]:.1f}" for k in kinds]
        cells += [f"{rates[name, k] / rates[base, k]:.2f}x" for k in kinds]
        if agreement is not None:
            cells.append(f"{agreement[name]:.2%}" if name in agreement else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def batch_independence_and_startup(tmp: Path) -> list[str]:
    """Through the CLI: a per-token and a per-channel version of the real model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp / "prefect")
    dev = load_validation(PACKAGED_VALIDATION, label2id=SST2_CLASSES).texts
    pq.write_table(pa.table({"text": dev}), tmp / "dev.parquet")
    pq.write_table(pa.table({"text": dev[:1]}), tmp / "one.parquet")
    registries = {}
    for recipe in RECIPES:
        registries[recipe] = tmp / f"reg-{recipe}"
        # The gate is not what this measures: per-channel alone misses the default 0.99.
        flags = ("--recipe", recipe, "--min-agreement", "0.95")
        quantize_into(registries[recipe], SHARED_MODEL, *flags, env=env)
    probs = {}
    for size in (1, 7, 32):
        out = tmp / f"dev-{size}"
        cmd = score_cmd(tmp / "dev.parquet", out, registries["dynamic-int8-token"])
        run_measured([*cmd, "--probabilities", "--batch-size", str(size)], env)
        table = pq.read_table(out / "dev.parquet")
        probs[size] = np.stack([table[c].to_numpy() for c in table.column_names if "prob_" in c])
    diff = max(float(np.abs(probs[s] - probs[1]).max()) for s in (7, 32))
    reviews = tmp / "imdb.parquet"
    pq.write_table(pa.table({"text": imdb_reviews(1000)}), reviews)
    whole = {}
    for name, extra in (("default", {}), ("compiled", {"DISTILQ_COMPILE": "1"})):
        cmd = score_cmd(reviews, tmp / f"imdb-{name}", registries["dynamic-int8-token"])
        start = time.perf_counter()
        done = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True)
        compiled = "per-token INT8 kernel compiled in" in done.stderr
        whole[name] = f"{time.perf_counter() - start:.1f} s ({'compiled' if compiled else 'eager'})"
    cold_cache = {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
    compile_cold = float(run_measured([sys.executable, "-c", COMPILE_ONLY], cold_cache)[2])
    compile_warm = float(run_measured([sys.executable, "-c", COMPILE_ONLY], cold_cache)[2])
    startup = {}
    for recipe, registry in registries.items():
        times = []
        for i in range(3):
            cmd = score_cmd(tmp / "one.parquet", tmp / f"one-{recipe}-{i}", registry)
            times.append(run_measured(cmd, env)[0])
        startup[recipe] = min(times)
    return [
        "Through `distilq score` (real model, ephemeral Prefect API): SST-2 dev scored by a "
        f"`dynamic-int8-token` version at batch sizes 1, 7 and 32: largest difference of any "
        f"probability {diff:.1e}. One row, whole process, best of 3: "
        + ", ".join(f"`{r}` {s:.1f} s" for r, s in startup.items())
        + f". 1,000 IMDB reviews, whole process, `dynamic-int8-token`: {whole['default']} by "
        f"default, {whole['compiled']} with DISTILQ_COMPILE=1 (compile included). Compiling "
        "the per-token kernel: "
        f"{compile_cold:.1f} s with an empty inductor cache, {compile_warm:.1f} s from it.",
    ]


def models_and_texts() -> tuple:
    """The real shared model and its tokenizer, the full-size `DistilBertConfig()` shape with
    random weights (seed 0), and the text sets: SST-2 dev and the IMDB reviews."""
    if not SHARED_MODEL.is_dir():
        sys.exit(f"the shared model is not at {SHARED_MODEL}")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from distilq.quantize.checkpoint import load_checkpoint

    dev = load_validation(PACKAGED_VALIDATION, label2id=SST2_CLASSES).texts
    texts = {"SST-2 dev": dev, "IMDB": imdb_reviews()}
    real, tokenizer = load_checkpoint(SHARED_MODEL)
    torch.manual_seed(0)
    full = DistilBertForSequenceClassification(DistilBertConfig()).eval()
    return real, tokenizer, full, texts


def run_stamp(script: str, versions: str = "") -> str:
    """When, by what and on which CPU a bench ran (`versions`: engines besides torch)."""
    return (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python {script}` on "
        f"{cpu_model()} ({', '.join(cpu_features())}), {os.cpu_count()} cores, torch "
        f"{torch.__version__}{versions} ({torch.get_num_threads()} threads)."
    )


def main() -> None:
    real, tokenizer, full, texts = models_and_texts()
    fp32_labels = predict(real, tokenizer, texts["SST-2 dev"], POLICY).labels
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "real").mkdir()
        (tmp / "full").mkdir()
        block = [
            f"{run_stamp('bench/bench_int8.py')} No FP32 layer in any INT8 path.",
            "",
            *speed_table(
                "Real model `distilbert-sst2-minilm`:",
                real,
                tokenizer,
                texts,
                tmp / "real",
                fp32_labels,
            ),
            "",
            *speed_table(
                "Full-size `DistilBertConfig()`, random weights:",
                full,
                tokenizer,
                texts,
                tmp / "full",
            ),
            "",
            *batch_independence_and_startup(tmp),
        ]
    write_results(block, "bench_int8")
    print("\n".join(block))


if __name__ == "__main__":
    main()
