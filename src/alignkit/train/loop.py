"""One run loop for every trainer, offline (sft, reward, dpo, kto) and online (ppo, rloo, grpo).

Every run is "for each step: the step's work, then the run's chores". The step's work is a `Trainer`'s
(`step`); the chores are written here once: threads and gradient checkpointing, AdamW and the schedule
(the logged `lr` is the rate the step used), the settings check and exact resume, the NaN/Inf guard,
metrics.jsonl with `tokens_per_s`, the progress bar, evaluation every `eval_every`, checkpoints every
`save_every`, `final/` and its completion marker. The run folder itself is `alignkit.train.run`.

The offline methods describe themselves with a `Task` (model, tokenized examples, collate, a per-batch loss)
and call `fit(cfg, task)`: their step is `train_step` over `grad_accum` micro-batches.

Exact resume: the data order is a pure function of (seed, epoch); a checkpoint holds the trainable weights,
the optimizer and scheduler states, every RNG state, the step (which fixes the data position) and the
trainer's own state (`Trainer.state_dict`), so a run killed at any moment and started again takes the same
steps on the same batches with the same randomness. A trainer must draw its randomness inside `step`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.data.collate import to_device
from alignkit.errors import Preempted, UserError
from alignkit.models.load import default_device, trainable_parameters, training_dtypes
from alignkit.models.precision import autocast_context
from alignkit.train import shard as sharding
from alignkit.train.dist import ONE, Processes, launched_size
from alignkit.train.preempt import Preemption
from alignkit.train.run import MetricsLog, RunDir, count_bad_steps, rng_state, seed_everything

# RunDir and seed_everything live in alignkit.train.run; named here too for the trainers that import them from the loop
__all__ = ["DataOrder", "RunDir", "StepOutput", "Task", "Trainer", "fit", "run", "seed_everything", "train_step"]


class Trainer:
    """The method-specific part of a run; `run(cfg, trainer)` does the rest. Defaults: nothing to evaluate,
    no state beyond weights, optimizer, scheduler and RNG, never stops early."""

    name: str = "train"
    unit: str = "step"                   # what one step is called in messages ("iteration" for ppo)
    modules: torch.nn.Module             # what is trained, optimized and checkpointed
    total_steps: int = 1
    settings: dict = {}                  # what a checkpoint must share with this run to be resumed by it
    latest: tuple[str, ...] = ()         # metrics logged as their latest value, not averaged over the log window
    should_stop: bool = False            # stop after this step (e.g. the hacking detector's stop_on_hacking)
    evaluates: bool = False              # whether `evaluate` has anything to evaluate
    nan_hint: str = "lower the learning rate, check the data"  # what to try after too many non-finite steps
    procs: Processes = ONE               # this process among the run's (set by `run`)
    supports_processes: bool = False     # whether it runs on several processes (`accelerate launch`)
    supports_sharding: bool = False      # whether its trained models can be sharded (FSDP2)
    sharding_reason: str = "it does not run sharded yet"
    single_process_reason: str = "it does not run on several processes yet"

    def prepare(self, run: RunDir) -> None:
        """Once the run folder exists and a checkpoint (if any) is loaded, before the first step."""

    def step(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        """Step `step` (1-based): update with `optimizer`; return its metrics with `finite` (False: no update
        was made, a NaN/Inf loss or gradient) and `tokens` (real tokens processed, for tokens_per_s)."""
        raise NotImplementedError

    def derive(self, metrics: dict) -> dict:
        """Metrics computed from the averaged ones (e.g. a margin of two means)."""
        return {}

    def evaluate(self) -> dict:
        """Held-out metrics, prefixed eval/."""
        return {}

    def state_dict(self) -> dict:
        """JSON-able state that resume needs beyond weights, optimizer, scheduler and RNG."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_final(self, path: Path) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Extra fields for final/alignkit_run.json."""
        return {}


@dataclass
class StepOutput:
    """What a trainer's loss function returns for one micro-batch."""

    loss: torch.Tensor                     # scalar: the loss *summed* over the batch's loss units
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (sum, count)


