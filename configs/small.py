"""A small GPT on the built-in Shakespeare corpus: trains in about 5 minutes on a 2-core CPU.

    python train.py --config configs/small.py
    python generate.py --ckpt workdir/small --prompt "ROMEO:"
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 192
    c.model.block_size = 128
    c.model.scan_layers = False  # on a CPU the unrolled step runs ~10% faster; 4 layers compile fast
    c.train.num_steps = 200
    c.train.global_batch_size = 16
    c.train.learning_rate = 2e-3  # small models take a larger step than GPT-2's 6e-4
    c.train.min_lr = 2e-4
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.train.eval_steps = 10
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.sample_prompt = "ROMEO:"
    c.train.sample_tokens = 48
    return c
