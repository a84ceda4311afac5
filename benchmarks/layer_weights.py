"""How a scanned layer stack should hand its weights to the matmul: the measurement behind "read in place".

A decode step scans the layers; each layer's matrices are slices of stacked arrays [L, N, K]. Handing the scan
its stacks as ``xs`` makes XLA materialize every slice (a ``dynamic-slice`` copy per matrix per step) before the
dot or the kernel reads it. This script times one M=1 pass over L layers of the Qwen3-8B matrices (bf16) for each
way of handing them over, and prints step time, GB/s and % of the copy bandwidth measured in the same run:

- ``xs``: the stacks as scan ``xs`` (what the decoder did), XLA's dot;
- ``xs+dsf``: the same, compiled with XLA's dynamic-slice fusion (cuBLAS reads the slice at its offset);
- ``index``: the stacks closed over, ``w[i]`` in the body, XLA's dot;
- ``index+dsf``: that with dynamic-slice fusion;
- ``kernel-xs``: the Pallas BF16 kernel on the xs slice;
- ``kernel-index``: the Pallas BF16 kernel reading layer i of the stack in place (the expert-stack mechanism).

Run on the GPU machine from the repository root: ``python3 benchmarks/layer_weights.py [--layers 36]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from e2e import copy_bandwidth  # (benchmarks/ is the script's directory)

import pallas
from pallas.qformats import Fmt, PackedWeight

# Qwen3-8B: fused qkv, attn_output, fused gate|up, down ([N, K] as stored).
SHAPES = ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288))
DSF = {"xla_gpu_enable_dynamic_slice_fusion": True}


def _chain(x, mats, mm):
    """x [1, 4096] through the four matrices of one layer (slicing outputs to the next K)."""
    h = x
    for w in mats:
        h = mm(h[:, : w_k(w)], w)
        h = jnp.tanh(h)
    return x + h[:, :4096]


def w_k(w) -> int:
    return w.shape[-1]


def dot(h, w):
    return jnp.einsum("mk,nk->mn", h, w, preferred_element_type=jnp.float32).astype(h.dtype)


def kernel_slice(h, w):
    return pallas.quantized_matmul(h, pallas.dense_weight(w))


def variants(stacks):
    n_layers = stacks[0].shape[0]

    def xs_scan(mm):
        def f(x, ws):
            return jax.lax.scan(lambda x, mats: (_chain(x, mats, mm), None), x, ws)[0]

        return f

    def index_scan(f_layer):
        def f(x, ws):
            return jax.lax.scan(lambda x, i: (f_layer(x, ws, i), None), x, jnp.arange(n_layers))[0]

        return f

    def index_dot(x, ws, i):
        return _chain(x, [w[i] for w in ws], dot)

    def index_kernel(x, ws, i):
        h = x
        for w in ws:
            pw = PackedWeight(qs=w, scales=(), fmt=Fmt.BF16, shape=tuple(w.shape[1:]))
            h = jnp.tanh(pallas.quantized_matmul(h[None, :, : w.shape[-1]], pw, expert_ids=i[None])[0])
        return x + h[:, :4096]

    return {
        "xs": (xs_scan(dot), {}),
        "xs+dsf": (xs_scan(dot), DSF),
        "index": (index_scan(index_dot), {}),
        "index+dsf": (index_scan(index_dot), DSF),
        "kernel-xs": (xs_scan(kernel_slice), {}),
        "kernel-index": (index_scan(index_kernel), {}),
    }


def time_it(f, *args, reps: int = 20) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    args = ap.parse_args()
    key = jax.random.key(0)
    stacks = [
        (jax.random.normal(jax.random.fold_in(key, j), (args.layers, n, k), jnp.float32) * 0.01).astype(jnp.bfloat16)
        for j, (n, k) in enumerate(SHAPES)
    ]
    nbytes = sum(s.nbytes for s in stacks)
    x = jnp.ones((1, 4096), jnp.bfloat16)
    bw = copy_bandwidth() * 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; weights {nbytes / 1e9:.2f} GB over {args.layers} layers")
    print(f"{'variant':<14} {'ms':>8} {'GB/s':>8} {'% copy':>7} {'dyn-slices':>10}")
    for name, (f, opts) in variants(stacks).items():
        try:
            compiled = jax.jit(f).lower(x, stacks).compile(compiler_options=opts or None)
            n_ds = compiled.as_text().count("dynamic-slice(")
            s = time_it(compiled, x, stacks)
        except Exception as e:  # a variant that cannot compile is a result too
            print(f"{name:<14} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        print(f"{name:<14} {s * 1e3:8.3f} {nbytes / s / 1e9:8.0f} {100 * nbytes / s / bw:6.1f}% {n_ds:10d}", flush=True)


if __name__ == "__main__":
    main()
