"""Document masking: a row packing documents A|B|C gives each document the logits (and gradients) it
has alone, for every attention implementation; positions and segment ids from the tokens; the train
and eval steps with config.data.document_mask on a sharded mesh; splash with segment ids compiled
for a TPU."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from gpt2_jax.data.documents import document_layout
from gpt2_jax.model import GPT2, attention
from gpt2_jax.model.config import ModelConfig, model_config_from
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib

EOT = 50256
LENGTHS = (5, 11, 6)  # A, B, C: B longer than the window below and than the blockwise test's block
CASES = {
    "mha-learned": dict(),
    "gqa-rotary-window4": dict(n_kv_head=2, position_embedding="rotary", sliding_window=4),
}
IMPLEMENTATIONS = ("dense", "blockwise", "splash", "cudnn")  # cudnn: falls back to blockwise (no segment ids)


def tiny(**extra) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64, **extra)


def packed_row():
    """tokens [1, T], positions and segment ids [1, T], and each document's slice of the row."""
    tokens = np.random.default_rng(0).integers(0, 64, (1, sum(LENGTHS))).astype(np.int32)
    bounds = np.cumsum((0,) + LENGTHS)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    segment_ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(LENGTHS)])[None]
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in LENGTHS])[None]
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids), slices


@pytest.fixture
def small_query_blocks(monkeypatch):
    """Blockwise attention in blocks of 8 tokens, so the 22-token row spans three query blocks and
    documents cross block edges."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)


def test_document_layout_starts_each_document_at_its_eot():
    tokens = jnp.asarray([[7, 8, EOT, 1, 2, EOT, EOT, 3], [EOT, 4, 5, 6, 7, 8, 9, 1]], jnp.int32)
    positions, segment_ids = jax.jit(document_layout)(tokens)  # one program, not an eager op at a time
    np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert positions.dtype == segment_ids.dtype == jnp.int32


def case_params(case: str):
    """The case's weights (GPT-2's init scale, numpy: no initialiser to compile); every
    implementation takes the same ones."""
    return random_params(tiny(**CASES[case]), std=0.02)


_LOGITS: dict = {}


def packed_logits(case: str):
    """(each document's logits alone and the packed row's logits without segment ids, by the dense
    rule; impl -> the packed row's logits with segment ids), all in one program, once per case.
    Traced under `small_query_blocks`, as every test that reads it runs."""
    if case not in _LOGITS:
        tokens, positions, segment_ids, slices = packed_row()

        @jax.jit
        def run(p, tokens, positions, segment_ids):
            dense = GPT2(tiny(attention="dense", **CASES[case]))
            alone = [dense.apply({"params": p}, tokens[:, s]) for s in slices]
            packed = {impl: GPT2(tiny(attention=impl, **CASES[case])).apply(
                {"params": p}, tokens, positions, segment_ids=segment_ids) for impl in IMPLEMENTATIONS}
            return alone, dense.apply({"params": p}, tokens, positions), packed

        _LOGITS[case] = run(case_params(case), tokens, positions, segment_ids)
    return _LOGITS[case]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_packed_documents_give_the_logits_of_each_document_alone(case, impl, small_query_blocks):
    alone, unmasked, packed = packed_logits(case)
    packed, slices = packed[impl], packed_row()[3]
    for s, want in zip(slices, alone):
        np.testing.assert_allclose(packed[:, s], want, atol=1e-5, rtol=1e-5)
    # The mask matters: without segment ids B's tokens see A's and their logits change.
    assert not np.allclose(packed[:, slices[1]], unmasked[:, slices[1]], atol=1e-3)


GRADIENT_IMPLEMENTATIONS = ("blockwise", "splash")
_GRADIENTS: dict = {}


def packed_gradients():
    """Parameter gradients of a loss on B's logits: "alone" for B alone by the dense rule, and impl ->
    those with B packed between A and C; one program, computed once (under `small_query_blocks`)."""
    if not _GRADIENTS:
        case = CASES["gqa-rotary-window4"]
        tokens, positions, segment_ids, slices = packed_row()
        weights = np.random.default_rng(3).standard_normal((1, LENGTHS[1], tiny().vocab_size), np.float32)

        @jax.jit
        def run(p, tokens, positions, segment_ids, weights):
            b = slices[1]

            def packed_loss(p, impl):
                logits = GPT2(tiny(attention=impl, **case)).apply({"params": p}, tokens, positions,
                                                                  segment_ids=segment_ids)
                return jnp.sum(logits[:, b] * weights)

            def alone_loss(p):
                return jnp.sum(GPT2(tiny(attention="dense", **case)).apply({"params": p}, tokens[:, b]) * weights)

            grads = {impl: jax.grad(packed_loss)(p, impl) for impl in GRADIENT_IMPLEMENTATIONS}
            return {**grads, "alone": jax.grad(alone_loss)(p)}

        _GRADIENTS.update(run(case_params("gqa-rotary-window4"), tokens, positions, segment_ids, weights))
    return _GRADIENTS


@pytest.mark.parametrize("impl", GRADIENT_IMPLEMENTATIONS)
def test_packed_gradients_equal_the_document_alone(impl, small_query_blocks):
    """Parameter gradients of a loss on B's logits: B packed between A and C, and B alone."""
    got, want = packed_gradients()[impl], packed_gradients()["alone"]
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        err = float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / (np.max(np.abs(np.asarray(w))) + 1e-30))
        assert err <= 1e-5, f"{jax.tree_util.keystr(path[0])}: relative error {err:.2e}"


