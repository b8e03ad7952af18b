"""megahybrid: a Megatron-Core backend for hybrid SFT + RL post-training (SRFT, SuperRL, SASR, SRL, GRPO, SFT)."""
__version__ = "0.1.0"
