"""The CPU speedrun: does the modern recipe reach GPT-2's recipe's validation loss in fewer tokens and
less time? Both train the model of configs/speedrun_cpu.py on the same data, seed and token budget,
each in its own `train.py` process.

    python bench/speedrun.py                     # baseline vs modern: ratios, table, bench/speedrun.png
    python bench/speedrun.py --json              # one JSON object (tokens_ratio, time_ratio, ...)
    python bench/speedrun.py --source my.txt     # the same on another corpus (any config.data.source)
    python bench/speedrun.py --sweep             # the learning-rate sweep behind the configs' rates
    python bench/speedrun.py --ablate            # the modern recipe with each switch turned back to GPT-2's
    python bench/speedrun.py --document_mask     # also the modern recipe with config.data.document_mask=True

The target is the baseline's final validation loss. For each recipe: the tokens and the training
wall-clock at which its validation curve first reaches the target (linear between evaluations),
and the ratios modern / baseline (above 1, or null when the modern recipe never gets there, means
it lost). Wall-clock is the sum of the training steps' times from metrics.jsonl (one record a
step): the first step (compilation) and the evaluations are left out, everything the optimizer
does (Muon's Newton-Schulz iterations included) is in. The two runs take turns on the machine, so
a load that changes between them moves time_ratio; the script therefore also times both recipes'
steps alternately in one process and prints tokens_ratio x that step-time ratio
(time_ratio_alternating) beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "speedrun_cpu.py")

# Each switch of the modern recipe, turned back to GPT-2's value (the ablation).
ABLATIONS = {
    "adamw": {"train.optimizer": "adamw"},
    "cosine": {"train.lr_schedule": "cosine"},
    "layernorm": {"model.norm": "layernorm"},
    "no_qk_norm": {"model.qk_norm": False},
    "gelu": {"model.mlp_activation": "gelu"},
    "tied": {"model.tie_embeddings": True},
    "no_softcap": {"model.logit_softcap": 0.0},
    "gpt2_init": {"model.zero_init_proj": False},
}
# The learning-rate sweep around each recipe's configured rate (6e-3 and 0.02: the main two runs), a
# factor of two each way: the baseline's AdamW rate (min_lr a tenth of it), the modern recipe's Muon rate.
SWEEP = {
    "baseline": [{"train.learning_rate": lr, "train.min_lr": lr / 10} for lr in (3e-3, 1.2e-2)],
    "modern": [{"train.muon_learning_rate": lr} for lr in (0.01, 0.04)],
}
# The modern recipe with attention kept inside each document (positions restarting at each <|endoftext|>).
# Its validation loss is computed under the same mask, so each token sees less context than the others'.
DOCUMENT_MASK = {"data.document_mask": True}
SMOKE = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 16,
         "train.global_batch_size": 4, "train.num_steps": 4, "train.warmup_steps": 1, "train.eval_every": 2,
         "train.eval_steps": 1}


def train(recipe: str, workdir: str, overrides: dict, log) -> dict:
    """Runs train.py for `recipe` with `overrides` (config key -> value) in `workdir`; returns its curve.

    A workdir that already holds this very run, finished (same recipe and overrides), is read instead
    of trained again: --workdir DIR makes an interrupted sweep go on where it stopped."""
    stamp = os.path.join(workdir, "speedrun_run.json")
    with open(CONFIG, "rb") as f:
        config_sha = hashlib.sha256(f.read()).hexdigest()[:16]  # an edited config is another run
    this = {"recipe": recipe, "overrides": {k: str(v) for k, v in overrides.items()}, "config_sha256": config_sha}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == this:
                curve = read_curve(os.path.join(workdir, "metrics.jsonl"))
                log(f"  {recipe:8s} {_show(overrides) or '(as configured)'}: finished before, read from {workdir}")
                return curve
    if os.path.exists(workdir):
        shutil.rmtree(workdir)  # a run that did not finish, or another run: start clean (resume would differ)
    args = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={CONFIG}:{recipe}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    started = time.time()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} {overrides} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    curve = read_curve(os.path.join(workdir, "metrics.jsonl"))
    curve["process_s"] = time.time() - started
    with open(stamp, "w") as f:
        json.dump(this, f)
    log(f"  {recipe:8s} {_show(overrides) or '(as configured)'}: final val_loss {curve['val'][-1][2]:.4f}, "
        f"{curve['train_s']:.1f} s training, {curve['process_s']:.0f} s in all")
    return curve


def read_curve(path: str) -> dict:
    """metrics.jsonl -> {"val": [(tokens, train_seconds, val_loss)], "train_s": total training seconds}.

    Training seconds add up the time between consecutive records that ends in a training record:
    the first step (compilation) has no record before it, and an interval that ends in an
    evaluation record is the evaluation's.
    """
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train_s, previous, val = 0.0, None, []
    for r in records:
        if "val_loss" in r:
            val.append((r["tokens"], train_s, r["val_loss"]))
        elif previous is not None:
            train_s += r["time"] - previous
        previous = r["time"]
    if not val:
        raise ValueError(f"{path} has no evaluation records: set config.train.eval_every")
    return {"val": val, "train_s": train_s}


def reach(curve: dict, target: float) -> tuple[float, float] | None:
    """(tokens, seconds) where the validation curve first gets to `target`, linear between the two
    evaluations around it; None if it never does."""
    before = (0, 0.0, float("inf"))
    for point in curve["val"]:
        if point[2] <= target:
            (t0, s0, l0), (t1, s1, l1) = before, point
            f = 1.0 if l0 == float("inf") else (l0 - target) / (l0 - l1)
            return t0 + f * (t1 - t0), s0 + f * (s1 - s0)
        before = point
    return None


def compare(baseline: dict, modern: dict) -> dict:
    target = baseline["val"][-1][2]
    got = {name: reach(c, target) for name, c in (("baseline", baseline), ("modern", modern))}
    b, m = got["baseline"], got["modern"]
    return {
        "target_val_loss": target,
        "baseline_tokens": b[0], "baseline_s": b[1],
        "modern_tokens": None if m is None else m[0], "modern_s": None if m is None else m[1],
        "tokens_ratio": None if m is None else m[0] / b[0],
        "time_ratio": None if m is None else m[1] / b[1],
        "baseline_final_val_loss": baseline["val"][-1][2], "modern_final_val_loss": modern["val"][-1][2],
        "baseline_train_s": baseline["train_s"], "modern_train_s": modern["train_s"],
    }


def step_times(overrides: dict, rounds: int) -> dict:
    """Both recipes' train steps built in this process and timed alternately (baseline, modern, ...):
    the ratio of their medians does not move when the machine's load does between the two runs."""
    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    import configs.speedrun_cpu as speedrun_cpu
    from gpt2_jax import compilation_cache
    from gpt2_jax.training import run as run_lib
    from gpt2_jax.training import sharding
    from gpt2_jax.training import step as step_lib

    # train.py's cache (as it chooses it): the two runs just compiled these very programs.
    compilation_cache.enable(default=os.path.join(speedrun_cpu.get_config().data.cache_dir, "jax_cache"))
    steps = {}
    for recipe in ("baseline", "modern"):
        c = speedrun_cpu.get_config(recipe)
        for key, value in overrides.items():
            if not key.startswith("data."):
                block, name = key.split(".")
                c[block][name] = value
        run = run_lib.run_from_config(c, sharding.make_mesh(c.mesh))
        rows = np.random.default_rng(0).integers(0, 50257, (c.train.global_batch_size, c.model.block_size + 1))
        put = lambda x: jax.device_put(x.astype(np.int32), run.batch_sharding)  # noqa: E731
        batch = {"inputs": put(rows[:, :-1]), "targets": put(rows[:, 1:])}
        step, state = step_lib.make_train_step(run), run_lib.create_train_state(run)
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        steps[recipe] = [step, state, batch, []]
    for _ in range(rounds):
        for entry in steps.values():
            step, state, batch, times = entry
            started = time.perf_counter()
            entry[1], metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
    median = {recipe: float(np.median(entry[3])) for recipe, entry in steps.items()}
    return {"baseline_step_s": median["baseline"], "modern_step_s": median["modern"],
            "step_time_ratio": median["modern"] / median["baseline"], "rounds": rounds}


