"""Validation data, batched prediction under a batching policy, and FP32-vs-INT8 metrics."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from distilq.config import BatchingPolicy
from distilq.errors import InputError, SourceUnavailable
from distilq.metrics import Flip, Metrics, SetMetrics, Speed
from distilq.stats import agreement_lower_bound, paired_difference_interval

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


@dataclass
class Predictions:
    """Class probabilities in input order, and how long the batches took."""

    probs: np.ndarray  # [n, n_classes] float32
    seconds: float
    n_batches: int

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


NO_TOKENS = "text has no tokens but special ones (only control, invisible or unknown characters)"


def text_error(value) -> str | None:
    """Why a value is not a text to score, or None when it is one."""
    if value is None:
        return "text is null"
    if not isinstance(value, str):
        return f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return "text is empty" if not value else "text is only whitespace"
    return None


# A text is cut to `max_length` x this many characters before it is tokenized: a 20 MB text
# costs what 32 KiB cost, not gigabytes of tokenizer memory. Words are 4-6 characters a token
# in prose (a word past 100 characters is one unknown token), so the cut keeps far more than
# `max_length` tokens and the model sees exactly what it would have.
CHARS_PER_TOKEN_BOUND = 64


def cut_text(text: str, max_length: int) -> tuple[str, bool]:
    """The head of `text` that can reach the model (cut at whitespace, so no word is split),
    and whether anything was cut."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    parts = head.rsplit(None, 1)
    return (parts[0] if len(parts) == 2 else head), True


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text's cut head (special tokens included, no truncation) and its
    length; a cut text counts as longer than `max_length` even when its head is not."""
    cut = [cut_text(t, max_length) for t in texts]
    heads = [c for c, _ in cut]
    ids = tokenizer(heads, truncation=False, verbose=False)["input_ids"] if heads else []
    lengths = [
        max(len(i), max_length + 1) if was_cut else len(i)
        for i, (_, was_cut) in zip(ids, cut, strict=True)
    ]
    return ids, lengths


def screen_texts(tokenizer, values: list, max_length: int) -> tuple[list[str | None], list[int]]:
    """Why each value cannot be scored (None where it can), and the token lengths of those
    that can. A text the tokenizer reduces to special tokens alone (a NUL, zero-width
    spaces) would get a confident label from nothing: it cannot be scored either."""
    errors = [text_error(v) for v in values]
    valid = [i for i, e in enumerate(errors) if e is None]
    encoded, counts = _encode(tokenizer, [values[i] for i in valid], max_length)
    special = set(tokenizer.all_special_ids)
    lengths = []
    for i, ids, n in zip(valid, encoded, counts, strict=True):
        if all(t in special for t in ids):
            errors[i] = NO_TOKENS
        else:
            lengths.append(n)
    return errors, lengths


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Token counts with special tokens and without truncation (of each text's cut head,
    see `cut_text`)."""
    return _encode(tokenizer, texts, max_length)[1]


def batch_order(lengths: list[int], policy: BatchingPolicy) -> list[list[int]]:
    """Row indices grouped into batches: sorted by token length when the policy says so."""
    if policy.sort_by_length:
        capped = [min(n, policy.max_length) for n in lengths]
        order = sorted(range(len(lengths)), key=lambda i: (capped[i], i))
    else:
        order = list(range(len(lengths)))
    return [order[i : i + policy.batch_size] for i in range(0, len(order), policy.batch_size)]


def predict(
    model,
    tokenizer,
    texts: list[str],
    policy: BatchingPolicy,
    progress: str | None = None,
    lengths: list[int] | None = None,
) -> Predictions:
    """Class probabilities for `texts`, batched by `policy`, deterministically.

    `lengths` (from `token_lengths`) saves tokenizing twice when the caller has them.
    """
    import torch  # here: loading and splitting validation data needs no torch

    batches = batch_order(lengths or token_lengths(tokenizer, texts, policy.max_length), policy)
    n_classes = model.config.num_labels
    probs = np.zeros((len(texts), n_classes), dtype=np.float32)
    bar = _progress_total(len(texts), progress)
    start = time.perf_counter()
    with torch.inference_mode():
        for idx in batches:
            enc = tokenizer(
                [cut_text(texts[i], policy.max_length)[0] for i in idx],
                padding=True,
                truncation=True,
                max_length=policy.max_length,
                return_tensors="pt",
            )
            logits = model(**enc).logits.float()
            probs[idx] = torch.softmax(logits, dim=-1).numpy()
            bar.update(len(idx))
    bar.close()
    return Predictions(probs, time.perf_counter() - start, len(batches))


def _progress_total(total: int, desc: str | None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="rows", file=sys.stderr, disable=desc is None, leave=False
    )