@dataclass
class Task:
    """Everything method-specific that `fit` needs from an offline method."""

    name: str
    model: torch.nn.Module
    train_examples: list
    collate: Callable[[list], Any]
    loss: Callable[..., StepOutput]          # loss(model, batch), or loss(model, batch, context) (see step_context)
    units: Callable[[Any], int]              # loss units in a batch (tokens or examples): the loss normaliser
    tokens: Callable[[Any], int]             # real tokens in a batch, for tokens_per_s
    save_final: Callable[[Path], None]
    eval_examples: list | None = None
    prepare: Callable[[RunDir, Processes], None] | None = None  # once the run folder exists (e.g. reference log-probs)
    derive: Callable[[dict], dict] | None = None      # metrics computed from aggregated ones (e.g. margins)
    # a mean over the whole optimizer step computed before its loss pass, over all of its micro-batches on every
    # process (without gradients), and passed to `loss` as `context` (e.g. KTO's reference point):
    # step_context(model, batches) returns the per-example values (1-D), the loop averages them over the step.
    # Only computed when a step has several micro-batches or processes: with one, `loss` gets context None and
    # computes it itself.
    step_context: Callable[[torch.nn.Module, list], torch.Tensor] | None = None
    single_process: str = ""  # why this task cannot run on several processes yet ("" = it can)


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
def build_optimizer(model, cfg, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases or norm weights). `fused` False: the foreach kernel
    (for sharded parameters, which the fused CPU kernel does not take)."""
    params = trainable_parameters(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: one pass over each tensor (measured 3x faster than foreach on CPU)
        if not fused:
            raise ValueError("not fused")
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
def train_step(model, optimizer, batches: list, task: Task, max_grad_norm: float,
               compute_dtype: torch.dtype | None = None, procs: Processes = ONE) -> dict:
    """One optimizer step over micro-batches. The loss is normalised by the loss units of *all* of them,
    so k micro-batches × accumulation give exactly the gradient of one batch of their union — and, with
    several processes (`procs`), the units, gradients and metrics are summed over the processes first, so that
    their micro-batches count as one batch too.

    Returns the step's metrics, with `finite` False — and no update made — for a NaN/Inf loss or gradient.
    A step with no loss units (nothing to learn) updates nothing.
    """
    device = default_device()
    batches = [to_device(b, device) for b in batches]
    context = None
    if task.step_context is not None and (len(batches) > 1 or procs.size > 1):
        context = step_mean(model, batches, task, compute_dtype, procs)
    total_units = int(procs.sum([sum(task.units(b) for b in batches)])[0])
    sums: dict[str, list[float]] = {}
    loss_sum = 0.0
    for batch in batches:
        with autocast_context(compute_dtype):
            out = task.loss(model, batch) if task.step_context is None else task.loss(model, batch, context)
        (out.loss / max(total_units, 1)).backward()
        loss_sum += float(out.loss.detach())
        for name, (s, c) in out.metrics.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += s
            acc[1] += c
    params = [p for p in model.parameters() if p.requires_grad]
    procs.sum_grads(params)
    if procs.size > 1:  # every process needs every metric's name, in one order, to sum them
        names = sorted(set().union(*procs.gather_names(sorted(sums))))
        flat = procs.sum([loss_sum] + [v for n in names for v in sums.get(n, [0.0, 0.0])])
        loss_sum, sums = flat[0], {n: flat[1 + 2 * i:3 + 2 * i] for i, n in enumerate(names)}
    grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
    if finite and total_units > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {"loss": loss_sum / max(total_units, 1), "grad_norm": float(grad_norm)}
    metrics.update({k: s / c for k, (s, c) in sums.items() if c > 0})
    metrics["finite"] = finite
    return metrics


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (over sharded parameters, clip_grad_norm_ returns a distributed one)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def step_mean(model, batches: list, task: Task, compute_dtype, procs: Processes) -> torch.Tensor:
    """`task.step_context`'s values averaged over the step: every micro-batch of every process (float64 sums)."""
    device = default_device()
    values = torch.zeros(0, device=device)
    if batches:
        with autocast_context(compute_dtype):
            values = task.step_context(model, batches)
    total, count = procs.sum([float(values.double().sum()), float(values.numel())])
    return torch.tensor(total / max(count, 1.0), device=device)


