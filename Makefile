# Two entry points on a fresh machine:  make demo  |  make test
# Each creates .venv if it is missing and installs interclr with faiss-gpu when nvidia-smi
# finds a GPU, faiss-cpu otherwise (the two share one import name: never both; the other one is
# uninstalled first, so a venv moved between a CPU and a GPU machine ends with the right one).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
FAISS  := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then echo gpu; else echo cpu; fi)
# the other flavour's distributions: both own the `faiss` package, so one must go before the other comes
OTHER  := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu faiss-gpu-cu11 faiss-gpu-cu12)
STAMP  := $(VENV)/.installed-$(FAISS)

.PHONY: install demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip uninstall -q -y $(OTHER) 2>/dev/null || true
	$(PY) -m pip install -q -e ".[$(FAISS),test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/interclr pretrain --preset quickstart --force --out runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf runs .pytest_cache
