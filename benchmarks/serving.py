"""Aggregate decode throughput of the serving engine at several concurrencies (issue 16's H200 table).

For each synthetic model (random weights of a real shape, built on the device: imp_jax/weights/synthetic.py) and
each concurrency C: C requests of ``--prompt`` random tokens and ``--output`` greedy output tokens are added to one
``imp_jax.Engine`` at once. The engine prefills them in chunks, then decodes all C together; the timed window runs
from the first step in which every request is decoding to the last request's end, and the rate is the tokens
generated in that window over its wall time. A warm-up round of the same requests compiles every step first, and
each row records how many programs the timed round still compiled (``compiles``, 0 for a fair figure).

    PYTHONPATH=. python3 benchmarks/serving.py --models qwen3-8b:mxfp4,qwen3-30b-a3b:mxfp4 --concurrency 1,4,16,64

``--profile 16,64`` adds, after the timed round at each of those concurrencies, a third round whose decode window
(from every request's first token to the end) runs under ``jax.profiler``: the device time of one decode step of
that many rows, per kernel and per category, as ``profile_decode.py`` reads a trace (where a wide step's time goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_decode import breakdown, device_events, find_trace, load_trace, tables

from imp_jax import bench
from imp_jax.ops.policy import KernelPolicy, resolve_dtype, resolve_kernels
from imp_jax.runtime.compiled_steps import CompiledSteps
from imp_jax.runtime.engine import Engine


class _SilentStream:
    def push(self, token_id: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


class _NoTextTokenizer:
    """What the engine asks of a tokenizer when it is fed ids: no EOS (every request runs to its length), no text."""

    eos_ids: frozenset[int] = frozenset()

    def stream(self) -> _SilentStream:
        return _SilentStream()


@dataclasses.dataclass
class SyntheticModel:
    """The parts of an ``imp_jax.Model`` the engine reads, for random weights that have no file or vocabulary."""

    config: Any
    params: Any
    dtype: str
    max_context: int
    kernels: KernelPolicy
    batch: int = 1
    plan: Any = None
    tokenizer: Any = dataclasses.field(default_factory=_NoTextTokenizer)
    programs: CompiledSteps = dataclasses.field(default_factory=CompiledSteps)


def run_round(
    model: SyntheticModel,
    concurrency: int,
    prompt: int,
    output: int,
    token_budget: int,
    seed: int,
    decode_steps: int,
    pages: int,
    max_seqs: int,
    trace_dir: str | None = None,
):
    """One round on a fresh engine; returns (decode tokens, decode seconds) of the timed window. Every round's
    engine has the same page pool and slots (sized for the largest concurrency), so the rounds share their
    compiled prefill steps and only the decode batch's bucket is new. With ``trace_dir`` the timed window runs
    under the profiler, writing its trace there."""
    engine = Engine(model, page_size=16, n_pages=pages, max_seqs=max_seqs, token_budget=token_budget,
                    prefix_caching=False, decode_steps=decode_steps)  # fmt: skip
    rng = np.random.default_rng(seed)
    for _ in range(concurrency):
        engine.add_request([int(t) for t in rng.integers(0, model.config.vocab_size, prompt)], max_tokens=output)
    started: set[int] = set()
    t0, counted = None, 0
    while engine.has_unfinished():
        outs = engine.step()
        if t0 is not None:
            counted += sum(len(o.token_ids) for o in outs)
        started |= {o.request_id for o in outs if o.token_ids}
        if t0 is None and len(started) == concurrency:
            jax.effects_barrier()
            if trace_dir is not None:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            t0 = time.perf_counter()  # every request has its first token: from here on each step decodes them all
    jax.effects_barrier()
    if trace_dir is not None and t0 is not None:
        jax.profiler.stop_trace()
    return counted, time.perf_counter() - (t0 if t0 is not None else time.perf_counter())


def measure(
    shape: str,
    quant: str,
    concurrency: list[int],
    prompt: int,
    output: int,
    token_budget: int,
    decode_steps: list[int],
    profile: frozenset[int] = frozenset(),
) -> list[dict]:
    dtype = resolve_dtype("auto")
    kernels = resolve_kernels()
    params, cfg, size, _ = bench.synthetic_model(shape, quant, dtype, kernels=kernels)
    model = SyntheticModel(cfg, params, dtype, prompt + output, kernels)
    pool = dict(pages=max(concurrency) * -(-(prompt + output) // 16), max_seqs=max(concurrency))
    rows = []
    for k in decode_steps:
        base = None
        for c in concurrency:
            # The warm-up runs the whole round: a shorter one left the multi-step decode of every row uncompiled
            # at 64 rows (the first rows, decoding while the last prompts prefill, ran out of room for 8 steps),
            # and the timed round compiled it inside its window (2227 tok/s on the H100 where ~4000 ran).
            run_round(model, c, prompt, output, token_budget, seed=c, decode_steps=k, **pool)
            before = len(model.programs.compiled)
            tokens, seconds = run_round(model, c, prompt, output, token_budget, seed=c + 1, decode_steps=k, **pool)
            row = dict(model=shape, quant=quant, decode_steps=k, concurrency=c, prompt=prompt, output=output,
                       decode_tokens=tokens, decode_s=seconds, tok_s=tokens / seconds if seconds else 0.0,
                       compiles=len(model.programs.compiled) - before,
                       weights_gib=size / 2**30, device=jax.devices()[0].device_kind)  # fmt: skip
            base = row["tok_s"] if c == 1 else base
            row["x_batch1"] = row["tok_s"] / base if base else None
            print(table_row(row), flush=True)  # as it comes: a device call's limit may cut the rest
            rows.append(row)
            if c in profile:
                row["profile"] = profile_round(model, c, prompt, output, token_budget, k, pool)
    return rows


def profile_round(model: SyntheticModel, c: int, prompt: int, output: int, token_budget: int, k: int, pool) -> dict:
    """One more round at concurrency ``c``, its decode window traced: device time per decode step (a dispatch
    runs ``k`` of them), by kernel and category. Printed as it comes, returned for the JSON."""
    trace_dir = tempfile.mkdtemp(prefix=f"serving_c{c}_")
    tokens, seconds = run_round(model, c, prompt, output, token_budget, seed=c + 2, decode_steps=k, **pool,
                                trace_dir=trace_dir)  # fmt: skip
    path = find_trace(trace_dir)
    events = device_events(load_trace(path), module="engine_step") if path is not None else []
    if not events:
        print(f"profile at {c}: no device kernel events under {trace_dir}", flush=True)
        return dict(trace=trace_dir, error="no device kernel events")
    steps = max(tokens // c, 1)  # every step of the window decodes all c rows
    result = breakdown(events, steps)
    print(f"\nprofile, {c} rows: {steps} decode steps, wall {1e3 * seconds / steps:.2f} ms/step traced, device busy "
          f"{result['device_us_per_step'] / 1e3:.2f} ms/step\n{tables(result)}\n", flush=True)  # fmt: skip
    return dict(trace=str(path), steps=steps, wall_ms_per_step=1e3 * seconds / steps, **result)


HEAD = (
    "| model | quant | decode steps per dispatch | concurrent | prompt+output | decode tok/s | x batch 1 | compiles in "
    "window |\n|---|---|---|---|---|---|---|---|"
)


def table_row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['quant']} | {r['decode_steps']} | {r['concurrency']} | {r['prompt']}+{r['output']} | "
        f"{r['tok_s']:.1f} | " + (f"{r['x_batch1']:.1f}x" if r["x_batch1"] else "-") + f" | {r['compiles']} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3-8b:mxfp4,qwen3-30b-a3b:mxfp4", help="shape:quant, comma-separated")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--token-budget", type=int, default=2048, help="tokens one engine step may feed")
    ap.add_argument("--decode-steps", default="8", help="decode steps per dispatch to compare, comma-separated")
    ap.add_argument("--profile", default="", help="concurrencies whose decode window is also profiled, e.g. 16,64")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    profile = frozenset(int(c) for c in args.profile.split(",") if c)
    decode_steps = [int(k) for k in args.decode_steps.split(",")]
    rows = []
    print(HEAD, flush=True)
    for spec in args.models.split(","):
        shape, quant = spec.split(":")
        rows += measure(shape, quant, concurrency, args.prompt, args.output, args.token_budget, decode_steps, profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
