"""The attention mixer: projections, QK norms, rotary embedding, the KV cache write, and ops.attention.

Covers plain GQA (Llama, Qwen2 with QKV bias, Qwen3 and Gemma-3 with QK norms, gpt-oss with biases everywhere and
attention sinks) and the gated attention of the Qwen3.5 / Qwen3-Next hybrids, whose q projection interleaves
[q | gate] per head and whose output is multiplied by sigmoid(gate).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax import ops
from imp_jax.models.config import ModelConfig
from imp_jax.models.layers import apply_rope, projections, rms_norm

Weight = ops.Weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Attention:
    """``wqkv`` is q, k and v concatenated along N where the loader could fuse them (stored alike): one matmul
    launch instead of three, the small k/v matrices riding on q's; otherwise wq, wk and wv hold them."""

    wo: Weight
    wq: Weight | None = None
    wk: Weight | None = None
    wv: Weight | None = None
    wqkv: Weight | None = None
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    bo: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None
    sinks: jax.Array | None = None  # gpt-oss: one learned logit per head in the softmax denominator


def _add(x: jax.Array, b: jax.Array | None) -> jax.Array:
    return x if b is None else x + b.astype(x.dtype)


def head_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over each head; a weight shorter than head_dim applies to each chunk of its length (imp's fix for
    files whose norm covers part of the head)."""
    n = weight.shape[-1]
    if n == x.shape[-1]:
        return rms_norm(x, weight, eps)
    return rms_norm(x.reshape(*x.shape[:-1], -1, n), weight, eps).reshape(x.shape)


def attention_mixer(
    p: Attention,
    cfg: ModelConfig,
    x: jax.Array,
    inv_freq: jax.Array,
    window: int,
    kv: tuple[jax.Array, jax.Array],
    layer: jax.Array,
    step,
):
    """x [B, T, D] at positions step.pos [B, T]; kv = (k, v) paged caches [L, n_pages, P, Hkv, hd] of the layer's
    KV group (the window group when ``window`` > 0) written at ``layer`` through each row's page table of that
    group (``step``: decoder.StepInfo).

    A prefill chunk from position 0 attends within itself; a decode token or a continuing chunk (step.chunked)
    attends over its row's pages, which already hold it.
    """
    b, t, _ = x.shape
    hd = cfg.head_dim
    pos = step.pos
    q_out, kv_out = cfg.n_head * hd * (2 if cfg.attn_gate else 1), cfg.n_head_kv * hd
    q, k, v = projections(x, p.wqkv, (p.wq, p.wk, p.wv), (q_out, kv_out, kv_out), kernels=step.kernels, tp=cfg.tp)
    q, k, v = _add(q, p.bq), _add(k, p.bk), _add(v, p.bv)
    gate = None
    if cfg.attn_gate:
        q = q.reshape(b, t, cfg.n_head, 2 * hd)
        q, gate = q[..., :hd], q[..., hd:]
    q = q.reshape(b, t, cfg.n_head, hd)
    k = k.reshape(b, t, cfg.n_head_kv, hd)
    v = v.reshape(b, t, cfg.n_head_kv, hd)
    if p.q_norm is not None:
        q = head_norm(q, p.q_norm, cfg.rms_eps)
    if p.k_norm is not None:
        k = head_norm(k, p.k_norm, cfg.rms_eps)
    q = apply_rope(q, pos, inv_freq, cfg.rope.neox)
    k = apply_rope(k, pos, inv_freq, cfg.rope.neox)
    valid = jnp.arange(t)[None, :] < step.valid_len[:, None]
    table = step.rows.table(window > 0)
    kv = ops.write_pages(kv, (k, v), layer, table, pos, valid)
    opts = dict(scale=cfg.attn_scale, window=window, softcap=cfg.attn_softcap, sinks=p.sinks)
    opts |= dict(kernels=step.kernels, mesh=cfg.mesh)  # over a mesh the kernels run per kv-head shard
    if step.chunked:
        o = ops.attention_paged(q, *kv, pos, layer, table, **opts)
    else:
        o = ops.attention_prefill(q, k, v, **opts)
    if gate is not None:
        o = (o.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(x.dtype)
    return _add(ops.matmul(o.reshape(b, t, cfg.n_head * hd), p.wo, kernels=step.kernels), p.bo), kv
