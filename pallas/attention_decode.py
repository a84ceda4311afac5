"""Decode attention over a (paged) KV cache on Hopper (Mosaic GPU), split over the sequence, GQA, window, sinks.

q ``[B, T, n_head, hd]`` holds the T newest tokens of each sequence, already written to the cache at positions
``lengths[b] - T .. lengths[b] - 1``. Query t of sequence b sees cache positions ``j <= p`` with
``p = lengths[b] - T + t`` (and ``j > p - window`` with a window).

One kernel serves both cache layouts. The paged one (``paged_decode_attention``) is a pool of pages
``[n_pages, P, n_kv, hd]`` read through a page table ``[B, n_pg]``: position j of row b lives at
``pool[table[b, j // P], j % P]``. A contiguous cache ``[B, S_max, n_kv, hd]`` (``decode_attention``) is the
same pool with one page of S_max tokens per row, row b owning page b.

Decode is bandwidth-bound on the cache: one CTA per (batch, kv head, q tile, sequence split) streams its split's
K/V blocks through a double-buffered TMA pipeline. A block of ``block_kv`` keys is one TMA copy per page it
spans (``block_kv / P`` copies of P keys for small pages, one copy for pages of ``block_kv`` or more), every copy
of a block arriving on the block's barrier; the page ids are scalar loads from the table. All
``T * n_head / n_kv`` query rows of a kv head share each K/V block, padded to one 64-row wgmma tile (the MMA has
time to spare; the bytes do not). Scores, the online softmax and the accumulator are f32. Each split writes its
unnormalized output with its running max and sum; a small XLA combine merges the splits and adds the sinks (a
learned per-head logit in the softmax denominator).

Cache entries past ``lengths`` (and pages the table names past a row's length) are masked out of the softmax,
but the tail block still multiplies them by zero: they must be finite (initialize caches with zeros, never
``jnp.empty``). Page ids outside the pool read zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas.common import interpret_params, lowered_once, mma_accumulate, softmax_with_sinks_apply
from pallas.errors import KernelError

ROWS = 64  # query rows per CTA: one wgmma M tile
LOG2E = math.log2(math.e)
BLOCK_KV = 64  # keys per pipeline step


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
    block_kv: int = BLOCK_KV,
    splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of the T newest tokens over a contiguous cache ``[B, S_max, n_kv, hd]``; returns
    ``[B, T, n_head, hd]`` in q's dtype.

    With ``layer``, the caches are every layer's ``[L, B, S_max, n_kv, hd]`` and the kernel reads layer ``layer``
    in place: a slice taken outside would be copied for the kernel, the whole layer's cache every step.
    """
    _check(q, k_cache, v_cache, None, lengths, sinks, layer, block_kv, "decode_attention")
    table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]  # row b owns page b, of S_max tokens
    return _attend(q, k_cache, v_cache, table, lengths, layer, window, sinks, scale, block_kv, splits, interpret)


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float,
    block_kv: int = BLOCK_KV,
    splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of the T newest tokens over a page pool ``[n_pages, P, n_kv, hd]`` (every layer's
    ``[L, n_pages, P, n_kv, hd]`` with ``layer``, read in place) through ``page_table`` ``[B, n_pg]``.

    Keys past the table (positions >= n_pg * P) do not exist: a row longer than its table sees only the table's
    pages. ``supports_paged`` says which page sizes the kernel takes.
    """
    _check(q, k_pages, v_pages, page_table, lengths, sinks, layer, block_kv, "paged_decode_attention")
    table = page_table.astype(jnp.int32)
    return _attend(q, k_pages, v_pages, table, lengths, layer, window, sinks, scale, block_kv, splits, interpret)


def supports_paged(page_size: int, table_pages: int, head_dim: int, block_kv: int = BLOCK_KV) -> bool:
    """Whether the kernel reads pages of ``page_size`` tokens through a table of ``table_pages`` columns: a block
    of keys must be whole pages (P divides block_kv) or lie inside one page (block_kv divides P, or the row has a
    single page, the contiguous layout), and TMA copies whole 8-row tiles."""
    fits = block_kv % page_size == 0 or page_size % block_kv == 0 or table_pages == 1
    return page_size % 8 == 0 and fits and head_dim % 64 == 0 and head_dim <= 256


def _attend(q, k, v, table, lengths, layer, window, sinks, scale, block_kv, splits, interpret):
    b, t, n_head, hd = q.shape
    stacked = layer is not None
    page, n_kv = k.shape[-3:-1]
    s_max = table.shape[1] * page  # the most keys a row can have
    group = n_head // n_kv
    rows = t * group
    q_tiles = -(-rows // ROWS)
    if splits is None:  # enough CTAs for every SM, but at least 256 keys per split
        splits = max(1, min(_cdiv(s_max, 256), _cdiv(264, b * n_kv * q_tiles)))
    out_rows = _round_up(rows, 4) if q_tiles == 1 else q_tiles * ROWS  # stored rows (16-byte TMA rows)
    # Rows of a kv head's tile are (token, head-in-group) pairs, token-major.
    qg = q.reshape(b, t, n_kv, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, n_kv, rows, hd)
    qg = jnp.pad(qg.astype(jnp.bfloat16), ((0, 0), (0, 0), (0, q_tiles * ROWS - rows), (0, 0)))
    geometry = _Geometry(b, n_kv, q_tiles, out_rows, splits, hd, t, group, block_kv, page, table.shape[1])
    call = _kernel_call(geometry, window, scale, stacked, interpret)
    meta = lengths.astype(jnp.int32)
    if stacked:
        meta = jnp.concatenate([meta, jnp.asarray(layer, jnp.int32).reshape(1)])
    o, m, l = call(meta, table, qg, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    out = _combine(o, m, l, sinks, n_kv, group)[:, :, :rows]
    return out.reshape(b, n_kv, t, group, hd).transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q, k, v, table, lengths, sinks, layer, block_kv, op) -> None:
    kv_ndim = 5 if layer is not None else 4
    pool = k.shape[1:] if layer is not None else k.shape  # [pages, P, n_kv, hd]
    rows_ok = table is None and pool[0:1] == q.shape[0:1] and pool[1] % 8 == 0
    if table is not None:
        rows_ok = (
            table.ndim == 2
            and table.shape[0] == q.shape[0]
            and supports_paged(pool[1], table.shape[1], q.shape[-1], block_kv)
        )
    ok = (
        q.ndim == 4
        and k.ndim == kv_ndim
        and k.shape == v.shape
        and rows_ok
        and pool[3] == q.shape[3]
        and q.shape[2] % pool[2] == 0
        and q.shape[3] % 64 == 0
        and q.shape[3] <= 256
        and lengths.shape == (q.shape[0],)
        and (sinks is None or sinks.shape == (q.shape[2],))
        and block_kv % 64 == 0
        and all(jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) for a in (q, k, v))
    )
    if not ok:
        raise KernelError(
            f"pallas.{op}: unsupported q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape} {v.dtype}, "
            f"page table {None if table is None else table.shape}, lengths {lengths.shape}, "
            f"sinks {None if sinks is None else sinks.shape} (needs q [B,T,H,hd], caches [B,S,Hkv,hd] or pools "
            f"[pages,P,Hkv,hd] ([L,...] with layer) bf16 or f16, table [B,n_pg], H % Hkv == 0, hd a multiple of "
            f"64 up to 256, S or P a multiple of 8, P dividing {block_kv} or a multiple of it)"
        )


def _combine(o, m, l, sinks, n_kv, group):
    """Merge the splits' (o, max, sum) in f32 and add the sink logit of each row's head to the denominator.

    A row that sees no key and has no sink (a padding row) comes out 0, as in the jnp reference, not 0 / 0."""
    m_tot = m.max(axis=2)  # [B, n_kv, rows]; maxima are in log2 units
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(n_kv, 1, group) * LOG2E
        rows = m.shape[-1]
        sink = jnp.tile(sink, (1, -(-rows // group), 1)).reshape(n_kv, -1)[:, :rows]
        m_tot = jnp.maximum(m_tot, sink[None])
    m_tot = jnp.where(m_tot == -jnp.inf, 0.0, m_tot)
    w = jnp.exp2(m - m_tot[:, :, None])
    num = (w[..., None] * o).sum(axis=2)
    den = (w * l).sum(axis=2)
    if sinks is not None:
        den = den + jnp.exp2(sink[None] - m_tot)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape of one kernel launch."""

    b: int
    n_kv: int
    q_tiles: int
    out_rows: int
    splits: int
    hd: int
    t: int
    group: int
    block_kv: int
    page: int  # P, tokens per page (S_max for the contiguous layout)
    table_pages: int  # n_pg, columns of the page table


