"""Gating on the user's own data: a search that does not chase single flips, labels placed
by name in the model's own classes, and Parquet datasets drawn from by a hash of the text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.config.quantize import QuantizeConfig
from distilq.errors import InputError
from distilq.gate.data import (
    PACKAGED_VALIDATION,
    combine,
    load_validation,
    place_labels,
    split,
)
from distilq.gate.stats import flips_allowed, pass_probability
from distilq.inference import predict
from distilq.pipelines.quantize import quantize_and_promote
from distilq.quantize.checkpoint import load_checkpoint
from tests.conftest import ROOT, make_checkpoint, make_texts, quantize, run, tiny_config

THREE = ("negative", "neutral", "positive")
GENERIC = ("LABEL_0", "LABEL_1", "LABEL_2")


# -- the pass-probability rule --------------------------------------------------------------


def test_pass_probability_is_the_beta_binomial_predictive():
    # The case: 1,275 confirmation rows allow 6 flips at 0.99 / 95%.
    allowed = flips_allowed(1275, 0.99, 0.95)
    assert allowed == 6
    chances = [pass_probability(f, 546, 1275, allowed) for f in range(6)]
    assert all(a > b for a, b in zip(chances, chances[1:], strict=False))  # more flips, less
    # A draw of the flip rate from the Jeffreys posterior, then of the flips: the same odds.
    rng = np.random.default_rng(0)
    for flips in (0, 1, 3):
        rate = rng.beta(0.5 + flips, 0.5 + 546 - flips, 400_000)
        simulated = float((rng.binomial(1275, rate) <= allowed).mean())
        assert abs(simulated - chances[flips]) < 0.005
    # The margin rule needed agreement 0.99829 on 546 texts: zero flips. One flip still
    # predicts a pass 84% of the time; a confirmation part too small to pass never does.
    assert 0.8 < chances[1] < 0.9 and chances[0] > 0.95
    assert pass_probability(0, 546, 200, flips_allowed(200, 0.99, 0.95)) == 0.0


def test_margin_is_refused_with_what_replaced_it():
    with pytest.raises(ValueError, match="margin is gone.*pass_probability"):
        QuantizeConfig(margin=0.003)
    assert QuantizeConfig().pass_probability == 0.9
    with pytest.raises(ValueError):
        QuantizeConfig(pass_probability=1.0)


# -- labels by name -------------------------------------------------------------------------


def test_labels_are_placed_by_name_map_or_class_id():
    three = {name: i for i, name in enumerate(THREE)}
    pair = {"NEGATIVE": 0, "POSITIVE": 1}
    # Named data on a three-class model: in its own label space, never as ids 0/1.
    assert place_labels("d", ["positive", "Negative", "positive"], three) == [2, 0, 2]
    assert place_labels("d", [0, 1, 1], pair) == [0, 1, 1]  # integers on two classes: ids
    assert place_labels("d", [1.0, 0.0], pair) == [1, 0]  # as Parquet often holds them
    assert place_labels("d", ["pos", "neg"], pair, {"neg": "NEGATIVE", "pos": "POSITIVE"}) == [
        1,
        0,
    ]
    refusals = [
        (["negative", "positive"], {n: i for i, n in enumerate(GENERIC)}, "LABEL_0"),
        (["pos", "neg"], pair, "NEGATIVE, POSITIVE"),
        ([0, 1, 0], three, "as many classes as the model \\(3\\)"),
    ]
    for values, label2id, said in refusals:
        with pytest.raises(InputError, match=f"the data's labels: .*{said}|{said}") as e:
            place_labels("d", values, label2id)
        message = str(e.value)
        assert "The data's labels:" in message and "the model's:" in message
        assert "--label-map" in message and "--no-accuracy-check" in message
    with pytest.raises(InputError, match="maps to 'POSITIV', which is not a class"):
        place_labels("d", ["pos"], pair, {"pos": "POSITIV"})


def test_label_map_is_read_from_the_flag_form():
    config = QuantizeConfig(label_map="neg=NEGATIVE, pos = POSITIVE")
    assert config.label_map == {"neg": "NEGATIVE", "pos": "POSITIVE"}
    with pytest.raises(ValueError, match="DATA=MODEL pairs"):
        QuantizeConfig(label_map="neg:NEGATIVE")
    with pytest.raises(ValueError, match="--no-accuracy-check ignores labels"):
        QuantizeConfig(label_map="neg=NEGATIVE", no_accuracy_check=True)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("three") / "ckpt", seed=3, labels=THREE)


def test_a_three_class_model_is_measured_on_two_class_data_by_name(three_class, tmp_path):
    config = tiny_config(three_class, PACKAGED_VALIDATION, tmp_path / "reg", dry_run=True)
    manifest = quantize_and_promote(config).manifest
    # Recompute FP32's accuracy on the confirmation part with labels placed by name: a
    # `neutral` answer to a positive sentence counts as wrong.
    model, tokenizer = load_checkpoint(three_class)
    data = load_validation(PACKAGED_VALIDATION, label2id=model.config.label2id)
    assert set(data.labels) == {0, 2}
    _, confirmation = split(data)
    fp32 = predict(model, tokenizer, confirmation.texts, config.batching)
    expected = float((fp32.labels == np.asarray(confirmation.labels)).mean())
    assert manifest.metrics.accuracy_fp32 == pytest.approx(expected)
    assert (fp32.labels == 1).any()  # the model does answer neutral: the check measures it


@pytest.mark.slow
def test_generic_labels_are_refused_then_gated_on_agreement_alone(tmp_path):
    generic = make_checkpoint(tmp_path / "generic", seed=4, labels=GENERIC)
    registry = tmp_path / "reg"
    refused = run(
        *quantize(generic, PACKAGED_VALIDATION, registry, "--recipe", "dynamic-int8-token")
    )
    assert refused.returncode == 2, refused.stderr
    assert "The data's labels: negative, positive; the model's: LABEL_0, LABEL_1, LABEL_2" in (
        refused.stderr
    )
    assert not registry.exists() or not any(registry.rglob("manifest.json"))
    config = tiny_config(generic, PACKAGED_VALIDATION, registry, no_accuracy_check=True)
    manifest = quantize_and_promote(config).manifest
    m = manifest.metrics
    assert m.accuracy_fp32 is None and m.accuracy_int8 is None and m.accuracy_drop is None
    assert manifest.validation.labels is False
    assert "accuracy not checked (--no-accuracy-check): gated on agreement alone" in (
        manifest.decision.reasons
    )
    assert manifest.decision.thresholds.check_accuracy is False
    report = (registry / "versions" / manifest.version / "report.md").read_text()
    assert "accuracy not checked (--no-accuracy-check)" in report


# -- Parquet datasets -----------------------------------------------------------------------

ROWS, PARTITIONS = 50_000, ("a", "b", "c")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50,000 labelled rows in 3 hive partitions (`source=a|b|c`), long texts, several
    files and row groups each."""
    root = tmp_path_factory.mktemp("dataset") / "reviews"
    texts = make_texts(ROWS, seed=21)
    filler = [" ".join(make_texts(15, seed=k)) for k in range(500)]
    for i, part in enumerate(PARTITIONS):
        rows = range(i, ROWS, len(PARTITIONS))
        for j in range(2):
            chunk = [r for r in rows if r % 2 == j]
            table = pa.table(
                {
                    # Long, distinct texts: the whole column is far more than a draw holds.
                    "text": [f"{texts[r]} {filler[r % 500]} #{r}" for r in chunk],
                    "label": ["positive" if r % 3 else "negative" for r in chunk],
                }
            )
            (root / f"source={part}").mkdir(parents=True, exist_ok=True)
            pq.write_table(
                table, root / f"source={part}" / f"part-{j}.parquet", row_group_size=4000
            )
    return root


