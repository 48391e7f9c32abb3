"""Sampling: cached loop == full forward, batch independence, greedy special cases, the filters,
the temperature, seeds, eos, length rules and the reuse of compiled code."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import GPT2, ModelConfig
from gpt2_jax.inference import decode, sampling
from gpt2_jax.inference import prompts as prompts_lib
from gpt2_jax.inference.sampling import PromptTooLongError, SamplingParams, filter_logits, generate, next_token, stream
from gpt2_jax.model.gpt2 import abstract_params

V = 97


def tiny(**kw) -> ModelConfig:
    """One layer: the decode step runs the layers one by one, so each layer is compiled again. The
    decode loop's own test takes two, so that each layer must keep to its own cache."""
    return ModelConfig(**{**dict(n_layer=1, n_head=4, n_embd=32, block_size=48, vocab_size=V), **kw})


@functools.cache
def params_for(cfg: ModelConfig, seed: int = 0, scale: float = 1.0):
    """GPT-2's init (weights N(0, 0.02), biases 0, LayerNorm scales 1), weights times `scale`,
    drawn with numpy: compiling the model's own initialiser costs seconds per config on a CPU, and
    even jnp.full or jnp.asarray compile a small program for each new shape (device_put does not)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jax.device_put(np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32))
        return jax.device_put(rng.normal(0.0, 0.02 * scale, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(cfg)))


def sharp_params(cfg: ModelConfig):
    """Weights 5x the init scale: peaked next-token distributions, so greedy has no near-ties."""
    return params_for(cfg, 0, 5.0)


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, V, n).tolist()


# The decode loop's variants: (positions, kv heads, window) x the weight layout of its step (False:
# kernels [in, out]; True: [out, in], generate's layout for one row). Five rows in which every two
# of the four factors meet in all four pairs of values (a covering array of strength 2), one
# compile each; then the modern recipe's switches (tests/test_recipe.py), all on, with rotary GQA and a window.
_DECODE_VARIANTS = [("learned", None, None, False), ("learned", 2, 5, True), ("rotary", None, 5, True),
                    ("rotary", 2, None, True), ("rotary", 2, 5, False)]
DECODE_CASES = [(dict(position_embedding=pe, n_kv_head=kv, sliding_window=w), matvec)
                for pe, kv, w, matvec in _DECODE_VARIANTS]
DECODE_IDS = [f"{pe}-kv{kv}-w{w}-layout-{'out-in' if m else 'in-out'}" for pe, kv, w, m in _DECODE_VARIANTS]
DECODE_CASES.append((dict(position_embedding="rotary", n_kv_head=2, sliding_window=5, norm="rmsnorm", qk_norm=True,
                          mlp_activation="relu2", tie_embeddings=False, logit_softcap=5.0, zero_init_proj=True), True))
DECODE_IDS.append("modern-rotary-kv2-w5-layout-out-in")


# The generate tests below share compiled programs: most call with one row of at most 16 prompt
# tokens, or four rows of at most 32 (one over 16), and at most 16 new tokens (the buckets of
# sampling.py), on tiny() or WINDOWED, greedy or with SAMPLED's settings.
WINDOWED = dict(position_embedding="rotary", n_kv_head=2, sliding_window=4)  # no context limit: a ring cache
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)


def _cached_vs_full(cfg, prompts, n_steps, matvec=False):
    """One compiled function: the sampler's prefill, then its decode loop (`_decode`, what
    generate runs) advanced one token at a time, keeping the logits each token was chosen from;
    then every row recomputed by a full forward (no cache, no left padding). matvec: the decode
    weights in the layout generate uses for one row (kernels stored [out, in])."""
    batch = prompts_lib.prepare(cfg, prompts, n_steps, 1, "none")
    greedy = SamplingParams.create(temperature=0)
    longest = max(map(len, prompts))

    @jax.jit
    def run(params):
        state = decode.prefill(
            cfg, batch.gen_len, params, batch.prompt, batch.positions, batch.row_limit, jax.random.key(0), jnp.int32(-1)
        )
        weights = decode.DecodeWeights.from_params(cfg, params, matvec=matvec)

        def step(state, _):
            logits, _ = decode.next_logits(cfg, weights, state)
            return decode.decode_loop(cfg, weights, greedy, state, state.step + 1), logits

        state, step_logits = jax.lax.scan(step, state, length=n_steps)  # [N, B, V]
        tokens = state.tokens[:, :n_steps]  # [B, N]
        # Every row's prompt and new tokens, right-filled to the longest row: one forward [B, L, V].
        # Causal, so position t sees only tokens <= t and the filling after a row's end reaches none
        # of its positions.
        rows = jnp.stack([jnp.pad(jnp.concatenate([jnp.asarray(p), tokens[r]]), (0, longest - len(p)))
                          for r, p in enumerate(prompts)])
        return tokens, step_logits, GPT2(cfg).apply({"params": params}, rows)

    return run


@pytest.mark.parametrize(("switches", "matvec"), DECODE_CASES, ids=DECODE_IDS)
def test_cached_decoding_equals_full_forward_at_every_step(switches, matvec):
    cfg = tiny(n_layer=2, **switches)
    params = sharp_params(cfg)
    prompts = [prompt(1, 5), prompt(2, 11)]  # different lengths: left padding is exercised
    N = 20  # with the window of 5, the ring cache wraps several times
    tokens, step_logits, full = jax.device_get(_cached_vs_full(cfg, prompts, N, matvec)(params))
    for row, p in enumerate(prompts):
        for t in range(N):
            want = full[row][len(p) - 1 + t]
            assert tokens[row, t] == np.argmax(want), (row, t)
            np.testing.assert_allclose(step_logits[t, row], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("switches", [dict(), WINDOWED], ids=["learned-mha", "rotary-gqa-window"])
def test_a_prompt_gives_the_same_output_alone_and_in_a_batch(switches):
    cfg = tiny(**switches)
    params = sharp_params(cfg)
    target, longer, shorter, other = prompt(3, 7), prompt(4, 20), prompt(5, 2), prompt(23, 11)
    greedy = dict(max_new_tokens=12, temperature=0)
    alone = generate(cfg, params, [target], **greedy)[0]
    assert generate(cfg, params, [longer, target, shorter, other], **greedy)[1] == alone
    if cfg.sliding_window:
        # Sampling too: row r draws from fold_in(key(seed), r), so row 0 is row 0 in both batches.
        sampled = dict(max_new_tokens=12, **SAMPLED)
        batched = generate(cfg, params, [target, longer, shorter, other], **sampled)
        assert batched[0] == generate(cfg, params, [target], **sampled)[0]


def test_top_k_1_and_a_tiny_top_p_equal_greedy():
    cfg = tiny()
    params = sharp_params(cfg)
    prompts = [prompt(6, 4), prompt(7, 9), prompt(24, 20), prompt(25, 13)]
    run = functools.partial(generate, cfg, params, prompts, max_new_tokens=16, eos_id=None)
    greedy = run(temperature=0)
    assert run(temperature=1.0, top_k=1, seed=1) == greedy
    assert run(temperature=3.0, top_k=1, seed=2) == greedy  # same executable, other values
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_same_seed_same_samples_different_seeds_differ():
    cfg = tiny()
    params = params_for(cfg)  # small weights: flat distributions
    run = functools.partial(generate, cfg, params, [prompt(8, 20)], max_new_tokens=16, temperature=1.0, num_samples=4)
    a, b, c = run(seed=11), run(seed=11), run(seed=12)
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) == 4  # the samples of one call differ from each other


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(next_token)
    cases = [
        (dict(), np.ones(6, bool)),
        (dict(top_k=3), np.array([1, 1, 1, 0, 0, 0], bool)),  # renormalised over the top 3
    ]
    for kw, support in cases:
        sp = SamplingParams.create(temperature=temperature, **kw)
        tokens = np.asarray(draw(np.broadcast_to(logits, (n, 6)), keys, sp))
        freq = np.bincount(tokens, minlength=6) / n
        want = np.where(support, np.exp(logits / temperature), 0.0)
        want /= want.sum()
        # binomial std <= sqrt(0.25 / n) = 0.0025: 0.012 is ~5 sigma
        np.testing.assert_allclose(freq, want, atol=0.012, err_msg=str(kw))


_filter = jax.jit(filter_logits, static_argnums=1)  # top_k picks the code path; top_p is an input


def _kept(logits, top_k=0, top_p=1.0) -> set[int]:
    """numpy arguments: jnp.asarray would compile a program per shape on its own."""
    out = np.asarray(_filter(np.asarray(logits, np.float32)[None], top_k, np.float32(top_p)))[0]
    return set(np.flatnonzero(np.isfinite(out)).tolist())


@pytest.mark.parametrize(
    "top_p,want",
    [(0.3, {1}), (0.6, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 2, 3, 4}), (0.97, set(range(5))), (1.0, set(range(5)))],
)
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, want):
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = np.log(probs)
    assert _kept(logits, top_p=top_p) == want  # full-vocabulary bisection
    assert _kept(logits, top_k=5, top_p=top_p) == want  # the top-k candidate path


def test_top_k_then_top_p_renormalises_and_breaks_ties_by_token_id():
    logits = np.log(np.array([0.05, 0.5, 0.1, 0.2, 0.15]))
    assert _kept(logits, top_k=2) == {1, 3}
    # Of the top 3 (0.5, 0.2, 0.15 -> 0.59, 0.24, 0.18 renormalised), p=0.7 needs two.
    assert _kept(logits, top_k=3, top_p=0.7) == {1, 3}
    assert _kept(logits, top_k=3, top_p=0.85) == {1, 3, 4}
    ties = np.array([1.0, 3.0, 3.0, 0.0, -1.0])  # five, as above: top_k=2 is compiled already
    assert _kept(ties, top_k=1) == {1}
    assert _kept(ties, top_k=2) == {1, 2}
    assert _kept(ties, top_k=10) == {0, 1, 2, 3, 4}  # k beyond the vocabulary keeps everything


def test_each_row_stops_at_eos_which_is_not_returned():
    cfg = tiny()
    params = sharp_params(cfg)
    prompts = [prompt(9, 3), prompt(10, 6), prompt(11, 12), prompt(26, 20)]
    free = generate(cfg, params, prompts, max_new_tokens=16, temperature=0, eos_id=None)
    eos = free[0][5]
    got = generate(cfg, params, prompts, max_new_tokens=16, temperature=0, eos_id=eos)
    assert got == [row[: row.index(eos)] if eos in row else row for row in free]
    assert len(got[0]) <= 5
    assert list(stream(cfg, params, prompts[0], max_new_tokens=16, temperature=0, eos_id=eos)) == got[0]


def test_stream_yields_the_tokens_generate_returns():
    cfg = tiny(**WINDOWED)
    params = params_for(cfg, 1)
    kw = dict(max_new_tokens=16, eos_id=None, **SAMPLED)
    tokens = stream(cfg, params, prompt(12, 9), **kw)
    assert list(tokens) == generate(cfg, params, [prompt(12, 9)], **kw)[0]
    assert tokens.run_s > 0


def test_generation_is_clipped_to_the_context_per_row():
    cfg = tiny()  # learned positions, block_size 48
    params = sharp_params(cfg)
    long, short = prompt(13, 44), prompt(14, 4)
    out = generate(cfg, params, [long, short], max_new_tokens=10, temperature=0, eos_id=None)
    assert [len(x) for x in out] == [4, 10]  # the long prompt leaves room for 4 tokens
    assert out[1] == generate(cfg, params, [short], max_new_tokens=10, temperature=0, eos_id=None)[0]
    # A prompt one token short of the context gets one (beside `short`: the batch shapes above).
    out = generate(cfg, params, [prompt(15, 47), short], max_new_tokens=10, temperature=0, eos_id=None)
    assert [len(x) for x in out] == [1, 10]


def test_a_prompt_that_fills_the_context_is_refused_unless_truncated():
    cfg = tiny()
    params = sharp_params(cfg)
    too_long = prompt(16, 60)
    message = r"prompt 0 has 60 tokens .* block_size=48 .* at most 47.*truncate='left'"
    with pytest.raises(PromptTooLongError, match=message):
        generate(cfg, params, [too_long], max_new_tokens=10)
    with pytest.raises(PromptTooLongError, match="has 48 tokens"):
        generate(cfg, params, [too_long[:48]], max_new_tokens=10)
    greedy = dict(max_new_tokens=10, temperature=0, eos_id=None)
    # truncate='left' keeps the newest 48 - 10 = 38 tokens so that all 10 new tokens fit: row 0
    # gives what those 38 tokens give as a prompt (row 1, which the truncation leaves alone).
    cut = generate(cfg, params, [too_long, too_long[-38:]], truncate="left", **greedy)
    assert cut[0] == cut[1] and len(cut[0]) == 10
    # Asking for more than half the context still keeps half of it (24 tokens) for the prompt.
    greedy["max_new_tokens"] = 40
    cut = generate(cfg, params, [too_long, too_long[-24:]], truncate="left", **greedy)
    assert cut[0] == cut[1] and len(cut[0]) == 24
    # Rotary full attention is bounded by block_size too; a sliding window lifts the limit.
    with pytest.raises(PromptTooLongError):
        generate(tiny(position_embedding="rotary"), params, [too_long], max_new_tokens=10)
    windowed = tiny(**WINDOWED)
    out = generate(windowed, sharp_params(windowed), [too_long], max_new_tokens=16, temperature=0, eos_id=None)
    assert len(out[0]) == 16  # 76 tokens in all, well over block_size: the cache is a ring


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, V]]), f"token id {V}, outside the vocabulary"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(temperature=-0.1), "temperature=-0.1 must be a finite number >= 0"),
        (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
        (dict(num_samples=0), "num_samples=0 must be an integer >= 1"),
        (dict(max_new_tokens=-1), "max_new_tokens=-1 must be an integer >= 0"),
        (dict(truncate="right"), "truncate='right' must be one of"),
    ],
)
def test_bad_arguments_are_refused_with_the_value_and_the_rule(kwargs, match):
    cfg = tiny()
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(cfg, sharp_params(cfg), args.pop("prompts"), **args)


def test_zero_new_tokens_and_several_samples_per_prompt():
    cfg = tiny()
    params = sharp_params(cfg)
    assert generate(cfg, params, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    two_prompts = [prompt(17, 3), prompt(18, 20)]
    out = generate(cfg, params, two_prompts, max_new_tokens=6, temperature=0, num_samples=2, eos_id=None)
    assert len(out) == 4 and out[0] == out[1] and out[2] == out[3]  # prompt-major; greedy samples agree
    assert out[0] != out[2]


def test_compiled_code_is_reused_across_calls_of_similar_size():
    cfg = tiny(n_kv_head=1)  # a config no other test uses: nothing is cached yet
    params = sharp_params(cfg)
    first = sampling.generate_with_stats(cfg, params, [prompt(19, 5)], max_new_tokens=10, temperature=0.7, top_k=20)
    assert first.compile_s > 0
    # Same buckets (prompt <= 16, new <= 16, top_k <= 32); other values and seed: nothing compiles.
    again = sampling.generate_with_stats(
        cfg, params, [prompt(20, 9)], max_new_tokens=13, temperature=1.3, top_k=30, seed=3
    )
    assert again.compile_s == 0.0
    assert len(again.tokens[0]) <= 13
    # A longer prompt moves to the next bucket, and switching top-p on is a new static setting.
    assert sampling.generate_with_stats(cfg, params, [prompt(21, 17)], max_new_tokens=10, top_k=20).compile_s > 0
    with_top_p = sampling.generate_with_stats(cfg, params, [prompt(22, 5)], max_new_tokens=10, top_k=20, top_p=0.9)
    assert with_top_p.compile_s > 0
