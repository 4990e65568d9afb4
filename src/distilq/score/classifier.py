"""A ready CPU classifier loaded from the registry, files checked against the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distilq.config.shared import BatchingPolicy, default_registry
from distilq.inference import predict, screen_texts
from distilq.manifest import VersionManifest
from distilq.registry.layout import PRODUCTION
from distilq.registry.registry import Registry


class Classifier:
    """An INT8 sentiment classifier from a registry version."""

    def __init__(self, model, tokenizer, manifest: VersionManifest):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.version = manifest.version
        positions = getattr(model.config, "max_position_embeddings", None)
        self.batching = manifest.recipe.batching.capped(positions)  # as `distilq score` does
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.labels = [self.id2label[i] for i in sorted(self.id2label)]  # in class-id order
        self.attestation = ""  # how this platform is attested (set by `load`)

    def score(
        self, values: Sequence, batching: BatchingPolicy | None = None
    ) -> tuple[np.ndarray, list[str | None], list[int]]:
        """Class probabilities [n, n_classes] (NaN rows for values that cannot be scored),
        why each value cannot be scored (None where it can), and the token lengths of those
        that can. Batched as validated unless told otherwise."""
        if isinstance(values, str):
            raise TypeError("predict takes a sequence of texts; wrap a single text in a list")
        policy = batching or self.batching
        errors, lengths = screen_texts(self.tokenizer, list(values), policy.max_length)
        valid = [i for i, e in enumerate(errors) if e is None]
        probs = np.full((len(errors), len(self.id2label)), np.nan, dtype=np.float32)
        if valid:
            texts = [values[i] for i in valid]
            probs[valid] = predict(self.model, self.tokenizer, texts, policy, lengths=lengths).probs
        return probs, errors, lengths

    def predict_proba(self, texts: Sequence[str], batching: BatchingPolicy | None = None):
        """Class probabilities [n, n_classes]; NaN rows for texts that cannot be scored."""
        return self.score(texts, batching)[0]

    def predict(self, texts: Sequence[str], batching: BatchingPolicy | None = None) -> list[dict]:
        """Per text: `label`, `score` (its probability), `probabilities` of every class and
        `error`; a text that cannot be scored (empty, no tokens) gets None and the reason."""
        probs, errors, _ = self.score(texts, batching)
        results = []
        for row, error in zip(probs, errors, strict=True):
            if error is not None:
                results.append(
                    {"label": None, "score": None, "probabilities": None, "error": error}
                )
                continue
            best = int(row.argmax())
            results.append(
                {
                    "label": self.id2label[best],
                    "score": float(row[best]),
                    "probabilities": {self.id2label[i]: float(p) for i, p in enumerate(row)},
                    "error": None,
                }
            )
        return results


def load(
    registry: str | Path | None = None,
    ref: str = PRODUCTION,
    cache_dir: str | Path | None = None,
    allow_unattested: bool = False,
) -> Classifier:
    """Load a registry version (or alias) as a `Classifier`, after checking every file's
    sha256, and make sure it is attested on this platform (see `distilq.gate.attest`: a version
    gated on another CPU runs its self-check here first; one that fails it is refused
    unless `allow_unattested`)."""
    registry = Registry(registry or default_registry())
    local, manifest = registry.fetch(ref, cache_dir)
    return open_version(local, manifest, registry, allow_unattested)


def open_version(
    local: Path, manifest: VersionManifest, registry: Registry | None, allow_unattested: bool
) -> Classifier:
    """The `Classifier` in a local copy of a version whose files were checked against
    `manifest`, attested on this platform (attestations read from and written to `registry`;
    None: the self-check runs in this process only, as in an MLflow model)."""
    from transformers import AutoTokenizer

    from distilq.gate.attest import ensure_attested
    from distilq.quantize.int8 import load_int8

    model_dir = Path(local) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    classifier = Classifier(load_int8(model_dir), tokenizer, manifest)
    classifier.attestation = ensure_attested(registry, classifier, local, allow_unattested)
    return classifier


_loaded: dict[tuple[str, str], Classifier] = {}  # one model per worker process


def load_cached(registry: str, version: str, allow_unattested: bool = False) -> Classifier:
    """`load`, once per process and version: scoring workers reuse the model across shards."""
    key = (str(registry), version)
    if key not in _loaded:
        _loaded[key] = load(registry, version, allow_unattested=allow_unattested)
    return _loaded[key]