def plot(curves: dict[str, dict], path: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        tokens, seconds, losses = zip(*c["val"])
        axes[0].plot([t / 1e3 for t in tokens], losses, marker=".", label=name)
        axes[1].plot(seconds, losses, marker=".", label=name)
    for ax, xlabel in zip(axes, ("tokens (thousands)", "training wall-clock (s)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CPU speedrun: GPT-2 recipe vs modern recipe (dashed: the baseline's final loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _show(overrides: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in overrides.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--source", default="", help="train both on this corpus (any config.data.source)")
    p.add_argument("--sweep", action="store_true", help="also run the learning-rate sweep of both recipes")
    p.add_argument("--ablate", action="store_true", help="also run the modern recipe without each switch")
    p.add_argument("--document_mask", action="store_true",
                   help="also run the modern recipe with config.data.document_mask=True")
    p.add_argument("--steps", type=int, default=0, help="train every run this many steps (default: the config's)")
    p.add_argument("--step_rounds", type=int, default=10,
                   help="alternate the two recipes' steps this many times in one process (0 = skip)")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (checks the script)")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "speedrun.png"), help="PNG path ('' = none)")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    common = {"data.source": args.source} if args.source else {}
    if args.smoke:
        common.update(SMOKE)
    if args.steps:
        common["train.num_steps"] = args.steps
    root = args.workdir or tempfile.mkdtemp(prefix="speedrun_")
    out: dict = {"source": args.source or "builtin:shakespeare", "smoke": args.smoke}

    def run(recipe: str, name: str, overrides: dict) -> dict:
        return train(recipe, os.path.join(root, name), {**common, **overrides}, log)

    log(f"speedrun: configs/speedrun_cpu.py, runs in {root}")
    curves = {"baseline": run("baseline", "baseline", {}), "modern": run("modern", "modern", {})}
    result = compare(curves["baseline"], curves["modern"])
    out.update(result)
    out["curves"] = {k: c["val"] for k, c in curves.items()}
    if args.step_rounds:
        # Wall-clock again, robust to load drift: tokens to target x the step-time ratio measured
        # with both steps alternating in one process (the runs themselves ran one after the other).
        out.update(step_times(common, 2 if args.smoke else args.step_rounds))
        if result["tokens_ratio"] is not None:
            out["time_ratio_alternating"] = result["tokens_ratio"] * out["step_time_ratio"]

    if args.sweep:
        out["sweep"] = {}
        for recipe, grid in SWEEP.items():
            for overrides in grid:
                c = run(recipe, f"sweep_{recipe}_" + "_".join(f"{k.split('.')[-1]}{v:g}" for k, v in overrides.items()),
                        overrides)
                r = reach(c, result["target_val_loss"])
                out["sweep"].setdefault(recipe, []).append({
                    "overrides": overrides, "final_val_loss": c["val"][-1][2],
                    "tokens_to_target": None if r is None else r[0]})
    if args.ablate:
        out["ablation"] = []
        for name, overrides in ABLATIONS.items():
            c = run("modern", f"ablate_{name}", overrides)
            r = reach(c, result["target_val_loss"])
            out["ablation"].append({
                "without": name, "overrides": overrides, "final_val_loss": c["val"][-1][2],
                "tokens_ratio": None if r is None else r[0] / result["baseline_tokens"],
                "time_ratio": None if r is None else r[1] / result["baseline_s"],
                "train_s": c["train_s"]})
    if args.document_mask:
        c = run("modern", "modern_document_mask", DOCUMENT_MASK)
        r = reach(c, result["target_val_loss"])
        out["document_mask"] = {
            "final_val_loss": c["val"][-1][2], "train_s": c["train_s"],
            "tokens_ratio": None if r is None else r[0] / result["baseline_tokens"],
            "time_ratio": None if r is None else r[1] / result["baseline_s"],
            "train_time_ratio_vs_modern": c["train_s"] / curves["modern"]["train_s"]}
    if args.plot:
        plot(curves, args.plot, result["target_val_loss"])
        out["plot"] = args.plot

    if args.json:
        print(json.dumps(out))
        return
    fmt = lambda x, f: "never" if x is None else format(x, f)  # noqa: E731
    print(f"\ntarget: the baseline's final validation loss {result['target_val_loss']:.4f}")
    print(f"{'recipe':10s} {'final val':>9s} {'tokens to target':>17s} {'seconds to target':>18s}")
    print(f"{'baseline':10s} {result['baseline_final_val_loss']:9.4f} {result['baseline_tokens']:17,.0f} "
          f"{result['baseline_s']:18.1f}")
    print(f"{'modern':10s} {result['modern_final_val_loss']:9.4f} {fmt(result['modern_tokens'], '17,.0f')} "
          f"{fmt(result['modern_s'], '18.1f')}")
    print(f"tokens_ratio {fmt(result['tokens_ratio'], '.3f')} (goal <= 0.6), "
          f"time_ratio {fmt(result['time_ratio'], '.3f')} (goal <= 0.7)")
    if "step_time_ratio" in out:
        print(f"steps timed alternately in one process: baseline {out['baseline_step_s'] * 1e3:.0f} ms, modern "
              f"{out['modern_step_s'] * 1e3:.0f} ms (x{out['step_time_ratio']:.2f}); tokens_ratio x that = "
              f"{fmt(out.get('time_ratio_alternating'), '.3f')}")
    for recipe, rows in out.get("sweep", {}).items():
        for row in rows:
            print(f"sweep {recipe:8s} {_show(row['overrides']):28s} final val {row['final_val_loss']:.4f}")
    if "document_mask" in out:
        row = out["document_mask"]
        print(f"modern with document_mask final val {row['final_val_loss']:.4f} (masked evaluation) "
              f"tokens_ratio {fmt(row['tokens_ratio'], '.3f')} time_ratio {fmt(row['time_ratio'], '.3f')} "
              f"training time x{row['train_time_ratio_vs_modern']:.2f} of modern's")
    for row in out.get("ablation", []):
        print(f"modern without {row['without']:10s} final val {row['final_val_loss']:.4f} "
              f"tokens_ratio {fmt(row['tokens_ratio'], '.3f')} time_ratio {fmt(row['time_ratio'], '.3f')}")


if __name__ == "__main__":
    main()
