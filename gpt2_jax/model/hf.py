"""Import and export Hugging Face GPT-2 weights (a `save_pretrained` folder: config.json + safetensors).

HF GPT-2 stores attention and MLP weights as Conv1D, i.e. [in_features, out_features], which is
already our kernel layout: nothing is transposed, only reshaped. `c_attn` packs q, k, v along its
output axis; we keep q [E, N, H] and kv [E, 2, K, H] apart (K = N for GPT-2). Per-layer tensors
are stacked along a leading layer axis. No torch import: safetensors is read and written directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from gpt2_jax.model.config import ModelConfig

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Maps an HF GPT2Config dict to a ModelConfig, refusing what our model would compute differently."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(f"activation_function={act!r} is not supported: the model uses tanh GELU {_TANH_GELUS}")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False is not supported")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False is not supported: GPT-2 ties its input and output embeddings")
    if hf.get("add_cross_attention", False):
        raise ValueError("add_cross_attention=True is not supported")
    return ModelConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        n_inner=hf.get("n_inner"),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf["vocab_size"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        **overrides,
    ).validate()


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF GPT2Config dict for `config`, or ValueError if HF GPT-2 cannot represent the model."""
    reasons = []
    if config.position_embedding != "learned":
        reasons.append(f"position_embedding={config.position_embedding!r} (HF GPT-2 has learned positions only)")
    if config.kv_heads != config.n_head:
        reasons.append(f"n_kv_head={config.n_kv_head} != n_head={config.n_head} "
                       "(HF GPT-2 has multi-head attention only)")
    if config.sliding_window is not None:
        reasons.append(f"sliding_window={config.sliding_window} (HF GPT-2 attends over the full context)")
    if config.norm != "layernorm":
        reasons.append(f"norm={config.norm!r} (HF GPT-2 has LayerNorm only)")
    if config.qk_norm:
        reasons.append("qk_norm=True (HF GPT-2 has no q/k normalisation)")
    if config.mlp_activation != "gelu":
        reasons.append(f"mlp_activation={config.mlp_activation!r} (HF GPT-2 exports tanh GELU only)")
    if not config.tie_embeddings:
        reasons.append("tie_embeddings=False (HF GPT-2 ties lm_head to wte)")
    if config.logit_softcap:
        reasons.append(f"logit_softcap={config.logit_softcap} (HF GPT-2 has no logit soft-cap)")
    if reasons:
        raise ValueError("this model cannot be exported as a Hugging Face GPT-2: " + "; ".join(reasons))
    eot = 50256 if config.vocab_size > 50256 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": config.n_inner,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_eps,
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
    }


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files holding a Hugging Face model's weights, or FileNotFoundError saying what to do."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    if os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        raise FileNotFoundError(
            f"{folder!r} holds pytorch_model.bin but no model.safetensors; convert it once with python -c \"from "
            f"transformers import GPT2LMHeadModel as M; M.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    raise FileNotFoundError(
        f"{folder!r} holds no model.safetensors (nor model.safetensors.index.json); "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


class _Tensors:
    """The tensors of a folder's safetensors files, read one at a time into host memory (numpy)."""

    def __init__(self, folder: str):
        files = safetensors_files(folder)
        self.folder = folder
        self.where: dict[str, tuple[str, str]] = {}  # name without "transformer." -> (file, key)
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors file handle, not a dict
                    self.where[key.removeprefix("transformer.")] = (path, key)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
        """The tensor `name` as float32, checked against `shape` (None: any size on that axis)."""
        if name not in self.where:
            raise KeyError(f"tensor {name!r} is missing from the safetensors in {self.folder!r}")
        path, key = self.where[name]
        with safe_open(path, framework="numpy") as f:
            x = np.asarray(f.get_tensor(key), np.float32)
        if len(x.shape) != len(shape) or any(want not in (None, have) for have, want in zip(x.shape, shape)):
            raise ValueError(f"tensor {name!r} has shape {x.shape}, config.json implies {shape}")
        return x


