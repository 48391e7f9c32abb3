"""Test set-up: 8 simulated CPU devices, configured before jax is first imported, and one persistent
compilation cache for the whole session.

Much of the suite's time is XLA compiling small programs (so XLA:CPU is set to compile fast, below),
many of them the same program built again (a new jit wrapper in another test, or a train.py
subprocess compiling the tiny config's step once more). JAX's persistent cache serves each repeat
from disk. The folder is new each session (so the suite's time is that of a cold start, as in CI),
shared with every subprocess through the environment; set GPT2_JAX_COMPILATION_CACHE to a folder of
your own to keep it between runs.

The built-in corpus is tokenised once per session too (the `corpus_cache` fixture), not once per
test file that trains on it.
"""

import fcntl
import gc
import os
import shutil
import tempfile

import pytest

# Much of the suite's time is compiling, not running, so XLA:CPU is set to compile fast:
# - LLVM at -O0 halves compile times; the programs here are tiny, so they run as fast, and XLA's own
#   (HLO) optimisations, which decide the numerics, are the same at any level.
# - XLA:CPU's classic elementwise emitters instead of its newer fusion emitters: a tiny train step on
#   8 devices compiles in 0.7 s instead of 3.8 s. Elementwise functions (tanh, exp) round differently
#   in their last bits; no test depends on that, since every comparison is between two runs under these
#   same flags or within a tolerance. Users' runs keep XLA's defaults.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling for TPU slices (tests/test_tpu_compile.py) in both workers and their subprocesses at once.
from gpt2_jax import topology  # noqa: E402 - no jax inside

topology.prepare_environment()
_OWN_CACHE = None
if "GPT2_JAX_COMPILATION_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["GPT2_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="gpt2_jax_test_compile_cache_")
# Set here, before pytest-xdist starts its workers, so that they all inherit the same folder.
_CORPUS_ENV = "GPT2_JAX_TEST_CORPUS_CACHE"
_OWN_CORPUS = None
if _CORPUS_ENV not in os.environ:
    _OWN_CORPUS = os.environ[_CORPUS_ENV] = tempfile.mkdtemp(prefix="gpt2_jax_test_corpus_cache_")

import jax  # noqa: E402

from gpt2_jax import compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
compilation_cache.enable()

# Python's garbage collector, tuned for a process that traces many programs: tracing allocates
# millions of short-lived objects, and each full collection also walks the heap of every module the
# tests import (jax, flax, torch, transformers). Collections run 70x less often, and the heap as it
# stands once the tests are collected is left out of them (pytest_collection_finish). Measured on
# test_sampling.py, test_model.py and test_attention.py in one process, four runs alternating with
# Python's defaults: 12% less CPU (median).
gc.set_threshold(50_000, 20, 20)


def pytest_collection_finish(session):  # noqa: ARG001
    gc.freeze()


@pytest.fixture(scope="session")
def corpus_cache() -> str:
    """A data.cache_dir holding the built-in corpus, tokenised once for the session (every worker,
    and the train.py subprocesses they start, reuse it). The lock keeps two workers from tokenising
    it into the same folder at once."""
    from gpt2_jax.data import prepare_corpus

    folder = os.environ[_CORPUS_ENV]
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            prepare_corpus("builtin:shakespeare", folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@pytest.fixture(scope="session")
def tiny_straight_run(corpus_cache) -> str:
    """The workdir of one uninterrupted run of helpers.tiny_train_cmd (the built-in corpus, LLVM at -O2),
    which the checkpoint and bucket tests compare their interrupted runs with. Made once per session,
    by whichever worker asks first; the others wait."""
    import subprocess

    from helpers import TINY_RUN_STEPS, subprocess_env, tiny_train_cmd

    workdir = os.path.join(os.environ[_CORPUS_ENV], "tiny_straight")
    with open(os.path.join(os.environ[_CORPUS_ENV], ".straight.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(os.path.join(workdir, "done")):
                shutil.rmtree(workdir, ignore_errors=True)
                subprocess.run(tiny_train_cmd(workdir, corpus_cache, TINY_RUN_STEPS // 2), check=True,
                               env=subprocess_env(1, optimized=True), timeout=300, capture_output=True)
                open(os.path.join(workdir, "done"), "w").close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return workdir


# Files in order of their measured time here, longest first (pyproject.toml keeps pytest-xdist from
# reordering them by test count), so that the two workers finish together instead of one starting a long
# file at the end. test_gcs.py sits apart from test_checkpoint.py: both wait on conftest's straight run.
_ORDER = ("test_checkpoint.py", "test_multihost.py", "test_sampling.py", "test_model.py", "test_tpu_compile.py",
          "test_bench.py", "test_train_step.py", "test_recipe.py", "test_generate_cli.py", "test_sharding.py",
          "test_gcs.py", "test_speedrun.py", "test_attention.py", "test_document_mask.py", "test_finetune.py",
          "test_prepare.py", "test_loss.py", "test_hf.py", "test_train_cli.py", "test_evaluate.py", "test_watch.py",
          "test_speculative.py", "test_data.py", "test_readme.py", "test_cli.py", "test_tokenizer.py")


# Markers (pyproject.toml): `slow` = a file of subprocess runs (train.py, generate.py, benches, several
# processes) or a test measured at more than ~3 s on the 2-core host; `parity` = held to Hugging Face's
# PyTorch GPT-2. `pytest -m "not slow"` is the everyday loop; the README's command runs everything.
_SLOW_FILES = {"test_multihost.py", "test_checkpoint.py", "test_gcs.py", "test_speedrun.py", "test_bench.py",
               "test_generate_cli.py", "test_recipe.py", "test_finetune.py", "test_watch.py", "test_train_cli.py",
               "test_prepare.py", "test_tpu_compile.py", "test_document_mask.py", "test_cli.py", "test_hf.py",
               "test_train_step.py", "test_sharding.py", "test_attention.py", "test_loss.py", "test_sampling.py",
               "test_speculative.py"}
_SLOW_TESTS = ("test_live_parity_124m", "test_gradient_accumulation_equals_one_full_batch",
               "test_splash_train_step_equals_blockwise_step_on_meshes", "test_every_implementation_equals_dense",
               "test_scan_and_every_remat_policy", "test_bfloat16_training_tracks", "test_one_step_on_a_mesh_equals",
               "test_tiny_model_overfits_one_batch", "test_cli_perplexity_and_hellaswag_json",
               "test_chunked_loss_and_gradients_in_bfloat16", "test_chunked_loss_on_an_fsdp_and_tensor_mesh",
               "test_bfloat16_compute_keeps_fp32_params")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    for item in items:
        if item.path.name in _SLOW_FILES or item.name.startswith(_SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        if item.path.name == "test_hf.py" or "hugging_face" in item.name:
            item.add_marker(pytest.mark.parity)
    rank = {name: i for i, name in enumerate(_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


def pytest_unconfigure(config):  # noqa: ARG001
    for own in (_OWN_CACHE, _OWN_CORPUS):
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
