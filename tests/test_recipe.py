"""The modern recipe's switches: what each does to the model, Muon's parameter groups and matrices,
the per-group learning rates, the warmup-stable-decay schedule, sharded and resumed training with
all of them on, preflight's count, and the Hugging Face export refusing what GPT-2 cannot hold.

The KV-cache decode with the switches on is held to the full forward in tests/test_sampling.py."""

import functools
import importlib.util
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import final_params, losses

from gpt2_jax import GPT2, ModelConfig
from gpt2_jax.model.config import count_params, model_config_from
from gpt2_jax.model.gpt2 import abstract_params
from gpt2_jax.model.hf import config_to_hf
from gpt2_jax.model.layers import MLP, layer_norm
from gpt2_jax.training import optim, preflight, sharding
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import step as step_lib
from gpt2_jax.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 97
MODERN = dict(norm="rmsnorm", qk_norm=True, mlp_activation="relu2", tie_embeddings=False, logit_softcap=15.0,
              zero_init_proj=True)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=V,
                                 pad_vocab_to_multiple=8), **kw})


@functools.cache
def params_for(cfg: ModelConfig, seed: int = 0):
    """Random weights N(0, 0.1), norm gains 1 + N(0, 0.1), biases N(0, 0.1): no switch hides behind a 0."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(rng.normal(1.0 if p[-1].key == "scale" else 0.0, 0.1, s.shape).astype(np.float32)),
        nn.meta.unbox(abstract_params(cfg)))


@functools.cache
def forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: GPT2(cfg).apply({"params": params}, tokens))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 16)), jnp.int32)


def train_config(model=None, **train) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("base_config", os.path.join(ROOT, "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=V,
                        pad_vocab_to_multiple=8, **(model or {})))
    c.train.update({**dict(global_batch_size=8, warmup_steps=0, num_steps=10, learning_rate=1e-3, min_lr=1e-4,
                           adam_eps=1e-6), **train})
    return c


# --------------------------------------------------------------------------- the model's switches
def test_defaults_are_gpt2_and_bad_values_are_refused():
    cfg = ModelConfig()
    assert (cfg.norm, cfg.qk_norm, cfg.mlp_activation, cfg.tie_embeddings, cfg.logit_softcap, cfg.zero_init_proj) == (
        "layernorm", False, "gelu", True, 0.0, False)
    assert model_config_from(train_config().model) == tiny()  # configs/base.py carries the same defaults
    for key, value, rule in [("norm", "batchnorm", "must be one of"), ("mlp_activation", "swiglu", "must be one of"),
                             ("qk_norm", 1, "must be a bool"), ("logit_softcap", -1.0, "must be a number >= 0")]:
        with pytest.raises(ValueError, match=f"{key}={value!r} {rule}"):
            tiny(**{key: value})


def test_logit_softcap_is_c_tanh_of_the_uncapped_logits():
    capped = tiny(logit_softcap=1.0)
    params = params_for(tiny())  # the cap adds no parameter
    raw = np.asarray(forward(tiny())(params, TOKENS))
    got = np.asarray(forward(capped)(params, TOKENS))
    assert np.abs(raw).max() > 1.5  # the cap bites
    np.testing.assert_allclose(got, np.tanh(raw), rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() < 1.0


def test_an_untied_head_reads_its_own_table():
    untied = tiny(tie_embeddings=False)
    params = dict(params_for(untied))
    assert params["lm_head"]["embedding"].shape == params["wte"]["embedding"].shape == (104, 32)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    # With lm_head equal to wte the model is the tied one; with another table it is not.
    same = forward(untied)({**params, "lm_head": params["wte"]}, TOKENS)
    np.testing.assert_allclose(same, forward(tiny())(tied_params, TOKENS), rtol=1e-6)
    assert np.abs(np.asarray(forward(untied)(params, TOKENS)) - np.asarray(same)).max() > 1e-2


def test_zero_init_proj_starts_every_block_as_the_identity_and_the_head_at_zero():
    from gpt2_jax.model import init_params

    params = init_params(tiny(**MODERN), jax.random.PRNGKey(0))
    for leaf in (params["blocks"]["attn"]["out"]["kernel"], params["blocks"]["mlp"]["proj"]["kernel"],
                 params["lm_head"]["embedding"]):
        assert not np.any(np.asarray(leaf))
    assert np.asarray(params["blocks"]["mlp"]["fc"]["kernel"]).std() > 0.01  # the rest is GPT-2's init
    logits = forward(tiny(**MODERN))(params, TOKENS)
    np.testing.assert_array_equal(logits, 0.0)  # a zero head: the first loss is exactly log V
    gpt2 = init_params(tiny(), jax.random.PRNGKey(0))
    assert np.asarray(gpt2["blocks"]["mlp"]["proj"]["kernel"]).std() == pytest.approx(0.02 / 2, rel=0.2)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    def rescaled(params):  # q x 7, k x 0.3 (k is kv[..., 0, :, :]): per-head RMS norms undo both
        attn = jax.tree.map(np.asarray, params["blocks"]["attn"])  # numpy: no op to compile per shape
        kv_scale = np.asarray([0.3, 1.0], np.float32)[None, :, None, None]
        attn = {**attn, "q": {"kernel": attn["q"]["kernel"] * 7, "bias": attn["q"]["bias"] * 7},
                "kv": {"kernel": attn["kv"]["kernel"] * kv_scale[:, None], "bias": attn["kv"]["bias"] * kv_scale}}
        return {**params, "blocks": {**params["blocks"], "attn": attn}}

    diff = {}
    for qk_norm in (True, False):
        cfg = tiny(qk_norm=qk_norm, position_embedding="rotary")
        params = params_for(cfg)
        if qk_norm:
            assert params["blocks"]["attn"]["q_norm"]["scale"].shape == (2, 8)  # [layers, head_dim]
        diff[qk_norm] = np.abs(np.asarray(forward(cfg)(rescaled(params), TOKENS)) -
                               np.asarray(forward(cfg)(params, TOKENS))).max()
    assert diff[True] < 1e-3 and diff[False] > 300 * diff[True], diff  # what is left is RMSNorm's epsilon


def test_rmsnorm_and_relu2_compute_their_formulas():
    # The layers jitted (one program each, not one per operation); the formulas in numpy.
    cfg = tiny(norm="rmsnorm", mlp_activation="relu2")
    x = np.random.default_rng(2).normal(1.0, 2.0, (3, 32)).astype(np.float32)
    scale = np.linspace(0.5, 1.5, 32, dtype=np.float32)
    got = jax.jit(lambda p, x: layer_norm(cfg, None).apply({"params": p}, x))({"scale": scale}, x)
    want = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.layer_norm_eps) * scale
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(params_for(cfg)["ln_f"]) == {"scale"}  # no bias, no mean

    mlp = params_for(cfg)["blocks"]["mlp"]
    layer0 = jax.tree.map(lambda a: np.asarray(a[0]), mlp)
    h = x @ layer0["fc"]["kernel"] + layer0["fc"]["bias"]
    want = np.maximum(h, 0) ** 2 @ layer0["proj"]["kernel"] + layer0["proj"]["bias"]
    got = jax.jit(lambda p, x: MLP(cfg).apply({"params": p}, x))(layer0, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("switch", sorted(set(MODERN) - {"zero_init_proj"}))
def test_hf_export_refuses_a_model_gpt2_cannot_hold_naming_the_key(switch):
    cfg = tiny(n_kv_head=None, **{switch: MODERN[switch]})
    with pytest.raises(ValueError, match=f"cannot be exported as a Hugging Face GPT-2: {switch}="):
        config_to_hf(cfg)
    config_to_hf(tiny(n_kv_head=None, zero_init_proj=True))  # an init choice: the model is GPT-2's


def test_preflight_counts_the_untied_head_and_muon_state():
    tied = preflight.report(train_config(), 16)
    modern = preflight.report(train_config(MODERN, optimizer="muon"), 16)
    head = 104 * 32
    gains = 2 * 2 * 8 - 2 * (32 + 32) - 32  # q_norm + k_norm gains; RMSNorm drops ln_1, ln_2, ln_f biases
    assert modern["params"] == tied["params"] + head + gains
    assert modern["params"] == count_params(abstract_params(tiny(**MODERN)))


# --------------------------------------------------------------------------- Muon and the groups
def test_every_parameter_has_a_group_and_muon_takes_exactly_the_blocks_matrices():
    params = nn.meta.unbox(abstract_params(tiny(**MODERN)))
    groups = {jax.tree_util.keystr(p, simple=True, separator="/"): g
              for p, g in jax.tree_util.tree_leaves_with_path(optim.param_groups(params))}
    assert sorted(k for k, g in groups.items() if g == "hidden") == [
        "blocks/attn/kv/kernel", "blocks/attn/out/kernel", "blocks/attn/q/kernel", "blocks/mlp/fc/kernel",
        "blocks/mlp/proj/kernel"]
    assert groups["wte/embedding"] == groups["wpe/embedding"] == "embed" and groups["lm_head/embedding"] == "head"
    assert all(g == "scalar" for k, g in groups.items() if k.endswith(("bias", "scale")))
    with pytest.raises(ValueError, match="wte/embedding is not one of the blocks' hidden kernels"):
        optim.muon_dimension_numbers({"wte": {"embedding": jnp.zeros((4, 4))}})


@functools.cache
def _jitted_update(train_overrides: tuple):
    """(init, jitted update) of the optimizer of train_config(MODERN, **overrides): built once, so the
    same overrides are neither traced nor compiled twice."""
    c = train_config(MODERN, **dict(train_overrides)).train
    tx = optim.make_optimizer(c, optim.make_schedule(c))
    return jax.jit(tx.init), jax.jit(tx.update)


def _one_update(train_overrides: dict, grads, params):
    init, update = _jitted_update(tuple(sorted(train_overrides.items())))
    updates, _ = update(grads, init(params), params)
    return updates


# AdamW's per-group rates, and Muon on top of them: the Muon test and the groups test share this
# optimizer (one compiled update); each looks at the groups it is about.
RATES = dict(embed_learning_rate=2e-3, head_learning_rate=3e-3, scalar_learning_rate=5e-4, grad_clip=0.0)
MUON_LR = 0.05


def _spread(matrix) -> tuple[float, float]:
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return s.min(), s.max()


# The matrices Muon should see, written out here independently of optim.py: (reduction axes, output
# axes) of each stacked kernel; every other axis (layers, the k/v pair, heads when split) is a batch.
WHOLE = {"q": ((1,), (2, 3)), "kv": ((1,), (3, 4)), "out": ((1, 2), (3,)), "fc": ((1,), (2,)), "proj": ((1,), (2,))}
PER_HEAD = {**WHOLE, "q": ((1,), (3,)), "kv": ((1,), (4,)), "out": ((2,), (3,))}


def _as_matrices(x, view):
    """x [...] -> [batch, m, n] with the view's reduction axes as rows and output axes as columns."""
    reduction, output = view
    batch = [a for a in range(x.ndim) if a not in reduction + output]
    y = np.transpose(x, batch + list(reduction) + list(output))
    m, n = int(np.prod([x.shape[a] for a in reduction])), int(np.prod([x.shape[a] for a in output]))
    return y.reshape(-1, m, n), y.shape, batch + list(reduction) + list(output)


