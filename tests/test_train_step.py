"""Optimizer pieces (schedule, decay mask) and the train / eval steps: accumulation, overfitting,
non-finite updates, mixed precision, batch checks."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.model import abstract_params
from gpt2_jax.model.config import model_config_from
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib
from gpt2_jax.training.optim import decay_mask, make_optimizer, make_schedule

_BASE = os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=97, pad_vocab_to_multiple=8)
VOCAB = TINY["vocab_size"]


def make_config(model=None, **train):
    spec = importlib.util.spec_from_file_location("base_config", _BASE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.update({**TINY, **(model or {})})
    cfg.train.update(dict(global_batch_size=8, warmup_steps=0, num_steps=100, learning_rate=1e-3, min_lr=1e-4,
                          adam_eps=1e-6))  # see tests/test_sharding.py for why eps is 1e-6 in comparisons
    cfg.train.update(train)
    return cfg


def mesh_of(data=1, fsdp=1, tensor=1):
    n = data * fsdp * tensor
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:n])


def token_batch(mesh, batch_size=8, length=16, seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (batch_size, length + 1)).astype(np.int32)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
    return {"inputs": put(tokens[:, :-1]), "targets": put(tokens[:, 1:])}


# Most step tests share one mesh with all three axes, one initial state and a cache of compiled
# steps (the state does not depend on accumulation, the skip switch or the compute dtype), so
# the file compiles each distinct step once. Global batch 16: micro-batches of 16/4 = 4 still
# split over data x fsdp = 4.
SHARED_MESH = dict(data=2, fsdp=2, tensor=2)
SHARED_BATCH = 16
_CACHE: dict = {}


def shared_state():
    """(initial state, its shardings) on the shared mesh. Pass `fresh(...)` copies to steps."""
    if "state" not in _CACHE:
        cfg = make_config(global_batch_size=SHARED_BATCH)
        run = run_lib.run_from_config(cfg, mesh_of(**SHARED_MESH))
        _CACHE["state"] = (run_lib.create_train_state(run), run.state_shardings)
    return _CACHE["state"]


def shared_step(model=None, **train):
    """A train step on the shared mesh for config overrides; compiled once per distinct config."""
    cfg = make_config(model, global_batch_size=SHARED_BATCH, **train)
    key = repr(cfg.to_dict())  # equal configs share one compiled step
    if key not in _CACHE:
        _CACHE[key] = step_lib.make_train_step(run_lib.run_from_config(cfg, mesh_of(**SHARED_MESH)))
    return _CACHE[key]


# Settings that overfit quickly, in fp32 and bf16. skip_nonfinite_updates is on so the skip test
# shares the fp32 step (on finite steps it changes nothing, which the overfit test checks).
FAST = dict(learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, num_steps=300,
            skip_nonfinite_updates=True)


def shared_batch(seed=0):
    return token_batch(mesh_of(**SHARED_MESH), batch_size=SHARED_BATCH, seed=seed)


def accumulated_step(k: int):
    """(metrics, params) of one step from the shared state with k micro-batches; computed once per k."""
    if ("accum", k) not in _CACHE:
        state, shardings = shared_state()
        new_state, metrics = shared_step(grad_accum_steps=k)(fresh(state, shardings), shared_batch())
        _CACHE[("accum", k)] = (jax.device_get(metrics), jax.device_get(new_state.params))
    return _CACHE[("accum", k)]


def fresh(state, shardings):
    """A copy of `state` (train steps donate theirs), so one initialisation serves several steps."""
    return jax.device_put(state, shardings, may_alias=False)


# --------------------------------------------------------------------------- schedule
def test_schedule_exact_values():
    cfg = make_config(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10)
    lr = make_schedule(cfg.train, num_steps=110)
    expected = {
        0: 0.0,  # warmup starts at zero
        5: 5e-4,
        10: 1e-3,  # warmup end: the peak
        60: 5.5e-4,  # cosine midpoint: halfway between peak and floor
        110: 1e-4,  # the last step: min_lr
        500: 1e-4,  # constant after
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 110, end_value=1e-4)
    for step in range(0, 130, 7):
        np.testing.assert_allclose(float(lr(step)), float(reference(step)), rtol=1e-5, atol=1e-12)
    assert float(make_schedule(make_config(warmup_steps=0).train, num_steps=50)(0)) == pytest.approx(1e-3)
    assert float(make_schedule(cfg.train)(0)) == 0.0 and float(make_schedule(cfg.train)(100)) == pytest.approx(1e-4)


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match=r"warmup_steps=-1 must be a non-negative integer"):
        make_schedule(make_config(warmup_steps=-1).train, num_steps=10)
    short = make_schedule(make_config(warmup_steps=20).train, num_steps=10)  # ends inside the warmup
    assert float(short(10)) == pytest.approx(1e-3 * 10 / 20)
    with pytest.raises(ValueError, match=r"min_lr=0.01 must be in \[0, learning_rate=0.001\]"):
        make_schedule(make_config(min_lr=1e-2).train)
    with pytest.raises(ValueError, match=r"num_steps=0 must be a positive integer"):
        make_schedule(make_config().train, num_steps=0)


# --------------------------------------------------------------------------- weight decay
def test_decay_mask_covers_exactly_kernels_and_embeddings():
    params = abstract_params(model_config_from(make_config().model))
    mask = decay_mask(params)
    decayed, kept = [], []
    for path, flag in jax.tree_util.tree_leaves_with_path(mask):
        (decayed if flag else kept).append(jax.tree_util.keystr(path, simple=True, separator="/"))
    assert sorted(decayed) == sorted([
        "wte/embedding", "wpe/embedding", "blocks/attn/q/kernel", "blocks/attn/kv/kernel",
        "blocks/attn/out/kernel", "blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel",
    ])
    assert all(p.endswith(("/bias", "/scale")) for p in kept) and len(kept) == 11  # 5 biases, 3 LayerNorms
    with pytest.raises(ValueError, match=r"moe/router has leaf name 'router'"):
        decay_mask({"moe": {"router": jnp.zeros(3)}})


def test_adamw_decays_only_the_masked_leaves():
    cfg = make_config(learning_rate=0.1, min_lr=0.1, weight_decay=0.5, grad_clip=0.0)
    ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    params = {
        "wte": {"embedding": ones(5, 3)},
        "blocks": {
            "fc": {"kernel": ones(2, 3, 4), "bias": ones(2, 4)},
            "ln": {"scale": ones(2, 3), "bias": ones(2, 3)},
        },
    }
    tx = make_optimizer(cfg.train, make_schedule(cfg.train, num_steps=10))

    @jax.jit
    def decay_only(params):
        zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: only weight decay moves anything
        updates, _ = tx.update(zeros, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = decay_only(params)
    shrunk = 1 - 0.1 * 0.5  # 1 - lr * weight_decay
    np.testing.assert_allclose(new["wte"]["embedding"], shrunk, rtol=1e-6)
    np.testing.assert_allclose(new["blocks"]["fc"]["kernel"], shrunk, rtol=1e-6)
    for untouched in (new["blocks"]["fc"]["bias"], new["blocks"]["ln"]["scale"], new["blocks"]["ln"]["bias"]):
        np.testing.assert_array_equal(untouched, 1.0)


# --------------------------------------------------------------------------- loss
def test_cross_entropy_matches_log_softmax_and_is_fp32():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, VOCAB)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, VOCAB, (2, 3)), jnp.int32)
    x = np.asarray(logits, np.float64)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1).mean()
    cross_entropy = jax.jit(step_lib.cross_entropy)
    loss = cross_entropy(logits, targets)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    uniform = cross_entropy(jnp.zeros((2, 3, VOCAB), jnp.bfloat16), targets)
    np.testing.assert_allclose(float(uniform), math.log(VOCAB), rtol=1e-6)


# --------------------------------------------------------------------------- train step
def test_gradient_accumulation_equals_one_full_batch():
    ref_metrics, ref_params = accumulated_step(1)
    metrics, params = accumulated_step(4)  # four micro-batches: the accumulation loop runs past its first pass
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    # atol: 1/200 of one Adam step (lr = 1e-3). Summing micro-batch gradients in another order
    # changes a gradient near cancellation by ~1e-3 of itself, and Adam's first step, lr * g /
    # (|g| + eps), magnifies that for |g| ~ eps = 1e-6 (1.4e-6 seen on an AVX2 CPU). A wrong
    # accumulation (a missing micro-batch, a wrong divisor) moves params by up to lr and the
    # loss and grad_norm checks above.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6), params, ref_params)


def _overfit_run(dtype: str, steps: int = 60) -> dict:
    """`steps` FAST steps on one batch from the shared state in `dtype` compute: per-step metrics,
    the final step counter, the dtypes of the final params and optimizer state, and how many times
    the step compiled. Computed once per dtype. 60 steps: the fp32 loss is below 0.05 from step ~45
    and then flattens (0.018 at 60, 0.013 at 100)."""
    if ("overfit", dtype) not in _CACHE:
        state, shardings = shared_state()
        state, step = fresh(state, shardings), shared_step(dict(dtype=dtype), **FAST)
        batch, records = shared_batch(seed=3), []
        for _ in range(steps):
            state, metrics = step(state, batch)
            records.append(jax.device_get(metrics))
        dtypes = [x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim]
        _CACHE[("overfit", dtype)] = dict(metrics=records, final_step=int(state.step), dtypes=dtypes,
                                          compiles=step.jitted._cache_size())
    return _CACHE[("overfit", dtype)]


def test_tiny_model_overfits_one_batch_with_scheduled_lr_and_one_compile():
    run = _overfit_run("float32")
    schedule = make_schedule(make_config(**FAST).train)
    for i, metrics in enumerate(run["metrics"]):
        assert set(metrics) == {"loss", "grad_norm", "lr", "skipped"}
        assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
        assert float(metrics["lr"]) == pytest.approx(float(schedule(i)), rel=1e-6, abs=1e-12)
        assert float(metrics["skipped"]) == 0.0
    losses = [float(m["loss"]) for m in run["metrics"]]
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert losses[-1] < 0.05, f"loss only fell to {losses[-1]:.3f} in {len(losses)} steps"
    assert run["final_step"] == len(losses)
    assert run["compiles"] == 1  # one trace and compile for the whole run


def test_skip_nonfinite_keeps_params_and_optimizer_state():
    state, shardings = shared_state()
    # A NaN in token 0's embedding row reaches every position through the tied head: the loss is NaN.
    wte = state.params["wte"]["embedding"].at[0, 0].set(jnp.nan)
    poisoned = jax.device_put(state.replace(params={**state.params, "wte": {"embedding": wte}}), shardings)
    before = jax.device_get((poisoned.params, poisoned.opt_state))
    for skip in (True, False):
        # FAST switches skipping on; the default config leaves it off. Both steps are shared with other tests.
        step = shared_step(**FAST) if skip else shared_step()
        after, metrics = step(fresh(poisoned, shardings), shared_batch())
        assert not np.isfinite(float(metrics["loss"]))
        assert int(after.step) == 1
        kept = jax.tree.leaves(jax.tree.map(
            lambda a, b: np.array_equal(a, b, equal_nan=True), jax.device_get((after.params, after.opt_state)), before
        ))
        if skip:
            assert float(metrics["skipped"]) == 1.0 and all(kept)
        else:  # the update went through and spread the NaN; the trainer stops on the loss
            assert float(metrics["skipped"]) == 0.0 and not all(kept)


def shared_eval_loss() -> float:
    """The eval step's loss of the shared initial state on the shared batch."""
    if "eval_loss" not in _CACHE:
        state, _ = shared_state()
        eval_step = step_lib.make_eval_step(run_lib.run_from_config(make_config(), mesh_of(**SHARED_MESH)))
        _CACHE["eval_loss"] = float(eval_step(state.params, shared_batch())["loss"])
    return _CACHE["eval_loss"]


