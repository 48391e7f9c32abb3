"""Optimizer: AdamW with a weight-decay mask, global-norm clipping, linear warmup + cosine decay.

Gradient accumulation is not here: the train step averages micro-batch gradients itself (a
`lax.scan`), so one call of the optimizer is one optimizer step and its state never holds an
extra gradient-sized buffer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Weight decay by leaf NAME, not ndim: stacked layers give biases and LayerNorm params ndim 2-3.
# As in GPT-2 / nanoGPT, decay the matmul kernels and the (tied) token/position embeddings; leave
# biases and LayerNorm scales alone (decaying them only pulls the model off its normalisation).
DECAYED_LEAVES = frozenset({"kernel", "embedding"})
UNDECAYED_LEAVES = frozenset({"bias", "scale"})


def make_schedule(train_cfg: Any, num_steps: int | None = None) -> optax.Schedule:
    """Learning rate at each optimizer step (0-based).

    Linear warmup 0 -> learning_rate over warmup_steps (step 0 has lr 0), then a half cosine from
    learning_rate down to min_lr at step `num_steps`, constant min_lr after. `num_steps` defaults
    to train_cfg.num_steps (the trainer passes the real count when training by epochs).
    """
    total = train_cfg.num_steps if num_steps is None else num_steps
    peak, floor, warmup = float(train_cfg.learning_rate), float(train_cfg.min_lr), train_cfg.warmup_steps
    if not isinstance(total, int) or total <= 0:
        raise ValueError(f"num_steps={total!r} must be a positive integer")
    # warmup_steps > num_steps is allowed: a short (smoke-test) run then ends inside the warmup.
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"config.train.warmup_steps={warmup!r} must be a non-negative integer")
    if not 0.0 <= floor <= peak:
        raise ValueError(f"config.train.min_lr={floor} must be in [0, learning_rate={peak}]")
    decay_steps = max(total - warmup, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """Tree of bools, True where weight decay applies (leaves named kernel / embedding).

    Works on plain or boxed (nn.Partitioned) trees. An unknown leaf name raises, so a new
    parameter kind gets a deliberate decision instead of a silent default.
    """

    def decide(path, _):
        name = path[-1].key
        if name in DECAYED_LEAVES:
            return True
        if name in UNDECAYED_LEAVES:
            return False
        raise ValueError(
            f"decay_mask: parameter {jax.tree_util.keystr(path, simple=True, separator='/')} has leaf name "
            f"{name!r}; add it to DECAYED_LEAVES or UNDECAYED_LEAVES in gpt2_jax/training/optim.py"
        )

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(train_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping (grad_clip; 0 disables), then AdamW on `schedule` (see make_schedule)."""
    clip = train_cfg.grad_clip
    if clip < 0:
        raise ValueError(f"config.train.grad_clip={clip} must be >= 0 (0 disables clipping)")
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=train_cfg.adam_b1,
        b2=train_cfg.adam_b2,
        eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay,
        mask=decay_mask,
    )
    # identity() keeps the state's structure the same whatever grad_clip is, so checkpoints restore.
    clipping = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    return optax.chain(clipping, adamw)
