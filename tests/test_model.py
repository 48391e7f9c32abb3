"""Properties of the model: causality, cache == full forward, attention variants, rotary, scan/remat policies.

Every model call here is jitted with the config static: equal configs share one compiled program
across tests, where un-jitted calls would dispatch op by op and trace again each time.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from gpt2_jax import GPT2, ModelConfig
from gpt2_jax.model.config import PRESETS, count_params
from gpt2_jax.model.gpt2 import abstract_params, init_params
from gpt2_jax.model.layers import apply_rotary, gelu

HF_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=97)
    return ModelConfig(**{**base, **kw})


def random_tokens(seed, shape, vocab=97) -> np.ndarray:
    """Token ids drawn and edited with numpy: jax.random.randint and `.at[].set` would each compile a
    program per shape."""
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


def with_token(tokens: np.ndarray, index, vocab=97) -> np.ndarray:
    """A copy of tokens with the token(s) at `index` changed to another id."""
    changed = tokens.copy()
    changed[index] = (changed[index] + 1) % vocab
    return changed


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions):
    return GPT2(cfg).apply({"params": params}, tokens, positions)


def forward(cfg, params, tokens, positions=None) -> np.ndarray:
    """The logits as numpy: slicing a jax array in an assertion would compile a program per shape."""
    return np.asarray(_forward(cfg, params, tokens, positions))


@functools.cache
def params_of(cfg: ModelConfig):
    """Weights N(0, 0.02), the same for every test of a config: drawing them traces the model's
    init (eval_shape) each time. Shared, so never modified in place."""
    return random_params(cfg, std=0.02)


# All attention switches: position encoding x (MHA, GQA, MQA) x window.
SWITCHES = [
    dict(position_embedding=pe, n_kv_head=kv, sliding_window=w)
    for pe, kv, w in itertools.product(["learned", "rotary"], [None, 2, 1], [None, 5])
]
SWITCH_IDS = [f"{s['position_embedding']}-kv{s['n_kv_head']}-w{s['sliding_window']}" for s in SWITCHES]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_param_counts_match_hugging_face(preset):
    shapes = abstract_params(ModelConfig.from_preset(preset))  # abstract: nothing is allocated
    assert count_params(shapes) == HF_COUNTS[preset]


def test_every_parameter_has_logical_axis_names():
    boxed = abstract_params(tiny(n_kv_head=2, position_embedding="learned"))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert all(n is not None for n in leaf.names), leaf.names
    scanned = boxed["blocks"]["mlp"]["fc"]["kernel"]
    assert scanned.names == ("layers", "embed", "mlp")


def test_initialisation_follows_gpt2():
    cfg = tiny(n_layer=8, n_embd=64, n_head=4)
    p = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))  # statistics in numpy: no program per shape
    assert abs(float(np.std(p["wte"]["embedding"])) - 0.02) < 0.002
    assert abs(float(np.std(p["blocks"]["mlp"]["fc"]["kernel"])) - 0.02) < 0.002
    resid = 0.02 / np.sqrt(2 * cfg.n_layer)
    assert abs(float(np.std(p["blocks"]["mlp"]["proj"]["kernel"])) - resid) < 0.1 * resid
    assert abs(float(np.std(p["blocks"]["attn"]["out"]["kernel"])) - resid) < 0.1 * resid
    assert float(np.abs(p["blocks"]["attn"]["q"]["bias"]).max()) == 0.0
    np.testing.assert_array_equal(p["ln_f"]["scale"], 1.0)
    # Layers are initialised independently, not as copies.
    k = p["blocks"]["attn"]["q"]["kernel"]
    assert not np.allclose(k[0], k[1])


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
def test_causality(switches):
    cfg = tiny(**switches)
    params = params_of(cfg)
    tokens = random_tokens(2, (2, 16))
    base = forward(cfg, params, tokens)
    for t in (0, 7, 14):
        out = forward(cfg, params, with_token(tokens, np.s_[:, t + 1]))
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(out[:, t + 1], base[:, t + 1])


# Six variants that hold every pair of switch values (positions x kv heads x window). The sampler's
# decode loop, which runs the blocks its own way, has its own test (tests/test_sampling.py).
_PAIRWISE = [("learned", None, None), ("learned", 2, 5), ("learned", 1, None),
             ("rotary", None, 5), ("rotary", 2, None), ("rotary", 1, 5)]


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg, params, cache, tokens, positions):
    return GPT2(cfg).apply({"params": params, "cache": cache}, tokens, positions, decode=True, mutable=["cache"])


@pytest.mark.parametrize("switches", [dict(position_embedding=pe, n_kv_head=kv, sliding_window=w)
                                      for pe, kv, w in _PAIRWISE], ids=[f"{pe}-kv{kv}-w{w}" for pe, kv, w in _PAIRWISE])
def test_cached_decoding_equals_full_forward(switches):
    cfg = tiny(**switches)
    params = params_of(cfg)
    B, T = 2, 16  # the shape test_causality compiles the full forward for
    tokens = random_tokens(4, (B, T))
    full = forward(cfg, params, tokens)
    cache = GPT2(cfg).init_cache(B, T)  # empty; each pass below starts from it
    k_cache = cache["blocks"]["attn"]["k"]  # [layers, B, K, L, H]
    if cfg.sliding_window:
        assert k_cache.shape[3] == cfg.sliding_window  # ring of window slots
    assert k_cache.shape[3] == cache["blocks"]["attn"]["pos"].shape[2]
    assert k_cache.shape[2] == cfg.kv_heads  # only kv heads are cached
    for prefill in (1, 6):  # token by token, and a prompt then tokens
        pos = np.broadcast_to(np.arange(prefill, dtype=np.int32), (B, prefill))
        logits, mut = _decode(cfg, params, cache, tokens[:, :prefill], pos)
        outs = [logits]
        for t in range(prefill, T):  # int32 positions of one shape: one decode program for every step
            logits, mut = _decode(cfg, params, mut["cache"], tokens[:, t : t + 1], np.full((B, 1), t, np.int32))
            outs.append(logits)
        np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def reference_attention_model(cfg, params, tokens):
    """The same network written out in float64 numpy, the textbook way: K/V heads repeated, an
    explicit causal (window) mask, rotary positions and the tanh GELU by their formulas."""
    B, T = tokens.shape
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    N, K, H = cfg.n_head, cfg.kv_heads, cfg.head_dim

    def ln(x, w):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w["scale"] + w["bias"]

    pos = np.arange(T)
    angles = pos[:, None] * cfg.rope_theta ** (-np.arange(H // 2) / (H // 2))  # [T, H/2]

    def rotary(x):  # [B, N, T, H], "rotate half": pairs (i, i + H/2) turn by angle t * theta^(-2i/H)
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)

    x = p["wte"]["embedding"][tokens]
    if cfg.position_embedding == "learned":
        x = x + p["wpe"]["embedding"][pos]
    mask = pos[None, :] <= pos[:, None]
    if cfg.sliding_window:
        mask &= pos[:, None] - pos[None, :] < cfg.sliding_window
    for i in range(cfg.n_layer):
        b = jax.tree_util.tree_map(lambda a: a[i], p["blocks"])
        h = ln(x, b["ln_1"])
        q = np.einsum("bte,enh->bnth", h, b["attn"]["q"]["kernel"]) + b["attn"]["q"]["bias"][None, :, None]
        kv = np.einsum("bte,ekmh->bkmth", h, b["attn"]["kv"]["kernel"]) + b["attn"]["kv"]["bias"][None, :, :, None]
        k, v = kv[:, 0], kv[:, 1]  # [B, K, T, H]
        k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
        if cfg.position_embedding == "rotary":
            q, k = rotary(q), rotary(k)
        s = np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(H)
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bnts,bnsh->bnth", a / a.sum(-1, keepdims=True), v)
        x = x + np.einsum("bnth,nhe->bte", o, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        h = ln(x, b["ln_2"]) @ b["mlp"]["fc"]["kernel"] + b["mlp"]["fc"]["bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + h @ b["mlp"]["proj"]["kernel"] + b["mlp"]["proj"]["bias"]
    x = ln(x, p["ln_f"])
    return (x @ p["wte"]["embedding"].T)[..., : cfg.vocab_size]


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
def test_grouped_attention_equals_textbook_attention_with_repeated_kv(switches):
    cfg = tiny(**switches)
    params = params_of(cfg)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) * 5.0, params)  # sharper attention: a stronger test
    tokens = random_tokens(6, (2, 16))
    np.testing.assert_allclose(
        forward(cfg, params, tokens), reference_attention_model(cfg, params, tokens), atol=1e-4, rtol=1e-4
    )


def test_gqa_with_n_kv_head_equal_n_head_is_mha():
    mha, gqa = tiny(), tiny(n_kv_head=4)
    # The same parameter tree, shapes and dtypes (from the initialiser's abstract output: nothing compiled).
    shapes = lambda cfg: jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(7))  # noqa: E731
    assert shapes(mha) == shapes(gqa)
    params = params_of(mha)
    tokens = random_tokens(8, (2, 16))
    np.testing.assert_array_equal(forward(mha, params, tokens), forward(gqa, params, tokens))


@pytest.mark.parametrize("pe", ["learned", "rotary"])
def test_window_at_least_sequence_length_is_full_attention(pe):
    full = tiny(position_embedding=pe)
    params = params_of(full)
    tokens = random_tokens(10, (2, 16))
    for w in (16, 32):
        np.testing.assert_array_equal(
            forward(full.replace(sliding_window=w), params, tokens), forward(full, params, tokens)
        )
    # ...and a smaller window does change the output (test_causality's window: compiled there).
    assert not np.allclose(forward(full.replace(sliding_window=5), params, tokens), forward(full, params, tokens))


@pytest.mark.parametrize("n_layer", [1, 3])
def test_tokens_beyond_the_window_have_no_influence(n_layer):
    w = 4
    cfg = tiny(n_layer=n_layer, sliding_window=w, position_embedding="rotary")
    params = params_of(cfg)
    T = 24
    tokens = random_tokens(12, (1, T))
    base = forward(cfg, params, tokens)
    reach = n_layer * (w - 1)  # each layer looks w-1 tokens back, so the stack sees n_layer*(w-1)
    t = T - 1
    np.testing.assert_array_equal(forward(cfg, params, with_token(tokens, np.s_[:, : t - reach]))[:, t], base[:, t])
    assert not np.allclose(forward(cfg, params, with_token(tokens, np.s_[:, t - reach]))[:, t], base[:, t])


def test_rotary_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 16))

    @jax.jit  # one program for every pair of positions (op by op, each op would compile on its own)
    def score(pq, pk):
        rq = apply_rotary(q, jnp.reshape(pq, (1, 1)), 10000.0)
        rk = apply_rotary(k, jnp.reshape(pk, (1, 1)), 10000.0)
        return jnp.sum(rq * rk, -1)

    for shift in (1, 17, 300):
        np.testing.assert_allclose(score(5, 2), score(5 + shift, 2 + shift), atol=1e-4)
    assert not np.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rotary_model_is_invariant_to_shifting_all_positions():
    cfg = tiny(position_embedding="rotary")
    params = params_of(cfg)
    tokens = random_tokens(14, (2, 12))
    pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    np.testing.assert_allclose(forward(cfg, params, tokens, pos + 9), forward(cfg, params, tokens, pos), atol=1e-4)


@pytest.mark.parametrize("switches", SWITCHES[:4], ids=SWITCH_IDS[:4])
def test_left_padding_does_not_change_real_tokens(switches):
    cfg = tiny(**switches)
    params = params_of(cfg)
    tokens = random_tokens(16, (2, 16))
    pad, real = 5, 11
    padded = np.concatenate([np.zeros((2, pad), np.int32), tokens[:, :real]], axis=1)  # [2, 16]
    positions = np.concatenate([np.full((2, pad), -1, np.int32), np.tile(np.arange(real, dtype=np.int32), (2, 1))], axis=1)
    out = forward(cfg, params, padded, positions)[:, pad:]
    # The unpadded rows' first `real` outputs (causal: later tokens do not reach them), by the
    # forward test_causality compiled.
    np.testing.assert_allclose(out, forward(cfg, params, tokens)[:, :real], atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = GPT2(cfg).apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return jax.value_and_grad(loss)(params)


def test_scan_and_every_remat_policy_leave_outputs_and_gradients_unchanged():
    base = tiny(n_kv_head=2)  # two layers: the fewest for which unrolling differs from the scan
    assert base.remat == "none" and base.replace(remat=True).remat == "full"  # the old bools name policies
    params = params_of(base)
    tokens = random_tokens(18, (2, 17))
    ref_loss, ref_grads = _loss_and_grads(base, params, tokens)
    for scan, remat in [(False, False), (True, True), (False, "save_qkv"), (True, "save_dots")]:
        loss, grads = _loss_and_grads(base.replace(scan_layers=scan, remat=remat), params, tokens)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_remat_policies_recompute_what_they_say():
    """Matmuls in the gradient's program: 'full' reruns every block matmul in the backward pass,
    'save_qkv' all but q and k/v, 'save_dots' only attention's own (the weight matmuls are kept)."""
    base = tiny(n_kv_head=2)
    params = params_of(base)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def matmuls(remat):
        cfg = base.replace(remat=remat)
        grad = jax.grad(lambda p: GPT2(cfg).apply({"params": p}, tokens).sum())
        return str(jax.make_jaxpr(grad)(params)).count("dot_general")

    counts = [matmuls(policy) for policy in ("none", "save_dots", "save_qkv", "full")]
    assert counts == sorted(set(counts)), counts  # strictly more recomputation, in that order


