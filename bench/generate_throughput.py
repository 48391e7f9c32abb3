"""Decoding throughput: gpt2_jax.inference.sampling vs Hugging Face `generate(use_cache=True)`, same weights.

    python bench/generate_throughput.py [--batch_sizes 1,8] [--prompt_len 32] [--new_tokens 128] [--json]

Both sides get the GPT-2 small shape (124M, GPT2Config() defaults) with one random
initialisation, saved by transformers' save_pretrained and read by gpt2_jax.hf.load_hf_gpt2,
the same random prompts, greedy decoding and exactly --new_tokens new tokens per row (no stop
at <|endoftext|>). Ours runs with fp32 weights and, as a second entry, bf16 weights and compute
(generate.py --dtype bfloat16); HF runs fp32. By default (--separate) HF runs in this process and
ours in a fresh child process, as `generate.py` runs: per batch size, --rounds rounds of HF's
--repeats timed runs, then a child's warm-up call (compilation) and --repeats timed runs. (In one
process, our calls between HF's ran ~10% below their rate in a process of their own: the same
allocator and cache effects train_throughput.py's README describes.) With --separate=false every
entry runs in this process, a warm-up each, then the entries take turns for --repeats timed
runs. The MEDIAN run is reported as new tokens per second (batch x new_tokens / wall time of the
whole generate call, prefill included). Needs torch and transformers.

For batch 1 the table also shows the weight traffic this rate implies (weight bytes x tokens/s:
a decode step reads every weight once) beside the machine's memory bandwidth measured with a
large array copy (before the runs, and again before each round of timed runs: the median of the
rounds' figures counts); the rate above which decoding cannot go from DRAM is bandwidth / weight bytes.
A CPU whose last-level cache holds much of the weights can beat that figure.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from absl import app, flags, logging  # noqa: E402

from bench.cpu_facts import cpu_facts  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("repeats", 5, "Timed runs per entry after the warm-up; the median counts.")
flags.DEFINE_list("ours_dtypes", ["float32", "bfloat16"], "Weight/compute dtypes to run gpt2_jax with.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the prompts.")
flags.DEFINE_bool("json", False, "Print one JSON object per batch size instead of a table.")
flags.DEFINE_bool("separate", True, "Run our entries in a child process of their own, once per round and batch "
                  "size, while HF runs in this one (as train_throughput.py does); False: every entry in this "
                  "process, taking turns.")
flags.DEFINE_integer("rounds", 2, "With --separate: rounds of (HF's timed runs here, then ours in a fresh process).")
flags.DEFINE_string("side_dir", None, "Internal: time our entries on the model and prompts in this folder, print JSON.")


def timed_runs(fns, repeats: int, each_round=None) -> tuple[list[list[float]], list]:
    """(wall times of each function's timed runs, each one's last output): one warm-up call each,
    then `repeats` rounds in which the functions take turns; `each_round()`, if given, runs
    before each round."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        if each_round is not None:
            each_round()
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times, outs


def median_times(fns, repeats: int, each_round=None) -> list[tuple[float, object]]:
    """(median wall time, output) of each function: `timed_runs`, reduced to medians."""
    times, outs = timed_runs(fns, repeats, each_round)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, runs: int = 5) -> float:
    """GB/s of a large array copy (read + write), median of `runs`: the DRAM bandwidth decoding sees."""
    import numpy as np

    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / statistics.median(times) / 1e9


