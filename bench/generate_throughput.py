"""Decoding throughput: gpt2_jax.sampling vs Hugging Face `generate(use_cache=True)`, same weights.

    python bench/generate_throughput.py [--batch_sizes 1,8] [--prompt_len 32] [--new_tokens 128] [--json]

Both sides get the GPT-2 small shape (124M, GPT2Config() defaults) with one random
initialisation, saved by transformers' save_pretrained and read by gpt2_jax.hf.load_hf_gpt2,
the same random prompts, greedy decoding and exactly --new_tokens new tokens per row (no stop
at <|endoftext|>). Each side runs once to warm up (compilation, allocator), then the two sides
take turns for --repeats timed runs each (so a change in machine load hits both); the best run
is reported as new tokens per second (batch x new_tokens / wall time of the whole generate
call, prefill included). Needs torch and transformers.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side after the warm-up; the fastest counts.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the prompts.")
flags.DEFINE_bool("json", False, "Print one JSON object per batch size instead of a table.")


def best_times(fns, repeats: int) -> list[tuple[float, object]]:
    """(fastest wall time, output) of each function: one warm-up each, then timed runs in turn."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_jax.hf import load_hf_gpt2
    from gpt2_jax.sampling import generate

    torch.manual_seed(FLAGS.seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.generation_config.eos_token_id = None  # always exactly new_tokens tokens, like eos_id=None below
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        config, params = load_hf_gpt2(folder)
    rng = np.random.default_rng(FLAGS.seed)
    N = FLAGS.new_tokens
    print(f"GPT-2 124M fp32, prompt {FLAGS.prompt_len}, {N} new tokens, greedy; "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    for batch_size in map(int, FLAGS.batch_sizes):
        prompts = rng.integers(0, config.vocab_size, (batch_size, FLAGS.prompt_len))

        def ours():
            return generate(config, params, prompts.tolist(), max_new_tokens=N, temperature=0, eos_id=None)

        def theirs():
            ids = torch.as_tensor(prompts)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                  max_new_tokens=N, min_new_tokens=N)
            return out[:, FLAGS.prompt_len :].tolist()

        (t_ours, tokens_ours), (t_hf, tokens_hf) = best_times([ours, theirs], FLAGS.repeats)
        # Random 0.02-scale weights give near-uniform logits, so fp rounding may flip a near-tie:
        # agreement is reported, not required (tests/test_generate_cli.py checks exact parity).
        agree = float(np.mean([a == b for x, y in zip(tokens_ours, tokens_hf) for a, b in zip(x, y)]))
        record = {
            "batch_size": batch_size,
            "prompt_len": FLAGS.prompt_len,
            "new_tokens": N,
            "ours_tokens_per_s": batch_size * N / t_ours,
            "hf_tokens_per_s": batch_size * N / t_hf,
            "speedup": t_hf / t_ours,
            "token_agreement": agree,
        }
        if FLAGS.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"batch {batch_size:3d}: gpt2_jax {record['ours_tokens_per_s']:8.1f} tok/s | "
                  f"HF generate {record['hf_tokens_per_s']:8.1f} tok/s | ours/HF {record['speedup']:.2f}x | "
                  f"greedy tokens agree {agree:.0%}", flush=True)


if __name__ == "__main__":
    app.run(main)
