"""Builders: load tokenizers, policies and reward models; add LoRA; save `final/` in Hugging Face format."""

from __future__ import annotations

import contextlib
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


def training_dtypes(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype) for training: trainable weights stay float32 (AdamW updates smaller
    than a bf16 rounding step would otherwise be lost) and the forward runs in bf16 under autocast."""
    compute = resolve_dtype(name)
    if compute == torch.float16:
        raise UserError('dtype "float16" is not supported for training (it needs loss scaling); use bfloat16')
    return torch.float32, (None if compute == torch.float32 else compute)


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


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False, for_training: bool = True):
    """A causal LM on the default device: float32 weights to train (see `training_dtypes`), or `dtype`'s
    weights for a frozen model (reference, generation)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    _check_path(path)
    weights = training_dtypes(dtype)[0] if for_training else resolve_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal language model ({str(e).splitlines()[0]})") from None
    return model.to(default_device())


def load_reference(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A frozen reference policy (eval mode, no gradients) in the *policy's* weight dtype: float32 under bf16
    autocast, like the trained weights. Loaded in bf16 instead, it would compute other numbers than the policy
    it starts equal to (norms and softmaxes run in its weight dtype), and h and the KL would not start at 0."""
    return load_causal_lm(path, dtype, trust_remote_code, for_training=True).eval().requires_grad_(False)


PAD_TOKEN = "<|pad|>"


def load_reward_model(path: str, tokenizer, dtype: str = "auto", trust_remote_code: bool = False):
    """A sequence-classification model with one output (the reward), from a reward model or any causal LM.

    The score is read at the last non-padding token (as `transformers` does). When the tokenizer pads with its
    EOS token — most Llama-style tokenizers — that rule would skip the response's EOS and score the token
    before it, so a truncated and a finished response would look the same: such a tokenizer gets its own
    `<|pad|>` token here (the embeddings grow by one row; `final/` saves both).

    A head that the checkpoint does not have is initialised to zero, so every response starts at reward 0
    and the first gradient moves the head alone along the difference of hidden states.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    _check_path(path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=training_dtypes(dtype)[0], trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a reward model ({str(e).splitlines()[0]})") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    head = getattr(model, "score", None)
    if head is not None and any(k.startswith("score.") for k in info["missing_keys"]):
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    for p in model.parameters():  # a checkpoint may come from a frozen copy
        p.requires_grad_(True)
    return model.to(default_device())


def _dropout_fields(config) -> dict[str, float]:
    return {k: v for k, v in vars(config).items()
            if ("dropout" in k.lower() or "pdrop" in k.lower()) and isinstance(v, float) and v > 0}


def disable_dropout(model) -> None:
    """Turn dropout off in every layer: `nn.Dropout` modules get p = 0, and float dropout rates that modules hand
    to their kernels or to `F.dropout` (`attention_dropout`, `hidden_dropout`, `resid_pdrop`, …) become 0, in
    the modules and in the config (some models read the config at every forward, e.g. Falcon). The config's
    values are remembered and written back when the model is saved (`save_pretrained_atomic`), so final/ keeps
    the dropout the model came with. With dropout on, a policy does not start equal to its reference (DPO's
    h ≠ 0, PPO's first ratio ≠ 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            continue
        for name in _dropout_fields(module):
            setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        original = _dropout_fields(config)
        for name in original:
            setattr(config, name, 0.0)
        model.__dict__.setdefault("_alignkit_config_dropout", {}).update(original)


@contextlib.contextmanager
def _original_dropout(model):
    """The config's dropout as the model came (see `disable_dropout`), while the model is saved."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.__dict__.get("_alignkit_config_dropout", {})
    for name, value in original.items():
        setattr(base.config, name, value)
    try:
        yield
    finally:
        for name in original:
            setattr(base.config, name, 0.0)


def prepare_trainable(model, cfg, task_type: str):
    """A model ready to train as `cfg` says: dropout off when `cfg.disable_dropout` (before LoRA, so an explicit
    `lora_dropout` still applies), then LoRA adapters when `cfg.lora_r` > 0."""
    if getattr(cfg, "disable_dropout", False):
        disable_dropout(model)
    return apply_lora(model, cfg, task_type)


def load_value_model(path: str, policy_tokenizer, cfg):
    """PPO's value model: a one-output sequence classifier initialised from `path` (a reward model, or the
    policy), trained in float32, with dropout off when `cfg.disable_dropout`. It reads the policy's token ids,
    so its tokenizer must give every token the same id."""
    from alignkit.data.tokenize import same_vocabulary

    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    if not same_vocabulary(policy_tokenizer, tokenizer):
        raise UserError(f"{path}: the value model's vocabulary differs from the policy's (it reads the policy's "
                        "token ids); set value_model to a model with the policy's tokenizer, e.g. the policy itself")
    model = load_reward_model(path, tokenizer, cfg.dtype, cfg.trust_remote_code)
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


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


# unsharded copies of FSDP-sharded models, gathered by every process before the main one saves them (id → copy)
FULL_COPIES: dict[int, torch.nn.Module] = {}


def save_pretrained_atomic(model, tokenizer, path: Path, lora_save: str = "merged") -> None:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) into `path` atomically (an FSDP-sharded model:
    the full copy `alignkit.train.shard.gather_for_saving` registered)."""
    model = FULL_COPIES.pop(id(model), model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "peft_config") and lora_save == "merged":
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    with _original_dropout(to_save):
        to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
