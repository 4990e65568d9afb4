"""A distilq version as an MLflow `pyfunc` model: `predict` runs distilq's own `Classifier`.

The MLflow model holds the version's files (`version/`: `model/`, the self-check data, the
report) with its sealed manifest. Loading it checks the seal against the one the model was
logged with and every file against the manifest, as `distilq.load` does, and attests the
version on this platform (a self-check in this process when the gate ran on another CPU),
before any text is scored. Imported only where MLflow is installed (the `mlflow` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from distilq.config.shared import DEFAULT_WINDOW_BATCHES
from distilq.errors import IntegrityError
from distilq.registry.layout import (
    MANIFEST,
    MANIFEST_SHA256,
    model_files,
    sealed_manifest,
    verify_files,
)
from distilq.score.scoring import top_labels

VERSION_ARTIFACT = "version"  # the key of the version's files in the model's artifacts
# The models-from-code file MLflow runs on load: it builds a `DistilqModel` (no pickle).
CODE = Path(__file__).with_name("pyfunc_code.py")


def open_verified(directory: str | Path, version: str, seal: str, allow_unattested: bool = False):
    """The `Classifier` in a copy of `version`'s files whose manifest carries `seal`, every
    file checked against the manifest first; IntegrityError names what was changed."""
    from distilq.score.classifier import open_version

    directory = Path(directory)
    data = (directory / MANIFEST).read_bytes()
    found = (directory / MANIFEST_SHA256).read_text().strip()
    if found != seal:
        raise IntegrityError(
            f"{directory / MANIFEST_SHA256} is not the seal this MLflow model was logged with "
            f"({found[:16]}... instead of {seal[:16]}...); refusing to load version {version}"
        )
    manifest = sealed_manifest(data, seal, str(directory), version)
    verify_files(directory, manifest, model_files(manifest))
    return open_version(directory, manifest, None, allow_unattested)


class DistilqModel(mlflow.pyfunc.PythonModel):
    """INT8 sentiment scores of a DataFrame's text column, as `distilq score` gives them.

    Output, one row per input row: `label`, `score` (its probability), `model_version`,
    `error` (why a text could not be scored: null, empty, no tokens; its label is then
    null), and with `params={"probabilities": True}` a `prob_<label>` column per class.
    Rows are batched as `distilq score` batches them (sorted by length within windows of
    the same size), so the scores are the same.
    """

    def load_context(self, context) -> None:
        config = context.model_config
        self.text_column = config["text_column"]
        self.classifier = open_verified(
            context.artifacts[VERSION_ARTIFACT],
            config["version"],
            config["manifest_sha256"],
            config.get("allow_unattested", False),
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        classifier = self.classifier
        frame = pd.DataFrame(model_input)
        # pandas holds a missing text as NaN: it is null, as in a Parquet file.
        texts = [None if _missing(v) else v for v in frame[self.text_column]]
        labels = classifier.labels
        window = classifier.batching.batch_size * DEFAULT_WINDOW_BATCHES
        parts = []
        for start in range(0, len(texts), window):
            probs, errors, _ = classifier.score(texts[start : start + window])
            label, score, _ = top_labels(probs, errors, labels)
            # object columns keep None for a missing label or error: JSON null when served
            part = {"label": pd.Series(label, dtype=object), "score": score}
            if (params or {}).get("probabilities"):
                part.update({f"prob_{name}": probs[:, j] for j, name in enumerate(labels)})
            part.update(model_version=classifier.version, error=pd.Series(errors, dtype=object))
            parts.append(pd.DataFrame(part))
        if not parts:
            return pd.DataFrame(columns=["label", "score", "model_version", "error"])
        return pd.concat(parts, ignore_index=True).set_axis(frame.index)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
