"""bench/accelerator.py --smoke: the whole benchmark (every part, in one child process) at tiny shapes
on a CPU, so the script a GPU or TPU host runs first cannot rot. Its figures mean nothing here."""

import json
import os
import subprocess
import sys

from helpers import require, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_smoke_runs_every_part():
    require("torch")
    require("transformers")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=900, env=subprocess_env(devices=1), cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    rows = report["rows"]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    train = {r["attention"]: r for r in rows if r["part"] == "train"}
    assert set(train) == {"blockwise", "dense", "cudnn", "splash"}  # every implementation, splash interpreted
    assert [r["attention"] for r in train.values() if r["auto_choice"]] == ["blockwise"]  # auto on a CPU
    losses = [r["loss"] for r in train.values()]
    assert max(losses) - min(losses) < 0.05, losses  # the same model and batch: the same first-step loss
    for r in train.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
    assert [r["part"] for r in rows].count("torch") == 1
    decode = {(r["side"], r["batch"]) for r in rows if r["part"] == "decode"}
    assert decode == {(side, b) for side in ("gpt2_jax", "huggingface") for b in (1, 2)}
    assert set(report["summary"]) >= {"best_attention", "best_mfu", "ours_over_torch",
                                      "decode_b1_ours_over_hf", "decode_b2_ours_over_hf"}
    assert report["environment"]["platform"] == "cpu"


def test_speculative_benchmark_smoke_reports_identical_tokens():
    """bench/speculative_throughput.py --smoke: a tiny random model, every entry and part; the tokens
    of every entry equal HF greedy's. Its figures mean nothing."""
    require("torch")
    require("transformers")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "speculative_throughput.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(devices=1), cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report) >= {"environment", "model", "sets", "verify", "derived", "goal"}
    assert report["ks"] == [2] and report["batch_size"] == 1 and report["greedy"]
    for name in ("repeat", "plain"):
        entries = report["sets"][name]["entries"]
        assert {"hf", "ours_plain", "ours_k2"} <= set(entries)  # hf: per prompt, HF's faster torch thread count
        for entry in entries.values():
            assert entry["tokens_identical_to_hf"], entries
            assert entry["tokens_per_s"] > 0
        spec = entries["ours_k2"]
        assert 0 <= spec["accepted"] <= spec["proposed"] and 0 <= spec["acceptance_rate"] <= 1
        assert spec["passes"] <= report["new_tokens"] * report["sets"][name]["prompts"]
        assert set(report["derived"][name]) == {"ours_k2"}
    assert set(report["verify"]["pass_cost_over_one_token"]) == {"1", "3"}
    assert report["goal"]["best_entry"] == "ours_k2"
