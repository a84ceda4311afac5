"""Flash and decode attention kernels against f32 jnp references: interpret mode on CPU, real shapes on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas
from imp_jax.errors import KernelError
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


def test_decode_interpret_reads_one_layer_of_the_stack():
    rng = np.random.default_rng(5)
    args, kw = _decode_case(rng, 2, 1, 128, 4, 2, 64, window=None, sink=False)
    got = pallas.decode_attention(*_stack_layers(rng, args, 3, 2), layer=jnp.int32(2), interpret=True, **kw)
    assert rel_err(got, da.reference(*args, **kw)) < 1e-2


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
