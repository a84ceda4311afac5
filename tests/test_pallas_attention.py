"""Flash and decode attention kernels against f32 jnp references: interpret mode on CPU, real shapes on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas
from imp_jax import ops
from imp_jax.ops.attention import attention_paged_gather
from pallas import KernelError
from pallas import attention_decode as da
from pallas import attention_prefill as fa


def _rand(rng, shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def rel_err(got, ref) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert np.isfinite(got).all(), "non-finite output"
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _flash_case(rng, b, t, s, h, kv, hd, *, causal, window, sink):
    q, k, v = _rand(rng, (b, t, h, hd)), _rand(rng, (b, s, kv, hd)), _rand(rng, (b, s, kv, hd))
    sinks = _rand(rng, (h,), jnp.float32) if sink else None
    return (q, k, v), dict(causal=causal, window=window, sinks=sinks, scale=hd**-0.5)


def _decode_case(rng, b, t, s_max, h, kv, hd, *, window, sink, tail=0.0):
    q = _rand(rng, (b, t, h, hd))
    lengths = jnp.asarray(rng.integers(t, s_max + 1, (b,)), jnp.int32)
    k, v = _rand(rng, (b, s_max, kv, hd)), _rand(rng, (b, s_max, kv, hd))
    past = jnp.arange(s_max)[None, :, None, None] >= lengths[:, None, None, None]
    k, v = (jnp.where(past, jnp.asarray(tail, a.dtype), a) for a in (k, v))  # finite garbage past the end
    sinks = _rand(rng, (h,), jnp.float32) if sink else None
    return (q, k, v, lengths), dict(window=window, sinks=sinks, scale=hd**-0.5)


def test_flash_interpret_window_sinks_prefix():
    """Queries are the last 40 of 200 positions (T padded to the 128-row tile), two query heads per kv head,
    a 50-key window cuts the first blocks, sinks join the denominator."""
    args, kw = _flash_case(np.random.default_rng(1), 1, 40, 200, 4, 2, 64, causal=True, window=50, sink=True)
    assert rel_err(pallas.flash_attention(*args, interpret=True, **kw), fa.reference(*args, **kw)) < 1e-2


def test_decode_interpret_splits_window_sinks():
    """Two tokens per sequence (T=2), three query heads per kv head, two splits, window and sinks."""
    args, kw = _decode_case(np.random.default_rng(2), 2, 2, 136, 6, 2, 64, window=40, sink=True, tail=7.0)
    got = pallas.decode_attention(*args, interpret=True, splits=2, **kw)
    assert got.shape == args[0].shape
    assert rel_err(got, da.reference(*args, **kw)) < 1e-2


def _stack_layers(rng, args, layers: int, layer: int):
    """The case's caches as layer ``layer`` of ``layers`` (the others random), as the model's cache holds them."""
    q, k, v, lengths = args

    def stack(a):
        return jnp.stack([a if i == layer else _rand(rng, a.shape) for i in range(layers)])

    return q, stack(k), stack(v), lengths


def _paged_case(rng, b, t, h, kv, hd, *, page, n_pg, window, sink, layers=1, lengths=None):
    """A pool of ``layers`` x (b * n_pg + 3) random pages (finite garbage everywhere), each row's table a
    shuffled draw of distinct pages (columns past its length still name real pages, as the engine's padding
    does), ragged lengths of at least t."""
    n_pool = b * n_pg + 3
    q = _rand(rng, (b, t, h, hd))
    k, v = _rand(rng, (layers, n_pool, page, kv, hd)), _rand(rng, (layers, n_pool, page, kv, hd))
    table = jnp.asarray(rng.permutation(n_pool)[: b * n_pg].reshape(b, n_pg), jnp.int32)
    if lengths is None:
        lengths = rng.integers(t, n_pg * page + 1, (b,))
    sinks = _rand(rng, (h,), jnp.float32) if sink else None
    return (q, k, v, table, jnp.asarray(lengths, jnp.int32)), dict(window=window, sinks=sinks, scale=hd**-0.5)


def _paged_ops(q, k, v, table, lengths, layer, *, window, sinks, scale, gather=False):
    """The engine's call (ops.attention_paged: the kernel on Hopper, else the jnp path), or with ``gather`` its jnp
    reference, for the case's layer ``layer``."""
    t = q.shape[1]
    q_pos = lengths[:, None] - t + jnp.arange(t)[None]
    if gather:
        return attention_paged_gather(q, k, v, q_pos, layer, table, window=window or 0, sinks=sinks, scale=scale)
    kw = dict(window=window or 0, sinks=sinks, scale=scale, kernels=ops.resolve_kernels())
    return ops.attention_paged(q, k, v, q_pos, layer, table, **kw)


