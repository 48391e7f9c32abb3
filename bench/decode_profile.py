"""Where a decode token's time goes: jax.profiler's per-op timings of `generate`, grouped by kind.

    python bench/decode_profile.py                    # GPT-2 124M, batch 1, 32-token prompt, 128 new tokens
    python bench/decode_profile.py --batch_size 8 --top 15
    python bench/decode_profile.py --json             # one JSON object

Random 124M weights (only time matters), fp32, greedy. One warm-up call (compiles), then a
profiled call. XLA:CPU records each op it runs (a "thunk": a matmul, a fusion, a copy); ops are
grouped by their HLO name without the numeric suffix (`dot.712` -> `dot`, `copy_bitcast_fusion.3`
-> `copy_bitcast_fusion`) and their summed time is shown per new token (prefill included), with the
wall time of the call. `dot` is every matmul: the weights' matrix-vector products, the head's and
attention's; `copy*` ops are copies XLA inserted (a cache copied, an operand transposed).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 1, "Rows decoded together.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("top", 12, "Op kinds to list.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def op_times(trace_dir: str) -> dict[str, tuple[int, float]]:
    """{op kind: (count, seconds)} of the XLA ops in a jax.profiler perfetto trace."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        name = e.get("name", "")
        # Complete events of XLA ops; Python frames start with '$', runtime spans name the runtime.
        if e.get("ph") != "X" or name.startswith(("$", "end:")) or re.search(r"Execute|Pjit|Await|block_until", name):
            continue
        kind = re.sub(r"[.\d]+$", "", name)
        kinds[kind][0] += 1
        kinds[kind][1] += e["dur"] / 1e6
    return {k: (n, s) for k, (n, s) in kinds.items()}


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from gpt2_jax.inference import sampling
    from gpt2_jax.model.config import ModelConfig
    from gpt2_jax.model.gpt2 import GPT2

    config = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    params = nn.meta.unbox(jax.jit(lambda key: GPT2(config).init(key, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.key(0)))
    B, N = FLAGS.batch_size, FLAGS.new_tokens
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (B, FLAGS.prompt_len)).tolist()

    def call():
        return sampling.generate_with_stats(config, params, prompts, max_new_tokens=N, temperature=0, eos_id=None)

    call()  # compiles
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run = call()
        wall = time.perf_counter() - start
        kinds = op_times(trace_dir)
    total = sum(s for _, s in kinds.values())
    rows = sorted(kinds.items(), key=lambda kv: -kv[1][1])
    record = {
        "batch_size": B, "prompt_len": FLAGS.prompt_len, "new_tokens": N, "run_s": run.run_s,
        "wall_s_profiled": wall, "ops_s": total, "ms_per_token_ops": 1e3 * total / N,
        "kinds": {k: {"count": n, "ms_per_token": 1e3 * s / N, "ops_per_token": n / N} for k, (n, s) in rows},
    }
    if FLAGS.json:
        print(json.dumps(record))
        return
    print(f"GPT-2 124M fp32, batch {B}, prompt {FLAGS.prompt_len}, {N} new tokens: the call ran {run.run_s:.2f} s "
          f"({1e3 * run.run_s / N:.1f} ms a token; profiled: {wall:.2f} s); XLA ops {1e3 * total / N:.1f} ms a token")
    print(f"{'op kind':<36} {'ms / token':>10} {'ops / token':>12}")
    for k, (n, s) in rows[: FLAGS.top]:
        print(f"{k:<36} {1e3 * s / N:>10.2f} {n / N:>12.1f}")


if __name__ == "__main__":
    app.run(main)
