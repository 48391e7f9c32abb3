"""A small GPT on the built-in Shakespeare corpus: the quickstart, within 5 minutes on a 2-core CPU.

    python train.py --config configs/small.py
    python generate.py --ckpt workdir/small --prompt "ROMEO:"
    python train.py --config configs/small.py:gpt2 --workdir workdir/small_gpt2   # GPT-2's own recipe

The default is the recipe that won the CPU speedrun (configs/speedrun_cpu.py:modern, BENCHMARKS.md):
Muon on the blocks' matrices with a warmup-stable-decay schedule, RMSNorm, QK-norm, ReLU^2, an
untied head, a logit soft-cap and zero-initialised output projections, at the speedrun's shape
(4 layers x 128 wide, 64-token windows, 8 a step), trained for 550 steps (282k tokens, a fifth of a
pass over the training split). `:gpt2` keeps the shape and budget with GPT-2's recipe (AdamW,
warmup + cosine, GELU, LayerNorm, tied head) at its best swept learning rate. README says what each
measured. At this width the head's 6 x 50304 x 128 FLOPs are most of a token's cost, so a wider
model learns more per step but fewer steps fit in the time.
"""

import ml_collections

from configs import speedrun_cpu

RECIPES = {"modern": "modern", "gpt2": "baseline"}


def get_config(recipe: str = "modern") -> ml_collections.ConfigDict:
    if recipe not in RECIPES:
        raise ValueError(f"configs/small.py: recipe {recipe!r} must be one of {sorted(RECIPES)} "
                         "(e.g. --config configs/small.py:gpt2)")
    c = speedrun_cpu.get_config(RECIPES[recipe])
    t = c.train
    t.num_steps = 550
    t.eval_every = 550  # once, at the end: every eval costs seconds here
    t.eval_steps = 16
    t.log_every = 10
    t.checkpoint_every = 0  # the final checkpoint only
    t.sample_tokens = 64
    return c
