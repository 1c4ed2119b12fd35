# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Each creates its virtual environments and installs revfunc (torch first) if missing.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# The lowest torch in pyproject.toml's range: `make test` runs the composition, compile
# and memory tests on it too.
VENV_LOWEST ?= .venv-lowest
TORCH_LOWEST ?= torch==2.11.0
PY_LOWEST := $(VENV_LOWEST)/bin/python
LOWEST_TESTS ?= tests/test_sequence.py tests/test_transforms.py tests/test_composition.py tests/test_nn.py \
	tests/test_engine.py tests/test_handoff.py tests/test_selective.py \
	tests/test_random.py tests/test_safety.py tests/test_memory.py tests/test_distributed.py \
	tests/test_couplings.py tests/test_contexts.py tests/test_flows.py

.PHONY: bench test lint test-latest test-lowest venv venv-lowest clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

$(VENV_LOWEST)/.installed: pyproject.toml
	test -x $(PY_LOWEST) || $(PYTHON) -m venv $(VENV_LOWEST)
	$(PY_LOWEST) -m pip install --quiet --upgrade pip
	$(PY_LOWEST) -m pip install --quiet "$(TORCH_LOWEST)"
	$(PY_LOWEST) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

venv-lowest: $(VENV_LOWEST)/.installed

bench: venv
	$(PY) -m revfunc.bench $(ARGS)

test: lint test-latest test-lowest

# Static checks first (seconds): ruff's lint rules and formatting, mypy on revfunc/.
lint: venv
	$(VENV)/bin/ruff check revfunc tests examples
	$(VENV)/bin/ruff format --check revfunc tests examples
	$(VENV)/bin/mypy

test-latest: venv
	$(PY) -m pytest $(ARGS)

test-lowest: venv-lowest
	$(PY_LOWEST) -m pytest $(LOWEST_TESTS) $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_LOWEST) bench_out .pytest_cache
