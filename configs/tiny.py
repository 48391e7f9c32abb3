"""A very small model and run, for tests and quick checks (seconds on a CPU).

    python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.n_layer = 2
    c.model.n_head = 4
    c.model.n_embd = 32
    c.model.block_size = 32
    c.model.pad_vocab_to_multiple = 64
    c.train.num_steps = 20
    c.train.global_batch_size = 8
    c.train.learning_rate = 3e-3
    c.train.min_lr = 3e-4
    c.train.warmup_steps = 5
    c.train.eval_every = 10
    c.train.eval_steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 10
    c.train.sample_tokens = 0
    return c
