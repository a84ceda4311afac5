"""Tensor parallelism: logical axes of the params tree, the one rules table that maps them to the mesh axis ``tp``,
and the shardings of params and caches that follow from it.

Every ``TensorSpec`` names the logical axis of each dim of its matrix (``with_axes``, from its field); ``RULES``
maps those names to mesh axes (the scheme of jax-llm-examples' logical rules). A dim is split over ``tp`` only
where it divides evenly and, for packed blocks, only in whole blocks: N (rows) for column-parallel matrices, K
for row-parallel ones when its blocks divide. A leaf uses ``tp`` once: the first of its dims that can take it
(an MoE stack splits by expert when the experts divide, else by ffn). Anything else is replicated, which is
always correct: the forward is written in the global view and XLA's SPMD partitioner inserts the all-reduce
after row-parallel matmuls and the all-gather of vocab-sharded logits. Under the Pallas kernels a matrix is
repacked shard by shard (``layout``, ``prepared``: an ``ops.sharded.ShardedWeight``) and its kernel runs per
shard inside ``shard_map``, with the same collectives.

Fused matrices (q|k|v, gate|up, the GDN qkv|z) are laid out per shard (``models.layers.fused_shards``): shard s
holds rows s of every part, so each device holds its own heads' q, k and v and splits them locally.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import imp_jax.ops.policy as policy
from imp_jax import ops
from imp_jax.errors import ImpError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import is_quantized
from imp_jax.models.config import ModelConfig
from imp_jax.models.layers import fused_shards
from imp_jax.ops.sharded import EXPERTS, TP, WHOLE, K, N, ShardedWeight, ShardLayout
from imp_jax.weights.tensor_spec import TensorSpec, is_spec

# logical axis -> mesh axis (None: replicated). The one table every sharding below comes from.
RULES: dict[str, str | None] = {
    "heads": TP,
    "kv_heads": TP,
    "ffn": TP,
    "experts": TP,
    "vocab": TP,
    "embed": None,
}

_COLUMN = ("heads", "embed")
# field -> the logical axis of each dim of its (unstacked) matrix or vector; fields not listed are replicated.
# The GDN mixer shards by value head: z, the gates, the decay and ssm_out follow the value heads, and the conv
# channels (q|k|v) split with them. The router stays whole: every device routes every token.
FIELD_AXES: dict[str, tuple[str | None, ...]] = {
    "wq": _COLUMN,
    "wqkv": _COLUMN,
    "wk": ("kv_heads", "embed"),
    "wv": ("kv_heads", "embed"),
    "wo": ("embed", "heads"),
    "bq": ("heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "sinks": ("heads",),
    "w_gate": ("ffn", "embed"),
    "w_up": ("ffn", "embed"),
    "w_gate_up": ("ffn", "embed"),
    "w_down": ("embed", "ffn"),
    "w_qkv": _COLUMN,
    "w_z": _COLUMN,
    "w_qkvz": _COLUMN,
    "w_alpha": _COLUMN,
    "w_beta": _COLUMN,
    "w_alpha_beta": _COLUMN,
    "w_ba": _COLUMN,
    "w_in": _COLUMN,
    "w_out": ("embed", "heads"),
    "conv": ("heads", None),
    "dt_bias": ("heads",),
    "ssm_a": ("heads",),
    "gate_exps": ("experts", "ffn", "embed"),
    "up_exps": ("experts", "ffn", "embed"),
    "gate_up_exps": ("experts", "ffn", "embed"),
    "down_exps": ("experts", "embed", "ffn"),
    "gate_bias": ("experts", "ffn"),
    "up_bias": ("experts", "ffn"),
    "down_bias": ("experts", "embed"),
    "shared_gate": ("ffn", "embed"),
    "shared_up": ("ffn", "embed"),
    "shared_gate_up": ("ffn", "embed"),
    "shared_down": ("embed", "ffn"),
    "embed": ("vocab", "embed"),
    "output": ("vocab", "embed"),
}


def with_axes(specs):
    """The spec tree with every leaf's logical axes set from its field name (``FIELD_AXES``)."""

    def one(path, spec):
        if not isinstance(spec, TensorSpec):
            return spec
        axes = FIELD_AXES.get(getattr(path[-1], "name", ""), ())
        return dataclasses.replace(spec, axes=axes if len(axes) == len(spec.shape) else (None,) * len(spec.shape))

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


# --- meshes -------------------------------------------------------------------------------------------------


