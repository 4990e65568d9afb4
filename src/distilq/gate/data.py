"""Validation data: read (files, Parquet datasets, the packaged sets, `datasets` specs),
drawn by a hash of the text, labels placed in the model's classes, combined, and split into
the tuning and the confirmation part."""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from distilq.config.shared import DEFAULT_VALIDATION_ROWS
from distilq.errors import InputError, SourceUnavailable
from distilq.gate.draw import DRAW_RULE, NO_LABEL, Drawn, draw_parquet, draw_rows, text_hash

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
    drawn: Drawn | None = None


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
    drawn: Drawn | None = None  # None: every row of its source
    copies: int = 0  # rows left out as copies of a text already in it (`split`)

    def slices(self) -> list[Part]:
        """The named parts; a set loaded from one source is its own single part."""
        return list(self.parts) or [Part(self.name, 0, len(self.texts), self.sha256, self.drawn)]


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
    if not is_file and suffix in (".tsv", ".csv", ".jsonl", ".json"):
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
        f"validation file {spec!r}: unsupported type {suffix!r} (tsv, csv, jsonl; parquet files, "
        "directories, globs and prefixes are read as datasets)"
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


def is_parquet_dataset(spec: str) -> bool:
    """Whether `spec` names Parquet data read as a dataset: a .parquet file, a directory,
    a glob, or a URI that names no file of another type (an object-store prefix)."""
    if spec in BUILTIN:
        return False
    suffix = Path(spec.split("?")[0].rstrip("/")).suffix.lower()
    if suffix == ".parquet" or globlib.has_magic(spec) or Path(spec).expanduser().is_dir():
        return True
    return "://" in spec and suffix not in (".tsv", ".csv", ".jsonl", ".json")


def load_validation(
    spec: str,
    text_column: str = "text",
    label_column: str | None = None,
    label2id: dict[str, int] | None = None,
    label_map: dict[str, str] | None = None,
    check_accuracy: bool = True,
    rows: int | None = None,
) -> ValidationSet:
    """Load texts (and labels, when present) for the agreement gate.

    A Parquet dataset (`is_parquet_dataset`) is streamed and `rows` of it drawn
    (`DRAW_RULE`; default DEFAULT_VALIDATION_ROWS); any other set is read whole, and drawn
    from only when `rows` is given. `label_column=None` means: use a `label` column (or
    hive partition) if there is one; a named column must exist. Labels are placed in the
    model's classes by `place_labels`; `check_accuracy=False` reads none.
    """
    if is_parquet_dataset(spec):
        pairs, drawn = draw_parquet(
            spec, text_column, label_column, check_accuracy, rows or DEFAULT_VALIDATION_ROWS
        )
    else:
        pairs, drawn = _read_rows(spec, text_column, label_column, check_accuracy), None
        if rows is not None and len(pairs) > rows:
            pairs, read = draw_rows(pairs, rows)
            drawn = Drawn(DRAW_RULE, read, {})
    if not pairs:
        raise InputError(f"validation {spec!r} has no rows")
    texts = [t for t, _ in pairs]
    raw = [label for _, label in pairs]
    labels = None
    if check_accuracy and any(label is not NO_LABEL for label in raw):
        labels = place_labels(spec, raw, label2id or {}, label_map or {})
    return ValidationSet(spec, texts, labels, _digest(texts, labels), drawn=drawn)


def _digest(texts: list[str], labels: list[int] | None) -> str:
    """sha256 of `json.dumps([texts, labels])`, encoded a piece at a time (no second copy
    of every text in memory)."""
    digest = hashlib.sha256()
    for piece in json.JSONEncoder().iterencode([texts, labels]):
        digest.update(piece.encode())
    return digest.hexdigest()


def _read_rows(spec: str, text_column: str, label_column: str | None, with_labels: bool):
    """(text, label) of every row of a file, a packaged set or a `datasets` spec."""
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
    column = label_column or ("label" if "label" in columns else None)
    if column is None or not with_labels:
        return [(t, NO_LABEL) for t in texts]
    return list(zip(texts, table.column(column).to_pylist(), strict=True))


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
        parts.append(Part(s.name, start, start + len(s.texts), s.sha256, s.drawn))
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
SPLIT_RULE = (
    f"tuning if int(sha256(text)[:16], 16) / 2**64 < {TUNING_FRACTION}, else confirmation; "
    "each distinct text once in its part"
)


