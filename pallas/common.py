"""Small helpers shared by the kernels and their jnp references."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def lowered_once(make: Callable) -> Callable:
    """A kernel factory (static geometry -> ``plgpu.kernel``) made to return one cached jitted kernel per geometry:
    JAX lowers a jitted call once per program however many layers, units or segments call it, where the bare
    kernel was lowered at every call site (a Q4_K_M 8B decode step: 32 Mosaic GPU lowerings of 9 kernels, 10 s
    of Python)."""
    return functools.cache(functools.wraps(make)(lambda *geometry: jax.jit(make(*geometry))))


def interpret_params(interpret: bool):
    """The ``interpret=`` argument of ``plgpu.kernel``: CPU simulation (uninitialized memory reads as NaN)."""
    return plgpu.InterpretGPUParams() if interpret else None


def mma_accumulate(acc: jax.Array, a: jax.Array, b, *, interpret: bool, staging=None) -> jax.Array:
    """``acc + a @ b`` for a register accumulator value ``acc`` and a register A operand; waits for the result.

    On the GPU the MMA accumulates into ``acc``'s registers in place (``pl.run_state``); the interpreter cannot
    discharge that, so it computes ``a @ b`` into a fresh accumulator and adds.
    """
    if not interpret:
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))

    def fresh(acc_ref):
        wgmma_from_regs(acc_ref, a, b, interpret=True, staging=staging)
        return acc_ref[...]

    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, acc.dtype))


def wgmma_from_regs(acc_ref, a: jax.Array, b, *, interpret: bool, staging=None) -> None:
    """``acc_ref += a @ b`` with ``a`` an array in registers (asynchronous on the GPU, like ``plgpu.wgmma``).

    Mosaic GPU's interpreter only takes the A operand from shared memory, so in interpret mode ``a`` goes
    through ``staging`` (an SMEM ref of a's shape; a scoped buffer when None, which the interpreter allows only
    outside warp-specialized branches); on the GPU it stays in registers.
    """
    if not interpret:
        plgpu.wgmma(acc_ref, a, b)
        return

    def via_smem(a_smem):
        a_smem[...] = a
        plgpu.wgmma(acc_ref, a_smem, b)
        plgpu.wgmma_wait(0)

    if staging is None:
        pl.run_scoped(via_smem, plgpu.SMEM(a.shape, a.dtype))
    else:
        via_smem(staging)


def softmax_with_sinks_apply(s, v, sinks):
    """softmax over the last axis of scores ``[B, H, T, S]`` (plus a sink logit per head) applied to v; a row
    that sees no key (all scores -inf, no sink) gives 0, as the kernels do."""
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, None, None])
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        den = den + jnp.exp(sinks.astype(jnp.float32)[None, :, None, None] - m)
    return jnp.einsum("bhts,bshd->bthd", p / jnp.where(den == 0, 1.0, den), v)
