"""The training step with the whole-logits loss against the chunked one (config.model.loss_chunk), on this machine.

    python bench/loss_chunk.py                                  # a small model's shape, chunks 0 (whole), 32, 64
    python bench/loss_chunk.py --shape throughput_small --chunks 0,64,128 --rounds 6
    python bench/loss_chunk.py --json

Every variant is the step train.py runs (`make_train_step`, fp32, AdamW, vocabulary padded to 50304),
built in this one process from the same initial state and batch; after compiling, the variants take
turns, `--steps` steps each per round for `--rounds` rounds, so load changes on a shared machine fall
on all of them alike. Reported: the median step time of each over all its timed steps (min-max), the
median CPU seconds a step used (every thread of this process: what load from other work does not
inflate), each as a ratio to the first variant's, and each variant's first loss (the same, to fp32
rounding).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench.cpu_facts import cpu_facts  # noqa: E402

# (n_layer, n_head, n_embd, T, B): the earlier quickstart's model and batch, and train_throughput.py's shapes.
SHAPES = {"small": (4, 4, 256, 128, 2), "throughput_small": (6, 6, 384, 256, 8), "124m_t256": (12, 12, 768, 256, 4),
          "124m_t1024": (12, 12, 768, 1024, 1)}

flags.DEFINE_enum("shape", "small", list(SHAPES), "Model and batch shape.")
flags.DEFINE_list("chunks", ["0", "32", "64"], "loss_chunk values to compare (0 = whole logits).")
flags.DEFINE_integer("rounds", 5, "Rounds; each variant runs --steps timed steps per round.")
flags.DEFINE_integer("steps", 3, "Timed steps per variant per round.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
FLAGS = flags.FLAGS


def build(chunk: int, shape: tuple, initial_state, tokens):
    """(step() -> loss, compile seconds) for the train step with loss_chunk=chunk."""
    import jax
    import numpy as np

    from configs import base
    from gpt2_jax.model.config import model_config_from
    from gpt2_jax.training import sharding
    from gpt2_jax.training.run import build_run
    from gpt2_jax.training.step import make_train_step

    n_layer, n_head, n_embd, T, B = shape
    c = base.get_config()
    c.model.update(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, scan_layers=False,
                        loss_chunk=chunk))
    c.train.global_batch_size = B
    c.mesh.data = 1
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    run = build_run(model_config_from(c.model), c.train, mesh, 1000)
    step_fn = make_train_step(run)
    batch = {"inputs": jax.device_put(np.asarray(tokens[:, :-1]), run.batch_sharding),
             "targets": jax.device_put(np.asarray(tokens[:, 1:]), run.batch_sharding)}
    holder = {"state": jax.device_put(initial_state, run.state_shardings)}

    def step() -> float:
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    start = time.perf_counter()
    first_loss = step()  # compiles
    return step, time.perf_counter() - start, first_loss


def main(argv) -> None:
    del argv
    import jax
    import numpy as np

    from configs import base
    from gpt2_jax.model.config import model_config_from
    from gpt2_jax.training import sharding
    from gpt2_jax.training.run import build_run, create_train_state

    shape = SHAPES[FLAGS.shape]
    chunks = [int(c) for c in FLAGS.chunks]
    n_layer, n_head, n_embd, T, B = shape
    c = base.get_config()
    c.model.update(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, scan_layers=False))
    c.train.global_batch_size = B
    c.mesh.data = 1
    run = build_run(model_config_from(c.model), c.train, sharding.make_mesh(c.mesh, jax.devices()[:1]), 1000)
    initial = jax.device_get(create_train_state(run))
    tokens = np.random.default_rng(0).integers(0, 50257, (B, T + 1)).astype(np.int32)

    variants = {chunk: build(chunk, shape, initial, tokens) for chunk in chunks}
    load_before = os.getloadavg()[0]
    times: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    cpu_times: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for _ in range(FLAGS.rounds):
        for chunk, (step, _, _) in variants.items():
            for _ in range(FLAGS.steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                times[chunk].append(time.perf_counter() - start)
                cpu_times[chunk].append(time.process_time() - cpu_start)

    # CPU seconds (all of this process's threads) next to wall-clock: on a machine shared with other
    # work, waiting for a core inflates wall time but not the work a step does.
    median = {chunk: statistics.median(times[chunk]) for chunk in chunks}
    cpu_median = {chunk: statistics.median(cpu_times[chunk]) for chunk in chunks}
    rows = [{"loss_chunk": chunk, "median_s": median[chunk], "min_s": min(times[chunk]), "max_s": max(times[chunk]),
             "vs_first": median[chunk] / median[chunks[0]], "cpu_median_s": cpu_median[chunk],
             "cpu_vs_first": cpu_median[chunk] / cpu_median[chunks[0]],
             "compile_s": variants[chunk][1], "first_loss": variants[chunk][2]} for chunk in chunks]
    record = {"shape": dict(zip(("n_layer", "n_head", "n_embd", "seq_len", "batch_size"), shape)), "vocab": 50304,
              "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps, "rows": rows, **cpu_facts(),
              "cores": os.cpu_count(), "jax": jax.__version__,
              "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}  # before and after the timed steps
    if FLAGS.json:
        print(json.dumps(record))
        return
    print(f"{record['cpu']} ({os.cpu_count()} cores), jax {jax.__version__}; shape {record['shape']}, "
          f"{FLAGS.rounds} rounds x {FLAGS.steps} steps each; 1-minute load {record['load_1min']}")
    print(f"{'loss_chunk':>10} {'median s':>9} {'min-max s':>15} {'vs first':>8} {'CPU s':>7} {'vs first':>8} "
          f"{'compile s':>9} {'first loss':>11}")
    for r in rows:
        print(f"{r['loss_chunk']:>10} {r['median_s']:>9.4f} {r['min_s']:>7.4f}-{r['max_s']:<7.4f} "
              f"{r['vs_first']:>8.3f} {r['cpu_median_s']:>7.3f} {r['cpu_vs_first']:>8.3f} "
              f"{r['compile_s']:>9.1f} {r['first_loss']:>11.6f}")


if __name__ == "__main__":
    app.run(main)
