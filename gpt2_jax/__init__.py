"""GPT-2 in JAX and Flax (linen).

    model/      ModelConfig, layers, attention kernels, GPT2, Hugging Face import / export
    data/       offline GPT-2 tokenizer, corpus preparation into token shards, resumable batches
    training/   mesh and sharding rules, optimizer, the sharded step, the loop, checkpoints, preflight
    inference/  KV-cache sampling, perplexity and multiple-choice evaluation, export
"""

from gpt2_jax.model import GPT2, ModelConfig

__all__ = ["GPT2", "ModelConfig"]