def test_bfloat16_compute_runs_and_stays_close():
    cfg = tiny(n_kv_head=2, position_embedding="rotary")
    params = params_of(cfg)
    tokens = random_tokens(20, (2, 16))
    ref = forward(cfg, params, tokens)
    out = forward(cfg.replace(dtype="bfloat16"), params, tokens)
    assert out.dtype == jnp.float32  # logits are fp32 in every compute dtype (gpt2.head_matmul)
    assert np.all(np.isfinite(np.asarray(out)))
    assert not np.array_equal(np.asarray(out), ref)  # bf16 really computed something different
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)
    bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.eval_shape(functools.partial(init_params, bf16), jax.random.PRNGKey(19))  # dtypes: no compile
    assert bf16_params["wte"]["embedding"].dtype == jnp.bfloat16


def test_padded_vocabulary_never_reaches_the_logits():
    cfg = tiny(vocab_size=50, pad_vocab_to_multiple=64)
    assert cfg.padded_vocab_size == 64
    params = params_of(cfg)
    assert params["wte"]["embedding"].shape == (64, 32)
    # Make the padded rows as attractive as possible: they still cannot be chosen.
    table = np.asarray(params["wte"]["embedding"]).copy()
    table[50:] = 100.0
    params = {**params, "wte": {"embedding": table}}
    logits = forward(cfg, params, random_tokens(22, (2, 8), vocab=50))
    assert logits.shape == (2, 8, 50)
    assert int(np.argmax(logits, -1).max()) < 50
    assert ModelConfig(pad_vocab_to_multiple=64).padded_vocab_size == 50304


