"""`python -m gpt2_jax.evaluate`: perplexity of a text, or multiple-choice (HellaSwag) accuracy.

    python -m gpt2_jax.evaluate --hf path/to/gpt2 --text wiki.txt [--stride 512] [--json]
    python -m gpt2_jax.evaluate --ckpt WORKDIR --hellaswag hellaswag_val.jsonl [--limit 1000]

The scoring is gpt2_jax/inference/evaluate.py's. This module loads jax only after the arguments
are checked, so a bad flag is refused at once. Exit codes as gpt2_jax/cli.py says.
"""

from __future__ import annotations

import errno
import json
import math
import os

from absl import flags, logging

from gpt2_jax import cli


def _define_flags() -> None:
    flags.DEFINE_string("ckpt", None, "Training workdir (newest good checkpoint) or one checkpoint step folder.")
    flags.DEFINE_string("hf", None, "Hugging Face GPT-2 folder (config.json + model.safetensors).")
    flags.DEFINE_string("text", None, "Text file whose perplexity to measure.")
    flags.DEFINE_integer("stride", None, "Tokens between sliding windows (default block_size // 2).")
    flags.DEFINE_string("hellaswag", None, "HellaSwag-format jsonl file (ctx, endings, label).")
    flags.DEFINE_integer("batch_size", 8, "Rows per step, split over all devices.")
    flags.DEFINE_integer("limit", 0, "Score only the first N tokens (--text) or examples (--hellaswag); 0 = all.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")


def main(argv: list[str]) -> None:
    """ValueError and OSError (a missing --text / --hellaswag file, a bad model folder) are the user's:
    cli.run prints them as one `error:` line."""
    from gpt2_jax.checkpoints import check_source

    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # keep library chatter (orbax, jax) off the terminal
    if (FLAGS.text is None) == (FLAGS.hellaswag is None):
        raise ValueError("give exactly one of --text FILE or --hellaswag FILE.jsonl")
    if FLAGS.limit < 0:
        raise ValueError(f"--limit={FLAGS.limit} must be >= 0")
    check_source(FLAGS.ckpt, FLAGS.hf)
    for path in filter(None, (FLAGS.text, FLAGS.hellaswag)):
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    from gpt2_jax import compilation_cache
    from gpt2_jax.checkpoints import load_model
    from gpt2_jax.inference import evaluate

    compilation_cache.enable()  # a second call loads the scoring program instead of compiling it
    if FLAGS.text is not None:
        from gpt2_jax.data import token_bytes
        from gpt2_jax.data.tokenizer import get_tokenizer

        with open(FLAGS.text, encoding="utf-8") as f:
            tokens = get_tokenizer().encode(f.read(), allowed_special="all")
        if FLAGS.limit:
            tokens = tokens[: FLAGS.limit]
        config, params = load_model(ckpt=FLAGS.ckpt, hf=FLAGS.hf, dtype=FLAGS.dtype)
        stride = FLAGS.stride if FLAGS.stride is not None else max(1, config.block_size // 2)
        ppl = evaluate.perplexity(config, params, tokens, stride=stride, batch_size=FLAGS.batch_size)
        # Every token after the first is predicted: those are the bytes the loss is spread over.
        bpb = token_bytes.bits_per_byte(math.log(ppl), len(tokens) - 1, token_bytes.count_bytes(tokens[1:]))
        result = {"perplexity": ppl, "loss": math.log(ppl), "bpb": bpb, "tokens": len(tokens),
                  "context": config.block_size, "stride": stride}
        text = (f"perplexity {ppl:.4f} (mean loss {math.log(ppl):.4f} nats over {len(tokens) - 1} "
                f"predicted tokens, {bpb:.4f} bits per byte; context {config.block_size}, stride {stride})")
    else:
        examples = evaluate.load_hellaswag(FLAGS.hellaswag, FLAGS.limit)
        config, params = load_model(ckpt=FLAGS.ckpt, hf=FLAGS.hf, dtype=FLAGS.dtype)
        scores = evaluate.score_multiple_choice(config, params, examples, batch_size=FLAGS.batch_size)
        result = {"accuracy": scores.accuracy, "accuracy_norm": scores.accuracy_norm, "examples": len(examples),
                  "predictions": scores.predictions, "predictions_norm": scores.predictions_norm}
        text = (f"accuracy {scores.accuracy:.4f}, normalised {scores.accuracy_norm:.4f} ({len(examples)} examples; "
                "normalised: the lowest mean loss per ending token wins)")
    print(json.dumps(result) if FLAGS.json else text)


def run() -> None:
    """The command line (`python -m gpt2_jax.evaluate`)."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
