# Everything runs inside .venv, made on first use: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel, already on disk here; an unpinned torch pulls the CUDA build (several GB)
TORCH ?= torch==2.13.0

.PHONY: install test quality style demo bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"  # editable, as PEFT's dev set-up
	touch $@

install: $(VENV)/.installed

quality: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: quality
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) examples/train_tglora.py --demo --output_dir runs/demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_tglora.py
