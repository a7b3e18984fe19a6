# The README's two commands: `make demo` and `make test`. Each builds .venv from nothing when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# checkov pins old versions of packages that mlflow and ray need newer: it lives in its own venv.
TOOLS_VENV ?= .venv-tools
STAMP := $(VENV)/.installed-stamp
TOOLS_STAMP := $(TOOLS_VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean latex chromium smoke-paper

install: $(STAMP) $(TOOLS_STAMP)

# pdflatex + booktabs, so the report's LaTeX tables are compiled in the tests (Debian, as root;
# elsewhere the compile test skips and says why).
latex:
	@command -v pdflatex >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends \
	  texlive-latex-base texlive-latex-recommended >/dev/null; } || \
	  echo "no pdflatex: the LaTeX compile test will be skipped"

# Headless Chromium + its WebDriver, so the MLflow UI is checked in a real browser
# (tests/tracking/test_mlflow_ui.py; Debian, as root; elsewhere that test skips and says why).
chromium:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { command -v apt-get >/dev/null && \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "no chromium/chromedriver: the MLflow UI browser test will be skipped"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned, so nothing below pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(TOOLS_STAMP):
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet checkov==3.3.30
	touch $@

demo: $(STAMP)
	$(PY) sweeps/launch.py --grid demo

# The paper grid at its real size with only its size cut (sweeps/grids/paper-smoke.yaml): paper
# networks on 136x136x82 volumes of phantoms in the real geometry. Not part of `make test`.
smoke-paper: $(STAMP)
	$(PY) sweeps/launch.py --grid paper-smoke

# Every tier: unit, slow (end-to-end sweeps on real Ray + MLflow) and integration
# (mlflow server on PostgreSQL, two-node Ray). CI runs this.
test: $(STAMP) $(TOOLS_STAMP) latex chromium
	CHECKOV=$(abspath $(TOOLS_VENV))/bin/checkov $(PY) -m pytest -q

# The quick tier for the edit-test loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

bench: $(STAMP)
	$(PY) bench/metrics.py
	$(PY) bench/unet.py
	$(PY) bench/methods.py

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache mlruns mlflow.db smoke_store smoke_data
