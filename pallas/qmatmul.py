"""Quantized (or bf16) weight x bf16 activation matmul (y = x @ W.T) on Hopper, Mosaic GPU.

One kernel serves decode (1..16 tokens) and prefill: the *weights* sit in the wgmma M slot ("swap AB"). Each
warpgroup decodes a ``[tn, 64]`` slice of W from its packed bytes straight into wgmma A-operand registers (integer
shifts and masks, no FP4 hardware needed, see ``mgpu_decode.py``; a bf16 weight is read by the MMA from shared
memory as it arrives) and multiplies it with the activations' tile
``x[tm, 64]`` read transposed from shared memory, accumulating ``acc[tn, tm] = W x^T`` in f32. For decode tm is
the token count rounded up to 8, so no MMA work is wasted on padding to 64 rows, and the grid is split over K
(``splits``) to put every SM to work streaming bytes; the f32 partial sums are added by XLA. TMA streams the
code, scale and activation tiles through ``stages`` shared-memory buffers (``plgpu.emit_pipeline``).

The kernel writes ``y^T`` (``[N, M]``); the wrapper transposes, sums the splits and casts in one XLA fusion.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas.mgpu_decode as mgpu_decode
from pallas.common import interpret_params, lowered_once, wgmma_from_regs
from pallas.errors import KernelError
from pallas.qformats import Fmt, PackedWeight, check_shape, decode_values, unpack_codes

CHUNK = 64  # K elements per wgmma: one 128-byte swizzled row of bf16 activations
SMEM_BUDGET = 192 * 1024  # decode's pipeline buffers; the H100 gives a CTA 227 KiB, the output tile takes the rest
SMEM_LIMIT = 227 * 1024 - 1024  # every pipeline buffer of a prefill tile (its output tile reuses them), less barriers


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tiling of one call: W rows per CTA, tokens per CTA, K per pipeline step, K splits, buffers."""

    tn: int
    tm: int
    tk: int
    splits: int = 1
    stages: int = 3


