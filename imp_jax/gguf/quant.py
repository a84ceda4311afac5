"""GGUF block formats: decode packed blocks to f32 on any device, and encode through gguf-py.

Every decoder is bit-exact with ``gguf.quants.dequantize`` (the reference, DESIGN rule 5). That holds under
XLA's fusion (FMA contraction, reassociation) because every product these formats form is exact in f32: an f16
scale has 11 significant bits and the integer factors add at most 12 more, so only the final add of an offset
rounds, once, as in numpy. Subnormal results are the one place where XLA and numpy differ: XLA:CPU runs with
flush-to-zero, and MXFP4's smallest scales (2**-128, 2**-127) give subnormal weights, so power-of-two
scaling is done in the exponent bits (``_mul_pow2``) instead of with a float multiply.

A decoder takes uint8 ``[..., type_size]`` blocks and returns f32 ``[..., block_size]``, or, for the formats that
are a scale times an integer code (plus an offset) per sub-block, those parts (``Affine``): the CPU's native
matmul keeps the codes as int8 (``affine_rows``). Byte layouts follow
ggml (``ggml-common.h``); field offsets below are those of ``gguf.quants``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from imp_jax.errors import GGUFError, UnsupportedModel

_T = GGMLQuantizationType


# --- shared sub-steps ---------------------------------------------------------------------------------------


def _le_uint(b: jax.Array, offset: int, nbytes: int) -> jax.Array:
    """The little-endian unsigned integer of ``nbytes`` bytes at ``offset`` of each block, as ``[..., 1]``."""
    dtype = {2: jnp.uint16, 4: jnp.uint32}[nbytes]
    out = b[..., offset : offset + 1].astype(dtype)
    for i in range(1, nbytes):
        out = out | (b[..., offset + i : offset + i + 1].astype(dtype) << (8 * i))
    return out


def _f16(b: jax.Array, offset: int) -> jax.Array:
    """The f16 field at ``offset`` widened to f32, ``[..., 1]`` (exact, subnormals included)."""
    return jax.lax.bitcast_convert_type(_le_uint(b, offset, 2), jnp.float16).astype(jnp.float32)


def _unpack(x: jax.Array, width: int, *, groups: int = 1, byte_major: bool = False) -> jax.Array:
    """Split bytes ``[..., n]`` into their ``width``-bit fields (lowest first), flattened in ggml's order.

    ggml mostly stores fields plane by plane: within each of ``groups`` runs of bytes, the lowest field of
    every byte comes first, then the next field. ``byte_major`` instead keeps each byte's fields together (the
    Q5_0/Q5_1 high bits, read from a little-endian word, and the IQ4_XS scales).
    """
    shifts = jnp.arange(0, 8, width, dtype=jnp.uint8)
    fields = x[..., :, None] >> shifts if byte_major else x.reshape(*x.shape[:-1], groups, 1, -1) >> shifts[:, None]
    return (fields & ((1 << width) - 1)).reshape(*x.shape[:-1], -1)


class Affine(NamedTuple):
    """A block format decoded as ``scale * q (+ offset)`` per sub-block: scale and offset ``[..., S]``, the integer
    codes q ``[..., S * L]``. Most GGUF formats are this form; ``values`` gives the weights, and a kernel that
    keeps the codes (``affine_rows``) reads the same numbers in fewer bytes."""

    scale: jax.Array
    q: jax.Array
    offset: jax.Array | None = None

    def values(self) -> jax.Array:
        n_sub = self.scale.shape[-1]
        q = self.q.reshape(*self.q.shape[:-1], n_sub, -1).astype(jnp.float32)
        out = self.scale[..., None] * q
        if self.offset is not None:
            out = out + self.offset[..., None]
        return out.reshape(*out.shape[:-2], -1)


def _lut(table: Sequence[int], idx: jax.Array) -> jax.Array:
    """Small constant codebook lookup (IQ4_NL values, doubled E2M1)."""
    return jnp.take(jnp.asarray(table, jnp.float32), idx.astype(jnp.int32))


def _mul_pow2(x: jax.Array, n: jax.Array) -> jax.Array:
    """``x * 2**n`` formed in the exponent bits, so subnormal results survive XLA:CPU's flush-to-zero.

    ``x`` is zero or a normal f32 whose product with ``2**n`` is representable (then exact) or overflows (then
    ±inf, as the multiply gives).
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits & jnp.uint32(0x80000000)
    mant = bits & jnp.uint32(0x007FFFFF)
    exp = (bits >> 23).astype(jnp.int32) & 0xFF
    new_exp = exp + n
    normal = (new_exp.astype(jnp.uint32) << 23) | mant
    subnormal = (mant | jnp.uint32(0x00800000)) >> (1 - new_exp).astype(jnp.uint32)
    mag = jnp.where(new_exp >= 255, jnp.uint32(0x7F800000), jnp.where(new_exp >= 1, normal, subnormal))
    mag = jnp.where(exp == 0, jnp.uint32(0), mag)
    return jax.lax.bitcast_convert_type(sign | mag, jnp.float32)


