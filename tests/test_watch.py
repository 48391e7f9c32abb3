"""Watching a run: the profiler window, in-loop HellaSwag (equal to the evaluate command's, on 1 device
and on fsdp=8), val_bpb against a hand computation, and Weights & Biases offline.

One tiny run on an fsdp=8 mesh with every switch on serves most tests."""

import glob
import json
import math
import os
import struct
import sys

import jax
import numpy as np
import pytest
from helpers import final_params, random_params

from gpt2_jax.data import make_batch_iterator
from gpt2_jax.data.hellaswag import load_hellaswag
from gpt2_jax.data.tokenizer import get_tokenizer
from gpt2_jax.inference.evaluate import score_multiple_choice
from gpt2_jax.model.config import model_config_from
from gpt2_jax.model.scoring import choice_rows
from gpt2_jax.training import hellaswag as hellaswag_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import step as step_lib
from gpt2_jax.training import trainer as trainer_lib
from gpt2_jax.training.run_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # step 1, the profiled steps 2 and 3, and step 4 after them

# HellaSwag's own format (its validation file's fields), written by hand; endings of different lengths.
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "split": "val", "split_type": "zeroshot", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
              "with other individuals visible in the background.",
     "ctx_b": "the child and a different man", "split": "val", "split_type": "indomain", "label": 2,
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
            "with other individuals visible in the background. the child and a different man",
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.",
                 "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."],
     "source_id": "activitynet~v_-xQvJmC2jhk"},
    {"ind": 114, "activity_label": "High jump", "ctx_a": "A boy is running down a track.", "ctx_b": "the boy",
     "ctx": "A boy is running down a track. the boy", "split": "val", "split_type": "zeroshot", "label": 2,
     "endings": ["runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
                 "stands on his hands and springs."], "source_id": "activitynet~v_-zHX3Gdx6I4"},
    {"ind": 116, "activity_label": "High jump", "ctx_a": "The boy lifts his body above the height of a pole.",
     "ctx_b": "the boy", "ctx": "The boy lifts his body above the height of a pole. the boy", "split": "val",
     "split_type": "zeroshot", "label": 1,
     "endings": ["jumps off the pole.", "lands on his back on to a red mat.", "comes to a stop.", "runs back."],
     "source_id": "activitynet~v_-zHX3Gdx6I4"},
]


def write_hellaswag(path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    return str(path)


def tiny_config(cache, **train):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.data.cache_dir = str(cache)
    c.train.update(dict(num_steps=STEPS, eval_every=STEPS, eval_steps=1, checkpoint_every=0, log_every=1))
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def watched(tmp_path_factory, corpus_cache):
    """(config, workdir, hellaswag path): a tiny run on fsdp=8 with a profile, HellaSwag and W&B offline."""
    folder = tmp_path_factory.mktemp("watched")
    hellaswag = write_hellaswag(folder / "hellaswag_val.jsonl")
    config = tiny_config(corpus_cache, profile_start=2, profile_steps=2, hellaswag=hellaswag,
                         wandb_project="gpt2-jax-test")
    config.mesh.data, config.mesh.fsdp = 1, 8
    wandb_env = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(folder / "wandb_config"),
                     WANDB_CACHE_DIR=str(folder / "wandb_cache"), WANDB_DATA_DIR=str(folder / "wandb_data"))
    saved = {k: os.environ.get(k) for k in wandb_env}
    os.environ.update(wandb_env)
    try:
        trainer_lib.train(config, str(folder / "run"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return config, str(folder / "run"), hellaswag


def records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_profile_writes_a_trace_and_leaves_its_steps_out_of_throughput(watched):
    _, workdir, _ = watched
    assert glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "perfetto_trace.json.gz"))
    train = {r["step"]: r for r in records(workdir) if "loss" in r}
    assert sorted(train) == list(range(1, STEPS + 1))
    # log_every=1: the records of the traced steps 2 and 3 have no throughput; the others do.
    assert [s for s in train if "tokens_per_s" in train[s]] == [1, 4]
    assert all("mfu" in train[s] for s in (1, 4))


