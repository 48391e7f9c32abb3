"""The model: ModelConfig (frozen) and presets, layers, attention kernels, GPT2, Hugging Face I/O.

`ModelConfig` needs no jax; `GPT2`, `init_params` and `abstract_params` (gpt2.py) import it on
first use.
"""

from gpt2_jax.model.config import ModelConfig

__all__ = ["GPT2", "ModelConfig", "abstract_params", "init_params"]


def __getattr__(name: str):
    if name in ("GPT2", "abstract_params", "init_params"):
        from gpt2_jax.model import gpt2

        return getattr(gpt2, name)
    raise AttributeError(f"module 'gpt2_jax.model' has no attribute {name!r}")