def test_sequence_longer_than_block_size_is_refused():
    cfg = tiny(block_size=8)
    params = params_of(cfg)
    with pytest.raises(ValueError, match="Cannot forward sequence of length 9, block size is only 8"):
        forward(cfg, params, random_tokens(0, (1, 9)))


def test_dropout_is_active_only_when_not_deterministic():
    cfg = tiny(dropout=0.5)
    params = params_of(cfg)
    tokens = random_tokens(1, (2, 8))
    model = GPT2(cfg)

    @jax.jit  # one program for all four outputs
    def outputs(params, seeds):
        default = model.apply({"params": params}, tokens)
        explicit = model.apply({"params": params}, tokens, deterministic=True)
        dropped = jax.vmap(lambda seed: model.apply({"params": params}, tokens, deterministic=False,
                                                    rngs={"dropout": jax.random.PRNGKey(seed)}))(seeds)
        return default, explicit, dropped

    det, explicit, (a, b) = outputs(params, np.array([1, 2], np.int32))
    np.testing.assert_array_equal(det, explicit)
    assert not np.allclose(a, det) and not np.allclose(a, b)


def test_gelu_hand_written_backward_matches_autodiff():
    x = jnp.concatenate([jnp.linspace(-10.0, 10.0, 2001), jax.random.normal(jax.random.PRNGKey(0), (500,)) * 3])
    reference = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(gelu(x)), np.asarray(reference(x)))
    got = jax.vmap(jax.grad(gelu))(x)
    want = jax.vmap(jax.grad(reference))(x)
    # atol 2e-6: float32 rounding alone puts both up to 4e-6 (XLA:CPU's fusion emitters) or 9e-6 (its
    # classic ones, which the tests use) from the float64 derivative on this range, and 1.3e-6 apart;
    # a wrong term would be O(0.1).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    low = jax.grad(lambda x: jnp.sum(gelu(x)))(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(want), atol=2e-2)
