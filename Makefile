# Quick start: `make demo` and `make test` on a fresh machine (python3 >= 3.11, a C compiler).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv build demo test bench clean

# The venv is rebuilt when the build inputs change; `build` recompiles the extensions.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel "Cython>=3.0,<4"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/fastgate demo

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# Micro benchmarks (compiled vs reference), then the end-to-end run (bench/README.md).
bench: build
	taskset -c 0 $(PY) -m pytest bench --benchmark-only --benchmark-columns=median,mean,stddev,rounds
	$(PY) bench/e2e.py

clean:
	rm -rf $(VENV) build *.egg-info fastgate/_core/*.c fastgate/_core/*.so fastgate/_core/*.html
