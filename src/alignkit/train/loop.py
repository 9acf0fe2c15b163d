"""The training mechanics every trainer shares, written once.

A trainer prepares a `Task` (model, tokenized examples, collate, loss) and calls `fit(cfg, task)`, which
does the rest: run folder, seeding, AdamW, the schedule, gradient accumulation, clipping, the NaN/Inf
guard, evaluation, metrics.jsonl, the progress bar, atomic checkpoints, exact resume and `final/`.

Exact resume: the data order is a pure function of (seed, epoch); a checkpoint holds the trainable weights,
the optimizer and scheduler states, every RNG state and the step (which fixes the data position), so a run
killed at any moment and started again takes the same steps on the same batches with the same randomness.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.config import to_dict
from alignkit.data.collate import to_device
from alignkit.errors import TrainingError, UserError
from alignkit.models.load import default_device, trainable_parameters


@dataclass
class StepOutput:
    """What a trainer's loss function returns for one micro-batch."""

    loss: torch.Tensor                     # scalar: the loss *summed* over the batch's loss units
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (sum, count)


@dataclass
class Task:
    """Everything method-specific that `fit` needs."""

    name: str
    model: torch.nn.Module
    train_examples: list
    collate: Callable[[list], Any]
    loss: Callable[[torch.nn.Module, Any], StepOutput]
    units: Callable[[Any], int]              # loss units in a batch (tokens or examples): the loss normaliser
    tokens: Callable[[Any], int]             # real tokens in a batch, for tokens_per_s
    save_final: Callable[[Path], None]
    eval_examples: list | None = None
    prepare: Callable[[RunDir], None] | None = None  # once the run folder exists (e.g. reference log-probs)
    derive: Callable[[dict], dict] | None = None      # metrics computed from aggregated ones (e.g. margins)


# ------------------------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------- data order
class DataOrder:
    """Micro-batch k of a run, as a pure function of (seed, k): a fresh shuffle every epoch.

    With `lengths`, batches are grouped by length (less padding): each epoch's shuffle is cut into windows of
    `GROUP_WINDOW` batches, each window is sorted by length and cut into batches, and the batches of the
    epoch are shuffled again, so batch order stays random while each batch holds similar lengths.
    """

    GROUP_WINDOW = 50

    def __init__(self, num_examples: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.lengths = num_examples, batch_size, seed, lengths
        self.batches_per_epoch = math.ceil(num_examples / batch_size)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        bs = self.batch_size
        if self.lengths is None:
            return [perm[j:j + bs] for j in range(0, self.n, bs)]
        window = bs * self.GROUP_WINDOW
        batches = []
        for w in range(0, self.n, window):
            chunk = sorted(perm[w:w + window], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + bs] for j in range(0, len(chunk), bs)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[j]

    def epoch(self, k: int) -> float:
        return k / self.batches_per_epoch


def total_steps(cfg, order: DataOrder) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * order.batches_per_epoch / cfg.grad_accum))


# ------------------------------------------------------------------------------ optimizer and schedule
def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases or norm weights)."""
    params = trainable_parameters(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: one pass over each tensor (measured 3x faster than foreach on CPU)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without it
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total: int) -> float:
    """Learning-rate factor at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def build_scheduler(optimizer, cfg, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.lr_schedule, cfg.warmup_steps, total))


# ------------------------------------------------------------------------------------------- one step
def autocast_context(dtype: torch.dtype | None):
    """Mixed precision: fp32 master weights, forward in bf16 where asked (see models.load.training_dtypes)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=default_device().type, dtype=dtype)


def train_step(model, optimizer, scheduler, batches: list, task: Task, max_grad_norm: float,
               compute_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step over micro-batches. The loss is normalised by the loss units of *all* of them,
    so k micro-batches × accumulation give exactly the gradient of one batch of their union.

    Returns the step's metrics (`lr` is the rate this step used), with `finite` False — and no update
    made — for a NaN/Inf loss or gradient. A step with no loss units (nothing to learn) updates nothing.
    """
    device = default_device()
    total_units = sum(task.units(b) for b in batches)
    sums: dict[str, list[float]] = {}
    loss_sum = 0.0
    for batch in batches:
        with autocast_context(compute_dtype):
            out = task.loss(model, to_device(batch, device))
        (out.loss / max(total_units, 1)).backward()
        loss_sum += float(out.loss.detach())
        for name, (s, c) in out.metrics.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += s
            acc[1] += c
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
    lr = scheduler.get_last_lr()[0]
    if finite and total_units > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped step still advances the schedule (torch warns about that)
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    metrics = {"loss": loss_sum / max(total_units, 1), "grad_norm": float(grad_norm), "lr": lr}
    metrics.update({k: s / c for k, (s, c) in sums.items() if c > 0})
    metrics["finite"] = finite
    return metrics


