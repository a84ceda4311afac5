"""``imp-jax plan``'s arguments. Kept apart from the planner so that building the CLI's parser (``--help``, an
argument error) imports no JAX and asks no device anything."""

from __future__ import annotations

import argparse

from imp_jax.planning.options import DTYPES, PATHS


def _run(args: argparse.Namespace) -> None:
    from imp_jax.planning.memory import cmd_plan

    cmd_plan(args)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """``imp-jax plan --model M [--context N|auto] [--batch B] [--device-memory 8GiB] [--path P]``."""
    p = subparsers.add_parser("plan", help="memory plan: weights, KV cache, workspace, peak, verdict")
    p.add_argument("--model", "-m", required=True, help="a .gguf path or a registry name")
    p.add_argument("--context", default="4096", help="max context in tokens, or 'auto' (largest that fits)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: float32 on CPU, else bfloat16")
    p.add_argument("--device-memory", default=None, help="budget instead of the device's free memory, e.g. 8GiB")
    p.add_argument("--headroom", default=None, help="runtime headroom (default 1GiB on GPU, 256MiB on CPU)")
    p.add_argument("--path", default="auto", choices=PATHS, help="weight execution path")
    p.add_argument(
        "--tp", type=int, default=1, help="devices to split the model over (tensor parallel), planned per device"
    )
    # the CLI sets these from IMP_JAX_KERNELS, IMP_JAX_COMPILE_CACHE and IMP_JAX_CACHE
    p.set_defaults(run=_run, kernels="auto", compile_cache=True, cache_dir=None)
    return p
