"""Several processes (SPEC §12): `accelerate launch --num_processes 2 -m alignkit COMMAND` with `batch_size` b
makes the updates of one process with batch 2b — same logged losses and final weights up to the order of float
additions — for sft, reward, dpo (its reference log-probs computed in shards too) and kto (its reference point the mean over
every process's examples).

On a machine without GPUs the processes are started with `--multi_gpu` (torchrun); alignkit then joins them over
gloo. Each test launches real processes (seconds each)."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.examples import pairwise_rows, sft_rows, write_jsonl

ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command, model, data, out, batch_size):
    argv = [command, "--model", model, "--data", data, "--output-dir", out, "--max-steps", "6", "--lr", "1e-3",
            "--log-every", "1", "--seed", "3", "--max-length", "64", "--max-prompt-length", "32", "--grad-accum", "2",
            "--batch-size", str(batch_size), "--eval-fraction", "0.1", "--eval-every", "3", "--save-every", "0"]
    return argv + (["--precompute-ref", "false"] if command == "dpo" else [])


def _argv_dpo_precomputed(model, data, out, batch_size):
    return [*_argv("dpo", model, data, out, batch_size)[:-2], "--precompute-ref", "true"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sft", "reward", "dpo", "dpo-precomputed", "kto"])
def test_two_processes_make_the_updates_of_one_with_the_doubled_batch(tmp_path, harness, variant):
    from alignkit.examples import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model"))
    command = "dpo" if variant == "dpo-precomputed" else variant
    rows = sft_rows(120, seed=1) if command == "sft" else pairwise_rows(120, seed=1)
    data = str(write_jsonl(tmp_path / "data.jsonl", rows))
    one, two = tmp_path / "one", tmp_path / "two"
    argv = _argv_dpo_precomputed if variant == "dpo-precomputed" else lambda *a: _argv(command, *a)
    harness.alignkit(argv(model, data, one, 8))
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
              "-m", "alignkit", *argv(model, data, two, 4)]
    done = subprocess.run(launch, env=harness.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in x:
            if "loss" in key or key in ("grad_norm", "epoch", "kl", "eval/kl") or key.startswith("rewards/"):
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
    harness.assert_same_final_weights(one, two, atol=1e-4)
    assert json.loads((two / "final" / "alignkit_run.json").read_text())["processes"] == 2
    assert b[-1]["tokens_per_s"] > 0 and "epoch" in b[-1]
    if variant == "dpo-precomputed":  # computed in two halves, summed, written once by the main process
        from safetensors.torch import load_file

        ref_one, ref_two = load_file(one / "ref_logps.safetensors"), load_file(two / "ref_logps.safetensors")
        assert set(ref_one) == set(ref_two)
        for split in ref_one:
            assert ref_two[split].allclose(ref_one[split], atol=1e-4) and (ref_two[split] != 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_on_two_processes_samples_and_updates_as_one_with_the_doubled_rollout(tmp_path, harness, algo):
    """Each process samples its half of the iteration's prompts with its rows of the same seeded draws, scores and
    measures them; the ppo minibatches are drawn over the whole rollout (2 epochs × 2 minibatches here), the
    advantages whitened over it, grpo's groups stay whole; so every logged number — rollout means, losses, held-out
    evaluation — and the final weights are those of one process with the doubled rollout_batch_size."""
    import random

    from alignkit.examples import ANIMALS, COLORS, make_tiny_model

    model = str(make_tiny_model(tmp_path / "model"))
    rng = random.Random(0)
    rows = [{"prompt": f"describe the {rng.choice(COLORS)} {rng.choice(ANIMALS)} ->"} for _ in range(60)]
    data = str(write_jsonl(tmp_path / "prompts.jsonl", rows))

    def argv(out, rollout_batch_size):
        return ["ppo", "--algo", algo, "--model", model, "--data", data, "--output-dir", str(out),
                "--reward-fn", "python:alignkit.examples:good_word_share", "--rollout-batch-size",
                str(rollout_batch_size), "--samples-per-prompt", "1" if algo == "ppo" else "3", "--max-new-tokens",
                "8", "--max-steps", "4", "--lr", "1e-3", "--kl-coef", "0.05", "--seed", "5", "--eval-fraction",
                "0.2", "--eval-every", "2", "--eval-batch-size", "9", "--log-every", "1", "--save-every", "0",
                *(["--ppo-epochs", "2", "--num-minibatches", "2"] if algo == "ppo" else [])]

    one, two = tmp_path / "one", tmp_path / "two"
    harness.alignkit(argv(one, 6))
    done = subprocess.run(_launch(harness, argv(two, 3)), env=harness.env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key not in ("tokens_per_s",):
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
    assert sum("eval/reward/score" in m for m in a) == 3 and ("value_loss" in a[-1]) == (algo == "ppo")
    harness.assert_same_final_weights(one, two, atol=1e-4)
    assert json.loads((two / "final" / "alignkit_run.json").read_text())["processes"] == 2
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert samples == [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: children of children too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _launch(harness, argv, port=None):
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            str(port or _free_port()), "-m", "alignkit", *argv]


@pytest.mark.slow
def test_kill_9_of_a_two_process_run_then_rerun_gives_the_weights_of_an_uninterrupted_one(tmp_path, harness):
    """Both processes killed (the launcher's process group) after a checkpoint; the same launch again resumes, each
    process with its own RNG state (dropout on), and ends where a run never interrupted ends."""
    import os
    import signal
    import time

    from alignkit.examples import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model", attention_dropout=0.1))
    data = str(write_jsonl(tmp_path / "data.jsonl", sft_rows(120, seed=1)))

    def argv(out):
        return [*_argv("sft", model, data, out, 4)[:-2], "--save-every", "3", "--max-steps", "12"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_launch(harness, argv(straight)), env=harness.env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(_launch(harness, argv(killed)), env=harness.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (killed / "checkpoints" / "step-6").is_dir():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and its workers (torchrun's own sessions)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    time.sleep(0.5)
    assert not (killed / "final").exists()
    again = subprocess.run(_launch(harness, argv(killed)), env=harness.env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout, (again.stdout, again.stderr)
    harness.assert_same_final_weights(straight, killed, atol=1e-6)


@pytest.mark.slow
def test_the_example_accelerate_config_launches_two_processes(tmp_path, harness):
    from alignkit.examples import make_tiny_model

    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp.yaml"
    model = str(make_tiny_model(tmp_path / "model"))
    data = str(write_jsonl(tmp_path / "data.jsonl", sft_rows(40, seed=1)))
    launch = [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(_free_port()), "-m",
              "alignkit", "sft", "--model", model, "--data", data, "--max-steps", "2", "--batch-size", "4",
              "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(launch, env=harness.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "final" / "alignkit_run.json").read_text())["processes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward", "kto"])
def test_fsdp2_on_two_processes_makes_the_updates_of_one_and_resumes_from_its_full_checkpoints(tmp_path, harness,
                                                                                              command):
    """examples/accelerate/fsdp2.yaml on CPU (gloo): the trained model sharded per decoder layer, gradients summed
    by the reduce-scatter; the same losses and final weights as one process with the doubled batch. A second launch
    with more steps resumes from the last checkpoint (full tensors gathered from the shards) and ends where an
    uninterrupted sharded run ends (sft); final/ is a plain Hugging Face checkpoint. (dpo shares kto's preference
    task; reward and kto shard a classifier head and run kto's reference-point pass under FSDP.)"""
    from alignkit.examples import make_tiny_model

    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    model = str(make_tiny_model(tmp_path / "model"))
    rows = sft_rows(96, seed=1) if command == "sft" else pairwise_rows(96, seed=1)
    data = str(write_jsonl(tmp_path / "data.jsonl", rows))

    def launch(argv):
        done = subprocess.run([ACCELERATE, "launch", "--config_file", str(config), "--main_process_port",
                               str(_free_port()), "-m", "alignkit", *argv], env=harness.env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    harness.alignkit(_argv(command, model, data, one, 8))
    launch(_argv(command, model, data, two, 4))
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in x:  # (accuracy, a count of margins > 0, is left out: at the start the policy equals the
            # reference, margins are 0 up to the rounding of the sharded forward, and a 1e-9 margin flips a count)
            if "loss" in key or key in ("grad_norm", "epoch") or key.startswith("rewards/") and "accuracy" not in key:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
    harness.assert_same_final_weights(one, two, atol=1e-4)
    config_json = json.loads((two / "final" / "config.json").read_text())
    plain = "LlamaForSequenceClassification" if command == "reward" else "LlamaForCausalLM"
    assert config_json["architectures"] == [plain]  # a plain checkpoint, not the FSDP wrapper's
    assert json.loads((two / "final" / "alignkit_run.json").read_text())["sharding"] == "fsdp2"
    if command != "sft":
        return
    # a run with a checkpoint at step 3 of 6 (full tensors gathered from the shards); its final/ removed, the same
    # launch resumes from that checkpoint, each process loading the full tensors into its shards
    argv = _argv(command, model, data, resumed, 4)
    argv[argv.index("--save-every") + 1] = "3"
    launch(argv)
    assert (resumed / "checkpoints" / "step-3" / "model.safetensors").is_file()
    shutil.rmtree(resumed / "final")
    again = launch(argv)
    assert "resuming from" in again.stderr and "(step 3 of 6)" in again.stderr, again.stderr[-2000:]
    harness.assert_same_final_weights(two, resumed, atol=1e-5)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_processes_at_one_step_and_the_relaunch_matches(tmp_path, harness):
    """torchrun forwards SIGTERM to its workers: both stop after the same step (they agree through an all-reduce),
    one checkpoint is written with save_every 0, and the same launch again ends with the weights of a run never
    interrupted. (The launcher's own exit status is torchrun's, 1.)"""
    import signal
    import time

    from alignkit.examples import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model"))
    data = str(write_jsonl(tmp_path / "data.jsonl", sft_rows(120, seed=1)))

    def argv(out):
        return ["sft", "--model", model, "--data", data, "--output-dir", str(out), "--max-steps", "200", "--lr",
                "1e-3", "--batch-size", "4", "--save-every", "0", "--log-every", "1", "--seed", "3",
                "--max-length", "64"]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = subprocess.run(_launch(harness, argv(straight)), env=harness.env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(_launch(harness, argv(stopped)), env=harness.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    assert err.count("SIGTERM received: stopped after step") == 2, err[-3000:]  # one line per process
    steps = [int(p.name[5:]) for p in (stopped / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and 20 <= steps[0] < 200 and not (stopped / "final").exists(), steps
    again = subprocess.run(_launch(harness, argv(stopped)), env=harness.env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    harness.assert_same_final_weights(straight, stopped, atol=1e-6)