def _conditioned_like(x, view, rng):
    """An array of x's shape whose every view-matrix is U diag(s) V^T with s spread over [0.3, 1]."""
    mats, shape, order = _as_matrices(np.zeros(x.shape), view)
    for i in range(mats.shape[0]):
        m, n = mats.shape[1:]
        r = min(m, n)
        u = np.linalg.qr(rng.normal(size=(m, r)))[0]
        v = np.linalg.qr(rng.normal(size=(n, r)))[0]
        mats[i] = u @ np.diag(rng.uniform(0.3, 1.0, r)) @ v.T
    return np.transpose(mats.reshape(shape), np.argsort(order))


@pytest.mark.parametrize("split_heads", [False, True])
def test_muon_orthogonalises_each_layer_and_each_of_k_and_v_as_its_own_matrix(split_heads):
    params = params_for(tiny(**MODERN))
    rng = np.random.default_rng(3)
    views = PER_HEAD if split_heads else WHOLE
    grads = jax.tree.map(lambda p: rng.normal(0, 0.01, p.shape).astype(np.float32), params)
    for module in ("attn", "mlp"):
        for name in grads["blocks"][module]:
            if name in views:
                kernel = grads["blocks"][module][name]["kernel"]
                grads["blocks"][module][name]["kernel"] = _conditioned_like(kernel, views[name], rng).astype(np.float32)
    lr = MUON_LR
    over = dict(RATES, optimizer="muon", muon_learning_rate=lr, muon_split_heads=split_heads)
    u = _one_update(over, grads, params)
    for module in ("attn", "mlp"):
        for name, view in views.items():
            if name not in u["blocks"][module]:
                continue
            mats, _, _ = _as_matrices(np.asarray(u["blocks"][module][name]["kernel"]), view)
            m, n = mats.shape[1:]
            width = max(1.0, n / m) ** 0.5  # Muon's sqrt(fan_out / fan_in) for wide outputs
            for matrix in mats:  # orthogonal up to Newton-Schulz's tolerance (~0.7..1.2)
                lo, hi = _spread(matrix / (lr * width))
                assert lo > 0.6 and hi < 1.25, (name, matrix.shape, lo, hi)
    # Another gradient for layer 1 and for v leaves layer 0's k update as it was.
    moved = dict(grads, blocks=jax.tree.map(lambda g: g, grads["blocks"]))
    kv = moved["blocks"]["attn"]["kv"]["kernel"] = moved["blocks"]["attn"]["kv"]["kernel"].copy()
    kv[1] *= -3.0
    kv[0, :, 1] *= 0.5
    kv[0, :, 1, 0] = 0.1
    before = np.asarray(u["blocks"]["attn"]["kv"]["kernel"])
    again = np.asarray(_one_update(over, moved, params)["blocks"]["attn"]["kv"]["kernel"])
    np.testing.assert_allclose(again[0, :, 0], before[0, :, 0], rtol=1e-5, atol=1e-7)
    assert np.abs(again[0, :, 1] - before[0, :, 1]).max() > 1e-3


