"""Look at what a user sees in the Prefect UI (issue 13): a real `prefect server`, both flows
run through the CLI as a user runs them (promoted, reused, auto falling back, rejected,
scored, resumed), then headless Chromium screenshots of the runs list, every run and every
artifact, written to DIR for a person to look at. Not part of CI.

Usage: python bench/ui_screenshots.py DIR   (needs Debian's `chromium`)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_startup import prefect_server  # noqa: E402

from tests.conftest import (  # noqa: E402
    VENV_BIN,  # noqa: E402
    make_checkpoint,
    make_texts,
    write_tsv,
)

SHARED_MODEL = ROOT.parent / "shared" / "models" / "distilbert-sst2-minilm"


def distilq(env: dict, *args: str) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "distilq"), *args], env=env, capture_output=True, text=True
    )
    print(f"distilq {args[0]} -> exit {done.returncode}", flush=True)


def shoot(url: str, path: Path, height: int = 1100) -> None:
    """A screenshot of `url`, `height` pixels tall, once its scripts have run."""
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size=1440,{height}", "--virtual-time-budget=15000",
         f"--screenshot={path}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "home")}
        with prefect_server(env, tmp / "server.log") as env:
            run_flows(tmp, env)
            screenshots(env["PREFECT_API_URL"].removesuffix("/api"), out)


def run_flows(tmp: Path, env: dict) -> None:
    registry, validation = tmp / "reg", write_tsv(tmp / "val.tsv", make_texts(400), None)
    sensitive = make_checkpoint(tmp / "sensitive", sensitive=True)
    loose = ["--min-agreement", "0.9", "--max-accuracy-drop", "1"]
    real = ["--source", str(SHARED_MODEL), "--registry", str(registry)]
    distilq(env, "quantize", *real)  # promoted
    distilq(env, "quantize", *real)  # reused
    tiny = ["--source", str(sensitive), "--validation", str(validation)]
    distilq(env, "quantize", *tiny, "--registry", str(tmp / "reg2"), "--recipe", "auto", *loose)
    distilq(env, "quantize", *tiny, "--registry", str(registry), "--recipe", "dynamic-int8-token",
            "--min-agreement", "0.95")  # fmt: skip  # rejected
    data = tmp / "data"
    data.mkdir()
    for i in range(3):
        texts = make_texts(300, seed=i)
        pq.write_table(
            pa.table({"id": list(range(300)), "text": texts}), data / f"part-{i}.parquet"
        )
    score = ["score", "--input", str(data), "--output", str(tmp / "scored"), "--registry",
             str(registry)]  # fmt: skip
    distilq(env, *score)
    (tmp / "scored" / "part-1.parquet").unlink()
    distilq(env, *score)  # resumed


def api(ui: str, path: str) -> list[dict]:
    """POST a filter to the server's REST API (this process uses no Prefect settings)."""
    import urllib.request

    request = urllib.request.Request(
        f"{ui}/api/{path}", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def screenshots(ui: str, out: Path) -> None:
    runs = sorted(api(ui, "flow_runs/filter"), key=lambda r: r["created"])
    artifacts = api(ui, "artifacts/filter")
    shoot(f"{ui}/runs", out / "00-runs.png")
    for i, run in enumerate(runs, 1):
        name = run["name"].split()[0]
        shoot(f"{ui}/runs/flow-run/{run['id']}", out / f"{i:02d}-run-{name}.png")
        where = f"{ui}/runs/flow-run/{run['id']}?tab=Parameters"
        shoot(where, out / f"{i:02d}-run-{name}-parameters.png")
    for i, artifact in enumerate(artifacts, 1):
        tall = 4200 if artifact["type"] == "markdown" else 1100  # a report is long
        where = f"{ui}/artifacts/artifact/{artifact['id']}"
        shoot(where, out / f"a{i:02d}-{artifact['key']}.png", tall)
    shown = [{"name": r["name"], "tags": r["tags"], "state": r["state_name"]} for r in runs]
    (out / "runs.json").write_text(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
