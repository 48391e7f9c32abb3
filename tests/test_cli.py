"""What every command line shares (gpt2_jax/cli.py): --help exits 0, a usage or input error is one
`error:` line with exit code 2, a failed start leaves no workdir; the compilation cache's folder and
generate.py's kept traced programs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import subprocess_env

from gpt2_jax import cli, compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, GENERATE = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "generate.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_help_exits_0_and_usage_errors_are_one_line_with_exit_2(tmp_path):
    workdir = tmp_path / "never_made"
    runs = {  # arguments -> (exit code, text on stdout (help) or in the one stderr line)
        (TRAIN, "--help"): (0, "  --workdir:"),
        (GENERATE, "--help"): (0, "  --max_new_tokens:"),
        ("-m", "gpt2_jax.export", "--help"): (0, "  --out:"),
        ("-m", "gpt2_jax.evaluate", "--help"): (0, "  --hellaswag:"),
        (TRAIN, "--config", TINY, "--config.data.source=/no/such.txt", f"--workdir={workdir}"):
            (2, "Data source '/no/such.txt' does not exist"),
        (TRAIN, "--config", os.path.join(ROOT, "configs", "nope.py")): (2, "nope.py: no such file"),
        (TRAIN, "--config", TINY, "stray"): (2, "unexpected arguments ['stray']"),
        (GENERATE, "--max_new_tokenz=3"): (2, "Unknown command line flag 'max_new_tokenz'"),
        ("-m", "gpt2_jax.export", "--ckpt=x"): (2, "Flag --out must have a value"),
        ("-m", "gpt2_jax.evaluate", "--hf=x", "--limit=-1", "--text=t.txt"): (2, "--limit=-1 must be >= 0"),
    }
    env = subprocess_env(1)
    procs = {args: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for args in runs}
    for args, (code, text) in runs.items():
        out, err = procs[args].communicate(timeout=120)
        assert procs[args].returncode == code, (args, err)
        if code == 0:
            assert text in out and err == "", (args, err)
        else:
            assert err.splitlines() == [err.splitlines()[-1]] and err.startswith("error: ") and text in err, (args, err)
    assert not workdir.exists()  # the failed start made no workdir


def test_ctrl_c_before_training_is_a_line_and_exit_130():
    program = "from gpt2_jax import cli\ndef main(argv):\n    raise KeyboardInterrupt\ncli.run(main)\n"
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=subprocess_env(1), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 130 and out.stderr.strip() == "interrupted"


def test_describe_gives_one_line():
    assert cli.describe(FileNotFoundError(2, "No such file or directory", "/x/y.txt")) == "/x/y.txt: No such file or directory"
    assert cli.describe(ValueError("first\n  second\n")) == "first second"
    assert cli.describe(KeyError()) == "KeyError"


def test_compilation_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.folder() == os.path.expanduser("~/.cache/gpt2_jax/jax_cache")
    assert compilation_cache.folder(str(tmp_path / "corpora" / "jax_cache")) == str(tmp_path / "corpora" / "jax_cache")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "mine"))
    assert compilation_cache.folder() == str(tmp_path / "mine")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.folder() is None


def test_traced_programs_are_kept_and_loaded_instead_of_traced(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation_cache, "_programs_folder", str(tmp_path))
    traced = []

    def f(x, y):
        traced.append(x.shape)
        return {"sum": x + y["a"], "twice": y["n"] * 2}

    args = (jnp.ones(3), {"a": jnp.arange(3.0), "n": jnp.int32(4)})
    first = compilation_cache.compile_traced(f, args, key="f")(*args)
    again = compilation_cache.compile_traced(f, args, key="f")(*args)  # loaded from disk: not traced
    assert traced == [(3,)] and len(os.listdir(tmp_path)) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, first)
    np.testing.assert_array_equal(again["sum"], [1.0, 2.0, 3.0])
    compilation_cache.compile_traced(f, (jnp.ones(4), {"a": jnp.arange(4.0), "n": jnp.int32(4)}), key="f")
    compilation_cache.compile_traced(f, args, key="another f")  # another key: traced again
    assert traced == [(3,), (4,), (3,)] and len(os.listdir(tmp_path)) == 3
    donated = compilation_cache.compile_traced(f, args, key="f", donate_argnums=(0,))
    x = jnp.ones(3)
    assert float(donated(x, args[1])["sum"][2]) == 3.0 and x.is_deleted()
