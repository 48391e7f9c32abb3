"""The one config schema: the fields of ModelConfig, TrainConfig, MeshConfig and DataConfig, each key
commented where it is defined (gpt2_jax/model/config.py, gpt2_jax/training/run_config.py). Other
files in configs/ override a few keys.

    python train.py --config configs/base.py --config.train.num_steps=100

Keys are fixed here: an override of a key that is not in this schema is an error
(ml_collections refuses unknown keys), so a typo never silently does nothing.
"""

import dataclasses

import ml_collections

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.training.run_config import DataConfig, MeshConfig, TrainConfig

# ModelConfig fields a config may also set to another type: remat takes False / True for 'none' / 'full'.
_ANY_TYPE = {"remat"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _block(cls) -> ml_collections.ConfigDict:
    """A config dataclass's fields and defaults as a ConfigDict. A field that may be None (n_kv_head,
    n_inner, sliding_window, the group learning rates) or of several types (loss_chunk: 'auto' or an
    int) is a typed reference, so that `--config.model.n_kv_head=2` parses as that field's type."""
    m = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        types = [t.strip() for t in str(field.type).split("|")]
        if "None" in types:
            m[field.name] = ml_collections.FieldReference(field.default, field_type=_TYPES[types[0]])
        elif len(types) > 1 or field.name in _ANY_TYPE:
            m[field.name] = ml_collections.FieldReference(field.default, field_type=object)
        else:
            m[field.name] = field.default
    return m


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---- model: every field of gpt2_jax.model.config.ModelConfig, with its default (what each key
    # does is said there, once), plus `preset` and `init_from`. One training default differs from
    # ModelConfig's: pad_vocab_to_multiple=64 (50257 -> 50304 embedding rows: faster matmuls; padded
    # logits are cut), where ModelConfig keeps Hugging Face GPT-2's shape (1).
    c.model = m = _block(ModelConfig)
    m.preset = ""  # '' | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl': sets n_layer, n_head, n_embd
    # '' = random init | a Hugging Face GPT-2 folder | a gpt2-jax workdir or checkpoint step folder: start
    # from its weights (only they: optimizer, step and data start fresh). The source then sets the shape
    # keys; see gpt2_jax/training/init_from.py. Not read once the workdir holds a checkpoint (resume wins).
    m.init_from = ""
    m.pad_vocab_to_multiple = 64

    # ---- training, device mesh, data: the fields of TrainConfig, MeshConfig and DataConfig
    # (gpt2_jax/training/run_config.py says what each key does, once), with their defaults.
    c.train = _block(TrainConfig)
    c.mesh = _block(MeshConfig)  # data x fsdp x tensor must equal the device count (-1 = all remaining)
    c.data = _block(DataConfig)
    c.lock()  # unknown keys are errors, not silent additions
    return c