def _k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K from their 12 packed bytes (``get_scale_min_k4``)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales, mins


def _e2m1_fp4(qs: jax.Array, groups: int) -> jax.Array:
    """MXFP4/NVFP4 nibbles as doubled E2M1 values (the kvalues convention; the scales carry the half)."""
    return _lut(gguf_quants.MXFP4.kvalues, _unpack(qs, 4, groups=groups))


def _int(x: jax.Array) -> jax.Array:
    return x.astype(jnp.int32)


# --- one decoder per format ---------------------------------------------------------------------------------


def _f32(b):
    return jax.lax.bitcast_convert_type(_le_uint(b, 0, 4), jnp.float32)


def _bf16(b):
    return jax.lax.bitcast_convert_type(_le_uint(b, 0, 2).astype(jnp.uint32) << 16, jnp.float32)


def _q4_0(b):
    return Affine(_f16(b, 0), _int(_unpack(b[..., 2:], 4)) - 8)


def _q4_1(b):
    return Affine(_f16(b, 0), _unpack(b[..., 4:], 4), _f16(b, 2))


def _q5(b, qh_at: int) -> jax.Array:
    """The 5-bit quants of Q5_0/Q5_1: 32 high bits in a little-endian word, low nibbles after it."""
    return _unpack(b[..., qh_at + 4 :], 4) | (_unpack(b[..., qh_at : qh_at + 4], 1, byte_major=True) << 4)


def _q5_0(b):
    return Affine(_f16(b, 0), _int(_q5(b, 2)) - 16)


def _q5_1(b):
    return Affine(_f16(b, 0), _q5(b, 4), _f16(b, 2))


def _q8_0(b):
    return Affine(_f16(b, 0), jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8))


def _q2_k(b):
    scales, qs = b[..., :16], b[..., 16:80]
    dl = _f16(b, 80) * (scales & 0x0F).astype(jnp.float32)
    ml = _f16(b, 82) * (scales >> 4).astype(jnp.float32)
    return Affine(dl, _unpack(qs, 2, groups=2), -ml)


def _q3_k(b):
    hmask, qs, s = b[..., :32], b[..., 32:96], b[..., 96:108]
    scales = _int(_unpack(s[..., :8], 4) | (_unpack(s[..., 8:], 2) << 4)) - 32
    q = _int(_unpack(qs, 2, groups=2)) - _int((_unpack(hmask, 1) ^ 1) << 2)
    return Affine(_f16(b, 108) * scales.astype(jnp.float32), q)


def _k_min(b, q: jax.Array) -> jax.Array:
    """Q4_K/Q5_K: eight sub-blocks of ``d * scale * q - dmin * min``."""
    scales, mins = _k_scale_min(b[..., 4:16])
    dl = _f16(b, 0) * scales.astype(jnp.float32)
    ml = _f16(b, 2) * mins.astype(jnp.float32)
    return Affine(dl, q, -ml)


