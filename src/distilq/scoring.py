"""Batch scoring of Parquet files: plan shards, stream them through a classifier, write
atomically, and keep `_manifest.json` so an interrupted run resumes where it stopped.

An output directory holds only scored `*.parquet` files and `_manifest.json`. A shard's
file appears under its final name by one rename, after it is complete; the manifest
records which shards are done, for which inputs and which model version.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from distilq.errors import InputError
from distilq.storage import (
    WriteConflict,
    is_local,
    protocol,
    read_for_update,
    temporary_prefix,
    url_to_fs,
    write_if_unchanged,
)

MANIFEST = "_manifest.json"
OUTPUT_COLUMNS = ("label", "score", "model_version", "error")


class ScoreOptions(BaseModel):
    """What to read, what to write, and how to batch."""

    text_column: str = "text"
    id_columns: list[str] = Field(default_factory=list)
    keep_text: bool = False
    probabilities: bool = False
    max_length: int = Field(512, ge=8, le=4096)
    batch_size: int = Field(32, ge=1, le=4096)
    sort_by_length: bool = True
    window_batches: int = Field(32, ge=1, description="rows are sorted within this many batches")
    shard_rows: int = Field(200_000, ge=1, description="files with more rows split by row group")

    @property
    def window_rows(self) -> int:
        return self.batch_size * self.window_batches


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
class ShardStats:
    """What scoring one shard did."""

    output: str
    rows_read: int = 0
    rows_written: int = 0
    rows_error: int = 0
    rows_truncated: int = 0
    seconds: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    score_sum: float = 0.0


@dataclass
class Plan:
    """Shards to score, and input files that could not even be opened."""

    shards: list[Shard]
    unreadable: dict[str, str]  # input URI -> why


# -- discovering inputs ----------------------------------------------------------------------


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else f"{protocol(fs)}://{path.lstrip('/')}"


def _identity(info: dict) -> dict:
    ident = {"size": int(info.get("size") or 0)}
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            ident["version"] = str(info[key])
            break
    return ident


def discover_inputs(inputs: list[str]) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """Every Parquet file named by `inputs` (files, directories, globs, fsspec URIs), with
    the name relative to what the user gave and the file's identity; and the directories
    the inputs walk (given directories, roots of `**` globs). Missing inputs fail."""
    found: list[tuple[str, str, dict]] = []
    walked: list[str] = []
    for spec in inputs:
        fs, path = url_to_fs(spec)
        if globlib.has_magic(path):
            root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not paths:
                raise InputError(f"--input {spec!r} matches no file")
            if "**" in path:
                walked.append(_uri(fs, root))
        elif fs.isdir(path):
            root = path.rstrip("/")
            paths = sorted(
                p
                for p in fs.find(path)
                if p.endswith(".parquet")
                and not any(part.startswith(("_", ".")) for part in p[len(root) :].split("/"))
            )
            if not paths:
                raise InputError(f"--input {spec!r} is a directory with no *.parquet file")
            walked.append(_uri(fs, root))
        elif fs.isfile(path):
            root, paths = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        else:
            raise InputError(f"--input {spec!r} does not exist")
        for p in paths:
            relative = p[len(root) :].lstrip("/") if root else p
            found.append((_uri(fs, p), relative, _identity(fs.info(p))))
    uris = [u for u, _, _ in found]
    duplicates = {u for u in uris if uris.count(u) > 1}
    if duplicates:
        raise InputError(f"inputs name these files more than once: {', '.join(sorted(duplicates))}")
    return found, walked


def _canonical(uri: str) -> str:
    """One spelling per place: local paths with links resolved, URIs as protocol://path."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return os.path.realpath(path)
    return f"{protocol(fs)}://{path.strip('/')}"


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_output(output: str, input_dirs: list[str], input_files: list[str]) -> None:
    """Refuse an output distilq cannot or must not write to, before anything is touched:
    an existing file, a path under a file, an unwritable place, or one that overlaps the
    inputs (equal to, inside or around an input directory or file, links resolved)."""
    fs, path = url_to_fs(output)
    if is_local(fs):
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise InputError(f"--output {output!r} is an existing file, not a directory")
        existing = next(p for p in [target, *target.parents] if p.exists())
        if not existing.is_dir():
            raise InputError(f"--output {output!r} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--output {output!r} cannot be created: {existing} is not writable")
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


def _partitions(relative: str) -> dict[str, str]:
    parts = PurePosixPath(relative).parts[:-1]
    return dict(p.split("=", 1) for p in parts if "=" in p and not p.startswith("="))


@contextlib.contextmanager
def _open_parquet(uri: str) -> Iterator[pq.ParquetFile]:
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as f:
        yield pq.ParquetFile(f)