def test_adamw_groups_take_their_own_rates_and_muon_leaves_them_as_adamw_does():
    params = params_for(tiny(**MODERN))
    grads = jax.tree.map(lambda p: np.asarray(p) * 0.01 + 0.001, params)
    base = _one_update(dict(grad_clip=0.0), grads, params)
    rates = RATES
    grouped = _one_update(rates, grads, params)
    muon = _one_update(dict(rates, optimizer="muon", muon_learning_rate=MUON_LR, muon_split_heads=False), grads, params)
    ratio = lambda a, b: float(np.median(np.asarray(a) / np.asarray(b)))  # noqa: E731
    assert ratio(grouped["wte"]["embedding"], base["wte"]["embedding"]) == pytest.approx(2.0, rel=1e-4)
    assert ratio(grouped["lm_head"]["embedding"], base["lm_head"]["embedding"]) == pytest.approx(3.0, rel=1e-4)
    assert ratio(grouped["ln_f"]["scale"], base["ln_f"]["scale"]) == pytest.approx(0.5, rel=1e-4)
    assert ratio(grouped["blocks"]["mlp"]["fc"]["kernel"], base["blocks"]["mlp"]["fc"]["kernel"]) == 1.0
    for path in (("wte", "embedding"), ("lm_head", "embedding"), ("ln_f", "scale"), ("blocks", "attn", "q", "bias")):
        a, b = muon, grouped
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg="/".join(path))


