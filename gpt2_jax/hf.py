"""Public name of the Hugging Face GPT-2 import / export (implemented in gpt2_jax/model/hf.py)."""

from gpt2_jax.model.hf import config_from_hf, config_to_hf, load_hf_gpt2, save_hf_gpt2

__all__ = ["config_from_hf", "config_to_hf", "load_hf_gpt2", "save_hf_gpt2"]