def pick_config(fmt: Fmt, n_pad: int, k_pad: int, m: int, num_sms: int = 132, groups: int = 1) -> MatmulConfig:
    """Tilings chosen on an H100 (``benchmarks/kernels.py --only tune``, see pallas/NOTES.md).

    Decode: 64 W rows per CTA and the K range split in 4 or more (short K ranges per CTA beat a tail wave of
    long ones); with ``groups`` of rows on different experts there are already that many times more CTAs, so
    the K split only tops the grid up to one CTA per SM. Prefill: 64 W rows x 128 tokens x 256 K per step, 3
    buffers (8-bit codes 128 x 64 x 256);
    bf16 weights (nothing to decode) take the classic 128 x 128 x 64 tile, 4 buffers. bf16 decode steps
    over 256 K (32 KiB of weights a buffer) so that 5 buffers stay in flight.
    """
    if m > 64:
        if fmt is Fmt.BF16:
            return MatmulConfig(tn=128, tm=128, tk=64, stages=4)
        narrow = MatmulConfig(tn=64, tm=128, tk=256, stages=3)
        if fmt.bits < 8 and narrow.stages * stage_bytes(fmt, narrow) <= SMEM_LIMIT:
            return narrow
        return MatmulConfig(tn=128, tm=64, tk=256, stages=3)  # 8-bit codes; and 5/6-bit with 16-wide planes
    n_tiles = n_pad // 64 * groups
    tm = _round_up(max(m, 1), 8)
    tk = 512 if n_tiles > 64 and k_pad % 512 == 0 and tm <= 16 and fmt is not Fmt.BF16 else 256
    k_steps = k_pad // tk
    want = max(4 if groups == 1 else 1, -(-num_sms // n_tiles))  # a CTA for every SM
    splits = max(d for d in range(1, k_steps + 1) if k_steps % d == 0 and d <= want)
    per_stage = stage_bytes(fmt, MatmulConfig(tn=64, tm=tm, tk=tk))
    stages = max(2, min(6 if tk == 256 else 4, SMEM_BUDGET // per_stage))
    return MatmulConfig(tn=64, tm=tm, tk=tk, splits=splits, stages=stages)


def stage_bytes(fmt: Fmt, cfg: MatmulConfig) -> int:
    """Shared memory of one pipeline buffer: one K step's codes, scale planes and activations."""
    spec = fmt.spec
    planes = sum(cfg.tk // b * cfg.tn * jnp.dtype(dt).itemsize for b, dt in zip(spec.blocks, spec.dtypes, strict=True))
    return cfg.tn * cfg.tk * fmt.bits // 8 + planes + cfg.tm * cfg.tk * 2


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def supports(w: object, x: object, expert_ids: object = None) -> bool:
    """Whether ``quantized_matmul(x, w, expert_ids=...)`` runs: a PackedWeight, bf16/f16/f32 x whose last axis is
    K; for a stack of experts [E, N, K], x [G, R, K] and one int32 expert id per group [G]."""
    if not (
        isinstance(w, PackedWeight)
        and hasattr(x, "shape")
        and hasattr(x, "dtype")
        and len(x.shape) >= 1
        and x.shape[-1] == w.shape[1]
        and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
    ):
        return False
    if not w.stack_shape:
        return expert_ids is None
    return (
        len(w.stack_shape) == 1
        and len(x.shape) == 3
        and getattr(expert_ids, "shape", None) == tuple(x.shape[:1])
        and jnp.issubdtype(expert_ids.dtype, jnp.integer)
    )


def quantized_matmul(
    x: jax.Array,
    w: PackedWeight,
    *,
    expert_ids: jax.Array | None = None,
    interpret: bool = False,
    config: MatmulConfig | None = None,
) -> jax.Array:
    """``x @ W.T`` for x ``[..., K]`` and a PackedWeight ``[N, K]``; bf16 operands, f32 accumulation.

    With a stack of experts W ``[E, N, K]``, x ``[G, R, K]`` holds G groups of R rows and ``expert_ids`` ``[G]``
    names each group's expert: group g gives ``x[g] @ W[expert_ids[g]].T``. The kernel reads only those experts'
    tiles (MoE decode: one group per routed row; prefill: one per tile of rows sorted by expert).

    Returns ``[..., N]`` in x's dtype. Raises KernelError naming shapes and dtypes when it cannot run.
    """
    if not supports(w, x, expert_ids):
        raise KernelError(
            f"pallas.quantized_matmul: cannot run x {getattr(x, 'shape', '?')} {getattr(x, 'dtype', '?')} "
            f"with weight {type(w).__name__} {getattr(w, 'stack_shape', '')}{getattr(w, 'shape', '?')} and expert "
            f"ids {getattr(expert_ids, 'shape', None)} (needs a PackedWeight from pallas.repack and x[..., K] in "
            f"bf16/f16/f32; a stack of experts [E, N, K] takes x [G, R, K] and integer ids [G])"
        )
    check_shape(w)
    n, k = w.shape
    n_pad, k_pad = w.padded_shape
    lead = x.shape[:-1]
    groups = x.shape[0] if w.stack_shape else 1
    x3 = x.reshape(groups, -1, k)
    m = x3.shape[1]
    cfg = config or pick_config(w.fmt, n_pad, k_pad, m, groups=groups)
    _check_config(cfg, w, m)
    m_pad = _round_up(m, cfg.tm)
    if w.stack_shape or interpret:  # whole tiles per group (and the interpreter slices like jnp)
        xp = jnp.pad(x3.astype(jnp.bfloat16), ((0, 0), (0, m_pad - m), (0, k_pad - k)))
    else:  # TMA zero-fills the last tile's rows past m (out-of-bounds reads), but its (8, 64) tiling of x needs
        # M below 8 or a multiple of it: only M > 8 off that grid pads (to 8 rows, not to the tile)
        m_tma = m if m < 8 else _round_up(m, 8)
        pad = ((0, 0), (0, m_tma - m), (0, k_pad - k))
        xp = jnp.pad(x3.astype(jnp.bfloat16), pad) if (m_tma, k_pad) != (m, k) else x3
    xp = xp.reshape(-1, k_pad).astype(jnp.bfloat16)
    call = _kernel_call(w.fmt, n_pad, k_pad, groups * m_pad, cfg, interpret, m_pad // cfg.tm if w.stack_shape else 0)
    ids = () if expert_ids is None else (expert_ids.astype(jnp.int32),)
    out = call(*ids, w.qs, *w.scales, xp)
    y = out.sum(axis=0, dtype=jnp.float32) if cfg.splits > 1 else out[0]
    y = y[:n].reshape(n, groups, m_pad)[:, :, :m].transpose(1, 2, 0)
    return y.astype(x.dtype).reshape(*lead, n)


def _check_config(cfg: MatmulConfig, w: PackedWeight, m: int) -> None:
    n_pad, k_pad = w.padded_shape
    bad = (
        cfg.tn % 64
        or n_pad % cfg.tn
        or cfg.tm % 8
        or not 8 <= cfg.tm <= 256
        or cfg.tk % max((CHUNK, *mgpu_decode.scale_blocks(w.fmt)))
        or k_pad % cfg.tk
        or k_pad % (cfg.tk * cfg.splits)
        or (cfg.tk * w.fmt.bits // 8) % 32
        or cfg.stages < 2
    )
    if bad:
        raise KernelError(f"pallas.quantized_matmul: config {cfg} does not tile W {w.padded_shape} x M={m}")


@lowered_once
def _kernel_call(
    fmt: Fmt, n_pad: int, k_pad: int, m_pad: int, cfg: MatmulConfig, interpret: bool, tiles_per_expert: int = 0
):
    """The kernel for W ``[n_pad, k_pad]`` times x ``[m_pad, k_pad]``. With ``tiles_per_expert`` > 0, W is a stack
    of experts and the kernel's first operand is the expert id of each run of that many consecutive x tiles."""
    tn, tm, tk, splits = cfg.tn, cfg.tm, cfg.tk, cfg.splits
    tkb = tk * fmt.bits // 8
    qs_swizzle = next(sw for sw in (128, 64, 32) if tkb % sw == 0)  # bytes of codes per swizzled tile row
    qs_item = 2 if fmt is Fmt.BF16 else 1  # bytes per element of the qs array
    k_steps = k_pad // tk // splits
    out_dtype = jnp.float32 if splits > 1 else jnp.bfloat16
    scale_rows = [tk // b for b in mgpu_decode.scale_blocks(fmt)]

    def body(*refs):
        *w_gmem, x_gmem, out_gmem = refs
        ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
        if tiles_per_expert:
            ids_gmem, *w_gmem = w_gmem
            expert = ids_gmem[mi // tiles_per_expert]
            w_gmem = [ref.at[expert] for ref in w_gmem]
        qs_gmem, *scale_gmem = w_gmem
        k0 = si * k_steps

        def compute(acc_ref):
            def step(_, qs_smem, *smem):
                *scale_smem, x_smem = smem
                if fmt is Fmt.BF16:  # the A operand straight from shared memory
                    chunks = [qs_smem.at[:, pl.ds(j * CHUNK, CHUNK)] for j in range(tk // CHUNK)]
                    mma = plgpu.wgmma
                else:  # decoded into registers
                    chunks = _decode(fmt, qs_smem, scale_smem, tn, tk, interpret)
                    mma = functools.partial(wgmma_from_regs, interpret=interpret)
                for j, w_chunk in enumerate(chunks):
                    mma(acc_ref, w_chunk, x_smem.at[:, pl.ds(j * CHUNK, CHUNK)].T)
                    plgpu.wgmma_wait(1)
                # The next step decodes into the registers of this step's operands (same loop body), and the
                # pipeline refills this step's x slot: no wgmma may still be reading either.
                plgpu.wgmma_wait(0)

            in_specs = [
                plgpu.BlockSpec(
                    (tn, tkb // qs_item),
                    lambda k: (ni, k0 + k),
                    transforms=(
                        plgpu.TilingTransform((8, qs_swizzle // qs_item)),
                        plgpu.SwizzleTransform(qs_swizzle),
                    ),
                ),
                *(plgpu.BlockSpec((rows, tn), lambda k: (k0 + k, ni)) for rows in scale_rows),
                plgpu.BlockSpec(
                    (tm, tk),
                    lambda k: (mi, k0 + k),
                    transforms=(plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128)),
                ),
            ]
            plgpu.emit_pipeline(
                step, grid=(k_steps,), in_specs=in_specs, max_concurrent_steps=min(cfg.stages, k_steps)
            )(qs_gmem, *scale_gmem, x_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(compute, plgpu.ACC((tn, tm), jnp.float32))
        if fmt.out_scale != 1.0:
            acc = acc * fmt.out_scale

        def store(o_smem):
            o_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[si, pl.ds(ni * tn, tn), pl.ds(mi * tm, tm)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((tn, tm), out_dtype))

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((splits, n_pad, m_pad), out_dtype),
        grid=(n_pad // tn, m_pad // tm, splits),
        grid_names=("n", "m", "s"),
        kernel_name=f"pallas_qmatmul_{fmt.name.lower()}",
        interpret=interpret_params(interpret),
    )


def _decode(fmt: Fmt, qs_smem, scale_smem, tn: int, tk: int, interpret: bool):
    """This step's W tile as ``tk / 64`` bf16 ``[tn, 64]`` chunks in wgmma A-operand registers."""
    if not interpret:
        return mgpu_decode.decode_tile(fmt, qs_smem, scale_smem, tn, tk, CHUNK)
    # Interpret mode cannot run inline Mosaic GPU code: decode with the format's jnp reference instead.
    codes = unpack_codes(qs_smem[...], fmt)
    scales = tuple(s[...].T for s in scale_smem)
    w = decode_values(codes, scales, fmt).astype(jnp.bfloat16)
    return [w[:, j * CHUNK : (j + 1) * CHUNK] for j in range(tk // CHUNK)]
