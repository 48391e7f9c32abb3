"""Training throughput: gpt2_jax's train step vs Hugging Face GPT2LMHeadModel + torch AdamW, same shapes.

    python bench/train_throughput.py [--shapes small,124m_t256,124m_t1024] [--steps 5] [--warmup 2]
                                     [--rounds 2] [--scan_layers] [--json]

Ours is the real step of train.py: gpt2_jax.training.step.make_train_step on a 1-device mesh (fp32,
AdamW, global-norm clipping, the hyper-parameters of configs/base.py), vocabulary padded to 50304
rows. Theirs is transformers' GPT2LMHeadModel (vocabulary 50257, its default attention) with
torch.optim.AdamW under the same hyper-parameters: forward, cross-entropy over all T positions,
loss.backward, clip_grad_norm_, step, zero_grad; torch uses one thread per core.

Both get the same random token batch. Per shape, `rounds` rounds; in each, ours runs in a fresh
process (GEMM ceiling, build, compile = first call, then `warmup + steps` steps), then theirs in
another. Warm-up steps are dropped and the MEDIAN over all rounds' timed steps is reported. One
process per side keeps either framework's allocator state from slowing the other (see
bench/README.md). The fp32 GEMM ceiling (XLA, 2048^3) is measured in each of our processes.
Needs torch and transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from absl import app, flags, logging  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int  # T of every sequence in the batch
    batch_size: int

    def describe(self) -> str:
        return f"L{self.n_layer} H{self.n_head} E{self.n_embd} T{self.seq_len} B{self.batch_size}"


SHAPES = {
    "small": Shape(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch_size=8),
    "124m_t256": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=256, batch_size=4),  # preset "gpt2"
    "124m_t1024": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=1),
}
BLOCK_SIZE = 1024  # GPT-2's context on both sides; it only sizes the position table
VOCAB_SIZE = 50257  # the tokenizer's; ours pads its table to PAD_VOCAB_TO, HF does not
PAD_VOCAB_TO = 64
GEMM_N = 2048
GEMM_REPEATS = 7
# jax.monitoring events whose durations add up to one jit compilation (trace, lower, XLA compile).
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to time, any of {list(SHAPES)}.")
flags.DEFINE_integer("steps", 5, "Timed steps per implementation and shape; the median is reported.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per implementation before the timed ones (after ours compiles).")
flags.DEFINE_integer("rounds", 2, "Rounds of (ours, then theirs), each side a fresh process running warmup + steps "
                     "steps; the median is over all rounds' timed steps.")
flags.DEFINE_float("pause", 1.0, "Seconds of idle before each side's process starts.")
flags.DEFINE_bool("scan_layers", False, "Our model's scan_layers switch (configs/small.py's choice on CPU: False). "
                  "The compile time of the scanned step is measured either way.")
flags.DEFINE_bool("loop", False, "Also time train.py's loop (gpt2_jax.training.trainer.train on the built-in corpus, "
                  "a metrics record every step) in a third process per round, and print loop / step.")
flags.DEFINE_enum("side", None, ["ours", "hf", "loop"], "Internal: run one side of one shape and print its JSON record.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the token batch.")
flags.DEFINE_bool("json", False, "Print a JSON list of records (one per shape) instead of a table.")


# --------------------------------------------------------------------------- FLOPs
def train_flops_per_token(shape: Shape) -> float:
    """Model FLOPs of one trained token, by the formula the trainer's MFU and preflight use
    (`ModelConfig.train_flops_per_token`: 6 per matmul weight, the head at the true vocabulary,
    plus the causal half of the attention square). Both sides are counted the same way, so the
    GFLOP/s columns compare like with like."""
    from gpt2_jax.model.config import ModelConfig

    config = ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                         block_size=BLOCK_SIZE, vocab_size=VOCAB_SIZE)
    return config.train_flops_per_token(shape.seq_len)


# --------------------------------------------------------------------------- timing helpers
def _seconds(fn: Callable[[], object]) -> float:
    return _timed(fn)[0]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def xla_gemm_gflops() -> float:
    """Median GFLOP/s of a jitted fp32 [N, N] @ [N, N] matmul: the ceiling `of GEMM` refers to."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, GEMM_N, GEMM_N), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile
    times = [_seconds(lambda: matmul(a, b).block_until_ready()) for _ in range(GEMM_REPEATS)]
    return 2 * GEMM_N**3 / statistics.median(times) / 1e9


