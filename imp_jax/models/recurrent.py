"""The Gated-DeltaNet mixer of the Qwen3.5 / Qwen3-Next hybrids: projections and state around models/gdn.py.

Input projections come in three GGUF layouts, told apart by which tensors the file has (gdn_spec.md §6.3, P2):
Qwen3.5 (``attn_qkv``, ``attn_gate``, ``ssm_alpha``, ``ssm_beta``), Qwen3-Next (``attn_qkv``, ``attn_gate``,
fused ``ssm_ba`` grouped per key head) and legacy Qwen3-Next (``ssm_in`` with the per-group q|k|v|z interleave).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax import ops
from imp_jax.models import gdn
from imp_jax.models.config import GDNConfig, ModelConfig
from imp_jax.models.layers import projections
from imp_jax.ops.policy import REFERENCE

Weight = ops.Weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Recurrent:
    conv: jax.Array  # ssm_conv1d [C, K]
    dt_bias: jax.Array  # ssm_dt.bias [Hv]
    ssm_a: jax.Array  # -exp(A_log) [Hv]
    norm: jax.Array  # ssm_norm [dv], used as stored
    w_out: Weight  # ssm_out [D, Hv*dv]
    w_qkv: Weight | None = None  # attn_qkv [C, D]
    w_z: Weight | None = None  # attn_gate [Hv*dv, D]
    w_alpha: Weight | None = None  # ssm_alpha [Hv, D]
    w_beta: Weight | None = None  # ssm_beta [Hv, D]
    w_ba: Weight | None = None  # ssm_ba [2Hv, D], per key group [b (rf) | a (rf)]
    w_in: Weight | None = None  # legacy ssm_in [2Hk*dk + 2Hv*dv, D], per key group [q | k | v | z]
    w_qkvz: Weight | None = None  # w_qkv and w_z fused where stored alike (weights.fusion.fuse): [C + Hv*dv, D]
    w_alpha_beta: Weight | None = None  # w_alpha and w_beta fused likewise: [2Hv, D]


def _projections(p: Recurrent, g: GDNConfig, x: jax.Array, kernels: ops.KernelPolicy, tp: int):
    """mixed_qkv [B, T, C] (conv channel order), z [B, T, Hv, dv], a and b [B, T, Hv]."""
    b, t, _ = x.shape
    hk, hv, dk, dv = g.n_k_heads, g.n_v_heads, g.head_k_dim, g.head_v_dim
    rf = hv // hk
    if p.w_in is not None:
        per_group = ops.matmul(x, p.w_in, kernels=kernels).reshape(b, t, hk, 2 * dk + 2 * rf * dv)
        q, k = per_group[..., :dk], per_group[..., dk : 2 * dk]
        v, z = per_group[..., 2 * dk : 2 * dk + rf * dv], per_group[..., 2 * dk + rf * dv :]
        mixed = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)
        z = z.reshape(b, t, hv, dv)
    else:
        mixed, z = projections(x, p.w_qkvz, (p.w_qkv, p.w_z), (g.conv_channels, hv * dv), kernels=kernels, tp=tp)
        z = z.reshape(b, t, hv, dv)
    if p.w_ba is not None:
        ba = ops.matmul(x, p.w_ba, jnp.float32, kernels=kernels).reshape(b, t, hk, 2 * rf)
        beta_in, alpha_in = ba[..., :rf].reshape(b, t, hv), ba[..., rf:].reshape(b, t, hv)
    else:
        alpha_in, beta_in = projections(
            x, p.w_alpha_beta, (p.w_alpha, p.w_beta), out_dtype=jnp.float32, kernels=kernels, tp=tp
        )
    return mixed, z, alpha_in, beta_in


def recurrent_mixer(
    p: Recurrent,
    cfg: ModelConfig,
    x: jax.Array,
    state: tuple[jax.Array, jax.Array],
    valid_len,
    decode: bool,
    kernels: ops.KernelPolicy = REFERENCE,
):
    """x [B, T, D]; state = (conv [B, K-1, C], recurrent [B, Hv, dk, dv]) of this layer. Prefill uses the chunked
    algorithm, decode the one-step recurrence; positions past ``valid_len`` neither enter nor decay the state."""
    g = cfg.gdn
    b, t, _ = x.shape
    hk, hv, dk, dv = g.n_k_heads, g.n_v_heads, g.head_k_dim, g.head_v_dim
    mixed, z, alpha_in, beta_in = _projections(p, g, x, kernels, cfg.tp)
    conv_state, rec_state = state
    y, conv_state = gdn.causal_conv1d(mixed, p.conv, conv_state, valid_len)
    q = y[..., : hk * dk].reshape(b, t, hk, dk)
    k = y[..., hk * dk : 2 * hk * dk].reshape(b, t, hk, dk)
    v = y[..., 2 * hk * dk :].reshape(b, t, hv, dv)
    decay, beta = gdn.gdn_gates(alpha_in, beta_in, p.ssm_a, p.dt_bias)
    run = gdn.gdn_recurrent if decode else gdn.gdn_chunked
    o, rec_state = run(q, k, v, decay, beta, rec_state, tiled=g.tiled, valid_len=valid_len)
    o = gdn.gated_rms_norm(o, z, p.norm, cfg.rms_eps).astype(x.dtype).reshape(b, t, hv * dv)
    return ops.matmul(o, p.w_out, kernels=kernels), (conv_state, rec_state)