def test_eval_step_loss_is_the_train_step_loss():
    # Same state, same batch, no dropout: evaluation and training agree on what "loss" means.
    train_metrics, _ = accumulated_step(1)
    np.testing.assert_allclose(shared_eval_loss(), float(train_metrics["loss"]), rtol=1e-6)
    assert shared_eval_loss() == pytest.approx(math.log(VOCAB), abs=0.3)  # an untrained model


def test_bfloat16_compute_keeps_fp32_params_and_close_loss():
    # The bf16 run (its step shared with the loss-curve test): fp32 state after all its updates, and
    # its first loss against fp32's from the same state and batch (the train step's loss is the eval
    # step's, test_eval_step_loss_is_the_train_step_loss).
    bf16, fp32 = _overfit_run("bfloat16"), _overfit_run("float32")
    assert bf16["dtypes"] and all(dtype == jnp.float32 for dtype in bf16["dtypes"])
    loss, want = float(bf16["metrics"][0]["loss"]), float(fp32["metrics"][0]["loss"])
    assert loss == pytest.approx(want, abs=2e-2)
    assert loss != want  # bf16 really computed something different


def test_bad_batch_raises_before_compute():
    cfg = make_config()
    mesh = mesh_of(data=2)
    run = run_lib.run_from_config(cfg, mesh, num_steps=10)
    state = run.abstract_state  # allocates nothing
    step = step_lib.make_train_step(run)
    good = token_batch(mesh)
    with pytest.raises(ValueError, match=r"batch must be a dict with keys \('inputs', 'targets'\)"):
        step(state, {"inputs": good["inputs"]})
    with pytest.raises(ValueError, match=r"batch\['inputs'\] must be int32 token ids, got float32"):
        step(state, {**good, "inputs": good["inputs"].astype(jnp.float32)})
    with pytest.raises(ValueError, match=r"batch size B=6 differs from config.train.global_batch_size=8"):
        step(state, token_batch(mesh, batch_size=6))
    with pytest.raises(ValueError, match=r"batch length T=20 exceeds block_size=16"):
        step(state, token_batch(mesh, length=20))
    assert step.jitted._cache_size() == 0  # nothing was traced


