"""CPU prefill/decode speed of the real registry models, beside llama.cpp's figures on the same 2-core machine.

Usage: python benchmarks/cpu_models.py [--models smollm2-135m,gemma3-270m,qwen2.5-0.5b] [--tokens 64]
(defaults as a user gets them: dtype auto, path auto, at max_context 512)
llama.cpp figures: llama-cpp-python 0.3.36 built from its sdist on this machine, 2 threads, n_ctx 512, 64 greedy
tokens, three runs on 2026-12-03 (docs/BENCHMARKS.md, CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import imp_jax
from imp_jax.ops.policy import resolve_dtype

LLAMA_CPP_DECODE = {"smollm2-135m": "84-101", "gemma3-270m": "41-56", "qwen2.5-0.5b": "33-38", "qwen2.5-1.5b": "20-23"}
PROMPT = "The history of the printing press begins in"


def measure(name: str, tokens: int, reps: int, dtype: str, path: str) -> dict:
    t0 = time.perf_counter()
    model = imp_jax.load(name, dtype=dtype, max_context=512, path=path)
    load_s = time.perf_counter() - t0
    imp_jax.generate(model, PROMPT, max_tokens=tokens)  # compile
    runs = [imp_jax.generate(model, PROMPT, max_tokens=tokens) for _ in range(reps)]
    return dict(
        model=name,
        load_s=load_s,
        prompt=runs[0].timings.prompt_tokens,
        prefill=statistics.median(r.timings.prefill_tok_s for r in runs),
        decode=statistics.median(r.timings.decode_tok_s for r in runs),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(LLAMA_CPP_DECODE))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16 or float32")
    ap.add_argument("--path", default="auto", help="weight path: auto, packed, fallback or dense")
    args = ap.parse_args()
    rows = [measure(m, args.tokens, args.reps, args.dtype, args.path) for m in args.models.split(",")]
    dtype = resolve_dtype(args.dtype)
    print("\n| model | dtype | path | load s | prompt tok | prefill tok/s | decode tok/s | llama.cpp decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {dtype} | {args.path} | {r['load_s']:.1f} | {r['prompt']} | {r['prefill']:.0f} | "
            f"{r['decode']:.1f} | {LLAMA_CPP_DECODE.get(r['model'], '-')} |"
        )


if __name__ == "__main__":
    main()
