"""The Pallas kernels under tensor parallelism: a kernel-layout weight split over the mesh axis ``tp``, and the
kernels run per shard inside ``jax.shard_map``.

A ``ShardedWeight`` is a matrix (or a stack of experts) repacked shard by shard: device s holds exactly what
``pallas.repack`` makes of its own sub-matrix, so the single-device kernel runs on it unchanged.

- column-parallel (``N``): rows s of the matrix. Each shard pads its rows to the kernel's N multiple (128) on its
  own, so the padding sits inside every shard, never only at the end of the whole matrix;
- row-parallel (``K``): columns s. Each shard pads its K to the kernel's K step (256) on its own; the partial
  products are summed by a ``psum`` (XLA's all-reduce);
- ``EXPERTS``: experts s of a stack, whole;
- ``WHOLE``: a matrix the rules leave unsplit, repacked whole on every device.

Globally the leaf's arrays are the shards' arrays side by side along the split axis: ``qs`` [*stack, N, K bytes]
along N (axis -2) or K (-1), the K-major ``scales`` [*stack, K blocks, N] along N (-1) or K (-2), the experts
along -3. A ``NamedSharding`` over ``tp`` on that axis then hands each device its own shard, and the leaf's static
metadata (format, logical shape, ``ShardLayout``) says how to read it, as a QTensor's does (DESIGN rule 1).

Only the activations move: a column-parallel product reads x whole and leaves y split along N; a row-parallel
one reads x split along K (what the column-parallel product before it left) and all-reduces y. Everything
between the products stays in the global view for XLA's SPMD partitioner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imp_jax.gguf.qtensor import QTensor

if TYPE_CHECKING:
    import pallas

TP = "tp"  # the mesh axis of tensor parallelism

N = "n"  # column-parallel: rows
K = "k"  # row-parallel: columns, in whole GGUF blocks
EXPERTS = "experts"  # a stack of experts, by expert
WHOLE = ""  # not split: the whole matrix on every device

# axis (from the end) of each array that a split divides: the stored blocks and qs are [..., N, K bytes], the
# scale planes K-major [..., K blocks, N]; a stack of experts leads both
_QS_AXIS = {N: -2, K: -1, EXPERTS: -3}
_SCALES_AXIS = {N: -1, K: -2, EXPERTS: -3}


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How a kernel-layout weight lies on ``mesh``: which of its axes ``split`` divides over the mesh axis
    ``axis`` (static metadata of the leaf)."""

    mesh: Mesh
    split: str = WHOLE
    axis: str = TP

    @property
    def shards(self) -> int:
        return int(self.mesh.shape[self.axis]) if self.split else 1

    @property
    def words(self) -> str:
        """The layout as the plan's report says it."""
        split = {N: "rows", K: "K", EXPERTS: "experts"}.get(self.split)
        return f"{split} split over {self.axis}" if split else "whole on every device"

    def shard_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The logical [N, K] of one shard's matrix."""
        n, k = shape
        if self.split == N:
            return n // self.shards, k
        if self.split == K:
            return n, k // self.shards
        return n, k

    def _spec(self, ndim: int, axis_of: dict[str, int]) -> PartitionSpec:
        axes: list[str | None] = [None] * ndim
        if self.split:
            axes[axis_of[self.split]] = self.axis
        return PartitionSpec(*axes)

    def stored_spec(self, ndim: int) -> PartitionSpec:
        """The split of a QTensor's blocks [..., N, K bytes] (K in whole blocks)."""
        return self._spec(ndim, _QS_AXIS)

    def packed_specs(self, qs_ndim: int, scale_ndims: tuple[int, ...]) -> tuple[PartitionSpec, tuple]:
        """The splits of ``qs`` and of each scale plane."""
        return self._spec(qs_ndim, _QS_AXIS), tuple(self._spec(d, _SCALES_AXIS) for d in scale_ndims)

    def x_spec(self, ndim: int) -> PartitionSpec:
        """The activations x [..., K] a shard reads: its own K columns for a row-parallel matrix, else whole."""
        return PartitionSpec(*[None] * (ndim - 1), self.axis) if self.split == K else PartitionSpec()

    def y_spec(self, ndim: int) -> PartitionSpec:
        """The product y [..., N]: split along N for a column-parallel matrix, else whole (all-reduced)."""
        return PartitionSpec(*[None] * (ndim - 1), self.axis) if self.split == N else PartitionSpec()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedWeight:
    """A ``pallas.PackedWeight`` per device (see the module docstring): ``qs`` and ``scales`` are the shards'
    arrays side by side, ``shape`` the logical [N, K] of the whole matrix."""

    qs: jax.Array
    scales: tuple[jax.Array, ...]
    fmt: Any = dataclasses.field(metadata=dict(static=True))  # pallas.Fmt (pallas is imported lazily)
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    layout: ShardLayout = dataclasses.field(metadata=dict(static=True))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes (layers, experts) of the whole leaf."""
        return tuple(self.qs.shape[:-2])

    def local(self, qs: jax.Array, scales: tuple[jax.Array, ...]) -> pallas.PackedWeight:
        """One device's shard (inside ``shard_map``): the leaf ``pallas.repack`` made of its sub-matrix."""
        import pallas

        return pallas.PackedWeight(qs, tuple(scales), self.fmt, self.layout.shard_shape(self.shape))

    def shardings(self) -> ShardedWeight:
        """The leaf's tree of ``NamedSharding``s: each device its own shard."""
        qs, scales = self.layout.packed_specs(self.qs.ndim, tuple(s.ndim for s in self.scales))
        mesh = self.layout.mesh
        return dataclasses.replace(
            self, qs=NamedSharding(mesh, qs), scales=tuple(NamedSharding(mesh, s) for s in scales)
        )


