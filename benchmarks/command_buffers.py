"""Decode time under XLA's command-buffer (CUDA graph) settings: which one the engine should compile its steps with
(issue 15 item 3, launch overhead).

For a synthetic model (random weights of a real shape, built on the device): the greedy decode step, and a device
loop of ``--loop`` such steps in one dispatch (``lax.fori_loop``, what the engine's multi-step decode is), each
compiled once per setting of ``SETTINGS`` (compiler options given to ``lower().compile()``, as the engine would
pass them, never through the environment) and timed over ``--steps`` tokens after a one-token prompt, best of
``--reps``. A setting XLA refuses is reported with its error, not skipped. Whether the Pallas kernels' custom calls
are captured shows in the difference: the default captures fusions and cuBLAS calls only where no custom call
breaks the sequence.

    PYTHONPATH=/tmp/site:. python3 benchmarks/command_buffers.py --shape qwen3-8b --quant mxfp4 --json $OUT/cb.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from imp_jax import bench
from imp_jax.ops.policy import KernelPolicy, resolve_kernels
from imp_jax.runtime import steps

# setting -> XLA debug options (DebugOptions fields) for the compile: XLA's own default, command buffers off, loops
# and conditionals captured too, and that with graphs of any size.
SETTINGS: dict[str, dict[str, str | int | bool]] = {
    "xla-default": {},
    "off": {"xla_gpu_enable_command_buffer": ""},
    "with-loops": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"},
    "with-loops-min-size-1": {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
        "xla_gpu_graph_min_graph_size": 1,
    },
}


def programs(cfg, kernels: KernelPolicy, loop: int):
    """(name, jitted function of (params, cache, state, p) -> (state, cache), decode steps per call)."""

    def one(params, cache, state, p):
        return steps.decode_step(params, cfg, cache, state, p, greedy=True, penalty=False, kernels=kernels)

    def many(params, cache, state, p):
        def body(_, carry):
            state, cache = carry
            return one(params, cache, state, p)

        return jax.lax.fori_loop(0, loop, body, (state, cache))

    return [
        ("decode step", jax.jit(one, donate_argnums=1), 1),
        (f"{loop}-step loop", jax.jit(many, donate_argnums=1), loop),
    ]


def time_program(compiled, params, cfg, dtype, tokens: int, per_call: int, kernels: KernelPolicy) -> float:
    """Seconds for ``tokens`` decode steps (``tokens / per_call`` calls) after a one-token prompt."""
    cache, state, p = bench.primed_decode(params, cfg, dtype, 1, 1, tokens, kernels)
    t0 = time.perf_counter()
    for _ in range(tokens // per_call):
        state, cache = compiled(params, cache, state, p)
    jax.block_until_ready(state)
    return time.perf_counter() - t0


def measure(shape: str, quant: str, tokens: int, loop: int, reps: int, settings: list[str]) -> list[dict]:
    kernels = resolve_kernels()
    dtype = jnp.bfloat16
    params, cfg, _, _ = bench.synthetic_model(shape, quant, "bfloat16", kernels=kernels)
    cache, state, p = bench.primed_decode(params, cfg, dtype, 1, 1, tokens, kernels)  # the shapes to compile for
    rows = []
    for name, fn, per_call in programs(cfg, kernels, loop):
        base = None
        for setting in settings:
            row = dict(shape=shape, quant=quant, program=name, setting=setting, options=SETTINGS[setting],
                       device=jax.devices()[0].device_kind)  # fmt: skip
            try:
                t0 = time.perf_counter()
                compiled = fn.lower(params, cache, state, p).compile(compiler_options=SETTINGS[setting] or None)
                row["compile_s"] = time.perf_counter() - t0
                time_program(compiled, params, cfg, dtype, tokens, per_call, kernels)  # warm up
                t = min(time_program(compiled, params, cfg, dtype, tokens, per_call, kernels) for _ in range(reps))
            except Exception as e:  # a setting this XLA refuses is a row of the table, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(table_row(row), flush=True)
                rows.append(row)
                continue
            row.update(ms_per_token=1e3 * t / tokens, tok_s=tokens / t)
            base = row["tok_s"] if base is None else base
            row["vs_first"] = row["tok_s"] / base
            print(table_row(row), flush=True)  # as it comes: a device call's limit may cut the rest
            rows.append(row)
    return rows


HEAD = (
    "| shape | quant | program | setting | compile s | ms / token | tok/s | vs first setting |\n"
    "|---|---|---|---|---|---|---|---|"
)


def table_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['quant']} | {r['program']} | {r['setting']} | {r['error']} | - | - | - |"
    return (
        f"| {r['shape']} | {r['quant']} | {r['program']} | {r['setting']} | {r['compile_s']:.1f} | "
        f"{r['ms_per_token']:.3f} | {r['tok_s']:.1f} | {r['vs_first']:.2f}x |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--quant", default="mxfp4")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed (a multiple of --loop)")
    ap.add_argument("--loop", type=int, default=8, help="decode steps per dispatch of the looped program")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of: {', '.join(SETTINGS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    settings = args.settings.split(",")
    if unknown := set(settings) - set(SETTINGS):
        ap.error(f"unknown settings {sorted(unknown)}")
    if args.tokens % args.loop:
        ap.error("--tokens must be a multiple of --loop")
    print(HEAD, flush=True)
    rows = measure(args.shape, args.quant, args.tokens, args.loop, args.reps, settings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
