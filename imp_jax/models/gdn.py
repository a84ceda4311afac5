"""Gated DeltaNet, the linear-attention mixer of Qwen3-Next and Qwen3.5, as pure functions.

Everything follows the project's gdn_spec.md §3 (verified against transformers in float64) and the
llama.cpp GGUF layouts of §6: ``ssm_conv1d.weight`` as ``[C, K]``, ``ssm_a`` already ``-exp(A_log)``,
``ssm_norm`` used as stored (no +1). The order of operations is the projection's (§3.1 is the caller's job):

    mixed_qkv --causal_conv1d--> q|k|v      a, b --gdn_gates--> g, beta
    q, k, v, g, beta --gdn_chunked (prefill) / gdn_recurrent (decode)--> o --gated_rms_norm(o, z)--> out_proj

Shapes use B = batch, T = time, Hk / Hv = key / value heads, dk / dv = head dims, C = conv channels,
K = conv kernel. All arithmetic is f32 whatever the input dtype (DESIGN rule 2): the decay, the state and the
scan output are where half precision breaks (spec P8, P10), and the GDN matmuls ask for HIGHEST precision so
that GPUs do not silently drop to TF32 inside the recurrence.

Padding: every sequence function takes ``valid_len`` (an int or ``[B]`` ints). Positions ``t >= valid_len`` are
right padding: they do not enter the conv state and neither decay nor update the recurrent state (g = 0,
beta = 0 and q = k = v = 0 there, spec §3.8), and their outputs are zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from imp_jax.errors import UnsupportedModel

L2_EPS = 1e-6
"""Inside the sqrt of the q/k L2 norm: transformers/FLA's ``x * rsqrt(sum(x^2) + eps)`` (spec §3.3, P4)."""

SOFTPLUS_THRESHOLD = 20.0
"""torch's softplus is the identity above this; matched so that g agrees with transformers."""

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def causal_conv1d(
    x: jax.Array, weight: jax.Array, conv_state: jax.Array, valid_len: jax.Array | int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv over time followed by SiLU on all channels (spec §3.2), prefill or decode.

    x ``[B, T, C]``; weight ``[C, K]`` (GGUF ``ssm_conv1d.weight``, ne ``[K, C]``; column K-1 multiplies the
    current token); conv_state ``[B, K-1, C]``, the inputs before x. Returns y ``[B, T, C]`` f32 and the new
    state ``[B, K-1, C]`` in conv_state's dtype: the last K-1 valid inputs of ``[conv_state; x]``, so a
    sequence shorter than K-1 keeps part of the old state (zeros from ``init_state``).
    """
    b, t, _ = x.shape
    k = weight.shape[1]
    xp = jnp.concatenate([conv_state.astype(_F32), x.astype(_F32)], axis=1)
    w = weight.astype(_F32)
    y = sum(xp[:, i : i + t] * w[:, i] for i in range(k))
    if valid_len is None:
        new_state = xp[:, t:]
    else:
        starts = _per_row(valid_len, b)
        new_state = jax.vmap(lambda row, s: lax.dynamic_slice_in_dim(row, s, k - 1, axis=0))(xp, starts)
    return jax.nn.silu(y), new_state.astype(conv_state.dtype)


def gdn_gates(a: jax.Array, b: jax.Array, ssm_a: jax.Array, dt_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-space decay g and write strength beta from the per-token alpha/beta projections (spec §3.3).

    a, b ``[..., Hv]`` (the ``ssm_alpha`` / ``ssm_beta`` outputs, or the ``ssm_ba`` halves); ssm_a, dt_bias
    ``[Hv]`` as stored in GGUF (``ssm_a = -exp(A_log)``, ``ssm_dt.bias``). Returns g ``= ssm_a *
    softplus(a + dt_bias) <= 0`` and beta ``= sigmoid(b)``, both f32 ``[..., Hv]``. No clamps beyond torch's
    softplus threshold (imp's decay floor and beta clamp would break parity, spec P11).
    """
    x = a.astype(_F32) + dt_bias.astype(_F32)
    softplus = jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))
    return ssm_a.astype(_F32) * softplus, jax.nn.sigmoid(b.astype(_F32))


