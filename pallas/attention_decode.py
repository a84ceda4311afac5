"""Decode attention over a KV cache on Hopper (Mosaic GPU), split over the sequence, GQA, window, sinks.

q ``[B, T, n_head, hd]`` holds the T newest tokens of each sequence, already written to the cache at positions
``lengths[b] - T .. lengths[b] - 1``; ``k_cache`` / ``v_cache`` are ``[B, S_max, n_kv, hd]``. Query t of sequence
b sees cache positions ``j <= p`` with ``p = lengths[b] - T + t`` (and ``j > p - window`` with a window).

Decode is bandwidth-bound on the cache: one CTA per (batch, kv head, q tile, sequence split) streams its split's
K/V blocks through a double-buffered TMA pipeline. All ``T * n_head / n_kv`` query rows of a kv head share each
K/V block, padded to one 64-row wgmma tile (the MMA has time to spare; the bytes do not). Scores, the online
softmax and the accumulator are f32. Each split writes its unnormalized output with its running max and sum; a
small XLA combine merges the splits and adds the sinks (a learned per-head logit in the softmax denominator).

Cache entries past ``lengths`` are masked out of the softmax, but the tail block still multiplies them by zero:
they must be finite (initialize caches with zeros, never ``jnp.empty``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from imp_jax.errors import KernelError
from pallas.common import interpret_params, mma_accumulate, softmax_with_sinks_apply

ROWS = 64  # query rows per CTA: one wgmma M tile
LOG2E = math.log2(math.e)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float,
    block_kv: int = 64,
    splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of the T newest tokens over the cache; returns ``[B, T, n_head, hd]`` in q's dtype.

    With ``layer``, the caches are every layer's ``[L, B, S_max, n_kv, hd]`` and the kernel reads layer ``layer``
    in place: a slice taken outside would be copied for the kernel, the whole layer's cache every step.
    """
    b, t, n_head, hd = q.shape
    stacked = layer is not None
    _check(q, k_cache[0] if stacked else k_cache, v_cache[0] if stacked else v_cache, lengths, sinks, block_kv)
    s_max, n_kv = k_cache.shape[-3:-1]
    group = n_head // n_kv
    rows = t * group
    q_tiles = -(-rows // ROWS)
    if splits is None:  # enough CTAs for every SM, but at least 256 keys per split
        splits = max(1, min(_cdiv(s_max, 256), _cdiv(264, b * n_kv * q_tiles)))
    out_rows = _round_up(rows, 4) if q_tiles == 1 else q_tiles * ROWS  # stored rows (16-byte TMA rows)
    # Rows of a kv head's tile are (token, head-in-group) pairs, token-major.
    qg = q.reshape(b, t, n_kv, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, n_kv, rows, hd)
    qg = jnp.pad(qg.astype(jnp.bfloat16), ((0, 0), (0, 0), (0, q_tiles * ROWS - rows), (0, 0)))
    call = _kernel_call(b, n_kv, q_tiles, out_rows, splits, hd, t, group, block_kv, window, scale, stacked, interpret)
    meta = lengths.astype(jnp.int32)
    if stacked:
        meta = jnp.concatenate([meta, jnp.asarray(layer, jnp.int32).reshape(1)])
    o, m, l = call(meta, qg, k_cache.astype(jnp.bfloat16), v_cache.astype(jnp.bfloat16))
    out = _combine(o, m, l, sinks, n_kv, group)[:, :, :rows]
    return out.reshape(b, n_kv, t, group, hd).transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q, k, v, lengths, sinks, block_kv) -> None:
    ok = (
        q.ndim == 4
        and k.ndim == 4
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[3] == q.shape[3]
        and q.shape[2] % k.shape[2] == 0
        and q.shape[3] % 64 == 0
        and q.shape[3] <= 256
        and k.shape[1] % 8 == 0
        and lengths.shape == (q.shape[0],)
        and (sinks is None or sinks.shape == (q.shape[2],))
        and block_kv % 64 == 0
        and all(jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) for a in (q, k, v))
    )
    if not ok:
        raise KernelError(
            f"pallas.decode_attention: unsupported q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
            f"v {v.shape} {v.dtype}, lengths {lengths.shape}, sinks {None if sinks is None else sinks.shape} "
            f"(needs [B,T,H,hd] / [B,S,Hkv,hd] bf16 or f16, H % Hkv == 0, hd a multiple of 64 up to 256, "
            f"S a multiple of 8)"
        )


