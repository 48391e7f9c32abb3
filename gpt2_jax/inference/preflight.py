"""Decoding's programs compiled for one chip of a TPU this host does not have.

    python generate.py --hf DIR --preflight --topology v5e-1 [--max_new_tokens N] [--num_samples B] [--json]
    python generate.py --preset gpt2-xl --preflight --topology v5e-1

The prefill (the prompt through the model, filling the KV cache) and the decode loop (one token per
step over that cache) are the programs `generate` runs, built here from abstract inputs on one
device of the slice (gpt2_jax/topology.py): nothing is allocated. Without a prompt the prompt fills
the context but for the new tokens, the largest cache a call of these sizes can need. The figures:
weight and KV-cache bytes, each program's peak on the chip against its HBM, and whether it fits
(the TPU compiler refuses a program that does not).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gpt2_jax import topology as topology_lib
from gpt2_jax.compile_report import Compiled, bytes_per_device, human_bytes, measure
from gpt2_jax.inference import decode, prompts, token_choice
from gpt2_jax.model.config import ModelConfig, count_params
from gpt2_jax.model.gpt2 import init_params


def report(config: ModelConfig, topology: str, *, prompt_ids: list[int] | None = None, max_new_tokens: int = 100,
           num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict[str, Any]:
    """Figures (bytes, seconds) of generate's prefill and decode programs on one chip of `topology`."""
    spec = topology_lib.parse(topology)
    device = topology_lib.devices(spec)[0]
    on_chip = jax.sharding.SingleDeviceSharding(device)
    context = prompts.context_length(config)
    if prompt_ids is None:
        prompt_ids = [0] * max(1, (context or max_new_tokens + 1) - max_new_tokens)
    batch = prompts.prepare(config, [prompt_ids], max_new_tokens, num_samples, "none")

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=on_chip), tree)

    params = abstract(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
    inputs = abstract((batch.prompt, batch.positions, batch.row_limit,
                       jax.eval_shape(lambda: jax.random.key(0)), np.int32(0)))
    prefill_fn = jax.jit(lambda *a: decode.prefill(config, batch.gen_len, *a))
    prefill = measure(lambda: prefill_fn.lower(params, *inputs).compile())

    state = abstract(jax.eval_shape(prefill_fn, params, *inputs))
    matvec = batch.prompt.shape[0] == 1 and int(batch.row_limit.max()) >= decode.MATVEC_MIN_TOKENS
    weights = abstract(jax.eval_shape(lambda p: decode.DecodeWeights.from_params(config, p, matvec), params))
    sp = token_choice.SamplingParams.create(temperature, top_k, top_p)
    sp_abstract = sp.replace(**{k: abstract(getattr(sp, k)) for k in ("temperature", "top_k", "top_p")})
    decode_fn = jax.jit(lambda w, s, st, limit: decode.decode_loop(config, w, s, st, limit), donate_argnums=(2,))
    limit = abstract(np.int32(0))
    decoding = measure(lambda: decode_fn.lower(weights, sp_abstract, state, limit).compile())

    def program(c: Compiled) -> dict[str, Any]:
        return {"fits": c.fits, "peak_bytes": c.peak_bytes, "temp_bytes": c.temp_bytes, "compile_s": c.compile_s,
                "error": c.error}

    return {
        "topology": topology, "device_kind": device.device_kind, "params": count_params(params),
        "dtype": config.dtype, "batch": int(batch.prompt.shape[0]), "prompt_tokens": len(prompt_ids),
        "cache_tokens": int(batch.prompt.shape[1] + batch.gen_len),
        "weight_bytes": bytes_per_device(params), "kv_cache_bytes": bytes_per_device(state.cache),
        "hbm_bytes_per_device": spec.hbm_bytes, "prefill": program(prefill), "decode": program(decoding),
        "fits": all(c.fits_in(spec.usable_bytes or spec.hbm_bytes) for c in (prefill, decoding)),
        "compile_s": prefill.compile_s + decoding.compile_s,
    }


def _human(n: float | None) -> str:
    return "unknown" if n is None else human_bytes(n)


def format_report(f: dict[str, Any]) -> str:
    def line(name: str, p: dict[str, Any]) -> str:
        state = "fits" if p["fits"] else f"does NOT fit ({p['error']})"
        return f"  {name:<8} peak {_human(p['peak_bytes'])}, {state}, compiled in {p['compile_s']:.1f} s"

    return "\n".join([
        f"preflight (decoding): {f['params']:,} parameters, {f['dtype']}, on one {f['device_kind']} "
        f"({f['topology']}, compiled on this host, no device)",
        f"  batch {f['batch']} x {f['prompt_tokens']} prompt tokens, KV cache for {f['cache_tokens']} positions",
        f"  weights  {_human(f['weight_bytes'])}",
        f"  KV cache {_human(f['kv_cache_bytes'])}",
        line("prefill", f["prefill"]),
        line("decode", f["decode"]),
        f"  HBM      {_human(f['hbm_bytes_per_device'])} per chip: " + ("fits" if f["fits"] else "does NOT fit"),
    ])