@torch.no_grad()
def evaluate(model, task: Task, examples: list, batch_size: int,
             compute_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Loss and the task's metrics over `examples`, prefixed `eval/`."""
    model.eval()
    device = default_device()
    loss_sum, units, sums = 0.0, 0, {}
    for i in range(0, len(examples), batch_size):
        batch = task.collate(examples[i:i + batch_size])
        with autocast_context(compute_dtype):
            out = task.loss(model, to_device(batch, device))
        loss_sum += float(out.loss)
        units += task.units(batch)
        for name, (s, c) in out.metrics.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += s
            acc[1] += c
    model.train()
    result = {"loss": loss_sum / max(units, 1)}
    result.update({k: s / c for k, (s, c) in sums.items() if c > 0})
    if task.derive is not None:
        result.update(task.derive(result))
    return {f"eval/{k}": v for k, v in result.items()}


# ---------------------------------------------------------------------------------------- run folder
class RunDir:
    """OUTPUT_DIR with config.yaml, metrics.jsonl, checkpoints/step-N/ and final/ (SPEC §6)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.final = self.path / "final"
        self.done_marker = self.path / "final" / "alignkit_run.json"

    def completed(self) -> dict | None:
        """The last metrics of a finished run in this folder (final/ and its marker exist), else None."""
        if not self.done_marker.is_file():
            return None
        print(f"{self.path}: this run is already complete (final/ exists); use --resume never to start over")
        return json.loads(self.done_marker.read_text()).get("metrics", {})

    def mark_done(self, **record) -> None:
        """Write final/'s marker atomically, after final/ itself: a run without it is resumed, not skipped."""
        tmp = self.done_marker.with_name(self.done_marker.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.done_marker)

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for d in self.checkpoints.iterdir():
            if d.is_dir() and d.name.startswith("step-") and (d / "state.json").is_file():
                try:
                    steps.append(int(d.name[5:]))
                except ValueError:
                    pass
        return sorted(steps)

    def start(self, cfg, resume: str) -> Path | None:
        """Create the folder and write config.yaml; return the checkpoint to resume from (or None)."""
        import yaml

        if resume not in ("auto", "never") and not (Path(resume) / "state.json").is_file():
            raise UserError(f'field "resume": {resume} is not a complete checkpoint folder')
        if resume == "never" and self.path.exists():
            for p in (self.checkpoints, self.final, self.metrics_path):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, self.path / "config.yaml")
        for leftover in self.checkpoints.glob(".step-*") if self.checkpoints.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)  # half-written by a killed run: never used
        if resume == "never":
            return None
        if resume != "auto":
            return Path(resume)
        steps = self.checkpoint_steps()
        return self.checkpoints / f"step-{steps[-1]}" if steps else None

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {n: p.detach().to("cpu").contiguous() for n, p in trainable_parameters(model).items()}
        save_file(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_state()}))
        final = self.checkpoints / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the rename is what makes a checkpoint exist: it is complete or absent
        for old in self.checkpoint_steps()[:-keep]:
            shutil.rmtree(self.checkpoints / f"step-{old}", ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
        weights = load_file(path / "model.safetensors")
        params = trainable_parameters(model)
        missing = set(params) - set(weights)
        if missing:
            raise UserError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        state = json.loads((path / "state.json").read_text())
        set_rng_state(state["rng"])
        return state


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and to TensorBoard/W&B/MLflow if asked)."""

    def __init__(self, run: RunDir, report_to: str, resume_step: int):
        self.path = run.metrics_path
        kept = []
        if self.path.exists() and resume_step > 0:  # drop what a killed run logged after its last checkpoint
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer, self.closer = _tracker(report_to, run, resume_step)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.writer is not None:
            self.writer(step, clean)

    def close(self) -> None:
        self.file.close()
        if self.closer is not None:
            self.closer()


def _tracker(report_to: str, run: RunDir, resume_step: int):
    """(write(step, metrics), close()) for the optional tracker, or (None, None)."""
    if report_to == "none":
        return None, None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError('report_to "tensorboard" needs the tensorboard package: pip install tensorboard') from None
        writer = SummaryWriter(str(run.path / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

        def write(step, metrics):
            for k, v in metrics.items():
                if isinstance(v, float):
                    writer.add_scalar(k, v, step)
            writer.flush()
        return write, writer.close
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise UserError('report_to "wandb" needs: pip install "alignkit[tracking]"') from None
        wandb.init(dir=str(run.path), name=run.path.name, resume="allow", id=_run_id(run))
        return (lambda step, metrics: wandb.log(metrics, step=step)), wandb.finish
    try:
        import mlflow
    except ImportError:
        raise UserError('report_to "mlflow" needs: pip install "alignkit[tracking]"') from None
    mlflow.start_run(run_name=run.path.name)
    return (lambda step, metrics: mlflow.log_metrics(
        {k.replace("/", "_"): v for k, v in metrics.items() if isinstance(v, float)}, step=step)), mlflow.end_run


def _run_id(run: RunDir) -> str:
    """A stable id per run folder, so a resumed run continues the same tracker run."""
    import hashlib

    return hashlib.sha1(str(run.path.resolve()).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- fit
def count_bad_steps(state: dict, finite: bool, step: int, max_bad_steps: int, run, closing=(), unit: str = "step",
                    hint: str = "lower the learning rate") -> None:
    """Keep `state`'s count of skipped (non-finite) steps; after `max_bad_steps` in a row, close `closing` and
    stop with a TrainingError that names the last good checkpoint."""
    if finite:
        state["consecutive_bad"] = 0
        return
    state["consecutive_bad"] += 1
    state["skipped_steps"] += 1
    print(f"{unit} {step}: non-finite loss or gradient, update skipped ({state['consecutive_bad']} in a row)",
          file=sys.stderr)
    if state["consecutive_bad"] >= max_bad_steps:
        for thing in closing:
            thing.close()
        good = run.checkpoint_steps()
        where = f"last good checkpoint: {run.checkpoints / f'step-{good[-1]}'}" if good else "no checkpoint"
        raise TrainingError(f"{state['consecutive_bad']} non-finite {unit}s in a row at {unit} {step} ({hint}); {where}")


def fit(cfg, task: Task) -> dict:
    """Train `task` as `cfg` says; return the last logged metrics. Resumes from the newest checkpoint."""
    from alignkit.models.load import training_dtypes

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    run = RunDir(cfg.output_dir)
    resume = cfg.resume or "auto"
    if resume == "auto" and (done := run.completed()) is not None:
        return done
    if not task.train_examples:
        raise UserError("no training examples are left (all rows were held out or dropped)")
    model = task.model
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, compute_dtype = training_dtypes(cfg.dtype)
    lengths = [len(x) for x in task.train_examples] if cfg.group_by_length else None
    order = DataOrder(len(task.train_examples), cfg.batch_size, cfg.seed, lengths)
    steps = total_steps(cfg, order)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    # what fixes the data order and the schedule: a checkpoint only resumes a run with the same values
    shape = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
             "num_examples": len(task.train_examples), "total_steps": steps, "group_by_length": cfg.group_by_length,
             "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps}

    checkpoint = run.start(cfg, resume)
    state = {"consecutive_bad": 0, "skipped_steps": 0, "shape": shape}
    start = 0
    if checkpoint is not None:
        saved = json.loads((checkpoint / "state.json").read_text())
        changed = {k: (saved.get("shape", {}).get(k), v) for k, v in shape.items()
                   if saved.get("shape", {}).get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items())
            raise UserError(f"{checkpoint}: the checkpoint belongs to a run with other settings ({what}); "
                            "use the same settings, or --resume never to start over")
        state = RunDir.load_checkpoint(checkpoint, model, optimizer, scheduler)
        start = state.pop("step")
        state.pop("rng", None)
        print(f"resuming from {checkpoint} (step {start} of {steps})", file=sys.stderr)
    if task.prepare is not None:
        task.prepare(run)
    log = MetricsLog(run, cfg.report_to, start)

    def run_eval() -> dict:
        return evaluate(model, task, task.eval_examples, eval_bs, compute_dtype)

    last: dict = {}
    if start == 0 and task.eval_examples and cfg.eval_every > 0:
        log.log(0, run_eval())

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"alignkit {task.name}", unit="step", disable=None,
               dynamic_ncols=True, file=sys.stderr)
    window: list[dict] = []
    window_tokens, window_start = 0, time.perf_counter()
    loop_start = time.perf_counter()
    for step in range(start + 1, steps + 1):
        first = (step - 1) * cfg.grad_accum
        batches = [task.collate([task.train_examples[i] for i in order.batch(k)])
                   for k in range(first, first + cfg.grad_accum)]
        metrics = train_step(model, optimizer, scheduler, batches, task, cfg.max_grad_norm, compute_dtype)
        window_tokens += sum(task.tokens(b) for b in batches)
        finite = metrics.pop("finite")
        if finite:
            window.append(metrics)
        count_bad_steps(state, finite, step, cfg.max_bad_steps, run, closing=(bar, log), unit="step",
                        hint="lower the learning rate, check the data")
        bar.update(1)
        record: dict = {}
        if step % cfg.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - window_start
            keys = dict.fromkeys(k for m in window for k in m)
            last = {k: sum(m[k] for m in window if k in m) / sum(k in m for m in window) for k in keys}
            if task.derive is not None:
                last.update(task.derive(last))
            last.update({"epoch": order.epoch(step * cfg.grad_accum),
                         "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                         "skipped_steps": state["skipped_steps"]})
            record.update(last)
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            window, window_tokens, window_start = [], 0, time.perf_counter()
        if task.eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            result = run_eval()
            record.update(result)
            last.update(result)
        if record:
            log.log(step, record)  # one object per logged step: training and evaluation metrics together
        if cfg.save_every and step % cfg.save_every == 0 and step < steps and state["consecutive_bad"] == 0:
            run.save_checkpoint(step, model, optimizer, scheduler, state, cfg.keep_checkpoints)
    bar.close()
    log.close()
    loop_seconds = time.perf_counter() - loop_start
    task.save_final(run.final)
    run.mark_done(step=steps, metrics=last, loop_seconds=loop_seconds, steps_this_process=steps - start)
    print(f"alignkit {task.name}: done, {steps} steps; final model in {run.final}")
    return last