def torch_gemm_gflops() -> float:
    """The same for torch.mm (MKL / oneDNN): context for the HF side, not its ceiling."""
    import torch

    a, b = torch.randn(2, GEMM_N, GEMM_N, dtype=torch.float32)
    torch.mm(a, b)
    times = [_seconds(lambda: torch.mm(a, b)) for _ in range(GEMM_REPEATS)]
    return 2 * GEMM_N**3 / statistics.median(times) / 1e9


@contextlib.contextmanager
def compile_seconds() -> Iterator[list[float]]:
    """Collects JAX's trace + lower + XLA compile durations of the calls inside, summed into [0]."""
    import jax

    total = [0.0]

    def listener(event: str, duration: float, **kwargs) -> None:  # noqa: ARG001
        if event in _COMPILE_EVENTS:
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------- the two sides
def build_ours(shape: Shape, train_cfg, tokens, num_steps: int, scan_layers: bool, compile_only: bool = False):
    """(step() -> loss, non-embedding parameter count, padded vocab) for our jitted train step.

    compile_only: only trace, lower and compile the step for abstract inputs; returns None.
    """
    import jax
    import numpy as np

    from configs import base
    from gpt2_jax.model import abstract_params
    from gpt2_jax.model.config import count_params, model_config_from
    from gpt2_jax.training import sharding
    from gpt2_jax.training.run import build_run, create_train_state
    from gpt2_jax.training.step import make_train_step

    c = base.get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = shape.n_layer, shape.n_head, shape.n_embd
    c.model.block_size, c.model.vocab_size = BLOCK_SIZE, VOCAB_SIZE
    c.model.pad_vocab_to_multiple = PAD_VOCAB_TO
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.scan_layers = scan_layers
    c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
    model_config = model_config_from(c.model)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])

    params = abstract_params(model_config)
    embeddings = count_params({"wte": params["wte"], "wpe": params["wpe"]})
    n_nonembedding = count_params(params) - embeddings

    if compile_only:
        run = build_run(model_config, train_cfg, mesh, num_steps)
        train_step = make_train_step(run)
        batch = jax.ShapeDtypeStruct((shape.batch_size, shape.seq_len), np.int32)
        with sharding.sharding_context(mesh):
            train_step.jitted.lower(run.abstract_state, {"inputs": batch, "targets": batch}).compile()
        return None
    run = build_run(model_config, train_cfg, mesh, num_steps)
    state = create_train_state(run)
    train_step = make_train_step(run)
    batch_spec = run.batch_sharding
    batch = {
        "inputs": jax.device_put(np.asarray(tokens[:, :-1], np.int32), batch_spec),
        "targets": jax.device_put(np.asarray(tokens[:, 1:], np.int32), batch_spec),
    }
    holder = {"state": state}  # the state is donated: each call replaces it

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    return step, n_nonembedding, model_config.padded_vocab_size


