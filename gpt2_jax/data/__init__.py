"""Training data: the offline GPT-2 tokenizer (tokenizer.py), token storage in llm.c shards (shards.py),
corpus preparation from text, jsonl or shards (corpus.py), and resumable per-process batches (batches.py)."""

from gpt2_jax.data.batches import BatchIterator, check_enough_tokens, make_batch_iterator
from gpt2_jax.data.corpus import BUILTIN_SHAKESPEARE, Corpus, prepare_corpus, shakespeare_files
from gpt2_jax.data.shards import TokenArray, read_llmc_shard, split_tokens, write_llmc_shard

__all__ = [
    "BUILTIN_SHAKESPEARE", "BatchIterator", "Corpus", "TokenArray", "check_enough_tokens", "make_batch_iterator",
    "prepare_corpus", "read_llmc_shard", "shakespeare_files", "split_tokens", "write_llmc_shard",
]
