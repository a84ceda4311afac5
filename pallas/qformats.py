"""Weight formats as the matmul kernel reads them: the repacked leaf, its repack from a QTensor, its jnp reference.

GGUF interleaves scales with codes in odd-sized blocks (MXFP4 17 bytes, Q8_0 34, Q4_K 144), which no TMA box
or 16-byte load can stride over. ``repack`` splits each format once, at load, into

- ``qs``: uint8 ``[N_pad, K_pad * bits / 8]``, the codes alone, in *kernel order*: within every 16-byte group the
  bytes are permuted so that the 4 bytes one thread reads from the wgmma register layout (``WGMMA_8BIT``: row
  ``r``, bytes ``4q .. 4q+3``) decode with shifts and masks straight into that thread's bf16 operand registers
  (``WGMMA``: row ``r``, columns ``8g + 2q, 8g + 2q + 1``) in logical K order. The decoders in
  ``mgpu_decode.py`` rely on exactly this permutation (see ``_pack4`` / ``_pack8``; 5- and 6-bit codes are a
  nibble plane plus a plane of high bits per 256 elements, ``_pack_split``).
- ``scales``: the per-block scale planes, K-major (``[K_pad / block, N_pad]``) so a kernel tile of them is one
  TMA box of ``tn`` contiguous bytes per block row.

N is padded to a multiple of 128 and K to a multiple of 256 (the kernel's K steps); padded codes and scales are
zero, so padded outputs are zero and padded inputs contribute nothing.
The leaf carries its format and logical shape as static metadata (DESIGN rule 1).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from pallas.errors import KernelError

_T = GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a kernel format's values come out of its codes and scale planes:
    ``w = (code - bias) * scale + offset``, with one ``scale`` (and, where ``offset`` is set, one ``offset``) per
    ``block`` K elements of a row. 8-bit codes are int8, the others unsigned.

    The planes are bf16, the block's whole scale precomputed at repack (Q4_K's ``d * sc`` and ``-dmin * m``), so
    the register decoder splats a loaded pair and spends no conversion or multiply on scales: I2F/F2F run at a
    quarter of the integer rate on Hopper, and Q4_K's four planes cost ~4 of them per 8 weights, which held its
    decode at 40-49% of bandwidth (pallas/NOTES.md). The kernel always rounded each block's scale to bf16; the
    planes now hold exactly what it used. MXFP4's one plane is its E8M0 exponent byte (its own decoder).
    """

    bits: int  # 4, 8, or 5 and 6: a nibble plus 1 or 2 high bits (``_pack_split``)
    block: int = 32
    offset: bool = False
    bias: int = 0
    plane_dtype: str = "bfloat16"
    codebook: bool = False  # a nibble indexes IQ4's 16 int8 values (``IQ4_VALUES``) instead of being the value

    @property
    def blocks(self) -> tuple[int, ...]:
        """K elements per row of each plane, in the order ``repack`` emits them (scale, then offset)."""
        return (self.block,) * (0 if self.bits == 16 else 1 + self.offset)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return (self.plane_dtype,) * len(self.blocks)


class Fmt(enum.Enum):
    """A kernel weight format (one register decoder each; ``SOURCES`` says which GGUF types transcode to it)."""

    MXFP4 = Spec(4, plane_dtype="uint8")  # E2M1 nibbles, E8M0 scale byte per 32 (its own decoder)
    Q8_0 = Spec(8)  # int8 * scale per 32
    IQ4_NL = Spec(4, codebook=True)  # IQ4_VALUES[nibble] * scale per 32 (also IQ4_XS)
    Q6_K = Spec(6, block=16, bias=32)  # (6-bit code - 32) * scale per 16
    Q5_K = Spec(5, offset=True)  # 5-bit code * scale + offset per 32 (also Q5_1)
    Q5_0 = Spec(5, bias=16)  # (5-bit code - 16) * scale per 32
    Q4_K = Spec(4, offset=True)  # nibble * scale + offset per 32 (also Q4_1)
    Q4_0 = Spec(4, bias=8)  # (nibble - 8) * scale per 32
    BF16 = Spec(16)  # a plain bf16 weight, read by the MMA straight from shared memory (``dense_weight``)

    @property
    def spec(self) -> Spec:
        return self.value

    @property
    def bits(self) -> int:
        return self.value.bits

    @property
    def k_align(self) -> int:
        """K padding: a multiple of every K step the kernel's tilings use (256, one K-quant super-block)."""
        return 256

    @property
    def out_scale(self) -> float:
        """Factor the kernel applies to its f32 accumulator (MXFP4 decodes to value * 2**-32, see mgpu_decode)."""
        return 2.0**32 if self is Fmt.MXFP4 else 1.0


