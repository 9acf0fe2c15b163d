"""The run folder and everything written into it, for every trainer (SPEC §6, §13).

`RunDir`: OUTPUT_DIR with config.yaml, the settings check on resume, atomic checkpoints (weights, optimizer,
scheduler, every RNG state, the trainer's own state) and the completion marker. `MetricsLog`: metrics.jsonl
and the optional tracker. Also the seeding, the NaN/Inf counter and the multi-process refusal, so the loop
(`alignkit.train.loop`) only sequences them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.config import to_dict
from alignkit.errors import TrainingError, UserError
from alignkit.models.load import trainable_parameters


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


# ------------------------------------------------------------------------------------------- run folder
class RunDir:
    """OUTPUT_DIR with config.yaml, metrics.jsonl, checkpoints/step-N/ and final/ (SPEC §6)."""

    # what a run writes besides checkpoints/ and final/: removed by `resume: never` (ref_logps.safetensors is
    # kept: it is keyed by a fingerprint of the reference and the data, so a new run reuses it when it can)
    ARTEFACTS = ("metrics.jsonl", "samples.jsonl", "hacking.json", "best", "tensorboard")
    # append-only logs of (step, ...) records: cut back to the checkpoint's step on resume
    LOGS = ("metrics.jsonl", "samples.jsonl")

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
        """Create the folder and write config.yaml; return the checkpoint to resume from (or None). (Under
        several processes the main one calls this, the others `resume_point` after it.)"""
        import yaml

        if resume not in ("auto", "never") and not (Path(resume) / "state.json").is_file():
            raise UserError(f'field "resume": {resume} is not a complete checkpoint folder')
        if resume == "never" and self.path.exists():
            for p in (self.checkpoints, self.final, *(self.path / name for name in self.ARTEFACTS)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, self.path / "config.yaml")
        for leftover in self.checkpoints.glob(".step-*") if self.checkpoints.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)  # half-written by a killed run: never used
        return self.resume_point(resume)

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint a start with `resume` continues from (None: from the beginning); reads only."""
        if resume not in ("auto", "never") and not (Path(resume) / "state.json").is_file():
            raise UserError(f'field "resume": {resume} is not a complete checkpoint folder')
        if resume == "never":
            return None
        if resume != "auto":
            return Path(resume)
        steps = self.checkpoint_steps()
        return self.checkpoints / f"step-{steps[-1]}" if steps else None

    @staticmethod
    def check_settings(checkpoint: Path, settings: dict) -> None:
        """Refuse to resume a checkpoint of a run with other `settings` (what fixes the data order, the
        schedule and the rollouts): its steps would not continue this run."""
        saved = json.loads((checkpoint / "state.json").read_text()).get("shape", {})
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items())
            raise UserError(f"{checkpoint}: the checkpoint belongs to a run with other settings ({what}); "
                            "use the same settings, or --resume never to start over")

    def cut_logs(self, step: int) -> None:
        """Drop what a killed run logged after its last checkpoint (and lines torn by the kill); a run from
        step 0 starts its logs afresh."""
        for name in self.LOGS:
            path = self.path / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if step > 0 else []:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict, keep: int,
                        full: tuple[dict, dict] | None = None) -> Path:
        """`full`: (weights, optimizer state) gathered from FSDP shards (`alignkit.train.shard`), saved instead of
        the model's and the optimizer's own (the optimizer's then keyed by parameter name)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if full is None:
            weights = {n: p.detach().to("cpu").contiguous() for n, p in trainable_parameters(model).items()}
        else:
            weights = full[0]
        save_file(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict() if full is None else full[1], tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_state(),
                                                    "sharded": full is not None}))
        final = self.checkpoints / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the rename is what makes a checkpoint exist: it is complete or absent
        for old in self.checkpoint_steps()[:-keep]:
            shutil.rmtree(self.checkpoints / f"step-{old}", ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(path: Path, model, optimizer, scheduler, sharded: bool = False) -> dict:
        """Restore weights, optimizer, scheduler and every RNG state; return the rest of state.json. `sharded`: the
        models are FSDP2 shards (every process loads the full tensors into its shards)."""
        state = json.loads((path / "state.json").read_text())
        if state.pop("sharded", False) != sharded:
            raise UserError(f"{path}: this checkpoint was written {'with' if not sharded else 'without'} FSDP "
                            f"sharding and this run is {'sharded' if sharded else 'not'}; resume it the way it "
                            "was launched (or start over with resume: never)")
        weights = load_file(path / "model.safetensors")
        if sharded:
            from alignkit.train.shard import load_full

            load_full(model, optimizer, weights,
                      torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
            set_rng_state(state.pop("rng"))
            return state
        params = trainable_parameters(model)
        missing = set(params) - set(weights)
        if missing:
            raise UserError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(state.pop("rng"))
        return state

    @staticmethod
    def restore_process_rng(state: dict, rank: int, size: int) -> None:
        """Under several processes, each restores its own RNG state (`rngs`, one per process, saved by the main
        process); a checkpoint of another process count keeps the main process's for every one."""
        rngs = state.pop("rngs", None)
        if rngs is not None and len(rngs) == size:
            set_rng_state(rngs[rank])


def count_bad_steps(state: dict, finite: bool, step: int, max_bad_steps: int, run: RunDir, closing=(),
                    unit: str = "step", hint: str = "lower the learning rate") -> None:
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


# ---------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and to TensorBoard/W&B/MLflow if asked).
    The run's logs must already be cut back to `resume_step` (`RunDir.cut_logs`)."""

    def __init__(self, run: RunDir, report_to: str, resume_step: int):
        self.path = run.metrics_path
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
