"""generate.py and `python -m gpt2_jax.export` as a user runs them (subprocesses): streaming == JSON,
several samples, --truncate, checkpoints (a corrupt newest one skipped, said once), export round trip
with the tokenizer, speculative decoding, the default compilation cache, one-line errors (exit 2); and
the sampler's greedy parity with Hugging Face generate.

Each generate.py process costs seconds (imports, loading, its programs), so one run serves several
checks, and checks whose command line another test runs are made in this process.
The Hugging Face tests need torch + transformers (required where CI is set, like test_hf.py).
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import make_checkpoint, random_params, require, subprocess_env

from gpt2_jax import ModelConfig
from gpt2_jax.checkpoints import load_model
from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.inference.export import export_checkpoint
from gpt2_jax.inference.sampling import generate
from gpt2_jax.model.hf import load_hf_gpt2, save_hf_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The quick brown fox jumps over the lazy dog"
TIMEOUT = 120


def run(script_args: list[str], *, module: str | None = None, stdin: str | None = None, home=None):
    """Runs generate.py (or `python -m module`) on one CPU device; returns the CompletedProcess.

    With `home`, HOME is that folder and the test session's compilation cache is not passed on."""
    env = subprocess_env(1)
    if home is not None:
        env = {k: v for k, v in env.items() if k != "GPT2_JAX_COMPILATION_CACHE"} | {"HOME": str(home)}
    cmd = [sys.executable, "-m", module] if module else [sys.executable, os.path.join(ROOT, "generate.py")]
    return subprocess.run(
        cmd + script_args, cwd=ROOT, env=env, input=stdin or "", capture_output=True, text=True, timeout=TIMEOUT
    )


def json_lines(out) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def assert_one_line_error(out, text: str):
    assert out.returncode == 2, out.stderr  # gpt2_jax/cli.py: a usage or input error
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ") and text in out.stderr, out.stderr


# Learned positions, 32-token context, GPT-2's vocabulary so the tokenizer works.
TINY = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_hf")
    save_hf_gpt2(TINY, random_params(TINY, std=0.3), str(folder))
    return str(folder)


def test_greedy_equals_hugging_face_generate(tmp_path):
    """The sampler on a folder transformers wrote, read by generate.py's loader, against transformers'
    own greedy generate, in this process; generate.py itself is held to this sampler below (greedy
    JSON from a checkpoint, sampled JSON lines and a stream from an --hf folder)."""
    torch = require("torch")
    require("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()  # vocab 50257
    with torch.no_grad():  # weights far from the 0.02 init: peaked predictions, no near-ties
        for name, p in hf.named_parameters():
            is_ln_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if is_ln_scale else 0.0))
    hf.save_pretrained(tmp_path)
    N = 24
    config, params = load_model(hf=str(tmp_path))
    [ours] = generate(config, params, [get_tokenizer().encode(PROMPT)], max_new_tokens=N, temperature=0)

    ids = torch.tensor([get_tokenizer().encode(PROMPT)])
    with torch.no_grad():  # the same rule on both sides: stop at <|endoftext|>
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                          eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    want = out[0, ids.shape[1]:].tolist()
    want = want[: want.index(EOT_ID)] if EOT_ID in want else want
    assert ours == want and len(want) > N // 2


# One prompt well over the 32-token context, cut by --truncate left, sampled by generate.py twice:
# three samples as JSON lines from a prompt file, with no compilation cache passed on (the default
# folder, under a HOME of its own), and one sample streamed from standard input.
LONG_PROMPT = " ".join(f"word{i}" for i in range(40))
SAMPLING = ["--max_new_tokens", "12", "--temperature", "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "3",
            "--truncate", "left"]