def test_default_adamw_is_optax_adamw_state_and_numerics():
    c = train_config().train
    params = params_for(tiny())
    ours = optim.make_optimizer(c, optim.make_schedule(c))
    theirs = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adamw(
        optim.make_schedule(c), b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps, weight_decay=c.weight_decay,
        mask=optim.decay_mask))
    s1, s2 = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)  # old checkpoints restore
    update1, update2 = jax.jit(ours.update), jax.jit(theirs.update)  # compiled, as training applies them
    for seed in range(2):
        g = jax.tree.map(lambda p: np.asarray(p) * np.float32((seed + 1) * 0.1), params)
        u1, s1 = update1(g, s1, params)
        u2, s2 = update2(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u1, u2)


def test_warmup_stable_decay_schedule_values():
    c = train_config(warmup_steps=10, num_steps=100, learning_rate=1.0, min_lr=0.1, lr_schedule="wsd",
                     decay_fraction=0.3).train
    lr = optim.make_schedule(c)
    want = {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 70: 1.0, 85: 0.1 + 0.9 * 0.5, 100: 0.1, 150: 0.1}
    for step, value in want.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-6), step
    c.decay_fraction = 0.0
    with pytest.raises(ValueError, match="decay_fraction=0.0 must be in"):
        optim.make_schedule(c)
    c.decay_fraction, c.lr_schedule = 0.3, "linear"
    with pytest.raises(ValueError, match="lr_schedule='linear' must be one of"):
        optim.make_schedule(c)


