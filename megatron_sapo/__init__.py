"""megatron_sapo: RL post-training of Mixture-of-Experts language models with SAPO on Megatron-Core."""

__version__ = "0.1.0"
