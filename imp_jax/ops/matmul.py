"""Matrix products over weight leaves: the one dispatch point for ``x @ W.T``, expert stacks and embeddings.

``matmul(x, w)`` picks its implementation from the weight leaf: a ``pallas.PackedWeight`` (made at load on a
Hopper GPU, ``prepare_weight``) runs the Mosaic-GPU kernel, and a ``sharded.ShardedWeight`` (the same under tensor
parallelism) runs it on every device's shard; a ``QTensor`` runs the reference path (dequantize to
the compute dtype, then a dot accumulating in f32), the named fallback every kernel is checked against; a dense
array is a plain dot (XLA's, cuBLAS on a GPU), or the same Pallas kernel reading the bf16 weight in place where
the load-time ``KernelPolicy`` says it wins; ``expert_matmul`` is the same choice for a stack of MoE experts. A kernel
that cannot run raises KernelError naming op, shapes and dtypes: nothing silently falls back inside a step. A
``UnitArrays`` leaf (one array per unit of a layer stack, the CPU's layout) runs the product of its current unit's
array, whichever of these that is. An ``AffineBlocks`` leaf (int8 codes, made at load on the CPU where the native
kernel builds) runs that kernel for decode rows (``native_cpu.takes``), and XLA's dot of its weights for more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType

import imp_jax.ops.native_cpu as native_cpu
import imp_jax.ops.policy as policy
import imp_jax.ops.sharded as sharded
from imp_jax.errors import KernelError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import dequantize_rows

Weight = QTensor | jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnitArrays:
    """One weight of a layer stack held as one leaf per unit (an array or a packed leaf each), not one stacked
    array: the layout a ``KernelPolicy`` with ``unit_arrays`` loads (the CPU's).

    Under the layer scan a stacked weight is sliced per unit, and XLA:CPU cannot hand a dot a slice of a stacked
    operand: it copies every layer's slice out of the stack, every step (34 ms of a 52 ms smollm2 decode step,
    docs/BENCHMARKS.md "CPU"). Held apart, each unit's matrix is its own buffer. The layer loop gives the leaf
    its unit index (``at``; ``unit`` is None outside the loop) and the products read that unit's matrix in place
    through a ``lax.switch`` over the units (``apply``): one small branch per unit around the product alone, so
    the layer body is still traced and compiled once.
    """

    arrays: tuple[Weight, ...]
    unit: jax.Array | None = None

    def at(self, unit: jax.Array) -> UnitArrays:
        return UnitArrays(self.arrays, unit)

    def apply(self, fn: Callable, *operands):
        """``fn(*operands, w)`` for the current unit's leaf w."""
        if self.unit is None:
            raise KernelError(f"a weight held per unit ({len(self.arrays)} units) used outside the layer loop")
        return jax.lax.switch(self.unit, [lambda *args, w=w: fn(*args, w) for w in self.arrays], *operands)

    @property
    def first(self) -> Weight:
        """The first unit's leaf: every unit's has its shape, dtype and format."""
        return self.arrays[0]


REFERENCE = "reference"  # dequantize to the compute dtype, then jnp.dot with f32 accumulation
PALLAS = "pallas"  # Mosaic-GPU kernel on the packed blocks
DENSE = "dense"  # a float weight: jnp.dot
NATIVE = "native"  # the CPU kernel on int8 codes (ops.native_cpu)


def repacks(w: Weight, kernels: policy.KernelPolicy, *, gathered: bool = False) -> bool:
    """Whether ``prepare_weight`` repacks this leaf: with the matmul kernel on, QTensors of a format it reads; with
    the native CPU kernel on, matrices of a format it reads, the embedding table (``gathered``) included: its rows
    are read from the codes, and a tied output head runs the kernel."""
    if kernels.native_matmul:
        return native_cpu.can_repack(w)
    if gathered or not (kernels.matmul and isinstance(w, QTensor) and w.scale is None):
        return False
    import pallas

    return pallas.can_repack(w.qtype, w.shape)


