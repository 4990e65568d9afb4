"""Validation data: read (files, the packaged sets, `datasets` specs), labels mapped to the
model's classes, combined, and split into the tuning and the confirmation part."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from distilq.errors import InputError, SourceUnavailable

# Shipped in the package (data/PROVENANCE.md says where each came from):
# GLUE SST-2 validation (872 rows), and the gate's default: those 872 plus 3,006 whole
# SST-2 sentences, enough for a confirmation part that can certify 0.99 at 95%.
PACKAGED_VALIDATION = "builtin:sst2-validation"
BUILTIN = {PACKAGED_VALIDATION: "sst2_validation.tsv", "builtin:sst2-gate": "sst2_gate.tsv"}


@dataclass(frozen=True)
class Part:
    """One named validation set inside a combined one: rows `start` to `stop`."""

    name: str
    start: int
    stop: int
    sha256: str


@dataclass(frozen=True)
class ValidationSet:
    """Texts with optional integer labels (ids of the model's classes).

    A combined set (several `--validation` sets) lists them in `parts`; the gate holds each
    part to the thresholds on its own, so a small set of long reviews is not outvoted by
    many short sentences.
    """

    name: str
    texts: list[str]
    labels: list[int] | None
    sha256: str  # of the texts and labels as used, so a re-run can be recognised
    parts: tuple[Part, ...] = ()

    def slices(self) -> list[Part]:
        """The named parts; a set loaded from one source is its own single part."""
        return list(self.parts) or [Part(self.name, 0, len(self.texts), self.sha256)]


def _packaged_path(spec: str) -> Path:
    return Path(str(resources.files("distilq") / "data" / BUILTIN[spec]))


def _read_table(spec: str):
    """Read a local or fsspec file into a pyarrow Table; `datasets` hub specs otherwise."""
    import pyarrow as pa

    suffix = Path(spec.split("?")[0]).suffix.lower()
    local = Path(spec).expanduser()
    is_file = "://" in spec or local.is_file()
    if spec in BUILTIN:
        spec, suffix, is_file = str(_packaged_path(spec)), ".tsv", True
    if not is_file and suffix in (".tsv", ".csv", ".parquet", ".jsonl", ".json"):
        raise InputError(f"validation file {spec!r} does not exist")
    if not is_file:
        return _read_hub_dataset(spec)
    import fsspec

    try:
        with fsspec.open(spec, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise InputError(f"validation file {spec!r} cannot be read: {e}") from e
    try:
        if suffix in (".tsv", ".csv"):
            return _read_delimited(spec, data, suffix)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(pa.BufferReader(data))
        if suffix in (".jsonl", ".json"):
            records = [
                json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()
            ]
            return pa.Table.from_pylist(records)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"validation file {spec!r} is not valid {suffix[1:]}: {e}") from e
    raise InputError(
        f"validation file {spec!r}: unsupported type {suffix!r} (tsv, csv, parquet, jsonl)"
    )


def _read_delimited(spec: str, data: bytes, suffix: str):
    """A TSV or CSV file with a header line, every line as many fields as the header."""
    import pyarrow as pa

    # GLUE writes TSV with no quoting: a '"' is an ordinary character there.
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    delimiter = "\t" if suffix == ".tsv" else ","
    rows = list(csv.reader(data.decode("utf-8").splitlines(), delimiter=delimiter, quoting=quoting))
    if not rows:
        raise InputError(f"validation file {spec!r} is empty")
    header, body = rows[0], rows[1:]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
    if bad:
        raise InputError(
            f"validation file {spec!r}: lines {bad[:5]} have a different number of fields than "
            f"the header ({len(header)})"
        )
    return pa.table({h: [r[i] for r in body] for i, h in enumerate(header)})


def _read_hub_dataset(spec: str):
    """`NAME[:CONFIG][@SPLIT]`, e.g. `nyu-mll/glue:sst2@validation`."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, config or None, split=split or "validation")
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        raise InputError(
            f"validation {spec!r} is neither a local file nor a loadable `datasets` spec "
            f"(NAME[:CONFIG][@SPLIT]): {e}"
        ) from e
    except Exception as e:  # as for checkpoints: connection errors are worth a retry
        raise SourceUnavailable(
            f"cannot reach the Hugging Face hub for dataset {spec!r}: {e}. Offline, give "
            "--validation a local file."
        ) from e
    return ds.data.table if hasattr(ds.data, "table") else ds.to_arrow()


def load_validation(
    spec: str,
    text_column: str = "text",
    label_column: str | None = None,
    label2id: dict[str, int] | None = None,
) -> ValidationSet:
    """Load texts (and labels, when present) for the agreement gate.

    `label_column=None` means: use a `label` column if there is one. A named column must
    exist. Labels may be class ids or class names (matched to `label2id`, any case).
    """
    table = _read_table(spec)
    columns = table.column_names
    if text_column not in columns:
        raise InputError(
            f"validation {spec!r} has no text column {text_column!r}; columns: {', '.join(columns)}"
        )
    if label_column is not None and label_column not in columns:
        raise InputError(
            f"validation {spec!r} has no label column {label_column!r}; "
            f"columns: {', '.join(columns)}"
        )
    texts = table.column(text_column).to_pylist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise InputError(f"validation {spec!r}: rows {bad[:5]} have no text in {text_column!r}")
    if not texts:
        raise InputError(f"validation {spec!r} has no rows")
    column = label_column or ("label" if "label" in columns else None)
    labels = _labels(spec, table.column(column).to_pylist(), label2id or {}) if column else None
    digest = hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()
    return ValidationSet(spec, texts, labels, digest)


def combine(sets: list[ValidationSet]) -> ValidationSet:
    """One validation set made of several, each kept as a `Part` the gate checks alone."""
    if len(sets) == 1:
        return sets[0]
    labelled = [s.name for s in sets if s.labels is not None]
    if labelled and len(labelled) != len(sets):
        unlabelled = [s.name for s in sets if s.labels is None]
        raise InputError(
            f"validation sets {labelled} have labels but {unlabelled} have none: the accuracy "
            "check needs labels in every set or in none (see --label-column)"
        )
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise InputError(f"validation set given twice: {names}")
    parts, start = [], 0
    for s in sets:
        parts.append(Part(s.name, start, start + len(s.texts), s.sha256))
        start += len(s.texts)
    return ValidationSet(
        name=" + ".join(names),
        texts=[t for s in sets for t in s.texts],
        labels=[x for s in sets for x in s.labels] if labelled else None,
        sha256=hashlib.sha256(" ".join(s.sha256 for s in sets).encode()).hexdigest(),
        parts=tuple(parts),
    )


# `auto` chooses its FP32 layers on the tuning part; the gate judges on the confirmation
# part, which no choice has seen. By a hash of the text: deterministic, and duplicates of a
# text fall on the same side.
TUNING_FRACTION = 0.3
SPLIT_RULE = f"tuning if int(sha256(text)[:16], 16) / 2**64 < {TUNING_FRACTION}, else confirmation"


def _is_tuning(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64 < TUNING_FRACTION


def split(data: ValidationSet) -> tuple[ValidationSet, ValidationSet]:
    """The tuning and the confirmation part of every set in `data` (see SPLIT_RULE)."""
    sides = {True: ([], [], []), False: ([], [], [])}  # texts, labels, parts
    for part in data.slices():
        for side, (texts, labels, parts) in sides.items():
            start = len(texts)
            for i in range(part.start, part.stop):
                if _is_tuning(data.texts[i]) == side:
                    texts.append(data.texts[i])
                    labels.append(None if data.labels is None else data.labels[i])
            parts.append(Part(part.name, start, len(texts), part.sha256))
    tuning, confirmation = (
        ValidationSet(
            name=data.name,
            texts=texts,
            labels=None if data.labels is None else labels,
            sha256=hashlib.sha256(f"{data.sha256} {side}".encode()).hexdigest(),
            parts=tuple(parts),
        )
        for side, (texts, labels, parts) in sides.items()
    )
    return tuning, confirmation


def _labels(spec: str, values: list, label2id: dict[str, int]) -> list[int]:
    by_name = {k.lower(): v for k, v in label2id.items()}
    n_classes = len(label2id) or None
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, str) and v.lower() in by_name:
            v = by_name[v.lower()]
        if not isinstance(v, int) or v < 0 or (n_classes and v >= n_classes):
            raise InputError(
                f"validation {spec!r} row {i}: label {v!r} is not one of the model's classes "
                f"{label2id}"
            )
        out.append(v)
    return out