def _q4_k(b):
    return _k_min(b, _unpack(b[..., 16:], 4, groups=4))


def _q5_k(b):
    qh, qs = b[..., 16:48], b[..., 48:]
    return _k_min(b, _unpack(qs, 4, groups=4) | (_unpack(qh, 1) << 4))


def _q6_k(b):
    ql, qh, scales = b[..., :128], b[..., 128:192], b[..., 192:208]
    q = _int(_unpack(ql, 4, groups=2) | (_unpack(qh, 2, groups=2) << 4)) - 32
    scales = jax.lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)
    return Affine(_f16(b, 208) * scales, q)


def _iq4_nl(b):
    return Affine(_f16(b, 0), _lut(gguf_quants.IQ4_NL.kvalues, _unpack(b[..., 2:], 4)))


def _iq4_xs(b):
    scales_h, scales_l, qs = b[..., 2:4], b[..., 4:8], b[..., 8:]
    scales = _int(_unpack(scales_l, 4, byte_major=True) | (_unpack(scales_h, 2, byte_major=True) << 4)) - 32
    q = _lut(gguf_quants.IQ4_NL.kvalues, _unpack(qs, 4, groups=8))
    return Affine(_f16(b, 0) * scales.astype(jnp.float32), q)


def _mxfp4(b):
    # ggml_e8m0_to_fp32_half: the scale is 2**(e - 128) for every e, 255 included (no NaN code).
    return _mul_pow2(_e2m1_fp4(b[..., 1:], groups=1), _int(b[..., 0:1]) - 128)


def _nvfp4(b):
    # Four sub-blocks of 16 with a UE4M3 scale each (halved); 0x7F (the E4M3 NaN code) decodes to 0 in ggml.
    s = b[..., :4]
    exp, man = _int((s >> 3) & 0x0F), _int(s & 0x07)
    d = _mul_pow2(jnp.where(exp == 0, man, man + 8).astype(jnp.float32), jnp.maximum(exp, 1) - 11)
    d = jnp.where(s == 0x7F, 0.0, d)
    return Affine(d, _e2m1_fp4(b[..., 4:], groups=4))


_DECODERS: dict[GGMLQuantizationType, Callable[[jax.Array], jax.Array | Affine]] = {
    _T.F32: _f32,
    _T.F16: lambda b: _f16(b, 0),
    _T.BF16: _bf16,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q8_0: _q8_0,
    _T.Q2_K: _q2_k,
    _T.Q3_K: _q3_k,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
    _T.IQ4_NL: _iq4_nl,
    _T.IQ4_XS: _iq4_xs,
    _T.MXFP4: _mxfp4,
    _T.NVFP4: _nvfp4,
}

SUPPORTED_QTYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)


# --- public API ---------------------------------------------------------------------------------------------


