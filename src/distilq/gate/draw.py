"""Drawing validation rows from a larger set by a hash of the text, so the same data gives
the same rows whatever the order of its files; Parquet datasets are streamed a batch at a
time, holding only the rows kept."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from distilq.errors import InputError
from distilq.inference import text_error
from distilq.storage.parquet import discover_inputs, open_parquet, partitions_of

NO_LABEL = object()  # a row of data that has no label column


# Rows drawn from a larger set: by a hash of the text (salted apart from the split's hash,
# or every drawn row would fall on the tuning side), so the same data gives the same rows
# whatever the order of its files.
DRAW_SALT = "distilq-draw:"
DRAW_RULE = (
    f"the N rows with the smallest int(sha256({DRAW_SALT!r} + text)[:16], 16), ties by "
    "position, kept in dataset order (files sorted by path); rows without text (null, "
    "empty or only whitespace: scoring leaves them unscored) are skipped"
)


def text_hash(salt: str, text: str) -> int:
    """int(sha256(salt + text)[:16], 16): the hash the draw, the split and the scoring
    audit read (each with its own salt)."""
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Drawn:
    """How a set's rows were drawn from a larger source (`DRAW_RULE`): how many rows were
    read, and the Parquet files read with their size and mtime or ETag."""

    rule: str
    rows_read: int
    files: dict[str, dict]
    rows_without_text: int = 0  # of `rows_read`: skipped, as scoring skips them


def draw_rows(rows: Iterable[tuple[str, object]], n: int) -> tuple[list[tuple[str, object]], int]:
    """The `n` rows of `rows` with the smallest draw keys, in their order, holding only
    those in memory; and how many rows were read."""
    heap: list[tuple[int, int, str, object]] = []  # (-key, -position): the worst kept on top
    position = -1
    for position, (text, label) in enumerate(rows):
        item = (-text_hash(DRAW_SALT, text), -position, text, label)
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    kept = sorted(heap, key=lambda item: -item[1])
    return [(text, label) for _, _, text, label in kept], position + 1


# Rows decoded at a time from a Parquet file: what the draw holds besides the rows it keeps.
_READ_BATCH = 4096


def draw_parquet(
    spec: str, text_column: str, label_column: str | None, with_labels: bool, n: int
) -> tuple[list[tuple[str, object]], Drawn]:
    """`n` rows drawn from a Parquet dataset, streamed one batch at a time. Hive
    `key=value` directories are columns; with no `label_column`, a `label` column is used
    if the first file has one."""
    files, _ = discover_inputs([spec], flag="--validation")
    without_text = [0]
    rows = _parquet_rows(files, text_column, label_column, with_labels, without_text)
    pairs, read = draw_rows(rows, n)
    identities = {uri: identity for uri, _, identity in files}
    return pairs, Drawn(DRAW_RULE, read + without_text[0], identities, without_text[0])


def _parquet_rows(
    files, text_column: str, label_column: str | None, with_labels: bool, without_text: list[int]
) -> Iterator[tuple[str, object]]:
    """(text, label) of every row of every file that has a text, read a batch at a time;
    rows without one are counted in `without_text[0]`. With no `label_column`, `label` if
    the first file has one."""
    if not with_labels:
        label_column = None
    for i, (uri, relative, _) in enumerate(files):
        partitions = partitions_of(uri, relative)
        try:
            with open_parquet(uri) as parquet:
                names = parquet.schema_arrow.names
                if i == 0 and with_labels and label_column is None:
                    label_column = "label" if "label" in [*names, *partitions] else None
                if text_column not in names:
                    raise InputError(
                        f"validation {uri} has no text column {text_column!r}; columns: "
                        f"{', '.join(names)}"
                    )
                in_file = label_column in names
                if label_column is not None and not in_file and label_column not in partitions:
                    raise InputError(
                        f"validation {uri} has no label column {label_column!r}; columns: "
                        f"{', '.join([*names, *partitions])}"
                    )
                columns = [text_column, label_column] if in_file else [text_column]
                for batch in parquet.iter_batches(batch_size=_READ_BATCH, columns=columns):
                    texts = batch.column(0).to_pylist()
                    if in_file:
                        labels = batch.column(1).to_pylist()
                    else:
                        labels = [partitions.get(label_column, NO_LABEL)] * len(texts)
                    for text, label in zip(texts, labels, strict=True):
                        if text_error(text) is not None:
                            without_text[0] += 1
                            continue
                        yield text, NO_LABEL if label_column is None else label
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"validation {uri} is not a readable Parquet file: {e}") from e