def prepare_weight(
    w: Weight,
    kernels: policy.KernelPolicy,
    *,
    check: bool = True,
    layout: sharded.ShardLayout | None = None,
    gathered: bool = False,
) -> Weight:
    """The leaf ``matmul`` should hold for this weight under ``kernels``: with a matmul kernel on, QTensors of a
    format it reads are repacked (once, at load) into the kernel layout; everything else is kept as is. With a
    ``layout`` (tensor parallelism: blocks split as it says) every device repacks its own shard. ``gathered``:
    the embedding table (``repacks``).

    ``check`` reads the MXFP4 block scales back to the host to check the kernel's decode holds them; the loader
    passes False and checks every matrix at once at the end (``scale_bound`` / ``check_scale_bound``), so the
    transfers never wait on a device sync."""
    if not repacks(w, kernels, gathered=gathered):
        return w
    if kernels.native_matmul:
        return native_cpu.repack(w)
    if check and not isinstance(w.data, jax.core.Tracer):  # (planning traces)
        bound = scale_bound(w)
        if bound is not None:
            check_scale_bound(w.full_shape, int(bound))
    return repack_weight(w) if layout is None else sharded.repack(w, layout, repack_weight)


def repacker(kernels: policy.KernelPolicy) -> Callable[[QTensor], Weight]:
    """The jitted program that repacks one matrix (on one device) for the matmul kernel ``kernels`` runs."""
    return native_cpu.repack if kernels.native_matmul else repack_weight


def scale_bound(w: QTensor) -> jax.Array | None:
    """The largest block-scale byte of an MXFP4 matrix (a device scalar, not read back), else None: the kernel's
    bf16 decode bounds the block scale."""
    if w.qtype != GGMLQuantizationType.MXFP4:
        return None
    return jnp.max(w.data.reshape(-1, 17)[:, 0])


def check_scale_bound(shape: tuple[int, ...], top: int) -> None:
    import pallas

    if top > pallas.qformats.MXFP4_MAX_SCALE_BYTE:
        raise KernelError(
            f"MXFP4 weight {shape} has a block scale 2**{top - 127}, beyond the kernel's decode "
            f"(2**{pallas.qformats.MXFP4_MAX_SCALE_BYTE - 127}); load with kernels='off' (IMP_JAX_KERNELS=0)"
        )


@jax.jit
def repack_weight(w: QTensor):
    """Repack one matrix at a time inside one program: beside the stored blocks only the output and one matrix's
    scratch exist (eager repacking held every intermediate of a whole matrix, or every part of a stack and their
    stacked copy: +1.4 GiB over the plan for Qwen3-8B's MXFP4 output head on the H100)."""
    import pallas

    stack = w.stack_shape
    flat = w.data.reshape(-1, *w.data.shape[len(stack) :])
    with policy.kernel_errors():
        out = jax.lax.map(lambda one: pallas.repack(QTensor(one, None, w.qtype, w.shape)), flat)
    return jax.tree.map(lambda a: a.reshape(*stack, *a.shape[1:]), out)


def matmul_path(w, kernels: policy.KernelPolicy = policy.REFERENCE) -> str:
    """The implementation ``matmul`` uses for this leaf (or abstract leaf) of one layer: a repacked leaf always
    runs its kernel; ``kernels`` decides for a dense bf16 matrix."""
    if isinstance(w, UnitArrays):
        return matmul_path(w.first, kernels)
    if isinstance(w, QTensor):
        return REFERENCE
    if isinstance(w, native_cpu.AffineBlocks):
        return NATIVE
    return PALLAS if hasattr(w, "fmt") or _bf16_kernel(w, kernels) else DENSE


def read_format(w) -> str:
    """The format a kernel's leaf holds, as the plan names it."""
    if isinstance(w, UnitArrays):
        return read_format(w.first)
    if isinstance(w, native_cpu.AffineBlocks):
        return f"int8 codes of {GGMLQuantizationType(w.qtype).name}"
    return w.fmt.name


