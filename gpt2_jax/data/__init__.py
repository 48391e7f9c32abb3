"""Training data: the offline GPT-2 tokenizer (tokenizer.py), token storage in llm.c shards (shards.py),
what a source may be (sources.py), corpus preparation into cached shards (corpus.py), resumable
per-process batches (batches.py), and the documents packed in a window as positions and segment ids
(documents.py).

The names below load on first use: batches.py needs grain, which imports jax, and train.py checks
its data source before jax loads.
"""

import importlib

_WHERE = {
    "BatchIterator": "batches", "check_enough_tokens": "batches", "make_batch_iterator": "batches",
    "rebatch_state": "batches",
    "document_layout": "documents",
    "BUILTIN_SHAKESPEARE": "sources", "Corpus": "corpus", "check_source": "sources", "first_line": "corpus",
    "prepare_corpus": "corpus", "shakespeare_files": "sources",
    "TokenArray": "shards", "read_llmc_shard": "shards", "split_tokens": "shards", "write_llmc_shard": "shards",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"gpt2_jax.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gpt2_jax.data' has no attribute {name!r}")
