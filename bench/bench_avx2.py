"""INT8 numerics on an AVX2-only CPU, emulated: what MLAS and torch compute there, not how fast.

No AVX2-only machine is at hand (this workplace's CPUs vary from session to session), so
`qemu-x86_64 -cpu EPYC-Milan` (user mode, Debian's `qemu-user`) runs this venv's Python with
CPUID saying Zen 3: AVX2, no AVX-512, no VNNI. MLAS, fbgemm and torch then pick their AVX2
kernels (torch reports its capability as AVX2). Under qemu-user /proc/cpuinfo is still the
host's, so distilq's own run sees a copy without the AVX-512 and VNNI flags (bound over it
in a private mount namespace: needs root). QEMU emulates vector code about 100x slower than
it runs natively: there is no speed figure here.

1. MLAS's integer products at model widths against an int64 reference, uint8 x int8 and
   uint8 x uint8, here and emulated.
2. The real model's INT8 graphs: `ort-int8-token` as `auto` builds it for AVX2 (uint8
   weights) and ONNX Runtime's INT8 built by hand (`quantize_dynamic` per channel, int8 and
   uint8 weights): agreement with FP32 on SST-2 dev here and emulated, labels equal between
   the two, and one row one answer (alone, batches of 7 and 32) emulated.
3. The real model's default `quantize` with `auto` resolved for AVX2 (its gate runs here),
   then `distilq score` of 300 SST-2 sentences on the emulated CPU: the self-check that
   attests the AVX2 platform, and the audit.

Usage: python bench/bench_avx2.py    (apt-get install qemu-user; run as root; ~25 minutes)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
EMULATED_CPU = "EPYC-Milan"  # AMD Zen 3: AVX2, FMA, no AVX-512, no VNNI
# The flags an AVX2-only CPU lacks, removed from the /proc/cpuinfo the emulated run reads.
NOT_ON_ZEN3 = ("avx512", "avx_vnni", "amx", "vaes", "vpclmulqdq", "gfni")
GRAPHS = ("ort-int8-token", "by hand, int8 weights", "by hand, uint8 weights")
WIDTHS = (384, 768, 1536, 3072)  # the shared model's and the full-size shape's depths


def emulated(args: list[str], env: dict | None = None, cpuinfo: Path | None = None) -> str:
    """stdout of this venv's Python running `args` on the emulated Zen 3."""
    cmd = ["qemu-x86_64", "-cpu", EMULATED_CPU, sys.executable, *args]
    if cpuinfo is not None:  # mount --bind in a namespace of its own, gone when it ends
        inner = f"mount --bind {shlex.quote(str(cpuinfo))} /proc/cpuinfo && exec {shlex.join(cmd)}"
        cmd = ["unshare", "-m", "sh", "-c", inner]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"emulated run failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


# -- 1: the integer products -------------------------------------------------------------------


def products() -> dict:
    """Wrong int32 results of MatMulInteger per product kind and depth (64 x 64 outputs each;
    activations as distilq quantizes them, per row symmetric + 128, the first 8 rows and
    columns at the ends of the range)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(b: np.ndarray, zero, depth: int):
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])],
            "products",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, depth])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [None, b.shape[1]])],
            [
                numpy_helper.from_array(b, "b"),
                numpy_helper.from_array(np.uint8(128), "za"),
                numpy_helper.from_array(zero, "zb"),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    wrong = {}
    for depth in WIDTHS:
        a = np.clip(np.round(rng.standard_normal((64, depth)) * 60), -127, 127).astype(np.int64)
        a[:8] = rng.choice([-127, 127], size=(8, depth))
        q = np.clip(np.round(rng.standard_normal((depth, 64)) * 60), -127, 127).astype(np.int64)
        q[:, :8] = rng.choice([-127, 127], size=(depth, 8))
        exact = a @ q
        kinds = {
            "uint8 x int8": (q.astype(np.int8), np.int8(0)),
            "uint8 x uint8": ((q + 128).astype(np.uint8), np.uint8(128)),
        }
        for kind, (b, zero) in kinds.items():
            y = session(b, zero, depth).run(None, {"a": (a + 128).astype(np.uint8)})[0]
            wrong[f"{kind} {depth}"] = int((y.astype(np.int64) != exact).sum())
    return wrong


# -- 2: the real model's graphs ----------------------------------------------------------------


def build_graphs(out: Path) -> None:
    """The three INT8 graphs of the real model into `out`, and FP32's probabilities."""
    from bench_int8 import SHARED_MODEL, models_and_texts
    from onnxruntime.quantization import QuantType
    from ort_script import export_fp32, quantize_by_hand

    from distilq.config.shared import BatchingPolicy
    from distilq.inference import predict
    from distilq.quantize.int8 import quantize
    from distilq.recipes import resolve_recipe

    real, tokenizer, _, texts = models_and_texts()
    token = quantize(real, resolve_recipe("ort-int8-token", ["avx2"]))  # uint8 weights
    (out / f"{GRAPHS[0]}.onnx").write_bytes(token.graph)
    export_fp32(real, tokenizer, out / "fp32.onnx")
    for name, weights in zip(GRAPHS[1:], (QuantType.QInt8, QuantType.QUInt8), strict=True):
        quantize_by_hand(out / "fp32.onnx", out / f"{name}.onnx", weights)
    np.save(out / "fp32.npy", predict(real, tokenizer, texts["SST-2 dev"], BatchingPolicy()).probs)
    (out / "model").write_text(str(SHARED_MODEL))


