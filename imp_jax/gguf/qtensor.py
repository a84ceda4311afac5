"""The packed quantized weight leaf.

A weight's format travels with its data (DESIGN rule 1): the qtype and the logical shape are static pytree
metadata of the same leaf that holds the packed bytes, so no transform can change one without the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from imp_jax.gguf.quant import dequantize_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """Packed GGUF blocks of one weight, kept on the device as stored in the file.

    ``data`` is uint8 ``[*stack, *shape[:-1], row_bytes]`` where ``row_bytes`` is the packed size of one row of
    ``shape[-1]`` elements. Leading ``stack`` axes (layers, experts) are allowed so that stacked weights slice
    cleanly under ``lax.scan``; ``shape`` is always the logical numpy-order shape of one unstacked tensor.
    ``scale`` is the per-tensor f32 scale NVFP4 applies after the matmul, else None.
    """

    data: jax.Array
    scale: jax.Array | None
    qtype: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def qtype_name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[: self.data.ndim - len(self.shape)])

    @property
    def full_shape(self) -> tuple[int, ...]:
        """Logical shape including stack axes."""
        return self.stack_shape + self.shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data.shape)) + (4 if self.scale is not None else 0)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight as a dense array of ``full_shape`` (exact in f32; rounded once to ``dtype``)."""
        out = dequantize_rows(self.data, self.qtype)
        if self.scale is not None:
            out = out * jnp.asarray(self.scale, jnp.float32)[..., *([None] * len(self.shape))]
        return out.reshape(self.full_shape).astype(dtype)


def row_bytes(qtype: int, cols: int) -> int:
    """Packed bytes of one row of ``cols`` elements of ``qtype``."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return cols // block * type_size