def _jit(fn, **kw):
    """``fn(*arrays, **kw)`` jitted (interpret mode and the references run ~4x faster compiled than eagerly)."""
    return jax.jit(lambda *arrays: fn(*arrays, **kw))


@pytest.mark.parametrize(
    ("b", "t", "h", "kv", "hd", "page", "n_pg", "window", "sink", "splits", "lengths"),
    [
        # decode rows, four q heads per kv head, sinks and a window, split-K over two splits of the pages
        (3, 1, 8, 2, 64, 16, 12, 50, True, 2, [5, 100, 192]),
        # three tokens per row, pages of 8 (eight copies per 64-key block), one row longer than its table, one
        # padding row (length 1: two queries see no key and come out 0, not 0 / 0)
        (3, 3, 6, 2, 64, 8, 10, None, False, 3, [80, 95, 1]),
        # pages longer than a block (two blocks per page), one query head per kv head
        (2, 1, 2, 2, 64, 128, 3, None, True, None, [1, 300]),
    ],
)
def test_paged_interpret_matches_the_jnp_path(b, t, h, kv, hd, page, n_pg, window, sink, splits, lengths):
    """The kernel over shuffled pages of layer 1 of a 2-layer pool equals ops.attention_paged's jnp path."""
    rng = np.random.default_rng(b * page + t)
    args, kw = _paged_case(
        rng, b, t, h, kv, hd, page=page, n_pg=n_pg, window=window, sink=sink, layers=2, lengths=lengths
    )
    q, k, v, table, lens = args
    kernel = _jit(pallas.paged_decode_attention, layer=1, splits=splits, interpret=True, **kw)
    got = kernel(*args)
    assert got.shape == q.shape
    assert rel_err(got, _jit(_paged_ops, gather=True, **kw)(q, k, v, table, lens, 1)) < 1e-2
    assert rel_err(got, _jit(da.paged_reference, **kw)(q, k[1], v[1], table, lens)) < 1e-2


@pytest.mark.parametrize(
    ("b", "h", "kv", "hd", "page", "n_pg", "window", "sink"),
    [
        (64, 32, 8, 128, 16, 256, None, False),  # Qwen3-8B, 4k context
        (4, 64, 8, 64, 16, 2048, 128, True),  # gpt-oss: window and sinks over 32k of table
        (2, 16, 4, 256, 32, 64, None, False),  # Gemma-3's head dim
        (2, 8, 8, 128, 4096, 1, None, True),  # the contiguous layout
    ],
)
def test_paged_kernel_lowers_for_cuda(b, h, kv, hd, page, n_pg, window, sink):
    """The full Mosaic GPU lowering (layouts, TMA descriptors, shared-memory budget) runs on the CPU box."""

    def f(q, k, v, table, lengths, layer, sinks):
        return pallas.paged_decode_attention(
            q, k, v, table, lengths, layer=layer, window=window, sinks=sinks, scale=hd**-0.5
        )

    sds = jax.ShapeDtypeStruct
    pool = sds((2, b * n_pg, page, kv, hd), jnp.bfloat16)
    sinks = sds((h,), jnp.float32) if sink else None
    args = (sds((b, 1, h, hd), jnp.bfloat16), pool, pool, sds((b, n_pg), jnp.int32), sds((b,), jnp.int32))
    jax.export.export(jax.jit(f), platforms=["cuda"])(*args, sds((), jnp.int32), sinks)


def test_paged_page_sizes():
    assert pallas.supports_paged(16, 256, 128) and pallas.supports_paged(128, 8, 128)
    assert pallas.supports_paged(4104, 1, 128)  # one page per row: the contiguous layout
    assert not pallas.supports_paged(24, 8, 128) and not pallas.supports_paged(96, 2, 128)
    assert not pallas.supports_paged(12, 8, 128) and not pallas.supports_paged(16, 8, 512)
    q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    pool = jnp.zeros((4, 24, 2, 64), jnp.bfloat16)
    with pytest.raises(KernelError, match="paged_decode_attention"):
        pallas.paged_decode_attention(q, pool, pool, jnp.zeros((1, 2), jnp.int32), jnp.array([8]), scale=1.0)


