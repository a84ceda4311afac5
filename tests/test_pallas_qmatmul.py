"""Quantized matmul kernels against the gguf reference: interpret mode on CPU, real shapes on a GPU."""

from __future__ import annotations

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

import pallas
from imp_jax import errors, ops
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import dequantize_rows
from pallas import KernelError

_T = GGMLQuantizationType
QTYPES = list(pallas.qformats.SOURCES)  # every GGUF type a kernel reads
# byte offsets of each type's f16 scale fields, set to sane values for the kernel tests
_F16_FIELDS = {
    _T.Q8_0: (0,),
    _T.Q4_0: (0,),
    _T.Q5_0: (0,),
    _T.IQ4_NL: (0,),
    _T.IQ4_XS: (0,),
    _T.Q4_1: (0, 2),
    _T.Q5_1: (0, 2),
    _T.Q4_K: (0, 2),
    _T.Q5_K: (0, 2),
    _T.Q6_K: (208,),
}


def _f16_bytes(rng, shape, lo, hi):
    return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_qtensor(rng: np.random.Generator, qtype: _T, n: int, k: int) -> QTensor:
    """Random valid blocks: every code pattern, scales in the range real checkpoints use."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n, k // block, type_size), dtype=np.uint8)
    if qtype == _T.MXFP4:
        b[..., 0] = rng.integers(112, 132, b.shape[:-1])
    for at in _F16_FIELDS.get(qtype, ()):
        b[..., at : at + 2] = _f16_bytes(rng, b.shape[:-1], 1e-4, 2e-3)
    return QTensor(data=jnp.asarray(b.reshape(n, -1)), scale=None, qtype=int(qtype), shape=(n, k))


def reference(x: jax.Array, w: QTensor) -> np.ndarray:
    wf = np.asarray(dequantize_rows(w.data, w.qtype), np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ wf.T


def rel_err(got, ref) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert np.isfinite(got).all(), "non-finite output"
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def assert_only_scales_rounded(pw: pallas.PackedWeight, want) -> None:
    """``pw`` holds gguf's values ``want`` but for each block's scale (and offset) rounded to bf16 once:
    ``|error| <= 2**-8 (|code - bias| |scale| + |offset|)``, and non-finite exactly where gguf's are. MXFP4 (a
    power-of-two scale) is exact."""
    got, want = np.asarray(pw.dequantize(), np.float64), np.asarray(want, np.float64)
    if pw.fmt is pallas.Fmt.MXFP4:
        np.testing.assert_array_equal(got, want)
        return
    (n, k), spec = pw.shape, pw.fmt.spec
    codes = np.asarray(pallas.qformats.unpack_codes(pw.qs, pw.fmt))[:n, :k]
    q = (codes.view(np.int8) if spec.bits == 8 else codes).astype(np.float64) - spec.bias
    if spec.codebook:
        q = np.asarray(pallas.qformats.IQ4_VALUES, np.float64)[codes]
    planes = [
        np.repeat(np.asarray(p.astype(jnp.float32), np.float64).T[:n, : k // b], b, axis=1)
        for p, b in zip(pw.scales, spec.blocks, strict=True)
    ]
    bound = np.abs(q) * np.abs(planes[0]) + (np.abs(planes[1]) if spec.offset else 0.0)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    with np.errstate(invalid="ignore"):
        assert np.all(np.abs(got - want)[finite] <= 2**-8 * 1.01 * bound[finite])


def _pow2_f16_bytes(rng, shape):
    """f16 scales that are +-0, +-inf or a power of two: every block scale product is then exact in bf16."""
    bits = (rng.integers(0, 2, shape) << 15) | (rng.integers(0, 32, shape) << 10)
    return bits.astype(np.uint16).view(np.uint8).reshape(*shape, 2)


@pytest.mark.parametrize("qtype", [t for t in QTYPES if t != _T.MXFP4], ids=lambda t: t.name)
def test_repack_keeps_every_code(qtype):
    """With power-of-two, zero and infinite f16 scales (products exact in bf16), the repacked weight is exactly
    gguf.quants.dequantize of any code bytes: the transcoding keeps every code and every scale factor."""
    rng = np.random.default_rng(int(qtype))
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (40, 512 // block, type_size), dtype=np.uint8)
    for at in _F16_FIELDS[qtype]:
        raw[..., at : at + 2] = _pow2_f16_bytes(rng, raw.shape[:-1])
    raw = raw.reshape(40, -1)
    w = QTensor(data=jnp.asarray(raw), scale=None, qtype=int(qtype), shape=(40, 512))
    with np.errstate(all="ignore"):
        want = gguf_quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(np.asarray(pallas.repack(w).dequantize()), want)


@pytest.mark.parametrize("qtype", [t for t in QTYPES if t != _T.MXFP4], ids=lambda t: t.name)
def test_repack_rounds_only_block_scales(qtype):
    """Any block bytes (extreme, subnormal, inf and NaN scales included): gguf's values but for the bf16 rounding
    of each block's scale and offset (the kernel's planes); MXFP4's scale range is bounded by its decode, below."""
    rng = np.random.default_rng(int(qtype) + 1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (40, 512 // block * type_size), dtype=np.uint8)
    w = QTensor(data=jnp.asarray(raw), scale=None, qtype=int(qtype), shape=(40, 512))
    with np.errstate(all="ignore"):
        want = gguf_quants.dequantize(raw, qtype)
    assert_only_scales_rounded(pallas.repack(w), want)


@pytest.mark.parametrize("m", [1, 70], ids=["decode", "prefill"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_repack_and_kernel_interpret(qtype, m):
    """The repack keeps gguf's values (block scales in bf16) and the kernel matches the reference, odd N."""
    rng = np.random.default_rng(100 * int(qtype) + m)
    n, k = 72, 512 if m == 1 else 256
    w = random_qtensor(rng, qtype, n, k)
    pw = pallas.repack(w)
    assert pw.shape == (n, k) and pw.padded_shape[0] % 128 == 0
    assert_only_scales_rounded(pw, dequantize_rows(w.data, w.qtype))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = pallas.quantized_matmul(x, pw, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert rel_err(y, reference(x, w)) < 1e-2


@pytest.mark.parametrize(("n", "k", "m"), [(256, 512, 3), (128, 256, 130)])
def test_bf16_kernel_interpret(n, k, m):
    """A plain bf16 weight through the same kernel (BF16 format: the MMA reads it in place), decode and prefill."""
    rng = np.random.default_rng(n + k + m)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    pw = pallas.dense_weight(w)
    assert pw.qs is w and pw.padded_shape == (n, k) and pw.fmt is pallas.Fmt.BF16
    np.testing.assert_array_equal(np.asarray(pw.dequantize()), np.asarray(w, np.float32))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = pallas.quantized_matmul(x, pw, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert rel_err(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-2


def test_bf16_view_refuses_off_grid_weights():
    assert not pallas.can_view_dense(jnp.zeros((128, 2880), jnp.bfloat16))
    assert not pallas.can_view_dense(jnp.zeros((128, 256), jnp.float32))
    with pytest.raises(KernelError, match=r"\(100, 256\)"):
        pallas.dense_weight(jnp.zeros((100, 256), jnp.bfloat16))


def test_kernel_interpret_split_k():
    """Two K splits (f32 partials summed by XLA), two N tiles, 3-D x."""
    rng = np.random.default_rng(7)
    w = random_qtensor(rng, _T.MXFP4, 130, 512)
    x = jnp.asarray(rng.standard_normal((2, 5, 512)), jnp.bfloat16)
    ref = reference(x.reshape(10, 512), w).reshape(2, 5, 130)
    cfg = pallas.MatmulConfig(64, 16, 256, splits=2)
    assert rel_err(pallas.quantized_matmul(x, pallas.repack(w), interpret=True, config=cfg), ref) < 1e-2


def expert_stack(rng, qtype: _T, e: int, n: int, k: int) -> tuple[list[QTensor], pallas.PackedWeight]:
    """E random experts and their repacked stack (as ``ops.prepare_weight`` stacks a layer's experts)."""
    experts = [random_qtensor(rng, qtype, n, k) for _ in range(e)]
    return experts, jax.tree.map(lambda *a: jnp.stack(a), *[pallas.repack(w) for w in experts])


def expert_reference(x: jax.Array, experts: list[QTensor], ids) -> np.ndarray:
    return np.stack([reference(x[g], experts[int(i)]) for g, i in enumerate(ids)])


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("groups", "rows", "splits"), [(5, 1, 2), (2, 11, 1)])
def test_expert_kernel_interpret(groups, rows, splits, qtype):
    """Each group of rows meets its own expert of the stack (decode: one routed row per group; prefill tiles)."""
    rng = np.random.default_rng(groups * 10 + rows + int(qtype))
    experts, stack = expert_stack(rng, qtype, 3, 72, 512)
    assert stack.stack_shape == (3,) and stack.padded_shape == (128, 512)
    np.testing.assert_array_equal(np.asarray(stack.dequantize()[1]), np.asarray(pallas.repack(experts[1]).dequantize()))
    x = jnp.asarray(rng.standard_normal((groups, rows, 512)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, 3, groups), jnp.int32)
    cfg = pallas.MatmulConfig(64, 16, 256, splits=splits)
    y = pallas.quantized_matmul(x, stack, expert_ids=ids, interpret=True, config=cfg)
    assert y.shape == (groups, rows, 72)
    assert rel_err(y, expert_reference(x, experts, ids)) < 1e-2
    with pytest.raises(KernelError, match="expert"):
        pallas.quantized_matmul(x, stack, interpret=True)


def test_errors_name_shapes():
    rng = np.random.default_rng(3)
    w = random_qtensor(rng, _T.MXFP4, 64, 256)
    pw = pallas.repack(w)
    x = jnp.zeros((2, 128), jnp.bfloat16)
    assert not pallas.supports(pw, x) and not pallas.supports(w, jnp.zeros((2, 256), jnp.bfloat16))
    with pytest.raises(KernelError, match=r"\(2, 128\)"):
        pallas.quantized_matmul(x, pw)
    with pytest.raises(KernelError, match="Q2_K"):
        pallas.repack(QTensor(data=jnp.zeros((4, 84), jnp.uint8), scale=None, qtype=int(_T.Q2_K), shape=(4, 256)))
    bad_scale = np.asarray(w.data).copy()
    bad_scale[0, 17] = 200  # an E8M0 byte the bf16 decode cannot hold
    with pytest.raises(KernelError, match=r"2\*\*73"):
        pallas.repack(QTensor(data=jnp.asarray(bad_scale), scale=None, qtype=w.qtype, shape=w.shape))
    with pytest.raises(KernelError, match="config"):
        pallas.quantized_matmul(
            jnp.zeros((1, 256), jnp.bfloat16), pw, config=pallas.MatmulConfig(64, 8, 512), interpret=True
        )


def test_ops_raise_kernel_errors_as_imp_errors():
    """pallas raises its own KernelError (it imports nothing from imp_jax); the dispatch point in ops raises it as
    imp_jax's, an ImpError the CLI reports in one line."""
    pw = pallas.repack(random_qtensor(np.random.default_rng(4), _T.Q8_0, 64, 256))
    with pytest.raises(errors.KernelError, match=r"\(2, 128\)") as caught:
        ops.matmul(jnp.zeros((2, 128), jnp.bfloat16), pw)
    assert isinstance(caught.value, errors.ImpError) and isinstance(caught.value.__cause__, KernelError)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("groups", "rows"), [(4, 1), (64, 1), (9, 128), (5, 17)])
def test_expert_kernel_gpu(qtype, groups, rows):
    """MoE shapes: gpt-oss-20b's 2880-wide experts (K padded to the kernel's 256), decode and prefill tiles."""
    n, k = (2880, 2816) if qtype != _T.MXFP4 else (2880, 2880)
    if k % GGML_QUANT_SIZES[qtype][0]:
        k = 2816
    rng = np.random.default_rng(groups + rows + int(qtype))
    experts, stack = expert_stack(rng, qtype, 4, n, k)
    f = jax.jit(pallas.quantized_matmul)
    for _ in range(2):
        x = jnp.asarray(rng.standard_normal((groups, rows, k)), jnp.bfloat16)
        ids = jnp.asarray(rng.integers(0, 4, groups), jnp.int32)
        assert rel_err(f(x, jax.device_put(stack), expert_ids=ids), expert_reference(x, experts, ids)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1000, 2880), (2880, 2816)])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_kernel_gpu(qtype, n, k, m):
    if k % GGML_QUANT_SIZES[qtype][0]:
        pytest.skip("K not a multiple of the format's block")
    rng = np.random.default_rng(n + k + m + int(qtype))
    w = random_qtensor(rng, qtype, n, k)
    pw = jax.device_put(pallas.repack(w))
    f = jax.jit(pallas.quantized_matmul)
    for _ in range(2):  # fresh inputs: a stale or unwritten output cannot match twice
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        assert rel_err(f(x, pw), reference(x, w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1024, 4096), (2944, 2816)])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_bf16_kernel_gpu(n, k, m):
    rng = np.random.default_rng(n + k + m)
    w = jnp.asarray(rng.standard_normal((n, k)) / 50, jnp.bfloat16)
    f = jax.jit(lambda x, w: pallas.quantized_matmul(x, pallas.dense_weight(w)))
    for _ in range(2):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        assert rel_err(f(x, w), np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-2


@pytest.mark.parametrize(("m", "n"), [(1, 256), (1, 8192), (70, 256)], ids=["decode", "decode-wide", "prefill"])
@pytest.mark.parametrize("fmt", [f for f in pallas.Fmt if f is not pallas.Fmt.BF16], ids=lambda f: f.name)
def test_kernel_lowers_for_cuda(fmt, m, n):
    """The whole Pallas -> Mosaic GPU lowering (register decoders included) of every format, on the CPU box:
    what interpret mode cannot run, for each K step the tilings take (256; 512 for wide decode), with K long enough
    that every pipeline buffer is in flight (Mosaic GPU refuses a tile over the 227 KiB of shared memory a CTA
    has, as it did Q5_K's and Q6_K's prefill tiles at 3 x 64 x 128 x 256). PTX and numerics are left to the GPU
    tests."""
    sds = jax.ShapeDtypeStruct
    k = 1024
    spec = fmt.spec
    w = pallas.PackedWeight(
        qs=sds((n, k * fmt.bits // 8), jnp.uint8),
        scales=tuple(sds((k // b, n), jnp.dtype(dt)) for b, dt in zip(spec.blocks, spec.dtypes, strict=True)),
        fmt=fmt,
        shape=(n, k),
    )
    jax.export.export(jax.jit(pallas.quantized_matmul), platforms=["cuda"])(sds((m, k), jnp.bfloat16), w)


def test_identical_kernels_lower_to_one_kernel():
    """Two calls of one kernel (two layers of a unit, or the plan's and the engine's programs) lower to the same
    bytes, so the GPU runtime compiles it once per process (``pallas.kernel_identity``); a kernel of another shape
    is a new one."""
    from jax.experimental.mosaic.gpu import core

    sds = jax.ShapeDtypeStruct
    fmt, k = pallas.Fmt.Q8_0, 512

    def weight(n):
        return pallas.PackedWeight(
            qs=sds((n, k), jnp.uint8), scales=(sds((k // 32, n), jnp.bfloat16),), fmt=fmt, shape=(n, k)
        )

    def twice(x, a, b):
        return pallas.quantized_matmul(x, a) + pallas.quantized_matmul(x, b)

    before = len(core.KNOWN_KERNELS)
    x = sds((1, k), jnp.bfloat16)
    jax.export.export(jax.jit(twice), platforms=["cuda"])(x, weight(384), weight(384))
    jax.export.export(jax.jit(pallas.quantized_matmul), platforms=["cuda"])(x, weight(384))
    assert len(core.KNOWN_KERNELS) - before <= 1
    jax.export.export(jax.jit(pallas.quantized_matmul), platforms=["cuda"])(x, weight(640))
    assert len(core.KNOWN_KERNELS) - before <= 2


def test_a_kernel_called_at_several_sites_is_lowered_once_per_program():
    """Each kernel is a cached jitted call, so a program lowers it once however many layers or units call it
    (the Mosaic GPU lowering of a Q4_K_M decode step's 32 kernel calls took 10 s in Python, its 9 kernels 3 s)."""
    sds = jax.ShapeDtypeStruct
    fmt, k = pallas.Fmt.Q8_0, 512
    w = pallas.PackedWeight(qs=sds((k, k), jnp.uint8), scales=(sds((k // 32, k), jnp.bfloat16),), fmt=fmt,
                            shape=(k, k))  # fmt: skip

    def layers(x, w):
        for _ in range(3):
            x = x + pallas.quantized_matmul(x, w)
        return x

    text = jax.export.export(jax.jit(layers), platforms=["cuda"])(sds((1, k), jnp.bfloat16), w).mlir_module()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_a_kernel_lowered_for_one_program_is_reused_by_the_next():
    """A cold load lowers several programs that call the same kernels (the plan's, the engine's, new buckets):
    the next program parses the first one's Mosaic GPU module instead of lowering the kernel again, and lowers
    to the text it would have without the reuse (source locations aside)."""
    from jax._src.pallas.mosaic_gpu import lowering

    sds = jax.ShapeDtypeStruct
    fmt, k = pallas.Fmt.Q8_0, 256
    w = pallas.PackedWeight(qs=sds((k, k), jnp.uint8), scales=(sds((k // 32, k), jnp.bfloat16),), fmt=fmt,
                            shape=(k, k))  # fmt: skip
    x = sds((1, k), jnp.bfloat16)
    reused, lower_body = lowering.lower_unpipelined_jaxpr_to_module, lowering.lower_jaxpr_to_module
    lowered = []

    def counted(*args, **kwargs):
        lowered.append(args)
        return lower_body(*args, **kwargs)

    def kernel_call(scale: float) -> str:
        program = jax.jit(lambda x, w: pallas.quantized_matmul(x, w) * scale)
        text = jax.export.export(program, platforms=["cuda"])(x, w).mlir_module()
        (line,) = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
        return re.sub(r"loc\(.*?\)", "", line)

    with mock.patch.object(lowering, "lower_jaxpr_to_module", counted):
        first = kernel_call(2.0)  # lowers the kernel body, unless an earlier test's program did
        seen = len(lowered)
        second = kernel_call(3.0)
        assert len(lowered) == seen  # parsed from the stored module
        with mock.patch.object(lowering, "lower_unpipelined_jaxpr_to_module", reused.__wrapped__):
            fresh = kernel_call(3.0)
        assert len(lowered) == seen + 1
    assert second == fresh == first
