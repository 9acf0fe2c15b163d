"""The shared training mechanics: schedules, data order, accumulation invariance, NaN guard, checkpoints,
exact resume after a crash."""

import json
import math

import pytest
import torch

from alignkit.config import RewardConfig, SFTConfig
from alignkit.data.collate import Tokenized, collate_sequences
from alignkit.errors import TrainingError
from alignkit.examples import pairwise_rows, sft_rows, write_jsonl
from alignkit.train import loop
from alignkit.train.loop import DataOrder, StepOutput, Task, lr_multiplier, train_step
from alignkit.train.sft import sft_step_loss


def test_schedules_by_hand():
    """warmup 2, total 10: steps 0,1 → 1/3, 2/3; then linear 1 − (s−2)/8, cosine ½(1 + cos(π(s−2)/8))."""
    assert lr_multiplier(0, "linear", 2, 10) == pytest.approx(1 / 3)
    assert lr_multiplier(1, "cosine", 2, 10) == pytest.approx(2 / 3)
    assert lr_multiplier(2, "linear", 2, 10) == 1.0
    assert lr_multiplier(6, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_multiplier(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_multiplier(4, "cosine", 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(10, "linear", 2, 10) == 0.0
    assert lr_multiplier(7, "constant", 0, 10) == 1.0


def test_data_order_is_a_pure_function_of_seed_and_position():
    a, b = DataOrder(10, 4, seed=3), DataOrder(10, 4, seed=3)
    first = [a.batch(k) for k in range(6)]
    assert [b.batch(k) for k in reversed(range(6))] == list(reversed(first))  # any access order
    epoch0 = sorted(i for k in range(3) for i in first[k])
    assert epoch0 == list(range(10)) and first[:3] != first[3:6]  # each epoch a full, fresh shuffle
    assert DataOrder(10, 4, seed=4).batch(0) != first[0]


def _sft_task(model, examples, pad):
    return Task(name="t", model=model, train_examples=examples, collate=lambda xs: collate_sequences(xs, pad),
                loss=sft_step_loss, units=lambda b: b.num_targets, tokens=lambda b: b.num_tokens,
                save_final=lambda p: None)


def _ragged_examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen, rlen = 2 + i % 3, 1 + (5 * i) % 7  # very different response lengths
        ids = torch.randint(5, 50, (plen + rlen,), generator=g).tolist()
        out.append(Tokenized([1] + ids, [False] * (plen + 1) + [True] * rlen))
    return out


def test_accumulation_equals_one_big_batch(tiny_model_dir):
    """4 micro-batches of 2 with grad_accum 4 give the same update as one batch of 8: the loss is normalised by
    the target tokens of the whole step, not averaged per micro-batch (which would weight short rows more)."""
    from alignkit.models.load import load_causal_lm

    cfg = SFTConfig(model="m", data=("d",), lr=1e-2, max_steps=1, lr_schedule="constant")
    examples = _ragged_examples()
    results = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = load_causal_lm(tiny_model_dir, "float32").double()
        task = _sft_task(model, examples, 0)
        opt = loop.build_optimizer(model, cfg)
        batches = [task.collate(examples[i:i + micro]) for i in range(0, 8, micro)]
        m = train_step(model, opt, batches, task, max_grad_norm=0.0)
        results.append((m, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (m_big, p_big), (m_small, p_small) = results
    assert m_big["loss"] == pytest.approx(m_small["loss"], rel=1e-12)
    assert m_big["grad_norm"] == pytest.approx(m_small["grad_norm"], rel=1e-9)
    for name in p_big:
        torch.testing.assert_close(p_big[name], p_small[name], rtol=0, atol=1e-12)


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, tiny_model_dir):
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def nan_loss(m, batch):
        out = sft_step_loss(m, batch)
        return StepOutput(out.loss * float("nan"))

    task = _sft_task(model, _ragged_examples(), 0)
    task.loss = nan_loss
    cfg = SFTConfig(model="m", data=("d",), output_dir=str(tmp_path / "run"), max_steps=10, batch_size=4,
                    max_bad_steps=3, save_every=1)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        loop.fit(cfg, task)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # no update was applied
    assert not (tmp_path / "run" / "final").exists()


def _write_run_inputs(tmp_path, kind):
    if kind == "sft":
        return write_jsonl(tmp_path / "sft.jsonl", sft_rows(64, seed=1))
    return write_jsonl(tmp_path / "prefs.jsonl", pairwise_rows(64, seed=1))


@pytest.mark.parametrize("kind", ["sft", "reward"])
def test_crash_and_resume_gives_identical_weights(tmp_path, tiny_model_dir, harness, kind):
    """Crash inside step 7 (after the step-6 checkpoint), run again: the final weights equal an uninterrupted
    run's exactly. Uses dropout so that RNG restoration matters too."""
    from alignkit.examples import make_tiny_model
    from alignkit.train.reward import train_reward
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, kind)
    cls, train = (SFTConfig, train_sft) if kind == "sft" else (RewardConfig, train_reward)
    model_dir = str(make_tiny_model(tmp_path / "dropout-model", attention_dropout=0.2))

    def cfg(out):
        return cls(model=model_dir, data=(str(data),), output_dir=str(out), max_steps=10, batch_size=4,
                   grad_accum=2, lr=1e-3, lr_schedule="cosine", warmup_steps=2, save_every=3, eval_fraction=0.0)

    train(cfg(tmp_path / "straight"))
    checkpoints = []

    def run():
        if (tmp_path / "resumed" / "checkpoints").exists():
            checkpoints.append(sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()))
        train(cfg(tmp_path / "resumed"))

    harness.crash_and_resume(loop, "train_step", at=7, run=run)
    assert checkpoints == [["step-3", "step-6"]]  # what the crash left behind
    harness.assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")
    steps = harness.values(tmp_path / "resumed", "step")
    assert steps == sorted(steps) and steps.count(7) == 1  # nothing logged twice after the resume


def test_half_written_checkpoint_is_never_used(tmp_path, tiny_model_dir, harness):
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-9.tmp").mkdir(parents=True)
    (out / "checkpoints" / "step-8").mkdir()  # no state.json: incomplete
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=2, batch_size=4))
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "checkpoints" / ".step-9.tmp").exists()
    assert harness.values(out, "step") == [1, 2]  # started from scratch


