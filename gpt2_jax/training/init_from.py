"""Starting a training run from pretrained weights: `config.model.init_from`.

    python train.py --config configs/finetune_shakespeare.py --config.model.init_from=path/to/gpt2

`init_from` is '' (random init), a Hugging Face GPT-2 folder (config.json + model.safetensors) or a
gpt2-jax training workdir / checkpoint step folder. Only the parameters come from it: the
optimizer state, the step and the data position start fresh.

The source decides the architecture (`merge_model_config`):
  * n_layer, n_head, n_embd, n_inner, vocab_size and layer_norm_eps are the source's, whatever
    config.model says; one printed line lists them.
  * The config decides what the weights do not fix: dropout, dtype, param_dtype (the weights are
    cast to it), remat, scan_layers, attention, zero_init_proj, loss_chunk, and pad_vocab_to_multiple (the
    padding rows are zeros and never reach a logit). block_size too, but at most the source's learned position
    table, which a smaller block_size crops.
  * Every other key (position_embedding, n_kv_head, rope_theta, sliding_window, and the modern
    switches norm, qk_norm, mlp_activation, tie_embeddings, logit_softcap) is the source's
    where the config leaves ModelConfig's default, and an error where the config asks for
    something else, as is a preset that is not the source's shape. The head stays tied to wte
    (Hugging Face folders with an untied lm_head are refused).
Each refusal names the key and both values, in one line.

The weights go straight into their shards (`load_params`): Hugging Face tensors are read on the host
one parameter at a time and each device receives only its own shard; a gpt2-jax checkpoint is
restored by orbax into this run's layout, whatever mesh wrote it. So under fsdp the model is never
whole on one device.

A gs:// source works too: a gpt2-jax checkpoint is read where it is (orbax reads Cloud Storage);
a Hugging Face folder is copied once into config.data.cache_dir (storage.local_copy), as its
safetensors files are read as local files.

Resume wins (`resolve`): once the workdir holds a checkpoint, the run resumes from it and
init_from is not read again; the architecture then comes from that checkpoint, by the same rules.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gpt2_jax import storage
from gpt2_jax.model import hf as hf_lib
from gpt2_jax.model.config import PRESETS, ModelConfig, model_config_from
from gpt2_jax.model.gpt2 import abstract_params
from gpt2_jax.training import checkpoint as ckpt_lib

# What the weights are: always the source's.
FROM_SOURCE = ("n_layer", "n_head", "n_embd", "n_inner", "vocab_size", "layer_norm_eps")
# How the weights are computed and stored: the config's (block_size: at most a learned table's size;
# attention: the kernel choice, where ModelConfig has that key).
# zero_init_proj: an init, which the source's weights replace; loss_chunk: how the loss is computed.
FROM_CONFIG = ("dropout", "dtype", "param_dtype", "remat", "scan_layers", "attention", "pad_vocab_to_multiple",
               "block_size", "zero_init_proj", "loss_chunk")

HF, CHECKPOINT = "Hugging Face GPT-2", "gpt2-jax checkpoint"
DEFAULT_CACHE_DIR = "~/.cache/gpt2_jax"  # config.data.cache_dir's default: where a gs:// folder is copied


@dataclasses.dataclass(frozen=True)
class Source:
    """A pretrained model to start from: what it is, read without its weights."""

    init_from: str  # as written in the config
    path: str  # absolute (gs:// as given); a gs:// Hugging Face folder is read from its local copy
    kind: str  # HF | CHECKPOINT
    model_config: ModelConfig  # the architecture its weights have
    step: int | None = None  # CHECKPOINT: the step read, in `directory`
    directory: str | None = None


def open_source(init_from: str, *, cache_dir: str = DEFAULT_CACHE_DIR) -> Source:
    """Reads what `init_from` holds (config.json, or a checkpoint's meta), not its weights; a gs://
    Hugging Face folder is first copied into `cache_dir`.

    ValueError naming config.model.init_from when it is not a usable source.
    """
    storage.check(init_from, "config.model.init_from")
    path = storage.absolute(init_from)

    def refuse(why: str) -> ValueError:
        return ValueError(f"config.model.init_from={init_from!r}: {why}")

    if not storage.isdir(path):
        if storage.exists(path):
            raise refuse("is a file, not a folder")
        raise refuse("no such folder (docs/finetune.md says how to get GPT-2's weights)")
    try:
        if storage.exists(os.path.join(path, "config.json")):
            folder = storage.local_copy(path, cache_dir)
            config = hf_lib.read_hf_config(folder)
            hf_lib.safetensors_files(folder)  # the weights are there (or: how to convert pytorch_model.bin)
            return Source(init_from, folder, HF, config)
        try:
            directory, step, meta = ckpt_lib.newest_meta(path)
        except (FileNotFoundError, ValueError) as e:
            if storage.isdir(os.path.join(path, "checkpoints")) or storage.isdir(os.path.join(path, "params")):
                raise
            raise ValueError(
                f"{path} is neither a Hugging Face GPT-2 folder (it has no config.json) nor a gpt2-jax training "
                "workdir or checkpoint step folder"
            ) from e
        return Source(init_from, path, CHECKPOINT, ModelConfig.from_dict(meta["model"]), step, directory)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise refuse(_reason(e)) from None


def merge_model_config(model_cfg: Any, source: ModelConfig, label: str) -> ModelConfig:
    """The run's ModelConfig: `source`'s architecture with the config's free keys (module docstring).

    `model_cfg` is the config.model block; ValueError (one line, starting with `label`) lists every
    key the source cannot honour, with both values.
    """
    wanted = model_config_from(model_cfg)  # what the config says, validated (preset applied)
    defaults = ModelConfig()
    errors = []
    preset = model_cfg.get("preset", "") or ""
    if preset and any(getattr(source, k) != v for k, v in PRESETS[preset].items()):
        shape = ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items())
        theirs = ", ".join(f"{k}={getattr(source, k)}" for k in PRESETS[preset])
        errors.append(f"config.model.preset={preset!r} ({shape}) disagrees with the source ({theirs})")
    merged = {}
    for field in dataclasses.fields(ModelConfig):
        k = field.name
        mine, theirs = getattr(wanted, k), getattr(source, k)
        if k in FROM_SOURCE:
            merged[k] = theirs
        elif k in FROM_CONFIG:
            merged[k] = mine
        elif mine == theirs or mine == getattr(defaults, k) or (k == "n_kv_head" and mine == source.kv_heads):
            merged[k] = theirs
        elif k == "n_kv_head":
            errors.append(f"config.model.n_kv_head={mine}, but the source has {source.kv_heads} kv heads "
                          f"(n_kv_head={theirs})")
        else:
            errors.append(f"config.model.{k}={mine!r}, but the source has {k}={theirs!r}")
    if source.position_embedding == "learned" and wanted.block_size > source.block_size:
        errors.append(f"config.model.block_size={wanted.block_size} is larger than the source's learned position "
                      f"table (block_size={source.block_size})")
    if errors:
        raise ValueError(f"{label}: " + "; ".join(errors))
    return ModelConfig(**merged)


def describe(source: Source, config: ModelConfig) -> str:
    """One line: where the weights come from and which keys the source set."""
    keys = list(FROM_SOURCE) + [
        k for k in ("position_embedding", "n_kv_head", "rope_theta", "sliding_window")
        if k == "position_embedding" or getattr(config, k) != getattr(ModelConfig(), k)
    ]
    cropped = ""
    if config.position_embedding == "learned" and config.block_size < source.model_config.block_size:
        cropped = f" (its position table cropped from {source.model_config.block_size})"
    step = f" step {source.step}" if source.step is not None else ""
    where = source.init_from if storage.is_gcs(source.init_from) else source.path
    return (f"init_from: {source.kind}{step} at {where}; from the source: "
            + " ".join(f"{k}={getattr(config, k)}" for k in keys) + f"; block_size={config.block_size}{cropped}")


def resolve(model_cfg: Any, workdir: str, *, cache_dir: str = DEFAULT_CACHE_DIR) -> tuple[ModelConfig, Source | None]:
    """(the run's ModelConfig, the source to initialise from or None), reading no weights.

    None: init_from is '' (random init), or the workdir holds a checkpoint (resume wins: init_from is
    not read, and the architecture comes from the checkpoint, by merge_model_config's rules).
    """
    if model_cfg.get("init_from", ""):
        saved = ckpt_lib.saved_model(workdir)
        if saved is not None:
            _print(f"init_from: not read, the workdir holds checkpoints to resume from ({workdir})")
            return merge_model_config(model_cfg, ModelConfig.from_dict(saved), f"resuming {workdir}"), None
    config, source = _fresh(model_cfg, cache_dir)
    if source is not None:
        _print(describe(source, config))
    return config, source


def model_config_for(model_cfg: Any, *, cache_dir: str = DEFAULT_CACHE_DIR) -> ModelConfig:
    """The ModelConfig a fresh run of config.model trains (init_from's architecture where it is set)."""
    return _fresh(model_cfg, cache_dir)[0]


def _fresh(model_cfg: Any, cache_dir: str) -> tuple[ModelConfig, Source | None]:
    init_from = model_cfg.get("init_from", "") or ""
    if not init_from:
        return model_config_from(model_cfg), None
    source = open_source(init_from, cache_dir=cache_dir)
    return merge_model_config(model_cfg, source.model_config, f"config.model.init_from={init_from!r}"), source


def load_params(source: Source, config: ModelConfig, shardings: Any) -> Any:
    """The source's parameters for `config` (from merge_model_config), cast to its param_dtype and
    placed in `shardings` (a tree of NamedShardings like the params): each device reads its shards.

    ValueError naming config.model.init_from if the weights do not read or do not fit.
    """
    try:
        return _load(source, config, shardings)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ValueError(f"config.model.init_from={source.init_from!r}: {_reason(e)}") from None


def _load(source: Source, config: ModelConfig, shardings: Any) -> Any:
    if source.kind == HF:
        return hf_lib.hf_params(source.path, config, shardings)
    # Restore at the source's own shapes and dtype, the embedding tables' rows unsplit (a source's
    # vocabulary padding need not divide the tensor axis), then fit them to `config` in place.
    restore_shardings = jax.tree_util.tree_map_with_path(
        lambda path, s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec[1:])) if path[0].key in ("wte", "wpe") else s,
        shardings,
    )
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(abstract_params(source.model_config)), restore_shardings,
    )
    params = ckpt_lib.restore_params_at(source.directory, source.step, abstract)
    return jax.jit(lambda p: _fit(config, p), out_shardings=shardings)(params)


def _fit(config: ModelConfig, params: Any) -> Any:
    """Casts to param_dtype, crops the position table to block_size and re-pads the vocabulary."""
    params = jax.tree_util.tree_map(lambda x: x.astype(config.param_dtype), params)
    wte = params["wte"]["embedding"][: config.vocab_size]  # [V, E]
    params["wte"]["embedding"] = jnp.pad(wte, ((0, config.padded_vocab_size - config.vocab_size), (0, 0)))
    if "wpe" in params:
        params["wpe"]["embedding"] = params["wpe"]["embedding"][: config.block_size]
    return params


def _reason(e: Exception) -> str:
    # str() of a KeyError is the repr of its message (quoted, escaped); its message itself keeps the quotes
    # inside it intact, so that a suggested command still pastes into a shell.
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
