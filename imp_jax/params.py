"""GGUF tensors -> params pytree, and its abstract twin for planning.

``param_specs`` builds the params tree once with ``TensorSpec`` leaves (names, stored qtype, logical shape,
target dtype). The same tree is turned into ShapeDtypeStructs for the memory planner (``abstract_params``) and
into device arrays for the model (``load_params``), so planning and loading cannot disagree. Quantized tensors
stay packed (QTensor leaves); float matrices take the compute dtype; norms, biases and rope factors stay f32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from itertools import groupby

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType

from imp_jax.config import ModelConfig
from imp_jax.errors import GGUFError, UnsupportedModel
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.quant import SUPPORTED_QTYPES, is_quantized
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.layers import rope_inv_freq
from imp_jax.models.transformer import Block, Transformer

_FLOAT_NP = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
}

# Block field -> (gguf tensor, suffix, required)
_BLOCK_TENSORS: dict[str, tuple[MODEL_TENSOR, str, bool]] = {
    "attn_norm": (MODEL_TENSOR.ATTN_NORM, "weight", True),
    "wq": (MODEL_TENSOR.ATTN_Q, "weight", True),
    "wk": (MODEL_TENSOR.ATTN_K, "weight", True),
    "wv": (MODEL_TENSOR.ATTN_V, "weight", True),
    "wo": (MODEL_TENSOR.ATTN_OUT, "weight", True),
    "ffn_norm": (MODEL_TENSOR.FFN_NORM, "weight", True),
    "w_gate": (MODEL_TENSOR.FFN_GATE, "weight", True),
    "w_up": (MODEL_TENSOR.FFN_UP, "weight", True),
    "w_down": (MODEL_TENSOR.FFN_DOWN, "weight", True),
    "bq": (MODEL_TENSOR.ATTN_Q, "bias", False),
    "bk": (MODEL_TENSOR.ATTN_K, "bias", False),
    "bv": (MODEL_TENSOR.ATTN_V, "bias", False),
    "q_norm": (MODEL_TENSOR.ATTN_Q_NORM, "weight", False),
    "k_norm": (MODEL_TENSOR.ATTN_K_NORM, "weight", False),
    "post_attn_norm": (MODEL_TENSOR.ATTN_POST_NORM, "weight", False),
    "post_ffn_norm": (MODEL_TENSOR.FFN_POST_NORM, "weight", False),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one params leaf comes from: one GGUF tensor, or one per layer stacked on a leading axis."""

    names: tuple[str, ...]
    qtype: int
    shape: tuple[int, ...]  # logical numpy-order shape of one tensor
    dtype: str | None  # dense target dtype; None keeps the packed blocks (QTensor)
    stacked: bool
    scale_names: tuple[str, ...] = ()  # NVFP4 per-tensor scales

    @property
    def stack(self) -> tuple[int, ...]:
        return (len(self.names),) if self.stacked else ()

    @property
    def nbytes(self) -> int:
        n = len(self.names)
        if self.dtype is None:
            return n * int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.qtype, self.shape[-1])
        return n * int(np.prod(self.shape, dtype=np.int64)) * jnp.dtype(self.dtype).itemsize


