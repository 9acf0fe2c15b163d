# make test / make demo: create .venv if absent, install alignkit into it (CPU PyTorch where there is no GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignkit-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: test demo install lint clean bench bench-online bench-ppo

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
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/alignkit lab --preset quick --output-dir runs/lab

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py

# grpo and rloo against TRL's GRPOTrainer and RLOOTrainer
bench-online: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py --only online --steps 12

# ppo against TRL 0.29's PPOTrainer, the last TRL with one; it needs transformers < 5.3: its own venv
TRL_PPO_VENV ?= .venv-trl029
bench-ppo: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	@test -x $(TRL_PPO_VENV)/bin/python || python3 -m venv $(TRL_PPO_VENV)
	@$(TRL_PPO_VENV)/bin/python -c "import trl" 2>/dev/null || { \
	  $(TRL_PPO_VENV)/bin/pip install -q "$(TORCH_CPU)" && \
	  $(TRL_PPO_VENV)/bin/pip install -q "trl==0.29.1" "transformers<5.3" datasets accelerate; }
	$(PY) benchmarks/run.py --only ppo --steps 12 --trl-ppo-python $(TRL_PPO_VENV)/bin/python

clean:
	rm -rf $(VENV) $(TRL_PPO_VENV) runs .pytest_cache