def test_in_loop_hellaswag_equals_the_evaluate_command(watched):
    config, workdir, hellaswag = watched
    evals = [r for r in records(workdir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [STEPS]
    scores = score_multiple_choice(model_config_from(config.model), final_params(workdir), load_hellaswag(hellaswag))
    assert (evals[0]["hellaswag_acc"], evals[0]["hellaswag_acc_norm"]) == (scores.accuracy, scores.accuracy_norm)


def test_val_bpb_is_val_loss_over_the_bytes_of_the_scored_targets_by_hand(watched):
    config, workdir, _ = watched
    (record,) = [r for r in records(workdir) if "val_loss" in r]
    _, val_tokens = trainer_lib._prepare_data(config)
    batch = step_lib.eval_batch_size(config.train)
    it = make_batch_iterator(val_tokens, block_size=config.model.block_size, global_batch_size=batch,
                             seed=config.train.seed, process_index=0, process_count=1)
    targets = next(it)["targets"]  # eval_steps=1: one batch, every target scored
    it.close()
    enc = get_tokenizer()
    text_bytes = sum(len(enc.decode_bytes([t for t in row if t != enc.eot_token])) for row in targets.tolist())
    want = record["val_loss"] * targets.size / math.log(2) / text_bytes
    assert record["val_bpb"] == pytest.approx(want, rel=1e-9)
    assert 0.1 < record["val_bpb"] < 10 < record["val_loss"] / math.log(2)  # tokens hold several bytes each


@pytest.fixture(scope="module")
def commands_scores(tmp_path_factory, corpus_cache):
    """(hellaswag path, params, row losses, accuracies): random weights scored on HELLASWAG the evaluate
    command's way, once for both meshes below. The weights are numpy arrays: each mesh's device_put
    splits them on the host, with nothing to compile."""
    from gpt2_jax.inference.evaluate import _Scorer

    hellaswag = write_hellaswag(tmp_path_factory.mktemp("hellaswag") / "hs.jsonl")
    model_config = model_config_from(tiny_config(corpus_cache).model)
    params = jax.tree_util.tree_map(np.asarray, random_params(model_config, seed=5, std=0.3))
    examples = load_hellaswag(hellaswag)
    losses = _Scorer(model_config, params, 8)(choice_rows(examples, model_config.block_size))
    scores = score_multiple_choice(model_config, params, examples)
    return hellaswag, params, losses, {"hellaswag_acc": scores.accuracy, "hellaswag_acc_norm": scores.accuracy_norm}


@pytest.mark.parametrize("fsdp", [1, 8])
def test_in_loop_scoring_matches_the_commands_on_a_mesh(commands_scores, corpus_cache, fsdp):
    """The rows' losses (not only the accuracies) equal the evaluate command's, on one device and
    with the parameters and rows split 8 ways."""
    hellaswag, params, command_losses, command_accuracies = commands_scores
    config = tiny_config(corpus_cache, hellaswag=hellaswag)
    config.mesh.data, config.mesh.fsdp = 1, fsdp
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:fsdp])
    run = run_lib.run_from_config(config, mesh)
    scorer = hellaswag_lib.HellaSwagEval(run, config.train.hellaswag, 0)
    assert (scorer.rows_per_step(32), scorer.rows_per_step(16)) == (8, 16)  # eval batch 8 x block_size 32 tokens
    sharded = jax.device_put(params, run.state_shardings.params)
    rows = choice_rows(scorer.examples, run.model_config.block_size)
    np.testing.assert_allclose(scorer._score_rows(sharded, rows), command_losses, rtol=1e-5)
    assert scorer(sharded) == command_accuracies


def wandb_records(path: str):
    """The records of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks, each record cut into
    chunks with a 7-byte header: crc32, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_logs_the_records_the_config_and_the_loss_curve(watched):
    config, workdir, _ = watched
    (run_file,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    logged, config_keys = {}, set()
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            # An image is one nested key per field: loss_curve/path, loss_curve/sha256, ...
            items = {item.key or item.nested_key[0]: item.value_json for item in record.history.item}
            logged.setdefault(int(items["step"]), set()).update(items)
        elif record.WhichOneof("record_type") == "run":  # the run's start holds its config
            config_keys.update(item.key for item in record.run.config.update)
    for r in records(workdir):  # every record of metrics.jsonl, every key
        assert set(r) <= logged[r["step"]], (r["step"], set(r) - logged[r["step"]])
    assert {"val_bpb", "hellaswag_acc", "hellaswag_acc_norm", "loss_curve"} <= logged[STEPS]
    assert {"model", "train", "mesh", "data"} <= config_keys
    assert glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "files", "media", "images", "loss_curve_*.png"))
    with open(os.path.join(workdir, "wandb_run_id")) as f:
        assert run_file.endswith(f"run-{f.read().strip()}.wandb")  # a resumed run logs on into it


def test_bad_watch_keys_are_one_line_each(tmp_path, corpus_cache, monkeypatch):
    def error(**train):
        c = tiny_config(corpus_cache, **train)
        with pytest.raises(ValueError) as e:
            TrainConfig.of(c.train)  # the block's one validate() holds the watch keys' checks
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error(profile_steps=-1).startswith("config.train.profile_steps=-1 must be an integer >= 0")
    assert error(profile_steps=3).startswith("config.train.profile_start=0 must be >= 1")
    assert error(hellaswag_examples=-1).startswith("config.train.hellaswag_examples=-1 must be")
    assert error(hellaswag=str(tmp_path / "missing.jsonl")).endswith("missing.jsonl': no such file "
                                                                     "(HellaSwag's validation jsonl)")
    hs = write_hellaswag(tmp_path / "hs.jsonl")
    assert "eval_every=0" in error(hellaswag=hs, eval_every=0)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    assert error(wandb_project="p").startswith("config.train.wandb_project='p' needs wandb, which is not installed")


def test_a_run_without_wandb_stops_with_one_error_line_before_training(tmp_path, corpus_cache, monkeypatch):
    # In this process: a ValueError from train() is train.py's one `error:` line and exit code 2 (gpt2_jax/cli.py;
    # train.py's own runs that meet one: tests/test_checkpoint.py, tests/test_finetune.py).
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ValueError) as error:
        trainer_lib.train(tiny_config(corpus_cache, wandb_project="gpt2-jax"), str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("config.train.wandb_project='gpt2-jax' needs wandb")
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing left
