"""The real TPU compiler, run on this CPU host: libtpu builds a TPU slice's devices
(training/topology.py) and compiles our train step for them, Mosaic (Pallas) kernels included.

Skipped only where libtpu cannot be imported; CI installs the `tpu` extra, so they run there.
Each compile is of a tiny model (a few seconds).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

if os.environ.get("CI"):
    import libtpu  # noqa: F401 - CI installs the tpu extra: never skip there
else:
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[tpu]"')

from helpers import subprocess_env  # noqa: E402

from gpt2_jax import topology  # noqa: E402
from gpt2_jax.model.config import model_config_from  # noqa: E402
from gpt2_jax.training import compiled as compiled_lib  # noqa: E402
from gpt2_jax.training import (
    preflight,  # noqa: E402
    sharding,  # noqa: E402
)
from gpt2_jax.training import run as run_lib  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
# T=128, GQA (4 query heads on 2 kv heads, head_dim 64: splash's lanes), a sliding window, bf16. One
# kernel block covers T (as it would T=256: the block is the largest of 512, 256, 128 dividing T), and
# a TPU compile of it costs ~20% less than at T=256.
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, block_size=128, vocab_size=512, pad_vocab_to_multiple=128,
            sliding_window=64, dtype="bfloat16", attention="auto")


def tiny_config(**mesh):
    sys.path.insert(0, ROOT)
    from configs import base

    c = base.get_config()
    c.model.update(TINY)
    c.train.global_batch_size = 8
    c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return c


@pytest.fixture(autouse=True)
def tpu_precision():
    """conftest asks for fp32 ('highest') matmuls, which Mosaic cannot lower for bf16 operands ("Bad lhs
    type"); a TPU run uses the default, as train.py does."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.fixture(scope="module")
def v5e_2x2():
    return topology.devices(topology.parse("v5e-4"))


@pytest.mark.parametrize("mesh", [dict(fsdp=4), dict(data=2, tensor=2)], ids=["fsdp4", "data2-tensor2"])
def test_train_step_compiles_for_v5e_with_splash_kernels(v5e_2x2, mesh):
    config = tiny_config(**mesh)
    tpu_mesh = sharding.make_mesh(config.mesh, devices=v5e_2x2)
    run = run_lib.build_run(model_config_from(config.model), config.train, tpu_mesh, 10)
    result = compiled_lib.compile_train_step(run)

    assert result.fits and result.peak_bytes > 0
    # Splash's forward and its two backward kernels, once for the scanned block: the TPU really runs
    # splash (neither interpret mode, which lowers to plain XLA, nor a blockwise fall-back).
    assert result.mosaic_kernels == 3
    # The compiler's per-chip arguments are the state preflight lays out from abstract shapes, and the
    # batch, plus TPU layout padding: a minor dimension is stored in whole 128-lane tiles, so fsdp's
    # 64-wide shards of n_embd=256 take up to twice their bytes; unsplit, they are within a few tiles.
    batch = compiled_lib.abstract_batch(run, 8)
    abstract = preflight.bytes_per_device(run.abstract_state) + preflight.bytes_per_device(batch)
    assert abstract <= result.argument_bytes <= (1.3 if mesh.get("fsdp") else 1.001) * abstract


def test_the_platform_comes_from_the_mesh(v5e_2x2):
    from gpt2_jax.model import platform
    from gpt2_jax.model.attention import resolve_attention

    config = model_config_from(tiny_config().model)
    tpu_mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), devices=v5e_2x2)
    assert platform.of_mesh(tpu_mesh).name == "tpu" and platform.current() == "cpu"
    with sharding.sharding_context(tpu_mesh):
        assert platform.current() == "tpu" and resolve_attention(config)[0] == "splash"
    assert resolve_attention(config)[0] == "blockwise"  # this host's own devices


def test_a_step_too_big_for_the_chip_is_refused_with_its_size(v5e_2x2):
    config = tiny_config(fsdp=4)
    config.model.update(vocab_size=50257, pad_vocab_to_multiple=64, block_size=256, sliding_window=128)
    config.train.global_batch_size = 4 * 512  # 512 x 256 x 50,304 fp32 logits per chip: ~26 GB
    run = run_lib.build_run(model_config_from(config.model), config.train,
                            sharding.make_mesh(config.mesh, devices=v5e_2x2), 10)
    result = compiled_lib.compile_train_step(run)
    assert not result.fits and "HBM" in result.error
    assert result.usable_bytes < topology.GENERATIONS["v5e"].hbm_bytes < result.peak_bytes


