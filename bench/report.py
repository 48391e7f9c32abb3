"""Markdown tables and a PNG chart from the JSON of the two benchmarks.

    python bench/train_throughput.py --json > train.json
    python bench/generate_throughput.py --json > generate.jsonl
    python bench/report.py --train train.json --generate generate.jsonl --png bench/throughput.png

Prints the tables (as pasted into BENCHMARKS.md) and writes the chart: tokens/s of gpt2_jax and
Hugging Face side by side for every training shape and decoding batch size.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("train", None, "JSON list written by train_throughput.py --json.")
flags.DEFINE_string("generate", None, "JSON lines written by generate_throughput.py --json.")
flags.DEFINE_string("png", None, "Where to write the chart.")


def train_table(records: list[dict]) -> str:
    lines = [
        "| shape | gpt2_jax tokens/s | HF tokens/s | ours / HF | gpt2_jax GFLOP/s (of XLA GEMM) "
        "| HF GFLOP/s (of XLA GEMM) | XLA / torch GEMM GFLOP/s | compile s, unrolled / scan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        shape = f"{r['shape']} (L{r['n_layer']} E{r['n_embd']} T{r['seq_len']} B{r['batch_size']})"
        lines.append(
            f"| {shape} | {r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | "
            f"**{r['speed_ours_over_hf']:.2f}x** | {r['ours_gflops']:.0f} ({r['ours_fraction_of_gemm']:.0%}) | "
            f"{r['hf_gflops']:.0f} ({r['hf_fraction_of_gemm']:.0%}) | {r['xla_gemm_gflops']:.0f} / "
            f"{r['torch_gemm_gflops']:.0f} | {r['ours_compile_s']:.1f} / {r['ours_scan_compile_s']:.1f} |"
        )
    return "\n".join(lines)


def generate_table(records: list[dict]) -> str:
    lines = [
        "| batch | HF generate fp32 tokens/s | gpt2_jax weights | gpt2_jax tokens/s | ours / HF "
        "| weight reads GB/s | DRAM-bound rate tokens/s | of DRAM-bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for dtype in ("float32", "bfloat16"):
            if dtype not in r:
                continue
            d = r[dtype]
            lines.append(
                f"| {r['batch_size']} | {r['hf_tokens_per_s']:.1f} | {dtype} | {d['ours_tokens_per_s']:.1f} | "
                f"**{d['speedup_over_hf_fp32']:.2f}x** | {d['implied_weight_traffic_gbs']:.1f} | "
                f"{d['dram_limit_tokens_per_s']:.0f} | "
                f"{d['ours_tokens_per_s'] / d['dram_limit_tokens_per_s']:.0%} |"
            )
    return "\n".join(lines)


def chart(train: list[dict], generate: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [len(train), len(generate)]})
    ax = axes[0]
    x = np.arange(len(train))
    ax.bar(x - 0.2, [r["ours_tokens_per_s"] for r in train], 0.4, label="gpt2_jax (JAX)")
    ax.bar(x + 0.2, [r["hf_tokens_per_s"] for r in train], 0.4, label="Hugging Face (PyTorch)")
    ax.set_xticks(x, [f"{r['shape']}\nT={r['seq_len']} B={r['batch_size']}" for r in train])
    ax.set_ylabel("training tokens/s (fp32, AdamW)")
    ax.set_title("Training step")
    for i, r in enumerate(train):
        ax.annotate(f"{r['speed_ours_over_hf']:.2f}x", (i - 0.2, r["ours_tokens_per_s"]), ha="center", va="bottom")
    ax.legend()
    ax = axes[1]
    x = np.arange(len(generate))
    ax.bar(x - 0.27, [r["hf_tokens_per_s"] for r in generate], 0.27, label="HF generate fp32", color="C1")
    for j, (dtype, color) in enumerate((("float32", "C0"), ("bfloat16", "C2"))):
        if all(dtype in r for r in generate):
            ax.bar(x + 0.27 * j, [r[dtype]["ours_tokens_per_s"] for r in generate], 0.27,
                   label=f"gpt2_jax {dtype}", color=color)
            for i, r in enumerate(generate):
                d = r[dtype]
                ax.annotate(f"{d['speedup_over_hf_fp32']:.2f}x\n{d['ours_tokens_per_s'] / d['dram_limit_tokens_per_s']:.0%} of\nDRAM-bound",
                            (i + 0.27 * j, d["ours_tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"batch {r['batch_size']}" for r in generate])
    ax.set_ylabel("new tokens/s (greedy, 124M)")
    ax.set_title("Decoding")
    ax.margins(y=0.2)  # room for the labels above the bars
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv) -> None:
    del argv
    train = generate = None
    if FLAGS.train:
        with open(FLAGS.train) as f:
            train = json.load(f)
        print(train_table(train), end="\n\n")
    if FLAGS.generate:
        with open(FLAGS.generate) as f:
            generate = [json.loads(line) for line in f if line.strip()]
        print(generate_table(generate), end="\n\n")
    if FLAGS.png:
        if not (train and generate):
            raise app.UsageError("--png needs both --train and --generate")
        chart(train, generate, FLAGS.png)
        print(f"wrote {os.path.abspath(FLAGS.png)}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
