"""The native CPU matmul (``imp_jax.ops.native_cpu``) against XLA:CPU's f32 GEMV, on a decode step's weight reads.

Usage: python benchmarks/cpu_native_gemv.py [--model smollm2-135m|qwen2.5-0.5b|qwen2.5-1.5b]

XLA:CPU reads f32 weights at memory bandwidth but has no faster product for a narrower weight: a bf16 or int8
matrix converted inside the dot is compute-bound at about the f32 time (docs/BENCHMARKS.md, CPU). This times, in
one process, a decode step's chain of layer matrices and the output head of the model's shape (random weights:
int8 codes with a scale and an offset per 32, the form the GGUF block formats decode to): XLA's einsum over the
dequantized f32 matrices, then the native kernel over the codes (built into a temporary folder). It checks the two
agree before timing them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from imp_jax.ops import native_cpu

BLOCK = 32
# hidden, kv width, intermediate, layers, vocabulary
SHAPES = {
    "smollm2-135m": (576, 192, 1536, 30, 49152),
    "qwen2.5-0.5b": (896, 128, 4864, 24, 151936),
    "qwen2.5-1.5b": (1536, 256, 8960, 28, 151936),
}


def xla_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32)


def blocks(rng: np.random.Generator, n: int, k: int) -> native_cpu.AffineBlocks:
    """A random [n, k] matrix as 4-bit codes with a scale and an offset per 32 (Q4_0's form)."""
    scale = rng.uniform(0.5, 1.5, (n, k // BLOCK)).astype(np.float32) / np.sqrt(k) / 4
    codes = rng.integers(0, 16, (n, k), dtype=np.int8)
    parts = (jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(-8 * scale))
    return native_cpu.AffineBlocks.from_parts(*parts, int(GGMLQuantizationType.Q4_0))


def layer_chain(matmul):
    """One decode step's layer products (fused q/k/v, o, fused gate/up, down), normalised between layers."""

    @jax.jit
    def chain(layers, x):
        for qkv, o, gate_up, down in layers:
            h = matmul(x, qkv)[..., : x.shape[-1]]
            h = matmul(h, o)
            g = matmul(h, gate_up)
            half = g.shape[-1] // 2
            x = matmul(jax.nn.silu(g[..., :half]) * g[..., half:], down)
            x = x / jnp.sqrt(jnp.mean(x * x) + 1e-6)
        return x

    return chain


def median_s(fn, *args, reps: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    args = ap.parse_args(argv)
    hidden, kv, inter, n_layers, vocab = SHAPES[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        if not native_cpu.enable(Path(tmp)):
            print("the native CPU kernel does not build here (it needs g++ and AVX-512)")
            return 1
    rng = np.random.default_rng(0)
    shapes = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    packed = [[blocks(rng, n, k) for n, k in shapes] for _ in range(n_layers)]
    f32 = [[w.dequantize() for w in layer] for layer in packed]
    head = blocks(rng, vocab, hidden)
    x = jnp.asarray(rng.standard_normal((1, hidden)).astype(np.float32))

    ref = layer_chain(xla_matmul)(f32, x)
    got = layer_chain(native_cpu.matmul)(packed, x)
    err = float(jnp.max(jnp.abs(ref - got)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-4, f"native and XLA products differ by {err:.2e} of their scale"

    rows = []
    for what, ws, xla_fn, native_fn in (
        ("layer matrices", (f32, packed), layer_chain(xla_matmul), layer_chain(native_cpu.matmul)),
        ("output head", (head.dequantize(), head), jax.jit(lambda w, x: xla_matmul(x, w)),
         jax.jit(lambda w, x: native_cpu.matmul(x, w))),
    ):  # fmt: skip
        dense_bytes = sum(a.nbytes for a in jax.tree.leaves(ws[0]))
        packed_bytes = sum(a.nbytes for a in jax.tree.leaves(ws[1]))
        t_xla, t_native = median_s(xla_fn, ws[0], x), median_s(native_fn, ws[1], x)
        rows.append((what, dense_bytes, t_xla, packed_bytes, t_native))
    print(f"\n{args.model} shapes, max relative difference {err:.1e}, load average {os.getloadavg()[0]:.1f}\n")
    print("| what | XLA f32 MB | XLA f32 ms | GB/s | native int8 MB | native ms | GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for what, db, tx, pb, tn in rows:
        print(f"| {what} | {db / 1e6:.0f} | {tx * 1e3:.2f} | {db / tx / 1e9:.1f} | {pb / 1e6:.0f} | {tn * 1e3:.2f} "
              f"| {pb / tn / 1e9:.1f} | {tx / tn:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
