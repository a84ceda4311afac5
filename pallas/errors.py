"""The one error the kernels raise on purpose.

``pallas`` imports nothing from ``imp_jax``, so it is a package of its own that any JAX program can use; the
dispatch points in ``imp_jax.ops`` raise it again as ``imp_jax.errors.KernelError`` (an ``ImpError``, which the
CLI reports as one line).
"""

from __future__ import annotations


class KernelError(Exception):
    """A kernel cannot run for these shapes or dtypes (the message names op, shapes and dtypes)."""
