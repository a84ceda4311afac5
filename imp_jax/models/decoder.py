"""Every supported family as one decoder-only forward function over a params pytree.

Layers differ in their mixer (attention or Gated-DeltaNet recurrence) and their feed-forward (gated MLP or
mixture of experts). The stack is a repetition of a *unit* of layers (one layer for dense models; three
recurrent + one attention for the Qwen3.5 hybrids); consecutive units with identical structure and storage
formats form a segment that runs under ``lax.scan`` (a Q4_K_M file mixes qtypes across layers, and a packed
weight's qtype is static). Family differences are config fields decided from the file, or the presence of
optional weights, never a check of the architecture name at trace time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax import ops
from imp_jax.models.attention import Attention, attention_mixer
from imp_jax.models.config import ATTENTION, ModelConfig
from imp_jax.models.layers import gated_mlp, rms_norm, softcap
from imp_jax.models.moe import MoE, moe_ffn
from imp_jax.models.recurrent import Recurrent, recurrent_mixer
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime.cache import Cache, Rows, contiguous_rows

Weight = ops.Weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's weights; inside a segment every leaf carries a leading unit axis.

    ``post_mixer_norm`` is Gemma's sandwich norm after attention; ``ffn_norm`` is the norm before the
    feed-forward (llama.cpp calls it ``post_attention_norm`` in the Qwen3.5 and gpt-oss files).
    """

    attn_norm: jax.Array
    mixer: Attention | Recurrent
    ffn_norm: jax.Array
    w_gate: Weight | None = None
    w_up: Weight | None = None
    w_gate_up: Weight | None = None  # gate and up fused (stored alike), see weights.fusion.fuse
    w_down: Weight | None = None
    moe: MoE | None = None
    post_mixer_norm: jax.Array | None = None
    post_ffn_norm: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoder:
    embed: Weight
    segments: tuple[tuple[Layer, ...], ...]  # per segment: one Layer per position in the unit, stacked over units
    output_norm: jax.Array
    output: Weight | None  # None: tied to the embedding
    inv_freq: jax.Array  # [L, rot/2] per-layer rope inverse frequencies (local and global layers differ)


def _ffn(p: Layer, cfg: ModelConfig, h: jax.Array, kernels: KernelPolicy) -> jax.Array:
    if p.moe is not None:
        return moe_ffn(p.moe, cfg.moe, h, kernels=kernels, tp=cfg.tp)
    return gated_mlp(h, p.w_gate, p.w_up, p.w_down, cfg.activation, p.w_gate_up, tp=cfg.tp, kernels=kernels)


def _unit_body(cfg: ModelConfig, kinds: tuple[str, ...], windows: tuple[int, ...], step: StepInfo):
    """Scan body over units: carry (x, KV groups, recurrent state); xs = (unit params, cache indices, rope). Kinds
    and attention windows are static per position in the unit (the unit is the period of their pattern), and so
    is the KV group a window picks."""

    def body(carry, xs):
        x, kv, rec = carry
        unit, ids, inv_freq = xs
        for i, (p, kind) in enumerate(zip(unit, kinds, strict=True)):
            h = rms_norm(x, p.attn_norm, cfg.rms_eps)
            if kind == ATTENTION:
                g = int(windows[i] > 0)  # the KV group: full attention or sliding window
                a, group = attention_mixer(p.mixer, cfg, h, inv_freq[i], windows[i], kv[g], ids[i], step)
                kv = (kv[0], group) if g else (group, kv[1])
            else:
                a, rec = _recurrent(p, cfg, h, rec, ids[i], step)
            if p.post_mixer_norm is not None:
                a = rms_norm(a, p.post_mixer_norm, cfg.rms_eps)
            x = x + a
            m = _ffn(p, cfg, rms_norm(x, p.ffn_norm, cfg.rms_eps), step.kernels)
            if p.post_ffn_norm is not None:
                m = rms_norm(m, p.post_ffn_norm, cfg.rms_eps)
            x = x + m
        return (x, kv, rec), None

    return body


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What every mixer of one forward needs besides its input: positions pos [B, T], valid lengths [B] (tokens at
    t >= valid_len are padding: they write nothing), where each row keeps its state (``rows``), and how the step
    attends (static): ``decode`` picks the one-step recurrence; ``chunked`` says a prefill chunk may continue
    earlier pages (attend through the page table) rather than start every row at position 0 (attend within the
    chunk); ``kernels`` the model's load-time kernel policy."""

    pos: jax.Array
    valid_len: jax.Array
    rows: Rows
    decode: bool
    chunked: bool
    kernels: KernelPolicy = REFERENCE