def plan_shards(inputs: list[str], options: ScoreOptions, output: str | None = None) -> Plan:
    """Shards for every input file, after checking each schema has the needed columns and,
    given the `output`, that it lies apart from the inputs (`check_output`).

    A file whose footer cannot be read is recorded as unreadable (the others still run);
    a missing text or id column is a usage error for the whole run.
    """
    shards: list[Shard] = []
    unreadable: dict[str, str] = {}
    names: Counter[str] = Counter()
    entries = []
    files, walked = discover_inputs(inputs)
    if output is not None:
        check_output(output, walked, [uri for uri, _, _ in files])
    for uri, relative, identity in files:
        try:
            with _open_parquet(uri) as parquet:
                meta = parquet.metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as e:
            unreadable[uri] = f"not a readable Parquet file: {e}"
            continue
        partitions = _partitions(relative)
        columns = set(schema.names) | set(partitions)
        if options.text_column not in columns:
            raise InputError(
                f"{uri} has no text column {options.text_column!r}; "
                f"columns: {', '.join(schema.names)}"
            )
        missing = [c for c in options.id_columns if c not in columns]
        if missing:
            raise InputError(f"{uri} has no id column(s) {', '.join(missing)}")
        clash = [c for c in OUTPUT_COLUMNS if c in columns and _kept(c, options)]
        if clash:
            raise InputError(
                f"{uri}: input column(s) {', '.join(clash)} would be overwritten by the scores; "
                "choose the kept columns with --id-column"
            )
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


def _kept(column: str, options: ScoreOptions) -> bool:
    return column in options.id_columns if options.id_columns else column != options.text_column


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


# -- scoring ---------------------------------------------------------------------------------


def _output_schema(
    input_schema: pa.Schema, kept: list[str], partitions: dict, labels: list[str], options
) -> pa.Schema:
    fields = [input_schema.field(c) for c in kept if c in input_schema.names]
    fields += [
        pa.field(k, pa.string()) for k in partitions if k in kept and k not in input_schema.names
    ]
    fields += [pa.field("label", pa.string()), pa.field("score", pa.float32())]
    if options.probabilities:
        fields += [pa.field(f"prob_{label}", pa.float32()) for label in labels]
    fields += [pa.field("model_version", pa.string()), pa.field("error", pa.string())]
    return pa.schema(fields)


def score_window(
    classifier, values: list, options: ScoreOptions
) -> tuple[np.ndarray, list[str | None], int]:
    """Probabilities for the values (NaN rows where a value cannot be scored; rows sorted by
    length inside the window), the error of every row, and how many texts were truncated."""
    policy = classifier.batching.model_copy(
        update={
            "batch_size": options.batch_size,
            "max_length": options.max_length,
            "sort_by_length": options.sort_by_length,
        }
    )
    probs, errors, lengths = classifier.score(values, policy)
    return probs, errors, sum(n > options.max_length for n in lengths)


def score_shard(
    classifier,
    shard: Shard,
    output_dir: str,
    options: ScoreOptions,
    on_progress: Callable[[int], None] | None = None,
) -> ShardStats:
    """Score one shard into `output_dir/<shard.output>`, streaming record batches.

    Rows keep their order. The file is written to a temporary name that does not end in
    `.parquet` and published when complete (see `_staged`): a killed run leaves no partial
    output.
    """
    start = time.perf_counter()
    stats = ShardStats(shard.output)
    labels = [classifier.id2label[i] for i in sorted(classifier.id2label)]
    fs, out_root = url_to_fs(output_dir)
    final = f"{out_root.rstrip('/')}/{shard.output}"
    with _open_parquet(shard.uri) as parquet, _staged(fs, final) as sink:
        input_schema = parquet.schema_arrow
        names = list(input_schema.names)
        names += [k for k in shard.partitions if k not in input_schema.names]
        kept = [
            c
            for c in names
            if _kept(c, options) or (options.keep_text and c == options.text_column)
        ]
        schema = _output_schema(input_schema, kept, shard.partitions, labels, options)
        read = [c for c in dict.fromkeys([*kept, options.text_column]) if c in input_schema.names]
        with pq.ParquetWriter(sink, schema) as writer:
            batches = parquet.iter_batches(
                batch_size=options.window_rows, row_groups=shard.row_groups, columns=read
            )
            for batch in batches:
                table = _score_batch(classifier, batch, shard, kept, labels, schema, options, stats)
                writer.write_table(table)
                if on_progress:
                    on_progress(batch.num_rows)
    stats.seconds = time.perf_counter() - start
    return stats


