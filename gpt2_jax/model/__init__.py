"""The model: ModelConfig (frozen) and presets, layers, attention kernels, GPT2, Hugging Face I/O."""

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2, abstract_params, init_params

__all__ = ["GPT2", "ModelConfig", "abstract_params", "init_params"]
