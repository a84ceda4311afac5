"""``TensorSpec``: where one params leaf comes from, and the helpers that walk a tree of them.

The params tree is built once with these leaves (``weights.specs.param_specs``) and turned into device arrays
(``weights.loading``) or abstract shapes (planning) from the same tree, so planning and loading cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from imp_jax.gguf.qtensor import row_bytes


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one params leaf comes from: one GGUF tensor, or one per unit stacked on a leading axis."""

    names: tuple[str, ...]
    qtype: int
    shape: tuple[int, ...]  # logical numpy-order shape of one tensor
    dtype: str | None  # dense target dtype; None keeps the packed blocks (QTensor)
    stacked: bool
    scale_names: tuple[str, ...] = ()  # NVFP4 per-tensor scales
    gathered: bool = False  # read by row (the embedding table), so never repacked for a matmul kernel
    fused: tuple[tuple[str, ...], ...] = ()  # tensors concatenated after ``names`` along N, each its names per unit
    rows: tuple[int, ...] = ()  # with ``fused``: N of every part, this spec's own first (``shape`` has their sum)
    axes: tuple[str | None, ...] = ()  # logical axis of each dim of ``shape`` (weights.sharding.RULES maps them)
    matrix: bool = False  # read only by the matrix products (ops.matmul, ops.expert_matmul)
    per_unit: bool = False  # stacked, but held as one leaf per unit (ops.UnitArrays; see ``per_unit_matrices``)

    @property
    def parts(self) -> tuple[tuple[str, ...], ...]:
        """Per part (one unless fused), the GGUF tensor names per unit."""
        return (self.names, *self.fused)

    @property
    def labels(self) -> tuple[str, ...]:
        """Per unit, the tensor's name (fused parts' names joined by '+'), for messages."""
        return tuple("+".join(unit) for unit in zip(*self.parts, strict=True))

    @property
    def stack(self) -> tuple[int, ...]:
        return (len(self.names),) if self.stacked else ()

    def unit(self, u: int) -> TensorSpec:
        """The spec of unit ``u`` alone (unstacked)."""
        return dataclasses.replace(
            self,
            names=self.names[u : u + 1],
            fused=tuple(names[u : u + 1] for names in self.fused),
            stacked=False,
            per_unit=False,
            scale_names=self.scale_names[u : u + 1],
        )

    @property
    def qshape(self) -> tuple[int, ...]:
        """The QTensor's matrix shape; leading axes (experts) become stack axes."""
        return self.shape[-2:]

    @property
    def nbytes(self) -> int:
        n = len(self.names)
        if self.dtype is None:
            return n * int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.qtype, self.shape[-1])
        return n * int(np.prod(self.shape, dtype=np.int64)) * jnp.dtype(self.dtype).itemsize


ROPE = "<rope>"  # the per-layer rope table is computed from the config, not read from the file


def tensor_name(kind: MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = TENSOR_NAMES[kind]
    base = base.format(bid=layer) if layer is not None else base
    return f"{base}.{suffix}" if suffix else base


def is_spec(x) -> bool:
    return isinstance(x, TensorSpec)


def map_specs[T](fn: Callable[[TensorSpec], object], specs: T) -> T:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def per_unit_matrices[T](specs: T) -> T:
    """The spec tree with every stacked matrix held one leaf per unit (a ``KernelPolicy`` with ``unit_arrays``):
    the products read each unit's matrix in place, where XLA:CPU copies a slice of a stacked one before its dot.
    Norms, biases and other small stacked leaves stay stacked (their slices cost nothing)."""
    return map_specs(lambda s: dataclasses.replace(s, per_unit=True) if s.stacked and s.matrix else s, specs)
