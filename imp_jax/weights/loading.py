"""Params leaves from the memmap to the device, and their abstract twins for planning.

``load_params`` streams every ``TensorSpec`` leaf to the device (packed blocks, repacked for the kernels on
Hopper; the dequantized fallback; dense float matrices in the compute dtype). ``abstract_leaf`` is the
ShapeDtypeStruct twin of the same leaf, so the planner sees exactly what the loader will allocate.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from gguf import MODEL_TENSOR, GGMLQuantizationType
from jax.sharding import Mesh

from imp_jax import ops
from imp_jax.errors import GGUFError
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.quant import is_quantized
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.config import ModelConfig
from imp_jax.models.decoder import Decoder
from imp_jax.models.layers import fused_shards, rope_inv_freq
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime.compiled_steps import CompiledSteps
from imp_jax.weights import sharding
from imp_jax.weights.fallback import to_dense
from imp_jax.weights.tensor_spec import ROPE, TensorSpec, map_specs, tensor_name

_M = MODEL_TENSOR
_FLOAT_NP = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
}


def _rope_table(mf: ModelFile, cfg: ModelConfig) -> np.ndarray:
    factors_name = tensor_name(_M.ROPE_FREQS, "weight")
    factors = np.asarray(mf.raw(factors_name)).view(np.float32) if factors_name in mf.tensors else None
    rows = []
    with np.errstate(all="ignore"):  # a damaged file's overflow is reported below, not as a numpy warning
        for window in cfg.layer_window:
            rope = cfg.rope_local if (window and cfg.rope_local is not None) else cfg.rope
            rows.append(rope_inv_freq(rope, factors if rope.scaling == "llama3" else None))
        table32 = np.stack(rows).astype(np.float32)
    if not np.isfinite(table32).all():
        raise GGUFError(
            mf.path,
            f"the rope frequencies from the rope metadata (base {cfg.rope.base:g}, scaling {cfg.rope.scaling}, "
            f"factor {cfg.rope.factor:g}) are not finite in float32",
            tensor=factors_name if factors is not None else None,
        )
    return table32


def abstract_leaf(spec: TensorSpec, kernels: KernelPolicy = REFERENCE, mesh: Mesh | None = None):
    """The ShapeDtypeStruct twin of ``materialize``, kernel repacking included (``sharding.prepared`` traced
    abstractly, shard by shard over ``mesh``): no bytes are read, nothing touches the device."""
    if spec.per_unit:
        return ops.UnitArrays(tuple(abstract_leaf(spec.unit(u), kernels, mesh) for u in range(len(spec.names))))
    if spec.dtype is None:
        stored = abstract_stored(spec)
        return jax.eval_shape(lambda w: sharding.prepared(spec, w, kernels, mesh), stored)
    return jax.ShapeDtypeStruct(spec.stack + spec.shape, jnp.dtype(spec.dtype))


def abstract_stored(spec: TensorSpec) -> QTensor:
    """The abstract QTensor of a quantized spec as stored in the file (what ``_qtensor`` puts on the device)."""
    data = jax.ShapeDtypeStruct(spec.stack + spec.shape[:-1] + (row_bytes(spec.qtype, spec.shape[-1]),), jnp.uint8)
    scale = jax.ShapeDtypeStruct(spec.stack, jnp.float32) if spec.scale_names else None
    return QTensor(data, scale, spec.qtype, spec.qshape)


def _host_piece(mf: ModelFile, spec: TensorSpec, name: str) -> np.ndarray:
    """A tensor's bytes as a view of the memmap (no copy): packed rows, or the stored float values."""
    info = mf.tensors[name]
    raw = mf.raw(name)
    if spec.dtype is None or is_quantized(spec.qtype):
        return raw.reshape(*info.shape[:-1], row_bytes(spec.qtype, info.shape[-1]))
    return raw.view(_FLOAT_NP[GGMLQuantizationType(spec.qtype)]).reshape(info.shape)


@functools.partial(jax.jit, donate_argnums=0)
def _place_unit(stack, value, u: jax.Array):
    """Write one unit's leaf (any pytree: a PackedWeight, a QTensor, an array) at index ``u`` of the stacked
    leaf, in place."""

    def put(out, v):
        return jax.lax.dynamic_update_slice(out, v.astype(out.dtype)[None], [u] + [jnp.int32(0)] * v.ndim)

    return jax.tree.map(put, stack, value)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast(x: jax.Array, *, dtype: str) -> jax.Array:
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("n",))
def _zeros_stack(value, *, n: int):
    """Zeros for ``n`` units of ``value`` (one unit's leaf), on one device."""
    return jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), value)