def our_variants(folder: str) -> dict:
    """dtype -> (config, params) of the model saved in `folder`, for each of --ours_dtypes."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.model.hf import load_hf_gpt2

    config, params = load_hf_gpt2(folder)
    variants = {}
    for dtype in FLAGS.ours_dtypes:
        cast = jax.tree_util.tree_map(lambda x, d=dtype: jnp.asarray(x, jnp.dtype(d)), params)
        variants[dtype] = (config.replace(dtype=dtype, param_dtype=dtype), cast)
    return variants


def ours_fn(variant, prompts):
    from gpt2_jax.inference.sampling import generate

    cfg, params = variant
    return lambda: generate(cfg, params, prompts.tolist(), max_new_tokens=FLAGS.new_tokens, temperature=0, eos_id=None)


def run_side(folder: str) -> None:
    """Child process: our entries on `folder`'s model and prompts.npy, warm-up then --repeats rounds
    (a bandwidth measurement before each); prints {times, tokens, copies, weight_bytes} as JSON."""
    import jax
    import numpy as np

    variants = our_variants(folder)
    prompts = np.load(os.path.join(folder, "prompts.npy"))
    copies = []
    times, outs = timed_runs([ours_fn(v, prompts) for v in variants.values()], FLAGS.repeats,
                             each_round=lambda: copies.append(copy_bandwidth_gbs(runs=3)))
    print(json.dumps({
        "times": dict(zip(variants, times)), "tokens": dict(zip(variants, outs)), "copies": copies,
        "weight_bytes": {d: sum(x.nbytes for x in jax.tree_util.tree_leaves(p)) for d, (_, p) in variants.items()},
    }))


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    if FLAGS.side_dir:
        run_side(FLAGS.side_dir)
        return
    import subprocess

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(FLAGS.seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.generation_config.eos_token_id = None  # always exactly new_tokens tokens, like eos_id=None below
    hf.generation_config.pad_token_id = 0
    folder_obj = tempfile.TemporaryDirectory()
    folder = folder_obj.name
    hf.save_pretrained(folder)  # both sides hold the same numbers
    variants = None if FLAGS.separate else our_variants(folder)
    bandwidth = copy_bandwidth_gbs()
    rng = np.random.default_rng(FLAGS.seed)
    N = FLAGS.new_tokens
    print(f"GPT-2 124M, prompt {FLAGS.prompt_len}, {N} new tokens, greedy; torch threads "
          f"{torch.get_num_threads()}; copy bandwidth {bandwidth:.1f} GB/s; "
          f"{'ours in separate processes' if FLAGS.separate else 'one process'}", file=sys.stderr)

    for batch_size in map(int, FLAGS.batch_sizes):
        prompts = rng.integers(0, hf.config.vocab_size, (batch_size, FLAGS.prompt_len))

        def theirs():
            ids = torch.as_tensor(prompts)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                  max_new_tokens=N, min_new_tokens=N)
            return out[:, FLAGS.prompt_len :].tolist()

        # The bandwidth is measured again before each round of timed runs (3 copies), so the
        # DRAM-bound rate comes from the same minutes as the rates it is compared with.
        copies = []
        if FLAGS.separate:
            np.save(os.path.join(folder, "prompts.npy"), prompts)
            theirs()  # warm-up
            t_hf, t_ours, tokens_ours, weight_bytes = [], {}, {}, {}
            for _ in range(FLAGS.rounds):
                for _ in range(FLAGS.repeats):
                    copies.append(copy_bandwidth_gbs(runs=3))
                    start = time.perf_counter()
                    tokens_hf = theirs()
                    t_hf.append(time.perf_counter() - start)
                child = subprocess.run([sys.executable, os.path.abspath(__file__), f"--side_dir={folder}",
                                        f"--ours_dtypes={','.join(FLAGS.ours_dtypes)}", f"--repeats={FLAGS.repeats}",
                                        f"--new_tokens={N}"], capture_output=True, text=True, check=True)
                side = json.loads(child.stdout.strip().splitlines()[-1])
                copies += side["copies"]
                weight_bytes, tokens_ours = side["weight_bytes"], side["tokens"]
                for dtype, ts in side["times"].items():
                    t_ours.setdefault(dtype, []).extend(ts)
            t_hf = statistics.median(t_hf)
            ours = {d: (statistics.median(ts), tokens_ours[d]) for d, ts in t_ours.items()}
        else:
            import jax

            weight_bytes = {d: sum(x.nbytes for x in jax.tree_util.tree_leaves(p)) for d, (_, p) in variants.items()}
            results = median_times([theirs] + [ours_fn(v, prompts) for v in variants.values()], FLAGS.repeats,
                                   each_round=lambda: copies.append(copy_bandwidth_gbs(runs=3)))
            t_hf, tokens_hf = results[0]
            ours = dict(zip(variants, results[1:]))
        bandwidth_now = statistics.median(copies)
        record = {"batch_size": batch_size, "prompt_len": FLAGS.prompt_len, "new_tokens": N,
                  "hf_tokens_per_s": batch_size * N / t_hf, "copy_bandwidth_gbs": bandwidth_now,
                  "copy_bandwidth_range_gbs": [min(copies), max(copies)], "separate_processes": FLAGS.separate,
                  **cpu_facts(), "cores": len(os.sched_getaffinity(0))}
        for dtype, (t_ours, tokens) in ours.items():
            # Random 0.02-scale weights give near-uniform logits, so rounding may flip a near-tie:
            # agreement is reported, not required (tests/test_generate_cli.py checks exact parity).
            agree = float(np.mean([a == b for x, y in zip(tokens, tokens_hf) for a, b in zip(x, y)]))
            rate = batch_size * N / t_ours
            limit = bandwidth_now * 1e9 / weight_bytes[dtype] * batch_size
            record[dtype] = {
                "ours_tokens_per_s": rate,
                "speedup_over_hf_fp32": t_hf / t_ours,
                "weight_bytes": weight_bytes[dtype],
                "dram_limit_tokens_per_s": limit,
                "of_dram_limit": rate / limit,
                "implied_weight_traffic_gbs": weight_bytes[dtype] * rate / batch_size / 1e9,
                "token_agreement_with_hf": agree,
            }
        if FLAGS.json:
            print(json.dumps(record), flush=True)
            continue
        print(f"batch {batch_size:3d}: HF generate fp32 {record['hf_tokens_per_s']:8.1f} tok/s", flush=True)
        for dtype in ours:
            r = record[dtype]
            print(f"           gpt2_jax {dtype:<8} {r['ours_tokens_per_s']:8.1f} tok/s | ours/HF "
                  f"{r['speedup_over_hf_fp32']:.2f}x | weights {r['weight_bytes'] / 1e6:.0f} MB -> "
                  f"{r['implied_weight_traffic_gbs']:.1f} GB/s of weight reads ({r['of_dram_limit']:.0%} of the "
                  f"DRAM limit {r['dram_limit_tokens_per_s']:.0f} tok/s) | greedy tokens agree with HF "
                  f"{r['token_agreement_with_hf']:.0%}", flush=True)
    folder_obj.cleanup()


if __name__ == "__main__":
    app.run(main)
