"""Flash attention for prefill on Hopper (Mosaic GPU): causal, GQA, sliding window, attention sinks.

q ``[B, T, n_head, hd]``, k/v ``[B, S, n_kv, hd]`` with S >= T: the queries are the last T positions
(``p = S - T + t``), so a prefill continuing a cached prefix works too. Causal: key j is visible iff ``j <= p``;
a window W further requires ``j > p - W`` (the W most recent positions, self included). A sink is a learned
per-head logit that joins the softmax denominator only (gpt-oss).

Per CTA: two compute warpgroups own 64 query rows each, a third warpgroup streams K/V blocks with TMA into
``stages`` shared-memory slots and reuses a slot once both compute warpgroups have released it. Scores, the online
softmax (base-2, scale folded in) and the output accumulator are f32; P is cast to bf16 for the PV wgmma. Blocks
that lie wholly inside every row's visible range skip the mask. Steps of the shared K/V stream that fall outside
one warpgroup's range (causal end, window start) are only acknowledged, keeping the barrier phases in step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas.common import interpret_params, lowered_once, mma_accumulate, softmax_with_sinks_apply
from pallas.errors import KernelError

BLOCK_Q = 64
LOG2E = math.log2(math.e)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention of q over k/v; returns ``[B, T, n_head, hd]`` in q's dtype."""
    _check(q, k, v, sinks)
    b, t, n_head, hd = q.shape
    s = k.shape[1]
    block_kv = 128 if hd <= 128 else 64
    t_pad = -(-t // (2 * BLOCK_Q)) * (2 * BLOCK_Q)
    s_pad = -(-s // block_kv) * block_kv
    qp = jnp.pad(q.astype(jnp.bfloat16), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    kp, vp = (jnp.pad(a.astype(jnp.bfloat16), ((0, 0), (0, s_pad - s), (0, 0), (0, 0))) for a in (k, v))
    sink = jnp.zeros((n_head,), jnp.float32) if sinks is None else sinks.astype(jnp.float32) * LOG2E
    call = _kernel_call(b, t, s, n_head, k.shape[2], hd, t_pad, block_kv, causal, window, sinks is not None,
                        scale, interpret)  # fmt: skip
    return call(qp, kp, vp, sink)[:, :t].astype(q.dtype)


def _check(q, k, v, sinks) -> None:
    ok = (
        q.ndim == 4
        and k.ndim == 4
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[3] == q.shape[3]
        and k.shape[1] >= q.shape[1]
        and q.shape[2] % k.shape[2] == 0
        and q.shape[3] % 64 == 0
        and q.shape[3] <= 256
        and (sinks is None or sinks.shape == (q.shape[2],))
        and all(jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) for a in (q, k, v))
    )
    if not ok:
        raise KernelError(
            f"pallas.flash_attention: unsupported q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
            f"v {v.shape} {v.dtype}, sinks {None if sinks is None else sinks.shape} (needs [B,T,H,hd] and "
            f"[B,S,Hkv,hd] bf16 or f16, S >= T, H % Hkv == 0, hd a multiple of 64 up to 256)"
        )


@lowered_once
def _kernel_call(b, t, s, n_head, n_kv, hd, t_pad, block_kv, causal, window, has_sinks, scale, interpret):
    group = n_head // n_kv
    stages = 2
    offset = s - t  # query row r sits at position offset + r
    n_kv_blocks = -(-s // block_kv)
    qk_scale = scale * LOG2E
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kv_range(row0, rows):
        """Blocks [lo, hi) holding keys visible to query rows [row0, row0 + rows), and the unmasked [f_lo, f_hi)."""
        p_min, p_max = offset + row0, offset + row0 + rows - 1
        hi = jnp.minimum(p_max // block_kv + 1, n_kv_blocks) if causal else n_kv_blocks
        lo = jnp.maximum(p_min - window + 1, 0) // block_kv if window is not None else 0
        # Full blocks: every key visible to every row, and no key past S.
        f_hi = jnp.minimum((p_min + 1) // block_kv, s // block_kv) if causal else s // block_kv
        f_lo = (p_max - window + block_kv) // block_kv if window is not None else 0
        f_lo = jnp.minimum(jnp.maximum(f_lo, lo), hi)
        f_hi = jnp.minimum(jnp.maximum(f_hi, f_lo), hi)
        return lo, hi, f_lo, f_hi

    def body(q_gmem, k_gmem, v_gmem, sink_gmem, o_gmem, scratch):
        q_smem, k_smem, v_smem, bars, *p_staging = scratch
        q_bars, k_bars, v_bars, k_free, v_free = bars
        head, qi, bi = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, jnp.array(group, head.dtype))
        cta_lo, cta_hi, _, _ = kv_range(qi * 2 * BLOCK_Q, 2 * BLOCK_Q)
        n_steps = cta_hi - cta_lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            row0 = qi * 2 * BLOCK_Q + wg * BLOCK_Q
            q_wg = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(row0, BLOCK_Q), head], q_wg, q_bars.at[wg])
            lo, hi, f_lo, f_hi = kv_range(row0, BLOCK_Q)
            rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1, layout=plgpu.Layout.WGMMA)
            q_pos = offset + row0 + rows
            plgpu.barrier_wait(q_bars.at[wg])

            def skip(i, carry):
                slot = lax.rem(i - cta_lo, stages)
                plgpu.barrier_wait(k_bars.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return carry

            def step(i, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(i - cta_lo, stages)
                plgpu.barrier_wait(k_bars.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_wg, k_smem.at[slot].T)
                    return acc_ref[...]

                sc = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                sc = sc * qk_scale
                if masked:
                    k_pos = i * block_kv + cols
                    visible = k_pos < s
                    if causal:
                        visible = visible & (k_pos <= q_pos)
                    if window is not None:
                        visible = visible & (k_pos > q_pos - window)
                    sc = jnp.where(visible, sc, -jnp.inf)
                m_new = jnp.maximum(m_i, sc.max(axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m_i - m_safe)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bars.at[slot])
                p16 = p.astype(jnp.bfloat16)
                staging = p_staging[0].at[wg] if interpret else None
                acc = mma_accumulate(acc, p16, v_smem.at[slot], interpret=interpret, staging=staging)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = (
                plgpu.layout_cast(jnp.zeros((BLOCK_Q, hd), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            )
            lax.fori_loop(cta_lo, lo, skip, None)
            carry = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), carry)
            lax.fori_loop(hi, cta_hi, skip, None)
            acc, m_i, l_i = carry
            if has_sinks:
                sink = sink_gmem[head]
                l_i = l_i + jnp.exp2(sink - jnp.where(m_i == -jnp.inf, sink, m_i))
            acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            q_wg[...] = acc.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_wg, o_gmem.at[bi, pl.ds(row0, BLOCK_Q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(i):
                slot = lax.rem(i, stages)
                kv = (bi, pl.ds((cta_lo + i) * block_kv, block_kv), kv_head)

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(k_gmem.at[kv], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_gmem.at[kv], v_smem.at[slot], v_bars.at[slot])

            pl.loop(0, n_steps)(fetch)

    scratch = (
        plgpu.SMEM((2, BLOCK_Q, hd), jnp.bfloat16, transforms=transforms),
        plgpu.SMEM((stages, block_kv, hd), jnp.bfloat16, transforms=transforms),
        plgpu.SMEM((stages, block_kv, hd), jnp.bfloat16, transforms=transforms),
        (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ),
        *([plgpu.SMEM((2, BLOCK_Q, block_kv), jnp.bfloat16)] if interpret else []),  # P for the interpreter
    )
    return plgpu.kernel(
        lambda *refs: pl.run_scoped(lambda *sc: body(*refs, sc), *scratch, collective_axes="wg"),
        out_type=jax.ShapeDtypeStruct((b, t_pad, n_head, hd), jnp.bfloat16),
        grid=(n_head, t_pad // (2 * BLOCK_Q), b),
        grid_names=("h", "q", "b"),
        num_threads=3,
        thread_name="wg",
        kernel_name="pallas_flash_attention",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )


def reference(q, k, v, *, causal=True, window=None, sinks=None, scale) -> jax.Array:
    """f32 jnp attention with the kernel's semantics (queries at the last T positions)."""
    t, s = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    sc = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * scale
    q_pos = s - t + jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    visible = jnp.ones((t, s), bool)
    if causal:
        visible = visible & (k_pos <= q_pos)
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return softmax_with_sinks_apply(jnp.where(visible, sc, -jnp.inf), vf, sinks)