def test_completed_run_is_not_redone(tmp_path, tiny_model_dir, capsys):
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    cfg = SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4)
    train_sft(cfg)
    mtime = (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns
    train_sft(cfg)
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns == mtime


def test_torn_metrics_line_and_changed_settings_on_resume(tmp_path, tiny_model_dir, harness):
    from alignkit.errors import UserError
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    out = tmp_path / "run"
    base = dict(model=tiny_model_dir, data=(str(data),), output_dir=str(out), batch_size=4, save_every=2)
    train_sft(SFTConfig(**base, max_steps=4))
    (out / "final").rename(tmp_path / "old-final")  # pretend the run was killed after its step-2 checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a line torn by kill -9
    train_sft(SFTConfig(**base, max_steps=4))
    assert harness.values(out, "step") == [1, 2, 3, 4]
    (out / "final").rename(tmp_path / "old-final-2")
    with pytest.raises(UserError, match=r"other settings \(batch_size 4 → 8"):
        train_sft(SFTConfig(**{**base, "batch_size": 8}, max_steps=4))


def test_logged_lr_is_the_rate_used_and_metrics_are_one_object_per_step(tmp_path, tiny_model_dir, harness):
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    out = tmp_path / "run"
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), batch_size=4, max_steps=4,
                        lr=1e-3, lr_schedule="linear", eval_fraction=0.25, eval_every=2))
    records = harness.metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["lr"] for r in records[1:]] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert "eval/loss" in records[2] and "loss" in records[2]


