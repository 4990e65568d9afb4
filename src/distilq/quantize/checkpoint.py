"""Checkpoint sources (Hugging Face hub, local directory, fsspec URI) and safe loading."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from distilq.errors import InputError, SourceUnavailable
from distilq.storage.store import Store, sha256_file

CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint made available as a local directory, with where it came from."""

    source: str
    kind: str  # "hub", "local" or "uri"
    path: Path
    revision: str  # hub commit, or "sha256:..." over the weight files
    weight_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Bytes on disk of the source's weight files."""
        return sum((self.path / name).stat().st_size for name in self.weight_sha256)


def weight_files(names: list[str]) -> list[str]:
    """The weight files to use among `names`: safetensors if any, else the pickle file."""
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    if PICKLE_WEIGHTS in names:
        return [PICKLE_WEIGHTS]
    return []


def _needed_files(names: list[str]) -> list[str]:
    wanted = [
        n for n in names if n == CONFIG_FILE or n in TOKENIZER_FILES or n == SAFETENSORS_INDEX
    ]
    return sorted(set(wanted) | set(weight_files(names)))


def resolve_checkpoint(
    source: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Checkpoint:
    """Make `source` available locally and record its revision.

    `source` is a local directory, an fsspec URI (``file://``, ``s3://`` ...) or a hub id.
    `revision` (hub only) defaults to ``main``; the resolved commit is recorded. Local and
    URI sources are identified by a sha256 over their weight files.
    """
    if "://" in source:
        store = Store(source)
        local = store.local_path()
        if local is not None:
            return _resolve_local(source, local, revision)
        return _resolve_uri(source, store, revision, cache_dir)
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(source, path, revision)
    if _HUB_ID.match(source):
        return _resolve_hub(source, revision or "main", cache_dir)
    raise InputError(f"checkpoint source {source!r}: no such directory, and not a hub id or URI")


def _check_no_revision(source: str, revision: str | None) -> None:
    if revision not in (None, "main"):
        raise InputError(
            f"--revision {revision!r} applies to hub sources only; {source!r} is identified "
            "by the sha256 of its weight files"
        )


def _resolve_local(source: str, path: Path, revision: str | None) -> Checkpoint:
    _check_no_revision(source, revision)
    if not path.is_dir():
        raise InputError(f"checkpoint source {source!r} is not a directory")
    names = [p.name for p in path.iterdir() if p.is_file()]
    return _local_checkpoint(source, "local", path, names)


def _local_checkpoint(source: str, kind: str, path: Path, names: list[str]) -> Checkpoint:
    weights = weight_files(names)
    if not weights:
        raise InputError(
            f"checkpoint {source!r} has no weights (*.safetensors or {PICKLE_WEIGHTS}) in {path}"
        )
    hashes = {name: sha256_file(path / name) for name in weights}
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode())
    return Checkpoint(source, kind, path, f"sha256:{combined.hexdigest()}", hashes)


def copy_checkpoint(path: str | Path, target: str | Path) -> None:
    """Copy what distilq reads of a checkpoint directory (config, tokenizer, weights) to
    `target`."""
    import shutil

    path, target = Path(path), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in _needed_files([p.name for p in path.iterdir() if p.is_file()]):
        shutil.copyfile(path / name, target / name)


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "distilq"


