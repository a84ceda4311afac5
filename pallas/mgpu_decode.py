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
- Q5_K and Q6_K (5 and 6 bits): the Q4_K nibble decode, with the code's high bits ORed in beside the nibble from
  a second word (one shift and one mask per pair, ``qformats._pack_split``): 6 and 7 bits a weight instead of 8.

Scales are read per (row, block) from the shared-memory scale tiles. This code cannot run in interpret mode;
``qmatmul`` decodes with the jnp reference there, and the GPU tests check this file against the same reference
(on the CPU, ``tests/test_mgpu_decode_emulated.py`` runs it with its MLIR ops emulated).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, math, memref, vector
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas.qformats import IQ4_VALUES, Fmt


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
    offset) loaded once per (row, block) and splat into a pair: no conversion, no scale arithmetic.

    Unsigned codes (4, 5, 6 bits): ``0x4300 | code`` is the bf16 number 128 + code (exact below 128);
    subtracting ``128 + bias`` gives ``code - bias``. 8-bit codes: the int8 -> bf16 pair trick of Mosaic GPU's own
    ``astype`` (a ``prmt`` into 0x43xx, two masks, one ``sub.bf16x2``). Then one ``mul.bf16x2`` by the scale, or
    one ``fma.bf16x2`` with the offset.
    """
    spec = fmt.spec
    planes = {}
    pairs = {}
    for key, row, q in _code_pairs(spec, codes):
        at = (key[0], key[2], key[1] * 8 // spec.block)  # (rt, half, block): one row's block
        if at not in planes:
            planes[at] = [vector.broadcast(_bf16x2(), _load(ref, at[2], row)) for ref in scale_refs]
        scale2, *offset2 = planes[at]
        pairs[key] = math.fma(q, scale2, offset2[0]) if offset2 else arith.mulf(q, scale2)
    return _assemble(pairs, tn, chunk, n_chunks)


def _code_pairs(spec, codes):
    """Yield ``((rt, global 8-column group, half), row, bf16x2 of code - bias)`` for every pair a thread holds."""
    if spec.bits == 8:
        for row, group, half, rt, w in _words(codes):
            for p, q in enumerate(_int8_pairs(w)):
                yield (rt, 2 * group + p, half), row, q
        return
    if spec.codebook:  # each 16-bit half of the word selects its 4 int8 values from the 16-byte table
        table_bytes = bytes(v & 0xFF for v in IQ4_VALUES)
        table = [_const(int.from_bytes(table_bytes[i : i + 4], "little")) for i in (0, 4, 8, 12)]
        for row, group, half, rt, w in _words(codes):
            for h, sel in enumerate((w, arith.shrui(w, _const(16)))):
                index = arith.andi(sel, _const(0x7777))  # a selector's bit 3 would replicate the sign
                upper = arith.ori(arith.shrui(arith.andi(sel, _const(0x8888)), _const(1)), _const(0x3210))
                low_half = mgpu_utils.prmt(table[0], table[1], index)
                high_half = mgpu_utils.prmt(table[2], table[3], index)
                for p, q in enumerate(_int8_pairs(mgpu_utils.prmt(low_half, high_half, upper))):
                    yield (rt, 4 * group + 2 * h + p, half), row, q
        return
    magic = _pair(_const(0x43004300 + spec.bias * 0x10001))
    high_mask = (((1 << (spec.bits - 4)) - 1) << 4) * 0x10001  # a code's high bits, above its nibble, per half

    def nibble_pairs(w, high, shift):
        """The 4 pairs of a nibble word; ``high(g)``: the pair's high bits already at bits 4.. of each half."""
        for g in range(4):
            t = arith.shrui(w, _const(4 * g)) if g else w
            bits = arith.ori(arith.andi(t, _const(0x000F000F)), _const(0x43004300))
            if high is not None:
                bits = arith.ori(bits, arith.andi(_shift(high, shift + 4 * g - 4), _const(high_mask)))
            yield g, arith.subf(_pair(bits), magic)

    if spec.bits == 4:
        for row, group, half, rt, w in _words(codes):
            for g, q in nibble_pairs(w, None, 0):
                yield (rt, 4 * group + g, half), row, q
        return
    # 5/6 bits (``qformats._pack_split``): per 256 elements, 8 nibble groups then the groups of high bits
    hb, s_count, unit = spec.bits - 4, 4 // (spec.bits - 4), 2 * spec.bits  # unit: 16-byte groups per 256
    words = {(rt, group, half): (row, w) for row, group, half, rt, w in _words(codes)}
    for (rt, group, half), (row, w) in words.items():
        u, nibble_group = divmod(group, unit)
        if nibble_group >= 8:
            continue
        h, s = divmod(nibble_group, s_count)
        high = words[(rt, u * unit + 8 + h, half)][1]
        for g, q in nibble_pairs(w, high, hb * s):
            yield (rt, 32 * u + 4 * nibble_group + g, half), row, q


def _int8_pairs(w):
    """The two bf16 pairs of a word's 4 int8 bytes (bytes 0, 1 and 2, 3): Mosaic GPU's own int8 -> bf16 trick."""
    for sel in (0x4140, 0x4342):
        s0 = mgpu_utils.prmt(w, _const(0x43), _const(sel))
        low = arith.andi(s0, _const(0xFF7FFF7F))
        high = arith.andi(s0, _const(0xFF80FF80))
        yield arith.subf(_pair(low), _pair(high))


def _shift(x, n: int):
    """``x >> n`` (logical), or ``x << -n`` for negative n."""
    if n > 0:
        return arith.shrui(x, _const(n))
    return arith.shli(x, _const(-n)) if n < 0 else x
