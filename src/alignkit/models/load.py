"""Builders: load tokenizers, policies and reward models; add LoRA; save `final/` in Hugging Face format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from alignkit.errors import UserError


def quiet_transformers() -> None:
    """transformers 5 prints load reports and progress bars for every model; a CLI run wants none."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_path(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.rstrip("/").split("/", 1)[-1]
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"{path}: no such model folder")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from alignkit.data.tokenize import ensure_chat_template, ensure_pad_token

    quiet_transformers()
    _check_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer)
    return tokenizer


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    _check_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal language model ({str(e).splitlines()[0]})") from None
    return model.to(default_device())


def load_reward_model(path: str, pad_token_id: int, dtype: str = "auto", trust_remote_code: bool = False):
    """A sequence-classification model with one output (the reward), from a reward model or any causal LM.

    A head that the checkpoint does not have is initialised to zero, so every response starts at reward 0
    and the first gradient moves the head alone along the difference of hidden states.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    _check_path(path)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a reward model ({str(e).splitlines()[0]})") from None
    head = getattr(model, "score", None)
    if head is not None and any(k.startswith("score.") for k in info["missing_keys"]):
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    model.config.pad_token_id = pad_token_id
    for p in model.parameters():  # a checkpoint may come from a frozen copy
        p.requires_grad_(True)
    return model.to(default_device())


def apply_lora(model, cfg, task_type: str):
    """Wrap `model` with PEFT LoRA adapters when `cfg.lora_r` > 0 (else return it unchanged)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_targets)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f'field "lora_targets": {e}') from None


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_pretrained_atomic(model, tokenizer, path: Path, lora_save: str = "merged") -> None:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) into `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "peft_config") and lora_save == "merged":
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
