"""The dequantized fallback: packed weights turned into dense compute-dtype arrays once, at load time.

This is imp's FP16 fallback made explicit and plannable. A ``TensorSpec`` whose ``dtype`` is set although its
stored qtype is a block format means: read the packed blocks, dequantize them once on the device, keep only the
dense array. It costs 2-4x the packed bytes (the planner counts them, and the packed copy that exists while one
leaf converts) and saves the reference path's dequantization inside every step. Which leaves take it is the
planner's choice (``imp_jax.planning.memory``); nothing here decides.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import is_quantized
from imp_jax.weights.tensor_spec import TensorSpec, map_specs


def is_fallback(spec: TensorSpec) -> bool:
    """A quantized tensor that is kept dense on the device."""
    return spec.dtype is not None and is_quantized(spec.qtype)


def packed_spec(spec: TensorSpec) -> TensorSpec:
    """The form a fallback leaf is read in before it is dequantized."""
    return dataclasses.replace(spec, dtype=None)


def fallback_specs(specs, dtype: str, *, keep: Callable[[TensorSpec], bool] = lambda spec: False):
    """The spec tree with every packed leaf (except those ``keep`` names) turned dense in ``dtype``."""

    def convert(spec: TensorSpec) -> TensorSpec:
        if spec.dtype is not None or keep(spec):
            return spec
        return dataclasses.replace(spec, dtype=dtype)

    return map_specs(convert, specs)


@functools.partial(jax.jit, static_argnames=("dtype",))
def to_dense(w: QTensor, dtype: str) -> jax.Array:
    """The dense ``full_shape`` array of a packed leaf, one stacked slice at a time.

    ``lax.map`` over the stack axes keeps the transient at one layer's decode instead of the whole stack in f32
    (a 64-layer FFN weight would otherwise need 30+ GB of f32 scratch just to be converted).
    """
    stack = w.stack_shape
    if not stack:
        return w.dequantize(dtype)
    flat = QTensor(
        w.data.reshape(-1, *w.data.shape[len(stack) :]),
        None if w.scale is None else w.scale.reshape(-1),
        w.qtype,
        w.shape,
    )
    return jax.lax.map(lambda one: one.dequantize(dtype), flat).reshape(w.full_shape)