def make_mesh(devices: int | Mesh | None = None, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh ``load`` / ``plan_memory`` run on: ``mesh`` as given (it needs a ``tp`` axis), else the first
    ``devices`` devices along ``tp``; None for a single device without a mesh (the unsharded program)."""
    if mesh is not None:
        if TP not in mesh.axis_names:
            raise ImpError(f"the mesh has axes {mesh.axis_names}; tensor parallelism needs one named '{TP}'")
        return mesh
    n = 1 if devices is None else devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ImpError(f"devices must be a positive number of devices, got {devices!r}")
    if n == 1:
        return None
    available = jax.devices()
    if n > len(available):
        raise ImpError(
            f"devices={n} asks for more devices than the {len(available)} {available[0].platform} device(s) here"
            + (
                " (XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N on CPU)"
                if available[0].platform == "cpu"
                else ""
            )
        )
    return Mesh(available[:n], (TP,))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[TP])


# --- params -------------------------------------------------------------------------------------------------


def _splits(spec: TensorSpec, dim: int, n: int, shards: int) -> bool:
    """Whether dim ``dim`` of length n splits evenly over ``shards``: fused rows part by part, packed K in
    whole blocks."""
    if n % shards:
        return False
    last = dim == len(spec.shape) - 1
    if last and is_quantized(spec.qtype):
        return (n // GGML_QUANT_SIZES[GGMLQuantizationType(spec.qtype)][0]) % shards == 0
    if dim == len(spec.shape) - 2 and spec.fused:
        return fused_shards(spec.rows, shards) == shards
    return True


def dim_axes(spec: TensorSpec, shards: int) -> tuple[str | None, ...]:
    """The mesh axis of each logical dim of ``spec.shape``: ``tp`` on the first dim whose logical axis maps to it
    and splits evenly, None elsewhere."""
    out: list[str | None] = [None] * len(spec.shape)
    if shards == 1:
        return tuple(out)
    for dim, (name, n) in enumerate(zip(spec.axes, spec.shape, strict=False)):
        if name is not None and RULES[name] == TP and _splits(spec, dim, n, shards):
            out[dim] = TP
            break
    return tuple(out)


def part_sharding(spec: TensorSpec, mesh: Mesh | None) -> NamedSharding | None:
    """Where one stored tensor of the leaf goes on the way in (its dims as stored: packed rows for blocks)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(*dim_axes(spec, tp_size(mesh))))


def layout(spec: TensorSpec, mesh: Mesh | None) -> ShardLayout | None:
    """How the kernel layout of the leaf's matrix lies on ``mesh`` (None on one device): split as the rules split
    its blocks, along N, K or the experts, else whole on every device."""
    if mesh is None:
        return None
    axes = dim_axes(spec, tp_size(mesh))
    if TP not in axes:
        return ShardLayout(mesh, WHOLE)
    from_end = axes.index(TP) - len(axes)
    return ShardLayout(mesh, {-2: N, -1: K}.get(from_end, EXPERTS))


def prepared(
    spec: TensorSpec, w: QTensor, kernels: policy.KernelPolicy, mesh: Mesh | None = None, *, check: bool = True
):
    """The packed leaf in the layout ``kernels`` reads (``ops.prepare_weight``, ``check`` as there; over ``mesh``
    every device repacks its own shard). A table gathered by row (the embedding) is repacked only for the native
    CPU kernel (``ops.repacks``): with the Pallas kernels a tied output head takes the reference path."""
    return ops.prepare_weight(w, kernels, check=check, layout=layout(spec, mesh), gathered=spec.gathered)


def leaf_sharding(spec: TensorSpec, mesh: Mesh, leaf):
    """The sharding tree of one materialized (or abstract) leaf: a QTensor's packed rows split like the matrix
    (its NVFP4 scale replicated); a dense array likewise; a kernel's repacked weight by its own layout."""
    axes = (None,) * len(spec.stack) + dim_axes(spec, tp_size(mesh))
    if isinstance(leaf, ShardedWeight):
        return leaf.shardings()
    if isinstance(leaf, QTensor):
        scale = None if leaf.scale is None else NamedSharding(mesh, PartitionSpec())
        return QTensor(NamedSharding(mesh, PartitionSpec(*axes)), scale, leaf.qtype, leaf.shape)
    if hasattr(leaf, "shape") and len(leaf.shape) == len(axes):
        return NamedSharding(mesh, PartitionSpec(*axes))
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), leaf)


