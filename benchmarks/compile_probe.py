"""Where a cold start's compile time goes: trace, lower and compile one decode step of a synthetic shape, and count
the Mosaic GPU kernels it lowers (calls, distinct kernels), from abstract params (no weights, no file).

``--repeat-names`` restores jaxlib's per-process kernel names (``pallas.kernel_identity``), for the before figure:
run each variant in its own process, since compiled kernels are cached per process.

Usage (GPU): python benchmarks/compile_probe.py --shape qwen3-8b --quant q4_k_m [--repeat-names] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import jax


def probe(shape: str, quant: str, max_context: int, repeat_names: bool) -> dict:
    from jax.experimental.mosaic.gpu import core

    import pallas  # noqa: F401 - installs the stable kernel names
    from imp_jax.ops.policy import resolve_kernels
    from imp_jax.runtime import steps
    from imp_jax.runtime.cache import abstract_cache
    from imp_jax.runtime.sampling import SamplingParams
    from imp_jax.weights.loading import abstract_params
    from imp_jax.weights.synthetic import synthetic_specs

    if repeat_names:
        core.dialect.get_or_set_dump_options = core.dialect.get_or_set_dump_options.__wrapped__

    policy = resolve_kernels("auto")
    cfg, specs = synthetic_specs(shape, quant)
    params = abstract_params(specs, policy)
    cache = abstract_cache(cfg, 1, max_context, "bfloat16")
    state = steps.abstract_decode_state(1)
    samp = jax.eval_shape(SamplingParams().arrays)
    t0 = time.perf_counter()
    traced = steps.decode_step.trace(params, cfg, cache, state, samp, greedy=False, penalty=True, kernels=policy)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    n_calls = lowered.as_text().count("mosaic_gpu_v2")
    lowered.compile()
    t3 = time.perf_counter()
    return dict(
        shape=shape,
        quant=quant,
        repeat_names=repeat_names,
        kernel_calls=n_calls,
        distinct_kernels=len(core.KNOWN_KERNELS),
        trace_s=round(t1 - t0, 2),
        lower_s=round(t2 - t1, 2),
        compile_s=round(t3 - t2, 2),
        device=jax.devices()[0].device_kind,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--repeat-names", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    row = probe(args.shape, args.quant, args.max_context, args.repeat_names)
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