def _combine(o, m, l, sinks, n_kv, group):
    """Merge the splits' (o, max, sum) in f32 and add the sink logit of each row's head to the denominator."""
    m_tot = m.max(axis=2)  # [B, n_kv, rows]; maxima are in log2 units
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(n_kv, 1, group) * LOG2E
        rows = m.shape[-1]
        sink = jnp.tile(sink, (1, -(-rows // group), 1)).reshape(n_kv, -1)[:, :rows]
        m_tot = jnp.maximum(m_tot, sink[None])
    w = jnp.exp2(m - m_tot[:, :, None])
    num = (w[..., None] * o).sum(axis=2)
    den = (w * l).sum(axis=2)
    if sinks is not None:
        den = den + jnp.exp2(sink[None] - m_tot)
    return num / den[..., None]


def _kernel_call(b, n_kv, q_tiles, out_rows, splits, hd, t, group, block_kv, window, scale, stacked, interpret):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    qk_scale = scale * LOG2E
    inv_group = (1 << 16) // group + 1  # row // group == (row * inv_group) >> 16 for row < 2**16 / group**2
    store_rows = min(out_rows, ROWS)
    f32 = jnp.float32

    def body(len_gmem, q_gmem, k_gmem, v_gmem, o_gmem, m_gmem, l_gmem):
        bi, hi, qi, si = (lax.axis_index(a) for a in ("b", "h", "q", "s"))
        length = len_gmem[bi]
        if stacked:  # the layer index follows the B lengths
            layer = len_gmem[b]
            k_gmem, v_gmem = k_gmem.at[layer], v_gmem.at[layer]
        # Keys any row of this tile may see: [lo, length). The splits share them evenly in whole blocks, so
        # a short sequence in a long cache still spreads over all splits; this one covers [start, end).
        lo = 0 if window is None else jnp.maximum(length - t + 1 - window, 0)
        lo = (lo // block_kv) * block_kv
        chunk = ((length - lo + splits - 1) // splits + block_kv - 1) // block_kv * block_kv
        start = lo + si * chunk
        end = jnp.minimum(start + chunk, length)
        n_blocks = jnp.maximum(end - start + block_kv - 1, 0) // block_kv

        def attend(q_smem, k_smem, v_smem, q_bar, k_bars, v_bars):
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, hi, pl.ds(qi * ROWS, ROWS)], q_smem, q_bar)

            def fetch(i, slot):
                kv = (bi, pl.ds(start + i * block_kv, block_kv), hi)
                plgpu.copy_gmem_to_smem(k_gmem.at[kv], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_gmem.at[kv], v_smem.at[slot], v_bars.at[slot])

            for i in range(2):
                pl.when(i < n_blocks)(functools.partial(fetch, i, i))
            plgpu.barrier_wait(q_bar)
            row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
            col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
            q_pos = length - t + (((row + qi * ROWS) * inv_group) >> 16)  # position of each row's token

            def step(i, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(i, 2)
                plgpu.barrier_wait(k_bars.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    return acc_ref[...]

                sc = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), f32)) * qk_scale
                k_pos = start + i * block_kv + col
                visible = (k_pos <= q_pos) & (k_pos < end)
                if window is not None:
                    visible = visible & (k_pos > q_pos - window)
                sc = jnp.where(visible, sc, -jnp.inf)
                m_new = jnp.maximum(m_i, sc.max(axis=1))
                # Rows that have seen no visible key yet keep a -inf max: shift by 0 instead (their p is 0).
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_safe)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bars.at[slot])
                acc = mma_accumulate(acc, p.astype(jnp.bfloat16), v_smem.at[slot], interpret=interpret)
                pl.when(i + 2 < n_blocks)(functools.partial(fetch, i + 2, slot))
                return acc, m_new, l_i

            init = (
                plgpu.layout_cast(jnp.zeros((ROWS, hd), f32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, f32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((ROWS,), f32), plgpu.Layout.WGMMA.reduce(1)),
            )
            return lax.fori_loop(0, n_blocks, step, init)

        acc, m_i, l_i = pl.run_scoped(
            attend,
            plgpu.SMEM((ROWS, hd), jnp.bfloat16, transforms=transforms),
            plgpu.SMEM((2, block_kv, hd), jnp.bfloat16, transforms=transforms),
            plgpu.SMEM((2, block_kv, hd), jnp.bfloat16, transforms=transforms),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        )

        def store(o_smem, ml_smem):  # reuses the K/V buffers' shared memory
            o_smem[...] = acc
            ml_smem[0] = m_i
            ml_smem[1] = l_i
            plgpu.commit_smem()
            rows = pl.ds(qi * ROWS, store_rows)
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, store_rows)], o_gmem.at[bi, hi, si, rows])
            plgpu.copy_smem_to_gmem(ml_smem.at[0, pl.ds(0, store_rows)], m_gmem.at[bi, hi, si, rows])
            plgpu.copy_smem_to_gmem(ml_smem.at[1, pl.ds(0, store_rows)], l_gmem.at[bi, hi, si, rows])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((ROWS, hd), f32), plgpu.SMEM((2, ROWS), f32))

    return plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((b, n_kv, splits, out_rows, hd), f32),
            jax.ShapeDtypeStruct((b, n_kv, splits, out_rows), f32),
            jax.ShapeDtypeStruct((b, n_kv, splits, out_rows), f32),
        ),
        grid=(b, n_kv, q_tiles, splits),
        grid_names=("b", "h", "q", "s"),
        kernel_name="pallas_decode_attention",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )


def reference(q, k_cache, v_cache, lengths, *, window=None, sinks=None, scale) -> jax.Array:
    """f32 jnp decode attention with the kernel's semantics (positions from ``lengths``)."""
    t, n_head = q.shape[1:3]
    n_kv = k_cache.shape[2]
    group = n_head // n_kv
    k = jnp.repeat(k_cache.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v_cache.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale
    q_pos = lengths[:, None] - t + jnp.arange(t)[None]  # [B, T]
    k_pos = jnp.arange(k.shape[1])
    visible = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        visible = visible & (k_pos[None, None, :] > q_pos[:, :, None] - window)
    s = jnp.where(visible[:, None], s, -jnp.inf)
    return softmax_with_sinks_apply(s, v, sinks)
