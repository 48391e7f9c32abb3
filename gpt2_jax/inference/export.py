"""Weights in and out of the command-line tools: load a model for generate.py / evaluate, and
export a training checkpoint as a Hugging Face GPT-2 folder.

    python -m gpt2_jax.export --ckpt WORKDIR --out hf_folder [--dtype float32|bfloat16] [--force]

An --out folder that exists and holds anything is refused (an earlier export, or some other folder
given by mistake); --force writes into it anyway, replacing the files of the same name and leaving
the others.

--ckpt (and generate.py's --ckpt / --hf) may be a gs:// path: a checkpoint is read where it is, a
Hugging Face folder is copied once into ~/.cache/gpt2_jax/gcs first. --out is a local folder.

The exported folder loads with `transformers.GPT2LMHeadModel.from_pretrained(folder)` and with
`gpt2_jax.hf.load_hf_gpt2`; its tokenizer files (vocab.json, merges.txt, tokenizer_config.json)
with `transformers.AutoTokenizer.from_pretrained(folder)`. Models HF GPT-2 cannot represent (rotary
positions, grouped-query attention, a sliding window) are refused with the reason, and nothing is written.
"""

from __future__ import annotations

import os

from gpt2_jax import storage
from gpt2_jax.checkpoints import DTYPES, check_source, load_model  # noqa: F401 - also importable from here
from gpt2_jax.model.config import ModelConfig


def check_out(out: str, *, overwrite: bool = False) -> None:
    """ValueError unless `out` is a new or empty folder (or `overwrite`); cheap, before any loading."""
    if storage.is_gcs(out):
        raise ValueError(f"--out {out}: export writes a local folder; copy it to Cloud Storage afterwards "
                         "(gcloud storage cp -r FOLDER gs://...)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    if not overwrite and os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out} already exists and is not empty: give a new folder, or --force to write "
                         "into it (files of the same name are replaced)")


def has_tokenizer(config: ModelConfig) -> bool:
    """Whether GPT-2's tokenizer fits the model: its 50,257 ids all index the embedding."""
    from gpt2_jax.data.tokenizer import N_VOCAB

    return config.vocab_size >= N_VOCAB


def export_checkpoint(ckpt: str, out: str, dtype: str = "float32", *, overwrite: bool = False) -> ModelConfig:
    """Writes the checkpoint at `ckpt` as a Hugging Face GPT-2 folder `out`; returns its ModelConfig.

    The folder holds the weights and, where the vocabulary is GPT-2's, the tokenizer files, so that
    both `GPT2LMHeadModel.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` work. A
    non-empty `out` is refused unless `overwrite`.
    """
    check_out(out, overwrite=overwrite)
    from gpt2_jax.data.tokenizer import save_hf_tokenizer
    from gpt2_jax.model.hf import config_to_hf, save_hf_gpt2

    config, params = load_model(ckpt=ckpt)
    config_to_hf(config)  # refuses (ValueError, with the reason) before anything is written
    save_hf_gpt2(config, params, out, dtype=dtype)
    if has_tokenizer(config):
        save_hf_tokenizer(out, model_max_length=config.block_size)
    return config


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("ckpt", None, "Training workdir (newest good checkpoint) or one checkpoint step folder.")
    flags.DEFINE_string("out", None, "Folder to write config.json + model.safetensors into.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Dtype of the written weights.")
    flags.DEFINE_bool("force", False, "Write into an --out folder that already holds files (same names replaced).")
    flags.mark_flags_as_required(["ckpt", "out"])


def main(argv: list[str]) -> None:
    from absl import flags, logging

    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # keep library chatter (orbax, jax) off the terminal
    # ValueError / OSError: cli.run's error line
    config = export_checkpoint(FLAGS.ckpt, FLAGS.out, FLAGS.dtype, overwrite=FLAGS.force)
    tokenizer = "" if has_tokenizer(config) else (
        f"; no tokenizer files: vocab_size={config.vocab_size} is smaller than GPT-2's tokenizer")
    print(
        f"wrote {FLAGS.out} ({FLAGS.dtype}): GPT-2 with n_layer={config.n_layer} n_head={config.n_head} "
        f"n_embd={config.n_embd} block_size={config.block_size} vocab_size={config.vocab_size}{tokenizer}"
    )


def run() -> None:
    """The command line (`python -m gpt2_jax.export`); exit codes as gpt2_jax/cli.py says."""
    from gpt2_jax import cli

    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
