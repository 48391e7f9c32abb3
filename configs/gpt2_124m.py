"""GPT-2 small (124M), the original recipe: ~0.5M tokens per step, 6e-4 peak LR, cosine to 6e-5.

For a TPU/GPU host with a web-scale corpus, e.g. the FineWeb token shards that llm.c and
modded-nanogpt publish (a header of 256 int32, then uint16 tokens), read as they are:

    python train.py --config configs/gpt2_124m.py \
        --config.data.source='/data/fineweb10B/fineweb_train_*.bin' \
        --config.data.val_source='/data/fineweb10B/fineweb_val_000000.bin'

Global batch 512 x 1024 = 524,288 tokens, reached with 8 micro-batches of 64 sequences. Compiled
for each slice by the TPU compiler on a CPU host (bench/tpu_table.py, BENCHMARKS.md), the micro-batch
per chip that fits with fsdp over the slice and no remat is about 26 on a v5e-8 and 49 on a v6e-8
with the chunked loss (config.model.loss_chunk, the default on TPU); with whole logits 13 and 23,
and 82 on a v5p-8, 27 on a v4-8 (v4 and v5p slices have 4 chips). So grad_accum_steps=8 fits all
four (8 sequences per chip on v5e-8 / v6e-8, 16 on v5p-8 / v4-8), and fewer passes fit on most:
--config.train.grad_accum_steps=4 on a v5e-8, =2 on a v6e-8 or a v5p-8. Check any other slice first:
    python train.py --config configs/gpt2_124m.py --preflight --topology v5e-8 --config.train.grad_accum_steps=4
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
