"""The one config schema, every key commented. Other files in configs/ override a few keys.

    python train.py --config configs/base.py --config.train.num_steps=100

Keys are fixed here: an override of a key that is not in this schema is an error
(ml_collections refuses unknown keys), so a typo never silently does nothing.
"""

import dataclasses

import ml_collections

from gpt2_jax.model.config import ModelConfig

# ModelConfig fields a config may also set to another type: remat takes False / True for 'none' / 'full'.
_ANY_TYPE = {"remat"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _model_block() -> ml_collections.ConfigDict:
    """ModelConfig's fields and defaults as a ConfigDict. A field that may be None (n_kv_head,
    n_inner, sliding_window) or of several types (loss_chunk: 'auto' or an int) is a typed reference,
    so that `--config.model.n_kv_head=2` parses as that field's type."""
    m = ml_collections.ConfigDict()
    for field in dataclasses.fields(ModelConfig):
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
    c.model = m = _model_block()
    m.preset = ""  # '' | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl': sets n_layer, n_head, n_embd
    # '' = random init | a Hugging Face GPT-2 folder | a gpt2-jax workdir or checkpoint step folder: start
    # from its weights (only they: optimizer, step and data start fresh). The source then sets the shape
    # keys; see gpt2_jax/training/init_from.py. Not read once the workdir holds a checkpoint (resume wins).
    m.init_from = ""
    m.pad_vocab_to_multiple = 64

    # ---- training
    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000  # optimizer steps; ignored when num_epochs > 0
    t.num_epochs = 0  # > 0: train this many passes over the training windows instead
    t.global_batch_size = 8  # sequences per optimizer step, over all devices and hosts
    t.grad_accum_steps = 1  # micro-batches per step: each is global_batch_size / grad_accum_steps
    t.optimizer = "adamw"  # 'adamw' (GPT-2) | 'muon': Muon on the blocks' matrices, AdamW on the rest
    t.learning_rate = 6e-4  # peak, reached after warmup (AdamW's, for every group left at None below)
    t.min_lr = 6e-5  # end of the decay; every group's rate shrinks by the same factor min_lr / learning_rate
    t.warmup_steps = 100
    t.lr_schedule = "cosine"  # 'cosine' | 'wsd' (warmup, stable at the peak, linear decay at the end)
    t.decay_fraction = 0.2  # wsd only: the decay takes this last fraction of the steps
    # Peak rates of the AdamW groups (training/optim.py); None = learning_rate.
    t.embed_learning_rate = ml_collections.FieldReference(None, field_type=float)  # wte, wpe
    t.head_learning_rate = ml_collections.FieldReference(None, field_type=float)  # an untied lm_head
    t.scalar_learning_rate = ml_collections.FieldReference(None, field_type=float)  # biases, norm gains
    # optimizer='muon': the blocks' q, k/v, attention out and MLP kernels, each orthogonalised as the
    # matrix it is (layers, and k apart from v, are separate matrices).
    t.muon_learning_rate = 0.02
    t.muon_momentum = 0.95  # Nesterov momentum before the orthogonalisation
    t.muon_weight_decay = 0.0  # decoupled, times muon_learning_rate (AdamW groups use weight_decay)
    t.muon_split_heads = False  # True: orthogonalise each head's slice of q, k, v and out on its own
    t.weight_decay = 0.1  # on matmul kernels and embeddings only (not biases, not LayerNorm)
    t.adam_b1 = 0.9
    t.adam_b2 = 0.95
    t.adam_eps = 1e-8
    t.grad_clip = 1.0  # global-norm clipping; 0 disables
    t.seed = 0  # params init, data order and dropout all derive from it
    t.eval_every = 200  # steps; 0 disables periodic eval
    t.eval_steps = 20  # global batches per eval, run as grad_accum_steps micro-batches each
    t.log_every = 10  # steps between metrics.jsonl records
    t.checkpoint_every = 500  # steps; a checkpoint is also written at the end
    t.keep_checkpoints = 3
    t.skip_nonfinite_updates = False  # True: a NaN/Inf loss skips the update instead of stopping
    t.peak_flops_per_device = 0.0  # for MFU; 0 = known TPU/GPU peak, or a fixed CPU reference (trainer.py)
    t.sample_tokens = 64  # tokens sampled from the model at the end of training; 0 disables
    t.sample_prompt = ""  # '' = the first line of the training data
    # On resume: 'keep' follows the checkpoint's learning-rate schedule (length, warmup, peak, floor),
    # so a longer num_steps goes on at min_lr; 'replan' plans it from this config (training/resume.py).
    t.resume_schedule = "keep"
    # Watching a run (README "Watching a run"); each is off by default.
    t.profile_start = 0  # the first step of a jax.profiler trace into WORKDIR/profile (steps count from 1)
    t.profile_steps = 0  # how many steps it traces, left out of tokens_per_s and mfu; 0 = no trace
    t.hellaswag = ""  # HellaSwag's validation jsonl: hellaswag_acc / hellaswag_acc_norm at each eval; '' = off
    t.hellaswag_examples = 0  # score its first N examples (10,042 in all; ~1000 is a cheap signal); 0 = all
    t.wandb_project = ""  # log to this Weights & Biases project too (pip install -e ".[wandb]"); '' = off

    # ---- device mesh: data x fsdp x tensor must equal the device count (-1 = all remaining)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # replicate parameters, split the batch
    c.mesh.fsdp = 1  # shard parameters and optimizer state (ZeRO-3), split the batch
    c.mesh.tensor = 1  # split attention heads and MLP columns
    # TPU slices joined by the data-centre network (multi-slice): data, fsdp and tensor above are per
    # slice, and the data axis also spans the slices (only data parallelism crosses the slow link).
    # `train.py --preflight --topology v5e-16 --slices 2` compiles such a run.
    c.mesh.slices = 1

    # ---- data
    c.data = d = ml_collections.ConfigDict()
    # 'builtin:shakespeare' | a .txt file | a folder of .txt/.md | a .jsonl with "text" |
    # llm.c/modded-nanogpt .bin token shards (a file, a folder or a glob)
    d.source = "builtin:shakespeare"
    d.val_source = ""  # optional separate validation source; '' = hold out val_fraction of source
    d.val_fraction = 0.05
    d.cache_dir = "~/.cache/gpt2_jax"  # prepared (tokenised) corpora are kept here and reused
    # True: a window's tokens attend only to earlier tokens of their own document, and positions restart at
    # 0 at each document's <|endoftext|> (which begins it); training and evaluation alike. Needs the GPT-2
    # vocabulary (the EOT id). See gpt2_jax/data/documents.py.
    d.document_mask = False
    c.lock()  # unknown keys are errors, not silent additions
    return c
