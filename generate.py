"""Sample text from a trained checkpoint or a Hugging Face GPT-2 folder.

    python generate.py --ckpt WORKDIR --prompt "To be, or not to be" --max_new_tokens 100 --top_k 200
    python generate.py --hf path/to/gpt2 --prompt_file prompt.txt --temperature 0 --json
    echo "Once upon a time" | python generate.py --hf path/to/gpt2 --num_samples 3
    python generate.py --preset gpt2-xl --preflight --topology v5e-1    # compile for one TPU chip
    python generate.py --hf path/to/gpt2 --prompt_file code.py --temperature 0 --speculate 4

One non-JSON sample is streamed to the terminal as it is produced; tokens/s go to stderr.
--json prints one object per sample per line:
    {"prompt": str, "completion": str, "tokens": [new token ids], "tokens_per_s": float}
tokens/s counts new tokens over prefill + decode time, compilation excluded. An empty prompt
starts from <|endoftext|> (unconditional samples). Sampling stops at <|endoftext|>, which is not
printed, or when the model's context is full. Logic lives in gpt2_jax.inference.sampling.
Exit codes (gpt2_jax/cli.py): 0 done, 2 a usage or input error (one `error:` line), 1 a bug.
"""

import codecs
import json
import sys

from absl import flags, logging

