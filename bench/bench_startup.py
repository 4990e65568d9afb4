"""Start-up: what a small `distilq` run costs beyond loading the model (issue 14).

Whole-process wall time, full-size DistilBertConfig() shape (random weights), one row,
warm disk cache, best of a few runs, side by side in one run:

- the floor: `python -c` that imports distilq, `distilq.load(...)` and one `predict`;
- `distilq score` on one row, with the ephemeral Prefect API (the default) and with a
  running `prefect server` (PREFECT_API_URL set);
- a `distilq score` re-run whose output is complete, and a `distilq quantize` that reuses
  a version (both should load no model).

Writes its table between markers in bench/RESULTS.md. Usage: python bench/bench_startup.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench_score import DISTILQ, quantize_into, score_cmd, setup_full, write_texts

from distilq.hardware import cpu_features, cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import VENV_BIN, free_port, http_ok, running, wait_until  # noqa: E402

RUNS = 3
FLOOR = "import sys, distilq; m = distilq.load(sys.argv[1]); m.predict(['a fine film'])"


def best_of(cmd: list[str], env: dict, before=None) -> float:
    """Best wall seconds of RUNS runs of `cmd`; `before()` runs untimed before each."""
    times = []
    for _ in range(RUNS):
        if before:
            before()
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return min(times)


@contextlib.contextmanager
def prefect_server(env: dict, log: Path) -> Iterator[dict]:
    """A real `prefect server` on a free loopback port (its UI finds its API); yields the
    environment that points runs at it."""
    url = f"http://127.0.0.1:{(port := free_port())}/api"
    cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(cmd, log, {**env, "PREFECT_UI_API_URL": url}) as server:
        wait_until(http_ok(f"{url}/health"), 120, "prefect server", server, log)
        yield {**env, "PREFECT_API_URL": url}


def measure(tmp: Path, env: dict) -> dict[str, float]:
    full = setup_full(tmp)
    registry = tmp / "reg-full"
    open_gate = ["--recipe", "ort-int8-token", "--min-agreement", "0", "--max-accuracy-drop", "1"]
    quantize_into(registry, full, *open_gate, env=env)
    one = write_texts(tmp / "one.parquet", ["a fine film"])
    out = tmp / "out"

    def fresh_output() -> None:
        shutil.rmtree(out, ignore_errors=True)

    figures = {"floor": best_of([sys.executable, "-c", FLOOR, str(registry)], env)}
    score = score_cmd(one, out, registry)
    figures["score, ephemeral API"] = best_of(score, env, fresh_output)
    figures["score re-run, output complete, ephemeral API"] = best_of(score, env)
    quantize = [DISTILQ, "quantize", "--source", str(full), "--registry", str(registry)]
    figures["quantize reusing a version, ephemeral API"] = best_of(quantize + open_gate, env)
    with prefect_server(env, tmp / "server.log") as server_env:
        figures["score, running server"] = best_of(score, server_env, fresh_output)
        figures["score re-run, output complete, running server"] = best_of(score, server_env)
    return figures


TARGETS = {
    "score, ephemeral API": ("floor", 4.0),
    "score, running server": ("floor", 2.0),
    "score re-run, output complete, ephemeral API": (None, 5.0),
    "quantize reusing a version, ephemeral API": (None, 5.0),
}


def table(figures: dict[str, float]) -> list[str]:
    floor = figures["floor"]
    lines = [
        f"**One row, full-size shape, whole process** (best of {RUNS}, warm disk cache)",
        "",
        "| what | seconds | above the floor | target |",
        "|---|---:|---:|---|",
    ]
    for name, seconds in figures.items():
        target = TARGETS.get(name)
        if target is None:
            goal = ""
        else:
            base, limit = target
            bound = floor + limit if base else limit
            verdict = "met" if seconds <= bound else "not met"
            goal = f"<= {'floor + ' if base else ''}{limit:.0f} s ({bound:.1f} s): {verdict}"
        above = "" if name == "floor" else f"{seconds - floor:+.1f}"
        lines.append(f"| {name} | {seconds:.1f} | {above} | {goal} |")
    return lines


def main() -> None:
    from bench_quantize import write_results

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
        lines = table(measure(tmp, env))
    stamp = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by bench/bench_startup.py"
        f" on {cpu_model()} ({', '.join(cpu_features())}), {os.cpu_count()} cores."
    )
    write_results([stamp, "", *lines], "bench_startup")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