def read_hf_config(folder: str, **config_overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 folder, from its config.json alone (no weights read)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{folder!r} is not a Hugging Face model folder: it has no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type={hf.get('model_type')!r} in {config_path}; only 'gpt2' can be loaded")
    return config_from_hf(hf, **config_overrides)


def load_hf_gpt2(folder: str, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face GPT-2 folder into (ModelConfig, params). Overrides go to the ModelConfig."""
    config = read_hf_config(folder, **config_overrides)
    return config, hf_params(folder, config)


def hf_params(folder: str, config: ModelConfig, shardings: Any = None) -> dict:
    """The weights of a Hugging Face GPT-2 folder in our layout, as `config.param_dtype` arrays.

    `config` has the folder's shape (read_hf_config), except that block_size may be smaller (the
    position table is cropped) and pad_vocab_to_multiple may differ (zero rows pad the table).
    Parameters are read into host memory one at a time. With `shardings` (a tree of jax Shardings
    shaped like the params) each device then receives only its own shard of each, so the model is
    never whole on one device; the host holds one stacked parameter at a time (at most ~2 GB, the
    MLP kernels of gpt2-xl in float32). Without, each parameter goes whole to the default device.
    """
    t = _Tensors(folder)
    L, E, N, H, F = config.n_layer, config.n_embd, config.n_head, config.head_dim, config.mlp_dim

    def layers(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([t.get(f"h.{i}.{name}", shape) for i in range(L)])  # [L, ...]

    def wte() -> np.ndarray:  # [padded_vocab, E]
        x = t.get("wte.weight", (config.vocab_size, E))
        if "lm_head.weight" in t and not np.array_equal(t.get("lm_head.weight", x.shape), x):
            raise ValueError("lm_head.weight differs from wte.weight: untied heads are not supported")
        return np.pad(x, ((0, config.padded_vocab_size - config.vocab_size), (0, 0)))

    def wpe() -> np.ndarray:  # [block_size, E]
        x = t.get("wpe.weight", (None, E))
        if x.shape[0] < config.block_size:
            raise ValueError(f"wpe.weight has {x.shape[0]} positions, fewer than block_size={config.block_size}")
        return x[: config.block_size]

    # Each leaf is a function, called once when its turn comes: c_attn packs q, k, v (read twice).
    readers = {
        "wte": {"embedding": wte},
        "wpe": {"embedding": wpe},
        "blocks": {
            "ln_1": {"scale": lambda: layers("ln_1.weight", (E,)), "bias": lambda: layers("ln_1.bias", (E,))},
            "attn": {
                "q": {"kernel": lambda: layers("attn.c_attn.weight", (E, 3 * E))[:, :, :E].reshape(L, E, N, H),
                      "bias": lambda: layers("attn.c_attn.bias", (3 * E,))[:, :E].reshape(L, N, H)},
                "kv": {"kernel": lambda: layers("attn.c_attn.weight", (E, 3 * E))[:, :, E:].reshape(L, E, 2, N, H),
                       "bias": lambda: layers("attn.c_attn.bias", (3 * E,))[:, E:].reshape(L, 2, N, H)},
                "out": {"kernel": lambda: layers("attn.c_proj.weight", (E, E)).reshape(L, N, H, E),
                        "bias": lambda: layers("attn.c_proj.bias", (E,))},
            },
            "ln_2": {"scale": lambda: layers("ln_2.weight", (E,)), "bias": lambda: layers("ln_2.bias", (E,))},
            "mlp": {
                "fc": {"kernel": lambda: layers("mlp.c_fc.weight", (E, F)),
                       "bias": lambda: layers("mlp.c_fc.bias", (F,))},
                "proj": {"kernel": lambda: layers("mlp.c_proj.weight", (F, E)),
                         "bias": lambda: layers("mlp.c_proj.bias", (E,))},
            },
        },
        "ln_f": {"scale": lambda: t.get("ln_f.weight", (E,)), "bias": lambda: t.get("ln_f.bias", (E,))},
    }
    dtype = jnp.dtype(config.param_dtype)
    if shardings is None:
        return jax.tree_util.tree_map(lambda read: jnp.asarray(read(), dtype), readers)

    def place(read, sharding) -> jax.Array:
        x = read()
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index].astype(dtype))

    return jax.tree_util.tree_map(place, readers, shardings)


def save_hf_gpt2(config: ModelConfig, params: dict, folder: str, dtype: str = "float32") -> None:
    """Writes (config, params) as a folder `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} must be one of float32, bfloat16, float16")
    hf = config_to_hf(config)
    hf["dtype"] = hf["torch_dtype"] = dtype
    L, E = config.n_layer, config.n_embd
    p = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    b, a = p["blocks"], p["blocks"]["attn"]
    c_attn_w = np.concatenate([a["q"]["kernel"].reshape(L, E, E), a["kv"]["kernel"].reshape(L, E, 2 * E)], -1)
    c_attn_b = np.concatenate([a["q"]["bias"].reshape(L, E), a["kv"]["bias"].reshape(L, 2 * E)], -1)
    out = {
        "wte.weight": p["wte"]["embedding"][: config.vocab_size],
        "wpe.weight": p["wpe"]["embedding"],
        "ln_f.weight": p["ln_f"]["scale"],
        "ln_f.bias": p["ln_f"]["bias"],
    }
    for i in range(L):
        per_layer = {
            "ln_1.weight": b["ln_1"]["scale"], "ln_1.bias": b["ln_1"]["bias"],
            "attn.c_attn.weight": c_attn_w, "attn.c_attn.bias": c_attn_b,
            "attn.c_proj.weight": a["out"]["kernel"].reshape(L, E, E), "attn.c_proj.bias": a["out"]["bias"],
            "ln_2.weight": b["ln_2"]["scale"], "ln_2.bias": b["ln_2"]["bias"],
            "mlp.c_fc.weight": b["mlp"]["fc"]["kernel"], "mlp.c_fc.bias": b["mlp"]["fc"]["bias"],
            "mlp.c_proj.weight": b["mlp"]["proj"]["kernel"], "mlp.c_proj.bias": b["mlp"]["proj"]["bias"],
        }
        out.update({f"h.{i}.{k}": v[i] for k, v in per_layer.items()})
    tensors = {f"transformer.{k}": jnp.asarray(np.ascontiguousarray(v), dtype) for k, v in out.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
