# Two entry points: `make book` (the website) and `make test` (the whole suite); `make lint`,
# `make bench` (benchmarks/: velocity, trajectory, sharded) and `make assignments` (the
# course's notebooks) beside them. All create $(VENV) if it is missing. torch is installed first, and only when the
# environment has none, so a GPU user's CUDA build is kept; torch==2.13.0 is the CPU wheel that
# lies on the development machines' disk.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Real CIFAR-10 / Imagenette copies beside the checkout (development machines and CI).
NWFLOW_DATA_DIR ?= $(wildcard $(abspath ../shared/data))
export NWFLOW_DATA_DIR
SITE_CHECK_OUT := _build/site-check

.PHONY: book test unit notebooks site-check lint bench clean setup-book setup-test assignments

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	touch $@

$(VENV)/.book: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[book]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[test]"
	touch $@ $(VENV)/.book

setup-book: $(VENV)/.book
setup-test: $(VENV)/.test

# The website, full size (chapters execute at their default size), into _build/html.
book: $(VENV)/.book
	$(BIN)/jupyter-book build . -W -n --keep-going

# Lint, unit tests, every notebook under nbval in fast mode, then the browser check.
test: $(VENV)/.test
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory unit notebooks site-check

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
unit: $(VENV)/.test
	$(PY) -m pytest -n 2 --dist loadfile tests || [ $$? -eq 5 ]

# The assignments are graded by tests/test_assignments.py (otter run), not by nbval: a student
# notebook is unfilled and must not run top to bottom.
notebooks: $(VENV)/.test
	NWFLOW_FAST=1 $(PY) -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env \
	  -p no:cacheprovider --ignore=book/assignments book || [ $$? -eq 5 ]

# Every master notebook book/assignments/<name>/<name>.ipynb through `otter assign` (which also
# checks that the solutions pass every test) into $(ASSIGNMENTS_OUT)/<name>/student and
# .../autograder (zip + solution notebook); the student copy is then refreshed in
# book/assignments/<name>/student/, the page the website shows (commit it with the master).
ASSIGNMENTS_OUT := _build/assignments
assignments: $(VENV)/.test
	@set -e; for master in book/assignments/*/*.ipynb; do \
	  name=$$(basename $$master .ipynb); out=$(abspath $(ASSIGNMENTS_OUT))/$$name; \
	  echo "otter assign $$master -> $$out"; rm -rf $$out; \
	  (cd $$(dirname $$master) && OMP_NUM_THREADS=1 $(abspath $(BIN))/otter assign $$name.ipynb $$out); \
	  mkdir -p $$(dirname $$master)/student; \
	  cp $$out/student/$$name.ipynb $$(dirname $$master)/student/$$name.ipynb; \
	done

# Build the site in fast mode into its own folder (its notebook cache must not leak into
# `make book`), then open every page in headless Chromium when the machine has one.
site-check: $(VENV)/.test
	rm -rf $(SITE_CHECK_OUT)
	NWFLOW_FAST=1 $(BIN)/jupyter-book build . -W -n --keep-going --path-output $(SITE_CHECK_OUT)
	$(PY) tests/site/check_site.py $(SITE_CHECK_OUT)/_build/html

lint: $(VENV)/.test
	$(BIN)/ruff check .

bench: $(VENV)/.test
	$(PY) benchmarks/velocity.py
	$(PY) benchmarks/trajectory.py
	$(PY) benchmarks/sharded.py

clean:
	rm -rf _build .pytest_cache
