"""Packed codes -> bf16 wgmma operand registers, written at the register level (``plgpu.inline_mgpu``).

Hopper has no FP4 and no 4-bit conversion instruction, and a per-element decode (widen, mask, select, convert)
costs ~10 integer ops per weight: 3x more than the integer pipes have time for while HBM streams 4-bit weights.
These decoders work on 32-bit words instead: each thread loads its 4 code bytes per row and 16-byte group in the
``WGMMA_8BIT`` layout, and one shift plus one or two masks turns a word into a pair of bf16 bit patterns
(``bf16x2``), already in the ``WGMMA`` A-operand layout thanks to the byte order ``qformats.repack`` writes:

- MXFP4: a nibble ``s e1 e0 m`` placed at bf16 bits 15 and 6..8 is the bf16 number ``e2m1 * 2**-126`` (code 1,
  the E2M1 subnormal 0.5, becomes the bf16 subnormal 2**-127, and bf16x2 multiplies keep subnormals). One
  ``mul.bf16x2`` by ``2**(E - 33)`` applies the E8M0 scale; the kernel multiplies the f32 result by 2**32. Exact
  for scale bytes E in [34, 160] (block scales 2**-93 .. 2**33), which covers any real checkpoint.
- Q4_K: ``0x4300 | q`` is the bf16 number 128 + q; subtract 128, then one ``fma.bf16x2`` by the sub-block's
  ``d * sc`` and ``-dmin * m``, precomputed as bf16 planes at repack.
- Q8_0: the int8 -> bf16 pair trick of Mosaic GPU's own ``astype`` (a ``prmt`` into 0x43xx, two masks, one
  ``sub.bf16x2``), then one ``mul.bf16x2`` by ``d``.

Scales are read per (row, block) from the shared-memory scale tiles. This code cannot run in interpret mode;
``qmatmul`` decodes with the jnp reference there, and the GPU tests check this file against the same reference.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, math, memref, vector
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas.qformats import Fmt


def scale_blocks(fmt: Fmt) -> tuple[int, ...]:
    """K elements per row of each of the format's scale planes (the order ``repack`` emits them in)."""
    return fmt.spec.blocks


def decode_tile(fmt: Fmt, qs_smem, scale_smem, tn: int, tk: int, chunk: int):
    """The ``[tn, tk]`` tile in ``qs_smem`` decoded into ``tk / chunk`` bf16 ``[tn, chunk]`` WGMMA arrays."""
    n_chunks = tk // chunk
    out_type = tuple(plgpu.ShapeDtypeStruct((tn, chunk), jnp.bfloat16, plgpu.Layout.WGMMA) for _ in range(n_chunks))

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, *(plgpu.RefType() for _ in scale_smem)),
        return_type=out_type,
    )
    def decode(_ctx, codes: fa.FragmentedArray, *scale_refs):
        if fmt is Fmt.MXFP4:
            return _decode_mxfp4(codes, scale_refs, tn, chunk, n_chunks)
        return _decode_affine(fmt, codes, scale_refs, tn, chunk, n_chunks)

    return decode(qs_smem[...], *scale_smem)


# --- MLIR helpers ----------------------------------------------------------------------------------------------


def _i32():
    return ir.IntegerType.get_signless(32)


def _bf16x2():
    return ir.VectorType.get((2,), ir.BF16Type.get())


def _const(v: int):
    return mgpu_utils.c(v, _i32())


def _words(codes: fa.FragmentedArray):
    """Yield ``(row, group, half, rt, word)`` per register: row index (index type), 16-byte group, i32 word."""
    regs = codes.registers
    for row_col, reg_idx in zip(codes.layout.thread_idxs(codes.shape), np.ndindex(regs.shape), strict=True):
        rt, group, half = reg_idx[0], reg_idx[1], reg_idx[4]
        yield row_col[0], group, half, rt, mgpu_utils.bitcast(regs[reg_idx], _i32())


