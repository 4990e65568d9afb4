"""The inputs of a scoring run: find the Parquet files, check their schemas and the output's
place, and cut them into shards (a file, or a run of its row groups)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from distilq.errors import InputError
from distilq.storage.parquet import discover_inputs, open_parquet, partitions_of
from distilq.storage.store import Store

OUTPUT_COLUMNS = ("label", "score", "model_version", "error")


@dataclass(frozen=True)
class Shard:
    """One unit of work: a Parquet file, or a run of its row groups, and its output name."""

    uri: str  # fsspec URI of the input file
    output: str  # file name in the output directory
    row_groups: tuple[int, ...] | None  # None: the whole file
    rows: int
    identity: dict  # size and mtime or ETag of the input, to recognise it on resume
    partitions: dict[str, str] = field(default_factory=dict)  # hive key=value directories

    @property
    def name(self) -> str:
        """The input file, with its row groups when it is one of several shards."""
        if self.row_groups is None:
            return self.uri
        return f"{self.uri} (row groups {self.row_groups[0]}-{self.row_groups[-1]})"


@dataclass
class Plan:
    """Shards to score, and input files that could not even be opened."""

    shards: list[Shard]
    unreadable: dict[str, str]  # input URI -> why


def kept_column(column: str, options) -> bool:
    """Whether an input column is copied to the output (`ScoreOptions.id_columns`, else
    every column but the text)."""
    return column in options.id_columns if options.id_columns else column != options.text_column


def copied_to_output(column: str, options) -> bool:
    """Whether an input column is in the output: kept (`kept_column`), or the text with
    `keep_text`."""
    return kept_column(column, options) or (options.keep_text and column == options.text_column)


def _canonical(uri: str) -> str:
    return Store(uri).canonical()


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_output(output: str, input_dirs: list[str], input_files: list[str]) -> None:
    """Refuse an output distilq cannot or must not write to, before anything is touched:
    an existing file, a path under a file, an unwritable place, or one that overlaps the
    inputs (equal to, inside or around an input directory or file, links resolved)."""
    problem = Store(output).writable_problem()
    if problem:
        raise InputError(f"--output {output!r} {problem}")
    out = _canonical(output)
    for directory in map(_canonical, input_dirs):
        if _within(out, directory) or _within(directory, out):
            raise InputError(
                f"--output {output!r} overlaps the input directory {directory}: distilq never "
                "writes where it reads; choose an --output outside the inputs"
            )
    for file in map(_canonical, input_files):
        if _within(file, out):
            raise InputError(
                f"--output {output!r} holds the input file {file}: distilq never writes where "
                "it reads; choose an --output outside the inputs"
            )


def plan_shards(inputs: list[str], options, output: str | None = None) -> Plan:
    """Shards for every input file, after checking each schema has the needed columns and,
    given the `output`, that it lies apart from the inputs (`check_output`).

    A file whose footer cannot be read is recorded as unreadable (the others still run);
    a missing text or id column is a usage error for the whole run.
    """
    shards: list[Shard] = []
    unreadable: dict[str, str] = {}
    names: Counter[str] = Counter()
    types: dict[str, tuple[pa.DataType, str]] = {}  # kept column -> its type, first file
    entries = []
    files, walked = discover_inputs(inputs)
    if output is not None:
        check_output(output, walked, [uri for uri, _, _ in files])
    for uri, relative, identity in files:
        try:
            with open_parquet(uri) as parquet:
                meta = parquet.metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as e:
            unreadable[uri] = f"not a readable Parquet file: {e}"
            continue
        partitions = partitions_of(uri, relative)
        _check_columns(uri, schema.names, partitions, options)
        _check_types(uri, schema, partitions, options, types)
        base = relative.removesuffix(".parquet").replace("/", "__")
        groups = _group_runs(meta, options.shard_rows)
        for run in groups:
            suffix = "" if len(groups) == 1 else f".rg{run[0]:05d}-{run[-1]:05d}"
            rows = sum(meta.row_group(i).num_rows for i in run) if run else meta.num_rows
            entries.append(
                (uri, base + suffix, None if len(groups) == 1 else run, rows, identity, partitions)
            )
            names[base + suffix] += 1
    for uri, name, run, rows, identity, partitions in entries:
        if names[name] > 1:  # same relative name under two inputs: make it unique
            name = f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"
        shards.append(Shard(uri, f"{name}.parquet", run, rows, identity, partitions))
    return Plan(shards, unreadable)


def _check_types(
    uri: str, schema: pa.Schema, partitions: dict, options, types: dict[str, tuple]
) -> None:
    """Every kept column has one type across the output (a hive partition value is a
    string): one output file with `year` int64 and another with it as a string is no
    dataset a reader can open."""
    kept = {f.name: f.type for f in schema if copied_to_output(f.name, options)}
    kept |= {k: pa.string() for k in partitions if copied_to_output(k, options)}
    for column, kind in kept.items():
        first_kind, first_uri = types.setdefault(column, (kind, uri))
        if kind != first_kind:
            raise InputError(
                f"column {column!r} is {first_kind} in {first_uri} but {kind} in {uri}; the "
                "output would hold two types in one column. Score them as separate runs, or "
                "write the inputs with one type"
            )


def _check_columns(uri: str, names: list[str], partitions: dict, options) -> None:
    """The text and id columns must be there, no kept hive partition may also be a column of
    the file (one of the two values would be lost), and no kept column may clash with a
    score's."""
    both = [k for k in partitions if k in names and copied_to_output(k, options)]
    if both:
        raise InputError(
            f"{uri}: {', '.join(repr(k) for k in both)} is both a column of the file and a hive "
            f"partition of its path ({', '.join(f'{k}={partitions[k]}' for k in both)}); one "
            "value would be lost. Rename the column or the directory, or keep other columns "
            "with --id-column"
        )
    columns = set(names) | set(partitions)
    if options.text_column not in columns:
        raise InputError(
            f"{uri} has no text column {options.text_column!r}; columns: {', '.join(names)}"
        )
    missing = [c for c in options.id_columns if c not in columns]
    if missing:
        raise InputError(f"{uri} has no id column(s) {', '.join(missing)}")
    clash = [c for c in OUTPUT_COLUMNS if c in columns and kept_column(c, options)]
    if clash:
        raise InputError(
            f"{uri}: input column(s) {', '.join(clash)} would be overwritten by the scores; "
            "choose the kept columns with --id-column"
        )


def _group_runs(meta: pq.FileMetaData, shard_rows: int) -> list[tuple[int, ...]]:
    """Consecutive row groups, at most `shard_rows` rows a run (at least one group each)."""
    if meta.num_rows <= shard_rows or meta.num_row_groups <= 1:
        return [tuple(range(meta.num_row_groups))]
    runs, current, rows = [], [], 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if current and rows + n > shard_rows:
            runs.append(tuple(current))
            current, rows = [], 0
        current.append(i)
        rows += n
    runs.append(tuple(current))
    return runs
