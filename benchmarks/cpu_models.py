"""CPU prefill/decode speed of the real registry models, beside llama.cpp's figures on the same 2-core machine.

Usage: python benchmarks/cpu_models.py [--models smollm2-135m,gemma3-270m,qwen2.5-0.5b] [--tokens 64]
                                       [--kernels off,auto]
(defaults as a user gets them: dtype auto, path auto, kernels auto, at max_context 512). With several
``--kernels`` settings (``off``: the stacked reference layout; ``auto``: the CPU default) each model is loaded once
per setting in the same process and the repetitions alternate between them, so a shared machine's load falls on
both alike; every row carries the 1-minute load average over its runs.
llama.cpp figures: llama-cpp-python 0.3.36 built from its sdist on this machine, 2 threads, n_ctx 512, 64 greedy
tokens, three runs on 2026-12-03 (docs/BENCHMARKS.md, CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import imp_jax
from imp_jax.ops.policy import resolve_dtype

LLAMA_CPP_DECODE = {"smollm2-135m": "84-101", "gemma3-270m": "41-56", "qwen2.5-0.5b": "33-38", "qwen2.5-1.5b": "20-23"}
PROMPT = "The history of the printing press begins in"


def measure(name: str, tokens: int, reps: int, dtype: str, path: str, settings: list[str]) -> list[dict]:
    """One row per kernel setting: load time, and the medians of ``reps`` generations taken in turns."""
    models, load_s = {}, {}
    for k in settings:
        t0 = time.perf_counter()
        models[k] = imp_jax.load(name, dtype=dtype, max_context=512, path=path, kernels=k)
        load_s[k] = time.perf_counter() - t0
        imp_jax.generate(models[k], PROMPT, max_tokens=tokens)  # compile
    runs: dict[str, list] = {k: [] for k in settings}
    loads = []
    for _ in range(reps):
        for k in settings:
            runs[k].append(imp_jax.generate(models[k], PROMPT, max_tokens=tokens))
            loads.append(os.getloadavg()[0])
    return [
        dict(
            model=name,
            kernels=k,
            load_s=load_s[k],
            prompt=runs[k][0].timings.prompt_tokens,
            prefill=statistics.median(r.timings.prefill_tok_s for r in runs[k]),
            decode=statistics.median(r.timings.decode_tok_s for r in runs[k]),
            loadavg=f"{min(loads):.1f}-{max(loads):.1f}",
        )
        for k in settings
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(LLAMA_CPP_DECODE))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16 or float32")
    ap.add_argument("--path", default="auto", help="weight path: auto, packed, fallback or dense")
    ap.add_argument("--kernels", default="auto", help="kernel settings to compare in turns, e.g. off,auto")
    args = ap.parse_args()
    settings = args.kernels.split(",")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.tokens, args.reps, args.dtype, args.path, settings)
    dtype = resolve_dtype(args.dtype)
    print("\n| model | dtype | path | kernels | load s | prompt tok | prefill tok/s | decode tok/s | load avg "
          "| llama.cpp decode tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {dtype} | {args.path} | {r['kernels']} | {r['load_s']:.1f} | {r['prompt']} | "
            f"{r['prefill']:.0f} | {r['decode']:.1f} | {r['loadavg']} | {LLAMA_CPP_DECODE.get(r['model'], '-')} |"
        )


if __name__ == "__main__":
    main()
