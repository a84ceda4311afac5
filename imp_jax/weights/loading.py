"""Params leaves from the memmap to the device, and their abstract twins for planning.

``materialize`` reads one ``TensorSpec`` leaf and puts it on the device (packed blocks, repacked for the
kernels on Hopper; the dequantized fallback; dense float matrices in the compute dtype). ``abstract_leaf`` is the
ShapeDtypeStruct twin of the same leaf, so the planner sees exactly what the loader will allocate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from gguf import MODEL_TENSOR, GGMLQuantizationType

from imp_jax import ops
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.quant import is_quantized
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.config import ModelConfig
from imp_jax.models.decoder import Decoder
from imp_jax.models.layers import rope_inv_freq
from imp_jax.weights.fallback import packed_spec, to_dense
from imp_jax.weights.tensor_spec import ROPE, TensorSpec, map_specs, tensor_name

_M = MODEL_TENSOR
_FLOAT_NP = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
}


def _host_array(mf: ModelFile, spec: TensorSpec) -> np.ndarray:
    """The leaf's bytes on the host: stacked over units, fused parts concatenated along N (on the host, so the
    device never holds the parts beside their concatenation)."""

    def one(name: str, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.asarray(mf.raw(name))
        if spec.dtype is None:
            return raw.reshape(*shape[:-1], row_bytes(spec.qtype, shape[-1]))
        return raw.view(_FLOAT_NP[GGMLQuantizationType(spec.qtype)]).reshape(shape)

    def part(names: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        arrays = [one(n, shape) for n in names]
        return np.stack(arrays) if spec.stacked else arrays[0]

    if not spec.fused:
        return part(spec.names, spec.shape)
    shapes = [(*spec.shape[:-2], r, spec.shape[-1]) for r in spec.rows]
    return np.concatenate([part(n, s) for n, s in zip(spec.parts, shapes, strict=True)], axis=-2)


def _rope_table(mf: ModelFile, cfg: ModelConfig) -> np.ndarray:
    factors_name = tensor_name(_M.ROPE_FREQS, "weight")
    factors = np.asarray(mf.raw(factors_name)).view(np.float32) if factors_name in mf.tensors else None
    rows = []
    for window in cfg.layer_window:
        rope = cfg.rope_local if (window and cfg.rope_local is not None) else cfg.rope
        rows.append(rope_inv_freq(rope, factors if rope.scaling == "llama3" else None))
    return np.stack(rows).astype(np.float32)


def materialize(mf: ModelFile, cfg: ModelConfig, spec: TensorSpec) -> QTensor | jax.Array:
    """One leaf on the device."""
    if spec.names == (ROPE,):
        return jnp.asarray(_rope_table(mf, cfg))
    if spec.dtype is not None and is_quantized(spec.qtype):  # the dequantized fallback (imp_jax.weights.fallback)
        return to_dense(_qtensor(mf, packed_spec(spec)), spec.dtype)
    if spec.dtype is None:
        return prepared(spec, _qtensor(mf, spec))
    host = _host_array(mf, spec)
    return jnp.asarray(host.astype(np.float32) if spec.dtype == "float32" else host).astype(spec.dtype)


def prepared(spec: TensorSpec, w: QTensor):
    """The packed leaf in the layout this backend's kernels read (``ops.prepare_weight``), unless it is gathered
    by row (the embedding: a tied output head then takes the reference path)."""
    return w if spec.gathered else ops.prepare_weight(w)


def _qtensor(mf: ModelFile, spec: TensorSpec) -> QTensor:
    """The packed blocks on the device as stored (before any kernel repacking)."""
    scale = None
    if spec.scale_names:
        s = np.array([np.asarray(mf.raw(n)).view(np.float32)[0] for n in spec.scale_names], np.float32)
        scale = jnp.asarray(s if spec.stacked else s[0])
    return QTensor(jnp.asarray(_host_array(mf, spec)), scale, spec.qtype, spec.qshape)


def abstract_leaf(spec: TensorSpec):
    """The ShapeDtypeStruct twin of ``materialize``, kernel repacking included (``ops.prepare_weight`` traced
    abstractly): no bytes are read, nothing touches the device."""
    if spec.dtype is None:
        stored = abstract_stored(spec)
        # A fresh function each time: eval_shape caches traces by function, and the repacking depends on the
        # kernel mode of the moment (IMP_JAX_KERNELS), which the cache key would not see.
        return stored if spec.gathered else jax.eval_shape(lambda w: ops.prepare_weight(w), stored)
    return jax.ShapeDtypeStruct(spec.stack + spec.shape, jnp.dtype(spec.dtype))


def abstract_stored(spec: TensorSpec) -> QTensor:
    """The abstract QTensor of a quantized spec as stored in the file (what ``_qtensor`` puts on the device)."""
    data = jax.ShapeDtypeStruct(spec.stack + spec.shape[:-1] + (row_bytes(spec.qtype, spec.shape[-1]),), jnp.uint8)
    scale = jax.ShapeDtypeStruct(spec.stack, jnp.float32) if spec.scale_names else None
    return QTensor(data, scale, spec.qtype, spec.qshape)


def load_params(mf: ModelFile, cfg: ModelConfig, specs: Decoder, on_leaf: Callable[[TensorSpec], None] | None = None):
    """Read every leaf from the memmap and put it on the device (``on_leaf`` reports progress)."""

    def load(spec: TensorSpec):
        leaf = materialize(mf, cfg, spec)
        if on_leaf is not None:
            on_leaf(spec)
        return leaf

    return map_specs(load, specs)


def abstract_params(specs: Decoder):
    return map_specs(abstract_leaf, specs)
