"""Optimizers and learning-rate schedules.

Two optimizers (`config.train.optimizer`):
  'adamw'  GPT-2's: AdamW on every parameter (weight decay on matmul kernels and embeddings only).
  'muon'   Muon (optax.contrib.scale_by_muon: momentum, then Newton-Schulz orthogonalisation) on the
           blocks' hidden matrices - q, k/v, the attention output, the MLP's fc and proj - and
           AdamW on the rest: embeddings, an untied head, biases and norm gains.

Every parameter belongs to one group (`param_group`): hidden | embed | head | scalar. Each group has
its own peak learning rate (config.train keys; None = learning_rate) on one shared schedule shape,
so one warmup and one decay move them all. Global-norm clipping comes first, on the whole gradient.

Muon needs each hidden kernel as the matrix it is: `muon_dimension_numbers` names its reduction
(input) and output axes; the other axes (the stacked layer axis, the k/v pair) are batch axes,
orthogonalised one matrix each. optax's default would treat every 2-D leaf as a matrix, the
embeddings and the head included, which is why the numbers are given explicitly.

Gradient accumulation is not here: the train step averages micro-batch gradients itself (a
`lax.scan`), so one call of the optimizer is one optimizer step and its state never holds an
extra gradient-sized buffer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from gpt2_jax.training.run_config import LR_SCHEDULES, OPTIMIZERS, TrainConfig  # noqa: F401 - also here

GROUPS = ("hidden", "embed", "head", "scalar")
# config.train key of each group's peak learning rate (None there = learning_rate).
GROUP_LR_KEYS = {"hidden": "learning_rate", "embed": "embed_learning_rate", "head": "head_learning_rate",
                 "scalar": "scalar_learning_rate"}

# Weight decay by leaf NAME, not ndim: stacked layers give biases and LayerNorm params ndim 2-3.
# As in GPT-2 / nanoGPT, decay the matmul kernels and the (tied) token/position embeddings; leave
# biases and LayerNorm scales alone (decaying them only pulls the model off its normalisation).
DECAYED_LEAVES = frozenset({"kernel", "embedding"})
UNDECAYED_LEAVES = frozenset({"bias", "scale"})


def make_schedule(train_cfg: Any, num_steps: int | None = None) -> optax.Schedule:
    """Learning rate (of config.train.learning_rate's group) at each optimizer step (0-based).

    Linear warmup 0 -> learning_rate over warmup_steps (step 0 has lr 0), then
      cosine: a half cosine from learning_rate down to min_lr at step `num_steps`;
      wsd:    warmup-stable-decay: learning_rate until the last decay_fraction of the steps, then a
              straight line down to min_lr at step `num_steps`;
    constant min_lr after. `num_steps` defaults to train_cfg.num_steps (the trainer passes the real
    count when training by epochs).
    """
    train_cfg = TrainConfig.of(train_cfg)  # checked there (run_config.py)
    total = train_cfg.num_steps if num_steps is None else num_steps
    peak, floor, warmup = float(train_cfg.learning_rate), float(train_cfg.min_lr), train_cfg.warmup_steps
    kind, fraction = train_cfg.lr_schedule, train_cfg.decay_fraction
    if not isinstance(total, int) or total <= 0:
        raise ValueError(f"num_steps={total!r} must be a positive integer")
    decay_steps = max(total - warmup, 1)
    cooldown = max(round(fraction * total), 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        if kind == "cosine":
            progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            after = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            after = floor + (peak - floor) * jnp.clip((total - step) / cooldown, 0.0, 1.0)
        return jnp.where(step < warmup, warm, after)

    return schedule


def _name(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _where(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def decay_mask(params: Any) -> Any:
    """Tree of bools, True where weight decay applies (leaves named kernel / embedding).

    Works on plain or boxed (nn.Partitioned) trees. An unknown leaf name raises, so a new
    parameter kind gets a deliberate decision instead of a silent default.
    """

    def decide(path, _):
        name = _name(path)[-1]
        if name in DECAYED_LEAVES:
            return True
        if name in UNDECAYED_LEAVES:
            return False
        raise ValueError(
            f"decay_mask: parameter {_where(path)} has leaf name "
            f"{name!r}; add it to DECAYED_LEAVES or UNDECAYED_LEAVES in gpt2_jax/training/optim.py"
        )

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


# The blocks' hidden kernels, stacked along a leading layer axis, by module path -> (reduction axes,
# output axes); every other axis is a batch axis. Shapes: q [L, E, N, H], kv [L, E, 2, K, H],
# out [L, N, H, E], fc [L, E, F], proj [L, F, E].
_HIDDEN = {
    ("attn", "q"): ((1,), (2, 3)),  # E -> all query heads: one E x (N H) matrix per layer
    ("attn", "kv"): ((1,), (3, 4)),  # E -> the kv heads, k and v apart
    ("attn", "out"): ((1, 2), (3,)),  # all heads -> E
    ("mlp", "fc"): ((1,), (2,)),
    ("mlp", "proj"): ((1,), (2,)),
}
# muon_split_heads: each head's own slice is the matrix (its head axis becomes a batch axis).
_HIDDEN_PER_HEAD = {
    ("attn", "q"): ((1,), (3,)),  # E -> H, per query head
    ("attn", "kv"): ((1,), (4,)),  # E -> H, per kv head, k and v apart
    ("attn", "out"): ((2,), (3,)),  # H -> E, per head
}


def param_group(path) -> str:
    """'hidden' (matmul kernels), 'embed' (wte, wpe), 'head' (an untied lm_head) or 'scalar' (biases
    and norm gains). An unknown parameter raises, as in decay_mask; Muon takes only the kernels
    `muon_dimension_numbers` knows, and raises for any other."""
    names = _name(path)
    if names[0] in ("wte", "wpe"):
        return "embed"
    if names[0] == "lm_head":
        return "head"
    if names[-1] in UNDECAYED_LEAVES:
        return "scalar"
    if names[-1] == "kernel":
        return "hidden"
    raise ValueError(f"param_group: parameter {_where(path)} belongs to no group; add it in gpt2_jax/training/optim.py")


def param_groups(params: Any) -> Any:
    """The tree of `param_group` labels, for optax.multi_transform."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)


def muon_dimension_numbers(params: Any, split_heads: bool = False) -> Any:
    """MuonDimensionNumbers for each hidden kernel (see _HIDDEN). Other leaves - including ones
    optax.multi_transform has masked out (MaskedNode, which has no leaves) - are not Muon's, and a
    leaf here that is not a known hidden kernel raises rather than being orthogonalised as 2-D."""

    def numbers(path, leaf):
        names = _name(path)
        module = names[1:-1]
        if names[0] != "blocks" or names[-1] != "kernel" or module not in _HIDDEN:
            raise ValueError(f"muon_dimension_numbers: {_where(path)} is not one of the blocks' hidden kernels")
        reduction, output = (_HIDDEN_PER_HEAD if split_heads and module in _HIDDEN_PER_HEAD else _HIDDEN)[module]
        if leaf.ndim != 1 + max(reduction + output):
            raise ValueError(f"muon_dimension_numbers: {_where(path)} has shape {leaf.shape}, expected "
                             f"{1 + max(reduction + output)} axes")
        return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)

    return jax.tree_util.tree_map_with_path(numbers, params)


