#!/usr/bin/env bash
# A few steps of every trainer on one GPU (bf16, a ~0.1B Llama built in-process): tokens/s and peak GPU memory.
#   bash benchmarks/gpu_smoke.sh [--size small|medium] [--steps 8] [--gradient-checkpointing] ...
# Without a GPU it says so and exits 2 (`--allow-cpu --size smoke` checks the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || { make install >/dev/null && PY=.venv/bin/python; }
exec env TQDM_DISABLE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$PY" benchmarks/gpu_smoke.py "$@"
