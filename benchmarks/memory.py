"""Planned vs measured device memory for synthetic models of real shapes, and a refusal before any allocation.

Each configuration runs in its own process (the allocator's peak is a process-lifetime high-water mark): plan
with ``imp_jax.planning.memory.plan_specs`` (XLA compiles the real prefill/decode steps from abstract inputs), check the
plan, then build the weights on the device (``imp_jax.weights.synthetic``), prefill a full max_context prompt, decode a
few tokens, and compare ``peak_bytes_in_use`` with the plan's peak. A plan that does not fit must be refused
before anything is allocated.

Usage:  python benchmarks/memory.py                 # the five configurations, one table
        python benchmarks/memory.py --shape tiny    # every configuration at the tiny shape (a CPU dry run)
        python benchmarks/memory.py --plan-only     # plans only, no weights (any machine)
Set XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.95) to let JAX's allocator take most of the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {  # name: (shape, quant, path, max_context)
    "qwen3-8b/mxfp4": ("qwen3-8b", "mxfp4", "packed", 4096),
    "qwen3-8b/q8_0": ("qwen3-8b", "q8_0", "packed", 4096),
    "qwen3.5-27b/mxfp4-packed": ("qwen3.5-27b", "mxfp4", "packed", 4096),
    "qwen3.5-27b/mxfp4-bf16-fallback": ("qwen3.5-27b", "mxfp4", "dense", 2048),
    "llama-70b/bf16": ("llama-70b", "bf16", "packed", 32768),  # at 4096 it would nearly fit a 141 GB H200
}
GiB = 2**30


def run_one(name: str, shape: str, plan_only: bool) -> dict:
    """One configuration in this process: plan, refuse or build, run, measure."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imp_jax.errors import ModelTooLarge
    from imp_jax.ops.policy import resolve_kernels
    from imp_jax.planning.memory import check_fits, plan_specs, resolve_budget
    from imp_jax.runtime import steps
    from imp_jax.runtime.cache import init_cache
    from imp_jax.runtime.sampling import SamplingParams
    from imp_jax.weights.synthetic import synthetic_params, synthetic_specs

    model_shape, quant, path, ctx = CONFIGS[name]
    cfg, specs = synthetic_specs(shape or model_shape, quant)
    dev = jax.devices()[0]

    def stats() -> dict:
        return dev.memory_stats() or {}

    before = dict(live=len(jax.live_arrays()), in_use=stats().get("bytes_in_use", 0))
    t0 = time.perf_counter()
    kernels = resolve_kernels()
    plan = plan_specs(specs, cfg, label=name, max_context=ctx, batch=1, dtype="bfloat16", budget=resolve_budget(),
                      path=path, kernels=kernels)  # fmt: skip
    out = dict(
        name=name,
        device=plan.budget.device,
        path=plan.path_label,
        context=plan.max_context,
        weights=plan.weights_bytes,
        kv=plan.kv_cache_bytes,
        workspace=plan.workspace_bytes,
        load_transient=plan.load_transient_bytes,
        peak=plan.peak_bytes,
        needed=plan.needed_bytes,
        available=plan.available_bytes,
        fits=plan.fits,
        plan_s=time.perf_counter() - t0,
        report=plan.report(),
    )
    try:
        check_fits(plan)
    except ModelTooLarge as e:
        after = dict(live=len(jax.live_arrays()), in_use=stats().get("bytes_in_use", 0))
        return dict(out, refused=str(e), before=before, after=after)
    if plan_only:
        return out
    t0 = time.perf_counter()
    params = jax.block_until_ready(synthetic_params(plan.specs, jax.random.key(0), config=cfg, kernels=kernels))
    out.update(
        build_s=time.perf_counter() - t0,
        weights_in_use=stats().get("bytes_in_use"),
        peak_after_build=stats().get("peak_bytes_in_use"),
    )
    n = ctx - 4  # a full prefill bucket (the planned worst case), then a few decode steps in the room left
    tokens = jax.random.randint(jax.random.key(1), (1, ctx), 0, cfg.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    logits, cache = steps.prefill_step(
        params, cfg, tokens, jnp.asarray([n], jnp.int32), init_cache(cfg, 1, ctx, "bfloat16"), kernels=kernels
    )
    logits = jax.block_until_ready(logits)
    out.update(
        prefill_s=time.perf_counter() - t0,
        finite=bool(np.isfinite(np.asarray(logits)).all()),
        peak_after_prefill=stats().get("peak_bytes_in_use"),
    )
    state = steps.decode_state([n], seed=2)
    p = SamplingParams(temperature=0.8, repeat_penalty=1.1).arrays()
    for _ in range(4):
        state, cache = steps.decode_step(params, cfg, cache, state, p, greedy=False, penalty=True, kernels=kernels)
    jax.block_until_ready(state.token)
    out.update(peak_measured=stats().get("peak_bytes_in_use"), in_use_end=stats().get("bytes_in_use"))
    return out


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def table(rows: list[dict]) -> str:
    head = ("config", "path", "ctx", "weights", "KV", "workspace", "planned peak", "measured peak", "error", "verdict")
    lines = []
    for r in rows:
        if "error_text" in r:
            lines.append((r["name"], "-", "-", "-", "-", "-", "-", "-", "-", "failed: " + r["error_text"][:60]))
            continue
        measured = r.get("peak_measured")
        err = f"{100 * (measured - r['peak']) / r['peak']:+.1f}%" if measured else "-"
        if "refused" in r:
            verdict = "refused, live arrays {}->{}, in use {}->{} B".format(
                r["before"]["live"], r["after"]["live"], r["before"]["in_use"], r["after"]["in_use"]
            )
        else:
            verdict = "ran, logits finite" if r.get("finite") else ("planned" if measured is None else "NON-FINITE")
        lines.append(
            (
                r["name"],
                r["path"],
                str(r["context"]),
                _gib(r["weights"]),
                _gib(r["kv"]),
                _gib(r["workspace"]),
                _gib(r["peak"]),
                _gib(measured),
                err,
                verdict,
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*line) for line in lines)]) + "\n(sizes in GiB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--shape", default=None, help="override every configuration's shape (e.g. tiny)")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.shape, args.plan_only)), flush=True)
        return
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    rows = []
    for name in args.configs.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            *(["--shape", args.shape] if args.shape else []),
            *(["--plan-only"] if args.plan_only else []),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else dict(name=name, error_text=proc.stderr.strip()[-400:])
        except subprocess.TimeoutExpired:
            row = dict(name=name, error_text=f"timed out after {args.timeout} s")
        rows.append(row)
        print(row.get("report", row.get("error_text", "")), flush=True)
        if "refused" in row:
            print("  refused: " + row["refused"], flush=True)
        if args.json:  # after every configuration: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
