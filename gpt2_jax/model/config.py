"""Model configuration: one frozen dataclass, the four GPT-2 presets, and validation.

Every field is a plain Python value so a config can be written to JSON inside a checkpoint and
rebuilt from it (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# The sizes OpenAI released. Counts (tied embeddings, learned positions, vocab 50257):
# 124,439,808 · 354,823,168 · 774,030,080 · 1,557,611,200.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

_DTYPES = ("float32", "bfloat16", "float16")
_POSITIONS = ("learned", "rotary")
_ATTENTION = ("auto", "blockwise", "dense", "splash", "cudnn")  # gpt2_jax/model/attention.py
_NORMS = ("layernorm", "rmsnorm")
_ACTIVATIONS = ("gelu", "relu2")
# What a block keeps for the backward pass (gpt2.py, REMAT_POLICIES says what each saves).
REMAT = ("none", "full", "save_dots", "save_qkv")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT-2 style decoder.

    Defaults are GPT-2 small (124M). `n_kv_head=None` means multi-head attention (= n_head);
    1 is multi-query; any divisor of n_head is grouped-query.
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    block_size: int = 1024  # longest sequence the model attends over (and the size of wpe)
    vocab_size: int = 50257  # the tokenizer's vocabulary
    # Pad the embedding table to a multiple of this (64 turns 50257 into 50304, which matmuls
    # like better). The padded rows never reach a softmax or a sample: logits are cut to vocab_size.
    pad_vocab_to_multiple: int = 1
    position_embedding: str = "learned"  # 'learned' (GPT-2) | 'rotary'
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # None = full causal attention; w = attend to the last w tokens
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # activations and matmuls
    param_dtype: str = "float32"  # stored parameters (and so optimizer state)
    # Which of each block's activations the backward pass recomputes instead of keeping: 'none',
    # 'full' (all of them), 'save_dots' or 'save_qkv' (gpt2.py). False / True mean 'none' / 'full'
    # and are stored as those names.
    remat: str = "none"
    scan_layers: bool = True  # one compiled block applied n_layer times; False unrolls the loop
    # How attention over whole rows runs (gpt2_jax/model/attention.py): 'auto' picks splash on
    # TPU, cuDNN on GPU (bf16/fp16), blockwise on CPU. Numerics equal the dense rule in every case.
    attention: str = "auto"
    # The modern-recipe switches (each says what it does below). Defaults are GPT-2's, and
    # only the defaults can be exported to Hugging Face GPT-2 (model/hf.py says which cannot).
    norm: str = "layernorm"  # 'layernorm' (GPT-2) | 'rmsnorm' (scale only, no mean, no bias)
    qk_norm: bool = False  # RMS-normalise each head's q and k over head_dim, with a learned gain
    mlp_activation: str = "gelu"  # 'gelu' (GPT-2's tanh GELU) | 'relu2' (relu(x) ** 2)
    tie_embeddings: bool = True  # False: a separate output head lm_head [padded_vocab, E]
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c); 0 = off
    zero_init_proj: bool = False  # attention out, MLP proj (and an untied head) start at zero
    # How the training and evaluation loss computes the head: 0 = the whole logits [B, T, V] at
    # once; N > 0 = N positions at a time, logits [B, N, V] per chunk, never [B, T, V]
    # (gpt2_jax/model/loss.py); 'auto' = the measured best for the mesh's platform (loss.py).
    # The same loss and gradients either way; sampling always takes whole logits.
    loss_chunk: int | str = "auto"

    # ----------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one trained token at sequence length `seq_len`: the one formula for MFU,
        preflight and the benchmarks.

        6 per matmul weight (a multiply-add forward, two backward: input and weight gradients) over
        q, k, v, the attention output, the MLP and the head's vocab_size x n_embd matmul (tied to
        wte or not, it costs the same; padded vocabulary rows are not model
        work), plus the attention scores Q K^T and the mix A V: 12 n_embd FLOPs per (query, key)
        pair attended, forward and backward. A causal query at t attends to t + 1 keys, so on average
        about seq_len / 2 (the masked half is not model work, and the blockwise kernel skips it),
        and at most sliding_window (the query itself included) with a window. Biases, norms and embedding lookups are
        left out, as in PaLM's count (Chowdhery et al. 2022, app. B).
        """
        E, H = self.n_embd, self.head_dim
        per_layer = E * H * (self.n_head + 2 * self.kv_heads) + self.n_head * H * E + 2 * E * self.mlp_dim
        matmul_weights = self.n_layer * per_layer + self.vocab_size * E
        T = seq_len
        if self.sliding_window is None or self.sliding_window >= T:
            keys_per_query = (T + 1) / 2
        else:  # the first w queries see 1..w keys, the rest w each
            w = self.sliding_window
            keys_per_query = (w * (w + 1) / 2 + (T - w) * w) / T
        return 6.0 * matmul_weights + 12.0 * self.n_layer * self.n_head * H * keys_per_query

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not a known preset; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides}).validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys are {sorted(names)}")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes).validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> ModelConfig:
        """Returns self, or raises ValueError naming the key, its value and the rule it broke."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_to_multiple"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{key}={value!r} must be a positive integer")
        need(self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None:
            need(isinstance(self.n_kv_head, int) and self.n_kv_head > 0,
                 f"n_kv_head={self.n_kv_head!r} must be a positive integer or None")
            need(self.n_head % self.n_kv_head == 0,
                 f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.n_inner is not None:
            need(isinstance(self.n_inner, int) and self.n_inner > 0,
                 f"n_inner={self.n_inner!r} must be a positive integer or None")
        need(self.position_embedding in _POSITIONS,
             f"position_embedding={self.position_embedding!r} must be one of {_POSITIONS}")
        if self.position_embedding == "rotary":
            need(self.head_dim % 2 == 0,
                 f"head_dim={self.head_dim} (n_embd/n_head) must be even for rotary positions")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0,
             f"rope_theta={self.rope_theta!r} must be positive")
        if self.sliding_window is not None:
            need(isinstance(self.sliding_window, int) and not isinstance(self.sliding_window, bool)
                 and self.sliding_window > 0,
                 f"sliding_window={self.sliding_window!r} must be None or a positive integer")
        need(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
             f"dropout={self.dropout!r} must be in [0, 1)")
        need(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0,
             f"layer_norm_eps={self.layer_norm_eps!r} must be positive")
        need(self.dtype in _DTYPES, f"dtype={self.dtype!r} must be one of {_DTYPES}")
        need(self.param_dtype in _DTYPES, f"param_dtype={self.param_dtype!r} must be one of {_DTYPES}")
        need(isinstance(self.remat, str) and self.remat in REMAT,
             f"remat={self.remat!r} must be one of {REMAT} (or False / True for 'none' / 'full')")
        need(isinstance(self.scan_layers, bool), f"scan_layers={self.scan_layers!r} must be a bool")
        need(self.attention in _ATTENTION, f"attention={self.attention!r} must be one of {_ATTENTION}")
        need(self.norm in _NORMS, f"norm={self.norm!r} must be one of {_NORMS}")
        need(self.mlp_activation in _ACTIVATIONS,
             f"mlp_activation={self.mlp_activation!r} must be one of {_ACTIVATIONS}")
        for key in ("qk_norm", "tie_embeddings", "zero_init_proj"):
            need(isinstance(getattr(self, key), bool), f"{key}={getattr(self, key)!r} must be a bool")
        need(isinstance(self.logit_softcap, (int, float)) and not isinstance(self.logit_softcap, bool)
             and self.logit_softcap >= 0,
             f"logit_softcap={self.logit_softcap!r} must be a number >= 0 (0 = off)")
        need(self.loss_chunk == "auto" or (isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool)
                                           and self.loss_chunk >= 0),
             f"loss_chunk={self.loss_chunk!r} must be 'auto', 0 (whole logits) or a positive number of positions")
        return self

    def __post_init__(self) -> None:
        # remat was a bool before it named policies: configs and checkpoints that say False / True
        # keep working, and compare equal to the names they mean.
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        self.validate()


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (works on abstract shapes from jax.eval_shape)."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def model_config_from(model_cfg: Any) -> ModelConfig:
    """ModelConfig from the `config.model` block of a training config (an ml_collections ConfigDict).

    A non-empty `preset` sets n_layer, n_head and n_embd (whatever those keys say); leave it empty
    to give the shape by hand. Every other key is taken as written. `init_from` is not read here:
    it is a training-time key, and the trainer takes the architecture from that source instead
    (gpt2_jax/training/init_from.py); this returns what the config itself says.
    """
    d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    preset = d.pop("preset", "") or ""
    d.pop("init_from", None)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; known keys are {sorted(names)}")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"config.model.preset={preset!r} is not a known preset; choose one of {sorted(PRESETS)}")
        d.update(PRESETS[preset])
    return ModelConfig(**d).validate()
