"""Evaluation: perplexity == exp(mean token loss) computed independently (one window and strided),
multiple-choice scoring on endings whose answer is forced by construction, and the CLI."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, subprocess_env

from gpt2_jax import GPT2, ModelConfig
from gpt2_jax.inference.evaluate import (
    MultipleChoice,
    load_hellaswag,
    perplexity,
    score_multiple_choice,
    sliding_windows,
)
from gpt2_jax.inference.sampling import generate
from gpt2_jax.model.hf import save_hf_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 97


CFG = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=V)
PARAMS = random_params(CFG, std=0.1)
TEXT = np.random.default_rng(1).integers(0, V, 100).tolist()


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(cfg, params, inputs):
    return jax.nn.log_softmax(GPT2(cfg).apply({"params": params}, inputs)[0].astype(jnp.float32), axis=-1)


def token_losses(cfg, params, tokens) -> np.ndarray:
    """Loss of predicting tokens[1:] from everything before, by one plain forward. The inputs are
    padded to the full context: causal attention keeps the padding out of the real positions, and
    every length runs one compiled forward."""
    n = len(tokens) - 1
    inputs = np.zeros((1, cfg.block_size), np.int32)
    inputs[0, :n] = tokens[:-1]
    logp = np.asarray(_log_probs(cfg, params, jnp.asarray(inputs)))[:n]
    return -logp[np.arange(n), tokens[1:]]


def test_perplexity_of_a_text_within_one_window_is_exp_mean_token_loss():
    tokens = TEXT[:25]  # fits the 32-token context
    want = math.exp(token_losses(CFG, PARAMS, tokens).mean())
    assert perplexity(CFG, PARAMS, tokens) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("stride", [5, 16, 31])
def test_strided_perplexity_equals_the_mean_of_independently_computed_losses(stride):
    # Hugging Face's perplexity-guide loop, written out: a window of block_size tokens every
    # `stride` tokens; each window's last trg_len labels count, trg_len = end - prev_end.
    n, context = len(TEXT), CFG.block_size
    losses, prev_end = {}, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        window = TEXT[begin:end]
        window_losses = token_losses(CFG, PARAMS, window)  # targets window[1:]
        for i in range(max(1, len(window) - trg_len), len(window)):
            assert begin + i not in losses  # every token scored once...
            losses[begin + i] = window_losses[i - 1]
        prev_end = end
        if end == n:
            break
    assert sorted(losses) == list(range(1, n))  # ...and every token after the first is scored
    want = math.exp(np.mean(list(losses.values())))
    assert perplexity(CFG, PARAMS, TEXT, stride=stride) == pytest.approx(want, rel=1e-5)
    # A short context for late tokens costs: perplexity differs from the one-long-window value.
    assert stride == 31 or perplexity(CFG, PARAMS, TEXT, stride=stride) != perplexity(CFG, PARAMS, TEXT, stride=31)


def test_sliding_windows_score_each_token_once_and_refuse_bad_strides():
    for n, context, stride in [(100, 32, 5), (33, 32, 31), (10, 32, 16), (64, 32, 16)]:
        windows = sliding_windows(n, context, stride)
        scored = [j for w in windows for j in range(w.first_target, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.start <= context and w.start < w.first_target for w in windows)
    for bad in (0, 32, 40):
        with pytest.raises(ValueError, match=f"stride={bad} must be in"):
            sliding_windows(100, 32, bad)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(CFG, PARAMS, [5])


def test_batch_size_and_device_split_do_not_change_scores():
    assert len(jax.devices()) == 8  # tests/conftest.py: rows are split 8 ways
    a = perplexity(CFG, PARAMS, TEXT, stride=5, batch_size=1)
    b = perplexity(CFG, PARAMS, TEXT, stride=5, batch_size=17)
    assert a == pytest.approx(b, rel=1e-6)


def test_multiple_choice_picks_the_models_own_greedy_continuation():
    params = random_params(CFG, seed=2, std=0.2)  # peaked predictions: the greedy ending is clearly best
    rng = np.random.default_rng(3)
    examples = []
    for _ in range(6):
        ctx = rng.integers(0, V, rng.integers(4, 12)).tolist()
        right = generate(CFG, params, [ctx], max_new_tokens=4, temperature=0, eos_id=None)[0]
        wrong = [rng.integers(0, V, rng.integers(3, 6)).tolist() for _ in range(3)]
        label = int(rng.integers(0, 4))
        examples.append(MultipleChoice(ctx, wrong[:label] + [right] + wrong[label:], label))
    scores = score_multiple_choice(CFG, params, examples, batch_size=4)
    assert scores.predictions == scores.predictions_norm == [ex.label for ex in examples]
    assert scores.accuracy == scores.accuracy_norm == 1.0
    relabelled = [MultipleChoice(ex.context, ex.endings, (ex.label + 1) % 4) for ex in examples]
    assert score_multiple_choice(CFG, params, relabelled).accuracy == 0.0


def test_an_endings_score_is_its_summed_or_its_mean_token_loss():
    # Endings of 3 and 8 (then 2) tokens whose sums and means rank them in opposite orders.
    ctx = TEXT[:10]
    examples = [MultipleChoice(ctx, [TEXT[10:13], TEXT[40:48]], 0), MultipleChoice(ctx, [TEXT[10:13], TEXT[40:42]], 0)]
    scores = score_multiple_choice(CFG, PARAMS, examples)
    for i, ex in enumerate(examples):
        losses = [token_losses(CFG, PARAMS, ctx + e)[-len(e):] for e in ex.endings]
        by_sum, by_mean = int(np.argmin([x.sum() for x in losses])), int(np.argmin([x.mean() for x in losses]))
        assert by_sum != by_mean  # the two rules disagree here...
        assert (scores.predictions[i], scores.predictions_norm[i]) == (by_sum, by_mean)  # ...and each is applied


def test_load_hellaswag(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(
        json.dumps({"ctx": "A man is on a roof. he", "endings": ["is using wrap.", "starts pulling."], "label": "1"})
        + "\n\n"
        + json.dumps({"ctx": "x", "endings": ["y"], "label": 0})
        + "\n"
    )
    examples = load_hellaswag(str(path))
    assert len(examples) == 2 and examples[0].label == 1 and len(examples[0].endings) == 2
    assert load_hellaswag(str(path), limit=1) == examples[:1]
    from gpt2_jax.data.tokenizer import get_tokenizer

    assert examples[0].endings[1] == get_tokenizer().encode(" starts pulling.")
    path.write_text('{"ctx": "no endings"}\n')
    with pytest.raises(ValueError, match="hs.jsonl:1: not a HellaSwag record"):
        load_hellaswag(str(path))


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny GPT-2 with the real 50257-token vocabulary, as a Hugging Face folder."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
    folder = tmp_path_factory.mktemp("hf_eval")
    save_hf_gpt2(cfg, random_params(cfg, seed=4, std=0.1), str(folder))
    return str(folder)


def run_cli(*args, timeout=120):
    env = subprocess_env(2)  # the batch split over 2 devices
    return subprocess.run(
        [sys.executable, "-m", "gpt2_jax.evaluate", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_cli_perplexity_and_hellaswag_json(hf_folder, tmp_path):
    from gpt2_jax.data.tokenizer import get_tokenizer
    from gpt2_jax.model.hf import load_hf_gpt2

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = run_cli("--hf", hf_folder, "--text", str(text), "--stride", "8", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    cfg, params = load_hf_gpt2(hf_folder)
    tokens = get_tokenizer().encode(text.read_text())
    assert got["tokens"] == len(tokens) and got["stride"] == 8 and got["context"] == 32
    assert got["perplexity"] == pytest.approx(perplexity(cfg, params, tokens, stride=8), rel=1e-4)
    # Bits per byte by hand: the text's predicted tokens (all but the first) are its bytes but the first token's.
    scored_bytes = len(text.read_text().encode()) - len(get_tokenizer().decode_single_token_bytes(tokens[0]))
    assert got["bpb"] == pytest.approx(math.log(got["perplexity"]) * (len(tokens) - 1) / math.log(2) / scored_bytes,
                                       rel=1e-6)

    hs = tmp_path / "hs.jsonl"
    records = [{"ctx": f"Sentence {i}. It", "endings": ["was.", "is not", "x"], "label": i % 3} for i in range(5)]
    hs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_cli("--hf", hf_folder, "--hellaswag", str(hs), "--limit", "4", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["examples"] == 4 and len(got["predictions"]) == len(got["predictions_norm"]) == 4
    scores = score_multiple_choice(cfg, params, load_hellaswag(str(hs), limit=4))
    assert (got["accuracy"], got["accuracy_norm"]) == (scores.accuracy, scores.accuracy_norm)
    assert (got["predictions"], got["predictions_norm"]) == (scores.predictions, scores.predictions_norm)


def test_cli_bad_input_is_one_clear_line(hf_folder, tmp_path):
    out = run_cli("--hf", hf_folder)
    assert out.returncode == 2 and out.stderr == "error: give exactly one of --text FILE or --hellaswag FILE.jsonl\n"
    out = run_cli("--hf", hf_folder, "--text", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and out.stderr == f"error: {tmp_path / 'missing.txt'}: No such file or directory\n"


def test_bits_per_byte_by_hand():
    from gpt2_jax.data.token_bytes import bits_per_byte, byte_lengths, count_bytes
    from gpt2_jax.data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    text = "naïve café, 日本"  # 2- and 3-byte characters, some split over two tokens
    tokens = enc.encode(text)
    assert count_bytes(tokens) == len(text.encode("utf-8")) == 20
    assert count_bytes(np.array([tokens, tokens])) == 40  # any shape
    assert byte_lengths()[enc.eot_token] == 0  # a document separator is no text
    assert count_bytes(enc.encode("a<|endoftext|>b", allowed_special="all")) == 2
    # 1.5 nats a token over 10 tokens that are 25 bytes: 15 nats = 21.64 bits over 25 bytes.
    assert bits_per_byte(1.5, 10, 25) == pytest.approx(15 / math.log(2) / 25)
    with pytest.raises(ValueError, match="no bytes"):
        bits_per_byte(1.0, 3, 0)
    with pytest.raises(ValueError, match="token ids must be in"):
        count_bytes([50257])
