"""Validation data: formats, GLUE TSV quoting, columns, labels, and batched prediction."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.config.shared import BatchingPolicy
from distilq.errors import InputError
from distilq.gate.data import PACKAGED_VALIDATION, ValidationSet, combine, load_validation, split
from distilq.inference import batch_order, predict, token_lengths
from distilq.quantize.checkpoint import load_checkpoint
from tests.conftest import make_texts

LABEL2ID = {"NEGATIVE": 0, "POSITIVE": 1}


def test_packaged_set_is_glue_sst2_validation():
    data = load_validation(PACKAGED_VALIDATION, label2id=LABEL2ID)
    assert len(data.texts) == 872
    assert sum(data.labels) == 444  # 444 positive, 428 negative, as GLUE has it
    assert data.texts[0] == "it 's a charming and often affecting journey . "


def test_tsv_is_read_as_glue_writes_it_quotes_are_ordinary(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text('text\tlabel\n"quoted" start\t1\nan " odd quote\t0\n')
    data = load_validation(str(path), label2id=LABEL2ID)
    assert data.texts == ['"quoted" start', 'an " odd quote']
    assert data.labels == [1, 0]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_other_formats_and_label_names(tmp_path, fmt):
    rows = [
        {"review": "fine, really", "sentiment": "positive"},
        {"review": "no", "sentiment": "NEGATIVE"},
    ]
    path = tmp_path / f"v.{fmt}"
    if fmt == "csv":
        path.write_text('review,sentiment\n"fine, really",positive\nno,NEGATIVE\n')
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_validation(str(path), "review", "sentiment", LABEL2ID)
    assert data.texts == ["fine, really", "no"] and data.labels == [1, 0]


def test_labels_are_optional_unless_named(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text("text\nsomething\n")
    assert load_validation(str(path), label2id=LABEL2ID).labels is None
    with pytest.raises(InputError, match="no label column 'gold'; columns: text"):
        load_validation(str(path), label_column="gold", label2id=LABEL2ID)


def test_clear_errors_for_bad_input(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(InputError, match="no text column 'text'; columns: sentence, label"):
        load_validation(str(path), label2id=LABEL2ID)
    path.write_text("text\tlabel\nok\t7\n")
    with pytest.raises(InputError, match=r"integer labels \[7\] are read as class ids only"):
        load_validation(str(path), label2id=LABEL2ID)
    path.write_text("text\tlabel\n \t1\n")
    with pytest.raises(InputError, match="rows \\[0\\] have no text"):
        load_validation(str(path), label2id=LABEL2ID)
    path.write_text("text\tlabel\na\tb\tc\n")
    with pytest.raises(InputError, match="different number of fields"):
        load_validation(str(path), label2id=LABEL2ID)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "v.xml").write_text("<a/>")
    with pytest.raises(InputError, match="unsupported type '.xml'"):
        load_validation(str(tmp_path / "v.xml"))


def test_prediction_is_deterministic_and_in_input_order(tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    texts = make_texts(70, seed=11)
    policy = BatchingPolicy(batch_size=16)
    batches = batch_order(token_lengths(tokenizer, texts, policy.max_length), policy)
    lengths = [len(tokenizer(texts[b[-1]])["input_ids"]) for b in batches]
    assert lengths == sorted(lengths) and sorted(i for b in batches for i in b) == list(range(70))
    first = predict(model, tokenizer, texts, policy)
    again = predict(model, tokenizer, texts, policy)
    assert np.array_equal(first.probs, again.probs)
    one_by_one = np.concatenate([predict(model, tokenizer, [t], policy).probs for t in texts[:5]])
    assert np.allclose(first.probs[:5], one_by_one, atol=1e-5)


def test_several_sets_combine_in_order_each_kept_as_a_part(tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.jsonl"
    first.write_text("text\tlabel\ngood\t1\nbad\t0\n")
    second.write_text('{"text": "a long review", "label": "positive"}\n')
    a, b = (load_validation(str(p), label2id=LABEL2ID) for p in (first, second))
    data = combine([a, b])
    assert data.texts == ["good", "bad", "a long review"] and data.labels == [1, 0, 1]
    assert [(p.name, p.start, p.stop) for p in data.slices()] == [
        (str(first), 0, 2),
        (str(second), 2, 3),
    ]
    assert combine([b, a]).sha256 != data.sha256  # order is part of the run's identity
    assert combine([a]) is a and a.slices()[0].stop == 2


def test_combining_refuses_labels_in_some_sets_only_and_a_set_given_twice(tmp_path):
    labelled, bare = tmp_path / "a.tsv", tmp_path / "b.tsv"
    labelled.write_text("text\tlabel\ngood\t1\nbad\t0\n")
    bare.write_text("text\nfine\n")
    a, b = (load_validation(str(p), label2id=LABEL2ID) for p in (labelled, bare))
    with pytest.raises(InputError, match="labels in every set or in none"):
        combine([a, b])
    with pytest.raises(InputError, match="given twice"):
        combine([a, a])


def test_tuning_and_confirmation_parts_are_disjoint_and_follow_each_text():
    texts = [f"review number {i}" for i in range(1000)]
    a = ValidationSet("a", texts[:600], [1] * 600, "sa")
    b = ValidationSet("b", texts[600:] + texts[:50], [0] * 450, "sb")  # 50 texts of `a` again
    tuning, confirmation = split(combine([a, b]))
    assert not set(tuning.texts) & set(confirmation.texts)  # a text's copies share its side
    assert sorted(tuning.texts + confirmation.texts) == sorted(a.texts + b.texts)
    assert 0.25 < len(tuning.texts) / 1050 < 0.35  # SPLIT_RULE's 30%
    assert [p.name for p in confirmation.slices()] == ["a", "b"]
    part_b = confirmation.slices()[1]
    assert set(confirmation.labels[part_b.start : part_b.stop]) == {0}  # labels follow texts
    assert split(combine([a, b]))[1].texts == confirmation.texts  # deterministic
