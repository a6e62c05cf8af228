# Set-up and everyday commands. Every target bootstraps .venv itself, so a fresh clone needs only
# `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint schema clean

install: $(STAMP)

# torch is installed explicitly at the pinned CPU-friendly version only when no torch is present:
# a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/compresso-ops apply recipes/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check compresso_ops tests benchmarks

schema: $(STAMP)
	$(VENV)/bin/compresso-ops schema > schemas/recipe.schema.json

clean:
	rm -rf $(VENV) runs
