# Both targets create or reuse ./.venv and install the project into it first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(PY):
	python3 -m venv $(VENV)

# Reinstall only when the project's metadata changes. torch==2.13.0 is pinned in
# pyproject.toml: that CPU build is on these machines' disk (newer pulls a CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distilq quantize

test: lint
	$(PY) -m pytest -q

# The quick tier for your own loop: everything not marked slow (no subprocess CLI, no
# real servers, no real model).
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tasks flows tests bench deployments
	$(VENV)/bin/ruff format --check src tasks flows tests bench deployments

bench: $(STAMP)
	$(PY) bench/bench_quantize.py
	$(PY) bench/bench_gate.py
	$(PY) bench/bench_score.py
	$(PY) bench/bench_int8.py
	$(PY) bench/bench_onnx.py
	$(PY) bench/bench_startup.py
	$(PY) bench/bench_audit.py
	$(PY) bench/bench_audit_rules.py

clean:
	rm -rf $(VENV) registry .pytest_cache