N_ALIGN = 128
MXFP4_MAX_SCALE_BYTE = 160  # E8M0 byte: the decode multiplies by 2**(E - 33) in bf16 (mgpu_decode.py)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A quantized weight ``[N, K]`` (y = x @ W.T) in the matmul kernel's layout; made by ``repack``."""

    qs: jax.Array
    scales: tuple[jax.Array, ...]
    fmt: Fmt = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.qs.shape[-2], self.qs.shape[-1] * jnp.dtype(self.qs.dtype).itemsize * 8 // self.fmt.bits

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes of a stack of matrices (the experts of an MoE layer): ``()`` for one matrix."""
        return tuple(self.qs.shape[:-2])

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qs, *self.scales))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The logical ``[*stack, N, K]`` weight (jnp reference of this layout: the values the kernel reads)."""
        n, k = self.shape
        dense = dequantize_packed
        for _ in self.stack_shape:
            dense = jax.vmap(dense)
        return dense(self)[..., :n, :k].astype(dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def can_repack(qtype: int, shape: tuple[int, ...], stack_shape: tuple[int, ...] = ()) -> bool:
    """Whether ``repack`` takes a QTensor of this qtype and shape (2-D, unstacked, a type in ``SOURCES``)."""
    return int(qtype) in {int(t) for t in SOURCES} and len(shape) == 2 and not stack_shape


def kernel_format(qtype: int) -> Fmt | None:
    """The kernel format a GGUF type is repacked into (None: no kernel reads it)."""
    entry = SOURCES.get(GGMLQuantizationType(int(qtype)))
    return None if entry is None else entry[0]


def repack(w) -> PackedWeight:
    """QTensor (``imp_jax.gguf.QTensor``, 2-D) -> PackedWeight. Pure jnp; run once at load, on any device.

    Types without a decoder of their own are transcoded into a kernel format that holds their codes exactly
    (``SOURCES``); every block's scale (and offset) is stored as the bf16 the kernel multiplies by. Called
    eagerly (as at load) it also checks that MXFP4 scales fit the kernel's decode (always true of real
    checkpoints: 2**33 is far above any weight scale); under ``jit`` that check is skipped.
    """
    qtype = GGMLQuantizationType(int(w.qtype))
    if not can_repack(qtype, tuple(w.shape), tuple(w.stack_shape)) or w.scale is not None:
        names = ", ".join(t.name for t in SOURCES)
        raise KernelError(
            f"pallas.repack: {qtype.name} weight of shape {tuple(w.full_shape)} is not supported (2-D {names} only)"
        )
    fmt, split = SOURCES[qtype]
    n, k = (int(d) for d in w.shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = jnp.asarray(w.data).reshape(n, k // block, type_size)
    codes, scales = split(blocks)
    if fmt is Fmt.MXFP4 and not isinstance(scales[0], jax.core.Tracer):
        top = int(scales[0].max())
        if top > MXFP4_MAX_SCALE_BYTE:
            raise KernelError(
                f"pallas.repack: MXFP4 weight {tuple(w.shape)} has a block scale 2**{top - 127}; the kernel's "
                f"bf16 decode holds scales up to 2**{MXFP4_MAX_SCALE_BYTE - 127} (use the XLA path)"
            )
    n_pad, k_pad = _round_up(n, N_ALIGN), _round_up(k, fmt.k_align)
    codes = jnp.pad(codes.reshape(n, k), ((0, n_pad - n), (0, k_pad - k)))
    scales = tuple(
        jnp.pad(s.reshape(n, -1).astype(dt), ((0, n_pad - n), (0, k_pad // blk - k // blk))).T
        for s, blk, dt in zip(scales, fmt.spec.blocks, fmt.spec.dtypes, strict=True)
    )
    qs = _pack_codes(codes, fmt)
    return PackedWeight(qs=qs, scales=scales, fmt=fmt, shape=(n, k))


def can_view_dense(w: object) -> bool:
    """Whether ``dense_weight`` takes this array: a bf16 matrix [N, K] already on the kernel's grid."""
    shape = getattr(w, "shape", ())
    return (
        len(shape) == 2
        and getattr(w, "dtype", None) == jnp.bfloat16
        and shape[0] % N_ALIGN == 0
        and shape[1] % Fmt.BF16.k_align == 0
    )


def dense_weight(w: jax.Array) -> PackedWeight:
    """A bf16 weight [N, K] as the matmul kernel's BF16 operand: the same array, no copy, no repack (a bf16 tile
    is its own kernel layout). Shapes off the kernel's grid are refused (``can_view_dense``)."""
    if not can_view_dense(w):
        raise KernelError(
            f"pallas.dense_weight: {getattr(w, 'dtype', '?')} weight {getattr(w, 'shape', '?')} is not a bf16 "
            f"matrix with N a multiple of {N_ALIGN} and K of {Fmt.BF16.k_align}"
        )
    return PackedWeight(qs=w, scales=(), fmt=Fmt.BF16, shape=tuple(w.shape))


# --- per-GGUF-type split of blocks into element codes [N, nb, block] (uint8; int8 bytes for 8-bit formats) and
# the kernel format's planes [N, nb(, per block)]: the block scale (and offset, signed) as exact f32 products,
# which ``repack`` rounds to the planes' bf16 once (offsets as in gguf.quants).


def _f16_at(b: jax.Array, offset: int) -> jax.Array:
    """The f16 field at ``offset`` of each block, as f32 (the planes' products are formed exact in f32)."""
    return jax.lax.bitcast_convert_type(b[..., offset : offset + 2], jnp.float16).astype(jnp.float32)


def _fields(x: jax.Array, width: int, groups: int = 1, byte_major: bool = False) -> jax.Array:
    """Bytes ``[..., n]`` -> their ``width``-bit fields in ggml's order: plane by plane within each of ``groups``
    runs of bytes (lowest field first), or with ``byte_major`` each byte's fields together."""
    shifts = jnp.arange(0, 8, width, dtype=jnp.uint8)
    f = x[..., :, None] >> shifts if byte_major else x.reshape(*x.shape[:-1], groups, 1, -1) >> shifts[:, None]
    return (f & ((1 << width) - 1)).reshape(*x.shape[:-1], -1)


IQ4_VALUES = tuple(int(v) for v in gguf_quants.IQ4_NL.kvalues)  # IQ4_NL/IQ4_XS's codebook (int8)


def _k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K from their 12 packed bytes (``get_scale_min_k4``)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q5_bits(b: jax.Array, qh_at: int) -> jax.Array:
    """Q5_0/Q5_1's 5-bit quants: 32 high bits (a little-endian word), then the low nibbles."""
    return _fields(b[..., qh_at + 4 :], 4) | (_fields(b[..., qh_at : qh_at + 4], 1, byte_major=True) << 4)


def _split_mxfp4(b):
    return _fields(b[..., 1:], 4), (b[..., 0],)


def _split_q8_0(b):
    return b[..., 2:], (_f16_at(b, 0),)


def _split_q5_0(b):
    return _q5_bits(b, 2), (_f16_at(b, 0),)


def _split_q5_1(b):
    return _q5_bits(b, 4), (_f16_at(b, 0), _f16_at(b, 2))


def _split_q4_0(b):
    return _fields(b[..., 2:], 4), (_f16_at(b, 0),)


def _split_q4_1(b):
    return _fields(b[..., 4:], 4), (_f16_at(b, 0), _f16_at(b, 2))


def _split_iq4_nl(b):
    return _fields(b[..., 2:], 4), (_f16_at(b, 0),)


def _k_planes(b):
    """Q4_K/Q5_K's per-32 ``d * sc`` and ``-dmin * m``."""
    sc, mn = _k_scale_min(b[..., 4:16])
    return _f16_at(b, 0)[..., None] * sc, -(_f16_at(b, 2)[..., None] * mn)


def _split_q4_k(b):
    return _fields(b[..., 16:], 4, groups=4), _k_planes(b)


def _split_q5_k(b):
    q = _fields(b[..., 48:], 4, groups=4) | (_fields(b[..., 16:48], 1) << 4)
    return q, _k_planes(b)


def _split_q6_k(b):
    q = _fields(b[..., :128], 4, groups=2) | (_fields(b[..., 128:192], 2, groups=2) << 4)
    sc = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8)
    return q, (_f16_at(b, 208)[..., None] * sc,)


def _split_iq4_xs(b):
    low, high = _fields(b[..., 4:8], 4, byte_major=True), _fields(b[..., 2:4], 2, byte_major=True)
    sc = (low | (high << 4)).astype(jnp.int32) - 32
    return _fields(b[..., 8:], 4, groups=8), (_f16_at(b, 0)[..., None] * sc,)


# Every GGUF type a kernel reads: its kernel format and its split. The transcodings (IQ4_XS -> IQ4_NL;
# Q5_1 -> Q5_K; Q4_1 -> Q4_K) hold the codes exactly; their cost in bytes per weight is
# in pallas/NOTES.md.
SOURCES = {
    _T.MXFP4: (Fmt.MXFP4, _split_mxfp4),
    _T.Q8_0: (Fmt.Q8_0, _split_q8_0),
    _T.Q4_K: (Fmt.Q4_K, _split_q4_k),
    _T.Q5_K: (Fmt.Q5_K, _split_q5_k),
    _T.Q6_K: (Fmt.Q6_K, _split_q6_k),
    _T.Q4_0: (Fmt.Q4_0, _split_q4_0),
    _T.Q4_1: (Fmt.Q4_K, _split_q4_1),
    _T.Q5_0: (Fmt.Q5_0, _split_q5_0),
    _T.Q5_1: (Fmt.Q5_K, _split_q5_1),
    _T.IQ4_NL: (Fmt.IQ4_NL, _split_iq4_nl),
    _T.IQ4_XS: (Fmt.IQ4_NL, _split_iq4_xs),
}


# --- kernel order ------------------------------------------------------------------------------------------------
# 4-bit: each 16-byte group holds one 32-element block; byte 4q+2t+u carries element 16u+2q+t in its low nibble
# and element 16u+8+2q+t in its high nibble. 8-bit: each 16-byte group holds 16 elements; byte 4q+2h+j carries
# element 8h+2q+j. Axis names: q = thread in its quad, t/j = element in a bf16 pair, u/h = 8-column group.


def _pack4(codes: jax.Array) -> jax.Array:
    n, k = codes.shape
    c = codes.reshape(n, k // 32, 2, 2, 4, 2)  # [n, block, u, nibble, q, t]
    c = c.transpose(0, 1, 4, 5, 2, 3)  # [n, block, q, t, u, nibble]
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n, k // 2)


def _unpack4(qs: jax.Array) -> jax.Array:
    n, kb = qs.shape
    b = qs.reshape(n, kb // 16, 4, 2, 2)  # [n, block, q, t, u]
    c = jnp.stack([b & 0x0F, b >> 4], axis=-1)  # [n, block, q, t, u, nibble]
    return c.transpose(0, 1, 4, 5, 2, 3).reshape(n, kb * 2)


def _pack8(codes: jax.Array) -> jax.Array:
    n, k = codes.shape
    return codes.reshape(n, k // 16, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, k)


def _unpack8(qs: jax.Array) -> jax.Array:
    n, k = qs.shape
    return qs.reshape(n, k // 16, 4, 2, 2).transpose(0, 1, 3, 2, 4).reshape(n, k)


# 5 and 6 bits: every 256 elements (one K-quant super-block; every K step and K shard is a multiple) take 128 bytes
# of low nibbles in the 4-bit order, then 16-byte groups of high bits (hb = 1 or 2 per element), each serving
# S = 4 / hb nibble groups: in the 4 bytes thread q reads, bit 16t + 4g + hb*s (+ the code's bit 4 + i at i) is
# the high part of element 8g + 2q + t of nibble group S*h + s. A thread's high word thus holds, for each of its
# nibble words, the bits of exactly the pairs that word decodes, where one shift and one mask put them beside
# the nibble (``mgpu_decode``).


def _high_shifts(bits: int) -> list[tuple[int, int, int, int]]:
    """``(s, g, t, bit)``: where in a thread's high word element ``8g + 2q + t`` of nibble group ``S*h + s`` keeps
    its high bits (Python ints: a kernel in interpret mode unpacks too, and may not close over array constants)."""
    hb = bits - 4
    return [(s, g, t, 16 * t + 4 * g + hb * s) for s in range(4 // hb) for g in range(4) for t in range(2)]


def _pack_split(codes: jax.Array, bits: int) -> jax.Array:
    n, k = codes.shape
    s_count = 4 // (bits - 4)
    low = _pack4(codes & 0x0F).reshape(n, k // 256, 128)
    high = (codes >> 4).astype(jnp.uint32).reshape(n, k // 256, 8 // s_count, s_count, 4, 4, 2)  # [h s g q t]
    words = sum(high[:, :, :, s, g, :, t] << bit for s, g, t, bit in _high_shifts(bits))  # [n, unit, h, q]
    high_bytes = jnp.stack([(words >> shift) & 0xFF for shift in (0, 8, 16, 24)], axis=-1)
    return jnp.concatenate([low, high_bytes.astype(jnp.uint8).reshape(n, k // 256, -1)], axis=-1).reshape(n, -1)


def _unpack_split(qs: jax.Array, bits: int) -> jax.Array:
    """Inverse of ``_pack_split``."""
    n, kb = qs.shape
    k, s_count = kb * 8 // bits, 4 // (bits - 4)
    units = qs.reshape(n, k // 256, 32 * bits)
    low = _unpack4(units[..., :128].reshape(n, -1))
    b = units[..., 128:].reshape(n, k // 256, 8 // s_count, 4, 4).astype(jnp.uint32)  # [n, unit, h, q, byte]
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # [n, unit, h, q]
    high = jnp.stack([words >> bit for *_, bit in _high_shifts(bits)], axis=-1) & ((1 << (bits - 4)) - 1)
    high = high.reshape(*words.shape, s_count, 4, 2).transpose(0, 1, 2, 4, 5, 3, 6)  # [n, unit, h, s, g, q, t]
    return low | (high.astype(jnp.uint8).reshape(n, k) << 4)


# Codebook nibbles (IQ4): a thread's word holds its 8 elements in the order of the int8 bytes the lookup makes,
# two nibbles per byte: byte 4q+g of each 16-byte group carries element 8g+2q in its low nibble and 8g+2q+1 in its
# high nibble, so the word's low and high 16 bits are ``prmt`` selectors for the 4 bytes of pairs g = 0, 1 and 2, 3.


def _pack4_lookup(codes: jax.Array) -> jax.Array:
    n, k = codes.shape
    c = codes.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4)  # [n, block, q, g, nibble]
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n, k // 2)


def _unpack4_lookup(qs: jax.Array) -> jax.Array:
    n, kb = qs.shape
    b = qs.reshape(n, kb // 16, 4, 4)  # [n, block, q, g]
    c = jnp.stack([b & 0x0F, b >> 4], axis=-1)  # [n, block, q, g, nibble]
    return c.transpose(0, 1, 3, 2, 4).reshape(n, kb * 2)


_PACK = {4: _pack4, 8: _pack8, 5: lambda c: _pack_split(c, 5), 6: lambda c: _pack_split(c, 6)}
_UNPACK = {4: _unpack4, 8: _unpack8, 5: lambda q: _unpack_split(q, 5), 6: lambda q: _unpack_split(q, 6)}


def _pack_codes(codes: jax.Array, fmt: Fmt) -> jax.Array:
    return _pack4_lookup(codes) if fmt.spec.codebook else _PACK[fmt.bits](codes)


def unpack_codes(qs: jax.Array, fmt: Fmt) -> jax.Array:
    """Kernel-order code bytes ``[rows, bytes]`` -> element codes ``[rows, K]`` (uint8) in logical order (a
    BF16 tile is already its values)."""
    if fmt is Fmt.BF16:
        return qs
    return _unpack4_lookup(qs) if fmt.spec.codebook else _UNPACK[fmt.bits](qs)


# --- values ----------------------------------------------------------------------------------------------------


def decode_values(codes: jax.Array, scales: tuple[jax.Array, ...], fmt: Fmt) -> jax.Array:
    """Element codes ``[rows, K]`` and row-major planes ``[rows, K / block]`` -> f32 weights, by the format's
    ``Spec``: the values the kernel's register decoder forms (it rounds each one to bf16 once more).

    MXFP4 values come out times ``2**-32`` (``fmt.out_scale`` undoes it), as the kernel decodes them.
    """
    k = codes.shape[1]

    def per_block(s: jax.Array) -> jax.Array:
        return jnp.repeat(s.astype(jnp.float32), k // s.shape[1], axis=1)

    if fmt is Fmt.BF16:
        return codes.astype(jnp.float32)
    if fmt is Fmt.MXFP4:
        return jnp.ldexp(_e2m1_doubled(codes), per_block(scales[0]).astype(jnp.int32) - 128 - 32)
    q = jax.lax.bitcast_convert_type(codes, jnp.int8) if fmt.bits == 8 else codes
    if fmt.spec.codebook:  # compares against scalars: a kernel in interpret mode may not close over a table
        q = sum(jnp.where(codes == i, v, 0) for i, v in enumerate(IQ4_VALUES))
    w = (q.astype(jnp.float32) - fmt.spec.bias) * per_block(scales[0])
    return w + per_block(scales[1]) if fmt.spec.offset else w


def _e2m1_doubled(codes: jax.Array) -> jax.Array:
    """Doubled E2M1 values (gguf's ``kvalues``) by arithmetic: kernels may not close over a lookup table."""
    c = codes.astype(jnp.int32)
    e, m = (c >> 1) & 3, c & 1
    mag = jnp.where(e == 0, m, (2 + m) << jnp.maximum(e - 1, 0))
    return jnp.where(c >= 8, -mag, mag).astype(jnp.float32)


def dequantize_packed(w: PackedWeight) -> jax.Array:
    """f32 ``[N_pad, K_pad]`` of a PackedWeight, true values (``out_scale`` applied)."""
    codes = unpack_codes(w.qs, w.fmt)
    return decode_values(codes, tuple(s.T for s in w.scales), w.fmt) * w.fmt.out_scale


def check_shape(w: PackedWeight) -> None:
    """Raise KernelError when a leaf's arrays disagree with its static metadata (a hand-built leaf)."""
    n_pad, k_pad = w.padded_shape
    n, k = w.shape
    planes = tuple(str(jnp.dtype(s.dtype)) for s in w.scales)
    if n_pad % N_ALIGN or k_pad % w.fmt.k_align or n_pad < n or k_pad < k or math.prod(w.qs.shape) == 0:
        raise KernelError(f"pallas: inconsistent PackedWeight {w.fmt.name} shape {w.shape} qs {w.qs.shape}")
    if planes != w.fmt.spec.dtypes:
        raise KernelError(
            f"pallas: PackedWeight {w.fmt.name} {w.shape} has scale planes of {planes}; the format reads "
            f"{w.fmt.spec.dtypes} (make it with pallas.repack)"
        )