# --------------------------------------------------------------------------- attention kernels
def _same_step(got, want):
    """Two (state, metrics) results of one step from the same state and batch agree to fp32 rounding."""
    (got_state, got_metrics), (want_state, want_metrics) = got, want
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
    # atol: 1/200 of Adam's first step, as in test_gradient_accumulation_equals_one_full_batch (another
    # summation order of a gradient near cancellation, magnified by lr * g / (|g| + eps)).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6),
                 jax.device_get(got_state.params), jax.device_get(want_state.params))


def test_splash_train_step_equals_blockwise_step_on_meshes():
    """The Pallas splash kernel (interpreted on CPU) under shard_map: batch over data x fsdp, heads
    over tensor. One step from the same state and batch equals the blockwise step."""
    state, shardings = shared_state()
    batch = shared_batch()
    want = shared_step()(fresh(state, shardings), batch)  # 'auto' is blockwise on CPU
    _same_step(shared_step(dict(attention="splash"))(fresh(state, shardings), batch), want)

    # fsdp=8, against the same blockwise step (tests/test_sharding.py shows blockwise steps agree
    # across meshes).
    mesh = mesh_of(fsdp=8)
    run = run_lib.run_from_config(make_config(dict(attention="splash"), global_batch_size=SHARED_BATCH), mesh)
    host_state, host_batch = jax.device_get((state, batch))
    on_mesh = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host_batch.items()}
    _same_step(step_lib.make_train_step(run)(jax.device_put(host_state, run.state_shardings), on_mesh), want)


