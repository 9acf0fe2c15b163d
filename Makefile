# make test / make demo: create .venv if absent, install alignkit into it (CPU PyTorch where there is no GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignkit-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: test demo install lint clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip || true
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q "$(TORCH_CPU)"; fi; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/alignkit demo --output-dir runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