def _score_batch(classifier, batch, shard, kept, labels, schema, options, stats) -> pa.Table:
    n = batch.num_rows
    values = batch.column(options.text_column).to_pylist()
    probs, errors, truncated = score_window(classifier, values, options)
    columns = {}
    for name in kept:
        if name in batch.schema.names:
            columns[name] = batch.column(name)
        else:  # a hive partition value
            columns[name] = pa.array([shard.partitions[name]] * n, pa.string())
    best = np.nan_to_num(probs, nan=-1).argmax(axis=1)
    score = probs[np.arange(n), best]
    ok = np.array([e is None for e in errors])
    columns["label"] = pa.array(
        [labels[b] if o else None for b, o in zip(best, ok, strict=True)], pa.string()
    )
    columns["score"] = pa.array(score, pa.float32(), mask=~ok)
    if options.probabilities:
        for j, label in enumerate(labels):
            columns[f"prob_{label}"] = pa.array(probs[:, j], pa.float32(), mask=~ok)
    columns["model_version"] = pa.array([classifier.version] * n, pa.string())
    columns["error"] = pa.array(errors, pa.string())
    stats.rows_read += n
    stats.rows_written += n
    stats.rows_error += int((~ok).sum())
    stats.rows_truncated += truncated
    for b in best[ok]:
        stats.labels[labels[b]] = stats.labels.get(labels[b], 0) + 1
    stats.score_sum += float(score[ok].sum())
    return pa.Table.from_pydict(columns, schema=schema)