from gpt2_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "Training workdir (newest good checkpoint) or one checkpoint step folder.")
flags.DEFINE_string("hf", None, "Hugging Face GPT-2 folder (config.json + model.safetensors).")
flags.DEFINE_string("prompt", None, "Prompt text. Without --prompt or --prompt_file it is read from stdin.")
flags.DEFINE_string("prompt_file", None, "File holding the prompt text.")
flags.DEFINE_integer("max_new_tokens", 100, "Most tokens to generate per sample.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only; 0 = no limit.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with probability >= p; 1 = off.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("num_samples", 1, "Samples to draw from the prompt.")
flags.DEFINE_bool("json", False, "Print one JSON object per sample per line instead of text.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_enum("truncate", "none", ["none", "left"], "'left' drops the prompt's oldest tokens to fit the context.")
flags.DEFINE_integer("speculate", 0, "Speculative decoding: tokens drafted per pass of the model (prompt lookup, "
                     "or --draft_ckpt); 0 = off. Greedy output is unchanged.")
flags.DEFINE_string("draft_ckpt", None, "A smaller model's training checkpoint to draft with (same vocabulary).")
flags.DEFINE_bool("preflight", False, "Compile the prefill and decode programs for one chip of --topology and report "
                  "weight, KV-cache and peak bytes against its HBM; generate nothing.")
flags.DEFINE_string("topology", None, "With --preflight: a Cloud TPU type (e.g. v5e-1, v6e-1; libtpu from "
                    "`pip install -e \".[tpu]\"`); the programs are compiled for one of its chips.")
flags.DEFINE_string("preset", None, "With --preflight: a GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) "
                    "instead of --ckpt / --hf; no weights are read.")


def read_prompt() -> str:
    if FLAGS.prompt is not None and FLAGS.prompt_file is not None:
        raise ValueError("give --prompt or --prompt_file, not both")
    if FLAGS.prompt is not None:
        return FLAGS.prompt
    if FLAGS.prompt_file is not None:
        try:
            with open(FLAGS.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"--prompt_file {FLAGS.prompt_file}: {e.strerror}") from None
    if sys.stdin.isatty():
        print("reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read()


def report_speed(n: int, run_s: float, compile_s: float) -> None:
    rate = n / run_s if run_s > 0 else 0.0
    print(f"[{n} tokens in {run_s:.2f} s: {rate:.1f} tokens/s; compile {compile_s:.1f} s]", file=sys.stderr)


def print_stream(tokens, decode_token_bytes) -> None:
    """Writes each token's text as it comes; tokens/s to stderr at the end."""
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    n = 0
    for token in tokens:
        sys.stdout.write(text.decode(decode_token_bytes(token)))
        sys.stdout.flush()
        n += 1
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    report_speed(n, tokens.run_s, tokens.compile_s)


def preflight() -> None:
    """--preflight --topology NAME: generate's programs compiled for one TPU chip (gpt2_jax/inference/preflight.py)."""
    from gpt2_jax import topology

    if FLAGS.topology is None:
        raise ValueError("--preflight needs --topology NAME (a Cloud TPU type, e.g. v5e-1)")
    topology.prepare(FLAGS.topology)  # before jax loads
    if (FLAGS.preset is None) == (FLAGS.ckpt is None and FLAGS.hf is None):
        raise ValueError("--preflight needs one model: --preset NAME, --ckpt DIR or --hf DIR")
    from gpt2_jax.inference import preflight as preflight_lib
    from gpt2_jax.model.config import ModelConfig

    if FLAGS.preset is not None:
        if FLAGS.ckpt is not None or FLAGS.hf is not None:
            raise ValueError("--preset and --ckpt / --hf both name a model: give one")
        config = ModelConfig.from_preset(FLAGS.preset, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    else:
        from gpt2_jax.checkpoints import load_model

        config, _ = load_model(ckpt=FLAGS.ckpt, hf=FLAGS.hf, dtype=FLAGS.dtype)
    prompt_ids = None
    if FLAGS.prompt is not None or FLAGS.prompt_file is not None:
        from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer

        prompt_ids = get_tokenizer().encode(read_prompt(), allowed_special="all") or [EOT_ID]
    figures = preflight_lib.report(config, FLAGS.topology, prompt_ids=prompt_ids, max_new_tokens=FLAGS.max_new_tokens,
                                   num_samples=FLAGS.num_samples, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                   top_p=FLAGS.top_p)
    print(json.dumps(figures) if FLAGS.json else preflight_lib.format_report(figures))


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # keep library chatter (orbax, jax) off the terminal
    if FLAGS.preflight or FLAGS.topology is not None or FLAGS.preset is not None:
        if not FLAGS.preflight:
            raise ValueError("--topology and --preset need --preflight (generate.py samples from --ckpt or --hf)")
        return preflight()
    from gpt2_jax.checkpoints import check_source
    from gpt2_jax.inference.options import validate_sampling, validate_speculate

    # Cheap checks first, before jax loads, so a typo fails at once (a ValueError: one `error:` line).
    validate_sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                      num_samples=FLAGS.num_samples)
    if FLAGS.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 0")
    check_source(FLAGS.ckpt, FLAGS.hf)
    try:
        validate_speculate(FLAGS.speculate, has_draft=FLAGS.draft_ckpt is not None)
    except ValueError as e:
        raise ValueError(f"--{e}") from None

    from gpt2_jax import compilation_cache
    from gpt2_jax.checkpoints import load_model
    from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer
    from gpt2_jax.inference.sampling import PromptTooLongError, generate_with_stats, stream

    compilation_cache.enable(traced_programs=True)  # a second call loads prefill and decode, traced and compiled

    sampling = dict(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
        top_p=FLAGS.top_p, seed=FLAGS.seed, truncate=FLAGS.truncate, speculate=FLAGS.speculate,
    )
    try:  # a too-long prompt gets its own line; cli.run reports other ValueErrors and OSErrors
        prompt = read_prompt()
        enc = get_tokenizer()
        prompt_ids = enc.encode(prompt, allowed_special="all") or [EOT_ID]
        config, params = load_model(ckpt=FLAGS.ckpt, hf=FLAGS.hf, dtype=FLAGS.dtype)
        if FLAGS.draft_ckpt is not None:
            from gpt2_jax.inference.speculative import check_draft

            try:
                draft = load_model(ckpt=FLAGS.draft_ckpt, dtype=FLAGS.dtype)
                check_draft(config, draft[0])
            except (ValueError, OSError) as e:
                message = str(e).replace(f"--ckpt {FLAGS.draft_ckpt}", f"--draft_ckpt {FLAGS.draft_ckpt}", 1)
                if not message.startswith("--draft_ckpt"):
                    message = f"--draft_ckpt {FLAGS.draft_ckpt}: {e}"
                raise ValueError(message) from None
            sampling["draft"] = draft
        if config.vocab_size < enc.n_vocab:
            raise ValueError(
                f"the model's vocab_size={config.vocab_size} is smaller than the GPT-2 tokenizer's {enc.n_vocab}"
            )
        if FLAGS.num_samples == 1 and not FLAGS.json:
            live = stream(config, params, prompt_ids, eos_id=EOT_ID, **sampling)  # checks arguments now
        else:
            live = None
            result = generate_with_stats(
                config, params, [prompt_ids], num_samples=FLAGS.num_samples, eos_id=EOT_ID, **sampling
            )
    except PromptTooLongError as e:
        cli.fail(
            f"the prompt has {e.length} tokens but the model's context is {e.context} tokens "
            f"(at most {e.context - 1} prompt tokens); shorten it or pass --truncate left "
            f"(keeps its last {e.keep} tokens)"
        )

    if live is not None:
        sys.stdout.write(prompt)
        print_stream(live, enc.decode_single_token_bytes)
        return
    for i, new in enumerate(result.tokens):
        completion = enc.decode(new)
        if FLAGS.json:
            rate = len(new) / result.run_s if result.run_s > 0 else 0.0
            record = {"prompt": prompt, "completion": completion, "tokens": new, "tokens_per_s": rate}
            print(json.dumps(record), flush=True)
        else:
            print(f"{'-' * 20} sample {i + 1} {'-' * 20}\n{prompt}{completion}", flush=True)
    if not FLAGS.json:
        report_speed(sum(len(t) for t in result.tokens), result.run_s, result.compile_s)


if __name__ == "__main__":
    cli.run(main)