# --------------------------------------------------------------------------- training with it all on
def test_modern_step_on_an_fsdp_tensor_mesh_equals_one_device():
    # Random weights, no zero among them (zero_init_proj's zero head would send step 1 no gradient
    # past the head), laid into the state as given: no init program to compile.
    cfg = train_config(dict(MODERN, zero_init_proj=False), optimizer="muon", lr_schedule="wsd", weight_decay=0.1,
                       muon_weight_decay=0.01)
    model_config = model_config_from(cfg.model)
    batch = np.random.default_rng(0).integers(0, V, (8, 17)).astype(np.int32)
    results = []
    for axes in (dict(data=1), dict(fsdp=4, tensor=2)):
        n = int(np.prod(list(axes.values())))
        mesh = sharding.make_mesh(dict(dict(data=1, fsdp=1, tensor=1), **axes), jax.devices()[:n])
        run = run_lib.build_run(model_config, cfg.train, mesh, 10)
        if not results:
            params = jax.device_put(jax.tree.map(np.asarray, params_for(model_config)), run.state_shardings.params)
            state = run_lib.create_train_state(run, params)
        else:
            state = jax.device_put(results[0][0], run.state_shardings)
        initial = jax.device_get(state)
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
        state, metrics = step_lib.make_train_step(run)(state, {"inputs": put(batch[:, :-1]),
                                                               "targets": put(batch[:, 1:])})
        results.append((initial, jax.device_get(state), jax.device_get(metrics)))
    (_, one, m1), (_, many, m8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), many.params, one.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), many.opt_state, one.opt_state)
    moved = np.abs(np.asarray(one.params["blocks"]["attn"]["q"]["kernel"]) -
                   np.asarray(results[0][0].params["blocks"]["attn"]["q"]["kernel"])).max()
    assert moved > 1e-3


def test_modern_recipe_resumes_exactly(tmp_path, corpus_cache):
    """Muon + every switch + wsd: 6 steps straight equal the same run resumed from its step-4
    checkpoint (its step-6 checkpoint removed, as if it had been killed after step 4)."""
    sys.path.insert(0, ROOT)
    from configs import tiny as tiny_cfg

    c = tiny_cfg.get_config()
    c.model.update(dict(MODERN, block_size=16))
    c.train.update(dict(optimizer="muon", lr_schedule="wsd", decay_fraction=0.5, num_steps=6, checkpoint_every=4,
                        eval_every=0, warmup_steps=1, keep_checkpoints=5))
    c.data.cache_dir = corpus_cache
    trainer_lib.train(c, str(tmp_path / "straight"))
    straight = losses(tmp_path / "straight")
    assert straight[6] < straight[1] - 0.1
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    for name in os.listdir(tmp_path / "resumed" / "checkpoints"):
        if name.split(".")[0] == "6":
            shutil.rmtree(tmp_path / "resumed" / "checkpoints" / name, ignore_errors=True)
            (tmp_path / "resumed" / "checkpoints" / name).unlink(missing_ok=True)
    c.train.optimizer = "adamw"  # another optimizer's state cannot carry over: one line says so
    with pytest.raises(ValueError, match=r"trained with optimizer 'muon', but config.train.optimizer='adamw'"):
        trainer_lib.train(c, str(tmp_path / "resumed"))
    c.train.optimizer = "muon"
    summary = trainer_lib.train(c, str(tmp_path / "resumed"))
    assert summary["start_step"] == 4 and summary["step"] == 6
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "resumed"), final_params(tmp_path / "straight"))