def progress_bar(items: list, desc: str, unit: str):
    """`items`, with a progress bar on stderr (long phases; logs get their own lines)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


def best_rows_per_second(
    models: dict, tokenizer, texts: list[str], policy: BatchingPolicy, passes: int = 3
) -> dict[str, float]:
    """Best of `passes` interleaved timed passes per model, so machine noise hits all alike
    and the first, cold pass does not count."""
    lengths = token_lengths(tokenizer, texts, policy.max_length)
    best = dict.fromkeys(models, 0.0)
    for _ in range(passes):
        for name, model in models.items():
            pred = predict(model, tokenizer, texts, policy, lengths=lengths)
            best[name] = max(best[name], len(texts) / pred.seconds)
    return best


def measure_speed(
    fp32_model, int8_model, tokenizer, texts: list[str], policy: BatchingPolicy, rows: int = 256
) -> Speed:
    """Warm rows/s of both models on an even sample of `texts` (every set represented)."""
    from distilq.hardware import describe_cpu

    sample = texts[:: max(1, len(texts) // rows)][:rows]
    passes = 3
    best = best_rows_per_second(
        {"fp32": fp32_model, "int8": int8_model}, tokenizer, sample, policy, passes
    )
    return Speed(
        rows=len(sample),
        passes=passes,
        cpu=describe_cpu(),
        rows_per_second_fp32=best["fp32"],
        rows_per_second_int8=best["int8"],
    )


def set_metrics(
    name: str, a: np.ndarray, b: np.ndarray, truth: np.ndarray | None, confidence: float | None
) -> SetMetrics:
    """Agreement and accuracies of FP32 labels `a` and INT8 labels `b` against `truth`, with
    the agreement's lower bound and the drop's interval at `confidence`."""
    n, agree = len(a), int((a == b).sum())
    accuracy_fp32 = accuracy_int8 = drop = interval = None
    if truth is not None:
        correct_fp32, correct_int8 = int((a == truth).sum()), int((b == truth).sum())
        accuracy_fp32, accuracy_int8 = correct_fp32 / n, correct_int8 / n
        drop = (correct_fp32 - correct_int8) / n  # from counts, so 0.01 is exactly 0.01
        if confidence:
            only_fp32 = int(((a == truth) & (b != truth)).sum())
            only_int8 = int(((b == truth) & (a != truth)).sum())
            interval = paired_difference_interval(only_fp32, only_int8, n, confidence)
    return SetMetrics(
        name=name,
        n_examples=n,
        agreement=agree / n,
        flips=n - agree,
        accuracy_fp32=accuracy_fp32,
        accuracy_int8=accuracy_int8,
        accuracy_drop=drop,
        agreement_lower_bound=agreement_lower_bound(agree, n, confidence) if confidence else None,
        accuracy_drop_interval=interval,
    )


def set_agreements(fp32: Predictions, int8: Predictions, validation: ValidationSet) -> list[float]:
    """Agreement of the two models' labels on each validation set."""
    a, b = fp32.labels, int8.labels
    return [float((a[p.start : p.stop] == b[p.start : p.stop]).mean()) for p in validation.slices()]


def _flips(
    fp32: Predictions, int8: Predictions, validation: ValidationSet, id2label: dict[int, str]
) -> list[Flip]:
    """Every example whose label differs between the two models, with both scores."""
    a, b = fp32.labels, int8.labels
    return [
        Flip(
            index=int(i),
            text=validation.texts[i],
            label=None if validation.labels is None else id2label[validation.labels[i]],
            fp32_label=id2label[int(a[i])],
            fp32_score=float(fp32.probs[i, a[i]]),
            int8_label=id2label[int(b[i])],
            int8_score=float(int8.probs[i, b[i]]),
        )
        for i in np.flatnonzero(a != b)
    ]


def compare(
    fp32: Predictions,
    int8: Predictions,
    validation: ValidationSet,
    id2label: dict[int, str],
    speed: Speed | None = None,
    confidence: float | None = None,
) -> Metrics:
    """Agreement, accuracies, probability changes and flipped examples of INT8 vs FP32.

    Speed figures come from `speed` (see `measure_speed`) when given, else from the two
    prediction passes themselves (one cold pass each: noisy)."""
    n = len(validation.texts)
    a, b = fp32.labels, int8.labels
    change = np.abs(int8.probs[np.arange(n), a] - fp32.probs[np.arange(n), a])
    flipped = _flips(fp32, int8, validation, id2label)
    truth = None if validation.labels is None else np.asarray(validation.labels)
    overall = set_metrics(validation.name, a, b, truth, confidence)
    sets = [
        set_metrics(
            p.name,
            a[p.start : p.stop],
            b[p.start : p.stop],
            None if truth is None else truth[p.start : p.stop],
            confidence,
        )
        for p in validation.slices()
    ]
    fp32_rps = speed.rows_per_second_fp32 if speed else n / fp32.seconds
    int8_rps = speed.rows_per_second_int8 if speed else n / int8.seconds
    rows_per_batch = n / fp32.n_batches
    return Metrics(
        **overall.model_dump(exclude={"name", "agreement_lower_bound", "accuracy_drop_interval"}),
        confidence=confidence,
        agreement_lower_bound=(min(m.agreement_lower_bound for m in sets) if confidence else None),
        flipped=flipped,
        mean_abs_prob_change=float(change.mean()),
        max_abs_prob_change=float(change.max()),
        latency_ms_per_batch_fp32=1000 * rows_per_batch / fp32_rps,
        latency_ms_per_batch_int8=1000 * rows_per_batch / int8_rps,
        rows_per_second_fp32=fp32_rps,
        rows_per_second_int8=int8_rps,
        sets=sets,
        speed=speed,
    )
