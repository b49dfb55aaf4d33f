# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch is installed before the package, so the package's own install takes the torch already there. Where pip's
# default torch is the CUDA build (plain Linux with PyPI), `make TORCH_INDEX=https://download.pytorch.org/whl/cpu ...`
# takes the CPU build instead; on CI and the project's machines a local CPU wheel is found without it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The product's main job: train the memory forecaster on the bundled ETTh1 (a few minutes on 2 CPU cores),
# print its test MSE/MAE beside the ridge baseline, then plot its forecast. Outputs go to runs/ (git-ignored).
demo: install
	$(PY) cli.py forecast fit --data datasets/ETTh1/ETTh1.csv.gz --out runs/demo/etth1.safetensors
	$(PY) cli.py forecast plot --model runs/demo/etth1.safetensors --data datasets/ETTh1/ETTh1.csv.gz --out runs/demo/etth1_forecast.png

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest

bench: install
	$(PY) bench/neural_memory.py --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
