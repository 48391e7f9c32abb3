"""GPT-2: token (+ learned position) embeddings, a stack of blocks (remat policies), final norm, tied (or untied)
head. GPT2Hidden: the same model up to the head, for the chunked loss (loss.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.layers import ACT_EMBED, ACTIVATION_AXES, Block, layer_norm, param_init


def _table(cfg: ModelConfig, rows: int, row_axis: str, name: str | None, std: float = 0.02) -> nn.Embed:
    return nn.Embed(
        num_embeddings=rows,
        features=cfg.n_embd,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=param_init(std, (row_axis, "embed")),
        name=name,
    )


def token_embedding(cfg: ModelConfig, name: str | None = "wte") -> nn.Embed:
    """wte: [padded_vocab, E], also the (tied) output head."""
    return _table(cfg, cfg.padded_vocab_size, "vocab", name)


def output_head(cfg: ModelConfig, wte: nn.Embed, name: str | None = "lm_head") -> nn.Embed:
    """The table the logits are read from, [padded_vocab, E]: wte itself when tied (GPT-2), else its
    own `lm_head` in wte's layout (zeros at init under zero_init_proj), so both run one head matmul."""
    if cfg.tie_embeddings:
        return wte
    return _table(cfg, cfg.padded_vocab_size, "vocab", name, std=0.0 if cfg.zero_init_proj else 0.02)


def position_embedding(cfg: ModelConfig, name: str | None = "wpe") -> nn.Embed | None:
    """wpe: [block_size, E] for learned positions; None for rotary (positions enter attention)."""
    if cfg.position_embedding != "learned":
        return None
    return _table(cfg, cfg.block_size, "position", name)


def embed_inputs(cfg: ModelConfig, wte: nn.Embed, wpe: nn.Embed | None, tokens: jax.Array,
                 positions: jax.Array | None) -> jax.Array:
    """tokens [B, T] (+ positions [B, T], None = 0..T-1) -> the first residual stream [B, T, E]."""
    x = embed(wte, tokens, cfg.dtype)  # [B, T, E]
    if wpe is not None:
        if positions is None:
            x = x + embed(wpe, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], cfg.dtype)
        else:  # padding (-1) is clipped to a real row: no token attends to it anyway
            x = x + embed(wpe, jnp.clip(positions, 0, cfg.block_size - 1), cfg.dtype)
    return x


def output_logits(cfg: ModelConfig, ln_f: nn.Module, head: nn.Embed, x: jax.Array) -> jax.Array:
    """The last residual stream [..., E] -> logits [..., vocab_size]: final norm, head (`output_head`),
    then the soft-cap c * tanh(logits / c) when logit_softcap = c > 0.

    The head's matmul runs in the compute dtype (bf16 in mixed precision) and returns fp32
    logits, so the softmax and the loss never see bf16 rounding of the logits themselves.
    """
    h = ln_f(x).astype(cfg.dtype)  # [..., E]
    logits = head_matmul(h, head.embedding.astype(cfg.dtype))  # [..., V_padded] fp32
    if cfg.logit_softcap > 0:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    # Padded vocabulary rows are cut here, so they can never win a softmax or a sample.
    return logits[..., : cfg.vocab_size]


@jax.custom_vjp
def head_matmul(h: jax.Array, table: jax.Array) -> jax.Array:
    """h [..., E] . table [V, E]^T -> fp32 [..., V], operands in their (compute) dtype.

    Autodiff of a matmul with an fp32 result would run both backward matmuls in fp32 (the fp32
    cotangent promotes the bf16 operand); here the cotangent is cast to the operands' dtype first,
    as every other backward matmul of a bf16 model runs, with fp32 accumulation.
    """
    return jnp.einsum("...e,ve->...v", h, table, preferred_element_type=jnp.float32)


def _head_fwd(h, table):
    return head_matmul(h, table), (h, table)


def head_grads(h: jax.Array, table: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The head matmul's backward: fp32 (dh [..., E], dtable [V, E]) for the cotangent g [..., V],
    cast to the operands' (compute) dtype first, accumulated in fp32."""
    g = g.astype(h.dtype)  # [..., V]
    dh = jnp.einsum("...v,ve->...e", g, table, preferred_element_type=jnp.float32)
    dtable = jnp.einsum("...v,...e->ve", g, h, preferred_element_type=jnp.float32)
    return dh, dtable


def _head_bwd(residuals, g):
    h, table = residuals
    dh, dtable = head_grads(h, table, g)
    return dh.astype(h.dtype), dtable.astype(table.dtype)


head_matmul.defvjp(_head_fwd, _head_bwd)


def embed(table: nn.Embed, ids: jax.Array, dtype: str) -> jax.Array:
    """Row lookup. Under FSDP the table is sharded along "embed"; gathering it first (as ZeRO-3
    does for every weight) makes the looked-up rows come out batch-sharded, where looking up
    from the sharded table would give embed-sharded rows that XLA can only fix by replicating."""
    weights = nn.with_logical_constraint(table.embedding, (None, ACT_EMBED))
    return jnp.take(weights, ids, axis=0).astype(dtype)


# What each `config.remat` policy keeps of a block for the backward pass; the rest is recomputed
# from the block's input there. None: no remat. 'full' is nn.remat's own default (keep nothing).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    # Every weight matmul's output (q, k/v, attention out, MLP fc and proj): the backward reruns
    # only the norms, GELU and attention, the cheap FLOPs (attention's are under a tenth of GPT-2
    # small's at T = 1024).
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # q and k/v only (named in layers.Attention): attention and the whole MLP are rerun, and the
    # MLP's [B, T, 4E] activations, the largest of a block, are never kept.
    "save_qkv": jax.checkpoint_policies.save_only_these_names("q_proj", "kv_proj"),
}


