"""alignkit: align language models with preferences (SFT, reward models, DPO/IPO/KTO, PPO, Best-of-N)."""

__version__ = "0.1.0"