def test_a_parquet_dataset_is_drawn_from_by_a_hash_of_the_text(dataset):
    label2id = {"NEGATIVE": 0, "POSITIVE": 1}
    data = load_validation(str(dataset), label2id=label2id)
    assert len(data.texts) == 3000 and len(set(data.texts)) == 3000
    assert data.drawn.rows_read == ROWS and len(data.drawn.files) == 6
    assert all(set(ident) == {"size", "version"} for ident in data.drawn.files.values())
    # The same rows again, whichever way the dataset is named; labels read by name.
    again = load_validation(f"{dataset}/source=*/*.parquet", label2id=label2id)
    assert again.texts == data.texts and again.sha256 == data.sha256
    truth = {t: int(t.split("#")[1]) % 3 != 0 for t in data.texts}
    assert data.labels == [int(truth[t]) for t in data.texts]
    # Drawn apart from the split's hash: the tuning part is still about 30%.
    tuning, _ = split(data)
    assert 0.26 < len(tuning.texts) / 3000 < 0.34
    # Every partition is drawn from, in proportion.
    sources = [int(t.split("#")[1]) % 3 for t in data.texts]
    assert all(900 < sources.count(i) < 1100 for i in range(3))
    fewer = load_validation(str(dataset), label2id=label2id, rows=500)
    assert set(fewer.texts) < set(data.texts)  # the 500 smallest hashes of the same rule


