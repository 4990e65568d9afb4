"""The `distilq` console script, run as a user runs it: exit codes, --json, first run."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.registry.registry import Registry
from tests.conftest import cli_env, quantize, run, stage_tiny_version


@pytest.fixture
def registry_with_two(tmp_path, tiny_checkpoint, tiny_validation):
    """A registry holding two approved versions, the second in production."""
    registry = Registry(tmp_path / "reg")
    versions = []
    for i in range(2):
        staging = tmp_path / f"stage{i}"
        staging.mkdir()
        versions.append(
            registry.publish(staging, stage_tiny_version(staging, tiny_checkpoint, tiny_validation))
        )
        registry.promote(versions[-1], "setup")
    return tmp_path / "reg", versions


def test_version_and_help():
    assert run("--version").stdout.strip() == "distilq 0.2.0"
    for command in (
        ["quantize"],
        ["models"],
        ["models", "list"],
        ["models", "show"],
        ["models", "promote"],
        ["models", "rollback"],
    ):
        done = run(*command, "--help")
        assert done.returncode == 0 and "usage: distilq" in done.stdout
    assert "exit codes: 0 promoted" in run("quantize", "--help").stdout


@pytest.mark.slow
def test_first_run_on_an_empty_prefect_home_promotes(tmp_path, tiny_checkpoint, tiny_validation):
    home = tmp_path / "prefect-home"  # does not exist yet: a fresh machine
    registry = tmp_path / "reg"
    reviews = tmp_path / "reviews.jsonl"  # a second set, gated on its own
    reviews.write_text(
        "".join(
            json.dumps({"text": f"good film {i}", "label": "positive"}) + "\n" for i in range(60)
        )
    )
    extra = ["--recipe", "dynamic-int8-token", "--min-agreement", "0.9", "--max-accuracy-drop", "1"]
    extra += ["--validation", str(reviews), "--json"]
    done = run(*quantize(tiny_checkpoint, tiny_validation, registry, *extra), prefect_home=home)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(done.stdout)  # stdout holds the manifest and nothing else
    assert manifest["decision"]["approved"] is True
    given = [(s["name"], s["n_examples"]) for s in manifest["validation"]["sets"]]
    assert given == [(str(tiny_validation), 200), (str(reviews), 60)]
    # The gate judged each set's confirmation part, which auto's choices never saw.
    judged = [(s["name"], s["n_examples"]) for s in manifest["metrics"]["sets"]]
    assert judged == [(s["name"], s["n_confirmation"]) for s in manifest["validation"]["sets"]]
    split = manifest["validation"]["split"]
    assert split["tuning"] + split["confirmation"] == 260 and 0 < split["tuning"] < 130
    assert all(
        0 < s["agreement_lower_bound"] <= s["agreement"] for s in manifest["metrics"]["sets"]
    )
    assert manifest["metrics"]["confidence"] == 0.95
    assert manifest["decision"]["reasons"][-2].startswith(f"{reviews}: agreement lower bound")
    assert Registry(registry).alias() == manifest["version"]
    assert home.is_dir()

    shown = run("models", "show", "production", "--registry", str(registry), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["version"] == manifest["version"]
    report = run("models", "show", manifest["version"], "--registry", str(registry))
    assert "**Gate: APPROVED**" in report.stdout
    assert "The gate checks each validation set on its own" in report.stdout


@pytest.mark.slow
def test_gate_rejection_exits_3_with_the_manifest(tmp_path, sensitive_checkpoint, tiny_validation):
    args = quantize(
        sensitive_checkpoint, tiny_validation, tmp_path / "reg", "--recipe", "dynamic-int8-token"
    )
    done = run(*args, "--min-agreement", "0.95", "--json")
    assert done.returncode == 3, done.stderr[-3000:]
    manifest = json.loads(done.stdout)
    assert manifest["decision"]["approved"] is False
    assert "gate rejected" in done.stderr and "agreement" in done.stderr
    assert Registry(tmp_path / "reg").alias() is None


@pytest.mark.slow
def test_bad_input_exits_2_naming_the_problem(tmp_path, tiny_checkpoint, tiny_validation):
    args = quantize(tiny_checkpoint, tiny_validation, tmp_path / "reg", "--text-column", "review")
    done = run(*args)
    assert done.returncode == 2
    assert "no text column 'review'; columns: text, label" in done.stderr
    # 200 examples leave a confirmation part too small to certify 0.99 even with no flip.
    done = run(*quantize(tiny_checkpoint, tiny_validation, tmp_path / "reg"))
    assert done.returncode == 2 and "needs at least 299 examples" in done.stderr
    assert not (tmp_path / "reg").exists()


def test_bad_parameters_exit_2_before_any_work(tmp_path):
    done = run("quantize", "--pass-probability", "1", "--registry", str(tmp_path))
    assert done.returncode == 2 and "--pass-probability must be less than 1 (got 1)" in done.stderr
    done = run("quantize", "--no-accuracy-check", "--label-map", "a=B", "--registry", str(tmp_path))
    assert done.returncode == 2 and "--no-accuracy-check ignores labels" in done.stderr
    done = run("quantize", "--margin", "0.01", "--registry", str(tmp_path))  # it is gone
    assert done.returncode == 2 and "unrecognized arguments: --margin" in done.stderr
    assert run("quantize", "--recipe", "int4").returncode == 2
    done = run("models", "show", "nope", "--registry", str(tmp_path))
    assert done.returncode == 2 and "no version or alias 'nope'" in done.stderr


def test_models_list_promote_rollback(registry_with_two):
    registry, (first, second) = registry_with_two
    listed = json.loads(run("models", "list", "--registry", str(registry), "--json").stdout)
    assert [r["version"] for r in listed] == [second, first]
    assert [r["production"] for r in listed] == [True, False]
    table = run("models", "list", "--registry", str(registry)).stdout
    assert table.splitlines()[1].startswith(f"* {second}")

    done = run("models", "rollback", "--registry", str(registry))
    assert done.returncode == 0 and f"{second} -> {first}" in done.stdout
    done = run("models", "promote", second, "--reason", "fixed", "--registry", str(registry))
    assert done.returncode == 0 and Registry(registry).alias() == second
    last = Registry(registry).history()[-1]
    assert last["reason"] == "fixed" and "models promote" in last["command"]


NOTHING_TO_DO = """
import json, sys
from distilq.cli.main import main
quantize, score = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = [main(quantize), main(score)]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_a_run_with_nothing_to_do_loads_no_model(tmp_path, tiny_checkpoint, tiny_validation):
    """Reusing a version and re-running a complete output import no torch at all, so no
    model is loaded; the Prefect runs are still made."""
    registry = tmp_path / "reg"
    args = quantize(tiny_checkpoint, tiny_validation, registry, "--recipe", "dynamic-int8-token")
    args += ["--min-agreement", "0.9", "--max-accuracy-drop", "1"]
    texts = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a fine film", "dull"]}), texts)
    score = ["score", "--input", str(texts), "--output", str(tmp_path / "out")]
    score += ["--registry", str(registry)]
    for first in (args, score):
        done = run(*first)
        assert done.returncode == 0, done.stderr[-3000:]

    env = cli_env()
    again = [sys.executable, "-c", NOTHING_TO_DO, json.dumps(args), json.dumps(score)]
    done = subprocess.run(again, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"codes": [0, 0], "torch": False}
    assert "unchanged inputs, reusing" in done.stdout
    assert "resuming: 1 shard(s) already done, 0 to go" in done.stderr
    assert "Finished in state Completed()" in done.stderr  # both flows still ran
