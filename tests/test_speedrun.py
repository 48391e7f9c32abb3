"""bench/speedrun.py: how it reads a run's curve and training time, where a curve reaches the target,
and the whole script at a tiny size (--smoke)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import speedrun  # noqa: E402


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_training_time_leaves_out_the_first_step_and_the_evaluations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [
        {"step": 1, "loss": 9.0, "time": 100.0, "tokens": 10},  # after compilation: not counted
        {"step": 2, "loss": 8.0, "time": 101.0, "tokens": 20},  # 1 s
        {"step": 2, "val_loss": 8.5, "time": 111.0, "tokens": 20},  # 10 s of evaluation: not counted
        {"step": 3, "loss": 7.0, "time": 113.0, "tokens": 30},  # 2 s
        {"step": 4, "loss": 6.0, "time": 116.0, "tokens": 40},  # 3 s
        {"step": 4, "val_loss": 6.5, "time": 120.0, "tokens": 40},
    ])
    curve = speedrun.read_curve(str(path))
    assert curve == {"val": [(20, 1.0, 8.5), (40, 6.0, 6.5)], "train_s": 6.0}


def test_reach_interpolates_between_evaluations_and_says_never():
    curve = {"val": [(100, 10.0, 5.0), (200, 30.0, 4.0), (300, 40.0, 4.5)], "train_s": 40.0}
    assert speedrun.reach(curve, 4.5) == pytest.approx((150.0, 20.0))  # the first crossing, not the last point
    assert speedrun.reach(curve, 5.5) == (100, 10.0)  # already there at the first evaluation
    assert speedrun.reach(curve, 3.9) is None
    baseline = {"val": [(100, 10.0, 5.0), (200, 20.0, 4.2)], "train_s": 20.0}
    result = speedrun.compare(baseline, curve)
    assert result["target_val_loss"] == 4.2 and result["modern_tokens"] == pytest.approx(180.0)
    assert result["tokens_ratio"] == pytest.approx(0.9) and result["time_ratio"] == pytest.approx(26.0 / 20.0)
    never = speedrun.compare(baseline, {"val": [(100, 5.0, 6.0), (200, 9.0, 5.0)], "train_s": 9.0})
    assert never["tokens_ratio"] is None and never["time_ratio"] is None


def test_the_script_end_to_end_at_a_tiny_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "speedrun.py"), "--smoke", "--json", "--workdir", str(tmp_path),
         "--plot", str(tmp_path / "curves.png"), "--source", os.path.join(ROOT, "README.md")],
        capture_output=True, text=True, timeout=600, env=subprocess_env(1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["source"].endswith("README.md") and os.path.getsize(tmp_path / "curves.png") > 0
    assert {"tokens_ratio", "time_ratio", "baseline_tokens", "modern_tokens"} <= set(out)
    assert out["step_time_ratio"] == pytest.approx(out["modern_step_s"] / out["baseline_step_s"]) and out["rounds"] == 2
    assert out["target_val_loss"] == out["curves"]["baseline"][-1][2]
    if out["tokens_ratio"] is not None:
        assert out["tokens_ratio"] == pytest.approx(out["modern_tokens"] / out["baseline_tokens"])
