"""The one dispatch point per op.

``matmul(x, w)`` picks its implementation from the weight leaf (QTensor qtype or dense array), the backend and
the shapes; ``attention`` likewise. The reference path (dequantize, then a dot accumulating in f32) is the named
fallback every kernel is checked against. Which path a weight takes is visible through ``matmul_path`` so the
memory plan and the user can see it; ``IMP_JAX_FORCE_PATH`` (or ``force_path``) pins it for debugging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import dequantize_rows

Weight = QTensor | jax.Array

REFERENCE = "reference"  # dequantize to the compute dtype, then jnp.dot with f32 accumulation


def matmul_path(w: Weight, x_shape: tuple[int, ...] | None = None) -> str:
    """The implementation ``matmul`` uses for this weight (and activation shape) on the current backend."""
    return REFERENCE


def matmul(x: jax.Array, w: Weight, out_dtype=None) -> jax.Array:
    """``x @ W.T`` for W of logical shape [N, K] (GGUF/numpy order), accumulating in f32.

    The result is in ``out_dtype`` (default x.dtype); the output head asks for f32 logits.
    """
    wd = w.dequantize(x.dtype) if isinstance(w, QTensor) else w.astype(x.dtype)
    y = jnp.einsum("...k,nk->...n", x, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def embed(table: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table for ``ids``, dequantizing only the rows gathered."""
    if isinstance(table, QTensor):
        rows = jnp.take(table.data, ids, axis=0)
        out = dequantize_rows(rows, table.qtype)
        if table.scale is not None:
            out = out * table.scale
        return out.astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    scale: float,
    window: jax.Array | int = 0,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA attention with f32 scores and softmax (DESIGN rule 2).

    q [B, T, H, D]; k, v [B, S, Hkv, D]; q_pos [B, T] and k_pos [B, S] absolute positions. A key is visible when
    ``k_pos <= q_pos`` and, with a window w > 0, ``q_pos - k_pos < w``. ``sinks`` [H] adds a learned logit to
    each head's softmax denominator (gpt-oss).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    rel = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    visible = (rel >= 0) & ((window <= 0) | (rel < window))
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, h // hkv, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)
