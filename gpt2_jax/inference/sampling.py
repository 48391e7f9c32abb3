"""Sampling, the public API: `generate`, `generate_with_stats` and `stream`, on one `SamplingOptions`.

    from gpt2_jax.inference.sampling import generate
    new_tokens = generate(config, params, [prompt_ids], max_new_tokens=64, temperature=0.8, top_k=200)

One call prepares the prompts on the host (prompts.py: checks, truncation, left padding,
bucketing), compiles a prefill and a decode loop (decode.py, choosing tokens by token_choice.py;
or speculative.py's loop with `speculate=K`) once per static setting and shape
(compilation_cache.executable), and runs them.

Rules:
- eos: a row stops when it samples `eos_id`; the eos token itself is not returned (so a completion
  decodes to clean text). A returned row shorter than `max_new_tokens` therefore means the row
  hit eos or filled the context. `eos_id=None` never stops early.
- length: the context of a model with learned positions, or with rotary positions and full
  attention, is `block_size` tokens (`context_length`). A prompt must leave room for at least one
  new token (at most block_size - 1 tokens), else PromptTooLongError - unless `truncate='left'`,
  which drops a prompt's oldest tokens so that prompt + max_new_tokens fits, but keeps at least
  half the context for the prompt. New tokens are clipped, per row, to the room its prompt leaves:
  a full context ends a row like eos does. Rotary positions with a sliding window have no
  limit: the cache is a ring of `window` slots.
- compiled code: prompt length and generation length are rounded up to powers of two (at least
  16); sampling values (temperature, top_k, top_p, seed, eos_id) are runtime inputs. Static:
  greedy or not, top-p on or off, and top_k's power-of-two bucket.
- randomness: row r samples step s with fold_in(fold_in(key(seed), r), s), so a row's samples
  depend on the seed and its row index only. Greedy output of a prompt never depends on the
  other prompts in the batch.
- speculate=K: the decode loop is speculative.py's instead, which checks K drafted tokens per
  pass of the model; the rules above hold there too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import compilation_cache
from gpt2_jax.inference import decode, speculative
from gpt2_jax.inference.decode import DecodeWeights, SamplingState
from gpt2_jax.inference.options import validate_sampling, validate_speculate
from gpt2_jax.inference.prompts import EOT_ID, Batch, PromptTooLongError, context_length, prepare
from gpt2_jax.inference.token_choice import SamplingParams, categorical, filter_logits, next_token
from gpt2_jax.model.config import ModelConfig

__all__ = [  # the sampler's names, importable from here as before the split
    "EOT_ID", "DecodeWeights", "Generation", "PromptTooLongError", "SamplingOptions", "SamplingParams",
    "SamplingState", "TokenStream", "categorical", "context_length", "filter_logits", "generate",
    "complete", "generate_with_stats", "next_token", "stream",
]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Everything a call of `generate` / `generate_with_stats` / `stream` takes besides the model and
    the prompts. Those functions take these fields as keywords too (`generate(..., max_new_tokens=8)`),
    or an options object, with keywords overriding its fields."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int = 0
    num_samples: int = 1  # samples per prompt (rows are prompt-major)
    eos_id: int | None = EOT_ID  # None = never stop early
    truncate: str = "none"  # 'left': drop a too-long prompt's oldest tokens
    speculate: int = 0  # drafted tokens per pass of the model (0 = plain decoding)
    draft: tuple[ModelConfig, Any] | None = None  # (config, params) of a draft model; None = prompt lookup

    @classmethod
    def of(cls, options: SamplingOptions | None, overrides: dict) -> SamplingOptions:
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(f"options={options!r} must be a SamplingOptions (or pass its fields as keywords)")
        return dataclasses.replace(options, **overrides)

    def sampling_params(self) -> SamplingParams:
        """The checked token-choice settings (ValueError naming a bad value)."""
        sp = SamplingParams.create(self.temperature, self.top_k, self.top_p)
        validate_sampling(num_samples=self.num_samples)
        return sp

    def speculation(self, config: ModelConfig) -> speculative.Speculation | None:
        """None for plain decoding, else the checked settings of speculative decoding."""
        validate_speculate(self.speculate, has_draft=self.draft is not None)
        return None if self.speculate == 0 else speculative.Speculation.create(config, self.speculate, self.draft)


def _as_device_params(params):
    return jax.tree_util.tree_map(jnp.asarray, params)  # numpy (e.g. device_get) -> device arrays


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens of every row (prompt-major: prompt 0's samples, then prompt 1's...) and timings."""

    tokens: list[list[int]]
    compile_s: float  # compilation in this call (0 when every executable was cached)
    run_s: float  # prefill + decode, compilation excluded
    speculation: speculative.SpeculationStats | None = None  # drafts proposed and kept (speculate > 0)