def _known(qtype: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedModel(f"unknown GGUF quant type id {qtype}") from None


def qtype_of(qtype: int | GGMLQuantizationType) -> GGMLQuantizationType:
    """``qtype`` as a supported ``GGMLQuantizationType``, else ``UnsupportedModel`` naming it."""
    qtype = _known(qtype)
    if qtype not in SUPPORTED_QTYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise UnsupportedModel(f"GGUF quant type {qtype.name} is not supported (supported: {names})")
    return qtype


def is_quantized(qtype: int | GGMLQuantizationType) -> bool:
    """True for block formats, False for plain element types (F32, F16, BF16, ...)."""
    return GGML_QUANT_SIZES[_known(qtype)][0] > 1


@functools.partial(jax.jit, static_argnums=1)
def dequantize_rows(data: jax.Array, qtype: int) -> jax.Array:
    """Decode rows of packed blocks: uint8 ``[..., row_bytes]`` -> f32 ``[..., row_bytes // type_size * bs]``.

    Exact with ``gguf.quants.dequantize``. Jitted (``qtype`` static) so that an eager call compiles once
    instead of op by op; inside an outer jit it is inlined like any jnp code.
    """
    qtype = qtype_of(qtype)
    out = _DECODERS[qtype](_blocks(data, qtype))
    out = out.values() if isinstance(out, Affine) else out
    return out.reshape(*data.shape[:-1], -1)


def _blocks(data: jax.Array, qtype: GGMLQuantizationType) -> jax.Array:
    type_size = GGML_QUANT_SIZES[qtype][1]
    if data.dtype != jnp.uint8 or data.ndim == 0 or data.shape[-1] % type_size:
        raise GGUFError(
            "<array>",
            f"{qtype.name} rows must be uint8 with a multiple of {type_size} bytes, got {data.dtype} {data.shape}",
        )
    return data.reshape(*data.shape[:-1], data.shape[-1] // type_size, type_size)


# Formats decoded as scale * code (+ offset) per sub-block, whose codes fit in int8 (NVFP4 is too, but its
# per-tensor scale lives outside the blocks).
AFFINE_QTYPES: frozenset[GGMLQuantizationType] = frozenset(
    {_T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0, _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL, _T.IQ4_XS}
)


def affine_rows(data: jax.Array, qtype: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows of packed blocks of an ``AFFINE_QTYPES`` format as (codes int8 ``[..., K]``, scale f32 ``[..., K / B]``,
    offset f32 ``[..., K / B]``), B the format's sub-block: weight ``k`` of a row is ``scale[k // B] * codes[k] +
    offset[k // B]``, in f32 exactly what ``dequantize_rows`` gives (the same two roundings)."""
    qtype = qtype_of(qtype)
    if qtype not in AFFINE_QTYPES:
        raise UnsupportedModel(f"{qtype.name} is not a scale-and-offset block format")
    parts = _DECODERS[qtype](_blocks(data, qtype))
    lead = data.shape[:-1]
    scale = parts.scale.reshape(*lead, -1)
    # a format without offsets gets -0.0, which leaves every value (+-0 included) as it is when added
    offset = jnp.full_like(scale, -0.0) if parts.offset is None else parts.offset.reshape(*lead, -1)
    return parts.q.astype(jnp.int8).reshape(*lead, -1), scale, offset


def dequantize(raw: np.ndarray, qtype: int | GGMLQuantizationType, shape: Sequence[int]) -> jax.Array:
    """A tensor's bytes as stored in the file -> f32 array of the logical numpy-order ``shape``.

    Gives exactly the values of ``gguf.quants.dequantize``. NVFP4's per-tensor scale is not part of the
    blocks; ``QTensor`` applies it.
    """
    qtype = qtype_of(qtype)
    shape = tuple(int(n) for n in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise GGUFError("<array>", f"{qtype.name} shape {shape}: last axis is not a multiple of {block_size}")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    row_bytes = shape[-1] // block_size * type_size
    want = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
    if raw.size != want:
        raise GGUFError("<array>", f"{qtype.name} shape {shape} needs {want} bytes, got {raw.size}")
    rows = raw.reshape(*shape[:-1], row_bytes)
    return dequantize_rows(jnp.asarray(rows), qtype).reshape(shape)


def quantize(values: np.ndarray, qtype: int | GGMLQuantizationType) -> np.ndarray:
    """Encode with gguf-py: ``[..., n]`` values -> uint8 ``[..., row_bytes]``, as a GGUF file stores them.

    Only the formats that gguf-py can encode and this module can decode (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, MXFP4 in gguf 0.19).
    """
    qtype = qtype_of(qtype)
    values = np.asarray(values, dtype=np.float32)
    block_size = GGML_QUANT_SIZES[qtype][0]
    if values.ndim == 0 or values.shape[-1] % block_size:
        raise UnsupportedModel(
            f"cannot quantize shape {values.shape} to {qtype.name}: last axis is not a multiple of {block_size}"
        )
    try:
        packed = gguf_quants.quantize(values, qtype)
    except NotImplementedError:
        raise UnsupportedModel(f"quantizing to {qtype.name} is not implemented by gguf-py") from None
    return np.ascontiguousarray(packed).view(np.uint8)
