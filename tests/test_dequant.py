"""Block decoders against gguf-py's reference, bit for bit.

Blocks are built from raw bytes: random quants, and scale fields overwritten with chosen finite values (random
ones and the extremes: f16 subnormals and ±65504, E8M0 exponents at both ends, every UE4M3 code) so that the
comparison is about valid blocks. Offsets of the scale fields are written out here from ggml-common.h rather
than taken from the module under test.
"""

from __future__ import annotations

import gguf.quants as gq
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from imp_jax.errors import GGUFError, ImpError, UnsupportedModel
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import (
    SUPPORTED_QTYPES,
    dequantize,
    dequantize_rows,
    is_quantized,
    quantize,
)

T = GGMLQuantizationType

# Byte offsets of the f16 scale fields in one block.
F16_SCALES = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}
FLOATS = (T.F32, T.F16, T.BF16)
ALL = (*FLOATS, *F16_SCALES, T.MXFP4, T.NVFP4)

# ±0, smallest and largest subnormal, smallest normal, ±1, ±65504 (f16 max).
F16_EXTREMES = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF], np.uint16)
# Scale 2**(e - 128): both ends (subnormal scales at 0 and 1, 2**127 at 255), and around 1.
E8M0_EXTREMES = np.array([0, 1, 2, 3, 125, 126, 127, 128, 129, 252, 253, 254, 255], np.uint8)


def _f16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits ^ 0x4000, bits)  # exponent 31 (inf/NaN) -> finite
    extreme = rng.random(n) < 0.25
    bits[extreme] = rng.choice(F16_EXTREMES, int(extreme.sum()))
    k = min(n, len(F16_EXTREMES))
    bits[:k] = F16_EXTREMES[:k]
    return bits


def make_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """``n_blocks`` valid random blocks of ``qtype`` as uint8 ``[n_blocks, type_size]``."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALES.get(qtype, ()):
        blocks[:, offset : offset + 2] = _f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.MXFP4:
        blocks[: len(E8M0_EXTREMES), 0] = E8M0_EXTREMES
    if qtype == T.NVFP4:  # every UE4M3 byte is a valid scale; make sure all 256 codes appear
        n = min(n_blocks, 64)
        blocks[:n, :4] = np.arange(256, dtype=np.uint8).reshape(64, 4)[:n]
    return blocks


def assert_bit_exact(got, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.where(nan, 0, got.view(np.uint32)), np.where(nan, 0, want.view(np.uint32)))


def reference(raw: np.ndarray, qtype: T) -> np.ndarray:
    """gguf-py's decode; overflow to inf (MXFP4 scale 2**127) and NaN scales are part of what is compared."""
    with np.errstate(invalid="ignore", over="ignore"):
        return gq.dequantize(raw, qtype)