def _finish_row(tokens: np.ndarray, limit: int, eos_id: int | None) -> list[int]:
    row = tokens[:limit].tolist()
    if eos_id is not None and eos_id in row:
        row = row[: row.index(eos_id)]
    return row


class _Run:
    """One prepared batch: compiles and runs prefill, then the decode loop (plain or speculative,
    gpt2_jax/inference/speculative.py) in chunks."""

    def __init__(self, config: ModelConfig, params, batch: Batch, sp: SamplingParams, seed: int, eos_id: int | None,
                 spec: speculative.Speculation | None = None):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.config, self.sp, self.batch, self.spec = config, sp, batch, spec
        self.params = _as_device_params(params)
        self.weights: decode.DecodeWeights | None = None  # made after the prefill, which uses the stacked params
        self.compile_s = self.run_s = 0.0
        self.eos_id = eos_id
        self._inputs = (
            jnp.asarray(batch.prompt),
            jnp.asarray(batch.positions),
            jnp.asarray(batch.row_limit),
            jax.random.key(seed),
            jnp.int32(-1 if eos_id is None else eos_id),
        )
        # Speculation starts from plain decoding's prefill (one compiled program for both).
        self._prefill, t = compilation_cache.executable(
            decode.prefill, (config, batch.gen_len), self.params, *self._inputs
        )
        self.compile_s += t
        self._draft_prefill = self.draft_params = None
        self._decode_fn, self._decode_static = decode.decode_loop, (config,)
        if spec is not None:
            self._decode_fn, self._decode_static = speculative.decode_loop, (config, spec.k, spec.draft_config)
            if spec.draft_config is not None:
                self.draft_params = _as_device_params(spec.draft_params)
                self._draft_prefill, t = compilation_cache.executable(
                    decode.prefill, (spec.draft_config, batch.gen_len), self.draft_params, *self._inputs
                )
                self.compile_s += t
        self._decode = None  # looked up once: every advance() has the same shapes
        self.state: decode.SamplingState | None = None

    def _first_state(self):
        """Runs the prefill (and, speculating, turns its state into the speculative loop's)."""
        start = time.perf_counter()
        state = jax.block_until_ready(self._prefill(self.params, *self._inputs))
        if self.spec is None:
            self.run_s += time.perf_counter() - start
            return state
        draft = None
        if self._draft_prefill is not None:
            draft = jax.block_until_ready(self._draft_prefill(self.draft_params, *self._inputs))
        self.run_s += time.perf_counter() - start
        prompt, positions = self._inputs[:2]
        static = (self.config, self.spec.k, self.spec.draft_config)
        begin, t = compilation_cache.executable(speculative.start, static, state, draft, prompt, positions)
        self.compile_s += t
        start = time.perf_counter()
        state = jax.block_until_ready(begin(state, draft, prompt, positions))
        self.run_s += time.perf_counter() - start
        return state

    def _decode_weights(self):
        # The [out, in] layout when each step of plain decoding (or of a draft model) feeds one
        # row, and there are enough steps to repay transposing the block weights once.
        matvec = self.batch.prompt.shape[0] == 1 and int(self.batch.row_limit.max()) >= decode.MATVEC_MIN_TOKENS
        weights = decode.decode_weights(self.config, self.params, matvec=matvec and self.spec is None)
        if self.spec is not None and self.spec.draft_config is not None:
            return weights, decode.decode_weights(self.spec.draft_config, self.draft_params, matvec=matvec)
        return weights

    def advance(self, limit: int) -> decode.SamplingState:
        """Runs the decode loop until `limit` tokens per row are written (or all rows are done);
        a speculative round may write a few more."""
        if self.state is None:
            self.state = self._first_state()
            start = time.perf_counter()
            self.weights = jax.block_until_ready(self._decode_weights())
            self.run_s += time.perf_counter() - start
        args = (self.weights, self.sp, self.state, jnp.int32(limit))
        if self._decode is None:
            self._decode, t = compilation_cache.executable(
                self._decode_fn, self._decode_static, *args, donate_argnums=(2,)
            )
            self.compile_s += t
        start = time.perf_counter()
        self.state = jax.block_until_ready(self._decode(*args))
        self.run_s += time.perf_counter() - start
        return self.state