@pytest.fixture(scope="module")
def sampled(tiny_hf, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    (home / "p.txt").write_text(LONG_PROMPT)
    records = json_lines(run(["--hf", tiny_hf, "--prompt_file", str(home / "p.txt"), "--num_samples", "3", "--json",
                              *SAMPLING], home=home))
    streamed = run(["--hf", tiny_hf, *SAMPLING], stdin=LONG_PROMPT)
    return dict(home=home, records=records, streamed=streamed)


def test_streamed_text_equals_the_json_completion(sampled):
    # Row r's samples depend on the seed and r only (sampling.py), so the stream is the first JSON line.
    streamed, [first, *_] = sampled["streamed"], sampled["records"]
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == LONG_PROMPT + first["completion"] + "\n"
    assert "tokens/s" in streamed.stderr
    assert first["tokens"] == generate(TINY, random_params(TINY, std=0.3), [get_tokenizer().encode(LONG_PROMPT)],
                                       max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.95, seed=3,
                                       truncate="left")[0]


def test_several_samples_are_json_lines_from_a_prompt_file(sampled):
    records = sampled["records"]
    assert len(records) == 3 and all(r["prompt"] == LONG_PROMPT for r in records)
    assert len({tuple(r["tokens"]) for r in records}) == 3
    assert len(os.listdir(sampled["home"] / ".cache" / "gpt2_jax" / "jax_cache")) >= 2  # prefill and decode at least


def test_a_checkpoint_generates_and_exports_to_an_equal_hf_folder(tmp_path):
    params = random_params(TINY, seed=1, std=0.3)
    workdir = make_checkpoint(tmp_path / "run", TINY, params)
    make_checkpoint(tmp_path / "run", TINY, params, step=4)
    step4 = tmp_path / "run" / "checkpoints" / "4"
    biggest = max((p for p in step4.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # the newest is corrupt
    greedy = ["--prompt", PROMPT, "--max_new_tokens", "10", "--temperature", "0", "--json"]
    out = run(["--ckpt", workdir] + greedy)
    [from_ckpt] = json_lines(out)
    want = generate(TINY, params, [get_tokenizer().encode(PROMPT)], max_new_tokens=10, temperature=0)[0]
    assert from_ckpt["tokens"] == want
    assert from_ckpt["prompt"] == PROMPT and from_ckpt["completion"] == get_tokenizer().decode(want)
    assert from_ckpt["tokens_per_s"] > 0
    # Said once: what was skipped, why, and the step used.
    assert [line for line in out.stderr.splitlines() if "step 4" in line] == [out.stderr.strip()]
    assert out.stderr.strip().endswith("were written): unusable, skipped; using step 3")
    # A step folder named on purpose does not fall back (generate.py's loader; its errors reach the
    # command line as one line, test_bad_checkpoint_folders_are_one_line_errors).
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {step4} is unusable: file ")):
        load_model(ckpt=str(step4))

    out = run(["--ckpt", workdir, "--out", str(tmp_path / "hf")], module="gpt2_jax.export")
    assert out.returncode == 0, out.stderr
    config, exported = load_hf_gpt2(str(tmp_path / "hf"))
    assert config == TINY
    jax.tree_util.tree_map(np.testing.assert_array_equal, exported, params)
    # The exported folder, decoding speculatively (prompt lookup): the same greedy tokens.
    [from_hf] = json_lines(run(["--hf", str(tmp_path / "hf"), "--speculate", "3"] + greedy))
    assert from_hf["tokens"] == from_ckpt["tokens"]
    # The folder carries GPT-2's tokenizer: transformers loads it and encodes as we do.
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    require("transformers")
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = PROMPT + " <|endoftext|> naïve café 1234"
    assert hf_tokenizer(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")
    assert hf_tokenizer.eos_token_id == EOT_ID and hf_tokenizer.model_max_length == TINY.block_size

    # Exporting again into the same folder is refused before anything is read or written...
    weights = tmp_path / "hf" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    out = run(["--ckpt", workdir, "--out", str(tmp_path / "hf")], module="gpt2_jax.export")
    assert_one_line_error(out, f"--out {tmp_path / 'hf'} already exists and is not empty: give a new folder, or "
                               "--force")
    assert weights.stat().st_mtime_ns == before
    # ...unless asked for (the command line's --force): then the weights are written again.
    export_checkpoint(workdir, str(tmp_path / "hf"), "bfloat16", overwrite=True)
    assert weights.stat().st_mtime_ns != before
    bf16 = load_hf_gpt2(str(tmp_path / "hf"))[1]["wte"]["embedding"]
    np.testing.assert_allclose(bf16, params["wte"]["embedding"], rtol=1e-2)


def test_export_refuses_a_rotary_model_and_writes_nothing(tmp_path):
    rotary = TINY.replace(position_embedding="rotary")
    workdir = make_checkpoint(tmp_path / "run", rotary, random_params(rotary, std=0.3))
    # export's own function (its command line, and how it reports a refusal, are run in the test above)
    with pytest.raises(ValueError, match="cannot be exported as a Hugging Face GPT-2: position_embedding='rotary'"):
        export_checkpoint(workdir, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_bad_checkpoint_folders_are_one_line_errors(tmp_path):
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    common = ["--prompt", "hi", "--max_new_tokens", "2"]
    assert_one_line_error(run(["--ckpt", str(tmp_path / "missing")] + common), "missing: no such folder")
    assert_one_line_error(run(["--ckpt", str(empty)] + common), "the folder is empty")
    assert_one_line_error(run(["--ckpt", str(junk)] + common), "is not a checkpoint")


def test_bad_arguments_are_one_line_errors(tiny_hf):
    cases = [
        ([], "give exactly one of --ckpt DIR (a training checkpoint) or --hf DIR"),
        (["--hf", tiny_hf, "--ckpt", tiny_hf], "give exactly one of --ckpt DIR"),
        (["--hf", tiny_hf, "--top_p", "1.5"], "top_p=1.5 must be in (0, 1]"),
        (["--hf", tiny_hf, "--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--hf", tiny_hf, "--temperature", "-1"], "temperature=-1.0 must be a finite number >= 0"),
        (["--hf", tiny_hf, "--num_samples", "0"], "num_samples=0 must be an integer >= 1"),
    ]
    for args, message in cases:
        assert_one_line_error(run(args + ["--prompt", "hi"]), message)
    speculation = [
        (["--speculate", "-1"], "--speculate=-1 must be an integer in [0, 64] (0 = off)"),
        (["--draft_ckpt", tiny_hf], "--speculate=0 with a draft model: drafting needs speculate >= 1"),
    ]
    for args, message in speculation:
        out = run(["--hf", tiny_hf, "--prompt", "hi"] + args)
        assert_one_line_error(out, message)
        assert out.returncode == 2


def test_a_prompt_longer_than_the_context_is_refused_unless_truncated(tiny_hf, sampled):
    n = len(get_tokenizer().encode(LONG_PROMPT))
    out = run(["--hf", tiny_hf, "--prompt", LONG_PROMPT, "--max_new_tokens", "5"])
    assert_one_line_error(out, f"the prompt has {n} tokens but the model's context is 32 tokens")
    assert "--truncate left" in out.stderr
    assert all(len(r["tokens"]) == 12 for r in sampled["records"])  # --truncate left made room for all 12
