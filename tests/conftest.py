"""Shared fixtures: a tiny model, its tokenizer, and `harness` — reading a run folder's metrics and weights,
running the real CLI, and the two crash/resume harnesses (an exception inside the process; `kill -9` of a
real `alignkit` process), written once for every trainer's tests."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) with the built-in world's word tokenizer, saved as an HF folder."""
    from alignkit.examples import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from alignkit.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


class Crash(Exception):
    """Raised by `Harness.crash_and_resume` in place of the patched function: a crash in the middle of a run."""


class Harness:
    """Helpers for tests of whole runs (the `harness` fixture)."""

    def __init__(self, monkeypatch):
        self._monkeypatch = monkeypatch

    # -- a run folder -------------------------------------------------------------------------------------
    @staticmethod
    def metrics(run_dir) -> list[dict]:
        """Every record of `run_dir/metrics.jsonl`, one dict per logged step."""
        return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]

    @classmethod
    def values(cls, run_dir, key: str) -> list:
        """The logged values of one metric, in step order (e.g. "eval/loss": one per evaluation)."""
        return [m[key] for m in cls.metrics(run_dir) if key in m]

    @staticmethod
    def final_weights(run_dir) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(Path(run_dir) / "final" / "model.safetensors")

    @classmethod
    def assert_same_final_weights(cls, run_a, run_b, atol: float = 0.0, note: str = "") -> None:
        """The final models of two runs hold the same tensors, equal to `atol` (0 = bit for bit)."""
        a, b = cls.final_weights(run_a), cls.final_weights(run_b)
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= atol, f"max abs difference {worst} {note}"

    # -- crash inside the process -------------------------------------------------------------------------
    def crash_and_resume(self, module, name: str, at: int, run) -> None:
        """`run()` with `module.name` raising `Crash` on its `at`-th call, then `run()` again as it is: a run
        that crashed and was started again with the same command."""
        real, calls = getattr(module, name), {"n": 0}

        def crashing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                raise Crash(f"{name} call {at}")
            return real(*args, **kwargs)

        self._monkeypatch.setattr(module, name, crashing)
        with pytest.raises(Crash):
            run()
        self._monkeypatch.setattr(module, name, real)
        run()

    # -- the real command line ----------------------------------------------------------------------------
    @staticmethod
    def env() -> dict:
        """The environment of an `alignkit` subprocess: this checkout's alignkit first, one thread."""
        import alignkit

        src = str(Path(alignkit.__file__).resolve().parents[1])
        path = os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    @classmethod
    def command(cls, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "alignkit", *map(str, argv)]

    @classmethod
    def alignkit(cls, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run `alignkit ARGV` in a subprocess to its end; output captured as text."""
        return subprocess.run(cls.command(argv), check=check, env=cls.env(), capture_output=True, text=True)

    @classmethod
    def kill_9_and_rerun(cls, argv: list[str], out, last_checkpoint: int, kills: int = 2,
                         timeout: float = 120.0) -> int:
        """Start `alignkit ARGV` (writing to run folder `out`), `kill -9` it at a random moment after a random
        checkpoint up to step `last_checkpoint` exists, start the same command again, up to `kills` times,
        then let it finish. Returns the seed of the random moments (printed on failure, to reproduce)."""
        seed = random.Random().randrange(10**6)  # a different moment every run
        rng = random.Random(seed)
        checkpoints = Path(out) / "checkpoints"
        done = 0
        for _ in range(kills + 1):
            proc = subprocess.Popen(cls.command(argv), env=cls.env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait_for = rng.randint(1, last_checkpoint)
            deadline = time.time() + timeout
            while done < kills and proc.poll() is None and time.time() < deadline:
                steps = [int(p.name[5:]) for p in checkpoints.glob("step-*")] if checkpoints.exists() else []
                if steps and max(steps) >= wait_for:
                    time.sleep(rng.uniform(0.0, 0.3))
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        done += 1
                    break
                time.sleep(0.02)
            proc.wait(timeout=timeout)
            if (Path(out) / "final" / "model.safetensors").exists():
                break
        if not (Path(out) / "final" / "model.safetensors").exists():
            cls.alignkit(argv)
        assert done >= 1, f"the run ended before any kill (kill seed {seed})"
        return seed


@pytest.fixture
def harness(monkeypatch):
    return Harness(monkeypatch)