def generate_with_stats(
    config: ModelConfig, params, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, **kwargs
) -> Generation:
    """`generate`, also returning compile and run times (and, speculating, the drafts' fate)."""
    opts = SamplingOptions.of(options, kwargs)
    sp = opts.sampling_params()
    spec = opts.speculation(config)
    batch = prepare(config, prompts, opts.max_new_tokens, opts.num_samples, opts.truncate)
    if opts.max_new_tokens == 0:
        return Generation([[] for _ in batch.row_limit], 0.0, 0.0)
    run = _Run(config, params, batch, sp, opts.seed, opts.eos_id, spec)
    state = run.advance(opts.max_new_tokens)
    tokens = np.asarray(state.tokens)
    rows = [_finish_row(tokens[r], int(batch.row_limit[r]), opts.eos_id) for r in range(tokens.shape[0])]
    stats = None if spec is None else speculative.SpeculationStats.of(state)
    return Generation(rows, run.compile_s, run.run_s, stats)


def generate(
    config: ModelConfig, params, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, **kwargs
) -> list[list[int]]:
    """New tokens for each prompt (each sample), without the prompt; see the module docstring.

    Takes SamplingOptions' fields as keywords (`max_new_tokens` is required), or an options object.
    Returns len(prompts) * num_samples lists, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].
    temperature=0 is greedy; top_k=0 and top_p=1 switch those filters off. Each row stops at
    `eos_id` (not included in the output) or when its context is full.

    `speculate=K > 0` decodes speculatively (gpt2_jax/inference/speculative.py): K drafted tokens
    per pass of the model, from prompt lookup, or from `draft=(draft_config, draft_params)`, a
    smaller model with the same vocabulary. Greedy output is the same; samples follow the same
    distribution (other draws for the same seed).
    """
    return generate_with_stats(config, params, prompts, options, **kwargs).tokens


class TokenStream:
    """Iterator over the new tokens of one prompt (one sample), one decode step per token.

    Made by `stream`. The same compiled prefill and decode loop as `generate` run here (the loop
    is asked for one more token per call), so the tokens equal generate(...)[0] for the same
    arguments. `compile_s` and `run_s` (prefill + decode, compilation excluded) grow as it runs.
    """

    def __init__(self, run: _Run):
        self._run, self._limit, self._step = run, int(run.batch.row_limit[0]), 0  # limit <= max_new_tokens

    @property
    def compile_s(self) -> float:
        return self._run.compile_s

    @property
    def run_s(self) -> float:
        return self._run.run_s

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._step >= self._limit:
            raise StopIteration
        state = self._run.state
        if state is None or int(state.count[0]) <= self._step:  # a speculative pass may have run ahead
            state = self._run.advance(self._step + 1)
        token = int(state.tokens[0, self._step])
        self._step += 1
        if self._run.eos_id is not None and token == self._run.eos_id:
            self._limit = 0
            raise StopIteration
        if bool(state.done[0]):
            self._limit = min(self._limit, int(state.count[0]))  # a speculative round may run ahead
        return token


def stream(
    config: ModelConfig, params, prompt: Sequence[int], options: SamplingOptions | None = None, **kwargs
) -> TokenStream:
    """Like generate(config, params, [prompt], ...)[0], but yields each token as it is produced
    (speculating, a pass's tokens come together). One sample: num_samples must be 1.

    Arguments are checked (and the prefill compiled) now; the model runs as the stream is read.
    """
    opts = SamplingOptions.of(options, kwargs)
    if opts.num_samples != 1:
        raise ValueError(f"num_samples={opts.num_samples!r}: a stream yields one sample; use generate for more")
    sp = opts.sampling_params()
    spec = opts.speculation(config)
    batch = prepare(config, [prompt], opts.max_new_tokens, 1, opts.truncate)
    return TokenStream(_Run(config, params, batch, sp, opts.seed, opts.eos_id, spec))


def complete(config: ModelConfig, params, prompt: str | Sequence[int], *, max_new_tokens: int, seed: int = 0,
             temperature: float = 0.8, top_k: int = 200) -> str:
    """The prompt and a sampled continuation as text (GPT-2's tokenizer): what train.py prints at
    the end of a run. A text prompt may hold <|endoftext|>; an empty one starts from it."""
    from gpt2_jax.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    if isinstance(prompt, str):
        prompt = tok.encode(prompt, allowed_special="all") or [tok.eot_token]
    new = generate(config, jax.device_get(params), [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, seed=seed)[0]
    return tok.decode(list(prompt) + list(new))
