"""Corpus preparation throughput: `python -m gpt2_jax.data.prepare` against tiktoken alone, in one run.

    python bench/prepare_throughput.py [--workers 2] [--tokens 40_000_000] [--json]

The corpus is FineWeb-like parquet (4 files of documents of 200-8000 characters, cut from the built-in
Shakespeare plays at random places), written once into a temporary folder. Three rates, in tokens/s:
  tiktoken  one process over the same documents, already in memory (no reading, no writing), the faster of
            `encode_ordinary_batch(docs, num_threads=1)` and `encode_to_numpy` per document (what the
            workers call): the one-core speed of the tokeniser itself;
  ideal     tiktoken x --workers (capped at the cores this process may use);
  ours      `prepare()` from the parquet files to finished shards and manifest, wall clock, start-up of the
            worker processes included.
The main process reads the parquet files, hands batches out and writes the shards; its CPU time per token
(`main_cpu_ns_per_token`) says how many tokens/s it could feed before it, not the tokeniser, would limit.
The goal is ours >= 85% of ideal. Other work on the machine lowers both the same way only if it is steady:
run it on a quiet machine, and read the ratios, not the rates. On a shared machine the CPU-time figures
still mean something: `cpu_efficiency` is tiktoken's CPU time per token over ours (main process and
workers, their start-up included), the fraction of ideal the pipeline reaches when its cores are its own.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import numpy as np  # noqa: E402

from bench.cpu_facts import cpu_facts  # noqa: E402
from gpt2_jax.data import corpus, prepare  # noqa: E402
from gpt2_jax.data.tokenizer import get_tokenizer  # noqa: E402


def make_documents(num_tokens: int, seed: int = 0) -> list[str]:
    """Documents of 200-8000 characters cut from the plays, about ``num_tokens`` GPT-2 tokens in all."""
    text = "\n".join(corpus.play_markdown_to_text(p.read_text(encoding="utf-8")) for p in corpus.shakespeare_files())
    rng = np.random.default_rng(seed)
    docs, chars = [], int(num_tokens * 3.3)  # ~3.3 characters per token in this text
    while chars > 0:
        n = int(rng.integers(200, 8000))
        start = int(rng.integers(0, len(text) - n))
        docs.append(text[start: start + n])
        chars -= n
    return docs


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, its finished children's)."""
    return tuple(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--tokens", type=int, default=40_000_000, help="corpus size, about")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = p.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(args.tokens)
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as tmp:
        for i, part in enumerate(np.array_split(np.arange(len(docs)), 4)):
            pq.write_table(pa.table({"text": [docs[j] for j in part]}), os.path.join(tmp, f"part_{i}.parquet"))

        enc = get_tokenizer()
        # tiktoken alone on one core, two ways; the faster is the reference (the workers use the second).
        rates = {}
        for name, call in (
            ("encode_ordinary_batch", lambda: enc.encode_ordinary_batch(docs, num_threads=1)),  # its one thread
            ("encode_to_numpy", lambda: [enc.encode_to_numpy(d, allowed_special=set(), disallowed_special=())
                                         for d in docs]),
        ):
            cpu, began = time.process_time(), time.perf_counter()
            n = sum(map(len, call()))
            rates[name] = (n / (time.perf_counter() - began), (time.process_time() - cpu) / n)
        one, one_cpu = max(rates.values())

        usage = cpu_seconds()
        began = time.perf_counter()
        manifest = prepare.prepare(prepare.Options(sources=(tmp,), out=os.path.join(tmp, "out"), workers=args.workers,
                                                   val_tokens=1_000_000), say=lambda line: None)
        wall = time.perf_counter() - began
        main_cpu, workers_cpu = (end - start for start, end in zip(usage, cpu_seconds()))  # workers: joined children
    cores = min(args.workers, len(os.sched_getaffinity(0)))
    ours = manifest["total_tokens"] / wall
    record = {
        **cpu_facts(), "cores": len(os.sched_getaffinity(0)), "workers": args.workers, "documents": len(docs),
        "tokens": manifest["total_tokens"], "tiktoken_tokens_per_s": round(one),
        "tiktoken_tokens_per_s_by_call": {k: round(v[0]) for k, v in rates.items()},
        "ideal_tokens_per_s": round(one * cores),
        "ours_tokens_per_s": round(ours), "ours_wall_s": round(wall, 2), "ours_over_tiktoken": round(ours / one, 3),
        "ours_over_ideal": round(ours / (one * cores), 3),
        "tiktoken_cpu_ns_per_token": round(one_cpu * 1e9, 1),
        "ours_cpu_ns_per_token": round((main_cpu + workers_cpu) / manifest["total_tokens"] * 1e9, 1),
        "cpu_efficiency": round(one_cpu * manifest["total_tokens"] / (main_cpu + workers_cpu), 3),
        "main_cpu_ns_per_token": round(main_cpu / manifest["total_tokens"] * 1e9, 1),
        "main_limit_tokens_per_s": round(manifest["total_tokens"] / main_cpu), "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(record))
        return
    print(f"{record['cpu']}, {record['cores']} cores; {len(docs):,} documents, {manifest['total_tokens']:,} tokens")
    for name, (rate, _) in rates.items():
        print(f"tiktoken, one process   {rate:>14,.0f} tokens/s  ({name})")
    print(f"ideal (x{cores})             {one * cores:>14,.0f} tokens/s")
    print(f"ours, {args.workers} workers         {ours:>14,.0f} tokens/s  ({wall:.1f} s)")
    limit = record["main_limit_tokens_per_s"]
    print(f"main process: {record['main_cpu_ns_per_token']} ns of CPU per token: it could feed {limit:,} tokens/s "
          f"({limit / one:.0f} cores' worth)")
    print(f"CPU time per token: tiktoken {record['tiktoken_cpu_ns_per_token']} ns, ours "
          f"{record['ours_cpu_ns_per_token']} ns (all processes): cpu_efficiency {record['cpu_efficiency']:.1%}")
    print(f"ours / tiktoken {ours / one:.2f}x, ours / ideal {ours / (one * cores):.1%} (goal >= 85%)")


if __name__ == "__main__":
    main()
