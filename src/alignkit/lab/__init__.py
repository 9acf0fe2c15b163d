"""The lab (SPEC §7): a world where the true reward is known, to measure alignment methods and reward hacking."""
