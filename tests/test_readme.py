"""README.md says what the project does: its install and test lines (and CI runs the same), its
commands do not collide, its Python snippet for a training checkpoint runs, and the library never
imports the test-only references."""

import ast
import os
import re
import shlex
import tomllib

import jax
import numpy as np
from helpers import make_checkpoint, random_params

from gpt2_jax import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python train.py --config configs/small.py"
TEST = '. .venv/bin/activate && pip install -e ".[test,tpu]" torch==2.13.0 && python -m pytest -q'


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_install_line_trains_without_test_tools_and_the_test_line_adds_them():
    bash = blocks("bash")
    assert bash[0].strip() == INSTALL and bash[1].strip() == TEST
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    needed = " ".join(project["dependencies"])
    assert not re.search(r"\b(torch|transformers|pytest)\b", needed)
    assert {re.split(r"[<>=]", d)[0] for d in project["optional-dependencies"]["test"]} >= {"pytest", "transformers"}
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "pip install --quiet -e .  " in ci  # line 1's install, then the test command's
    assert 'pip install --quiet -e ".[test,tpu]" torch==2.13.0' in ci and ci.rstrip().endswith("python -m pytest -q")
    # The TPU compiler comes in an extra: the training install stays lean.
    assert "libtpu" not in needed and any(d.startswith("jax[tpu]") for d in project["optional-dependencies"]["tpu"])


def test_the_library_never_imports_the_test_references():
    for folder, _, files in os.walk(os.path.join(ROOT, "gpt2_jax")):
        for name in (f for f in files if f.endswith(".py")):
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(m.split(".")[0] in ("torch", "transformers", "pytest") for m in modules), (name, modules)


def test_readme_training_commands_use_separate_workdirs():
    workdirs = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if "python train.py" not in line or "..." in line or "--preflight" in line:
                continue
            args = shlex.split(line[line.index("python train.py"):].split("#")[0].rstrip("'"))
            config = args[args.index("--config") + 1]
            flag = [a for a in args if a.startswith("--workdir")]
            workdir = (flag[0].split("=", 1)[1] if "=" in flag[0] else args[args.index(flag[0]) + 1]) if flag \
                else f"workdir/{os.path.splitext(os.path.basename(config))[0]}"
            workdirs.append(workdir)
    assert "workdir/small" in workdirs and len(workdirs) == len(set(workdirs)), workdirs


def test_readme_loads_a_training_checkpoint_from_python(tmp_path, monkeypatch):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
    params = random_params(cfg, std=0.3)
    make_checkpoint(tmp_path / "workdir" / "small", cfg, params, step=250)
    [snippet] = [b for b in blocks("python") if "restore_params" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the README's own lines
    assert scope["config"] == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, scope["params"], params)
    assert scope["logits"].shape == (1, scope["tokens"].shape[1], 50257)
    assert np.isfinite(np.asarray(scope["logits"])).all()


def test_readme_says_where_hellaswag_comes_from():
    assert "hellaswag_val.jsonl" in README
    assert "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl" in README
