"""Synthetic models of real shapes, built directly on the device: no file, no host copy of the weights.

``synthetic_specs`` gives the ModelConfig and the same TensorSpec tree the GGUF loader builds (tensor names,
stored qtype, logical shapes), so planning a synthetic model is planning the real one. ``synthetic_params``
materializes it with ``jax.random``: packed blocks are *valid* (random quant codes, scales chosen so every weight
has a standard deviation near 1/sqrt(fan_in) and zero mean), norms are near 1, so activations stay finite and
of the usual size. Leaves are generated a layer (or a slice of rows) at a time, so building a 60 GB model needs
no more than a layer's worth of scratch beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, GGMLQuantizationType

from imp_jax.config import LLAMA, QWEN3, ModelConfig, RopeConfig
from imp_jax.errors import UnsupportedModel
from imp_jax.fallback import is_fallback, packed_spec, to_dense
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.models.attention import Attention
from imp_jax.models.decoder import Decoder, Layer
from imp_jax.models.layers import rope_inv_freq
from imp_jax.params import ROPE, TensorSpec, is_spec, prepared, tensor_name

_T = GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class SyntheticShape:
    """The dimensions of a decoder-only transformer (the fields ModelConfig reads from a GGUF)."""

    name: str
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab_size: int
    context_length: int
    rope_base: float
    qk_norm: bool = False
    tied_output: bool = False


SHAPES: dict[str, SyntheticShape] = {
    s.name: s
    for s in (
        SyntheticShape("qwen3-8b", QWEN3, 36, 4096, 32, 8, 128, 12288, 151936, 40960, 1e6, qk_norm=True),
        # Qwen3-32B's shape; it stands in for the ~27B hybrids until the Gated-DeltaNet family lands.
        SyntheticShape("qwen3-32b", QWEN3, 64, 5120, 64, 8, 128, 25600, 151936, 40960, 1e6, qk_norm=True),
        SyntheticShape("llama-70b", LLAMA, 80, 8192, 64, 8, 128, 28672, 128256, 131072, 5e5),
        # For CPU tests: every row a multiple of 256 so each quant applies, and one matrix shape throughout so
        # the generators compile once.
        SyntheticShape("tiny", QWEN3, 2, 256, 4, 4, 64, 256, 256, 4096, 1e4, qk_norm=True),
    )
}

QUANTS: dict[str, GGMLQuantizationType] = {"mxfp4": _T.MXFP4, "q8_0": _T.Q8_0, "q4_k": _T.Q4_K, "bf16": _T.BF16}

_ATTENTION = {  # Attention field -> (tensor, (rows, cols) of the shape)
    "wq": (MODEL_TENSOR.ATTN_Q, lambda s: (s.n_head * s.head_dim, s.n_embd)),
    "wk": (MODEL_TENSOR.ATTN_K, lambda s: (s.n_head_kv * s.head_dim, s.n_embd)),
    "wv": (MODEL_TENSOR.ATTN_V, lambda s: (s.n_head_kv * s.head_dim, s.n_embd)),
    "wo": (MODEL_TENSOR.ATTN_OUT, lambda s: (s.n_embd, s.n_head * s.head_dim)),
}
_FFN = {
    "w_gate": (MODEL_TENSOR.FFN_GATE, lambda s: (s.n_ff, s.n_embd)),
    "w_up": (MODEL_TENSOR.FFN_UP, lambda s: (s.n_ff, s.n_embd)),
    "w_down": (MODEL_TENSOR.FFN_DOWN, lambda s: (s.n_embd, s.n_ff)),
}
_NORMS = {  # Layer field -> (tensor, length)
    "attn_norm": (MODEL_TENSOR.ATTN_NORM, lambda s: s.n_embd),
    "ffn_norm": (MODEL_TENSOR.FFN_NORM, lambda s: s.n_embd),
}
_QK_NORMS = {  # Attention field -> (tensor, length)
    "q_norm": (MODEL_TENSOR.ATTN_Q_NORM, lambda s: s.head_dim),
    "k_norm": (MODEL_TENSOR.ATTN_K_NORM, lambda s: s.head_dim),
}


def synthetic_config(shape: SyntheticShape) -> ModelConfig:
    return ModelConfig(
        arch=shape.arch,
        n_layers=shape.n_layers,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_head_kv=shape.n_head_kv,
        head_dim=shape.head_dim,
        n_ff=shape.n_ff,
        vocab_size=shape.vocab_size,
        context_length=shape.context_length,
        rms_eps=1e-6,
        rope=RopeConfig(base=shape.rope_base, dim=shape.head_dim, neox=shape.arch != LLAMA),
        layer_window=(0,) * shape.n_layers,
        attn_scale=1.0 / math.sqrt(shape.head_dim),
        tied_output=shape.tied_output,
    )


def synthetic_specs(shape: str | SyntheticShape, quant: str, dtype: str = "bfloat16") -> tuple[ModelConfig, Decoder]:
    """ModelConfig and TensorSpec tree of a model of ``shape`` whose matrices are stored in ``quant``."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise UnsupportedModel(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if quant not in QUANTS:
        raise UnsupportedModel(f"unknown synthetic quant {quant!r}; use one of {', '.join(QUANTS)}")
    qtype = int(QUANTS[quant])
    block = GGML_QUANT_SIZES[QUANTS[quant]][0]
    mat_dtype = dtype if quant == "bf16" else None
    layers = range(shape.n_layers)

    def matrix(kind, dims, ids) -> TensorSpec:
        if dims[-1] % block:
            raise UnsupportedModel(f"{quant} needs rows that are multiples of {block}; {shape.name} has {dims}")
        if ids is None:
            return TensorSpec((tensor_name(kind, "weight"),), qtype, dims, mat_dtype, stacked=False)
        return TensorSpec(tuple(tensor_name(kind, "weight", i) for i in ids), qtype, dims, mat_dtype, stacked=True)

    def norm(kind, n) -> TensorSpec:
        names = tuple(tensor_name(kind, "weight", i) for i in layers)
        return TensorSpec(names, int(_T.F32), (n,), "float32", stacked=True)

    mixer = {f: matrix(kind, dims(shape), layers) for f, (kind, dims) in _ATTENTION.items()}
    if shape.qk_norm:
        mixer.update({f: norm(kind, n(shape)) for f, (kind, n) in _QK_NORMS.items()})
    layer = Layer(
        mixer=Attention(**mixer),
        **{f: matrix(kind, dims(shape), layers) for f, (kind, dims) in _FFN.items()},
        **{f: norm(kind, n(shape)) for f, (kind, n) in _NORMS.items()},
    )
    vocab = (shape.vocab_size, shape.n_embd)
    specs = Decoder(
        embed=dataclasses.replace(matrix(MODEL_TENSOR.TOKEN_EMBD, vocab, None), gathered=True),
        segments=((layer,),),
        output_norm=TensorSpec(
            (tensor_name(MODEL_TENSOR.OUTPUT_NORM, "weight"),), int(_T.F32), (shape.n_embd,), "float32", False
        ),
        output=None if shape.tied_output else matrix(MODEL_TENSOR.OUTPUT, vocab, None),
        inv_freq=TensorSpec((ROPE,), int(_T.F32), (shape.n_layers, shape.head_dim // 2), "float32", False),
    )
    return synthetic_config(shape), specs


def synthetic_params(specs: Decoder, key: jax.Array, *, config: ModelConfig) -> Decoder:
    """Random weights for a spec tree, created on the default device leaf by leaf."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    return jax.tree.unflatten(treedef, [_leaf(s, jax.random.fold_in(key, i), config) for i, s in enumerate(leaves)])


def _leaf(spec: TensorSpec, key: jax.Array, config: ModelConfig):
    if spec.names == (ROPE,):
        rows = [
            rope_inv_freq(config.rope_local if (w and config.rope_local is not None) else config.rope)
            for w in config.layer_window
        ]
        return jnp.asarray(np.stack(rows).astype(np.float32))
    if is_fallback(spec):  # like the loader: the stored blocks, dequantized once
        return to_dense(_stored(packed_spec(spec), key), spec.dtype)
    if spec.dtype is None:  # like the loader: repacked for a kernel where one exists
        return prepared(spec, _stored(spec, key))
    if not spec.stacked and len(spec.shape) == 1:
        return _norm(key[None], spec.shape, 1)[0]
    item, batch, keys = _items(spec, key)
    if len(spec.shape) == 1:
        return _norm(keys, item, batch)
    return _dense(keys, item, spec.dtype, batch)


def _items(spec: TensorSpec, key: jax.Array):
    """Items along the first axis: the layers of a stacked leaf, else rows (16 steps of rows at a time)."""
    n, item = (len(spec.names), spec.shape) if spec.stacked else (spec.shape[0], spec.shape[1:])
    return item, 1 if spec.stacked else max(1, n // 16), jax.random.split(key, n)


def _stored(spec: TensorSpec, key: jax.Array) -> QTensor:
    """Random valid packed blocks for a quantized spec, as a file would store them."""
    item, batch, keys = _items(spec, key)
    return QTensor(_packed(keys, spec.qtype, item, batch), None, spec.qtype, spec.qshape)


@functools.partial(jax.jit, static_argnames=("item", "batch"))
def _norm(keys, item, batch):
    return jax.lax.map(lambda k: 1.0 + 0.02 * jax.random.normal(k, item, jnp.float32), keys, batch_size=batch)


@functools.partial(jax.jit, static_argnames=("item", "dtype", "batch"))
def _dense(keys, item, dtype, batch):
    std = 1.0 / math.sqrt(item[-1])
    return jax.lax.map(lambda k: (std * jax.random.normal(k, item, jnp.float32)).astype(dtype), keys, batch_size=batch)


@functools.partial(jax.jit, static_argnames=("qtype", "item", "batch"))
def _packed(keys, qtype, item, batch):
    """uint8 [n, *item[:-1], row_bytes] of random valid blocks, for rows of item[-1] weights."""
    qt = _T(qtype)
    lead = (*item[:-1], item[-1] // GGML_QUANT_SIZES[qt][0])
    std = 1.0 / math.sqrt(item[-1])

    def one(k):
        return _random_blocks(k, lead, qt, std).reshape(*item[:-1], row_bytes(qtype, item[-1]))

    return jax.lax.map(one, keys, batch_size=batch)


def _random_blocks(key, lead: tuple[int, ...], qtype: GGMLQuantizationType, std: float) -> jax.Array:
    """Blocks [*lead, type_size] with random codes and scales that give weights of std ``std``, mean 0."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    k_codes, k_scale = jax.random.split(key)
    blocks = jax.random.bits(k_codes, (*lead, type_size), jnp.uint8)
    jitter = jax.random.uniform(k_scale, (*lead, 1), jnp.float32, 0.75, 1.25)
    if qtype == _T.MXFP4:
        # E2M1 codes (doubled) have rms sqrt(34.25); the E8M0 byte e scales by 2**(e - 128).
        e = jnp.round(128 + jnp.log2(std * jitter / math.sqrt(34.25)))
        return blocks.at[..., :1].set(jnp.clip(e, 1, 254).astype(jnp.uint8))
    if qtype == _T.Q8_0:
        # int8 codes have rms ~73.9 (uniform over -128..127); an f16 scale d in front.
        return blocks.at[..., :2].set(_f16_bytes(std * jitter / 73.9))
    if qtype == _T.Q4_K:
        # d * sc * q - dmin * m with 6-bit sc, m and 4-bit q uniform: dmin = 7.5 d zeroes the mean, rms ~258 d.
        d = std * jitter / 258.0
        return blocks.at[..., :2].set(_f16_bytes(d)).at[..., 2:4].set(_f16_bytes(7.5 * d))
    raise UnsupportedModel(f"synthetic blocks for {qtype.name} are not implemented (use one of {', '.join(QUANTS)})")


def _f16_bytes(x: jax.Array) -> jax.Array:
    """f16 values [..., 1] as their two little-endian bytes [..., 2]."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint8).reshape(*x.shape[:-1], 2)