def _recurrent(p: Layer, cfg: ModelConfig, h: jax.Array, rec, layer: jax.Array, step: StepInfo):
    """The recurrent mixer on each row's state slot; a row at position 0 starts from a zero state (a new sequence
    in a reused slot), a padding row's slot is out of range and its write is dropped."""
    slot = step.rows.slot
    fresh = step.pos[:, 0] == 0
    conv = jnp.where(fresh[:, None, None], 0.0, rec[0][layer][slot]).astype(rec[0].dtype)
    ssm = jnp.where(fresh[:, None, None, None], 0.0, rec[1][layer][slot]).astype(rec[1].dtype)
    a, (conv, ssm) = recurrent_mixer(p.mixer, cfg, h, (conv, ssm), step.valid_len, step.decode, step.kernels)
    rec = (rec[0].at[layer, slot].set(conv, mode="drop"), rec[1].at[layer, slot].set(ssm, mode="drop"))
    return a, rec


def _held_apart(leaf) -> bool:
    return isinstance(leaf, ops.UnitArrays)


def units(segment: tuple[Layer, ...]) -> int:
    """How many units a segment's leaves hold (stacked on a leading axis, or one array each)."""
    first = jax.tree.leaves(segment, is_leaf=_held_apart)[0]
    return len(first.arrays) if _held_apart(first) else first.shape[0]


def _scan_units(body, carry, segment: tuple[Layer, ...], ids: jax.Array, inv_freq: jax.Array):
    """``lax.scan`` of the unit body over a segment. Stacked leaves are sliced by the scan; leaves held one array
    per unit (``ops.UnitArrays``) stay outside it, the body's products picking the current unit's array."""
    leaves, tree = jax.tree.flatten(segment, is_leaf=_held_apart)
    stacked = [leaf for leaf in leaves if not _held_apart(leaf)]

    def step(carry, xs):
        u, sliced, unit_ids, unit_freq = xs
        rest = iter(sliced)
        unit = tree.unflatten([leaf.at(u) if _held_apart(leaf) else next(rest) for leaf in leaves])
        return body(carry, (unit, unit_ids, unit_freq))

    n = units(segment)
    carry, _ = jax.lax.scan(step, carry, (jnp.arange(n, dtype=jnp.int32), stacked, ids, inv_freq))
    return carry


def _layer_indices(kinds: tuple[str, ...], start: int, n_units: int, cfg: ModelConfig):
    """Per unit and position: the global layer id, and the index into its cache (the full or window KV group of
    an attention layer, the recurrent slots of a recurrent one): how many layers of its cache come before it."""
    cache_of = [(k, k == ATTENTION and w > 0) for k, w in zip(cfg.kinds, cfg.layer_window, strict=True)]
    before = [cache_of[:i].count(c) for i, c in enumerate(cache_of)]
    layer = start + jnp.arange(n_units)[:, None] * len(kinds) + jnp.arange(len(kinds))[None, :]
    return layer, jnp.asarray(before, jnp.int32)[layer]


def forward(
    params: Decoder,
    cfg: ModelConfig,
    tokens: jax.Array,
    pos: jax.Array,
    cache: Cache,
    *,
    decode: bool,
    valid_len: jax.Array | None = None,
    logits_at: jax.Array | None = None,
    rows: Rows | None = None,
    chunked: bool = False,
    kernels: KernelPolicy = REFERENCE,
) -> tuple[jax.Array, Cache]:
    """Run tokens [B, T] at positions pos [B, T] and update the cache.

    Prefill (decode=False) starts every row at position 0 and attends within the chunk, unless ``chunked``: then
    rows continue their earlier pages (chunked prefill). ``valid_len`` [B] marks right padding, which neither the
    KV pages nor the recurrent state see. Decode attends over the cache. ``rows`` gives each row's page table and
    state slot (default: the contiguous layout, row b owning page b). ``logits_at`` [B] picks one position per
    row for the output head (generation); None returns all positions. Logits are f32. ``kernels`` (static) is the
    model's load-time kernel policy; the default is the XLA reference path.
    """
    b, t = tokens.shape
    if valid_len is None:
        valid_len = jnp.full((b,), t, jnp.int32)
    step = StepInfo(
        pos,
        valid_len,
        contiguous_rows(b) if rows is None else rows,
        decode,
        chunked or decode,
        kernels,
    )
    x = ops.embed(params.embed, tokens, jnp.float32)
    x = (x * cfg.embed_scale if cfg.embed_scale != 1.0 else x).astype(cache.dtype)
    kv, rec = cache.kv_arrays(), cache.recurrent_arrays()
    start = 0
    for unit in params.segments:
        kinds = tuple(ATTENTION if isinstance(p.mixer, Attention) else "recurrent" for p in unit)
        n_units = units(unit)
        layer, ids = _layer_indices(kinds, start, n_units, cfg)
        windows = cfg.layer_window[start : start + len(kinds)]
        body = _unit_body(cfg, kinds, windows, step)
        x, kv, rec = _scan_units(body, (x, kv, rec), unit, ids, params.inv_freq[layer])
        start += n_units * len(kinds)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = rms_norm(x, params.output_norm, cfg.rms_eps)
    head = params.embed if params.output is None else params.output
    logits = softcap(ops.matmul(x, head, jnp.float32, kernels=kernels), cfg.final_softcap)
    return logits, cache.replace(kv, rec)
