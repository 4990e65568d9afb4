"""The ONNX Runtime baseline a CPU-minded user builds by hand, as Optimum's ORTQuantizer
does it: export (TorchScript exporter, as Optimum's), `quantize_dynamic` per-channel weights
of the type Optimum's preset for this CPU takes (`optimum_weights`), one session on every
core, batches of 32 sorted by length, over a Parquet file.

Usage: python bench/ort_script.py MODEL_DIR INPUT.parquet OUTPUT.parquet THREADS
(exports and quantizes into MODEL_DIR/ort-by-hand/ on first use; that step is timed apart)
"""

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer


def export_fp32(model, tokenizer, path: Path) -> Path:
    """`model` as an FP32 ONNX graph at `path`, as Optimum exports it (TorchScript exporter,
    batch and token axes dynamic)."""
    import torch

    enc = tokenizer(["a b c"], return_tensors="pt")
    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(
        model, (enc["input_ids"], enc["attention_mask"]), str(path),
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
        dynamo=False,
    )  # fmt: skip
    return path


def optimum_weights(features: list[str]):
    """The weight type of Optimum's `AutoQuantizationConfig` preset for a CPU with these ISA
    features (`distilq.hardware.cpu_features`): int8 with AVX-512 (its `avx512` and
    `avx512_vnni` presets), uint8 on AVX2 alone (its `avx2` preset; there MLAS's uint8 x
    int8 products saturate, bench_avx2)."""
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if "avx512f" in features else QuantType.QUInt8


def quantize_by_hand(fp32: Path, int8: Path, weights) -> Path:
    """`quantize_dynamic` per channel with `weights` (a `QuantType`), as Optimum's dynamic
    presets do it."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(fp32, int8, per_channel=True, weight_type=weights)
    return int8


def build(model_dir: Path, features: list[str]) -> Path:
    """The INT8 graph beside the checkpoint, made once per weight type."""
    from transformers import AutoModelForSequenceClassification

    out = model_dir / "ort-by-hand"
    weights = optimum_weights(features)
    int8 = out / f"model.{weights.name}.onnx"
    if int8.exists():
        return int8
    out.mkdir(exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    fp32 = export_fp32(model, AutoTokenizer.from_pretrained(model_dir), out / "model.onnx")
    return quantize_by_hand(fp32, int8, weights)


def main() -> None:
    model_dir, source, target, threads = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    from distilq.hardware import cpu_features

    start = time.perf_counter()
    path = build(model_dir, cpu_features())
    print(f"built {path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    texts = pq.read_table(source).column("text").to_pylist()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    probs = np.zeros((len(texts), 2), dtype=np.float32)
    for i in range(0, len(order), 32):
        rows = order[i : i + 32]
        enc = tokenizer(
            [texts[r] for r in rows], padding=True, truncation=True, return_tensors="np"
        )
        feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        (logits,) = session.run(None, feeds)
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs[rows] = e / e.sum(1, keepdims=True)
    table = {"label": probs.argmax(1).tolist(), "score": probs.max(1).tolist()}
    pq.write_table(pa.table(table), target)


if __name__ == "__main__":
    main()
