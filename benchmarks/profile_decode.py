"""Per-op time breakdown of one decode step (the "where does a decode step go" table in docs/BENCHMARKS.md).

Builds a synthetic model (random weights of a real shape), compiles and warms up ``steps`` greedy decode steps
after a ``context``-token prompt, times them once untraced, then runs them again under ``jax.profiler.trace``
(timed too: the profiler's overhead is the difference) and reads the Perfetto trace it writes: device kernel
times summed per kernel name and per category (``CATEGORIES``: Pallas kernels, dense matmuls, reductions, copies,
other XLA fusions), divided by ``steps``. Only kernels of the decode step's XLA module (``args.hlo_module``) are
counted: the traced call also runs the prompt's prefill and first sample.

Run on the device machine from the repository root (gguf carried as a wheel, see docs/BENCHMARKS.md)::

    PYTHONPATH=/tmp/site:. python3 benchmarks/profile_decode.py --shape qwen3-8b --quant mxfp4 --json $OUT/p.json

On a CPU-only JAX there is no device process in the trace; the script then falls back to the host events that
name an HLO op (XLA:CPU's thunk executor threads), so ``--shape tiny`` runs anywhere. That fallback exists only to
test the parser: its "kernels" are CPU thunks, a ``while`` thunk's time includes its body's, and several threads
run at once, so the sum can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from imp_jax import bench
from imp_jax.models.config import ModelConfig
from imp_jax.ops.policy import KernelPolicy, resolve_kernels
from imp_jax.runtime.steps import decode_step

# (label, regex on the kernel name, case-insensitive); the first match wins, unmatched names go to OTHER.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("quantized matmul (Pallas)", r"pallas_qmatmul"),
    ("decode attention (Pallas)", r"pallas_decode_attention"),
    ("flash attention (Pallas)", r"pallas_flash_attention"),
    ("dense matmul (cuBLAS/XLA dot)", r"gemm|cublas|nvjet|dot"),
    ("reductions (norms, split-K sums, softmax)", r"reduce"),
    ("copies / cache updates", r"copy|memcpy|transpose|dynamic-update-slice|dynamic_update_slice"),
)
OTHER = "other XLA fusions"
DECODE_MODULE = "decode_step"  # substring of the decode step's XLA module name (jit_decode_step)
TOP = 15


def time_decode(params, cfg: ModelConfig, steps: int, dtype, batch: int, context: int, kernels: KernelPolicy) -> float:
    """Seconds for ``steps`` greedy decode steps of ``batch`` sequences after a ``context``-token prompt.

    ``bench.time_decode`` with a prompt length: the prefill and first sample are outside the timed loop."""
    cache, state, p = bench.primed_decode(params, cfg, dtype, batch, context, steps, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, cache = decode_step(params, cfg, cache, state, p, greedy=True, penalty=False, kernels=kernels)
    jax.block_until_ready(state)
    return time.perf_counter() - t0


def find_trace(trace_dir: str | pathlib.Path) -> pathlib.Path | None:
    """The newest ``perfetto_trace.json.gz`` under trace_dir (the profiler nests it in plugins/profile/<run>/)."""
    found = sorted(pathlib.Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_trace(path: str | pathlib.Path) -> list[dict]:
    """The ``traceEvents`` of a gzipped Chrome/Perfetto JSON trace."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def process_names(events: list[dict]) -> dict[int, str]:
    """pid -> process name, from the "M" (metadata) events."""
    return {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}


def device_events(events: list[dict], module: str | None = DECODE_MODULE) -> list[dict]:
    """The complete ("X") kernel events of the GPU process(es); without one (CPU JAX), the host events that name
    an HLO op (``args.hlo_op``: XLA:CPU's thunk executor), for testing the parser only. If the events name their
    XLA module (``args.hlo_module``), only those whose module contains ``module`` are kept (None keeps all)."""
    names = process_names(events)
    gpu = {pid for pid, name in names.items() if "/device:GPU" in name}
    if gpu:
        keep = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    else:
        cpu = {pid for pid, name in names.items() if "/host:CPU" in name}
        keep = [e for e in events if e.get("ph") == "X" and e.get("pid") in cpu and "hlo_op" in e.get("args", {})]
    if module is None or not any("hlo_module" in e.get("args", {}) for e in keep):
        return keep
    return [e for e in keep if module in e.get("args", {}).get("hlo_module", "")]


