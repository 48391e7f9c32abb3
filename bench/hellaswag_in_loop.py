"""What config.train.hellaswag costs a training run: one in-loop HellaSwag eval, on this machine.

    python bench/hellaswag_in_loop.py                                   # configs/small.py, 1000 examples
    python bench/hellaswag_in_loop.py --hellaswag hellaswag_val.jsonl --examples 1000 --config configs/tiny.py
    python bench/hellaswag_in_loop.py --json

The scorer is the training loop's (gpt2_jax/training/hellaswag.py) on the config's mesh over this
machine's devices, with the config's freshly initialised parameters (the cost does not depend on
the weights). Without --hellaswag, a file in HellaSwag's format is synthesised from the built-in
Shakespeare corpus, its lengths drawn uniformly in GPT-2 tokens (context 20-90, endings 10-40,
CONTEXT_TOKENS / ENDING_TOKENS below: about HellaSwag's, so the cost is alike, though not the
same). Reported: building the scorer (reading, tokenising, the rows), the first eval (compiling
included), then the median of --repeats evals, wall clock and CPU seconds of this process.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench.cpu_facts import cpu_facts  # noqa: E402

flags.DEFINE_string("config", "configs/small.py", "Training config whose model, batch and mesh to use.")
flags.DEFINE_string("hellaswag", None, "A HellaSwag jsonl; default: synthesised (module docstring).")
flags.DEFINE_integer("examples", 1000, "Examples scored per eval (config.train.hellaswag_examples).")
flags.DEFINE_integer("repeats", 3, "Timed evals after the first.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
FLAGS = flags.FLAGS
# Synthesised lengths (GPT-2 tokens, uniform): about HellaSwag's, a sentence or two of context
# and a one-sentence ending.
CONTEXT_TOKENS = (20, 90)
ENDING_TOKENS = (10, 40)


def synthesise(path: str, n: int, seed: int = 0) -> None:
    """n HellaSwag-format records cut from Shakespeare's text, 4 endings each, lengths in GPT-2 tokens."""
    import numpy as np

    from gpt2_jax.data.corpus import shakespeare_files
    from gpt2_jax.data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    tokens = enc.encode(" ".join(" ".join(open(f, encoding="utf-8").read().split()) for f in shakespeare_files()[:4]))
    rng = np.random.default_rng(seed)

    def cut(lo: int, hi: int) -> str:
        k = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(tokens) - k))
        return enc.decode(tokens[start : start + k]).strip()

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            record = {"ind": i, "ctx": cut(*CONTEXT_TOKENS), "endings": [cut(*ENDING_TOKENS) for _ in range(4)],
                      "label": int(rng.integers(0, 4)), "split": "val", "source_id": "synthesised"}
            f.write(json.dumps(record) + "\n")


def main(argv) -> None:
    del argv
    import importlib.util

    import jax

    from gpt2_jax.model.scoring import choice_rows, row_length
    from gpt2_jax.training import hellaswag as hellaswag_lib
    from gpt2_jax.training import run as run_lib
    from gpt2_jax.training import sharding

    spec = importlib.util.spec_from_file_location("bench_config", FLAGS.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    path = FLAGS.hellaswag
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="hellaswag_bench_"), "synthesised.jsonl")
        synthesise(path, FLAGS.examples)
    run = run_lib.run_from_config(config, sharding.make_mesh(config.mesh))
    state = run_lib.create_train_state(run)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    scorer, build_s, _ = timed(lambda: hellaswag_lib.HellaSwagEval(run, path, FLAGS.examples))
    scores, first_s, _ = timed(lambda: scorer(state.params))
    runs = [timed(lambda: scorer(state.params)) for _ in range(FLAGS.repeats)]
    rows = choice_rows(scorer.examples, config.model.block_size)
    own = rows.positions.shape[1] - (rows.positions < 0).sum(axis=1)
    lengths = sorted({row_length(int(n), config.model.block_size) for n in own})
    steps = sum(-(-int(sum(row_length(int(n), config.model.block_size) == L for n in own)) // scorer.rows_per_step(L))
                for L in lengths)
    result = {
        "config": FLAGS.config, "examples": len(scorer.examples), "rows": len(own),
        "mean_row_tokens": float(own.mean()), "row_lengths": lengths, "steps": steps,
        "synthesised": FLAGS.hellaswag is None,
        "build_s": build_s, "first_eval_s": first_s,
        "eval_s": statistics.median(r[1] for r in runs), "eval_cpu_s": statistics.median(r[2] for r in runs),
        "accuracy": scores["hellaswag_acc"], "devices": jax.device_count(), **cpu_facts(),
    }
    if FLAGS.json:
        print(json.dumps(result))
        return
    print(f"{result['examples']} examples ({len(own)} rows of {own.mean():.0f} tokens on average, padded to "
          f"{lengths}; {steps} steps) with {FLAGS.config} "
          f"on {jax.device_count()} {jax.devices()[0].platform} device(s)"
          + (" (synthesised file)" if result["synthesised"] else ""))
    print(f"  build {build_s:.1f} s, first eval {first_s:.1f} s (compiling included), then "
          f"{result['eval_s']:.1f} s per eval (median of {FLAGS.repeats}; {result['eval_cpu_s']:.1f} CPU s)")


if __name__ == "__main__":
    app.run(main)