def tensor_name(kind: MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def _spec(mf: ModelFile, names: list[str], compute_dtype: str, stacked: bool) -> TensorSpec:
    infos = [mf.tensors[n] for n in names]
    first = infos[0]
    if first.qtype not in SUPPORTED_QTYPES:
        raise UnsupportedModel(
            f"{mf.path}: tensor '{first.name}' is stored as {first.qtype_name}, which imp-jax cannot compute with"
        )
    scale_names: tuple[str, ...] = ()
    if first.qtype == GGMLQuantizationType.NVFP4:
        scale_names = tuple(_nvfp4_scale_name(mf, n) for n in names)
    if is_quantized(first.qtype):
        dtype = None
    elif len(first.shape) >= 2:
        dtype = compute_dtype
    else:
        dtype = "float32"
    return TensorSpec(tuple(names), first.qtype, first.shape, dtype, stacked, scale_names)


def _nvfp4_scale_name(mf: ModelFile, name: str) -> str:
    for candidate in (name.removesuffix(".weight") + ".scale", name + ".scale"):
        if candidate in mf.tensors:
            return candidate
    raise GGUFError(mf.path, "NVFP4 tensor has no per-tensor '.scale' tensor", tensor=name)


def _block_signature(mf: ModelFile, layer: int) -> tuple:
    sig = []
    for field, (kind, suffix, _) in _BLOCK_TENSORS.items():
        info = mf.tensors.get(tensor_name(kind, suffix, layer))
        sig.append((field, None) if info is None else (field, info.qtype, info.shape))
    return tuple(sig)


def _require(mf: ModelFile, name: str) -> None:
    if name not in mf.tensors:
        raise GGUFError(mf.path, "tensor missing: the model needs it", tensor=name)


def param_specs(mf: ModelFile, cfg: ModelConfig, compute_dtype: str) -> Transformer:
    """The params tree with TensorSpec leaves, validating that every needed tensor is there with a sane shape."""
    for layer in range(cfg.n_layers):
        for kind, suffix, required in _BLOCK_TENSORS.values():
            if required:
                _require(mf, tensor_name(kind, suffix, layer))
    segments = []
    layers = range(cfg.n_layers)
    for _, group in groupby(layers, key=lambda i: _block_signature(mf, i)):
        ids = list(group)
        fields = {}
        for field, (kind, suffix, _) in _BLOCK_TENSORS.items():
            names = [tensor_name(kind, suffix, i) for i in ids]
            fields[field] = _spec(mf, names, compute_dtype, stacked=True) if names[0] in mf.tensors else None
        segments.append(Block(**fields))
    embed_name = tensor_name(MODEL_TENSOR.TOKEN_EMBD, "weight")
    _require(mf, embed_name)
    _require(mf, tensor_name(MODEL_TENSOR.OUTPUT_NORM, "weight"))
    embed = _spec(mf, [embed_name], compute_dtype, stacked=False)
    if embed.shape != (cfg.vocab_size, cfg.n_embd):
        raise GGUFError(
            mf.path,
            f"shape {embed.shape} does not match vocab {cfg.vocab_size} x n_embd {cfg.n_embd}",
            tensor=embed_name,
        )
    out_name = tensor_name(MODEL_TENSOR.OUTPUT, "weight")
    _check_block_shapes(mf, cfg)
    return Transformer(
        embed=embed,
        segments=tuple(segments),
        output_norm=_spec(mf, [tensor_name(MODEL_TENSOR.OUTPUT_NORM, "weight")], compute_dtype, stacked=False),
        output=_spec(mf, [out_name], compute_dtype, stacked=False) if out_name in mf.tensors else None,
        inv_freq=TensorSpec(
            ("<rope>",),
            int(GGMLQuantizationType.F32),
            (cfg.n_layers, max(cfg.rope.dim, 2) // 2),
            "float32",
            stacked=False,
        ),
    )


def _check_block_shapes(mf: ModelFile, cfg: ModelConfig) -> None:
    """Catch a misshapen tensor here, with its name, instead of as a shape error deep inside jit."""
    q_out, kv_out = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    expected = {
        MODEL_TENSOR.ATTN_Q: (q_out, cfg.n_embd),
        MODEL_TENSOR.ATTN_K: (kv_out, cfg.n_embd),
        MODEL_TENSOR.ATTN_V: (kv_out, cfg.n_embd),
        MODEL_TENSOR.ATTN_OUT: (cfg.n_embd, q_out),
        MODEL_TENSOR.FFN_GATE: (cfg.n_ff, cfg.n_embd),
        MODEL_TENSOR.FFN_UP: (cfg.n_ff, cfg.n_embd),
        MODEL_TENSOR.FFN_DOWN: (cfg.n_embd, cfg.n_ff),
        MODEL_TENSOR.ATTN_NORM: (cfg.n_embd,),
    }
    for layer in range(cfg.n_layers):
        for kind, shape in expected.items():
            name = tensor_name(kind, "weight", layer)
            if mf.tensors[name].shape != shape:
                raise GGUFError(
                    mf.path,
                    f"shape {mf.tensors[name].shape}, expected {shape} from the metadata",
                    tensor=name,
                )


def _host_array(mf: ModelFile, spec: TensorSpec) -> np.ndarray:
    def one(name: str) -> np.ndarray:
        raw = np.asarray(mf.raw(name))
        if spec.dtype is None:
            return raw.reshape(*spec.shape[:-1], row_bytes(spec.qtype, spec.shape[-1]))
        return raw.view(_FLOAT_NP[GGMLQuantizationType(spec.qtype)]).reshape(spec.shape)

    parts = [one(n) for n in spec.names]
    return np.stack(parts) if spec.stacked else parts[0]


def _rope_table(mf: ModelFile, cfg: ModelConfig) -> np.ndarray:
    factors_name = tensor_name(MODEL_TENSOR.ROPE_FREQS, "weight")
    factors = np.asarray(mf.raw(factors_name)).view(np.float32) if factors_name in mf.tensors else None
    rows = []
    for window in cfg.layer_window:
        rope = cfg.rope_local if (window and cfg.rope_local is not None) else cfg.rope
        rows.append(rope_inv_freq(rope, factors if rope.scaling == "llama3" else None))
    return np.stack(rows).astype(np.float32)


def materialize(mf: ModelFile, cfg: ModelConfig, spec: TensorSpec) -> QTensor | jax.Array:
    """One leaf on the device."""
    if spec.names == ("<rope>",):
        return jnp.asarray(_rope_table(mf, cfg))
    host = _host_array(mf, spec)
    if spec.dtype is None:
        scale = None
        if spec.scale_names:
            s = np.array([np.asarray(mf.raw(n)).view(np.float32)[0] for n in spec.scale_names], np.float32)
            scale = jnp.asarray(s if spec.stacked else s[0])
        return QTensor(jnp.asarray(host), scale, spec.qtype, spec.shape)
    return jnp.asarray(host.astype(np.float32) if spec.dtype == "float32" else host).astype(spec.dtype)


def abstract_leaf(spec: TensorSpec) -> QTensor | jax.ShapeDtypeStruct:
    """The ShapeDtypeStruct twin of ``materialize``: no bytes are read, nothing touches the device."""
    if spec.dtype is None:
        data = jax.ShapeDtypeStruct(spec.stack + spec.shape[:-1] + (row_bytes(spec.qtype, spec.shape[-1]),), jnp.uint8)
        scale = jax.ShapeDtypeStruct(spec.stack, jnp.float32) if spec.scale_names else None
        return QTensor(data, scale, spec.qtype, spec.shape)
    return jax.ShapeDtypeStruct(spec.stack + spec.shape, jnp.dtype(spec.dtype))


def is_spec(x) -> bool:
    return isinstance(x, TensorSpec)


def map_specs(fn: Callable[[TensorSpec], object], specs: Transformer) -> Transformer:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def load_params(
    mf: ModelFile, cfg: ModelConfig, specs: Transformer, on_leaf: Callable[[TensorSpec], None] | None = None
):
    """Read every leaf from the memmap and put it on the device (``on_leaf`` reports progress)."""

    def load(spec: TensorSpec):
        leaf = materialize(mf, cfg, spec)
        if on_leaf is not None:
            on_leaf(spec)
        return leaf

    return map_specs(load, specs)


def abstract_params(specs: Transformer):
    return map_specs(abstract_leaf, specs)
