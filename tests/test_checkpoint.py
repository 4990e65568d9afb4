"""Checkpoint sources and the refusals that keep unsafe or unusable checkpoints out."""

from __future__ import annotations

import json
import pickle
import shutil

import fsspec
import pytest
import torch

from distilq.errors import InputError, SourceUnavailable
from distilq.quantize.checkpoint import load_checkpoint, resolve_checkpoint
from distilq.storage.store import sha256_file


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_local_directory_is_identified_by_its_weight_hash(tiny_checkpoint):
    found = resolve_checkpoint(str(tiny_checkpoint))
    assert found.kind == "local" and found.path == tiny_checkpoint
    assert found.weight_sha256 == {
        "model.safetensors": sha256_file(tiny_checkpoint / "model.safetensors")
    }
    assert found.revision.startswith("sha256:") and len(found.revision) == 7 + 64
    assert resolve_checkpoint(f"file://{tiny_checkpoint}").revision == found.revision


def test_revision_is_refused_for_local_sources(tiny_checkpoint):
    with pytest.raises(InputError, match="--revision 'v2' applies to hub sources only"):
        resolve_checkpoint(str(tiny_checkpoint), revision="v2")


def test_object_store_uri_is_downloaded_and_hashed(tiny_checkpoint, tmp_path):
    fs = fsspec.filesystem("memory")
    for f in tiny_checkpoint.iterdir():
        fs.pipe_file(f"/ckpt/{f.name}", f.read_bytes())
    found = resolve_checkpoint("memory://ckpt", cache_dir=tmp_path)
    assert found.kind == "uri" and found.path.is_relative_to(tmp_path)
    assert found.revision == resolve_checkpoint(str(tiny_checkpoint)).revision
    model, _ = load_checkpoint(found.path)
    assert model.config.num_labels == 2
    with pytest.raises(InputError, match="does not exist"):
        resolve_checkpoint("memory://nothing-here", cache_dir=tmp_path)


def test_unknown_path_that_is_not_a_hub_id():
    with pytest.raises(InputError, match="no such directory, and not a hub id or URI"):
        resolve_checkpoint("./no/such/dir/")


def test_unreachable_hub_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # A closed port on loopback: the hub download code runs for real and cannot connect.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with pytest.raises(
        SourceUnavailable, match="cannot reach the Hugging Face hub.*local checkpoint"
    ):
        resolve_checkpoint("distilbert/some-model", cache_dir=tmp_path)


def test_pickle_weights_load_with_weights_only(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "bin")
    model, _ = load_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    loaded, _ = load_checkpoint(ckpt)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


class Exploit:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_pickle_weights_with_code_are_refused(tiny_checkpoint, tmp_path, capsys):
    ckpt = _copy(tiny_checkpoint, tmp_path / "evil")
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Exploit()}, f)
    with pytest.raises(InputError, match="unreadable weights"):
        load_checkpoint(ckpt)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("auto_map", "needs custom code"),
        ("masked_lm", "not a sequence classifier"),
        ("no_tokenizer", "no tokenizer files"),
        ("corrupt_weights", "unreadable weights"),
        ("no_weights", "no weights"),
        ("no_config", "no config.json"),
        ("no_head", "weights missing for classifier"),
    ],
)
def test_unusable_checkpoints_are_refused_with_a_reason(
    tiny_checkpoint, tmp_path, breakage, message
):
    ckpt = _copy(tiny_checkpoint, tmp_path / breakage)
    config = json.loads((ckpt / "config.json").read_text())
    if breakage == "auto_map":
        config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
    elif breakage == "masked_lm":
        config["architectures"] = ["DistilBertForMaskedLM"]
    elif breakage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            (ckpt / name).unlink(missing_ok=True)
    elif breakage == "corrupt_weights":
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    elif breakage == "no_weights":
        (ckpt / "model.safetensors").unlink()
    elif breakage == "no_config":
        (ckpt / "config.json").unlink()
    elif breakage == "no_head":
        from safetensors.torch import load_file, save_file

        tensors = load_file(ckpt / "model.safetensors")
        save_file(
            {k: v for k, v in tensors.items() if not k.startswith("classifier.")},
            ckpt / "model.safetensors",
        )
    if (ckpt / "config.json").exists():
        (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        load_checkpoint(ckpt)
