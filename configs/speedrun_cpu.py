"""The CPU speedrun: GPT-2's recipe against the modern one at one small model, same data, seed and
token budget. bench/speedrun.py trains both (each in its own process) and compares them.

    python train.py --config configs/speedrun_cpu.py:baseline --workdir /tmp/sr_base
    python train.py --config configs/speedrun_cpu.py:modern --workdir /tmp/sr_modern
    python bench/speedrun.py            # both, the ratios and the plot (BENCHMARKS.md has the figures)

`baseline` is GPT-2's recipe: AdamW, warmup + cosine, tanh GELU, LayerNorm, tied head, N(0, 0.02)
init with depth-scaled residual projections. `modern` switches on Muon for the blocks' matrices,
QK-norm, ReLU^2, RMSNorm, an untied head, a logit soft-cap, zero-initialised output projections and
a warmup-stable-decay schedule. Learning rates were swept for each recipe on this corpus
(BENCHMARKS.md, "Speedrun"); each recipe here carries its best.
"""

import ml_collections

from configs import base

RECIPES = ("baseline", "modern")
# The modern recipe's model switches (configs/speedrun_124m.py uses the same).
MODERN_MODEL = dict(norm="rmsnorm", qk_norm=True, mlp_activation="relu2", tie_embeddings=False, logit_softcap=30.0,
                    zero_init_proj=True)


def get_config(recipe: str = "baseline") -> ml_collections.ConfigDict:
    if recipe not in RECIPES:
        raise ValueError(f"configs/speedrun_cpu.py: recipe {recipe!r} must be one of {RECIPES} "
                         f"(e.g. --config configs/speedrun_cpu.py:modern)")
    c = base.get_config()
    m, t = c.model, c.train
    m.n_layer, m.n_head, m.n_embd = 4, 4, 128
    m.block_size = 64
    m.scan_layers = False  # on a CPU the unrolled step runs faster; 4 layers compile fast
    t.global_batch_size = 8
    # 8 x 64 x 300 = 154k tokens, a tenth of a pass over the training split (1.45M tokens). At this
    # width the tied head's 6 x 50304 x 128 FLOPs are 90% of a token's cost.
    t.num_steps = 300
    t.warmup_steps = 20
    t.seed = 0
    t.eval_every = 25
    t.eval_steps = 16  # the same 128 validation windows (8k tokens) at every evaluation
    t.log_every = 1  # every step's time: bench/speedrun.py sums the training steps' wall-clock
    t.checkpoint_every = 0  # the final checkpoint only
    t.sample_tokens = 0
    if recipe == "baseline":
        t.learning_rate = 6e-3  # swept: 3e-3 and 1.2e-2 end higher (BENCHMARKS.md)
        t.min_lr = 6e-4
        return c

    m.update(MODERN_MODEL)
    t.optimizer = "muon"
    t.muon_learning_rate = 0.02
    t.learning_rate = 3e-3  # the AdamW groups: embeddings, head, biases and gains
    t.min_lr = 0.0
    t.lr_schedule = "wsd"
    t.decay_fraction = 0.4
    return c