def _rows(rng: np.random.Generator, qtype: T, n_rows: int, blocks_per_row: int) -> tuple[np.ndarray, tuple]:
    """Packed rows ``[n_rows, row_bytes]`` and the logical shape they decode to."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = make_blocks(rng, qtype, n_rows * blocks_per_row).reshape(n_rows, blocks_per_row * type_size)
    return raw, (n_rows, blocks_per_row * block_size)


def _blocks_per_row(qtype: T) -> int:
    return 256 if qtype in FLOATS else 64


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    raw, shape = _rows(rng, qtype, 8, _blocks_per_row(qtype))
    assert_bit_exact(dequantize(raw, qtype, shape), reference(raw, qtype))


def test_float_specials_pass_through():
    specials = np.array([0x0000, 0x8000, 0x0001, 0x7C00, 0xFC00, 0x7E00, 0x7BFF], np.uint16)  # f16 bit patterns
    for qtype, raw in (
        (T.F16, specials),
        (T.BF16, specials),
        (T.F32, np.array([0, 0x80000000, 1, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF], np.uint32)),
    ):
        raw = raw.view(np.uint8).reshape(1, -1)
        assert_bit_exact(dequantize(raw, qtype, (1, 7)), gq.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.MXFP4, T.BF16], ids=lambda t: t.name)
def test_qtensor_stack_axes_eager_and_jit(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    stack, n_rows, blocks_per_row = (2, 3), 4, 2
    raw, shape = _rows(rng, qtype, int(np.prod(stack)) * n_rows, blocks_per_row)
    want = reference(raw, qtype).reshape(*stack, n_rows, shape[1])
    qt = QTensor(jnp.asarray(raw.reshape(*stack, n_rows, -1)), None, int(qtype), (n_rows, shape[1]))
    assert qt.full_shape == (*stack, n_rows, shape[1])
    assert_bit_exact(qt.dequantize(), want)
    assert_bit_exact(jax.jit(lambda w: w.dequantize())(qt), want)
    sliced = jax.lax.scan(lambda c, w: (c, w.dequantize()), 0, qt)[1]  # stacked leaves slice under scan
    assert_bit_exact(sliced, want)


def test_nvfp4_tensor_scale_applied_by_qtensor():
    rng = np.random.default_rng(7)
    raw, shape = _rows(rng, T.NVFP4, 4, 2)
    scale = np.float32(0.37)
    qt = QTensor(jnp.asarray(raw), jnp.asarray(scale), int(T.NVFP4), shape)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), gq.dequantize(raw, T.NVFP4) * scale)


def test_dequantize_rows_inside_outer_jit():
    rng = np.random.default_rng(3)
    raw, _ = _rows(rng, T.Q5_K, 6, 2)
    data = jnp.asarray(raw.reshape(2, 3, -1))
    want = reference(raw, T.Q5_K).reshape(2, 3, -1)
    assert_bit_exact(jax.jit(lambda d: dequantize_rows(d, int(T.Q5_K)) + 0.0)(data), want)
    assert_bit_exact(dequantize_rows(data, T.Q5_K), want)


def test_mxfp4_subnormal_scales_survive_flush_to_zero():
    # e = 0 and 1 scale by 2**-128 and 2**-127: the products are subnormal, which XLA:CPU would flush to zero.
    raw = np.zeros((2, 17), np.uint8)
    raw[:, 0] = [0, 1]
    raw[:, 1] = 0x91  # nibbles 1 (+0.5 in E2M1, doubled to 1) and 9 (-1)
    got = np.asarray(dequantize(raw, T.MXFP4, (2, 32)))
    assert got[0, 0] == np.float32(2.0**-128) and got[0, 16] == -np.float32(2.0**-128)
    assert got[1, 0] == np.float32(2.0**-127)
    assert_bit_exact(got, gq.dequantize(raw, T.MXFP4))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_nan_scale_gives_nan_in_both(qtype):
    """A NaN f16 scale (not a valid block) poisons its whole block in gguf-py and here alike."""
    rng = np.random.default_rng(11)
    raw = make_blocks(rng, qtype, 2)
    offset = F16_SCALES[qtype][0]
    raw[0, offset : offset + 2] = np.array([0x7E00], np.uint16).view(np.uint8)
    want = reference(raw.reshape(1, -1), qtype)
    got = np.asarray(dequantize(raw.reshape(1, -1), qtype, want.shape))
    block_size = GGML_QUANT_SIZES[qtype][0]
    assert np.isnan(want[0, :block_size]).all() and np.isnan(got[0, :block_size]).all()
    assert_bit_exact(got, want)


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K, T.IQ2_XXS, T.TQ2_0, T.I32], ids=lambda t: t.name)
def test_unsupported_type_is_named(qtype):
    with pytest.raises(UnsupportedModel, match=qtype.name):
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype, (GGML_QUANT_SIZES[qtype][0],))
    with pytest.raises(UnsupportedModel, match=qtype.name):
        dequantize_rows(jnp.zeros((1, GGML_QUANT_SIZES[qtype][1]), jnp.uint8), int(qtype))


def test_unknown_type_id_is_named():
    with pytest.raises(UnsupportedModel, match="999"):
        dequantize(np.zeros(4, np.uint8), 999, (1,))


def test_size_errors():
    raw = np.zeros(2 * 34, np.uint8)
    with pytest.raises(GGUFError, match=r"Q8_0.*68"):
        dequantize(raw, T.Q8_0, (3, 32))
    with pytest.raises(GGUFError, match="multiple of 32"):
        dequantize(raw, T.Q8_0, (2, 16))
    with pytest.raises(GGUFError, match="34"):
        dequantize_rows(jnp.zeros((2, 35), jnp.uint8), T.Q8_0)


def test_accepts_typed_file_arrays():
    """gguf.GGUFReader hands F32/F16 tensors over as typed arrays: their bytes are what counts."""
    values = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    assert_bit_exact(dequantize(values, T.F32, (3, 4)), values)
    assert_bit_exact(dequantize(values.astype(np.float16), T.F16, (3, 4)), values)


def test_supported_set_and_is_quantized():
    assert set(ALL) == SUPPORTED_QTYPES
    assert not any(is_quantized(t) for t in (T.F32, T.F16, T.BF16))
    assert all(is_quantized(t) for t in (T.Q4_0, T.Q6_K, T.MXFP4, T.NVFP4, T.Q8_1))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.MXFP4], ids=lambda t: t.name)
def test_quantize_roundtrip(qtype):
    rng = np.random.default_rng(5)
    values = rng.standard_normal((4, 256)).astype(np.float32) * np.float32(0.02)
    packed = quantize(values, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8 and packed.shape == (4, 256 // block_size * type_size)
    got = dequantize(packed, qtype, values.shape)
    assert_bit_exact(got, gq.dequantize(packed, qtype))
    # Worst-case error relative to the block's largest magnitude (plus slack for the f16 scale's rounding).
    step = {T.Q8_0: 1 / 127, T.Q4_0: 1 / 8, T.MXFP4: 1 / 4}[qtype] * 1.01
    err = np.abs(np.asarray(got) - values).reshape(4, -1, block_size)
    assert (err <= np.abs(values).reshape(err.shape).max(-1, keepdims=True) * step).all()


def test_quantize_errors():
    with pytest.raises(UnsupportedModel, match="Q4_K"):
        quantize(np.zeros((1, 256), np.float32), T.Q4_K)
    with pytest.raises(UnsupportedModel, match="multiple of 32"):
        quantize(np.zeros((1, 48), np.float32), T.Q8_0)
    with pytest.raises(ImpError):
        quantize(np.zeros((1, 256), np.float32), T.IQ2_XXS)