def category(name: str) -> str:
    """The CATEGORIES label of a kernel name (OTHER if none matches)."""
    return next((label for label, rx in CATEGORIES if re.search(rx, name, re.IGNORECASE)), OTHER)


def breakdown(events: list[dict], steps: int) -> dict:
    """Per-step device time by kernel name and by category (us), from device_events' output."""
    us: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for e in events:
        us[e["name"]] += float(e.get("dur", 0.0))
        calls[e["name"]] += 1
    total = sum(us.values())
    kernels = [
        dict(name=n, category=category(n), us_per_step=t / steps, calls_per_step=calls[n] / steps)
        for n, t in us.most_common()
    ]
    cats = []
    for label in [label for label, _ in CATEGORIES] + [OTHER]:
        mine = [k for k in kernels if k["category"] == label]
        t = sum(k["us_per_step"] for k in mine)
        cats.append(
            dict(
                label=label,
                us_per_step=t,
                pct=100 * t / (total / steps) if total else 0.0,
                kernels_per_step=sum(k["calls_per_step"] for k in mine),
            )
        )
    return dict(device_us_per_step=total / steps, categories=cats, kernels=kernels)


def tables(result: dict, top: int = TOP) -> str:
    """Markdown: the category table, then the top kernels."""
    lines = ["| category | us/step | % of device time | kernels/step |", "|---|---|---|---|"]
    lines += [
        f"| {c['label']} | {c['us_per_step']:.1f} | {c['pct']:.1f}% | {c['kernels_per_step']:.1f} |"
        for c in result["categories"]
        if c["kernels_per_step"]
    ]
    lines += ["", "| kernel | us/step | calls/step |", "|---|---|---|"]
    lines += [
        f"| `{k['name']}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.1f} |" for k in result["kernels"][:top]
    ]
    return "\n".join(lines)


def profile(shape: str, quant: str, steps: int, batch: int, context: int, trace_dir: str) -> dict:
    """Warm up, trace one run of ``steps`` decode steps, and return the wall time and breakdown (or an error)."""
    kernels = resolve_kernels()
    params, cfg, _, _ = bench.synthetic_model(shape, quant, "bfloat16", kernels=kernels)
    run = (params, cfg, steps, jnp.bfloat16, batch, context, kernels)
    time_decode(*run)  # compile and warm up
    untraced = time_decode(*run)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        wall = time_decode(*run)
    out = dict(
        device=jax.devices()[0].device_kind, shape=shape, quant=quant, steps=steps, batch=batch, context=context,
        wall_ms_per_step=1e3 * wall / steps, untraced_wall_ms_per_step=1e3 * untraced / steps,
    )  # fmt: skip
    path = find_trace(trace_dir)
    if path is None:
        return dict(out, error=f"no perfetto_trace.json.gz under {trace_dir}")
    events = device_events(load_trace(path))
    if not events:
        return dict(out, trace=str(path), error=f"no device kernel events in {path}")
    result = breakdown(events, steps)
    return dict(out, trace=str(path), device_busy_ms_per_step=result["device_us_per_step"] / 1e3, **result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--quant", default="mxfp4")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before the decode steps")
    ap.add_argument("--trace-dir", default=None, help="where jax.profiler writes (default: a new temp dir)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_decode_")
    r = profile(args.shape, args.quant, args.steps, args.batch, args.context, trace_dir)
    print(f"{r['device']}, {args.shape} {args.quant}, batch {args.batch}, context {args.context}, {args.steps} steps")
    print(f"wall {r['wall_ms_per_step']:.3f} ms/step traced, {r['untraced_wall_ms_per_step']:.3f} untraced")
    if "error" in r:
        print(f"error: {r['error']}", file=sys.stderr)
    else:
        print(f"device busy {r['device_busy_ms_per_step']:.3f} ms/step (sum of kernel times)\n")
        print(tables(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if "error" in r else 0


if __name__ == "__main__":
    sys.exit(main())
