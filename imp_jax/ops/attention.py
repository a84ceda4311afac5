"""Attention: the one dispatch point for prefill and decode attention.

``attention_prefill`` / ``attention_paged`` pick the Pallas attention kernels where the model's load-time
``KernelPolicy`` turns them on, for what they support, and the jnp reference (``attention``) otherwise. Over a
``mesh`` (tensor parallelism) the kernels run per kv-head shard, as the KV pages are split
(``sharded.by_kv_head``), where the kv heads divide over it; elsewhere the reference runs on XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import imp_jax.ops.policy as policy
import imp_jax.ops.sharded as sharded


def _kernel_attention_ok(
    q: jax.Array, n_kv: int, softcap: float, kernels: policy.KernelPolicy, mesh: Mesh | None
) -> bool:
    return kernels.attention and not softcap and q.shape[-1] in (64, 128, 256) and sharded.splits_kv_heads(mesh, n_kv)


def attention_prefill(
    q,
    k,
    v,
    *,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    sinks=None,
    kernels: policy.KernelPolicy = policy.REFERENCE,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Causal self-attention of a chunk that starts at position 0: q [B, T, H, D], k/v [B, T, Hkv, D]."""
    if _kernel_attention_ok(q, k.shape[2], softcap, kernels, mesh):
        import pallas

        flash = functools.partial(
            pallas.flash_attention, causal=True, window=window or None, scale=scale, interpret=kernels.interpret
        )
        with policy.kernel_errors():
            return sharded.by_kv_head(flash, mesh, dict(q=(q, 2), k=(k, 2), v=(v, 2), sinks=(sinks, 0)))
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return attention(q, k, v, pos, pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


def write_pages(kv, new, layer, pages, pos, valid):
    """Write new keys and values [B, T, Hkv, D] at positions pos [B, T] into layer ``layer`` of the paged caches
    [L, n_pages, P, Hkv, D], through each row's page table pages [B, n_pg]. Padding tokens (``valid`` False) and
    positions past the table are dropped, so they can never land in another sequence's page."""
    k_cache, v_cache = kv
    n_pages, page = k_cache.shape[1:3]
    col = pos // page
    ok = valid & (col < pages.shape[1])
    page_id = jnp.take_along_axis(pages, jnp.minimum(col, pages.shape[1] - 1), axis=1)
    page_id = jnp.where(ok, page_id, n_pages)  # out of range: dropped
    offset = pos % page

    def put(cache, x):
        # Indexed in the cache's own shape: a reshape of the loop-carried cache made XLA:CPU copy the whole pool
        # at every layer (decode time grew with max_context).
        return cache.at[layer, page_id, offset].set(x.astype(cache.dtype), mode="drop")

    return put(k_cache, new[0]), put(v_cache, new[1])


def attention_paged(
    q,
    k_cache,
    v_cache,
    q_pos,
    layer,
    pages,
    *,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    sinks=None,
    kernels: policy.KernelPolicy = policy.REFERENCE,
    mesh: Mesh | None = None,
) -> jax.Array:
    """New tokens q [B, T, H, D] at positions q_pos [B, T] against layer ``layer`` of the paged caches
    [L, n_pages, P, Hkv, D], which already hold them, read through the page tables [B, n_pg].

    Positions are consecutive per row (``q_pos[b, -1] - T + 1 .. q_pos[b, -1]``); the Pallas paged decode kernel
    reads the layer's pages in place on Hopper (a contiguous cache is its one-page-per-row case), the jnp
    reference (``attention_paged_gather``) otherwise: either way the read follows the sequence's length, not
    max_context.
    """
    page = k_cache.shape[2]
    if _kernel_attention_ok(q, k_cache.shape[3], softcap, kernels, mesh):
        import pallas

        if pallas.supports_paged(page, pages.shape[1], q.shape[-1]):
            lengths = (q_pos[:, -1] + 1).astype(jnp.int32)
            paged = functools.partial(
                pallas.paged_decode_attention, window=window or None, scale=scale, interpret=kernels.interpret
            )
            heads = dict(q=(q, 2), k_pages=(k_cache, 3), v_pages=(v_cache, 3), sinks=(sinks, 0))
            with policy.kernel_errors():
                return sharded.by_kv_head(paged, mesh, heads, page_table=pages, lengths=lengths, layer=layer)
    return attention_paged_gather(
        q, k_cache, v_cache, q_pos, layer, pages, scale=scale, window=window, softcap=softcap, sinks=sinks
    )


def attention_paged_gather(
    q, k_cache, v_cache, q_pos, layer, pages, *, scale: float, window: int = 0, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """``attention_paged``'s jnp reference: gathers each row's pages (all n_pg of them, or with a window only the
    ones the window can see) and attends over them."""
    page = k_cache.shape[2]
    b, t = q_pos.shape
    n_pg = pages.shape[1]
    n_read = n_pg if window <= 0 else min(n_pg, -(-(window + t - 1) // page) + 1)
    first = jnp.zeros((b,), jnp.int32)
    if n_read < n_pg:  # the window's pages: from the one holding the oldest visible key of the first query
        first = jnp.clip((q_pos[:, 0] - window + 1) // page, 0, n_pg - n_read)
    cols = first[:, None] + jnp.arange(n_read)[None, :]
    ids = jnp.take_along_axis(pages, cols, axis=1)
    k = k_cache[layer][ids].reshape(b, n_read * page, *k_cache.shape[3:])
    v = v_cache[layer][ids].reshape(b, n_read * page, *v_cache.shape[3:])
    k_pos = (cols[:, :, None] * page + jnp.arange(page)[None, None, :]).reshape(b, n_read * page)
    return attention(q, k, v, q_pos, k_pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


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