def scale_by_group_lr(schedules: dict[str, optax.Schedule]) -> optax.GradientTransformation:
    """updates * -lr(step) with each leaf's group's schedule: optax.scale_by_learning_rate, per group.

    Its state is optax's ScaleByScheduleState, so with one group an AdamW built on it has the very
    state (and numerics) of optax.adamw.
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        rates = {g: s(state.count) for g, s in schedules.items()}
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: (-rates[param_group(p)] * u).astype(u.dtype), updates)
        return scaled, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def group_schedules(train_cfg: Any, schedule: optax.Schedule, groups: tuple[str, ...]) -> dict[str, optax.Schedule]:
    """Each group's schedule: `schedule`'s shape scaled to the group's peak learning rate."""
    base = float(train_cfg.learning_rate)
    out = {}
    for group in groups:
        key = GROUP_LR_KEYS[group] if group != "hidden" or train_cfg.optimizer != "muon" else "muon_learning_rate"
        peak = train_cfg[key]
        peak = base if peak is None else float(peak)  # >= 0: TrainConfig.validate
        out[group] = schedule if peak == base else (lambda s, r=peak / base: schedule(s) * r)
    return out


def _scale_by_width(dims) -> optax.GradientTransformation:
    """Each orthogonalised update times sqrt(max(1, fan_out / fan_in)) (Jordan et al.'s Muon): an
    orthogonal update's RMS is sqrt(1 / max(fan_in, fan_out)), so wide-output matrices move less
    per unit learning rate without it."""

    def update(updates, state, params=None):
        del params

        def scale(u, d):
            fan_in = math.prod(u.shape[a] for a in d.reduction_axis)
            fan_out = math.prod(u.shape[a] for a in d.output_axis)
            return u * max(1.0, fan_out / fan_in) ** 0.5

        return jax.tree.map(scale, updates, dims(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw(train_cfg: Any, schedules: dict[str, optax.Schedule]) -> optax.GradientTransformation:
    """optax.adamw's three stages, with a learning rate per group."""
    return optax.chain(
        optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps),
        optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
        scale_by_group_lr(schedules),
    )


def make_optimizer(train_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping (grad_clip; 0 disables), then AdamW or Muon + AdamW (see the module doc)."""
    train_cfg = TrainConfig.of(train_cfg)  # checked there (run_config.py)
    clip, kind = train_cfg.grad_clip, train_cfg.optimizer
    # identity() keeps the state's structure the same whatever grad_clip is, so checkpoints restore.
    clipping = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    if kind == "adamw":
        return optax.chain(clipping, _adamw(train_cfg, group_schedules(train_cfg, schedule, GROUPS)))

    momentum = train_cfg.muon_momentum
    dims = lambda tree: muon_dimension_numbers(tree, train_cfg.muon_split_heads)  # noqa: E731
    muon = optax.chain(
        optax.contrib.scale_by_muon(beta=momentum, weight_dimension_numbers=dims),
        _scale_by_width(dims),
        optax.add_decayed_weights(train_cfg.muon_weight_decay),
        optax.scale_by_learning_rate(group_schedules(train_cfg, schedule, ("hidden",))["hidden"]),
    )
    rest = _adamw(train_cfg, group_schedules(train_cfg, schedule, ("embed", "head", "scalar")))
    return optax.chain(clipping, optax.multi_transform(
        {"muon": muon, "adamw": rest},
        lambda params: jax.tree.map(lambda g: "muon" if g == "hidden" else "adamw", param_groups(params)),
    ))