def test_rows_with_nothing_to_learn_are_dropped_and_no_rows_left_is_a_user_error(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    rows = [{"messages": [{"role": "user", "content": "copy cat dog owl bee"}, {"role": "assistant", "content": "cat"}]},
            {"messages": [{"role": "user", "content": "copy"}, {"role": "assistant", "content": "cat"}]}]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "run"
    argv = ["sft", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--max-length", "7", "--max-prompt-length", "4"]
    assert main(argv) == 0
    assert "dropped 1 rows with no trainable tokens" in capsys.readouterr().err
    assert main(["sft", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(tmp_path / "r2"),
                 "--eval-fraction", "0.9"]) == 0  # one row is always left for training
    assert main(argv[:-4] + ["--max-length", "5", "--max-prompt-length", "4", "--output-dir", str(tmp_path / "r3")]) == 2
    assert "no row has trainable tokens" in capsys.readouterr().err


def test_bf16_training_keeps_float32_master_weights(tmp_path, tiny_model_dir, harness):
    """dtype bfloat16: the forward runs under autocast, the weights stay float32 so small updates land."""
    from safetensors.torch import load_file

    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    out = tmp_path / "run"
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), batch_size=8, max_steps=3,
                        lr=2e-5, dtype="bfloat16", lr_schedule="constant"))
    after = harness.final_weights(out)
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    assert after[w].dtype == torch.float32
    assert float((after[w] != before[w]).float().mean()) > 0.95


def test_length_grouped_order_covers_each_epoch_and_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(400)]
    order = DataOrder(400, 8, seed=1, lengths=lengths)
    assert order.batches_per_epoch == 50
    epoch = [order.batch(k) for k in range(50)]
    assert sorted(i for b in epoch for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / 50
    assert spread < 10  # similar lengths together (random batches would spread ~80)
    assert epoch != [order.batch(k) for k in range(50, 100)]
    assert DataOrder(400, 8, seed=1, lengths=lengths).batch(7) == epoch[7]


def test_a_multi_process_launch_of_a_trainer_without_it_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2` sets WORLD_SIZE=2: a trainer that cannot run on several processes
    (every built-in one can) refuses with its reason and writes nothing."""
    from alignkit.errors import UserError
    from alignkit.train.loop import Trainer, run

    class OneOnly(Trainer):
        name, modules = "one-only", torch.nn.Linear(1, 1)
        single_process_reason = "its state lives in one process"

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="launched as 2 processes.*cannot run on several: its state lives"):
        run(SFTConfig(model="unused", data=("unused",), output_dir=str(out)), OneOnly())
    assert not out.exists()


def test_resume_never_removes_every_artefact_of_the_previous_run(tmp_path, tiny_model_dir):
    """`resume: never` starts over: the previous run's samples, best/, hacking.json and tracker logs go with its
    checkpoints and metrics; the fingerprinted reference log-probs stay (a new run reuses them when they match)."""
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "model.safetensors").write_text("old")
    (out / "tensorboard").mkdir()
    for name in ("samples.jsonl", "hacking.json", "ref_logps.safetensors", "metrics.jsonl"):
        (out / name).write_text('{"step": 9}\n')
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=1, batch_size=4,
                        resume="never"))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "final", "metrics.jsonl", "ref_logps.safetensors"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("variable, says", [("ACCELERATE_USE_FSDP", "for FSDP version 1"),
                                            ("ACCELERATE_USE_DEEPSPEED", "shards with PyTorch's FSDP2 instead")])
def test_a_deepspeed_or_fsdp1_launch_is_refused_not_run_replicated(tmp_path, tiny_model_dir, monkeypatch, variable,
                                                                   says):
    """An Accelerate config for DeepSpeed, or for FSDP without `fsdp_version: 2`, promises a sharding alignkit does
    not do: it says what to use (before writing anything) instead of training replicated. (FSDP2 runs:
    test_processes.py.)"""
    from alignkit.errors import UserError
    from alignkit.train.sft import train_sft

    data = _write_run_inputs(tmp_path, "sft")
    monkeypatch.setenv(variable, "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=says):
        train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=1))
    assert not out.exists()