def repack(w: QTensor, layout: ShardLayout, repack_one: Callable[[QTensor], Any]) -> ShardedWeight:
    """A QTensor whose blocks lie split by ``layout`` (``weights.sharding``), repacked on every device from its
    own blocks by ``repack_one`` (``ops.matmul``'s single-device repack): no device ever holds another's shard,
    and no matrix is ever whole on one device."""
    import pallas

    fmt = pallas.qformats.kernel_format(w.qtype)
    local = layout.shard_shape(w.shape)
    stack = w.data.ndim - 2
    qs, scales = layout.packed_specs(stack + 2, (stack + 2,) * len(fmt.spec.blocks))

    def one(data: jax.Array):
        return repack_one(QTensor(data, None, w.qtype, local))

    out_specs = pallas.PackedWeight(qs, scales, fmt, local)
    packed = jax.shard_map(one, mesh=layout.mesh, in_specs=layout.stored_spec(w.data.ndim), out_specs=out_specs)(w.data)
    return ShardedWeight(packed.qs, packed.scales, fmt, tuple(w.shape), layout)


def matmul(x: jax.Array, w: ShardedWeight, expert_ids: jax.Array | None = None, *, interpret: bool = False):
    """``pallas.quantized_matmul`` on every device's shard (``shard_map``): ``x @ W.T`` [..., N], or with a stack
    of experts ``x[g] @ W[expert_ids[g]].T`` [G, R, N].

    Column-parallel shards give y split along N; row-parallel ones partial sums, all-reduced in f32; a shard of
    experts computes the groups routed to its own experts (the others read a local expert and are zeroed), and
    the groups' products are all-reduced. The result is f32 where it was all-reduced, else x's dtype.
    """
    import pallas

    layout = w.layout
    qs_spec, scale_specs = layout.packed_specs(w.qs.ndim, tuple(s.ndim for s in w.scales))
    ids = () if expert_ids is None else (expert_ids,)

    def one(x: jax.Array, qs: jax.Array, scales: tuple, *ids: jax.Array) -> jax.Array:
        local = w.local(qs, scales)
        if layout.split == EXPERTS:
            count = qs.shape[-3]
            mine = ids[0] - jax.lax.axis_index(layout.axis) * count
            owned = (mine >= 0) & (mine < count)
            y = pallas.quantized_matmul(x, local, expert_ids=jnp.clip(mine, 0, count - 1), interpret=interpret)
            return jax.lax.psum(jnp.where(owned[:, None, None], y.astype(jnp.float32), 0.0), layout.axis)
        y = pallas.quantized_matmul(x, local, expert_ids=ids[0] if ids else None, interpret=interpret)
        return jax.lax.psum(y.astype(jnp.float32), layout.axis) if layout.split == K else y

    in_specs = (layout.x_spec(x.ndim), qs_spec, scale_specs, *(PartitionSpec() for _ in ids))
    run = jax.shard_map(one, mesh=layout.mesh, in_specs=in_specs, out_specs=layout.y_spec(x.ndim), check_vma=False)
    return run(x, w.qs, w.scales, *ids)


def by_kv_head(
    fn: Callable[..., jax.Array], mesh: Mesh | None, heads: dict[str, tuple[jax.Array | None, int]], **whole
) -> jax.Array:
    """``fn(**heads, **whole)`` for an attention kernel, per kv-head shard: the arrays of ``heads`` (name ->
    (array or None, its head axis)) split along that axis over ``tp`` (as the KV pages are), the arrays of
    ``whole`` passed to every device as they are; the output [B, T, H, D] split by head. The kv heads must
    divide over the mesh (``splits_kv_heads``); without a mesh it is ``fn`` on the whole arrays."""
    mine = {name: a for name, (a, _) in heads.items() if a is not None}
    if mesh is None or int(mesh.shape[TP]) == 1:
        return fn(**mine, **whole)
    specs = ({name: _at(a.ndim, heads[name][1]) for name, a in mine.items()}, {name: PartitionSpec() for name in whole})
    run = jax.shard_map(
        lambda mine, whole: fn(**mine, **whole), mesh=mesh, in_specs=specs, out_specs=_at(4, 2), check_vma=False
    )
    return run(mine, whole)


def splits_kv_heads(mesh: Mesh | None, n_kv: int) -> bool:
    """Whether the attention kernels run per kv-head shard on ``mesh``: the kv heads divide evenly over ``tp``
    (as the KV pages then do, ``weights.sharding.cache_sharding``)."""
    return mesh is None or n_kv % int(mesh.shape[TP]) == 0


def _at(ndim: int, axis: int) -> PartitionSpec:
    axes: list[str | None] = [None] * ndim
    axes[axis] = TP
    return PartitionSpec(*axes)