def _bf16_kernel(w, kernels: policy.KernelPolicy) -> bool:
    """A dense bf16 matrix runs the kernel where the policy says so (kernels="all", or policy.BF16_KERNEL)."""
    if not kernels.bf16_matmul:
        return False
    import pallas

    return pallas.can_view_dense(w)


def matmul(x: jax.Array, w, out_dtype=None, *, kernels: policy.KernelPolicy = policy.REFERENCE) -> jax.Array:
    """``x @ W.T`` for W of logical shape [N, K] (GGUF/numpy order), accumulating in f32.

    The result is in ``out_dtype`` (default x.dtype); the output head asks for f32 logits. ``kernels`` is the
    model's load-time policy (static).
    """
    if isinstance(w, UnitArrays):
        return w.apply(lambda x, one: matmul(x, one, out_dtype, kernels=kernels), x)
    path = matmul_path(w, kernels)
    if path == PALLAS:
        return _kernel(x, w, None, out_dtype, kernels)
    if path == NATIVE and native_cpu.takes(x):
        return native_cpu.matmul(x, w).astype(out_dtype or x.dtype)
    wd = w.dequantize(x.dtype) if isinstance(w, (QTensor, native_cpu.AffineBlocks)) else w.astype(x.dtype)
    y = jnp.einsum("...k,nk->...n", x, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def expert_matmul(
    x: jax.Array, w, expert_ids: jax.Array, out_dtype=None, *, kernels: policy.KernelPolicy = policy.REFERENCE
) -> jax.Array:
    """``x[g] @ W[expert_ids[g]].T`` for groups of rows x [G, R, K] and a stack of experts W [E, N, K] -> [G, R, N].

    A stack repacked for the kernel runs it (reading only the named experts' tiles); otherwise the named experts'
    packed blocks are gathered and dequantized, then one batched dot with f32 accumulation.
    """
    if isinstance(w, UnitArrays):
        return w.apply(lambda x, ids, one: expert_matmul(x, one, ids, out_dtype, kernels=kernels), x, expert_ids)
    if matmul_path(w, kernels) == PALLAS:
        return _kernel(x, w, expert_ids, out_dtype, kernels)
    if isinstance(w, QTensor):
        scale = None if w.scale is None else jnp.take(w.scale, expert_ids, axis=0)
        wd = QTensor(jnp.take(w.data, expert_ids, axis=0), scale, w.qtype, w.shape).dequantize(x.dtype)
    else:
        wd = jnp.take(w, expert_ids, axis=0).astype(x.dtype)
    y = jnp.einsum("grk,gnk->grn", x, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _kernel(x: jax.Array, w, expert_ids: jax.Array | None, out_dtype, kernels: policy.KernelPolicy) -> jax.Array:
    """The Mosaic-GPU matmul: on the leaf's shards when it is split over a mesh, else on the whole leaf (a dense
    bf16 matrix viewed in place)."""
    import pallas

    with policy.kernel_errors():
        if isinstance(w, sharded.ShardedWeight):
            y = sharded.matmul(x, w, expert_ids, interpret=kernels.interpret)
        else:
            pw = w if hasattr(w, "fmt") else pallas.dense_weight(w)
            y = pallas.quantized_matmul(x, pw, expert_ids=expert_ids, interpret=kernels.interpret)
    return y.astype(out_dtype or x.dtype)


def embed(table: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table for ``ids``, dequantizing only the rows gathered."""
    if isinstance(table, native_cpu.AffineBlocks):
        return native_cpu.rows(table, ids).astype(dtype)
    if isinstance(table, QTensor):
        rows = jnp.take(table.data, ids, axis=0)
        out = dequantize_rows(rows, table.qtype)
        if table.scale is not None:
            out = out * table.scale
        return out.astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)