def run_graphs(out: Path, where: str) -> None:
    """Each graph's probabilities on SST-2 dev (sorted batches of 32), and whether 40 texts
    get the same ones alone and in batches of 7 and 32, into `out`/`where`.npz."""
    from transformers import AutoConfig

    from distilq.config.shared import BatchingPolicy
    from distilq.gate.data import PACKAGED_VALIDATION, load_validation
    from distilq.inference import predict
    from distilq.quantize.checkpoint import load_checkpoint
    from distilq.quantize.onnx.session import OnnxModel

    model_dir = (out / "model").read_text()
    _, tokenizer = load_checkpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    texts = load_validation(PACKAGED_VALIDATION, label2id={"negative": 0, "positive": 1}).texts
    found = {}
    for name in GRAPHS:
        activations = "per-token" if name == GRAPHS[0] else "per-tensor"
        model = OnnxModel((out / f"{name}.onnx").read_bytes(), config, activations)
        found[name] = predict(model, tokenizer, texts, BatchingPolicy()).probs
        if name == GRAPHS[0]:
            few = texts[:40]
            alone = np.concatenate(
                [predict(model, tokenizer, [t], BatchingPolicy(batch_size=1)).probs for t in few]
            )
            batched = [
                predict(model, tokenizer, few, BatchingPolicy(batch_size=n)).probs for n in (7, 32)
            ]
            found["one row one answer"] = np.array([all(np.array_equal(alone, b) for b in batched)])
    np.savez(out / f"{where}.npz", **found)