def _residual_stream(cfg: ModelConfig, tokens: jax.Array, positions: jax.Array | None,
                     segment_ids: jax.Array | None, deterministic: bool, decode: bool) -> tuple[jax.Array, nn.Embed]:
    """The embeddings and the blocks, created in the calling module: (the last residual stream
    [B, T, E], wte). GPT2 and GPT2Hidden both call it, so both have one parameter tree."""
    B, T = tokens.shape
    if not decode and cfg.block_size < T:
        raise ValueError(f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}")
    if segment_ids is not None:
        if decode:
            raise ValueError("segment_ids are not supported with decode=True (the KV cache); pass None")
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must be [B, T] like tokens {tokens.shape}, got {segment_ids.shape}")
    if positions is None and decode:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    wte = token_embedding(cfg)
    x = embed_inputs(cfg, wte, position_embedding(cfg), tokens, positions)  # [B, T, E]
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    block = Block
    if cfg.remat != "none":
        block = nn.remat(block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
    # Parameters are always stacked along a leading "layers" axis; scan_layers=False unrolls
    # the loop instead of compiling one body, so checkpoints do not depend on the switch.
    blocks = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=cfg.n_layer,
        unroll=1 if cfg.scan_layers else cfg.n_layer,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, deterministic, decode, name="blocks")
    x, _ = blocks(x, positions, segment_ids)
    return x, wte


class GPT2(nn.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab_size].

    `positions` [B, T] gives each token its position; -1 marks padding, which no token attends to. Left out,
    token t is at position t, and attention skips the masked half of the scores (gpt2_jax/model/attention.py):
    the layout of training and of evaluating whole rows. With `decode=True` the blocks read and extend a KV
    cache in the "cache" collection (see `init_cache`); pass `mutable=["cache"]` to `apply`.

    `segment_ids` [B, T] int32 packs documents in a row: token i attends to token j <= i only when
    both have the same id (and within the sliding window); `positions` then restart at each
    document (for rotary or learned embeddings) and mark no padding. Not with `decode=True`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        cfg = self.config
        x, wte = _residual_stream(cfg, tokens, positions, segment_ids, deterministic, decode)
        return output_logits(cfg, layer_norm(cfg, "ln_f"), output_head(cfg, wte), x)  # [B, T, vocab_size]

    def init_cache(self, batch_size: int, max_len: int):
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens in all.

        With a sliding window the cache holds only min(max_len, window) slots (a ring buffer).
        """
        tokens = jnp.zeros((batch_size, max_len), jnp.int32)
        shapes = jax.eval_shape(
            lambda: self.init(jax.random.PRNGKey(0), tokens, decode=True)["cache"]
        )

        def empty(path, leaf):
            fill = -1 if path[-1].key == "pos" else 0
            return jnp.full(leaf.shape, fill, leaf.dtype)

        return jax.tree_util.tree_map_with_path(empty, shapes)


class GPT2Hidden(nn.Module):
    """GPT2 without its head matmul: tokens [B, T] -> (h [B, T, E], the final-normed last residual
    stream in the compute dtype; the head table [V_padded, E] as stored). GPT2's parameter tree, so
    GPT2's params apply. The chunked loss (gpt2_jax/model/loss.py) runs the head from these a few
    positions at a time instead of holding logits [B, T, V]."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
        deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x, wte = _residual_stream(cfg, tokens, positions, segment_ids, deterministic, False)
        h = layer_norm(cfg, "ln_f")(x).astype(cfg.dtype)  # [B, T, E], as output_logits feeds the head
        return h, output_head(cfg, wte).embedding  # [V_padded, E]


@functools.partial(jax.jit, static_argnames=("config", "batch_size"))
def init_params(config: ModelConfig, rng: jax.Array, batch_size: int = 1):
    """Unboxed parameters (plain arrays) of a freshly initialised model (compiled once per config)."""
    tokens = jnp.zeros((batch_size, min(8, config.block_size)), jnp.int32)
    variables = GPT2(config).init(rng, tokens)
    return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig):
    """Boxed (nn.Partitioned) parameter shapes, without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, min(8, config.block_size)), jnp.int32)
    return jax.eval_shape(lambda t: GPT2(config).init(jax.random.PRNGKey(0), t), tokens)["params"]