# --------------------------------------------------------------------------- mixed precision
def test_bfloat16_training_tracks_the_float32_loss_curve():
    """60 steps of bf16 compute (fp32 params, AdamW state, logits and loss) against fp32, on a
    curve that falls from log V = 4.6 to ~0.02.

    Tolerance: bf16 rounds every matmul input to 8 significant bits (0.4% relative); the loss
    itself is fp32 and the updates are applied to fp32 weights, so the two curves separate only
    by what those roundings change in each step. 2e-3 nats was the largest gap seen on one AVX-512
    CPU, 0.011 on another (AMD EPYC, where 0.02 nats + 2% of the fp32 loss is at least 3x the gap
    at every step, the closest at step 32; steps 60-100 are no closer); a real bf16 fault (a loss
    stuck near 4.6, a divergence, a slower descent) is off by far more in the steep middle of the curve."""
    fp32 = [float(m["loss"]) for m in _overfit_run("float32")["metrics"]]
    bf16 = [float(m["loss"]) for m in _overfit_run("bfloat16")["metrics"]]
    assert fp32[0] > 4.0 and fp32[-1] < 0.05, "the fp32 reference must fall far for the comparison to mean much"
    worst = max(abs(b - f) - (0.02 + 0.02 * f) for f, b in zip(fp32, bf16))
    assert worst <= 0, f"bf16 left the fp32 curve by {worst:.3f} nats beyond the tolerance"
    assert fp32 != bf16  # bf16 really computed something different


def test_bfloat16_step_runs_every_matmul_in_bfloat16():
    """In the program the bf16 train step hands to XLA, every dot has bf16 operands (fp32 results
    are allowed: the logits and the attention's accumulators). Read before XLA's CPU backend, which
    upcasts bf16 dots to fp32 itself since it has no bf16 GEMM; a TPU or GPU runs them as written."""
    import re

    state, shardings = shared_state()
    step = shared_step(dict(dtype="bfloat16"), **FAST)  # the bf16 runs' step
    with sharding.sharding_context(step.mesh):  # as the step runs: the program it traced (cached) and compiled
        text = step.jitted.lower(fresh(state, shardings), shared_batch()).as_text()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", text)
    assert len(dots) >= 20, f"found only {len(dots)} dots: the pattern no longer reads this program"
    fp32 = [operands for operands in dots if any(t.endswith("xf32>") for t in operands)]
    assert not fp32, f"{len(fp32)} matmuls run in fp32 in bf16 mode, e.g. {fp32[0]}"