def test_a_hive_partition_is_a_column(tmp_path):
    for label in ("negative", "positive"):
        directory = tmp_path / "data" / f"label={label}"
        directory.mkdir(parents=True)
        pq.write_table(
            pa.table({"text": [f"{label} {i}" for i in range(5)]}), directory / "x.parquet"
        )
    data = load_validation(str(tmp_path / "data"), label2id={"NEGATIVE": 0, "POSITIVE": 1})
    assert data.labels == [0] * 5 + [1] * 5 and data.texts[0] == "negative 0"
    with pytest.raises(InputError, match="no text column 'review'"):
        load_validation(str(tmp_path / "data"), text_column="review")
    with pytest.raises(InputError, match="--validation .* matches no file"):
        load_validation(str(tmp_path / "nothing" / "*.parquet"))


def _peaks(spec: str) -> tuple[int, int]:
    """Python's and Arrow's peak memory while drawing 3,000 rows of `spec`, in a fresh
    interpreter, imports done first."""
    script = f"""
import json, tracemalloc
import pyarrow as pa
from distilq.gate.data import load_validation
load_validation({spec!r}, check_accuracy=False, rows=1)  # the lazy imports
tracemalloc.start()
assert len(load_validation({spec!r}, check_accuracy=False).texts) == 3000
print(json.dumps([tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory()]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return tuple(json.loads(out.stdout))


def test_drawing_holds_only_what_it_keeps(dataset):
    import pyarrow.dataset as ds

    whole = ds.dataset(dataset, format="parquet").to_table(columns=["text"]).nbytes
    assert whole > 30e6
    # Memory is set by the rows kept and one row group, not by the dataset: three times the
    # rows cost no more than one partition's.
    one = _peaks(str(dataset / "source=a"))
    every = _peaks(str(dataset))
    for part, all_of_it in zip(one, every, strict=True):
        assert all_of_it < 1.3 * part and all_of_it < whole / 2.5, (one, every, whole)


def test_a_scheduled_run_on_unchanged_data_reuses_its_version(dataset, tiny_checkpoint, tmp_path):
    config = tiny_config(tiny_checkpoint, str(dataset), tmp_path / "reg")
    first = quantize_and_promote(config)
    sets = first.manifest.validation.sets
    assert sets[0].n_examples == 3000 and sets[0].drawn.rows_read == ROWS
    assert sorted(sets[0].drawn.files) == sorted(
        load_validation(str(dataset), check_accuracy=False).drawn.files
    )  # fmt: skip
    assert first.manifest.validation.labels is True
    second = quantize_and_promote(config)
    assert second.reused and second.version == first.version
    # Two sets, one drawn: each is a part the gate holds on its own.
    label2id = {"NEGATIVE": 0, "POSITIVE": 1}
    both = combine(
        [
            load_validation(str(dataset), label2id=label2id, rows=400),
            load_validation(PACKAGED_VALIDATION, label2id=label2id),
        ]
    )
    assert [p.drawn is not None for p in both.slices()] == [True, False]