@contextlib.contextmanager
def _staged(fs: fsspec.AbstractFileSystem, final: str) -> Iterator[str]:
    """A local path to write a shard to; it appears at `final` only once complete.

    On disk: a hidden `.tmp` file in the output directory, renamed over `final`. On object
    stores (no rename): a local temporary file, then one upload to `final`; S3 makes an
    object visible only when its upload completes, so a killed run leaves nothing partial.
    Either way the manifest entry, written after, is what marks the shard done.
    """
    local = is_local(fs)
    directory = os.path.dirname(final) if local else None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(final), suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if local:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for readers
            os.replace(tmp, final)  # atomic on one filesystem
        else:
            fs.put_file(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- the output directory and its manifest ---------------------------------------------------


class OutputManifest:
    """`_manifest.json`: model version, batching, and every completed shard with its input."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.fs, self.root = url_to_fs(output_dir)
        self.path = f"{self.root.rstrip('/')}/{MANIFEST}"
        self.data: dict = {}
        self.token: str | None = None  # S3: the ETag of the manifest we last read or wrote

    def load(self) -> dict:
        content, self.token = read_for_update(self.fs, self.path)
        try:
            self.data = json.loads(content) if content else {}
        except ValueError:
            self.data = None
        if not isinstance(self.data, dict):
            raise InputError(
                f"{self.output_dir}/{MANIFEST} is not a distilq output manifest (damaged or "
                "foreign); distilq will not write there. Choose another --output"
            )
        return self.data

    def save(self) -> None:
        """Write atomically (see `storage.write_atomic`). On S3 the write is conditional:
        a manifest another run changed since we read it is never overwritten."""
        content = (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.token = write_if_unchanged(self.fs, self.path, content, self.token)
        except WriteConflict:
            raise InputError(
                f"output {self.output_dir}: another run changed {MANIFEST} while this one was "
                "writing; two runs must not write to one output at once"
            ) from None


def _is_temporary(name: str) -> bool:
    """A shard or manifest file a killed run left half-written (see `_staged`,
    `storage.write_atomic`)."""
    ours = name.startswith(temporary_prefix(MANIFEST)) or ".parquet." in name
    return name.startswith(".") and name.endswith(".tmp") and ours


def prepare_output(
    output_dir: str, plan: Plan, model_version: str, settings: dict, overwrite: bool
) -> tuple[OutputManifest, list[Shard]]:
    """Check the output directory against this run and return the manifest and the shards
    still to score.

    Refuses results of another model version, other inputs or other settings unless
    `overwrite`, which removes them. Files distilq did not write there (not in
    `_manifest.json`) are never removed: an output holding any is refused, overwrite or not.
    """
    manifest = OutputManifest(output_dir)
    fs, root = manifest.fs, manifest.root.rstrip("/")
    existing = manifest.load()
    try:
        files = [PurePosixPath(p).name for p in fs.ls(root, detail=False)]
    except FileNotFoundError:  # not made yet; object stores have no empty directories
        files = []
    wanted = {s.output: s for s in plan.shards}
    # A distilq output's own files: recorded shards, and shards of this plan that a killed
    # run finished but had not recorded yet.
    ours = set(existing.get("shards", {})) | (set(wanted) if existing else set())
    foreign = [f for f in files if f != MANIFEST and f not in ours and not _is_temporary(f)]
    if foreign:
        raise InputError(
            f"output {output_dir} holds files distilq did not write there "
            f"({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); distilq "
            "never removes them, not even with --overwrite. Choose another --output"
        )
    problems = []
    if existing:
        if existing.get("model_version") != model_version:
            problems.append(f"it holds results of model version {existing.get('model_version')}")
        if existing.get("settings") != settings:
            problems.append("it was written with other settings (columns, batching or max length)")
        for name, entry in existing.get("shards", {}).items():
            shard = wanted.get(name)
            if shard is None or entry["input"] != shard.uri or entry["identity"] != shard.identity:
                problems.append(f"{name} comes from another input ({entry['input']})")
                break
    if problems and not overwrite:
        raise InputError(
            f"output {output_dir}: {'; '.join(problems)}. Use another --output, or --overwrite "
            "to replace distilq's results there"
        )
    fs.makedirs(root, exist_ok=True)
    for f in files:
        if _is_temporary(f) or ((problems or overwrite) and f != MANIFEST):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{f}")
    done = {} if problems or overwrite else existing.get("shards", {})
    manifest.data = {
        "model_version": model_version,
        "settings": settings,
        "shards": {k: v for k, v in done.items() if fs.exists(f"{root}/{k}")},
        "failed": {},
    }
    todo = [s for s in plan.shards if s.output not in manifest.data["shards"]]
    return manifest, todo


def record_shard(manifest: OutputManifest, shard: Shard, stats: ShardStats) -> None:
    """Mark a shard done in the manifest and save it."""
    manifest.data["failed"].pop(shard.name, None)
    manifest.data["shards"][shard.output] = {
        "input": shard.uri,
        "identity": shard.identity,
        "row_groups": list(shard.row_groups) if shard.row_groups is not None else None,
        **{k: v for k, v in asdict(stats).items() if k != "output"},
    }
    manifest.save()


def record_failure(manifest: OutputManifest, name: str, error: str) -> None:
    """Record an input file (or shard of one, by `Shard.name`) that failed, and save."""
    manifest.data["failed"][name] = error
    manifest.save()


def finalize(manifest: OutputManifest, seconds: float) -> dict:
    """Totals over every shard scored into this output (this run or before), also saved in
    the manifest as `summary`; `seconds` is this run's wall time."""
    shards = manifest.data["shards"].values()
    labels: Counter[str] = Counter()
    for s in shards:
        labels.update(s["labels"])
    scored = sum(labels.values())
    summary = {
        "model_version": manifest.data["model_version"],
        "output": manifest.output_dir,
        "files": len(manifest.data["shards"]),
        "failed": dict(manifest.data["failed"]),
        "rows_read": sum(s["rows_read"] for s in shards),
        "rows_written": sum(s["rows_written"] for s in shards),
        "rows_error": sum(s["rows_error"] for s in shards),
        "rows_truncated": sum(s["rows_truncated"] for s in shards),
        "labels": dict(sorted(labels.items())),
        "mean_score": (sum(s["score_sum"] for s in shards) / scored) if scored else None,
        "seconds": round(seconds, 3),
    }
    manifest.data["summary"] = summary
    manifest.save()
    return summary


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Refuse a second run writing to the same local output directory at the same time.

    Object stores have no lock; there the manifest's conditional writes stop a run as soon
    as another one changed the manifest under it (see `OutputManifest.save`).
    """
    fs, root = url_to_fs(output_dir)
    if not is_local(fs):
        yield
        return
    import fcntl

    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"output {output_dir} is being written by another distilq run; wait for it "
                "or choose another --output"
            ) from None
        yield
    finally:
        os.close(fd)


def options_for(config, registry, version: str) -> ScoreOptions:
    """Scoring options from a ScoreConfig and the model's validated batching policy.

    `--max-length` defaults to the policy's (at most the model's positions); a longer one
    than the model has positions for is refused here, before any file is scored.
    """
    batching = registry.manifest(version)["recipe"]["batching"]
    positions = registry.model_config(version).get("max_position_embeddings")
    limit = min(batching["max_length"], positions or batching["max_length"])
    if config.max_length is not None and positions and config.max_length > positions:
        raise InputError(
            f"--max-length {config.max_length} exceeds the {positions} token positions of model "
            f"{version}; use at most {positions} (longer texts are truncated and counted)"
        )
    return ScoreOptions(
        text_column=config.text_column,
        id_columns=config.id_columns,
        keep_text=config.keep_text,
        probabilities=config.probabilities,
        max_length=config.max_length or limit,
        batch_size=config.batch_size or batching["batch_size"],
        sort_by_length=batching["sort_by_length"],
    )


def preflight(config) -> str:
    """Fail fast, before starting any engine: unknown model, a --max-length the model cannot
    take, missing paths or columns, an output that overlaps the inputs or cannot be made.
    Returns the model version `config.model` names now."""
    from distilq.registry import Registry

    registry = Registry(config.registry)
    version = registry.resolve(config.model)
    plan_shards(config.inputs, options_for(config, registry, version), config.output)
    return version
