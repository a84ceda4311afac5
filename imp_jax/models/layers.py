"""Building blocks shared by every family: norms, rotary embeddings, gated MLPs. All pure jnp."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax import ops
from imp_jax.ops.policy import REFERENCE

if TYPE_CHECKING:
    from imp_jax.models.config import RopeConfig


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm in f32 (DESIGN rule 2); llama.cpp files already store zero-centred weights as w+1."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Inverse frequencies [dim/2] in float64 on the host; the scaling kind folds in here, not at trace time."""
    inv = 1.0 / rope.base ** (np.arange(0, rope.dim, 2, dtype=np.float64) / rope.dim)
    if rope.scaling == "linear":
        inv = inv / rope.factor
    if rope.scaling == "yarn":
        inv = _yarn(inv, rope)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, np.float64)
    return inv


def _yarn(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """YaRN (llama.cpp's rope_yarn, transformers' _compute_yarn_parameters): a dim that turns more than beta_fast
    times over the original context keeps its frequency, one that turns fewer than beta_slow times is
    interpolated (divided by factor), with a linear ramp between. The magnitude correction is
    ``RopeConfig.attn_factor``, folded into the attention scale by the config."""

    def corr_dim(turns: float) -> float:
        return rope.dim * math.log(rope.original_context / (turns * 2 * math.pi)) / (2 * math.log(rope.base))

    low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
    if rope.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, rope.dim - 1.0)
    keep = 1.0 - np.clip((np.arange(inv.shape[0]) - low) / max(high - low, 0.001), 0.0, 1.0)
    return inv / rope.factor * (1.0 - keep) + inv * keep


def apply_rope(x: jax.Array, pos: jax.Array, inv_freq: jax.Array, neox: bool) -> jax.Array:
    """Rotate the first len(inv_freq)*2 dims of each head of x [B, T, H, D] at positions pos [B, T]."""
    rot = inv_freq.shape[-1] * 2
    ang = pos.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B, T, rot/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    xr, rest = xf[..., :rot], xf[..., rot:]
    if neox:
        a, b = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out, rest], axis=-1).astype(x.dtype)


def fused_shards(sizes: Sequence[int], tp: int) -> int:
    """How many per-shard groups a fused matrix of parts ``sizes`` (rows) is laid out in under ``tp``-way tensor
    parallelism: tp when every part splits evenly (group s holds rows s of every part, so each device computes
    its own heads' q, k and v), else 1 (the parts one after the other)."""
    return tp if tp > 1 and all(n % tp == 0 for n in sizes) else 1


def split_fused(y: jax.Array, sizes: Sequence[int], tp: int = 1) -> tuple[jax.Array, ...]:
    """The parts of a fused matrix's output y [..., sum(sizes)], undoing the per-shard layout (``fused_shards``):
    the split happens within each shard's group, so under a tp-sharded N it needs no communication."""
    shards = fused_shards(sizes, tp)
    local = [n // shards for n in sizes]
    groups = y.reshape(*y.shape[:-1], shards, sum(local))
    parts = jnp.split(groups, np.cumsum(local)[:-1].tolist(), axis=-1)
    return tuple(p.reshape(*y.shape[:-1], n) for p, n in zip(parts, sizes, strict=True))


def projections(
    x: jax.Array,
    fused,
    parts: tuple,
    sizes: tuple[int, ...] | None = None,
    out_dtype=None,
    *,
    kernels: ops.KernelPolicy = REFERENCE,
    tp: int = 1,
):
    """``x @ W.T`` for several matrices that read the same x (q/k/v, gate/up): one matmul over their
    concatenation where the loader fused them (``fused``, split at ``sizes``, or in equal parts without; laid out
    per shard under ``tp``), else one per matrix of ``parts``."""
    if fused is None:
        return tuple(ops.matmul(x, w, out_dtype, kernels=kernels) for w in parts)
    y = ops.matmul(x, fused, out_dtype, kernels=kernels)
    return split_fused(y, sizes or (y.shape[-1] // len(parts),) * len(parts), tp)


def gated_mlp(
    x: jax.Array,
    w_gate,
    w_up,
    w_down,
    activation: str,
    w_gate_up=None,
    *,
    kernels: ops.KernelPolicy = REFERENCE,
    tp: int = 1,
) -> jax.Array:
    """SwiGLU (silu) or GeGLU (tanh-approximated gelu) feed-forward; ``w_gate_up`` is gate and up fused."""
    g, u = (a.astype(jnp.float32) for a in projections(x, w_gate_up, (w_gate, w_up), kernels=kernels, tp=tp))
    act = jax.nn.silu(g) if activation == "silu" else jax.nn.gelu(g, approximate=True)
    return ops.matmul((act * u).astype(x.dtype), w_down, kernels=kernels)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    return cap * jnp.tanh(x / cap) if cap else x