def _is_tuning(text: str, salt: str = "") -> bool:
    return text_hash(salt, text) / 2**64 < TUNING_FRACTION


def split(data: ValidationSet, salt: str = "") -> tuple[ValidationSet, ValidationSet]:
    """The tuning and the confirmation part of every set in `data` (see SPLIT_RULE; a
    `salt` prefixed to every text gives another split of the same rows, as a bench of the
    split's luck needs). Each distinct text counts once in its part: one text gives one
    answer, so a copy is no new evidence (a boilerplate text that is 20% of the rows would
    make the bound far too sure); `copies` says how many rows were left out so."""
    sides = {True: ([], [], [], [0]), False: ([], [], [], [0])}  # texts, labels, parts, copies
    for part in data.slices():
        for side, (texts, labels, parts, copies) in sides.items():
            start, seen = len(texts), set()
            for i in range(part.start, part.stop):
                text = data.texts[i]
                if _is_tuning(text, salt) != side:
                    continue
                if text in seen:
                    copies[0] += 1
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(None if data.labels is None else data.labels[i])
            parts.append(Part(part.name, start, len(texts), part.sha256, part.drawn))
    tuning, confirmation = (
        ValidationSet(
            name=data.name,
            texts=texts,
            labels=None if data.labels is None else labels,
            sha256=hashlib.sha256(f"{data.sha256} {side}".encode()).hexdigest(),
            parts=tuple(parts),
            copies=copies[0],
        )
        for side, (texts, labels, parts, copies) in sides.items()
    )
    return tuning, confirmation


def place_labels(
    where: str, values: list, label2id: dict[str, int], label_map: dict[str, str] | None = None
) -> list[int]:
    """The model's class id (`label2id`) of each label in `values`: by `label_map`
    (DATA=MODEL, any case), else by name (any case), else as a class id when every label is
    an integer and the data has as many classes as the model. Labels that cannot be placed
    are refused, naming both label sets: accuracy is never measured in the wrong label space."""
    keys = []
    for i, value in enumerate(values):
        if value is None or value is NO_LABEL or (isinstance(value, str) and not value.strip()):
            raise InputError(f"validation {where} row {i}: no label")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Parquet and pandas often hold class ids as floats
        keys.append(str(value).strip())
    placed = _placement(where, sorted(set(keys)), label2id, label_map or {})
    return [placed[k] for k in keys]


def _placement(
    where: str, distinct: list[str], label2id: dict[str, int], label_map: dict[str, str]
) -> dict[str, int]:
    names = {name.lower(): i for name, i in label2id.items()}
    ours = sorted(label2id, key=label2id.get)

    def refuse(why: str):
        raise InputError(
            f"validation {where}: {why}. The data's labels: {', '.join(distinct[:10])}; the "
            f"model's: {', '.join(ours) or 'none (no label2id in its config)'}. Say which is "
            "which with --label-map DATA=MODEL,... , choose another --label-column, or gate on "
            "agreement alone with --no-accuracy-check"
        )

    if label_map:
        mapped = {k.lower(): v for k, v in label_map.items()}
        placed = {}
        for label in distinct:
            target = mapped.get(label.lower(), label)
            if target.lower() not in names:
                refuse(f"label {label!r} maps to {target!r}, which is not a class of the model")
            placed[label] = names[target.lower()]
        return placed
    if all(label.lower() in names for label in distinct):
        return {label: names[label.lower()] for label in distinct}
    if all(label.lstrip("-").isdigit() for label in distinct):
        ids = sorted({int(label) for label in distinct})
        if ids == list(range(len(label2id))):
            return {label: int(label) for label in distinct}
        refuse(
            f"integer labels {ids} are read as class ids only when the data has as many "
            f"classes as the model ({len(label2id)})"
        )
    refuse("the labels are not the model's class names (compared in any case)")
