"""Attention: the one dispatch point for prefill and decode attention.

``attention_prefill`` / ``attention_decode`` pick the Pallas attention kernels on Hopper for what they support and
the jnp reference (``attention``) otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imp_jax.ops import policy


def _kernel_attention_ok(q: jax.Array, softcap: float) -> bool:
    return policy.kernels_enabled() and not softcap and q.shape[-1] in (64, 128, 256)


def attention_prefill(q, k, v, *, scale: float, window: int = 0, softcap: float = 0.0, sinks=None) -> jax.Array:
    """Causal self-attention of a chunk that starts at position 0: q [B, T, H, D], k/v [B, T, Hkv, D]."""
    if _kernel_attention_ok(q, softcap):
        import pallas

        return pallas.flash_attention(q, k, v, causal=True, window=window or None, sinks=sinks, scale=scale)
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return attention(q, k, v, pos, pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


def attention_decode(
    q, k_cache, v_cache, q_pos, layer, *, scale: float, window: int = 0, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """New tokens q [B, T, H, D] at positions q_pos [B, T] against layer ``layer`` of the caches
    [L, B, S, Hkv, D], which already hold them. The kernel reads the layer in place."""
    if _kernel_attention_ok(q, softcap) and k_cache.shape[2] % 8 == 0:
        import pallas

        lengths = (q_pos[:, -1] + 1).astype(jnp.int32)
        return pallas.decode_attention(
            q, k_cache, v_cache, lengths, layer=layer, window=window or None, sinks=sinks, scale=scale
        )
    k_cache, v_cache = k_cache[layer], v_cache[layer]
    b, s = k_cache.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    return attention(q, k_cache, v_cache, q_pos, k_pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


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
