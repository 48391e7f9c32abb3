"""Speculative decoding: greedy output equals plain greedy token for token (a batch of different
lengths, eos, context clipping, GQA, a sliding window's ring; prompt lookup and a draft model),
samples follow the model's distribution (rotary positions, a ring), prompt lookup finds what it
should, bad arguments are refused.

Cheap on purpose (compilation is most of a test's time here): one-layer models, one speculative
program per test, one plain reference shared by the greedy tests.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import params_for, prompt, sharp_params, tiny

from gpt2_jax import GPT2
from gpt2_jax.inference import speculative
from gpt2_jax.inference.sampling import SamplingParams, filter_logits, generate, generate_with_stats

K = 3


# Learned positions (so the context clips rows) with grouped-query attention and a sliding window
# of 4 (so the cache is a ring, which wraps); one layer keeps compilation cheap.
CFG = tiny(n_layer=1, n_kv_head=2, sliding_window=4)
PROMPTS = (prompt(13, 44), prompt(6, 7), prompt(7, 2))  # the first leaves room for 4 new tokens only
GREEDY = dict(max_new_tokens=12, temperature=0)


@functools.cache
def plain_greedy(eos_id=None) -> list[list[int]]:
    return generate(CFG, sharp_params(CFG), PROMPTS, eos_id=eos_id, **GREEDY)


def test_prompt_lookup_greedy_equals_plain_greedy_in_a_batch_with_eos_and_clipping():
    params = sharp_params(CFG)
    plain = plain_greedy()
    assert [len(x) for x in plain] == [4, 12, 12]
    spec = generate_with_stats(CFG, params, PROMPTS, eos_id=None, speculate=K, **GREEDY)
    assert spec.tokens == plain
    s = spec.speculation
    assert 0 < s.accepted < s.proposed  # drafts were kept and rejected: the cache was rolled back
    assert s.passes < sum(map(len, plain))  # fewer passes of the model than tokens
    eos = plain[1][5]  # a token the second row reaches: it stops there, eos not returned
    with_eos = generate(CFG, params, PROMPTS, eos_id=eos, speculate=K, **GREEDY)
    assert with_eos == [row[: row.index(eos)] if eos in row else row for row in plain]
    assert with_eos == plain_greedy(eos)


def test_a_draft_model_that_is_the_model_itself_has_every_draft_kept():
    """Greedy output equals plain greedy's, and every draft is kept: a draft model that lost track
    of the text (its re-fed tokens, its rollback, its ring) would propose other tokens."""
    params = sharp_params(CFG)
    spec = generate_with_stats(CFG, params, PROMPTS, eos_id=None, speculate=K, draft=(CFG, params), **GREEDY)
    assert spec.tokens == plain_greedy()
    assert spec.speculation.accepted == spec.speculation.proposed > 0
    assert spec.speculation.passes <= 1 + 3 + 3  # 4 + 12 + 12 tokens in passes of K + 1 = 4


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = jax.jit(speculative.lookup_drafts, static_argnums=3)
    rows = [
        # ... 5 6 7 | 5 6 9 | 5 6: "5 6" last occurred before 9 (latest beats earlier "5 6 7")
        ([1, 5, 6, 7, 5, 6, 9, 5, 6], [9, 5, 6, 9], True),
        # the trigram "2 3 4" beats the more recent unigram "4": what followed 2 3 4 is 8 1 2 4
        ([2, 3, 4, 8, 1, 2, 4, 9, 2, 3, 4], [8, 1, 2, 4], True),
        # a loop: the match runs into the present, so its stretch repeats
        ([3, 7, 7, 7], [7, 7, 7, 7], True),
        ([0, 0, 1, 2, 3], [3, 3, 3, 3], False),  # no earlier 3: the newest token, repeated
    ]
    S = 16
    history = np.zeros((len(rows), S), np.int32)
    first, end = [], []
    for r, (text, _, _) in enumerate(rows):
        start = 2 if r == 3 else 1  # row 3: the 0 0 before `first` are padding, never matched
        history[r, start : start + len(text)] = text
        first.append(start)
        end.append(start + len(text))
    drafts, found = lookup(jnp.asarray(history), jnp.array(first), jnp.array(end), 4)
    assert np.asarray(drafts).tolist() == [want for _, want, _ in rows]
    assert np.asarray(found).tolist() == [f for _, _, f in rows]


def test_the_acceptance_rule_keeps_the_model_distribution():
    """One pass, K = 2 drafts: the first new token must follow p_0 and the second, when the first
    draft was kept, p_1 - whether or not the drafts are likely, or outside the top-k."""
    probs = np.array([[0.3, 0.4, 0.2, 0.1, 0.0], [0.05, 0.15, 0.5, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    with np.errstate(divide="ignore"):
        logits = np.log(probs).astype(np.float32)  # [W=3, V=5]; -inf where p = 0
    n = 40_000

    @functools.partial(jax.jit, static_argnums=1)
    def run(drafts, top_k):
        keys = jax.random.split(jax.random.key(0), n)
        sp = SamplingParams.create(temperature=1.0, top_k=top_k)
        return speculative.accept(jnp.broadcast_to(logits, (n, 3, 5)), jnp.broadcast_to(drafts, (n, 2)), keys, sp)

    for drafts, top_k in [((0, 2), 0), ((4, 2), 0), ((3, 1), 2)]:
        kept, bonus = map(np.asarray, run(np.array(drafts, np.int32), top_k))
        p = probs if not top_k else np.where(np.argsort(np.argsort(-probs, axis=1), axis=1) < top_k, probs, 0.0)
        p = p / p.sum(axis=1, keepdims=True)
        first = np.where(kept >= 1, drafts[0], bonus)
        second = np.where(kept >= 2, drafts[1], bonus)[kept >= 1]
        # binomial std <= sqrt(0.25 / n) = 0.0025 (second: n * p(d_0) rows); 0.012 is >= 3.4 sigma.
        # Wrong rules are far outside: drawing the bonus from p_0 itself (the draft not removed)
        # gives P(d_0) = p (2 - p) = 0.51 for d_0 = 0 instead of 0.3.
        np.testing.assert_allclose(np.bincount(first, minlength=5) / n, p[0], atol=0.012, err_msg=str(drafts))
        if len(second):
            np.testing.assert_allclose(np.bincount(second, minlength=5) / len(second), p[1], atol=0.012 * (n / len(second)) ** 0.5)
        assert np.all(kept[first != drafts[0]] == 0)


def test_filtered_logits_equal_the_sampler_filters():
    """The distribution a draft is checked against is the one plain sampling draws from."""
    logits = np.random.default_rng(1).normal(0, 2, (3, 11)).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def both(top_k, top_p):
        sp = SamplingParams.create(temperature=0.7, top_k=top_k, top_p=top_p)
        return speculative.filtered_logits(logits, sp), filter_logits(logits / 0.7, top_k, top_p)

    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)]:
        got, want = both(top_k, top_p)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, err_msg=str((top_k, top_p)))


def test_speculative_samples_follow_the_model_distribution():
    """3 new tokens from a 5-token vocabulary: every one of the 125 continuations has its exact
    probability from the model's full forward. Total variation between N samples and it must stay
    below the 99.9th percentile of what N draws from the exact distribution itself give."""
    V, N, T = 5, 6000, 1.0
    cfg = tiny(vocab_size=V, n_layer=1, position_embedding="rotary", sliding_window=4)  # the ring wraps
    params = params_for(cfg, 2, 4.0)
    context = [1, 2, 3, 3, 3, 3, 3]  # greedy's own loop: drafts (3s) are often, not always, kept
    kw = dict(max_new_tokens=3, temperature=T, top_k=4, eos_id=None, speculate=2)
    out = generate_with_stats(cfg, params, [context], num_samples=N, seed=1, **kw)
    s = out.speculation
    assert 0.3 < s.acceptance_rate < 0.8, s
    seqs = np.array(out.tokens)  # [N, 3]
    observed = np.bincount(seqs @ np.array([V * V, V, 1]), minlength=V**3) / N

    # Exact: logits after every prefix x1 x2 (all 25), one forward.
    pairs = np.array(list(itertools.product(range(V), repeat=2)))
    rows = jnp.asarray(np.concatenate([np.broadcast_to(context, (len(pairs), len(context))), pairs], axis=1))
    logits = np.asarray(jax.jit(GPT2(cfg).apply)({"params": params}, rows), np.float64) / T  # [25, L+2, V]

    def dist(z):  # top-4 of 5, renormalised (argsort is stable: ties go to the lower id, as lax.top_k)
        keep = np.argsort(np.argsort(-z, kind="stable"), kind="stable") < 4
        e = np.where(keep, np.exp(z - z.max()), 0.0)
        return e / e.sum()

    L = len(context)
    exact = np.zeros((V, V, V))
    for (a, b), z in zip(pairs, logits):
        exact[a, b] = dist(z[L - 1])[a] * dist(z[L])[b] * dist(z[L + 1])
    exact = exact.reshape(-1)
    tv = 0.5 * np.abs(observed - exact).sum()
    rng = np.random.default_rng(0)
    null = 0.5 * np.abs(rng.multinomial(N, exact, size=2000) / N - exact).sum(axis=1)
    assert tv < np.quantile(null, 0.999), (tv, np.quantile(null, 0.999))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(speculate=-1), r"speculate=-1 must be an integer in \[0, 64\]"),
        (dict(speculate=65), r"speculate=65 must be an integer in \[0, 64\]"),
        (dict(speculate=True), "speculate=True must be an integer"),
        (dict(speculate=0, draft=(tiny(), None)), "speculate=0 with a draft model: drafting needs speculate >= 1"),
        (dict(speculate=2, draft=(tiny(vocab_size=50), None)), "vocab_size=50 differs from the model's 97"),
        (dict(speculate=2, draft=(tiny(block_size=16), None)), r"context \(16 tokens\) is shorter than the model's \(48\)"),
    ],
)
def test_bad_speculation_arguments_are_refused(kwargs, match):
    cfg = tiny()
    with pytest.raises(ValueError, match=match):
        generate(cfg, sharp_params(cfg), [[1, 2, 3]], max_new_tokens=4, **kwargs)

