"""GPT-2 in JAX and Flax (linen)."""

from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2

__all__ = ["GPT2", "ModelConfig"]
