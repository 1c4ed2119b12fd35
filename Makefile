# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Each creates .venv and installs revfunc (torch first) if missing.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: bench test venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

venv: $(VENV)/.installed

bench: venv
	$(PY) -m revfunc.bench $(ARGS)

test: venv
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) bench_out .pytest_cache
