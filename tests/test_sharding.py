"""Mesh construction, the logical-axis rules table, shardings, and sharded == unsharded training."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gpt2_jax.model import abstract_params
from gpt2_jax.model.config import model_config_from
from gpt2_jax.model.layers import ACTIVATION_AXES
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib

_BASE = os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=97, pad_vocab_to_multiple=8)
NUM_STEPS = 10


def make_config(model=None, **train):
    spec = importlib.util.spec_from_file_location("base_config", _BASE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.update({**TINY, **(model or {})})
    # warmup 0: the first step uses the peak rate, so one step really moves the parameters.
    # adam_eps 1e-6: the key bias has an exactly-zero gradient (softmax ignores a shift shared by
    # all keys); Adam divides its rounding noise (~1e-11) by eps, and with 1e-8 the comparison
    # would be between two amplified noises rather than between two computations.
    cfg.train.update(dict(global_batch_size=8, warmup_steps=0, num_steps=NUM_STEPS, learning_rate=1e-3, min_lr=1e-4,
                          adam_eps=1e-6))
    cfg.train.update(train)
    return cfg


def mesh_of(data=1, fsdp=1, tensor=1, slices=1):
    n = data * fsdp * tensor * slices
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor, slices=slices), jax.devices()[:n])


def token_batch(mesh, batch_size=8, length=16, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 97, (batch_size, length + 1)).astype(np.int32)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
    return {"inputs": put(tokens[:, :-1]), "targets": put(tokens[:, 1:])}


# --------------------------------------------------------------------------- make_mesh
def test_make_mesh_fills_minus_one_and_names_axes():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert dict(sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_slices_stack_whole_slices_along_data():
    # Two simulated slices of 4 devices: fsdp and tensor stay inside a slice, data spans the slices.
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2, slices=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].flat) == [0, 1, 2, 3] and sorted(ids[1].flat) == [4, 5, 6, 7]
    assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=1, slices=4), 64) == {"data": 8, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "mesh_cfg,message",
    [
        (dict(data=1, fsdp=-1, tensor=1, slices=3), r"config.mesh.slices=3 does not divide the device count 8"),
        (dict(data=1, fsdp=-1, tensor=1, slices=0), r"config.mesh.slices=0 must be a positive integer"),
        (dict(data=1, fsdp=8, tensor=1, slices=2), r"needs 8 devices, but only 4 are available in each of 2 slices"),
        (dict(data=2, fsdp=2, tensor=1), r"data x fsdp x tensor = 4 .* must equal the device count 8"),
        (dict(data=-1, fsdp=-1, tensor=1), r"at most one axis may be -1"),
        (dict(data=4, fsdp=4, tensor=1), r"needs 16 devices, but only 8 are available"),
        (dict(data=16, fsdp=-1, tensor=1), r"needs 16 devices, but only 8 are available"),
        (dict(data=0, fsdp=-1, tensor=1), r"config.mesh.data=0 must be a positive integer or -1"),
        (dict(data=1, fsdp=-2, tensor=1), r"config.mesh.fsdp=-2 must be a positive integer or -1"),
        (dict(data=-1, fsdp=3, tensor=1), r"config.mesh.data=-1 cannot take the remaining devices: 8 devices"),
    ],
    ids=["slices-not-dividing", "slices-zero", "slices-too-big", "product", "two-minus-one", "too-big",
         "too-big-with-fill", "zero", "below-minus-one", "fill-not-dividing"],
)
def test_bad_mesh_raises_naming_the_values(mesh_cfg, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(mesh_cfg)


# --------------------------------------------------------------------------- rules table
def test_rules_table_maps_as_designed():
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert len(rules) == len(sharding.LOGICAL_AXIS_RULES), "a logical name appears twice in the table"
    assert rules == {
        "batch": ("data", "fsdp"), "embed": "fsdp",
        "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
        "head_dim": None, "kv": None, "layers": None, "position": None, "length": None, "act_embed": None,
    }


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_every_model_axis_name_has_a_rule(position):
    cfg = model_config_from(make_config(dict(position_embedding=position)).model)
    sharding.check_logical_names(abstract_params(cfg))  # raises on any unknown name
    sharding.logical_spec(ACTIVATION_AXES)


def test_unknown_logical_name_raises_instead_of_replicating():
    leaf = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    tree = {"layer": {"kernel": nn.Partitioned(leaf, names=("embed", "experts"))}}
    with pytest.raises(ValueError, match=r"layer/kernel: logical axis names \['experts'\] have no rule"):
        sharding.check_logical_names(tree)
    with pytest.raises(ValueError, match=r"layer/kernel: logical axis names \['experts'\]"):
        sharding.logical_to_sharding(tree, mesh_of())
    with pytest.raises(ValueError, match=r"layer/bias: has no logical axis names"):
        sharding.check_logical_names({"layer": {"bias": leaf}})


def test_parameter_specs_follow_the_table():
    cfg = model_config_from(make_config().model)
    shardings = sharding.logical_to_sharding(abstract_params(cfg), mesh_of(fsdp=4, tensor=2))
    assert shardings["wte"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["wpe"]["embedding"].spec == P(None, "fsdp")
    assert shardings["blocks"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["blocks"]["attn"]["kv"]["kernel"].spec == P(None, "fsdp", None, "tensor", None)
    assert shardings["blocks"]["attn"]["out"]["kernel"].spec == P(None, "tensor", None, "fsdp")
    assert shardings["blocks"]["mlp"]["fc"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["blocks"]["ln_1"]["scale"].spec == P(None, "fsdp")
    assert sharding.batch_sharding(mesh_of(data=2, fsdp=4)).spec == P(("data", "fsdp"), None)


def test_non_divisible_parameter_dimension_raises_with_path_and_sizes():
    # 4 heads over tensor=8: caught per parameter, naming path, shape, logical axis and mesh size.
    cfg = model_config_from(make_config(dict(n_kv_head=4)).model)
    with pytest.raises(ValueError, match=r"blocks/attn/kv/bias with shape \(2, 2, 4, 8\): dimension 2 \(logical axis "
                                         r"'kv_heads', size 4\) is not divisible by mesh axis 'tensor' of size 8"):
        sharding.logical_to_sharding(abstract_params(cfg), mesh_of(tensor=8))
    cfg = model_config_from(make_config(dict(pad_vocab_to_multiple=1, n_head=2, n_kv_head=2)).model)
    with pytest.raises(ValueError, match=r"wte/embedding with shape \(97, 32\): dimension 0 \(logical axis 'vocab'"):
        sharding.logical_to_sharding(abstract_params(cfg), mesh_of(tensor=2))


# --------------------------------------------------------------------------- validate_mesh_for
BAD_FOR_MESH = {  # id: (mesh axes, model overrides, train overrides, expected message)
    "batch-data": (dict(data=8), {}, dict(global_batch_size=12),
                   r"global_batch_size=12 is not divisible by mesh data x fsdp = 8 x 1"),
    "batch-data-fsdp": (dict(data=2, fsdp=4), {}, dict(global_batch_size=4),
                        r"global_batch_size=4 is not divisible by mesh data x fsdp = 2 x 4 = 8"),
    "micro-batch": (dict(fsdp=8), {}, dict(global_batch_size=8, grad_accum_steps=2),
                    r"micro-batch size .* = 4 is not divisible by mesh data x fsdp"),
    "accum": (dict(data=1), {}, dict(global_batch_size=8, grad_accum_steps=3),
              r"global_batch_size=8 is not divisible by config.train.grad_accum_steps=3"),
    "n_head": (dict(tensor=8), dict(n_kv_head=4), {},
               r"config.model.n_head=4 is not divisible by config.mesh.tensor=8"),
    "n_kv_head": (dict(fsdp=2, tensor=4), {}, {},
                  r"config.model.n_kv_head=2 is not divisible by config.mesh.tensor=4"),
    "mlp": (dict(tensor=2), dict(n_inner=33, n_head=2, n_kv_head=2), {},
            r"mlp dim .*=33 is not divisible by config.mesh.tensor=2"),
    "vocab": (dict(tensor=2), dict(pad_vocab_to_multiple=1, n_head=2, n_kv_head=2), {},
              r"padded vocab .*=97 is not divisible by config.mesh.tensor=2"),
    "embed": (dict(fsdp=8), dict(n_embd=36), {},
              r"config.model.n_embd=36 is not divisible by config.mesh.fsdp=8"),
}


@pytest.mark.parametrize("mesh_axes,model,train,message", BAD_FOR_MESH.values(), ids=BAD_FOR_MESH.keys())
def test_validate_mesh_for_names_key_value_and_rule(mesh_axes, model, train, message):
    cfg = make_config(model, **train)
    with pytest.raises(ValueError, match=message):
        sharding.validate_mesh_for(model_config_from(cfg.model), cfg.train, mesh_of(**mesh_axes))


def test_bad_mesh_fails_before_any_state_is_laid_out():
    cfg = make_config(dict(n_kv_head=4))
    with pytest.raises(ValueError, match=r"n_head=4 is not divisible by config.mesh.tensor=8"):
        run_lib.build_run(model_config_from(cfg.model), cfg.train, mesh_of(tensor=8), NUM_STEPS)


def test_sharding_context_applies_activation_rules():
    mesh = mesh_of(data=2, fsdp=4)
    x = jnp.zeros((8, 4, 32))
    f = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ACTIVATION_AXES))
    with sharding.sharding_context(mesh):
        y = f(x)
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    assert not f(x).sharding.is_equivalent_to(y.sharding, 3)  # outside the context: no constraint


# --------------------------------------------------------------------------- sharded == unsharded
_CACHE: dict = {}


def run_on(**mesh_axes):
    """(Run, jitted train step) of the default config on a mesh; built once per mesh, so the tests
    that use the same mesh share its layout and its traced and compiled step."""
    key = tuple(sorted(mesh_axes.items()))
    if key not in _CACHE:
        cfg = make_config()
        run = run_lib.build_run(model_config_from(cfg.model), cfg.train, mesh_of(**mesh_axes), NUM_STEPS)
        _CACHE[key] = (run, step_lib.make_train_step(run))
    return _CACHE[key]


def reference_run():
    """(initial state on host, state after one step on one device, its metrics); computed once."""
    if "reference" not in _CACHE:
        run, step = run_on()
        state = run_lib.create_train_state(run)
        initial = jax.device_get(state)
        state, metrics = step(state, token_batch(run.mesh))
        _CACHE["reference"] = (initial, jax.device_get(state), jax.device_get(metrics))
    return _CACHE["reference"]


def born_on_fsdp8():
    """(state created directly on an fsdp=8 mesh, its shardings); computed once."""
    if "fsdp8" not in _CACHE:
        run, _ = run_on(fsdp=8)
        _CACHE["fsdp8"] = (run_lib.create_train_state(run), run.state_shardings)
    return _CACHE["fsdp8"]


@pytest.mark.parametrize(
    "mesh_axes",
    [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=4), dict(fsdp=4, tensor=2), dict(slices=2, fsdp=2, tensor=2)],
    ids=["data8", "fsdp8", "data2-fsdp4", "fsdp4-tensor2", "2slices-fsdp2-tensor2"],
)
def test_one_step_on_a_mesh_equals_one_device(mesh_axes):
    initial, ref_state, ref_metrics = reference_run()
    run, step = run_on(**mesh_axes)
    mesh, shardings = run.mesh, run.state_shardings
    # The same starting point on every mesh (test_state_is_born_sharded_... shows creation agrees too).
    state, metrics = step(jax.device_put(initial, shardings), token_batch(mesh))

    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    # Adam's first step is ~lr * g / |g|: where |g| is tiny, reduction-order rounding in g shows up
    # undamped, so elements are compared to rtol 1e-5 plus lr / 1000 (a thousandth of one step).
    compare = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(compare, jax.device_get(state.params), ref_state.params)
    jax.tree.map(compare, jax.device_get(state.opt_state), ref_state.opt_state)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state.params, initial.params))
    assert max(moved) > 1e-4, "the step did not move the parameters: the comparison would be vacuous"
    same = jax.tree.map(lambda x, s: x.sharding == s, state, shardings)
    assert all(jax.tree.leaves(same)), "the step's output left its shardings"


def test_state_is_born_sharded_and_equals_the_one_device_state():
    initial, _, _ = reference_run()
    state, shardings = born_on_fsdp8()
    same = jax.tree.map(lambda x, s: x.sharding == s, state, shardings)
    assert all(jax.tree.leaves(same)), same
    # Initialisation does not depend on the mesh (partitionable threefry), so resharding is exact.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), initial)
    adam = shardings.opt_state[1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...)
    assert adam.mu == shardings.params and adam.nu == shardings.params
    assert adam.count.spec == P()


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device():
    state, shardings = born_on_fsdp8()
    for tree, tree_shardings in ((state.params, shardings.params), (state.opt_state, shardings.opt_state)):
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        # Expected bytes per device, from the specs: leaves without an "embed" axis (the q, kv and
        # fc biases, Adam's step count) stay replicated over fsdp; all others are split 8 ways.
        expected = sum(
            x.nbytes // (8 if "fsdp" in jax.tree.leaves(tuple(s.spec)) else 1)
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings))
        )
        held = sharding.bytes_per_device(tree)
        assert len(held) == 8 and set(held.values()) == {expected}
        replicated = sum(
            x.nbytes for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings))
            if "fsdp" not in jax.tree.leaves(tuple(s.spec))
        )
        assert replicated < 0.02 * total  # only small vectors are whole on every device
        assert expected == (total - replicated) // 8 + replicated


def test_train_step_traces_the_model_activation_constraints():
    run, step = run_on(data=2, fsdp=4)
    mesh, abstract = run.mesh, run.abstract_state
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sharding.batch_sharding(mesh))
    batch = {"inputs": tokens, "targets": tokens}

    def constraints(text: str) -> int:
        return text.count("sharding_constraint") + text.count("@Sharding")

    plain = constraints(step.jitted.lower(abstract, batch).as_text())  # only the step's own constraints
    with sharding.sharding_context(mesh):
        in_context = constraints(step.jitted.lower(abstract, batch).as_text())
    assert in_context > plain  # the blocks' ("batch", "length", "act_embed") constraints are in the program


def test_optimizer_state_leaves_follow_their_parameter_or_raise():
    mesh = mesh_of(fsdp=2)
    kernel = jax.ShapeDtypeStruct((4, 2), jnp.float32)
    params = {"dense": {"kernel": kernel}}
    param_shardings = {"dense": {"kernel": jax.sharding.NamedSharding(mesh, P("fsdp", None))}}
    count = jax.ShapeDtypeStruct((), jnp.int32)
    adam = optax.ScaleByAdamState(count=count, mu=params, nu=params)
    got = run_lib.opt_state_shardings((optax.EmptyState(), adam), params, param_shardings, mesh)
    assert got[1].mu == param_shardings and got[1].nu == param_shardings and got[1].count.spec == P()
    with pytest.raises(ValueError, match=r"optimizer state leaf 1/extra with shape \(4, 2\) mirrors no parameter"):
        run_lib.opt_state_shardings((adam, {"extra": kernel}), params, param_shardings, mesh)
