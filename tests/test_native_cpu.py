"""The native CPU matmul (``ops.native_cpu``): the codes, scales and offsets it reads give exactly the reference's
weights for every scale-and-offset GGUF format; its product is XLA's product of the dequantized matrix, and a row's
result is the same in any batch; the embedding's rows come from the same codes; a model on it gives the logits of
the reference path; the plan names it; without a compiler the CPU keeps XLA's f32 path.

The kernel needs g++ and AVX-512: where it cannot be built, the tests that run it are skipped with that reason (the
layout's own tests still run).
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import imp_jax
from imp_jax import ops
from imp_jax.errors import ImpError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import AFFINE_QTYPES, affine_rows, dequantize_rows
from imp_jax.ops import native_cpu
from imp_jax.ops.policy import KernelPolicy, resolve_kernels
from tests.test_dequant import F16_SCALES, assert_bit_exact, make_blocks

T = GGMLQuantizationType
AFFINE = sorted(AFFINE_QTYPES, key=lambda t: t.name)


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> bool:
    return native_cpu.enable(tmp_path_factory.mktemp("native"))


def _need(native: bool) -> None:
    if not native:
        pytest.skip("the native CPU kernel does not build here (it needs g++ and AVX-512)")


def _matrix(rng: np.random.Generator, qtype: T, n: int, k: int) -> QTensor:
    """A random [n, k] matrix of ``qtype`` with scales of a trained model's size (not the extremes)."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = make_blocks(rng, qtype, n * k // block)
    for offset in F16_SCALES[qtype]:
        scales = rng.uniform(0.002, 0.02, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return QTensor(jnp.asarray(blocks.reshape(n, k // block * size)), None, int(qtype), (n, k))


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda t: t.name)
def test_codes_scales_and_offsets_are_the_reference_weights(qtype):
    rng = np.random.default_rng(int(qtype))
    w = _matrix(rng, qtype, 5, 512)
    codes, scale, offset = affine_rows(w.data, w.qtype)
    assert codes.dtype == jnp.int8 and codes.shape == (5, 512) and scale.shape == offset.shape
    assert 512 // scale.shape[-1] in (16, 32)
    assert_bit_exact(native_cpu.repack(w).dequantize(), np.asarray(dequantize_rows(w.data, w.qtype)))


def test_a_format_that_is_not_scale_and_offset_is_refused():
    with pytest.raises(ImpError, match="MXFP4 is not a scale-and-offset"):
        affine_rows(jnp.zeros((1, 17), jnp.uint8), T.MXFP4)
    mxfp4 = QTensor(jnp.zeros((2, 17), jnp.uint8), None, int(T.MXFP4), (2, 32))
    stacked = QTensor(jnp.zeros((3, 2, 34), jnp.uint8), None, int(T.Q8_0), (2, 32))
    assert not native_cpu.can_repack(mxfp4) and not native_cpu.can_repack(stacked)


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda t: t.name)
def test_the_kernel_is_the_product_of_the_dequantized_matrix(native, qtype):
    _need(native)
    rng = np.random.default_rng(100 + int(qtype))
    w = _matrix(rng, qtype, 67, 768)
    packed = native_cpu.repack(w)
    policy = KernelPolicy(unit_arrays=True, native_matmul=True)
    assert ops.matmul_path(packed, policy) == ops.NATIVE
    product = jax.jit(lambda x, w: ops.matmul(x, w, kernels=policy))
    for m in (native_cpu.KERNEL_ROWS, 3 * native_cpu.KERNEL_ROWS):  # the kernel's rows, then XLA's (prefill)
        x = jnp.asarray(rng.standard_normal((m, 768)).astype(np.float32))
        want = np.asarray(jnp.einsum("mk,nk->mn", x, w.dequantize(), precision="highest"))
        got = np.asarray(product(x, packed))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    x = x[: native_cpu.KERNEL_ROWS]
    got = np.asarray(product(x, packed))
    alone = [np.asarray(product(x[i : i + 1], packed))[0] for i in range(len(x))]
    np.testing.assert_array_equal(got, np.stack(alone))  # up to KERNEL_ROWS, a row's result is the same in any batch


def test_large_products_split_over_threads_give_the_serial_result(native):
    """Above the serial threshold the rows are split into chunks run on XLA's pool: the same numbers."""
    _need(native)
    rng = np.random.default_rng(7)
    w = native_cpu.repack(_matrix(rng, T.Q4_K, 1024, 1024))
    x = jnp.asarray(rng.standard_normal((1, 1024)).astype(np.float32))
    big = np.asarray(jax.jit(native_cpu.matmul)(x, w))
    parts = [np.asarray(jax.jit(native_cpu.matmul)(x, dataclasses.replace(w, packed=w.packed[i : i + 128])))
             for i in range(0, 1024, 128)]  # fmt: skip
    np.testing.assert_array_equal(big, np.concatenate(parts, axis=-1))


def test_embedding_rows_come_from_the_codes():
    rng = np.random.default_rng(3)
    w = _matrix(rng, T.Q6_K, 40, 256)
    ids = jnp.asarray([[3, 0, 39, 3]])
    got = ops.embed(native_cpu.repack(w), ids, jnp.float32)
    assert_bit_exact(got, np.asarray(ops.embed(w, ids, jnp.float32)))


@pytest.mark.parametrize("name", ["smollm2-135m"])
def test_a_model_on_the_kernel_gives_the_reference_logits(native, real_model, name):
    """The CPU default runs every scale-and-offset matrix, the tied head included, through the kernel; the
    logits are the stacked reference's (kernels off, f32 dequantized at load) and the plan says so."""
    _need(native)
    path = real_model(name)
    args = dict(dtype="float32", max_context=64, compile_cache=False)
    ref, model = imp_jax.load(path, kernels="off", **args), imp_jax.load(path, **args)
    assert model.kernels.native_matmul and model.kernels.label == "native"
    leaves = jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, native_cpu.AffineBlocks))
    assert sum(isinstance(leaf, native_cpu.AffineBlocks) for leaf in leaves) >= 30 * 4
    ids = model.tokenizer.encode("The history of the printing press")
    want, got = np.asarray(ref.logits(ids)), np.asarray(model.logits(ids))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    assert imp_jax.generate(model, "Hello", max_tokens=8).text == imp_jax.generate(ref, "Hello", max_tokens=8).text
    report = imp_jax.plan_memory(path, max_context=64, compile_cache=False).report()
    assert "native int8 codes of Q4_1 kernel" in report


def test_without_a_compiler_the_cpu_keeps_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not native_cpu.enable(tmp_path / "elsewhere")
    policy = resolve_kernels("auto", jax.devices("cpu")[0], native=native_cpu.in_cache(tmp_path / "elsewhere"))
    assert policy == KernelPolicy(unit_arrays=True)


def test_a_policy_asking_for_the_kernel_where_it_cannot_build_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ImpError, match="native CPU kernel"):
        resolve_kernels(KernelPolicy(unit_arrays=True, native_matmul=True), native=native_cpu.in_cache(tmp_path / "x"))