@pytest.mark.parametrize("name,topo,chips", [("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16),
                                             ("v4-8", "v4:2x2x1", 4), ("v5p-16", "v5:2x2x2", 8),
                                             ("v6e-4", "v6e:2x2", 4), ("h100-8", "8x1x1", 8)])
def test_accelerator_type_names(name, topo, chips):
    spec = topology.parse(name)
    assert (spec.topology, spec.chips) == (topo, chips)


def test_a_gpu_topology_names_its_compiler_and_memory_limit():
    spec = topology.parse("h200-4")
    assert spec.platform == "gpu" and spec.usable_bytes == int(0.75 * spec.hbm_bytes)
    missing = topology.compiler_missing(spec)
    if not (topology._importable("jax_plugins.xla_cuda12") and topology._importable("nvidia.cudnn")):
        assert missing.startswith("--topology h200-4 needs XLA's CUDA compiler and cuDNN")
        assert missing.endswith('pip install -e ".[gpu-compile]"')
    else:
        assert missing is None


@pytest.mark.parametrize("name", ["v9-8", "v5e-6", "v4-4", "tpu", "h100-16"])
def test_unknown_topology_is_refused(name):
    with pytest.raises(ValueError, match=f"--topology '{name}'"):
        topology.parse(name)


def test_preflight_cli_compiles_two_v5e_16_slices():
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py")]
    # A 512-token vocabulary: with GPT-2's 50,257 the compiles take twice as long, in the head alone.
    out = subprocess.run(train + ["--preflight", "--topology", "v5e-16", "--slices", "2", "--json",
                                  "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                  "--config.train.global_batch_size=32", "--config.model.vocab_size=512"],
                         env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["topology"] == "v5e-16" and report["devices"] == 32 and report["slices"] == 2
    assert report["mesh"] == {"data": 2, "fsdp": 16, "tensor": 1}
    assert report["attention"] == "splash" and report["mosaic_kernels"] >= 3 and report["fits"] is True
    assert report["hbm_bytes_per_device"] == 16 * 2**30 and 0 < report["peak_bytes_per_device"] < 2**30
    assert report["flops_per_step"] == pytest.approx(report["flops_per_step_analytic"], rel=0.25)
    assert report["compile_s"] > 0 and report["largest_micro_batch_per_device"] > 1

    bad = subprocess.run(train + ["--preflight", "--topology", "v5e-3"], env=subprocess_env(1),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --topology 'v5e-3': no v5e slice has 3 TensorCores")


def test_decoding_programs_compile_for_one_v5e_chip():
    from gpt2_jax.inference import preflight as decode_preflight
    from gpt2_jax.model.config import ModelConfig

    config = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, block_size=256, vocab_size=512,
                         dtype="bfloat16", param_dtype="bfloat16")
    report = decode_preflight.report(config, "v5e-1", max_new_tokens=32, num_samples=2)
    assert report["device_kind"] == "TPU v5 lite" and report["fits"] and report["batch"] == 2
    assert report["prefill"]["fits"] and report["decode"]["fits"]
    # The cache holds every position a row can reach, per layer: k and v of n_kv_head x head_dim in
    # bf16, plus the int32 positions.
    L = report["cache_tokens"]
    assert report["kv_cache_bytes"] == 2 * 2 * L * (2 * 2 * 64 * 2 + 4)
    assert report["weight_bytes"] == report["params"] * 2
    assert 0 < report["decode"]["peak_bytes"] < report["hbm_bytes_per_device"]


def test_document_masked_loss_compiles_for_v5e_with_splash_segment_ids(v5e_2x2):
    """The loss and gradients with config.data.document_mask (positions and segment ids from the tokens)
    compile for a v5e slice with splash's kernels taking the segment ids, under fsdp's shard_map."""
    import functools

    import flax.linen as nn
    import jax.numpy as jnp

    from gpt2_jax.model import abstract_params
    from gpt2_jax.training import step as step_lib

    config = model_config_from(tiny_config().model)
    tpu_mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=1), devices=v5e_2x2)
    boxed = abstract_params(config)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          sharding.logical_to_sharding(boxed, tpu_mesh))
    batch = {k: jax.ShapeDtypeStruct((8, config.block_size), jnp.int32, sharding=sharding.batch_sharding(tpu_mesh))
             for k in step_lib.BATCH_KEYS}
    loss = functools.partial(step_lib.loss_fn, model_config=config, document_mask=True)
    result = compiled_lib.compile_program(jax.jit(jax.value_and_grad(loss)), params, batch, mesh=tpu_mesh)
    assert not result.error and result.mosaic_kernels == 3  # splash forward, dq and dkv
