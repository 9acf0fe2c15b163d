"""Pure loss functions: tensors in, unreduced per-example tensors out. Imports only torch."""

from alignkit.losses.preference import (
    DPO_VARIANTS,
    bradley_terry_loss,
    dpo_implicit_rewards,
    dpo_loss,
    kto_loss,
    plackett_luce_loss,
)
from alignkit.losses.rl import KL_ESTIMATORS, gae, kl_penalty, ppo_policy_loss, ppo_value_loss
from alignkit.losses.sft import sft_token_loss

__all__ = [
    "DPO_VARIANTS",
    "KL_ESTIMATORS",
    "bradley_terry_loss",
    "dpo_implicit_rewards",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "kto_loss",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_token_loss",
]