def _resolve_uri(source: str, store: Store, revision: str | None, cache_dir) -> Checkpoint:
    _check_no_revision(source, revision)
    try:
        names = store.list()
        if not names and not store.exists():
            raise FileNotFoundError(source)
    except FileNotFoundError as e:
        raise InputError(f"checkpoint source {source!r} does not exist") from e
    except OSError as e:
        raise SourceUnavailable(f"cannot list checkpoint source {source!r}: {e}") from e
    target = _cache_root(cache_dir) / "sources" / hashlib.sha256(source.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    for name in _needed_files(names):
        try:
            store.get_file(name, target / name)
        except OSError as e:
            raise SourceUnavailable(f"cannot download {name} from {source!r}: {e}") from e
    return _local_checkpoint(source, "uri", target, _needed_files(names))


def _resolve_hub(repo_id: str, revision: str, cache_dir: str | Path | None) -> Checkpoint:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        path = snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=_needed_files(names),
            cache_dir=str(_cache_root(cache_dir) / "hub") if cache_dir else None,
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise InputError(
            f"hub repository {repo_id!r} not found or not accessible (and no local directory "
            f"of that name exists): {e}"
        ) from e
    except RevisionNotFoundError as e:
        raise InputError(f"hub repository {repo_id!r} has no revision {revision!r}") from e
    except Exception as e:  # connection errors come in many types; all are worth a retry
        raise SourceUnavailable(
            f"cannot reach the Hugging Face hub for {repo_id!r}@{revision}: {e}. Offline, point "
            "--source (or DISTILQ_SOURCE) at a local checkpoint directory."
        ) from e
    checkpoint = _local_checkpoint(repo_id, "hub", Path(path), _needed_files(names))
    return Checkpoint(repo_id, "hub", checkpoint.path, str(info.sha), checkpoint.weight_sha256)


def _check_config(path: Path) -> None:
    """Refuse, before transformers reads it, a config that needs custom code or is not a
    sequence classifier's."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{path}: no {CONFIG_FILE}, so not a transformers checkpoint")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{config_path}: unreadable config: {e}") from e
    if "auto_map" in raw:
        raise InputError(
            f"{path}: the checkpoint needs custom code (auto_map in config.json); distilq never "
            "runs remote or custom model code"
        )
    architectures = raw.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(
            f"{path}: not a sequence classifier (architectures: {', '.join(architectures)})"
        )


def load_checkpoint(path: str | Path):
    """Load a sequence classifier and its tokenizer from a local directory, in FP32 eval mode.

    Refuses, with a message naming the problem: anything that would need
    ``trust_remote_code`` (never enabled), a model that is not a sequence classifier or lacks
    trained weights for its head, a missing tokenizer, unreadable weights. Pickle weights
    load only with ``weights_only=True``.
    """
    path = Path(path)
    model = load_model(path)
    return model, _load_tokenizer(path)


def load_model(path: str | Path):
    """The FP32 sequence classifier of a local checkpoint directory, refused as
    `load_checkpoint` refuses it; no tokenizer needed."""
    from transformers import AutoConfig

    path = Path(path)
    _check_config(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{path}: unsupported config: {e}") from e
    return _load_classifier(path, config).eval()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise InputError(f"{path}: cannot load the tokenizer: {e}") from e


def _load_classifier(path: Path, config):
    """The FP32 model, its weights read without unpickling code, its head trained."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from distilq.quantize.kernels.base import quiet_torch

    weights = weight_files([p.name for p in path.iterdir()])
    if not weights:
        raise InputError(f"{path}: no weights (*.safetensors or {PICKLE_WEIGHTS})")
    try:
        with quiet_torch():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                config=config,
                dtype=torch.float32,
                use_safetensors=weights[0].endswith(".safetensors"),
                weights_only=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
    except ValueError as e:
        raise InputError(f"{path}: not loadable as a sequence classifier: {e}") from e
    except Exception as e:
        raise InputError(f"{path}: unreadable weights ({', '.join(weights)}): {e}") from e
    missing = info.get("missing_keys") or []
    if missing:
        raise InputError(
            f"{path}: weights missing for {', '.join(sorted(missing)[:5])}: an untrained "
            "classifier head would give meaningless predictions"
        )
    return model


def read_label2id(path: str | Path) -> dict[str, int]:
    """The checkpoint's class names to ids, from config.json (no model load)."""
    config_path = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{config_path}: unreadable config: {e}") from e
    return {str(k): int(v) for k, v in (raw.get("label2id") or {}).items()}
