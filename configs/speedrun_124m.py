"""GPT-2 small (124M) with the modern recipe, for one 8-device GPU or TPU host, aiming at the
speedrun's target: 3.28 validation loss on FineWeb (the llm.c / modded-nanogpt token shards).

    python train.py --config configs/speedrun_124m.py \
        --config.data.source='/data/fineweb10B/fineweb_train_*.bin' \
        --config.data.val_source='/data/fineweb10B/fineweb_val_000000.bin'

The model is GPT-2 small's shape with the modern switches (configs/speedrun_cpu.py measures each
at CPU scale): Muon on the blocks' matrices, QK-norm, ReLU^2, RMSNorm, an untied zero-initialised
head, zero-initialised output projections, a logit soft-cap of 30, warmup-stable-decay. Rates follow
the published modded-nanogpt runs of this architecture (Muon 0.05, momentum 0.95; AdamW betas
0.8 / 0.95 for the rest) scaled to our AdamW groups.

Not run here: no accelerator was available to this project when it was written, so whether it
reaches 3.28, and in how many tokens, is unmeasured. The budget is the early Muon records' (about
3.1B tokens: 6,000 steps of 512 x 1024); validation runs every 250 steps over 10.5M tokens, so the
first evaluation at or below 3.28 is the result to read from metrics.jsonl.
"""

from configs import base
from configs.speedrun_cpu import MODERN_MODEL


def get_config():
    c = base.get_config()
    m, t = c.model, c.train
    m.preset = "gpt2"
    m.block_size = 1024
    m.dtype = "bfloat16"  # compute; parameters and optimizer state stay fp32
    m.update(MODERN_MODEL)

    t.optimizer = "muon"
    t.muon_learning_rate = 0.05
    t.muon_momentum = 0.95
    t.learning_rate = 0.008  # the untied head (and any group left at None)
    t.embed_learning_rate = 0.3
    t.scalar_learning_rate = 0.04
    t.adam_b1, t.adam_b2, t.adam_eps = 0.8, 0.95, 1e-10
    t.weight_decay = 0.0
    t.min_lr = 0.0
    t.lr_schedule = "wsd"
    t.decay_fraction = 0.4
    t.warmup_steps = 50
    t.num_steps = 6_000  # 3.1B tokens
    t.global_batch_size = 512  # 524,288 tokens a step
    # Replicated state (data parallel) and an untied head take more memory than configs/gpt2_124m.py: the TPU
    # compiler fits about 6 sequences per chip on a v5e-8, 15 on a v6e-8 or a v4-8, 47 on a v5p-8
    # (BENCHMARKS.md; whole logits: the chunked loss, now the default, leaves more room). 16 micro-batches fit
    # all of them (4 sequences per chip on 8 chips, 8 on the 4 chips of a v4-8 / v5p-8); =4 on a v5p-8, =8 on a
    # v6e-8 run fewer passes.
    t.grad_accum_steps = 16
    t.eval_every = 250
    t.eval_steps = 20  # 20 x 512 x 1024 = 10.5M validation tokens
    t.log_every = 10
    t.checkpoint_every = 1000
    c.mesh.data = -1  # 124M fits every device: plain data parallelism
    c.mesh.fsdp = 1
    return c