class _Loader:
    """Streams a spec tree's tensors from the memmap to the device in file-sized pieces.

    Each tensor goes over on its own (a view of the memmap, read by a transfer thread while the device works on
    the previous one), is joined with the other parts of its unit on the device, transformed for this backend
    (repacked for the kernels, dequantized for the fallback, cast to the compute dtype) one unit at a time, and
    written in place into its slot of the stacked leaf (a leaf held per unit, ``TensorSpec.per_unit``, keeps each
    unit's value as its own array). So beyond the memmap and the weights, at most ``IN_FLIGHT`` bytes of tensors
    (or one unit, if larger) are on their way, the device holds one unit's scratch, and each program compiles once
    per distinct unit shape, not once per tensor or stack length. On one device the programs run through
    ``programs`` (a ``CompiledSteps``), so with a compile-cache store a repeated load reads them back instead of
    tracing and lowering each again.
    """

    THREADS = 4
    IN_FLIGHT = 256 * 2**20

    def __init__(
        self,
        mf: ModelFile,
        cfg: ModelConfig,
        kernels: KernelPolicy,
        on_bytes: Callable[[int], None] | None,
        programs: CompiledSteps,
    ):
        self.mf, self.cfg, self.kernels, self.on_bytes, self.programs = mf, cfg, kernels, on_bytes, programs
        self.mesh = cfg.mesh  # under tensor parallelism every tensor goes straight to its shards
        self.pool = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="imp-jax-load")
        self.in_flight = 0
        self.bounds: list[tuple[tuple[int, ...], jax.Array]] = []  # MXFP4 scale bounds, checked once at the end
        self.rope: np.ndarray | None = None

    def load(self, specs: Decoder) -> Decoder:
        leaves = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, TensorSpec))]
        order = [(s, unit) for s in leaves if s.names != (ROPE,) for unit in zip(*s.parts, strict=True)]
        futures: collections.deque = collections.deque()
        fetch = collections.deque(order)

        def submit() -> None:
            """Start transfers in file order while fewer than IN_FLIGHT bytes are on their way (one unit at least)."""
            while fetch and (not futures or self.in_flight < self.IN_FLIGHT):
                spec, unit = fetch.popleft()
                self.in_flight += sum(self.mf.tensors[name].nbytes for name in unit)
                futures.append([self.pool.submit(self._transfer, spec, name) for name in unit])

        # the rope table first: a file whose frequencies overflow fails before any transfer
        self.rope = _rope_table(self.mf, self.cfg) if any(s.names == (ROPE,) for s in leaves) else None
        try:
            submit()
            done = {}
            for spec in leaves:
                done[id(spec)] = self._leaf(spec, futures, submit)
            for shape, bound in self.bounds:
                ops.check_scale_bound(shape, int(bound))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return map_specs(lambda s: done[id(s)], specs)

    def _transfer(self, spec: TensorSpec, name: str) -> jax.Array:
        arr = jax.device_put(_host_piece(self.mf, spec, name), sharding.part_sharding(spec, self.mesh))
        if self.on_bytes is not None:
            self.on_bytes(self.mf.tensors[name].nbytes)
        return arr

    def _leaf(self, spec: TensorSpec, futures: collections.deque, submit: Callable[[], None]):
        value = self._stacked(spec, futures, submit)
        if self.mesh is None:
            return value
        return jax.device_put(value, sharding.leaf_sharding(spec, self.mesh, value))

    def _stacked(self, spec: TensorSpec, futures: collections.deque, submit: Callable[[], None]):
        if spec.names == (ROPE,):
            return jnp.asarray(self.rope)
        out = None
        held = []  # a leaf held per unit: its units as they come
        for u in range(len(spec.names)):
            parts = [f.result() for f in futures.popleft()]
            self.in_flight -= sum(p.nbytes for p in parts)
            submit()
            value = self._unit(spec, parts, u)
            if not spec.stacked:
                return value
            if spec.per_unit:
                held.append(value)
                continue
            if out is None:
                n = len(spec.names)
                out = sharding.stacked_zeros(value, n) if self.mesh else self._run(_zeros_stack, value, n=n)
            out = self._run(_place_unit, out, value, np.int32(u))
        return ops.UnitArrays(tuple(held)) if spec.per_unit else out

    def _run(self, fn, *args, **statics):
        """``fn(*args, **statics)``: through the model's compiled programs on one device, a plain call over a
        mesh (its programs hold a device assignment)."""
        return fn(*args, **statics) if self.mesh else self.programs.call(fn, args, statics)

    def _unit(self, spec: TensorSpec, parts: list[jax.Array], u: int):
        """One unit's leaf from its parts on the device, in the form the model reads."""
        # fused parts are joined in per-shard groups under tensor parallelism
        if len(parts) == 1:
            data = parts[0]
        else:
            data = self._run(sharding.join_fused, parts, shards=fused_shards(spec.rows, self.cfg.tp))
        if not is_quantized(spec.qtype):
            return self._run(_cast, data, dtype=spec.dtype)
        scale = None
        if spec.scale_names:  # NVFP4's per-tensor scale
            scale = jnp.float32(np.asarray(self.mf.raw(spec.scale_names[u])).view(np.float32)[0])
        w = QTensor(data, scale, spec.qtype, spec.qshape)
        if spec.dtype is not None:  # the dequantized fallback (imp_jax.weights.fallback)
            return self._run(to_dense, w, dtype=spec.dtype)
        if not ops.repacks(w, self.kernels, gathered=spec.gathered):
            return w
        bound = ops.scale_bound(w)  # checked for every matrix at once at the end: no sync per matrix
        if bound is not None:
            self.bounds.append((w.full_shape, bound))
        if self.mesh is not None:  # every device repacks its own shard
            return sharding.prepared(spec, w, self.kernels, self.mesh, check=False)
        return self._run(ops.repacker(self.kernels), w)


def load_params(
    mf: ModelFile,
    cfg: ModelConfig,
    specs: Decoder,
    kernels: KernelPolicy = REFERENCE,
    on_bytes: Callable[[int], None] | None = None,
    programs: CompiledSteps | None = None,
):
    """Read every leaf from the memmap and put it on the device in the layout ``kernels`` reads (``on_bytes``
    reports the bytes of each tensor as its transfer completes, from a transfer thread; ``programs`` runs the
    loader's programs: with a compile-cache store, a repeated load reads them back)."""
    return _Loader(mf, cfg, kernels, on_bytes, programs or CompiledSteps()).load(specs)


def abstract_params(specs: Decoder, kernels: KernelPolicy = REFERENCE):
    return map_specs(lambda s: abstract_leaf(s, kernels), specs)