@functools.partial(jax.jit, static_argnames=("shards",))
def join_fused(parts: Sequence[jax.Array], shards: int) -> jax.Array:
    """Fused parts [..., n_i, C] joined along N (axis -2) in ``shards`` per-shard groups (``fused_shards``): group
    s is rows s of every part. Each device joins its own rows: nothing moves between devices."""
    lead, width = parts[0].shape[:-2], parts[0].shape[-1]
    grouped = [p.reshape(*lead, shards, p.shape[-2] // shards, width) for p in parts]
    joined = jnp.concatenate(grouped, axis=-2)
    return joined.reshape(*lead, sum(p.shape[-2] for p in parts), width)


def _relaid(spec: TensorSpec, x: jax.Array, shards: int) -> jax.Array:
    """A fused array laid out one part after the other, relaid in per-shard groups."""
    bounds = [0, *itertools.accumulate(spec.rows)]
    parts = [x[..., a:b, :] for a, b in itertools.pairwise(bounds)]
    return join_fused(parts, shards)


def shard_params(params, specs, mesh: Mesh | None, kernels: policy.KernelPolicy = policy.REFERENCE):
    """Params made for one device with the reference layout (``synthetic_params``, a tp=1 load) placed on
    ``mesh``: fused leaves relaid per shard, every leaf put on its devices, then repacked shard by shard for
    ``kernels``. They are whole on their first device before, so this is for models built on the device;
    ``load(..., devices=N)`` streams a file's tensors straight to their shards."""
    if mesh is None:
        return params
    shards = tp_size(mesh)

    def one(spec: TensorSpec, leaf):
        groups = fused_shards(spec.rows, shards) if spec.fused else 1
        if groups > 1:
            if isinstance(leaf, QTensor):
                leaf = dataclasses.replace(leaf, data=_relaid(spec, leaf.data, groups))
            elif isinstance(leaf, jax.Array):
                leaf = _relaid(spec, leaf, groups)
            else:
                raise ImpError(f"tensor '{spec.labels[0]}' is in a kernel layout that cannot be resharded")
        leaf = jax.device_put(leaf, leaf_sharding(spec, mesh, leaf))
        return prepared(spec, leaf, kernels, mesh) if isinstance(leaf, QTensor) else leaf

    return jax.tree.map(one, specs, params, is_leaf=is_spec)


def abstract_sharded(spec: TensorSpec, mesh: Mesh, leaf):
    """An abstract leaf with the shardings the loader gives it (for planning the sharded programs)."""
    shardings = leaf_sharding(spec, mesh, leaf)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), leaf, shardings)


def stacked_zeros(value, n: int):
    """Zeros for n units of ``value`` (a leaf of one unit), each array sharded as the unit is, the new leading
    axis whole: made in place on every device, never whole on one."""

    def one(a):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *_padded(sharding.spec, a.ndim)))
            return _zeros((n, *a.shape), a.dtype, sharding)
        return jnp.zeros((n, *a.shape), a.dtype)

    return jax.tree.map(one, value)


def _padded(spec: PartitionSpec, ndim: int) -> tuple:
    return (*spec, *([None] * (ndim - len(spec))))


def _zeros(shape: Sequence[int], dtype, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(functools.partial(jnp.zeros, tuple(shape), dtype), out_shardings=sharding)()


# --- caches -------------------------------------------------------------------------------------------------

# cache array -> the dim that splits (kv head for the pages, conv channel and value head for the recurrent state)
_CACHE_DIM = {"k": 3, "v": 3, "wk": 3, "wv": 3, "conv": 3, "ssm": 2}


def cache_sharding(cfg: ModelConfig, name: str, shape: Sequence[int]) -> NamedSharding | None:
    """How a cache array splits over ``cfg.mesh``: the KV pages by kv head, the recurrent slots by conv channel
    and value head (as the weights that write them), whole where the heads do not divide."""
    if cfg.mesh is None:
        return None
    shards = tp_size(cfg.mesh)
    axes: list[str | None] = [None] * len(shape)
    dim = _CACHE_DIM[name]
    if shape[dim] and shape[dim] % shards == 0:
        axes[dim] = TP
    return NamedSharding(cfg.mesh, PartitionSpec(*axes))


def cache_zeros(cfg: ModelConfig, name: str, shape: Sequence[int], dtype) -> jax.Array:
    """A zero cache array, made sharded on the devices that hold it."""
    return _zeros(shape, dtype, cache_sharding(cfg, name, shape))


def on_mesh(cfg: ModelConfig, mesh: Mesh | None) -> ModelConfig:
    """The config of a model spread over ``mesh`` (None: one device)."""
    return dataclasses.replace(cfg, mesh=mesh)


def device_bytes(tree, mesh: Mesh) -> tuple[int, ...]:
    """Bytes of a tree of sharded (abstract) arrays on each device of ``mesh``, in the mesh's device order."""
    devices = list(mesh.devices.flat)
    total = [0] * len(devices)
    for x in jax.tree.leaves(tree):
        itemsize = jnp.dtype(x.dtype).itemsize
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            total = [t + math.prod(x.shape) * itemsize for t in total]
            continue
        for device, index in sharding.devices_indices_map(tuple(x.shape)).items():
            n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, x.shape, strict=True))
            total[devices.index(device)] += n * itemsize
    return tuple(total)