def graphs_table(tmp: Path) -> list[str]:
    out = tmp / "graphs"
    out.mkdir()
    build_graphs(out)
    run_graphs(out, "here")
    emulated([__file__, "run-graphs", str(out)])
    fp32 = np.load(out / "fp32.npy").argmax(1)
    here, there = np.load(out / "here.npz"), np.load(out / "emulated.npz")
    lines = [
        "| graph | agreement with FP32, this CPU | agreement with FP32, emulated Zen 3 "
        "| labels equal, here and emulated | largest probability difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in GRAPHS:
        a, b = here[name], there[name]
        lines.append(
            f"| {name} | {(a.argmax(1) == fp32).mean():.2%} | {(b.argmax(1) == fp32).mean():.2%} "
            f"| {(a.argmax(1) == b.argmax(1)).mean():.2%} | {np.abs(a - b).max():.3f} |"
        )
    same = bool(there["one row one answer"][0])
    lines += [
        "",
        f"`ort-int8-token` on the emulated Zen 3, 40 texts alone and in batches of 7 and 32: "
        f"{'the same probabilities (np.array_equal)' if same else 'NOT the same probabilities'}.",
    ]
    return lines


# -- 3: quantize here, score there -------------------------------------------------------------


def zen3_cpuinfo(path: Path) -> Path:
    """/proc/cpuinfo as an AVX2-only CPU's: the flags it lacks removed, the name saying so."""
    lines = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, colon, value = line.partition(":")
        if key.strip() == "flags":
            value = " " + " ".join(f for f in value.split() if not f.startswith(NOT_ON_ZEN3))
        if key.strip() == "model name":
            value = f" AMD EPYC-Milan (emulated: qemu-x86_64 -cpu {EMULATED_CPU})"
        lines.append(key + colon + value)
    path.write_text("\n".join(lines) + "\n")
    return path


def attested_there(tmp: Path) -> list[str]:
    from bench_onnx import _env, default_as_on_avx2
    from bench_score import read_sst2, write_texts

    gate = default_as_on_avx2(tmp)  # the registry: tmp / "reg-avx2"
    registry = tmp / "reg-avx2"
    data = write_texts(tmp / "in.parquet", read_sst2("train.tsv")[:300])
    score = (
        "import sys; from distilq.cli.main import main; sys.argv[0] = 'distilq'; sys.exit(main())"
    )
    args = ["-c", score, "score", "--input", str(data), "--output", str(tmp / "scored"),
            "--registry", str(registry), "--threads", "1", "--audit-rate", "1"]  # fmt: skip
    start = time.perf_counter()
    emulated(args, env=_env(tmp), cpuinfo=zen3_cpuinfo(tmp / "cpuinfo"))
    seconds = time.perf_counter() - start
    (version,) = [p.name for p in (registry / "versions").iterdir()]
    records = sorted((registry / "versions" / version / "attestations").glob("*avx2*.json"))
    if not records:
        return [*gate, "", "The emulated run wrote no attestation for an AVX2 platform."]
    record = json.loads(records[0].read_text())
    platform = record["platform"]
    audit = json.loads((tmp / "scored" / "_manifest.json").read_text()).get("audit") or {}
    return [
        *gate,
        "",
        f"Then `distilq score --audit-rate 1` of 300 SST-2 sentences on the emulated Zen 3 "
        f"({seconds:.0f} s under QEMU). distilq saw `{platform['cpu']}`, features "
        f"{platform['features']}, torch capability {platform['torch_cpu_capability']}: platform "
        f"`{records[0].stem}`, which the version was not gated on, so it ran its self-check "
        f"there first: {'ATTESTED' if record['approved'] else 'NOT ATTESTED'}, "
        f"{'; '.join(record['reasons'])}; largest probability difference from the gate's "
        f"{record['max_abs_prob_diff']:.3f}. Audit of the scored rows in FP32: "
        f"{audit.get('agreeing')} of {audit.get('rows')} agree, verdict {audit.get('verdict')}.",
    ]


def main() -> None:
    if shutil.which("qemu-x86_64") is None:
        sys.exit("needs QEMU's user-mode emulator: apt-get install qemu-user")
    if os.geteuid() != 0:
        sys.exit("needs root: the emulated run sees its /proc/cpuinfo through a private mount")
    from bench_int8 import run_stamp
    from bench_quantize import write_results

    here = products()
    there = json.loads(emulated([__file__, "products"]))
    lines = [
        run_stamp("bench/bench_avx2.py", f", ONNX Runtime {__import__('onnxruntime').__version__}")
        + f" Emulated: `qemu-x86_64 -cpu {EMULATED_CPU}` (AMD Zen 3: AVX2, no AVX-512, no VNNI).",
        "",
        "MLAS's integer products against an int64 reference (wrong of 4,096 int32 results):",
        "",
        "| product | depth | wrong, this CPU | wrong, emulated Zen 3 |",
        "|---|---:|---:|---:|",
    ]
    for key, n in here.items():
        kind, depth = key.rsplit(" ", 1)
        lines.append(f"| {kind} | {depth} | {n} | {there[key]} |")
    with tempfile.TemporaryDirectory() as tmp:
        lines += ["", *graphs_table(Path(tmp)), "", *attested_there(Path(tmp))]
    write_results(lines, "bench_avx2")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["products"]:
        print(json.dumps(products()))
    elif sys.argv[1:2] == ["run-graphs"]:
        run_graphs(Path(sys.argv[2]), "emulated")
    else:
        main()
