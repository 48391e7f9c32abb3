"""GPT-2 sizes on Cloud TPU slices, measured by the TPU compiler on this host (no TPU needed).

    python bench/tpu_table.py [--config gpt2_124m] [--models gpt2,gpt2-medium] [--topologies v5e-8,v6e-8]
                              [--remat off,full] [--out bench/tpu_table.jsonl] [--flops]

For each (model, topology, remat): configs/gpt2_124m.py (or --config) with that preset (T=1024, bf16, attention
'auto' = splash, fsdp over the slice, one micro-batch per step), its train step compiled at a
micro-batch per chip and at twice (or half) that, peak bytes per chip from `memory_analysis()` (or
the compiler's out-of-memory refusal), and the largest micro-batch per chip that fits estimated
from the line through the two (training/compiled.py). `--flops` adds compiled FLOPs over the
model's formula (two more small compiles). One JSON line per entry is appended to --out as soon as
it is measured, so a long sweep can be stopped and resumed (entries already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2_jax import topology  # noqa: E402

MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
TOPOLOGIES = ("v5e-8", "v6e-8", "v5p-8", "v4-8")


def measure(config_name: str, model: str, name: str, remat: str, flops: bool, first_per_chip: int,
            loss_chunk: str) -> dict:
    import importlib

    from gpt2_jax.model import loss as loss_lib
    from gpt2_jax.model.config import model_config_from
    from gpt2_jax.training import compiled, sharding
    from gpt2_jax.training import run as run_lib

    spec = topology.parse(name)
    c = importlib.import_module(f"configs.{config_name}").get_config()
    c.model.preset = model
    c.model.remat = "none" if remat == "off" else remat
    c.model.loss_chunk = loss_chunk if loss_chunk == "auto" else int(loss_chunk)
    c.train.grad_accum_steps = 1
    c.train.global_batch_size = first_per_chip * spec.chips
    mesh = sharding.make_mesh(c.mesh, devices=topology.devices(spec))
    model_config = model_config_from(c.model)
    run = run_lib.build_run(model_config, c.train, mesh, 100)
    tokens_per_chip = first_per_chip * model_config.block_size
    start = time.perf_counter()
    first = compiled.compile_train_step(run)
    usable = first.usable_bytes or spec.usable_bytes or spec.hbm_bytes
    fit = compiled.largest_micro_batch(run, first, usable, search=False)
    row = {
        "config": config_name, "model": model, "topology": name, "remat": remat,
        "loss_chunk": loss_lib.resolve_loss_chunk(model_config, spec.platform),
        "block_size": model_config.block_size, "micro_batch_per_chip": first_per_chip,
        "fits": first.fits_in(spec.hbm_bytes), "peak_bytes": first.peak_bytes,
        "hbm_bytes": spec.hbm_bytes, "mosaic_kernels": first.mosaic_kernels, "cudnn_attention": first.cudnn_attention,
        "largest_micro_batch_per_chip": fit.per_device, "largest_note": fit.note,
        "state_bytes": compiled.bytes_per_device(run.abstract_state),
        # XLA's count for the program as compiled: loop bodies (layers, loss chunks) once, as the
        # compiler reports it; comparable between programs with the same loops only.
        "bytes_accessed_as_compiled_per_token": None if first.bytes_accessed is None else
        first.bytes_accessed / tokens_per_chip,
    }
    if flops:
        total, accessed = compiled.train_cost_per_step(run)
        analytic = model_config.train_flops_per_token(model_config.block_size) * c.train.global_batch_size * \
            model_config.block_size
        row.update(flops_per_step=total, flops_analytic=analytic,
                   flops_ratio=None if total is None else total / analytic, bytes_accessed_per_chip=accessed,
                   bytes_per_token=None if accessed is None else accessed / tokens_per_chip)
    row["seconds"] = time.perf_counter() - start
    return row


def render(path: str) -> str:
    """The measured rows as a markdown table (README / BENCHMARKS.md)."""
    gib = 1 << 30
    lines = ["| config | model | topology | remat | loss | micro-batch per chip | peak GiB per chip | HBM GiB | fits |"
             " largest micro-batch per chip | compiled / formula FLOPs |", "|---" * 11 + "|"]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    order = {name: i for i, name in enumerate(MODELS + TOPOLOGIES + ("h100-8", "h200-8"))}
    remats = {"off": 0, "none": 0, "save_dots": 1, "save_qkv": 2, "full": 3}
    rows.sort(key=lambda r: (r.get("config", "gpt2_124m") != "gpt2_124m", r.get("loss_chunk", 0) > 0,
                             order.get(r["model"], 99), order.get(r["topology"], 99), remats.get(r["remat"], 9),
                             r["micro_batch_per_chip"]))
    for r in rows:
        peak = "over (refused)" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.2f}"
        ratio = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") else "-"
        loss = f"chunks of {r['loss_chunk']}" if r.get("loss_chunk") else "whole logits"
        lines.append(f"| {r.get('config', 'gpt2_124m')} | {r['model']} | {r['topology']} | {r['remat']} | {loss} | "
                     f"{r['micro_batch_per_chip']} | {peak} | "
                     f"{r['hbm_bytes'] / gib:.0f} | {'yes' if r['fits'] else 'no'} | "
                     f"~{r['largest_micro_batch_per_chip']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="gpt2_124m", help="a module of configs/ (its preset is replaced)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--remat", default="off,full", help="policies: off (none), full, save_dots, save_qkv")
    parser.add_argument("--loss_chunk", default="auto", help="config.model.loss_chunk: auto, 0 (whole logits) or N")
    parser.add_argument("--micro_batch", type=int, default=8, help="first micro-batch per chip compiled")
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_table.jsonl"))
    parser.add_argument("--render", action="store_true", help="print --out's rows as a markdown table and exit")
    args = parser.parse_args()
    if args.render:
        print(render(args.out))
        return
    topology.prepare_environment()
    import jax

    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r.get("config", "gpt2_124m"), r["model"], r["topology"], r["remat"], r.get("loss_chunk", 0),
                     r["micro_batch_per_chip"]) for r in map(json.loads, f)}
    with jax.default_matmul_precision("default"):
        for model in args.models.split(","):
            for name in args.topologies.split(","):
                for remat in args.remat.split(","):
                    from gpt2_jax.model import loss as loss_lib
                    from gpt2_jax.model.config import ModelConfig

                    chunk = loss_lib.resolve_loss_chunk(ModelConfig.from_preset(model, loss_chunk=(
                        args.loss_chunk if args.loss_chunk == "auto" else int(args.loss_chunk))),
                        topology.parse(name).platform)
                    if (args.config, model, name, remat, chunk, args.micro_batch) in done:
                        continue
                    row = measure(args.config, model, name, remat, args.flops, args.micro_batch, args.loss_chunk)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