def build_hf(shape: Shape, train_cfg, tokens, dropout: float):
    """(step() -> loss, non-embedding parameter count, attention implementation) for HF + torch AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, n_positions=BLOCK_SIZE,
        vocab_size=VOCAB_SIZE, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    model = GPT2LMHeadModel(hf_config).train()
    n_nonembedding = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in (model.transformer.wte.weight, model.transformer.wpe.weight)
    )
    # The same split as gpt2_jax.optim.decay_mask: matmul weights and embeddings decay, the rest not.
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_b1, train_cfg.adam_b2),
        eps=train_cfg.adam_eps,
    )
    inputs = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
    targets = torch.as_tensor(tokens[:, 1:], dtype=torch.long)

    def step() -> float:
        logits = model(inputs).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # all T positions, as ours
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, n_nonembedding, model.config._attn_implementation


# --------------------------------------------------------------------------- one side, in its own process
def _train_cfg(shape: Shape):
    from configs import base

    train_cfg = base.get_config().train
    train_cfg.global_batch_size = shape.batch_size
    train_cfg.num_steps = 1 + FLAGS.warmup + FLAGS.steps  # the schedule's length; it does not change the work
    return train_cfg


def run_side(name: str, side: str) -> dict:
    """One side at one shape: build, first step, `warmup` + `steps` steps. Runs in a child process."""
    import numpy as np

    shape = SHAPES[name]
    train_cfg = _train_cfg(shape)
    tokens = np.random.default_rng(FLAGS.seed).integers(0, VOCAB_SIZE, (shape.batch_size, shape.seq_len + 1))
    if side == "loop":
        return run_loop(name)
    if side == "ours":
        record = {"gemm_gflops": xla_gemm_gflops()}
        step, record["n_nonembedding"], record["vocab_rows"] = build_ours(
            shape, train_cfg, tokens, train_cfg.num_steps, FLAGS.scan_layers)
        with compile_seconds() as compiled:
            record["first_step_s"], record["first_loss"] = _timed(step)
        record["compile_s"] = compiled[0]
    else:
        import torch

        from configs import base

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch.manual_seed(FLAGS.seed)
        record = {"gemm_gflops": torch_gemm_gflops()}
        step, record["n_nonembedding"], record["attn_implementation"] = build_hf(
            shape, train_cfg, tokens, base.get_config().model.dropout)
        record["first_step_s"], record["first_loss"] = _timed(step)
        record["vocab_rows"] = VOCAB_SIZE
    times = [_timed(step)[0] for _ in range(FLAGS.warmup + FLAGS.steps)]
    record["step_times_s"] = times[FLAGS.warmup :]
    return record


def run_loop(name: str) -> dict:
    """train.py's loop at one shape: `trainer.train` for 1 + warmup + steps steps on the built-in
    corpus, logging every step, then its final (synchronous) checkpoint. A step's loop time is the
    wall time between its metrics record and the previous one's, as a user reads metrics.jsonl.

    The model is ours of `build_ours`, except that block_size = T (the trainer trains windows of
    block_size tokens): the position table has T rows instead of 1024 (at 124M T=256, 0.6M fewer
    parameters of 124M for AdamW to update; the matmuls are the same).
    """
    import tempfile

    from configs import base
    from gpt2_jax.training import trainer

    shape = SHAPES[name]
    c = base.get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = shape.n_layer, shape.n_head, shape.n_embd
    c.model.block_size, c.model.vocab_size = shape.seq_len, VOCAB_SIZE
    c.model.pad_vocab_to_multiple = PAD_VOCAB_TO
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.scan_layers = FLAGS.scan_layers
    c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
    c.data.source = "builtin:shakespeare"
    c.train.global_batch_size = shape.batch_size
    c.train.num_steps = 1 + FLAGS.warmup + FLAGS.steps
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every, c.train.sample_tokens = 1, 0, 0, 0
    c.train.seed = FLAGS.seed
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        trainer.train(c, workdir)
        end_wall = time.time()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if '"loss"' in line]
    times = [r["time"] for r in records]
    deltas = [b - a for a, b in zip(times, times[1:])]  # step 2 onwards; step 1 compiles
    return {
        "loop_step_times_s": deltas[FLAGS.warmup :],
        "loop_total_s": time.perf_counter() - start,
        "final_checkpoint_s": end_wall - times[-1],  # after the last record: the final save, the loss plot
    }


def scan_compile_seconds(name: str) -> float:
    """Trace + lower + compile of the train step with scan_layers=True (compiled, not run)."""
    import numpy as np

    shape = SHAPES[name]
    train_cfg = _train_cfg(shape)
    tokens = np.zeros((shape.batch_size, shape.seq_len + 1), np.int64)
    with compile_seconds() as compiled:
        build_ours(shape, train_cfg, tokens, train_cfg.num_steps, True, compile_only=True)
    return compiled[0]


def _child(name: str, side: str) -> dict:
    """Runs `run_side` in a fresh interpreter and returns its record."""
    argv = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--shapes={name}",
            f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}", f"--seed={FLAGS.seed}",
            f"--scan_layers={FLAGS.scan_layers}"]
    done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one shape
def run_shape(name: str, env: dict) -> dict:
    """Rounds of (ours, then theirs), each side in its own process; medians over all timed steps."""
    shape = SHAPES[name]
    load_before = os.getloadavg()[0]
    sides = ("ours", "hf", "loop") if FLAGS.loop else ("ours", "hf")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(FLAGS.rounds):
        for side in sides:
            print(f"[{name}] {shape.describe()}: round {r + 1}/{FLAGS.rounds}, {side} "
                  f"({FLAGS.warmup} + {FLAGS.steps} steps) ...", file=sys.stderr, flush=True)
            time.sleep(FLAGS.pause)
            runs[side].append(_child(name, side))
    load_after = os.getloadavg()[0]
    ours, hf = runs["ours"], runs["hf"]
    if ours[0]["n_nonembedding"] != hf[0]["n_nonembedding"]:
        raise RuntimeError(f"[{name}] non-embedding parameters differ: gpt2_jax {ours[0]['n_nonembedding']:,} "
                           f"vs HF {hf[0]['n_nonembedding']:,}")
    scan_compile = scan_compile_seconds(name) if not FLAGS.scan_layers else ours[0]["compile_s"]

    t_ours = [t for run in ours for t in run["step_times_s"]]
    t_hf = [t for run in hf for t in run["step_times_s"]]
    gemm = statistics.median(run["gemm_gflops"] for run in ours)
    gemm_torch = statistics.median(run["gemm_gflops"] for run in hf)
    n_ours = ours[0]["n_nonembedding"]
    tokens_per_step = shape.batch_size * shape.seq_len
    flops_per_step = train_flops_per_token(shape) * tokens_per_step
    step_ours, step_hf = statistics.median(t_ours), statistics.median(t_hf)
    loop = {}
    if FLAGS.loop:
        t_loop = [t for run in runs["loop"] for t in run["loop_step_times_s"]]
        loop = {
            "loop_step_s": statistics.median(t_loop),
            "loop_step_times_s": t_loop,
            "loop_over_step": statistics.median(t_loop) / step_ours,
            "loop_final_checkpoint_s": statistics.median(run["final_checkpoint_s"] for run in runs["loop"]),
        }
    return {
        "shape": name,
        **dataclasses.asdict(shape),
        "tokens_per_step": tokens_per_step,
        "n_nonembedding": n_ours,
        "model_flops_per_step": flops_per_step,
        "ours_scan_layers": FLAGS.scan_layers,
        "ours_vocab_rows": ours[0]["vocab_rows"],
        "hf_vocab_rows": VOCAB_SIZE,
        "hf_attn_implementation": hf[0]["attn_implementation"],
        # A load above `cores` means other work shared the machine: absolute figures sink with
        # it, the ratio of alternating rounds much less.
        "load_avg_1m": [load_before, load_after],
        "xla_gemm_gflops": gemm,
        "torch_gemm_gflops": gemm_torch,
        "ours_compile_s": ours[0]["compile_s"],
        "ours_scan_compile_s": scan_compile,
        "ours_first_step_s": ours[0]["first_step_s"],
        "hf_first_step_s": hf[0]["first_step_s"],
        "ours_step_s": step_ours,
        "hf_step_s": step_hf,
        "ours_step_times_s": t_ours,
        "hf_step_times_s": t_hf,
        "ours_tokens_per_s": tokens_per_step / step_ours,
        "hf_tokens_per_s": tokens_per_step / step_hf,
        "ours_gflops": flops_per_step / step_ours / 1e9,
        "hf_gflops": flops_per_step / step_hf / 1e9,
        "ours_fraction_of_gemm": flops_per_step / step_ours / 1e9 / gemm,
        "hf_fraction_of_gemm": flops_per_step / step_hf / 1e9 / gemm,
        "speed_ours_over_hf": step_hf / step_ours,
        # Losses of each side's first step, before its optimizer moved: both ~ln(50257) = 10.8.
        "ours_first_loss": ours[0]["first_loss"],
        "hf_first_loss": hf[0]["first_loss"],
        **loop,
        **env,
    }


# --------------------------------------------------------------------------- output
def environment() -> dict:
    import flax
    import jax
    import torch
    import transformers

    from bench.cpu_facts import cpu_facts

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what each HF child process sets
    return {
        **cpu_facts(),
        "cores": len(os.sched_getaffinity(0)),
        "jax_device": jax.devices()[0].device_kind,
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def print_table(records: list[dict], env: dict) -> None:
    print(f"{env['cpu']}, {env['cores']} cores | jax {env['jax']} ({env['jax_device']}), flax {env['flax']} | "
          f"torch {env['torch']} ({env['torch_threads']} threads), transformers {env['transformers']}")
    print(f"fp32, AdamW + clipping. Median of {FLAGS.rounds} rounds x {FLAGS.steps} steps (after {FLAGS.warmup} "
          f"warm-up) per side; each round runs each side in a fresh process, ours first. gpt2_jax scan_layers="
          f"{FLAGS.scan_layers}. Vocab rows: gpt2_jax {records[0]['ours_vocab_rows']} (padded), HF {VOCAB_SIZE}.")
    print("model FLOPs = 6 (N_matmul + V E) + 12 L E (T+1)/2 per token (ModelConfig.train_flops_per_token), "
          "V = 50257 for both; "
          f"'of GEMM' = share of XLA's fp32 {GEMM_N}^3 matmul rate (measured in each of our processes).")
    print()
    print(f"{'shape':<12} {'':<22} {'impl':<9} {'step ms':>9} {'min-max ms':>15} {'tokens/s':>9} "
          f"{'GFLOP/s':>8} {'of GEMM':>8} {'compile s':>10} {'(scan)':>7}")
    for r in records:
        rows = (("gpt2_jax", r["ours_step_s"], r["ours_step_times_s"], r["ours_tokens_per_s"], r["ours_gflops"],
                 r["ours_fraction_of_gemm"], f"{r['ours_compile_s']:10.1f} {r['ours_scan_compile_s']:7.1f}"),
                ("HF torch", r["hf_step_s"], r["hf_step_times_s"], r["hf_tokens_per_s"], r["hf_gflops"],
                 r["hf_fraction_of_gemm"], f"{'-':>10}"))
        shape = Shape(**{f.name: r[f.name] for f in dataclasses.fields(Shape)}).describe()
        for i, (impl, step, times, tps, gflops, frac, compile_s) in enumerate(rows):
            spread = f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f}"
            print(f"{r['shape'] if i == 0 else '':<12} {shape if i == 0 else '':<22} {impl:<9} {1e3 * step:9.1f} "
                  f"{spread:>15} {tps:9.0f} {gflops:8.1f} {frac:8.0%} {compile_s}")
        print(f"{'':<12} {'':<22} ours/HF speed {r['speed_ours_over_hf']:.2f}x   (GEMM GFLOP/s: XLA "
              f"{r['xla_gemm_gflops']:.0f}, torch {r['torch_gemm_gflops']:.0f}; HF attention "
              f"{r['hf_attn_implementation']}; 1-min load {r['load_avg_1m'][0]:.1f} -> {r['load_avg_1m'][1]:.1f})")
        if "loop_step_s" in r:
            times = r["loop_step_times_s"]
            print(f"{'':<12} {'':<22} train.py loop {1e3 * r['loop_step_s']:.1f} ms/step ({1e3 * min(times):.0f}-"
                  f"{1e3 * max(times):.0f}) = {r['loop_over_step']:.3f}x the step; final checkpoint "
                  f"{r['loop_final_checkpoint_s']:.1f} s")


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    unknown = [s for s in FLAGS.shapes if s not in SHAPES]
    if unknown:
        raise app.UsageError(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.rounds < 1:
        raise app.UsageError(f"--steps={FLAGS.steps} and --rounds={FLAGS.rounds} must be >= 1, "
                             f"--warmup={FLAGS.warmup} >= 0")
    if FLAGS.side:
        print(json.dumps(run_side(FLAGS.shapes[0], FLAGS.side)))
        return
    env = environment()
    records = [run_shape(name, env) for name in FLAGS.shapes]
    if FLAGS.json:
        print(json.dumps(records, indent=1))
    else:
        print_table(records, env)


if __name__ == "__main__":
    app.run(main)
