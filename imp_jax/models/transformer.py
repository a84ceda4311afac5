"""Decoder-only transformers (Llama, Qwen2, Qwen3, Gemma-3) as one pure function over a params pytree.

Layers are grouped into segments of identical structure and storage format (a Q4_K_M file mixes qtypes across
layers, and a packed weight's qtype is static); each segment runs under ``lax.scan``. Family differences are
config fields decided from the file (config.py), or the presence of optional weights (biases, QK norms, post
norms), never checks of the architecture name at trace time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax import ops
from imp_jax.cache import KVCache
from imp_jax.config import ModelConfig
from imp_jax.models.layers import apply_rope, gated_mlp, rms_norm, softcap

Weight = ops.Weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Block:
    """One layer's weights; inside a segment every leaf carries a leading layer axis."""

    attn_norm: jax.Array
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: jax.Array
    w_gate: Weight
    w_up: Weight
    w_down: Weight
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None
    post_attn_norm: jax.Array | None = None
    post_ffn_norm: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transformer:
    embed: Weight
    segments: tuple[Block, ...]
    output_norm: jax.Array
    output: Weight | None  # None: tied to the embedding
    inv_freq: jax.Array  # [L, rot/2] per-layer rope inverse frequencies (local and global layers differ)


def _add(x: jax.Array, b: jax.Array | None) -> jax.Array:
    return x if b is None else x + b.astype(x.dtype)


def _attention_block(p: Block, cfg: ModelConfig, x, pos, inv_freq, window, k_cache, v_cache, layer, decode):
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = _add(ops.matmul(x, p.wq), p.bq).reshape(b, t, cfg.n_head, hd)
    k = _add(ops.matmul(x, p.wk), p.bk).reshape(b, t, cfg.n_head_kv, hd)
    v = _add(ops.matmul(x, p.wv), p.bv).reshape(b, t, cfg.n_head_kv, hd)
    if p.q_norm is not None:
        q = rms_norm(q, p.q_norm, cfg.rms_eps)
        k = rms_norm(k, p.k_norm, cfg.rms_eps)
    q = apply_rope(q, pos, inv_freq, cfg.rope.neox)
    k = apply_rope(k, pos, inv_freq, cfg.rope.neox)
    rows = jnp.arange(b)[:, None]
    k_cache = k_cache.at[layer, rows, pos].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, rows, pos].set(v.astype(v_cache.dtype), mode="drop")
    if decode:
        keys, values = k_cache[layer], v_cache[layer]
        k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
    else:
        keys, values, k_pos = k, v, pos
    o = ops.attention(q, keys, values, pos, k_pos, scale=cfg.attn_scale, window=window, softcap=cfg.attn_softcap)
    return ops.matmul(o.reshape(b, t, cfg.n_head * hd), p.wo), k_cache, v_cache


def _layer(cfg: ModelConfig, decode: bool, pos):
    def body(carry, xs):
        x, k_cache, v_cache = carry
        p, layer, inv_freq, window = xs
        h = rms_norm(x, p.attn_norm, cfg.rms_eps)
        a, k_cache, v_cache = _attention_block(p, cfg, h, pos, inv_freq, window, k_cache, v_cache, layer, decode)
        if p.post_attn_norm is not None:
            a = rms_norm(a, p.post_attn_norm, cfg.rms_eps)
        x = x + a
        h = rms_norm(x, p.ffn_norm, cfg.rms_eps)
        m = gated_mlp(h, p.w_gate, p.w_up, p.w_down, cfg.activation)
        if p.post_ffn_norm is not None:
            m = rms_norm(m, p.post_ffn_norm, cfg.rms_eps)
        return (x + m, k_cache, v_cache), None

    return body


def forward(
    params: Transformer,
    cfg: ModelConfig,
    tokens: jax.Array,
    pos: jax.Array,
    cache: KVCache,
    *,
    decode: bool,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run tokens [B, T] at positions pos [B, T]; write their keys/values into the cache.

    Prefill (decode=False) attends within the chunk (it starts at position 0); decode attends over the cache.
    ``logits_at`` [B] picks one position per row for the output head (generation); None returns all positions.
    Logits are f32 (DESIGN rule 2).
    """
    dtype = cache.k.dtype
    x = ops.embed(params.embed, tokens, jnp.float32)
    x = (x * cfg.embed_scale).astype(dtype) if cfg.embed_scale != 1.0 else x.astype(dtype)
    windows = jnp.asarray(cfg.layer_window, jnp.int32)
    k_cache, v_cache = cache.k, cache.v
    start = 0
    for seg in params.segments:
        n = jax.tree.leaves(seg)[0].shape[0]
        layers = jnp.arange(start, start + n)
        xs = (seg, layers, params.inv_freq[start : start + n], windows[start : start + n])
        (x, k_cache, v_cache), _ = jax.lax.scan(_layer(cfg, decode, pos), (x, k_cache, v_cache), xs)
        start += n
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = rms_norm(x, params.output_norm, cfg.rms_eps)
    head = params.embed if params.output is None else params.output
    logits = softcap(ops.matmul(x, head, jnp.float32), cfg.final_softcap)
    return logits, KVCache(k_cache, v_cache)
