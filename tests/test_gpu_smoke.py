"""benchmarks/gpu_smoke.sh stays runnable: without a GPU it says so and exits 2; with `--allow-cpu --size smoke` it
runs two steps of every trainer and prints the table (a check of the script, not a measurement)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, tmp_path):
    env = {**os.environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_smoke_refuses_without_a_gpu_and_runs_every_trainer_on_the_cpu_when_allowed(tmp_path):
    refused = _run(tmp_path=tmp_path)
    assert refused.returncode == 2 and "no CUDA GPU here" in refused.stderr
    rows = tmp_path / "rows.json"
    done = _run("--allow-cpu", "--size", "smoke", "--steps", "2", "--batch-size", "4", "--prompt-words", "6",
                "--response-words", "10", "--new-tokens", "4", "--json", str(rows), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(rows.read_text())
    assert [r["trainer"] for r in table] == ["sft", "reward", "dpo", "kto", "ppo", "grpo"]
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 and r["s_per_step"] > 0 for r in table)
    assert "trainer" in done.stdout and "tokens/s" in done.stdout and "a check of the script" in done.stdout
