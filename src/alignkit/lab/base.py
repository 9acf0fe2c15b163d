"""The lab's base model: a tiny Llama pretrained on the world's text (`alignkit.lab.world.corpus`), trained on
first use and cached, so every lab run of any seed starts from the same weights.

The cache lives in `$ALIGNKIT_CACHE` (default `~/.cache/alignkit`) under a name that carries `BASE_VERSION`:
change anything that alters the weights (world, corpus, model size, training) and bump it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from alignkit.lab.world import WORDS, corpus

BASE_VERSION = 2
BASE_SIZE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4}  # hidden 64 could not hold the facts
PRETRAIN = {"lines": 20_000, "epochs": 1.0, "batch_size": 8, "lr": 1e-3, "seed": 0}  # larger lr or batch: worse


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


def base_model(cache: str | Path | None = None, quiet: bool = False) -> Path:
    """The folder of the pretrained base model (a Hugging Face checkpoint), trained here if not cached yet.

    Training writes into a temporary folder next to the cache and renames it when complete, so an interrupted
    first run leaves nothing half-written behind and two processes cannot see a partial model."""
    root = Path(cache) if cache is not None else cache_dir()
    target = root / f"lab-base-v{BASE_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".lab-base-", dir=root))
    try:
        pretrain(work, quiet=quiet)
        if target.exists() and not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete folder from an older layout
        try:
            (work / "final").rename(target)
        except OSError:  # another process finished first: use theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def pretrain(work: Path, quiet: bool = False) -> Path:
    """Pretrain the base model in `work` (with the sft trainer on plain-text rows); returns `work / "final"`."""
    import contextlib
    import io

    from alignkit.config import SFTConfig
    from alignkit.examples import write_jsonl
    from alignkit.models.tiny import save_tiny_model
    from alignkit.train.sft import train_sft

    save_tiny_model(work / "init", WORDS, seed=PRETRAIN["seed"], **BASE_SIZE)
    data = write_jsonl(work / "corpus.jsonl", [{"text": line} for line in corpus(PRETRAIN["lines"], seed=0)])
    cfg = SFTConfig(model=str(work / "init"), data=(str(data),), output_dir=str(work / "run"), seed=PRETRAIN["seed"],
                    epochs=PRETRAIN["epochs"], batch_size=PRETRAIN["batch_size"], lr=PRETRAIN["lr"],
                    lr_schedule="cosine", warmup_steps=20, max_length=32, max_prompt_length=16, log_every=50,
                    resume="never")
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        train_sft(cfg)
    (work / "run" / "final").rename(work / "final")
    return work / "final"