def test_dropout_keeps_the_documents_apart():
    """Dropout on the attention probabilities runs the dense rule, masked by index and segment: with
    A's tokens changed, B's logits stay the same under the same dropout key."""
    cfg = tiny(dropout=0.1, **CASES["gqa-rotary-window4"])
    params = case_params("gqa-rotary-window4")
    tokens, positions, segment_ids, slices = packed_row()
    other = np.array(tokens)
    other[:, slices[0]] = (other[:, slices[0]] + 1) % 64

    @jax.jit
    def logits(p, t, positions, segment_ids):
        return GPT2(cfg).apply({"params": p}, t, positions, segment_ids=segment_ids, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(5)})

    got, want = (logits(params, t, positions, segment_ids)[:, slices[1]] for t in (other, tokens))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_segment_ids_are_refused_with_the_kv_cache():
    cfg = tiny()
    tokens, positions, segment_ids, _ = packed_row()
    with pytest.raises(ValueError, match="segment_ids are not supported with decode=True"):
        GPT2(cfg).init(jax.random.PRNGKey(0), tokens, positions, segment_ids=segment_ids, decode=True)


# --------------------------------------------------------------------------- the training config
_BASE = os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")


def training_config(**model):
    spec = importlib.util.spec_from_file_location("base_config", _BASE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.update(dict(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=24, vocab_size=50257,
                          position_embedding="rotary", loss_chunk=0, **model))
    cfg.train.update(dict(global_batch_size=4, warmup_steps=0, num_steps=10))
    cfg.data.document_mask = True
    return cfg


def eot_batch(batch_size=4, length=24, seed=0):
    """Random tokens with an <|endoftext|> every few tokens (documents of 1-12 tokens)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, (batch_size, length + 1)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.15] = EOT
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_document_mask_must_be_a_bool_and_needs_the_eot_token():
    cfg = training_config()
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"config.data.document_mask='yes' must be True or False"):
        run_lib.build_run(model_config_from(cfg.model), cfg.train, mesh, 10, document_mask="yes")
    cfg.model.vocab_size = 512
    with pytest.raises(ValueError, match=r"document_mask=True finds documents by <\|endoftext\|> \(50256\)"):
        run_lib.run_from_config(cfg, mesh)


def train_run():
    """The train step test's run: blockwise, 2 micro-batches of 4 rows on data x fsdp = 2 x 2."""
    cfg = training_config(attention="blockwise")
    cfg.train.update(dict(global_batch_size=8, grad_accum_steps=2))
    return run_lib.run_from_config(cfg, sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), jax.devices()[:4]))


_SHARED: dict = {}


def shared():
    """(the train run's fresh state on the host, a batch, its loss with and without the document mask
    by the dense rule, unsharded): the eval and train step tests both check against these, once.
    Random weights at GPT-2's init scale: only the optimizer's init is compiled, not the model's."""
    if not _SHARED:
        run, batch = train_run(), eot_batch(batch_size=8)
        params = jax.tree.map(np.asarray, random_params(run.model_config, std=0.02))  # host arrays: sliced in place
        state = run_lib.create_train_state(run, jax.device_put(params, run.state_shardings.params))
        state = jax.device_get(state)
        dense = run.model_config.replace(attention="dense")
        loss = functools.partial(step_lib.loss_fn, model_config=dense)
        losses = jax.jit(lambda p, b: (loss(p, b, document_mask=True), loss(p, b, document_mask=False)))(
            state.params, batch)
        _SHARED.update(state=state, batch=batch, masked=float(losses[0]), unmasked=float(losses[1]))
    return _SHARED


def test_eval_step_with_document_mask_sharded_over_fsdp_with_splash():
    """The eval step on 4 fsdp devices (splash per shard, interpreted) equals the unsharded dense loss
    computed from the same tokens' documents, and differs from the loss without the mask."""
    cfg = training_config(attention="splash")
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    run = run_lib.run_from_config(cfg, mesh)
    params = jax.device_put(shared()["state"].params, run.state_shardings.params)
    on_mesh = {k: jax.device_put(v, run.batch_sharding) for k, v in shared()["batch"].items()}
    got = float(step_lib.make_eval_step(run)(params, on_mesh)["loss"])
    want, unmasked = shared()["masked"], shared()["unmasked"]
    assert abs(got - want) <= 1e-5 * abs(want)
    assert abs(got - unmasked) > 1e-4


def test_train_step_loss_is_the_document_masked_loss():
    """The train step (2 micro-batches on data x fsdp = 2 x 2) reports the masked loss of its batch."""
    run = train_run()
    state = jax.device_put(shared()["state"], run.state_shardings)
    on_mesh = {k: jax.device_put(v, run.batch_sharding) for k, v in shared()["batch"].items()}
    _, metrics = step_lib.make_train_step(run)(state, on_mesh)
    want = shared()["masked"]
    assert abs(float(metrics["loss"]) - want) <= 1e-5 * abs(want)