@torch.no_grad()
def evaluate(model, task: Task, examples: list, batch_size: int,
             compute_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Loss and the task's metrics over `examples`, prefixed `eval/`."""
    model.eval()
    device = default_device()
    loss_sum, units, sums = 0.0, 0, {}
    for i in range(0, len(examples), batch_size):
        batch = task.collate(examples[i:i + batch_size])
        batch = to_device(batch, device)
        with autocast_context(compute_dtype):
            out = task.loss(model, batch) if task.step_context is None else task.loss(model, batch, None)
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


class BatchTrainer(Trainer):
    """An offline method's trainer: step k takes micro-batches (k−1)·grad_accum … k·grad_accum − 1 of the
    seeded data order and makes one `train_step` on them."""

    latest = ("epoch",)

    def __init__(self, cfg, task: Task):
        if not task.train_examples:
            raise UserError("no training examples are left (all rows were held out or dropped)")
        self.cfg, self.task, self.name, self.modules = cfg, task, task.name, task.model
        lengths = [len(x) for x in task.train_examples] if cfg.group_by_length else None
        self.processes = launched_size()  # batch_size is per process: the data order is of the global batch
        self.order = DataOrder(len(task.train_examples), cfg.batch_size * self.processes, cfg.seed, lengths)
        self.supports_processes = not task.single_process
        self.single_process_reason = task.single_process
        self.supports_sharding = True
        self.total_steps = total_steps(cfg, self.order)
        self.compute_dtype = training_dtypes(cfg.dtype)[1]
        self.evaluates = bool(task.eval_examples)
        # what fixes the data order and the schedule: a checkpoint only resumes a run with the same values
        # (batch_size: the global micro-batch, batch_size × processes, so that a checkpoint resumes under another
        # process count when the product is the same)
        self.settings = {"batch_size": cfg.batch_size * self.processes, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                         "num_examples": len(task.train_examples), "total_steps": self.total_steps,
                         "group_by_length": cfg.group_by_length, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                         "warmup_steps": cfg.warmup_steps}

    def prepare(self, run: RunDir) -> None:
        if self.procs.sharded:
            self._check_shares()
        if self.task.prepare is not None:
            self.task.prepare(run, self.procs)

    def _check_shares(self) -> None:
        """Under FSDP every process runs the forward passes of every micro-batch together (they gather the layers
        in turn): refuse a data order whose last batch of an epoch leaves a process without an example."""
        last, size = len(self.task.train_examples) % self.order.batch_size, self.procs.size
        if last and (size - 1) * -(-last // size) >= last:  # `shard`'s last process gets nothing
            raise UserError(f"{len(self.task.train_examples)} examples in batches of {self.order.batch_size} "
                            f"(batch_size × {self.procs.size} processes) leave a last batch of {last}, too few for "
                            "every process under FSDP; change batch_size or drop a few examples")

    def step(self, step: int, optimizer) -> dict:
        task, accum = self.task, self.cfg.grad_accum
        first = (step - 1) * accum
        shards = [self.procs.shard(self.order.batch(k)) for k in range(first, first + accum)]
        batches = [task.collate([task.train_examples[i] for i in shard]) for shard in shards if shard]
        metrics = train_step(task.model, optimizer, batches, task, self.cfg.max_grad_norm, self.compute_dtype,
                             self.procs)
        tokens = int(self.procs.sum([sum(task.tokens(b) for b in batches)])[0])
        return {**metrics, "tokens": tokens, "epoch": self.order.epoch(step * accum)}

    def derive(self, metrics: dict) -> dict:
        return self.task.derive(metrics) if self.task.derive is not None else {}

    def evaluate(self) -> dict:
        return evaluate(self.task.model, self.task, self.task.eval_examples,
                        self.cfg.eval_batch_size or self.cfg.batch_size, self.compute_dtype)

    def save_final(self, path: Path) -> None:
        self.task.save_final(path)


def fit(cfg, task: Task) -> dict:
    """Train an offline `task` as `cfg` says; return the last logged metrics."""
    return run(cfg, BatchTrainer(cfg, task))


# ----------------------------------------------------------------------------------------------- run
def enable_gradient_checkpointing(modules: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, on every model among `modules` (a model, or a ModuleDict
    of them) that supports it."""
    models = [modules] if hasattr(modules, "gradient_checkpointing_enable") else list(modules.children())
    for model in models:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def window_average(window: list[dict], latest: tuple[str, ...]) -> dict:
    """The mean of each metric over the (finite) steps of a log window; `latest` ones keep their last value."""
    keys = dict.fromkeys(k for m in window for k in m)
    out = {k: sum(m[k] for m in window if k in m) / sum(k in m for m in window) for k in keys if k not in latest}
    out.update({k: m[k] for m in window for k in latest if k in m})
    return out


def run(cfg, trainer: Trainer) -> dict:
    """Run `trainer` as `cfg` says; return the last logged metrics. Resumes from the newest checkpoint.
    Under a launcher (`accelerate launch`), every process runs this; only the main one writes."""
    check_processes(trainer)
    shards = sharding.requested()
    if shards is not None and not trainer.supports_sharding:
        raise UserError(f"this run was launched with an FSDP config, but {trainer.name} cannot run sharded: "
                        f"{trainer.sharding_reason}; launch it data-parallel (examples/accelerate/ddp.yaml)")
    procs = trainer.procs = Processes.start()
    if shards is not None:
        sharding.shard(trainer.modules, shards)
        procs.sharded = True
        if procs.main:
            print(f"alignkit {trainer.name}: trained models sharded with FSDP2 over {procs.size} processes "
                  f"(offload {'on' if shards.offload else 'off'}, reshard after forward "
                  f"{'on' if shards.reshard_after_forward else 'off'})", file=sys.stderr)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    run_dir = RunDir(cfg.output_dir)
    resume = cfg.resume or "auto"
    if resume == "auto" and (done := run_dir.completed()) is not None:
        return done
    modules, steps, unit = trainer.modules, trainer.total_steps, trainer.unit
    modules.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(modules)
    optimizer = build_optimizer(modules, cfg, fused=not procs.sharded)
    scheduler = build_scheduler(optimizer, cfg, steps)

    if procs.main:
        run_dir.start(cfg, resume)
    procs.barrier()
    checkpoint = run_dir.resume_point(resume)
    state = {"consecutive_bad": 0, "skipped_steps": 0, "shape": trainer.settings}
    start = 0
    if checkpoint is not None:
        RunDir.check_settings(checkpoint, trainer.settings)
        state = RunDir.load_checkpoint(checkpoint, modules, optimizer, scheduler, procs.sharded)
        RunDir.restore_process_rng(state, procs.rank, procs.size)
        start = state.pop("step")
        trainer.load_state_dict(state.pop("trainer", {}))
        if procs.main:
            print(f"resuming from {checkpoint} ({unit} {start} of {steps})", file=sys.stderr)
    if procs.main:
        run_dir.cut_logs(start)
    trainer.prepare(run_dir)
    log = MetricsLog(run_dir, cfg.report_to, start) if procs.main else NoLog()

    last: dict = {}
    if start == 0 and trainer.evaluates and cfg.eval_every > 0:
        log.log(0, trainer.evaluate())

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"alignkit {trainer.name}", unit=unit,
               disable=None if procs.main else True, dynamic_ncols=True, file=sys.stderr)
    loop_start = time.perf_counter()
    with Preemption() as preemption:
        step, last = _loop(cfg, trainer, run_dir, optimizer, scheduler, state, log, bar, start, last, preemption)
    bar.close()
    log.close()
    loop_seconds = time.perf_counter() - loop_start
    if procs.sharded:  # every process gathers the shards; the main process saves a plain checkpoint
        sharding.gather_for_saving(modules, procs.main)
    if procs.main:
        trainer.save_final(run_dir.final)
        run_dir.mark_done(step=step, metrics=last, loop_seconds=loop_seconds, steps_this_process=step - start,
                          processes=procs.size, sharding="fsdp2" if procs.sharded else "none", **trainer.summary())
        print(f"alignkit {trainer.name}: done, {step} {unit}s; final model in {run_dir.final}")
    procs.end()
    return last


class NoLog:
    """What the processes other than the main one log: nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def check_processes(trainer: Trainer) -> None:
    """Refuse a multi-process launch for a trainer that does not support it, before anything is written."""
    size = launched_size()
    if size > 1 and not trainer.supports_processes:
        raise UserError(f"this run was launched as {size} processes (WORLD_SIZE={size}), but {trainer.name} "
                        f"cannot run on several: {trainer.single_process_reason}; launch one process "
                        "(plain `alignkit ...`)")


def _loop(cfg, trainer: Trainer, run_dir: RunDir, optimizer, scheduler, state: dict, log, bar, start: int, last: dict,
          preemption: Preemption) -> tuple[int, dict]:
    """Steps start + 1 … total: train, log, evaluate, checkpoint; returns (last step, last logged metrics). On
    SIGTERM/SIGINT it checkpoints after the current step and raises `Preempted`."""
    steps, unit, modules = trainer.total_steps, trainer.unit, trainer.modules
    window: list[dict] = []
    window_tokens, window_seconds = 0, 0.0
    step = start
    for step in range(start + 1, steps + 1):
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged as such)
        began = time.perf_counter()
        metrics = trainer.step(step, optimizer)
        window_seconds += time.perf_counter() - began
        with warnings.catch_warnings():  # a skipped step still advances the schedule (torch warns about that)
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        finite = metrics.pop("finite")
        window_tokens += metrics.pop("tokens")
        if finite:
            window.append({**metrics, "lr": lr})
        count_bad_steps(state, finite, step, cfg.max_bad_steps, run_dir, closing=(bar, log), unit=unit,
                        hint=trainer.nan_hint)
        bar.update(1)
        stop = trainer.should_stop
        last_step = step == steps or stop
        record: dict = {}
        if step % cfg.log_every == 0 or last_step:
            last = window_average(window, trainer.latest)
            last.update(trainer.derive(last))
            last.update({"tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                         "skipped_steps": state["skipped_steps"]})
            record.update(last)
            if "loss" in last:
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            window, window_tokens, window_seconds = [], 0, 0.0
        if trainer.evaluates and ((cfg.eval_every and step % cfg.eval_every == 0) or last_step):
            result = trainer.evaluate()
            record.update(result)
            last.update(result)
        if record:
            log.log(step, record)  # one object per logged step: training and evaluation metrics together
        procs = trainer.procs
        signalled = procs.any(preemption.received is not None) and not last_step
        saved = cfg.save_every and step % cfg.save_every == 0 and not last_step and state["consecutive_bad"] == 0
        if saved or signalled:
            path = run_dir.checkpoints / f"step-{step}"
            rngs = {"rngs": procs.gather(rng_state())} if procs.size > 1 else {}
            full = ((sharding.full_weights(modules), sharding.full_optimizer_state(modules, optimizer))
                    if procs.sharded else None)  # every process sends its shards to the main one
            if procs.main:
                run_dir.save_checkpoint(step, modules, optimizer, scheduler,
                                        {**state, **rngs, "trainer": trainer.state_dict()}, cfg.keep_checkpoints,
                                        full)
            procs.barrier()
            if signalled:
                bar.close()
                log.close()
                procs.end()
                raise Preempted(f"{preemption.received or 'a signal to another process'} received: stopped after {unit} {step} of {steps} with a "
                                f"checkpoint in {path}; run the same command again to resume")
        if stop:
            print(f"alignkit {trainer.name}: stopping at {unit} {step} (the trainer asked to stop)", file=sys.stderr)
            break
    return step, last