def _load(ref, block: int, row):
    return memref.load(ref, [arith.constant(ir.IndexType.get(), block), row])


def _pair(bits):
    return mgpu_utils.bitcast(bits, _bf16x2())


def _assemble(pairs: dict, tn: int, chunk: int, n_chunks: int):
    """``{(rt, global 8-column group, half): bf16x2}`` -> tuple of WGMMA FragmentedArrays ``[tn, chunk]``."""
    layout = fa.WGMMA_LAYOUT
    groups = chunk // 8
    outs = []
    for j in range(n_chunks):
        regs = np.empty(layout.registers_shape((tn, chunk)), dtype=object)
        for idx in np.ndindex(regs.shape):
            regs[idx] = pairs[(idx[0], j * groups + idx[1], idx[4])]
        outs.append(fa.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None))
    return tuple(outs)


# --- per-format decoders ----------------------------------------------------------------------------------------


def _decode_mxfp4(codes, scale_refs, tn, chunk, n_chunks):
    (e_ref,) = scale_refs
    pairs = {}
    for row, group, half, rt, w in _words(codes):
        e = arith.extui(_i32(), _load(e_ref, group, row))
        s = arith.shli(arith.addi(e, _const(94)), _const(7))  # bf16 bits of 2**(E - 33)
        scale = _pair(arith.ori(s, arith.shli(s, _const(16))))
        for g in range(4):
            t = arith.shrui(w, _const(4 * g)) if g else w
            sign = arith.andi(arith.shli(t, _const(12)), _const(0x80008000))
            mag = arith.andi(arith.shli(t, _const(6)), _const(0x01C001C0))
            pairs[(rt, 4 * group + g, half)] = arith.mulf(_pair(arith.ori(sign, mag)), scale)
    return _assemble(pairs, tn, chunk, n_chunks)


def _decode_affine(fmt: Fmt, codes, scale_refs, tn, chunk, n_chunks):
    """Every format but MXFP4: ``(code - bias) * scale (+ offset)`` per pair, with the block's bf16 scale (and
    offset) loaded once per (row, 16-byte group) and splat into a pair: no conversion, no scale arithmetic.

    4-bit codes: ``0x4300 | q`` is the bf16 number 128 + q; subtracting ``128 + bias`` gives ``q - bias``.
    8-bit codes: the int8 -> bf16 pair trick of Mosaic GPU's own ``astype`` (a ``prmt`` into 0x43xx, two masks,
    one ``sub.bf16x2``). Then one ``mul.bf16x2`` by the scale, or one ``fma.bf16x2`` with the offset.
    """
    spec = fmt.spec
    per_group = 128 // spec.bits  # elements per 16-byte group of codes
    magic = _pair(_const(0x43004300 + spec.bias * 0x10001))

    def values(w):
        if spec.bits == 4:
            for g in range(4):
                t = arith.shrui(w, _const(4 * g)) if g else w
                yield g, arith.subf(_pair(arith.ori(arith.andi(t, _const(0x000F000F)), _const(0x43004300))), magic)
            return
        for p, sel in enumerate((0x4140, 0x4342)):
            s0 = mgpu_utils.prmt(w, _const(0x43), _const(sel))
            low = arith.andi(s0, _const(0xFF7FFF7F))
            high = arith.andi(s0, _const(0xFF80FF80))
            yield p, arith.subf(_pair(low), _pair(high))

    pairs = {}
    for row, group, half, rt, w in _words(codes):
        block = group * per_group // spec.block
        scale2, *offset2 = (vector.broadcast(_bf16x2(), _load(ref, block, row)) for ref in scale_refs)
        for j, q in values(w):
            key = (rt, group * per_group // 8 + j, half)
            pairs[key] = math.fma(q, scale2, offset2[0]) if offset2 else arith.mulf(q, scale2)
    return _assemble(pairs, tn, chunk, n_chunks)