def test_attention_errors_name_shapes():
    q = jnp.zeros((1, 4, 4, 96), jnp.bfloat16)
    kv = jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
    with pytest.raises(KernelError, match=r"\(1, 4, 4, 96\)"):
        pallas.flash_attention(q, kv, kv, scale=1.0)
    with pytest.raises(KernelError, match="decode_attention"):
        pallas.decode_attention(q, kv, kv, jnp.array([8]), scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "t", "s", "h", "kv", "hd", "causal", "window", "sink"),
    [
        (1, 4096, 4096, 32, 8, 128, True, None, False),
        (2, 333, 333, 16, 4, 256, True, None, False),
        (1, 1000, 1000, 64, 8, 64, True, 128, True),
        (1, 17, 300, 8, 8, 128, True, None, True),
        (1, 256, 256, 4, 2, 128, False, None, False),
    ],
)
def test_flash_gpu(b, t, s, h, kv, hd, causal, window, sink):
    rng = np.random.default_rng(t + s + hd)
    f = jax.jit(pallas.flash_attention, static_argnames=("causal", "window", "scale"))
    for _ in range(2):  # fresh inputs: stale output cannot match twice
        args, kw = _flash_case(rng, b, t, s, h, kv, hd, causal=causal, window=window, sink=sink)
        assert rel_err(f(*args, **kw), fa.reference(*args, **kw)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "t", "s_max", "h", "kv", "hd", "window", "sink"),
    [
        (1, 1, 4096, 32, 8, 128, None, False),
        (3, 1, 1000, 16, 4, 256, None, False),
        (2, 1, 2048, 64, 8, 64, 128, True),
        (2, 3, 520, 9, 3, 64, None, True),
        (1, 17, 4104, 32, 8, 128, None, False),
    ],
)
def test_decode_gpu(b, t, s_max, h, kv, hd, window, sink):
    rng = np.random.default_rng(t + s_max + hd)
    f = jax.jit(pallas.decode_attention, static_argnames=("window", "scale"))
    for layer in (None, 1):  # one layer's cache, or layer 1 read in place from a stack of 2
        args, kw = _decode_case(rng, b, t, s_max, h, kv, hd, window=window, sink=sink, tail=3.0)
        stacked = args if layer is None else _stack_layers(rng, args, 2, layer)
        assert rel_err(f(*stacked, layer=layer, **kw), da.reference(*args, **kw)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "t", "h", "kv", "hd", "page", "n_pg", "window", "sink"),
    [
        (16, 1, 32, 8, 128, 16, 256, None, False),  # Qwen3-8B, 4k context
        (3, 1, 16, 4, 256, 16, 70, None, False),
        (2, 1, 64, 8, 64, 16, 128, 128, True),  # gpt-oss sliding layer
        (2, 3, 9, 3, 64, 8, 65, None, True),
        (1, 17, 32, 8, 128, 16, 257, None, False),  # a chunk of 17 tokens
        (2, 1, 32, 8, 128, 128, 20, None, False),  # pages of two blocks
        (1, 1, 32, 8, 128, 16, 2048, None, False),  # 32k context: many splits
    ],
)
def test_paged_gpu(b, t, h, kv, hd, page, n_pg, window, sink):
    """The kernel against the f32 reference, called directly and through ops.attention_paged (its kernel path on
    Hopper), reading layer 1 of a two-layer pool."""
    rng = np.random.default_rng(t + n_pg + hd)
    f = jax.jit(pallas.paged_decode_attention, static_argnames=("window", "scale"))
    paged_ops = jax.jit(_paged_ops, static_argnames=("window", "scale"))
    for _ in range(2):  # fresh inputs: stale output cannot match twice
        args, kw = _paged_case(rng, b, t, h, kv, hd, page=page, n_pg=n_pg, window=window, sink=sink, layers=2)
        q, k, v, table, lens = args
        ref = da.paged_reference(q, k[1], v[1], table, lens, **kw)
        assert rel_err(f(*args, layer=jnp.int32(1), **kw), ref) < 1e-2
        assert rel_err(paged_ops(q, k, v, table, lens, jnp.int32(1), **kw), ref) < 1e-2
