"""A ready CPU classifier loaded from the registry, files checked against the manifest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from distilq.config import DEFAULT_REGISTRY, BatchingPolicy
from distilq.registry import PRODUCTION, Registry
from distilq.validation import predict


class Classifier:
    """An INT8 sentiment classifier from a registry version."""

    def __init__(self, model, tokenizer, manifest: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.batching = BatchingPolicy(**manifest["recipe"]["batching"])
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}

    def predict_proba(self, texts: Sequence[str], batching: BatchingPolicy | None = None):
        """Class probabilities [n, n_classes], batched as validated unless told otherwise."""
        if isinstance(texts, str):
            raise TypeError("predict takes a sequence of texts; wrap a single text in a list")
        return predict(self.model, self.tokenizer, list(texts), batching or self.batching).probs

    def predict(self, texts: Sequence[str], batching: BatchingPolicy | None = None) -> list[dict]:
        """Per text: `label`, `score` (its probability) and `probabilities` of every class."""
        results = []
        for row in self.predict_proba(texts, batching):
            best = int(row.argmax())
            results.append(
                {
                    "label": self.id2label[best],
                    "score": float(row[best]),
                    "probabilities": {self.id2label[i]: float(p) for i, p in enumerate(row)},
                }
            )
        return results


def load(
    registry: str | Path | None = None, ref: str = PRODUCTION, cache_dir: str | Path | None = None
) -> Classifier:
    """Load a registry version (or alias) as a `Classifier`, after checking every file's sha256."""
    from transformers import AutoTokenizer

    from distilq.quantization import load_int8

    registry = registry or os.environ.get("DISTILQ_REGISTRY", DEFAULT_REGISTRY)
    local, manifest = Registry(registry).fetch(ref, cache_dir)
    model_dir = local / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return Classifier(load_int8(model_dir), tokenizer, manifest)
