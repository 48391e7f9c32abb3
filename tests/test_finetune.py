"""Fine-tuning from pretrained weights (config.model.init_from) with configs/finetune_shakespeare.py.

The sources: a random-weight Hugging Face GPT-2 folder written by transformers, in an unusual shape
(3 heads of 16, MLP width 80, 64 positions, epsilon 1e-6) over GPT-2's real vocabulary, which the
built-in corpus needs; the same as pytorch_model.bin alone; our own checkpoints. One fine-tuning
run (one compiled program) serves most tests.
"""

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import final_params, losses, require, subprocess_env

from gpt2_jax import data as data_lib
from gpt2_jax.inference.export import export_checkpoint
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.hf import load_hf_gpt2
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import init_from as init_from_lib
from gpt2_jax.training import preflight
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(n_layer=2, n_head=3, n_embd=48, n_inner=80, n_positions=64, vocab_size=50257, layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def torch():
    t = require("torch")
    require("transformers")
    return t


@pytest.fixture(scope="module")
def hf_folder(torch, tmp_path_factory):
    """A random GPT-2 saved by transformers, its weights far from the 0.02 init so a misplaced one shows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, bos_token_id=50256, eos_token_id=50256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(torch.randn_like(p) * 0.3 + scale)
    folder = tmp_path_factory.mktemp("hf") / "gpt2_unusual"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache(corpus_cache):  # conftest: the built-in corpus, tokenised once per session
    return corpus_cache


def finetune_config(**overrides):
    """configs/finetune_shakespeare.py with overrides {"block.key": value}, as --config.block.key would."""
    sys.path.insert(0, ROOT)
    from configs import finetune_shakespeare

    c = finetune_shakespeare.get_config()
    for key, value in overrides.items():
        block, name = key.split(".")
        setattr(c[block], name, value)
    return c


def train_py(workdir):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs", "finetune_shakespeare.py"), "--workdir", str(workdir)]


def hf_model(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(folder)).eval()


def hf_logits(torch, model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.double().numpy()


def cross_entropy(logits, targets):  # float64, [B, T, V] x [B, T] -> mean nats
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))


STEPS = 4


@pytest.fixture(scope="module")
def run(hf_folder, cache, tmp_path_factory):
    """A fine-tuning run from the HF folder under fsdp=8, three times: straight through in this process;
    with train.py, killed once its first checkpoint is on disk; and resumed in this process.

    Its first update has learning rate 0 (warmup from 0 over one step), so its step-1 checkpoint is
    the source itself; then 1e-2, far above the recipe's, as the source is random. Dropout 0: the
    first loss is Hugging Face's. 8 rows of 8 tokens of GPT-2's vocabulary (the head is the cost of
    a step); one program compiled for all three (2 layers unrolled compile in 2/3 of a scan's time).
    """
    flags = {
        "model.init_from": str(hf_folder), "model.block_size": 8, "model.dropout": 0.0, "model.scan_layers": False,
        "train.num_steps": STEPS, "train.global_batch_size": 8, "train.learning_rate": 1e-2, "train.min_lr": 1e-2,
        "train.warmup_steps": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": STEPS, "train.eval_every": 0,
        "train.log_every": 1, "train.sample_tokens": 0, "train.peak_flops_per_device": 1e9,
        "mesh.data": 1, "mesh.fsdp": 8, "data.cache_dir": str(cache),
    }
    straight = tmp_path_factory.mktemp("straight")
    trainer_lib.train(finetune_config(**flags), str(straight))

    source = shutil.copytree(hf_folder, tmp_path_factory.mktemp("copy") / "source")
    killed = tmp_path_factory.mktemp("killed")
    flags["model.init_from"] = str(source)
    env = subprocess_env(8, JAX_DEFAULT_MATMUL_PRECISION="highest")  # this process's numerics (conftest)
    proc = subprocess.Popen([*train_py(killed), *(f"--config.{k}={v}" for k, v in flags.items())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = killed / "checkpoints" / "1"  # orbax renames the folder to this once the save is complete
    t0 = time.time()
    while proc.poll() is None and not first.is_dir() and time.time() - t0 < 240:
        time.sleep(0.002)
    proc.kill()
    killed_out = proc.communicate()[0]
    killed_losses = losses(killed)

    shutil.rmtree(source)  # resuming must not read init_from again
    with contextlib.redirect_stdout(io.StringIO()) as resumed_out:
        trainer_lib.train(finetune_config(**flags), str(killed))
    return dict(straight=straight, killed=killed, killed_code=proc.returncode, killed_out=killed_out,
                killed_losses=killed_losses, resumed_out=resumed_out.getvalue())


def test_first_loss_equals_hugging_face_on_the_same_batch(torch, hf_folder, cache, run):
    c = finetune_config()
    tokens, _ = data_lib.prepare_corpus(c.data.source, str(cache)).split(c.data.val_fraction)
    batches = data_lib.make_batch_iterator(tokens, block_size=8, global_batch_size=8, seed=c.train.seed)
    batch = next(batches)
    batches.close()
    want = cross_entropy(hf_logits(torch, hf_model(hf_folder), batch["inputs"]), batch["targets"])
    got = losses(run["straight"])[1]
    assert abs(got - want) < 1e-4, (got, want)
    assert got > 12.0  # far from ln(50257) = 10.8: the weights, not a near-uniform guess, decide it


def test_the_loss_falls(run):
    loss = losses(run["straight"])
    assert loss[STEPS] + loss[STEPS - 1] < loss[1] + loss[2] - 1.0, loss


def test_the_lr0_checkpoint_exports_the_source_logits(torch, hf_folder, run, tmp_path):
    step1 = run["straight"] / "checkpoints" / "1"
    assert ckpt_lib.newest_meta(str(step1))[2]["step"] == 1
    with open(run["straight"] / "metrics.jsonl") as f:
        assert json.loads(f.readline())["lr"] == 0.0  # the update that made step 1
    export_checkpoint(str(step1), str(tmp_path / "exported"))
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 8))
    want = hf_logits(torch, hf_model(hf_folder), tokens)
    err = np.abs(hf_logits(torch, hf_model(tmp_path / "exported"), tokens) - want).max()
    assert err < 1e-4 and np.abs(want).max() > 1.0, err


def test_a_killed_finetuning_run_resumes_exactly_without_reading_init_from(run):
    assert run["killed_code"] == -signal.SIGKILL and "init_from: Hugging Face GPT-2" in run["killed_out"]
    assert 1 <= len(run["killed_losses"]) < STEPS  # killed mid-run, after its first checkpoint
    assert "init_from: not read" in run["resumed_out"] and "resumed from step" in run["resumed_out"]
    want = losses(run["straight"])
    assert losses(run["killed"]) == want and len(want) == STEPS  # bitwise
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(run["killed"]), final_params(run["straight"]))


def test_init_from_our_checkpoint_on_another_mesh(hf_folder, run, tmp_path):
    """Step 1 of the fsdp=8 run (= the source) onto one device, 4 positions, no vocabulary padding."""
    step1 = run["straight"] / "checkpoints" / "1"
    config = finetune_config(**{"model.init_from": str(step1), "model.block_size": 4,
                                "model.pad_vocab_to_multiple": 1})
    model_config, source = init_from_lib.resolve(config.model, str(tmp_path / "new"))
    assert source.kind == init_from_lib.CHECKPOINT and source.step == 1
    assert (model_config.n_head, model_config.mlp_dim, model_config.block_size, model_config.padded_vocab_size) == \
        (3, 80, 4, 50257)
    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    built = run_lib.build_run(model_config, config.train, mesh, 10)
    params = init_from_lib.load_params(source, model_config, built.state_shardings.params)
    state = run_lib.create_train_state(built, params)
    _, hf = load_hf_gpt2(str(hf_folder))
    want = dict(hf, wpe={"embedding": hf["wpe"]["embedding"][:4]})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params, want)
    # Parameters only: the step and the Adam moments start fresh (the checkpoint's are not zero: its
    # step had a gradient).
    with open(run["straight"] / "metrics.jsonl") as f:
        assert json.loads(f.readline())["grad_norm"] > 1.0
    assert int(state.step) == 0
    adam = state.opt_state[1][0]
    assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves((adam.mu, adam.nu)))


def test_hf_weights_go_straight_into_fsdp_shards(hf_folder):
    config = finetune_config(**{"model.init_from": str(hf_folder), "model.block_size": 64,
                                "model.param_dtype": "bfloat16", "mesh.data": 1, "mesh.fsdp": 8})
    model_config, source = init_from_lib.resolve(config.model, "/nonexistent/workdir")
    built = run_lib.build_run(model_config, config.train, sharding_lib.make_mesh(config.mesh), 10)
    params = init_from_lib.load_params(source, model_config, built.state_shardings.params)
    held = sharding_lib.bytes_per_device(params)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    # Each of the 8 devices holds exactly the bytes preflight plans for it: an eighth, but for small vectors.
    assert len(held) == 8 and set(held.values()) == {preflight.bytes_per_device(built.abstract_state.params)}
    assert max(held.values()) < total / 7, (held, total)
    _, want = load_hf_gpt2(str(hf_folder), pad_vocab_to_multiple=64, param_dtype="bfloat16")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(params))


# ------------------------------------------------------------------ what the source cannot honour
@pytest.mark.parametrize("overrides,message", [
    ({"model.position_embedding": "rotary"},
     r"config.model.position_embedding='rotary', but the source has position_embedding='learned'"),
    ({"model.n_kv_head": 1}, r"config.model.n_kv_head=1, but the source has 3 kv heads \(n_kv_head=None\)"),
    ({"model.block_size": 128},
     r"config.model.block_size=128 is larger than the source's learned position table \(block_size=64\)"),
    ({"model.preset": "gpt2"}, r"config.model.preset='gpt2' \(n_layer=12, n_head=12, n_embd=768\) disagrees with "
                               r"the source \(n_layer=2, n_head=3, n_embd=48\)"),
], ids=["rotary", "kv-heads", "block-size", "preset"])
def test_a_key_the_source_cannot_honour_is_one_line_naming_both_values(hf_folder, tmp_path, overrides, message):
    config = finetune_config(**{"model.init_from": str(hf_folder), "model.block_size": 32, **overrides})
    with pytest.raises(ValueError, match=f"^config.model.init_from='{hf_folder}': {message}$") as err:
        trainer_lib.train(config, str(tmp_path / "w"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_a_pytorch_bin_folder_is_refused_with_how_to_convert_it(torch, hf_folder, tmp_path):
    """The trainer's refusal, in this process: train.py makes such a ValueError its one `error:` line
    and exit 2 (gpt2_jax/cli.py; tests/test_cli.py runs it), and the run above starts train.py from a folder."""
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder)
    torch.save(hf_model(hf_folder).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        trainer_lib.train(finetune_config(**{"model.init_from": str(folder)}), str(tmp_path / "w"))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"config.model.init_from='{folder}': ")
    assert "holds pytorch_model.bin but no model.safetensors" in line and ".save_pretrained(" in line
    assert not (tmp_path / "w").exists()
    # The command it gives pastes into a shell (its quotes are intact) and converts the folder, which then opens.
    program, flag, code = shlex.split(line.split("convert it once with ", 1)[1])
    assert (program, flag) == ("python", "-c")
    exec(code)  # noqa: S102 - the message's own one-liner
    assert init_from_lib.open_source(str(folder)).model_config.n_inner == 80


def test_other_sources_that_are_not_models(tmp_path):
    with pytest.raises(ValueError, match=r"^config.model.init_from='.*nope': no such folder"):
        init_from_lib.open_source(str(tmp_path / "nope"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="is neither a Hugging Face GPT-2 folder .* nor a gpt2-jax training workdir"):
        init_from_lib.open_source(str(tmp_path / "notes"))


def test_the_source_decides_the_architecture_and_the_config_the_rest():
    # A rotary, grouped-query source (one of our checkpoints): left at their defaults, the config's
    # keys take the source's values; the free keys keep the config's.
    source = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=128, vocab_size=300,
                         position_embedding="rotary", rope_theta=5e5, sliding_window=32)
    config = finetune_config(**{"model.block_size": 512, "model.dropout": 0.2, "model.dtype": "bfloat16",
                                "model.remat": True, "model.scan_layers": False, "model.pad_vocab_to_multiple": 8})
    merged = init_from_lib.merge_model_config(config.model, source, "test")
    assert merged == source.replace(block_size=512, dropout=0.2, dtype="bfloat16", remat=True, scan_layers=False,
                                    pad_vocab_to_multiple=8)  # rotary: no position table bounds block_size
    config.model.n_kv_head = 2  # restating the source is fine...
    assert init_from_lib.merge_model_config(config.model, source, "test") == merged
    config.model.sliding_window = 64  # ...asking for something else is not
    config.model.n_kv_head = 4
    with pytest.raises(ValueError, match=r"^test: config.model.n_kv_head=4, but the source has 2 kv heads .*; "
                                         r"config.model.sliding_window=64, but the source has sliding_window=32$"):
        init_from_lib.merge_model_config(config.model, source, "test")


def test_preflight_plans_the_source_architecture(hf_folder):
    config = finetune_config(**{"model.init_from": str(hf_folder), "model.block_size": 32, "mesh.data": 1,
                                "mesh.fsdp": -1})
    figures = preflight.report(config, 16)  # more devices than exist: abstract shapes only
    # wte (padded to 50304 rows), wpe cropped to 32, ln_f; per layer two LayerNorms, q k v out, fc proj.
    per_layer = 4 * 48 + (4 * 48 * 48 + 4 * 48) + (2 * 48 * 80 + 80 + 48)
    assert figures["params"] == 50304 * 48 + 32 * 48 + 2 * 48 + 2 * per_layer
