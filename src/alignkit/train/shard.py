"""Sharded training with FSDP2 (SPEC §12): `accelerate launch --config_file examples/accelerate/fsdp2.yaml -m alignkit …`.

Accelerate's launcher passes the config's FSDP settings in the environment (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`,
`FSDP_OFFLOAD_PARAMS`, `FSDP_RESHARD_AFTER_FORWARD`); alignkit reads them and shards the *trained* models itself
with PyTorch's `fully_shard` — each decoder layer (the model's `_no_split_modules`), then the whole model — so
that every process holds 1/N of their weights, gradients and AdamW states. Frozen models (the reference, reward
models) are not wrapped as if trained: they stay whole on every process, in their own dtype.

Exactness: alignkit's losses are already normalised by the step's global count of loss units, so the gradients
must be *summed* over the processes, not averaged: every FSDP unit's gradient divide factor is 1. The run then
makes the updates of one process with the global batch, like data parallelism (`alignkit.train.dist`).

Checkpoints hold full tensors (gathered from the shards on every process, written by the main process), so a
run resumes under another process count; `final/` is a plain Hugging Face checkpoint (`gather_for_saving` builds an
unsharded model on the main process before it is saved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from alignkit.errors import UserError


@dataclass(frozen=True)
class Sharding:
    offload: bool = False              # parameters (and their gradients and optimizer states) kept in CPU memory
    reshard_after_forward: bool = True  # free the gathered layer after its forward (ZeRO-3), or keep it (ZeRO-2)


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in ("1", "true", "yes")


def requested() -> Sharding | None:
    """The sharding an Accelerate launch asked for, or None (data parallel, or one process). DeepSpeed and FSDP1
    configs are refused with what to use instead."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise UserError("this run was launched with an Accelerate config for DeepSpeed (ACCELERATE_USE_DEEPSPEED is "
                        "set); alignkit shards with PyTorch's FSDP2 instead: launch with "
                        "examples/accelerate/fsdp2.yaml (ZeRO-3-like) or fsdp2-offload.yaml (docs/scaling.md)")
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    if os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise UserError("this run was launched with an Accelerate config for FSDP version 1; alignkit shards with "
                        "FSDP2: set `fsdp_version: 2` in the config's fsdp_config (examples/accelerate/fsdp2.yaml)")
    return Sharding(offload=_flag("FSDP_OFFLOAD_PARAMS"),
                    reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", True))


def models_of(modules: torch.nn.Module) -> list[torch.nn.Module]:
    """The models among `modules` (a model, or a ModuleDict of them, as ppo's policy and value)."""
    return list(modules.values()) if isinstance(modules, torch.nn.ModuleDict) else [modules]


def shard(modules: torch.nn.Module, sharding: Sharding) -> None:
    """Shard every model among `modules` in place: each decoder layer, then the model; gradients summed."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    # without a GPU the parameters are in CPU memory already: offloading is moot (and FSDP2 refuses it)
    policy = CPUOffloadPolicy() if sharding.offload and torch.cuda.is_available() else OffloadPolicy()
    for model in models_of(modules):
        if hasattr(model, "peft_config"):
            raise UserError("LoRA under FSDP is not supported yet: LoRA trains few parameters, so plain data "
                            "parallelism (examples/accelerate/ddp.yaml) is the better fit")
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise UserError(f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules name none)")
        kwargs = {"reshard_after_forward": sharding.reshard_after_forward, "offload_policy": policy}
        for layer in layers:
            fully_shard(layer, **kwargs)
        # the backbone and the output layer as units of their own: alignkit calls them separately (the vocabulary
        # projection of the target positions only), which must gather their weights too. A head tied to the input
        # embedding stays with the backbone's unit (then the full forward is used).
        from alignkit.models.logps import _backbone

        backbone = _backbone(model)
        if backbone is not model:
            fully_shard(backbone, **kwargs)
            inside = {id(p) for p in backbone.parameters()}
            for head in model.children():  # lm_head, a classifier's score: units of their own unless tied
                params = list(head.parameters())
                if head is not backbone and params and not any(id(p) in inside for p in params):
                    fully_shard(head, **kwargs)
        fully_shard(model, **kwargs)
        _first_forward(model)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # the losses are normalised by the global count: sum
                m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)


def _first_forward(model) -> None:
    """One token through the whole model, so that it is the root of its FSDP units (alignkit later calls the
    backbone and the head on their own; a unit called first would make itself a root)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout, and no draw from the RNG that a run's dropout continues from
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every process: gather the full tensors of the trained parameters (named as `modules.named_parameters()`
    names them); the main process gets them, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trained = {n for n, p in modules.named_parameters() if p.requires_grad}
    state = get_model_state_dict(modules, options=_options())
    return {n: t.contiguous() for n, t in state.items() if n in trained}


def full_optimizer_state(modules: torch.nn.Module, optimizer) -> dict:
    """Every process: the optimizer's state with full tensors, keyed by parameter name (main process only)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(modules, optimizer, options=_options())


def load_full(modules: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Every process: load full tensors (as `full_weights` and `full_optimizer_state` gave them) into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(modules, weights, options=options)
    set_optimizer_state_dict(modules, optimizer, optimizer_state, options=options)


def gather_for_saving(modules: torch.nn.Module, main: bool) -> None:
    """Every process, before `final/` is written: gather each sharded model's full weights into an unsharded copy
    on the main process, which `save_pretrained_atomic` then saves in the model's place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    from alignkit.models.load import FULL_COPIES

    for model in models_of(modules):
        if not isinstance(model, FSDPModule):
            continue
        state = get_model_state_dict(model, options=_options())
        if main:
            plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # the model's own class
            with torch.device("meta"):
                copy = plain(model.config)
            copy.load_state_dict(state, strict=False, assign=True)
            if hasattr(copy, "tie_weights"):
                copy.tie_weights()
            FULL_COPIES[id(model)] = copy.eval()
