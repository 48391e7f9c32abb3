"""Accelerator benchmark: our GPT-2 train step per attention implementation, a PyTorch peer, decoding.

    python bench/accelerator.py [--json] [--batch_per_device 16] [--steps 20]   # on a GPU or TPU host
    python bench/accelerator.py --smoke [--json]                                # tiny shapes on a CPU

Measures, on the devices of this host, in one run:
  (a) train: our real train step (gpt2_jax.training.step.make_train_step) for GPT-2 124M at T=1024,
      bf16 compute with fp32 parameters and AdamW state, data-parallel over every local device,
      once per attention implementation the platform has (TPU: splash, blockwise, dense; GPU:
      cudnn, blockwise, dense). Tokens/s, and MFU: model FLOPs (ModelConfig.train_flops_per_token,
      the figure train.py logs) per second over the devices' dense bf16 peak.
  (b) peer (GPU): bench/torch_gpt2.py - the same model in PyTorch the nanoGPT way (SDPA flash
      attention, bf16 autocast, torch.compile, fused AdamW) on the same token batch, one device.
  (c) decode: greedy tokens/s of gpt2_jax.inference.sampling.generate (bf16 weights) against Hugging
      Face `generate` (bf16, KV cache) on the same device, at batch 1 and 64.
Every part runs in its own process (JAX and PyTorch each want the accelerator's memory) and under
a deadline, so one failure or hang costs its row, not the run. Weights are random (nothing is
downloaded): speed does not depend on their values.

--smoke runs every part (splash interpreted, the cuDNN call's XLA version, PyTorch eager) at tiny
shapes on a CPU, where the figures mean nothing; tests/test_bench.py runs it so the script cannot rot.
There the parts share one child process: a CPU has no device memory to keep apart, and JAX's and
PyTorch's start-up are paid once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere

# Per part, seconds before it is abandoned: together within the 8 minutes the benchmark promises.
DEADLINES = {"train": 240, "torch": 120, "decode": 60, "hf_decode": 50}


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(n_layer=1, n_head=4, n_embd=32, seq_len=128, vocab_size=256, prompt_len=4, new_tokens=4,
                    decode_batches=[1, 2])
    return dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50257, prompt_len=64, new_tokens=256,
                decode_batches=[1, 64])


# --------------------------------------------------------------------------- parts (each in a child process)
def _tokens(batch: int, length: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, length + 1)).astype(np.int32)


def _timed_steps(step, warmup: int, steps: int) -> tuple[float, float, float]:
    """(first call seconds (compile), median step seconds, last loss) of `step() -> loss` (blocking)."""
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), loss


def part_train(args) -> list[dict]:
    """(a): our train step once per attention implementation of this platform."""
    import jax
    import numpy as np

    from configs import base
    from gpt2_jax.model.attention import resolve_attention
    from gpt2_jax.model.config import model_config_from
    from gpt2_jax.training import sharding
    from gpt2_jax.training.metrics import peak_flops_per_device
    from gpt2_jax.training.run import build_run, create_train_state
    from gpt2_jax.training.step import make_train_step

    s = shapes(args.smoke)
    platform = jax.default_backend()
    impls = {"tpu": ["splash", "blockwise", "dense"], "gpu": ["cudnn", "blockwise", "dense"]}.get(
        platform, ["blockwise", "dense", "cudnn", "splash"])
    n_dev = jax.local_device_count()
    c = base.get_config()
    c.model.update(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], block_size=s["seq_len"],
                   vocab_size=s["vocab_size"], dtype="bfloat16", param_dtype="float32")
    c.train.global_batch_size = args.batch_per_device * n_dev
    c.train.num_steps = 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    mesh = sharding.make_mesh(c.mesh, jax.local_devices())
    tokens = _tokens(c.train.global_batch_size, s["seq_len"], s["vocab_size"])
    peak = peak_flops_per_device() * n_dev
    auto = resolve_attention(model_config_from(c.model))[0]
    # The attention implementation has no parameters of its own: every row starts from one initial
    # state, initialised once (not once per row) and kept on the host, so no device holds a spare copy.
    host_state = None
    rows = []
    for impl in impls:
        c.model.attention = impl
        model_config = model_config_from(c.model)
        row = {"part": "train", "attention": impl, "auto_choice": impl == auto, "devices": n_dev,
               "batch": c.train.global_batch_size, "seq_len": s["seq_len"], "dtype": "bfloat16"}
        try:
            run = build_run(model_config, c.train, mesh, c.train.num_steps)
            if host_state is None:
                host_state = jax.device_get(create_train_state(run))
            holder = {"state": jax.device_put(host_state, run.state_shardings)}
            put = lambda x: jax.device_put(x, run.batch_sharding)  # noqa: E731
            batch = {"inputs": put(tokens[:, :-1]), "targets": put(tokens[:, 1:])}
            train_step = make_train_step(run)

            def step() -> float:
                holder["state"], metrics = train_step(holder["state"], batch)
                return float(metrics["loss"])  # blocks

            first, seconds, loss = _timed_steps(step, args.warmup, args.steps)
            tokens_per_s = c.train.global_batch_size * s["seq_len"] / seconds
            flops = model_config.train_flops_per_token(s["seq_len"]) * tokens_per_s
            row.update(compile_s=first, step_ms=seconds * 1e3, tokens_per_s=tokens_per_s, mfu=flops / peak,
                       peak_flops=peak, loss=loss, ok=bool(np.isfinite(loss)))
        except Exception as e:  # noqa: BLE001 - a row that failed (out of memory, unsupported) is reported
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        jax.clear_caches()
    return rows


def part_torch(args) -> list[dict]:
    """(b): the PyTorch peer on one device, the same per-device batch and tokens."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from torch_gpt2 import GPT, make_train_step

    s = shapes(args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        return [{"part": "torch", "ok": False, "error": "no CUDA device: the PyTorch peer runs on GPUs"}]
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT(s["n_layer"], s["n_head"], s["n_embd"], s["seq_len"], 50304).to(device)
    compile_model = device == "cuda"  # inductor on a CPU needs a C++ toolchain and minutes: smoke runs eager
    step_fn = make_train_step(model, 6e-4, 0.1, 1.0, device, compile_model)
    tokens = torch.as_tensor(_tokens(args.batch_per_device, s["seq_len"], s["vocab_size"]), dtype=torch.long)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> float:
        return float(step_fn(inputs, targets))  # .item() synchronises

    first, seconds, loss = _timed_steps(step, args.warmup, args.steps)
    return [{"part": "torch", "device": device, "compiled": compile_model, "batch": args.batch_per_device,
             "seq_len": s["seq_len"], "compile_s": first, "step_ms": seconds * 1e3,
             "tokens_per_s": args.batch_per_device * s["seq_len"] / seconds, "loss": loss, "ok": True}]


def _decode_prompts(batch: int, s: dict) -> list[list[int]]:
    return _tokens(batch, s["prompt_len"] - 1, s["vocab_size"], seed=batch).tolist()


def part_decode(args) -> list[dict]:
    """(c), ours: greedy decoding with bf16 weights on one device."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.inference.sampling import generate
    from gpt2_jax.model import ModelConfig, init_params

    s = shapes(args.smoke)
    config = ModelConfig(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], block_size=1024,
                         vocab_size=s["vocab_size"], dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(config, jax.random.PRNGKey(0)))
    rows = []
    for batch in s["decode_batches"]:
        prompts = _decode_prompts(batch, s)
        run = lambda: generate(config, params, prompts, max_new_tokens=s["new_tokens"], temperature=0,  # noqa: E731
                               eos_id=None)
        first, seconds, _ = _timed_steps(run, 0, args.decode_repeats)
        rows.append({"part": "decode", "side": "gpt2_jax", "batch": batch, "new_tokens": s["new_tokens"],
                     "first_call_s": first, "tokens_per_s": batch * s["new_tokens"] / seconds, "ok": True})
    return rows


def part_hf_decode(args) -> list[dict]:
    """(c), theirs: Hugging Face generate, bf16, KV cache, greedy, on the same device."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    s = shapes(args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = GPT2Config(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], vocab_size=s["vocab_size"])
    model = GPT2LMHeadModel(config).to(device=device, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # always exactly new_tokens tokens
    model.generation_config.pad_token_id = 0
    rows = []
    for batch in s["decode_batches"]:
        ids = torch.as_tensor(_decode_prompts(batch, s), device=device)

        def run():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                     max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"])
            return out.shape[1]  # .generate returns when done; reading the shape needs no sync

        if device == "cuda":
            inner = run
            run = lambda: (inner(), torch.cuda.synchronize())[0]  # noqa: E731
        first, seconds, _ = _timed_steps(run, 0, args.decode_repeats)
        rows.append({"part": "decode", "side": "huggingface", "device": device, "batch": batch,
                     "new_tokens": s["new_tokens"], "first_call_s": first,
                     "tokens_per_s": batch * s["new_tokens"] / seconds, "ok": True})
    return rows


PARTS = {"train": part_train, "torch": part_torch, "decode": part_decode, "hf_decode": part_hf_decode}


# --------------------------------------------------------------------------- the run
def run_parts(names: list[str], args, env: dict) -> list[dict]:
    """Parts `names` in one child process under their summed deadline; their rows, or one row saying
    why there are none. A JAX part also describes its devices into `env` (so this process need not
    start JAX itself)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--part={','.join(names)}",
           f"--batch_per_device={args.batch_per_device}", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--decode_repeats={args.decode_repeats}"]
    if args.smoke:
        cmd.append("--smoke")
    deadline = sum(DEADLINES[name] for name in names) * (2 if args.smoke else 1)  # smoke: a loaded CPU compiles slowly
    # Smoke: PyTorch on one thread (its figures mean nothing; a second thread mostly spins on a loaded CPU).
    child_env = dict(os.environ, OMP_NUM_THREADS="1") if args.smoke else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline, env=child_env)
    except subprocess.TimeoutExpired:
        return [{"part": ",".join(names), "ok": False, "error": f"did not finish within {deadline} s"}]
    rows = [json.loads(line[len("ROW "):]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    for line in proc.stdout.splitlines():
        if line.startswith("ENV "):
            env.update(json.loads(line[len("ENV "):]))
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        rows.append({"part": ",".join(names), "ok": False, "error": f"exit {proc.returncode}: {tail}"})
    return rows


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": jax.default_backend(), "device_kind": device.device_kind, "local_devices": jax.local_device_count(),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def summarize(rows: list[dict]) -> dict:
    """The issue's two goals on one device: MFU of the best attention, and ours / PyTorch tokens/s."""
    train = [r for r in rows if r["part"] == "train" and r.get("ok")]
    peer = next((r for r in rows if r["part"] == "torch" and r.get("ok")), None)
    best = max(train, key=lambda r: r["tokens_per_s"], default=None)
    out = {}
    if best:
        out["best_attention"] = best["attention"]
        out["best_mfu"] = best["mfu"]
        if peer:  # per device, since the peer runs on one
            out["ours_over_torch"] = best["tokens_per_s"] / best["devices"] / peer["tokens_per_s"]
    for batch in sorted({r["batch"] for r in rows if r["part"] == "decode"}):
        sides = {r["side"]: r for r in rows if r["part"] == "decode" and r["batch"] == batch and r.get("ok")}
        if len(sides) == 2:
            out[f"decode_b{batch}_ours_over_hf"] = sides["gpt2_jax"]["tokens_per_s"] / sides["huggingface"]["tokens_per_s"]
    return out


def print_table(env: dict, rows: list[dict], summary: dict) -> None:
    print(f"{env['device_kind']} x{env['local_devices']} ({env['platform']}), jax {env['jax']}, {env['date']}")
    print(f"{'part':<8} {'what':<28} {'batch':>5} {'tokens/s':>12} {'MFU':>6} {'step ms':>9} {'first s':>8}")
    for r in rows:
        what = {"train": f"gpt2_jax {r.get('attention', '')}{' (auto)' if r.get('auto_choice') else ''}",
                "torch": f"pytorch{' compiled' if r.get('compiled') else ' eager'}",
                "decode": r.get("side", "")}.get(r["part"], r["part"])
        if not r.get("ok"):
            print(f"{r['part']:<8} {what:<28} failed: {r.get('error', 'non-finite loss')}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else ""
        first = r.get("compile_s", r.get("first_call_s", 0.0))
        print(f"{r['part']:<8} {what:<28} {r['batch']:>5} {r['tokens_per_s']:>12,.0f} {mfu:>6} {step:>9} {first:>8.1f}")
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: checks the script, not speed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--batch_per_device", type=int, default=None, help="sequences per device (default 16; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 20; smoke 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one; smoke 0")
    parser.add_argument("--decode_repeats", type=int, default=None, help="timed generate calls (default 3; smoke 1)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # a child process runs these parts
    args = parser.parse_args()
    args.batch_per_device = args.batch_per_device or (1 if args.smoke else 16)
    args.steps = args.steps or (1 if args.smoke else 20)
    args.decode_repeats = args.decode_repeats or (1 if args.smoke else 3)
    if args.smoke:
        args.warmup = 0

    if args.part:
        names = args.part.split(",")
        for name in names:
            for row in PARTS[name](args):
                print("ROW " + json.dumps(row), flush=True)
        if {"train", "decode"} & set(names):  # JAX is up here already
            print("ENV " + json.dumps(environment()), flush=True)
        return
    names = args.parts.split(",")
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    env = {}
    groups = [names] if args.smoke else [[name] for name in names]  # smoke: one child (see the docstring)
    rows = [row for group in groups for row in run_parts(group, args, env)]
    env = env or environment()  # no JAX part ran (or none got that far)
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"environment": env, "rows": rows, "summary": summary}))
    else:
        print_table(env, rows, summary)


if __name__ == "__main__":
    main()
