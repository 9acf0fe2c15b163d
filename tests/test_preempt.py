"""Preemption: SIGTERM (a cluster's notice) or SIGINT (Ctrl-C) during a run with `save_every: 0` finishes the
current step, writes a checkpoint, exits with status 75, and the same command again ends with the weights of a
run never interrupted."""

import os
import signal
import subprocess
import time

import pytest

from alignkit.errors import PREEMPTED_STATUS
from alignkit.train.preempt import Preemption


def test_the_first_signal_is_noted_a_second_ctrl_c_aborts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert p.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        assert p.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


def _argv(command, model, data, out):
    common = [command, "--model", model, "--data", data, "--output-dir", out, "--lr", "2e-3", "--lr-schedule",
              "cosine", "--warmup-steps", "3", "--save-every", "0", "--log-every", "1", "--seed", "5",
              "--max-length", "64", "--max-prompt-length", "32"]
    if command == "ppo":
        return common + ["--max-steps", "16", "--reward-fn", "python:alignkit.examples:good_word_share",
                         "--rollout-batch-size", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8"]
    return common + ["--max-steps", "40", "--batch-size", "8"]


@pytest.mark.slow
@pytest.mark.parametrize("command,sig", [("sft", signal.SIGTERM), ("ppo", signal.SIGINT)])
def test_a_signal_mid_run_checkpoints_exits_75_and_the_rerun_matches(tmp_path, harness, command, sig):
    from alignkit.examples import make_tiny_model, sft_rows, write_jsonl

    model = str(make_tiny_model(tmp_path / "model"))
    rows = sft_rows(160, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": r["prompt"]} for r in rows] if command == "ppo" else rows)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    harness.alignkit(_argv(command, model, data, straight))
    proc = subprocess.Popen(harness.command(_argv(command, model, data, stopped)), env=harness.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # a few steps logged: mid-run
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_STATUS, err[-2000:]
    assert f"{signal.Signals(sig).name} received: stopped after" in err
    assert not (stopped / "final").exists()
    argv = _argv(command, model, data, stopped)
    total = int(argv[argv.index("--max-steps") + 1])
    steps = [int(p.name[5:]) for p in (stopped / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and 4 <= steps[0] < total, steps  # the step it was in when the signal came
    rerun = harness.alignkit(argv)
    assert f"resuming from {stopped / 'checkpoints' / f'step-{steps[0]}'}" in rerun.stderr
    harness.assert_same_final_weights(straight, stopped, atol=1e-6)
