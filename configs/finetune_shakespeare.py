"""Fine-tune OpenAI's GPT-2 small (124M) on the built-in Shakespeare corpus.

    python train.py --config configs/finetune_shakespeare.py --config.model.init_from=DIR
    python generate.py --ckpt workdir/finetune_shakespeare --prompt "ROMEO:"

DIR is any Hugging Face GPT-2 folder (config.json + model.safetensors; docs/finetune.md
says how to get one), or a gpt2-jax workdir. The folder decides the architecture, so a larger GPT-2
works too (lower global_batch_size or raise grad_accum_steps if it does not fit). On several devices
add --config.mesh.fsdp=-1 --config.mesh.data=1 to shard the weights and optimizer state.

The recipe: a small constant learning rate (the pretrained weights are already good; a large step
or a warmup from zero wastes them), dropout against overfitting a 1 MB corpus, and frequent evals
to stop when validation loss turns up. 256-token windows crop GPT-2's 1024-position table: the
play's lines are short, and a step costs a quarter.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.init_from = "hf/gpt2"  # the folder docs/finetune.md's download line writes; override with a path
    c.model.block_size = 256
    c.model.dropout = 0.1
    c.train.num_steps = 300
    c.train.global_batch_size = 8
    c.train.learning_rate = 3e-5
    c.train.min_lr = 3e-5  # = learning_rate: constant
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0  # no pull towards zero on pretrained weights
    c.train.eval_every = 25
    c.train.eval_steps = 8
    c.train.log_every = 5
    c.train.checkpoint_every = 100
    c.train.sample_prompt = "ROMEO:"
    c.train.sample_tokens = 64
    return c
