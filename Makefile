# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The CPU wheel of torch is installed before the package so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) -m memorycore.demo

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest

bench: install
	$(PY) bench/neural_memory.py --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
