"""A small GPT on the built-in Shakespeare corpus: the quickstart, about 75 s on a 2-core CPU.

    python train.py --config configs/small.py
    python generate.py --ckpt workdir/small --prompt "ROMEO:"

Measured (README): 2-core AMD EPYC with AVX-512 (a jitted fp32 2048^3 matmul at ~280 GFLOP/s),
first run, compilation and corpus preparation included. Tuned for the lowest validation loss in
that time: per token, the tied head's 6 x 50257 x n_embd FLOPs dominate the step, so a wider
model costs little more than a narrower one (256 learns faster per second than 128 or 192; 384
is ~40% slower a step), and with so few tokens small batches win (batch 2 x 400 steps beat
4 x 200 and 8 x 100 at equal tokens). Longer runs learn the play's shape: raise num_steps.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 256
    c.model.block_size = 128
    c.model.scan_layers = False  # on a CPU the unrolled step runs ~10% faster; 4 layers compile fast
    c.train.num_steps = 250
    c.train.global_batch_size = 2
    c.train.learning_rate = 4e-3  # small models take a larger step than GPT-2's 6e-4 (3e-3..1.2e-2 swept)
    c.train.min_lr = 4e-4
    c.train.warmup_steps = 10
    c.train.eval_every = 250  # once, at the end: every eval costs seconds here
    c.train.eval_steps = 16
    c.train.log_every = 10
    c.train.checkpoint_every = 0  # the final checkpoint only
    c.train.sample_tokens = 48
    return c