def gated_rms_norm(x: jax.Array, z: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Per-head RMSNorm over the last axis, times weight, times silu(z) (spec §3.7); norm before gate.

    x, z ``[..., dv]``; weight ``[dv]`` = GGUF ``ssm_norm.weight`` used as stored (it is never +1-folded);
    eps = rms_norm_eps. Returns f32 ``[..., dv]``; the caller casts before ``ssm_out``.
    """
    x = x.astype(_F32)
    normed = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed * weight.astype(_F32) * jax.nn.silu(z.astype(_F32))


def gdn_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    tiled: bool,
    valid_len: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule one token at a time (spec §3.5): the decode path and the reference for prefill.

    q, k ``[B, T, Hk, dk]`` and v ``[B, T, Hv, dv]`` are the post-conv activations (L2-normalised and scaled
    here); g, beta ``[B, T, Hv]`` from ``gdn_gates``; state ``[B, Hv, dk, dv]``. ``tiled`` picks the key head
    of value head j: ``j % Hk`` for qwen35* GGUFs (tiled V heads), ``j // (Hv/Hk)`` for qwen3next (grouped,
    transformers' order), spec §3.4. Per step: S <- e^g S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q.
    Returns o ``[B, T, Hv, dv]`` f32 and the state after the last valid token, f32.
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, tiled=tiled, valid_len=valid_len)

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs
        s = s * jnp.exp(g_t)[..., None, None]
        u = b_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=_HIGHEST))
        s = s + k_t[..., :, None] * u[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=_HIGHEST)

    time_major = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    state, o = lax.scan(step, state.astype(_F32), time_major)
    return jnp.moveaxis(o, 0, 1), state


def gdn_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    tiled: bool,
    valid_len: jax.Array | int | None = None,
    chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The same recurrence in chunks (WY / UT transform, spec §3.6): the prefill path.

    Arguments, returns and ``tiled`` as ``gdn_recurrent``; equal to it up to f32 rounding. ``chunk`` is a power
    of two; short sequences use the smallest power of two >= T instead, and T is padded up to a multiple of it
    with inert rows (g = beta = 0). Everything that does not depend on the incoming state (cumulative decays,
    the unit-lower-triangular inverse, the masked q k^T) is computed for all chunks at once, as FLA and
    transformers do; ``lax.scan`` carries only the state from chunk to chunk. Every exponent is a difference
    gamma_t - gamma_j (j <= t) of a chunk-local cumsum of g <= 0, masked *before* exp, so it is <= 0 and strong
    decays underflow to 0 instead of overflowing.
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"gdn_chunked: chunk must be a power of two, got {chunk}")
    q, k, v, g, beta = _prepare(q, k, v, g, beta, tiled=tiled, valid_len=valid_len)
    b, t, h, _ = q.shape
    c = min(chunk, 1 << (t - 1).bit_length())
    n = -(-t // c)

    def split(x):  # [B, T, Hv, ...] -> [B, Hv, N, c, ...]
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 3, 1)

    q, k, v, g, beta = (split(a) for a in (q, k, v, g, beta))
    gamma = jnp.cumsum(g, axis=-1)
    causal = jnp.tril(jnp.ones((c, c), bool))
    decay = jnp.exp(jnp.where(causal, gamma[..., :, None] - gamma[..., None, :], -jnp.inf))
    kk = jnp.einsum("...td,...sd->...ts", k, k, precision=_HIGHEST)
    strict = beta[..., :, None] * kk * decay * (1.0 - jnp.eye(c, dtype=_F32))
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(gamma))[..., None] * k], axis=-1)
    solved = jnp.matmul(_unit_lower_inverse(strict), rhs, precision=_HIGHEST)
    dv = v.shape[-1]
    u_tilde, w = solved[..., :dv], solved[..., dv:]
    qk = jnp.einsum("...td,...sd->...ts", q, k, precision=_HIGHEST) * decay
    q_decayed = jnp.exp(gamma)[..., None] * q
    k_decayed = jnp.exp(gamma[..., -1:] - gamma)[..., None] * k
    chunk_decay = jnp.exp(gamma[..., -1])[..., None, None]

    def step(s, xs):
        u_tilde, w, qk, q_decayed, k_decayed, chunk_decay = xs
        u = u_tilde - jnp.einsum("bhtk,bhkv->bhtv", w, s, precision=_HIGHEST)
        o = jnp.einsum("bhtk,bhkv->bhtv", q_decayed, s, precision=_HIGHEST)
        o = o + jnp.einsum("bhts,bhsv->bhtv", qk, u, precision=_HIGHEST)
        s = chunk_decay * s + jnp.einsum("bhtk,bhtv->bhkv", k_decayed, u, precision=_HIGHEST)
        return s, o

    chunk_major = tuple(jnp.moveaxis(a, 2, 0) for a in (u_tilde, w, qk, q_decayed, k_decayed, chunk_decay))
    state, o = lax.scan(step, state.astype(_F32), chunk_major)
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(b, n * c, h, dv)
    return o[:, :t], state


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., c, c]``, c a power of two.

    Recursive 2x2 block inversion from 1x1 blocks up: with ``inv`` the block-diagonal inverse at block size s,
    [[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]] is ``inv - inv @ Y_s @ inv`` where ``Y_s`` keeps only
    the Y blocks of ``a`` (a static mask), so log2(c) rounds of two matmuls. This is forward substitution by
    blocks, as accurate as a triangular solve, with no LAPACK/cuBLAS call. Measured for the whole chunked pass
    at T = 4096, Hv = 32, dk = dv = 128 on an H100: 3.5 ms, vs 3.4 ms with cuBLAS trsm and 2.8 ms with a
    recursion on the s x s blocks themselves, which took 4-6x longer to compile on CPU; there LAPACK's trsm
    under OpenBLAS threading ran 100x slower than these matmuls. The shorter nilpotent product
    (I - a)(I + a^2)(I + a^4)... of the spec is *not* usable: with correlated keys (a near 1 below the
    diagonal) its powers grow like 64^31/31! and its f32 error was 1e11.
    """
    c = a.shape[-1]
    row, col = np.arange(c)[:, None], np.arange(c)[None, :]
    inv = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape)
    s = 1
    while s < c:
        lower_blocks = (row // (2 * s) == col // (2 * s)) & (row // s % 2 == 1) & (col // s % 2 == 0)
        y = jnp.where(lower_blocks, a, 0.0)
        inv = inv - jnp.matmul(jnp.matmul(inv, y, precision=_HIGHEST), inv, precision=_HIGHEST)
        s *= 2
    return inv


def _prepare(q, k, v, g, beta, *, tiled: bool, valid_len):
    """f32, padding zeroed, q/k L2-normalised (q also scaled by dk^-1/2) and widened to the Hv value heads."""
    q, k, v, g, beta = (a.astype(_F32) for a in (q, k, v, g, beta))
    if valid_len is not None:
        b, t = g.shape[:2]
        valid = jnp.arange(t)[None, :] < _per_row(valid_len, b)[:, None]
        q, k, v, g, beta = (jnp.where(valid.reshape(b, t, *([1] * (a.ndim - 2))), a, 0.0) for a in (q, k, v, g, beta))
    n_v = v.shape[2]
    q = _l2_normalize(q) * q.shape[-1] ** -0.5
    k = _l2_normalize(k)
    return _widen_heads(q, n_v, tiled), _widen_heads(k, n_v, tiled), v, g, beta


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def _widen_heads(x: jax.Array, n_v: int, tiled: bool) -> jax.Array:
    """``[B, T, Hk, d] -> [B, T, Hv, d]``: tiled repeats the Hk heads as a block, grouped repeats each head."""
    n_k = x.shape[2]
    if n_v % n_k:
        raise UnsupportedModel(f"GDN value heads ({n_v}) must be a multiple of key heads ({n_k})")
    rf = n_v // n_k
    return jnp.tile(x, (1, 1, rf, 1)) if tiled else jnp.repeat(x, rf, axis=2)


def _per_row(valid_len: jax.Array | int, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(valid_len, jnp.int32), (batch,))
