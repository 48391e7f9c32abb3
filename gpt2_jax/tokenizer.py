"""Public name of the offline GPT-2 tokenizer (implemented in gpt2_jax/data/tokenizer.py)."""

from gpt2_jax.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

__all__ = ["EOT_ID", "EOT_TOKEN", "get_tokenizer"]