@lowered_once
def _kernel_call(g: _Geometry, window, scale, stacked, interpret):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    qk_scale = scale * LOG2E
    inv_group = (1 << 16) // g.group + 1  # row // group == (row * inv_group) >> 16 for row < 2**16 / group**2
    store_rows = min(g.out_rows, ROWS)
    block_kv, t, page = g.block_kv, g.t, g.page
    span = min(page, block_kv)  # keys per TMA copy: one page, or one block inside a page
    copies = block_kv // span  # copies per block, all arriving on the block's barrier
    f32 = jnp.float32

    def body(len_gmem, table_gmem, q_gmem, k_gmem, v_gmem, o_gmem, m_gmem, l_gmem):
        bi, hi, qi, si = (lax.axis_index(a) for a in ("b", "h", "q", "s"))
        length = len_gmem[bi]
        kv_len = jnp.minimum(length, g.table_pages * page)  # keys past the table do not exist
        if stacked:  # the layer index follows the B lengths
            layer = len_gmem[g.b]
            k_gmem, v_gmem = k_gmem.at[layer], v_gmem.at[layer]
        # Keys any row of this tile may see: [lo, kv_len). The splits share them evenly in whole blocks, so
        # a short sequence in a long cache still spreads over all splits; this one covers [start, end).
        lo = 0 if window is None else jnp.maximum(length - t + 1 - window, 0)
        lo = (lo // block_kv) * block_kv
        chunk = ((kv_len - lo + g.splits - 1) // g.splits + block_kv - 1) // block_kv * block_kv
        start = lo + si * chunk
        end = jnp.minimum(start + chunk, kv_len)
        n_blocks = jnp.maximum(end - start + block_kv - 1, 0) // block_kv

        def attend(q_smem, k_smem, v_smem, q_bar, k_bars, v_bars):
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, hi, pl.ds(qi * ROWS, ROWS)], q_smem, q_bar)

            def fetch(i, slot):
                for j in range(copies):
                    key = start + i * block_kv + j * span
                    # Columns past the table (a tail block's pages beyond the row) re-read the last one: masked.
                    page_id = table_gmem[bi, jnp.minimum(key // page, g.table_pages - 1)]
                    kv = (page_id, pl.ds(key % page, span), hi)
                    dst = pl.ds(j * span, span)
                    plgpu.copy_gmem_to_smem(k_gmem.at[kv], k_smem.at[slot, dst], k_bars.at[slot])
                    plgpu.copy_gmem_to_smem(v_gmem.at[kv], v_smem.at[slot, dst], v_bars.at[slot])

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
                plgpu.layout_cast(jnp.zeros((ROWS, g.hd), f32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, f32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((ROWS,), f32), plgpu.Layout.WGMMA.reduce(1)),
            )
            return lax.fori_loop(0, n_blocks, step, init)

        acc, m_i, l_i = pl.run_scoped(
            attend,
            plgpu.SMEM((ROWS, g.hd), jnp.bfloat16, transforms=transforms),
            plgpu.SMEM((2, block_kv, g.hd), jnp.bfloat16, transforms=transforms),
            plgpu.SMEM((2, block_kv, g.hd), jnp.bfloat16, transforms=transforms),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=copies, num_barriers=2),
            plgpu.Barrier(num_arrivals=copies, num_barriers=2),
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

        pl.run_scoped(store, plgpu.SMEM((ROWS, g.hd), f32), plgpu.SMEM((2, ROWS), f32))

    parts = (g.b, g.n_kv, g.splits, g.out_rows)
    return plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((*parts, g.hd), f32),
            jax.ShapeDtypeStruct(parts, f32),
            jax.ShapeDtypeStruct(parts, f32),
        ),
        grid=(g.b, g.n_kv, g.q_tiles, g.splits),
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


def paged_reference(q, k_pages, v_pages, page_table, lengths, *, window=None, sinks=None, scale) -> jax.Array:
    """``reference`` over each row's pages gathered into a contiguous cache of ``n_pg * P`` positions."""
    b, n_pg = page_table.shape
    k, v = (a[page_table].reshape(b, n_pg * a.shape[1], *a.shape[2:]) for a in (k_pages, v_pages))
    return reference(q, k, v, lengths, window=window, sinks=sinks, scale=scale)
