"""Running an ONNX graph as distilq runs a model: one set of session options for the gate,
the attestation and scoring, and a model object `inference.predict` calls like a torch one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from distilq.errors import InputError, IntegrityError
from distilq.recipes import ONNX_MISSING, ONNXRUNTIME, installed_engines

PROVIDER = "CPUExecutionProvider"
OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"  # the session's own graph optimisations, recorded
# ...but for this one: ONNX Runtime 1.32's SkipLayerNormalization kernel takes 5x the time
# of the Add + LayerNormalization it replaces ([800, 768] rows: 1.9 ms against 0.37 ms,
# measured here), 18% of a full-size INT8 forward.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
GRAPH_FILE = "model.onnx"
FORMAT_ONNX = "distilq-onnx/1"  # the graph's `distilq` metadata: format and activations


def require_onnxruntime(what: str) -> None:
    """Refuse at once, with the install line, what needs the `onnxruntime` extra."""
    if ONNXRUNTIME not in installed_engines():
        raise InputError(f"{what} {ONNX_MISSING}")


def session_options(threads: int):
    """What every session distilq opens runs with: `threads` intra-op threads (a worker's
    cores), one inter-op thread, every graph optimisation, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVEL)
    options.log_severity_level = 3  # errors only: its warnings name internal fallbacks
    return options


def open_session(graph: bytes, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(
        graph,
        session_options(threads),
        providers=[PROVIDER],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def run_graph(graph, feeds: dict[str, np.ndarray], threads: int = 1) -> np.ndarray:
    """The logits of an `onnx.ModelProto` on `feeds` (int64 arrays by input name)."""
    session = open_session(graph.SerializeToString(), threads)
    return session.run(None, {k: v.astype(np.int64) for k, v in feeds.items()})[0]


class OnnxModel:
    """An ONNX Runtime classifier with the surface `inference.predict` uses: `config`, and
    `probabilities` of the tokenizer's numpy arrays. The session opens on first use with
    torch's thread count then (`runtime.configure_worker` sets it to the worker's)."""

    def __init__(self, graph: bytes, config, activations: str):
        self.graph = graph
        self.config = config
        self.activations = activations
        self._session = None
        self._threads = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.graph).hexdigest()

    @property
    def batch_independent(self) -> bool:
        """Per-token activations: each row's integer GEMM input depends on that row alone,
        and the float rest (MLAS's GEMMs, MultiHeadAttention over each text's own keys) sums
        each row in an order its batch does not change (tested: `np.array_equal` at batch
        1, 7 and 32, tiny and real models)."""
        return self.activations == "per-token"

    def session(self):
        import torch

        threads = torch.get_num_threads()
        if self._session is None or threads != self._threads:
            self._session, self._threads = open_session(self.graph, threads), threads
        return self._session

    def probabilities(self, encoded) -> np.ndarray:
        """Class probabilities [rows, classes] float32 for the tokenizer's numpy arrays (a
        stable softmax of the logits, in numpy: no torch op runs between sessions' runs)."""
        logits = self.logits(encoded)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def logits(self, encoded) -> np.ndarray:
        session = self.session()
        ids = np.asarray(encoded["input_ids"])
        feeds = {
            i.name: (
                np.asarray(encoded[i.name], dtype=np.int64)
                if i.name in encoded
                else np.zeros(ids.shape, dtype=np.int64)  # token types absent: all 0
            )
            for i in session.get_inputs()
        }
        return session.run(None, feeds)[0]


def describe(activations: str) -> dict[str, str]:
    """The graph's `distilq` metadata entry."""
    return {"distilq": json.dumps({"format": FORMAT_ONNX, "activations": activations})}


def load_graph(path: Path, config) -> OnnxModel:
    """The `OnnxModel` in a graph `save_int8` wrote (its sha256 checked by the caller)."""
    require_onnxruntime(f"the version in {path.parent.parent}")
    import onnx

    graph = path.read_bytes()
    try:
        meta = {p.key: p.value for p in onnx.load_from_string(graph).metadata_props}
        layout = json.loads(meta.get("distilq", "{}"))
    except Exception as e:  # a damaged file: protobuf's or json's own words
        raise IntegrityError(f"{path}: unreadable ONNX graph: {e}") from e
    if layout.get("format") != FORMAT_ONNX:
        raise IntegrityError(f"{path}: not a distilq ONNX graph (format {layout.get('format')!r})")
    return OnnxModel(graph, config, layout["activations"])
