"""The register decoders of ``pallas/mgpu_decode.py`` run on the CPU, their MLIR ops emulated bit for bit.

Interpret mode cannot run ``inline_mgpu`` code (the kernel decodes with the jnp reference there), so without a
GPU nothing would check that the decoders' shifts and masks match the byte order ``qformats.repack`` writes. Here
the decoder functions run as they are, with each MLIR op they call (``arith``, ``math.fma``, ``prmt``, the SMEM
loads) replaced by its meaning on Python integers and bf16 pairs, once per thread of the warpgroup, on words laid
out as the ``WGMMA_8BIT`` register layout gives them (thread ``32 w + l`` holds bytes ``4 (l % 4) ..`` of every
16-byte column group of rows ``16 w + l // 4`` and ``+ 8``). Every format's decoded tile must equal the jnp
reference (``qformats.decode_values``) to bf16 rounding. The GPU tests check the same on the hardware.
"""

from __future__ import annotations

import types
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import pallas
import pallas.mgpu_decode as mgpu_decode
from pallas.qformats import Fmt, decode_values, unpack_codes
from tests.test_pallas_qmatmul import random_qtensor

_M32 = 0xFFFFFFFF


def _bf16(x) -> float:
    return float(np.float64(x).astype(np.float32).astype(ml_dtypes.bfloat16))


def _halves(bits: int) -> tuple[float, float]:
    """An i32 as a bf16 pair (low half first)."""
    raw = np.array([bits & 0xFFFF, bits >> 16], np.uint16).view(ml_dtypes.bfloat16)
    return float(raw[0]), float(raw[1])


def _pairwise(fn):
    return lambda *xs: tuple(_bf16(fn(*vals)) for vals in zip(*xs, strict=True))


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32``: output byte i is byte ``selector[i] & 7`` of ``b:a`` (no sign replication here)."""
    source = (b << 32) | a
    return sum(((source >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


EMULATED = dict(
    arith=types.SimpleNamespace(
        shrui=lambda x, n: (x & _M32) >> n,
        shli=lambda x, n: (x << n) & _M32,
        andi=lambda x, y: x & y,
        ori=lambda x, y: x | y,
        addi=lambda x, y: (x + y) & _M32,
        extui=lambda _type, x: int(x),
        subf=_pairwise(lambda x, y: x - y),
        mulf=_pairwise(lambda x, y: x * y),
    ),
    math=types.SimpleNamespace(fma=_pairwise(lambda x, y, z: x * y + z)),
    vector=types.SimpleNamespace(broadcast=lambda _type, x: (float(x), float(x))),
    mgpu_utils=types.SimpleNamespace(prmt=_prmt),
    _const=int,
    _i32=lambda: None,
    _bf16x2=lambda: None,
    _pair=_halves,
    _load=lambda ref, block, row: ref[block, row],
    _assemble=lambda pairs, *_: pairs,
)


def _row(rt: int, warp: int, half: int, lane: int) -> int:
    """The weight row a thread holds in row tile ``rt`` (64 rows each) of the WGMMA layouts."""
    return 64 * rt + 16 * warp + 8 * half + lane // 4


def _thread_words(qs: np.ndarray, warp: int, lane: int):
    """``_words``' yield for one thread: (row, 16-byte group, half, row tile, little-endian i32 word)."""
    for rt in range(qs.shape[0] // 64):
        for half in range(2):
            row = _row(rt, warp, half, lane)
            for group in range(qs.shape[1] // 16):
                b = qs[row, 16 * group + 4 * (lane % 4) :][:4].astype(np.uint32)
                yield row, group, half, rt, int(b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)


def emulated_tile(fmt: Fmt, qs: np.ndarray, planes: list[np.ndarray]) -> np.ndarray:
    """The ``[tn, K]`` tile the decoder hands the MMA, from kernel-order codes ``qs`` [tn, bytes] and K-major
    planes ``[K / block, tn]`` (tn 64, as decode tiles, or 128, as prefill tiles of wider codes): every thread's
    pairs put back at their (row, column)."""
    tn, k = qs.shape[0], qs.shape[1] * 8 // fmt.bits
    out = np.full((tn, k), np.nan)
    for warp in range(4):
        for lane in range(32):
            words = list(_thread_words(qs, warp, lane))
            with mock.patch.multiple(mgpu_decode, _words=lambda _codes, w=words: iter(w), **EMULATED):
                if fmt is Fmt.MXFP4:
                    pairs = mgpu_decode._decode_mxfp4(None, planes, tn, 64, k // 64)
                else:
                    pairs = mgpu_decode._decode_affine(fmt, None, planes, tn, 64, k // 64)
            for (rt, col8, half), pair in pairs.items():
                out[_row(rt, warp, half, lane), 8 * col8 + 2 * (lane % 4) : 8 * col8 + 2 * (lane % 4) + 2] = pair
    return out * fmt.out_scale


_T = GGMLQuantizationType


@pytest.mark.parametrize("tn", [64, 128])
@pytest.mark.parametrize("qtype", list(pallas.qformats.SOURCES), ids=lambda t: t.name)
def test_register_decoder_matches_the_reference(qtype, tn):
    """Each GGUF type's kernel format, through its register decoder, gives the jnp reference's weights (to the
    bf16 rounding the decoder's pair arithmetic does): the bit order of repack and decoder agree, for the row
    tiles of decode (64 rows) and of the prefill tiles that hold 128."""
    rng = np.random.default_rng(int(qtype))
    pw = pallas.repack(random_qtensor(rng, qtype, tn, 512))
    qs = np.asarray(pw.qs)[:tn]
    planes = [np.asarray(p)[:, :tn] for p in pw.scales]
    want = np.asarray(
        decode_values(unpack_codes(pw.qs, pw.fmt), tuple(p.T for p in pw.scales), pw.fmt) * pw.fmt.out_scale
    )[:tn]
    got = emulated_tile(pw.fmt, qs, planes)
    assert not np.isnan(got).any(), "a column no thread decoded"
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-30)
