"""GPT-2 in JAX and Flax (linen).

    model/      ModelConfig, layers, attention kernels, GPT2, Hugging Face import / export
    data/       offline GPT-2 tokenizer, corpus preparation into token shards, resumable batches
    training/   mesh and sharding rules, optimizer, the sharded step, the loop, checkpoints, preflight
    inference/  KV-cache sampling, perplexity and multiple-choice evaluation, export

`GPT2` and `ModelConfig` load on first use, so importing a jax-free module of the package (a
config, an argument check) does not pay for importing jax.
"""

__all__ = ["GPT2", "ModelConfig"]


def __getattr__(name: str):
    if name in __all__:
        from gpt2_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")
