"""GPT-2 small (124M), the original recipe: ~0.5M tokens per step, 6e-4 peak LR, cosine to 6e-5.

For a TPU/GPU host with a web-scale corpus, e.g. the FineWeb token shards that llm.c and
modded-nanogpt publish (a header of 256 int32, then uint16 tokens), read as they are:

    python train.py --config configs/gpt2_124m.py \
        --config.data.source='/data/fineweb10B/fineweb_train_*.bin' \
        --config.data.val_source='/data/fineweb10B/fineweb_val_000000.bin'

Global batch 512 x 1024 = 524,288 tokens, reached with 8 micro-batches of 64 sequences
(raise grad_accum_steps if a micro-batch does not fit, lower it on a large slice).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.model.block_size = 1024
    c.model.dtype = "bfloat16"  # compute; parameters and AdamW state stay fp32
    c.train.num_steps = 19_073  # ~10B tokens
    c.train.global_batch_size = 512
    c.train.grad_accum_steps = 8
    c.train.learning_rate = 6e-4
    c.train.min_lr = 6e-5
    c.train.warmup_steps = 715
    c.train.weight_decay = 0.1
    c.train.eval_every = 250
    c.train.eval_steps = 20
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # shard params and optimizer state over every device
    return c
