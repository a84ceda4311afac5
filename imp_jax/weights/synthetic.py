"""Synthetic models of real shapes, built directly on the device: no file, no host copy of the weights.

A shape is the GGUF metadata llama.cpp's converter writes for that model. ``synthetic_file`` turns it into a
``ModelFile`` without bytes: the config comes from the same readers a real file goes through, and the tensor table
lists every tensor the converter would write for that architecture (names, numpy shapes; matrices in the named
quant, vectors and small float tensors in F32). ``param_specs`` then builds the same TensorSpec tree the loader
builds, so planning a synthetic model is planning the real one, for every family: dense, hybrid, MoE, gpt-oss.

``synthetic_params`` materializes the tree with ``jax.random``: packed blocks are *valid* (random quant codes,
scales chosen so every weight has a standard deviation near 1/sqrt(fan_in) and zero mean), norms are near 1,
biases and sinks near 0, the GDN decay ``ssm_a`` negative, so activations stay finite and of the usual size.
Leaves are generated a layer (or a slice of rows) at a time, so building a 60 GB model needs no more than a
layer's worth of scratch beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, GGMLQuantizationType

from imp_jax import ops
from imp_jax.errors import UnsupportedModel
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.reader import ModelFile, TensorInfo
from imp_jax.models.config import (
    ATTENTION,
    GPT_OSS,
    LLAMA,
    QWEN3,
    QWEN3MOE,
    QWEN3NEXT,
    QWEN35,
    QWEN35MOE,
    ModelConfig,
    config_from_gguf,
)
from imp_jax.models.decoder import Decoder
from imp_jax.models.layers import rope_inv_freq
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.weights.fallback import is_fallback, packed_spec, to_dense
from imp_jax.weights.sharding import prepared
from imp_jax.weights.specs import param_specs
from imp_jax.weights.tensor_spec import ROPE, TensorSpec, is_spec, tensor_name

_T = GGMLQuantizationType
_M = MODEL_TENSOR


@dataclasses.dataclass(frozen=True)
class SyntheticShape:
    """A model's shape as the GGUF metadata of its converted file (keys without the ``{arch}.`` prefix)."""

    name: str
    arch: str
    keys: tuple[tuple[str, Any], ...]
    tied_output: bool = False

    @property
    def metadata(self) -> dict[str, Any]:
        return {"general.architecture": self.arch, **{f"{self.arch}.{k}": v for k, v in self.keys}}

    @property
    def config(self) -> ModelConfig:
        names = set() if self.tied_output else {tensor_name(_M.OUTPUT, "weight")}
        return config_from_gguf(self.metadata, names)


def _shape(name: str, arch: str, keys: dict[str, Any], tied_output: bool = False) -> SyntheticShape:
    return SyntheticShape(name, arch, tuple(keys.items()), tied_output)


def _attn(layers: int, embd: int, heads: int, kv: int, head_dim: int, vocab: int, ctx: int, base: float) -> dict:
    return {
        "block_count": layers,
        "embedding_length": embd,
        "attention.head_count": heads,
        "attention.head_count_kv": kv,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "vocab_size": vocab,
        "context_length": ctx,
        "rope.freq_base": base,
    }


def _gdn(k_heads: int, v_heads: int, head_dim: int = 128) -> dict:
    return {
        "ssm.conv_kernel": 4,
        "ssm.state_size": head_dim,
        "ssm.group_count": k_heads,
        "ssm.time_step_rank": v_heads,
        "ssm.inner_size": v_heads * head_dim,
        "full_attention_interval": 4,
    }


SHAPES: dict[str, SyntheticShape] = {
    s.name: s
    for s in (
        _shape("qwen3-8b", QWEN3, {**_attn(36, 4096, 32, 8, 128, 151936, 40960, 1e6), "feed_forward_length": 12288}),
        _shape("llama-70b", LLAMA, {**_attn(80, 8192, 64, 8, 128, 128256, 131072, 5e5), "feed_forward_length": 28672}),
        # Qwen3.5 (gdn_spec.md section 1): 3 Gated-DeltaNet layers to 1 gated attention layer, rope on 64 dims.
        _shape(
            "qwen3.5-9b",
            QWEN35,
            {
                **_attn(32, 4096, 16, 4, 256, 248320, 262144, 1e7),
                "feed_forward_length": 12288,
                "rope.dimension_count": 64,
                **_gdn(16, 32),
            },
        ),
        _shape(
            "qwen3.5-27b",
            QWEN35,
            {
                **_attn(64, 5120, 24, 4, 256, 248320, 262144, 1e7),
                "feed_forward_length": 17408,
                "rope.dimension_count": 64,
                **_gdn(16, 48),
            },
        ),
        _shape(
            "qwen3-30b-a3b",
            QWEN3MOE,
            {
                **_attn(48, 2048, 32, 4, 128, 151936, 40960, 1e6),
                "expert_count": 128,
                "expert_used_count": 8,
                "expert_feed_forward_length": 768,
            },
        ),
        _shape(
            "gpt-oss-20b",
            GPT_OSS,
            {
                **_attn(24, 2880, 64, 8, 64, 201088, 131072, 150000.0),
                "expert_count": 32,
                "expert_used_count": 4,
                "expert_feed_forward_length": 2880,
                "attention.sliding_window": 128,
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": 32.0,
                "rope.scaling.original_context_length": 4096,
                "attention.layer_norm_rms_epsilon": 1e-5,
            },
        ),
        # For CPU tests: every row a multiple of 256 so each quant applies.
        _shape("tiny", QWEN3, {**_attn(2, 256, 4, 4, 64, 256, 4096, 1e4), "feed_forward_length": 256}),
        _shape(
            "tiny-hybrid",
            QWEN35,
            {
                **_attn(4, 256, 4, 2, 64, 256, 4096, 1e4),
                "feed_forward_length": 256,
                "rope.dimension_count": 16,
                **_gdn(2, 4, 64),
            },
        ),
        _shape(
            "tiny-moe",
            QWEN35MOE,
            {
                **_attn(4, 256, 4, 2, 64, 256, 4096, 1e4),
                "expert_count": 8,
                "expert_used_count": 2,
                "expert_feed_forward_length": 256,
                "expert_shared_feed_forward_length": 256,
                "rope.dimension_count": 16,
                **_gdn(2, 4, 64),
            },
        ),
        _shape(
            "tiny-gpt-oss",
            GPT_OSS,
            {
                **_attn(2, 256, 4, 2, 64, 256, 4096, 150000.0),
                "expert_count": 4,
                "expert_used_count": 2,
                "expert_feed_forward_length": 256,
                "attention.sliding_window": 8,
            },
        ),
    )
}

QUANTS: dict[str, GGMLQuantizationType] = {
    "mxfp4": _T.MXFP4,
    "q8_0": _T.Q8_0,
    "q4_k": _T.Q4_K,
    "bf16": _T.BF16,
    "q4_k_m": _T.Q4_K,
    "q5_k_m": _T.Q5_K,
}
# llama.cpp's K-quant "medium" mixes: attn_v, ffn_down (in the layers ``more_bits`` picks) and the output head
# take Q6_K, everything else the base type. Their irregular layer pattern is what a real user's file looks like.
_MORE_BITS_MIXES = {"q4_k_m", "q5_k_m"}
_MORE_BITS_TENSORS = (_M.ATTN_V, _M.FFN_DOWN)


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def matrix_qtype(name: str, quant: str, n_layers: int) -> GGMLQuantizationType:
    """The qtype of matrix ``name`` in a file of ``quant`` (a uniform quant, or a K-quant medium mix)."""
    if quant not in _MORE_BITS_MIXES:
        return QUANTS[quant]
    if name == tensor_name(_M.OUTPUT, "weight"):
        return _T.Q6_K
    for kind in _MORE_BITS_TENSORS:
        for layer in range(n_layers):
            if name == tensor_name(kind, "weight", layer):
                return _T.Q6_K if more_bits(layer, n_layers) else QUANTS[quant]
    return QUANTS[quant]


_POST_ATTENTION_FFN_NORM = {QWEN35, QWEN35MOE, QWEN3NEXT, GPT_OSS}  # their FFN input norm is post_attention_norm
_NO_QK_NORM = {LLAMA, GPT_OSS}


def synthetic_tensors(cfg: ModelConfig, metadata: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor llama.cpp's converter writes for this model: name -> (numpy shape, whether it is a weight
    matrix the file's quant applies to). Vectors, routers, the conv filter and the GDN gate projections are F32."""
    arch, d = cfg.arch, cfg.n_embd
    table: dict[str, tuple[tuple[int, ...], bool]] = {}

    def add(kind, suffix, shape, matrix=False, layer=None):
        table[tensor_name(kind, suffix, layer)] = (tuple(int(x) for x in shape), matrix)

    add(_M.TOKEN_EMBD, "weight", (cfg.vocab_size, d), True)
    add(_M.OUTPUT_NORM, "weight", (d,))
    if not cfg.tied_output:
        add(_M.OUTPUT, "weight", (cfg.vocab_size, d), True)
    for i, kind in enumerate(cfg.kinds):
        add(_M.ATTN_NORM, "weight", (d,), layer=i)
        add(_M.ATTN_POST_NORM if arch in _POST_ATTENTION_FFN_NORM else _M.FFN_NORM, "weight", (d,), layer=i)
        if kind == ATTENTION:
            q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
            outs = {_M.ATTN_Q: q * (2 if cfg.attn_gate else 1), _M.ATTN_K: kv, _M.ATTN_V: kv}
            for t, n in outs.items():
                add(t, "weight", (n, d), True, i)
            add(_M.ATTN_OUT, "weight", (d, q), True, i)
            if arch not in _NO_QK_NORM:
                add(_M.ATTN_Q_NORM, "weight", (cfg.head_dim,), layer=i)
                add(_M.ATTN_K_NORM, "weight", (cfg.head_dim,), layer=i)
            if arch == GPT_OSS:
                for t, n in {**outs, _M.ATTN_OUT: d}.items():
                    add(t, "bias", (n,), layer=i)
                add(_M.ATTN_SINKS, "weight", (cfg.n_head,), layer=i)
        else:
            g = cfg.gdn
            inner = g.n_v_heads * g.head_v_dim
            add(_M.ATTN_QKV, "weight", (g.conv_channels, d), True, i)
            add(_M.ATTN_GATE, "weight", (inner, d), True, i)
            add(_M.SSM_OUT, "weight", (d, inner), True, i)
            add(_M.SSM_CONV1D, "weight", (g.conv_channels, g.conv_kernel), layer=i)
            add(_M.SSM_DT, "bias", (g.n_v_heads,), layer=i)
            add(_M.SSM_A, "", (g.n_v_heads,), layer=i)
            add(_M.SSM_NORM, "weight", (g.head_v_dim,), layer=i)
            if arch == QWEN3NEXT:
                add(_M.SSM_BETA_ALPHA, "weight", (2 * g.n_v_heads, d), layer=i)
            else:
                add(_M.SSM_ALPHA, "weight", (g.n_v_heads, d), layer=i)
                add(_M.SSM_BETA, "weight", (g.n_v_heads, d), layer=i)
        if cfg.moe is None:
            add(_M.FFN_GATE, "weight", (cfg.n_ff, d), True, i)
            add(_M.FFN_UP, "weight", (cfg.n_ff, d), True, i)
            add(_M.FFN_DOWN, "weight", (d, cfg.n_ff), True, i)
            continue
        e, f = cfg.moe.n_experts, cfg.moe.n_ff_exp
        add(_M.FFN_GATE_INP, "weight", (e, d), layer=i)
        add(_M.FFN_GATE_EXP, "weight", (e, f, d), True, i)
        add(_M.FFN_UP_EXP, "weight", (e, f, d), True, i)
        add(_M.FFN_DOWN_EXP, "weight", (e, d, f), True, i)
        if cfg.moe.has_shared:
            fs = int(metadata[f"{arch}.expert_shared_feed_forward_length"])
            add(_M.FFN_GATE_SHEXP, "weight", (fs, d), True, i)
            add(_M.FFN_UP_SHEXP, "weight", (fs, d), True, i)
            add(_M.FFN_DOWN_SHEXP, "weight", (d, fs), True, i)
            add(_M.FFN_GATE_INP_SHEXP, "weight", (1, d), layer=i)
        if arch == GPT_OSS:
            add(_M.FFN_GATE_INP, "bias", (e,), layer=i)
            add(_M.FFN_GATE_EXP, "bias", (e, f), layer=i)
            add(_M.FFN_UP_EXP, "bias", (e, f), layer=i)
            add(_M.FFN_DOWN_EXP, "bias", (e, d), layer=i)
    return table


def synthetic_file(shape: str | SyntheticShape, quant: str) -> ModelFile:
    """The ModelFile (metadata and tensor table, no bytes) of ``shape`` with its matrices stored in ``quant``."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise UnsupportedModel(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if quant not in QUANTS:
        raise UnsupportedModel(f"unknown synthetic quant {quant!r}; use one of {', '.join(QUANTS)}")
    tensors = {}
    for name, (dims, matrix) in synthetic_tensors(shape.config, shape.metadata).items():
        qtype = matrix_qtype(name, quant, shape.config.n_layers)
        block = GGML_QUANT_SIZES[qtype][0]
        if matrix and dims[-1] % block:
            raise UnsupportedModel(f"{quant} needs rows that are multiples of {block}; {shape.name} has {name} {dims}")
        t = int(qtype if matrix else _T.F32)
        nbytes = int(np.prod(dims[:-1], dtype=np.int64)) * row_bytes(t, dims[-1])
        tensors[name] = TensorInfo(name, t, dims, 0, nbytes)
    return ModelFile(Path(f"<synthetic {shape.name} {quant}>"), 3, shape.metadata, {}, tensors, 32, 0, None)


def synthetic_specs(shape: str | SyntheticShape, quant: str, dtype: str = "bfloat16") -> tuple[ModelConfig, Decoder]:
    """ModelConfig and TensorSpec tree of a model of ``shape`` whose matrices are stored in ``quant``: the tree
    ``params.param_specs`` builds for the file llama.cpp would write."""
    mf = synthetic_file(shape, quant)
    cfg = config_from_gguf(mf.metadata, set(mf.tensors))
    return cfg, param_specs(mf, cfg, dtype)


def synthetic_params(
    specs: Decoder, key: jax.Array, *, config: ModelConfig, kernels: KernelPolicy = REFERENCE
) -> Decoder:
    """Random weights for a spec tree, created on the default device leaf by leaf, in the layout ``kernels``
    reads (as the loader would put them)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    made = [_leaf(s, jax.random.fold_in(key, i), config, kernels) for i, s in enumerate(leaves)]
    return jax.tree.unflatten(treedef, made)


# Float tensors that are not weight matrices: (offset, spread, sign) of their values by tensor kind, a value
# being offset + spread * normal, or with sign -1 the negative exponential of that. Norm weights sit near 1;
# biases, sinks and the dt bias near 0; ssm_a = -exp(A_log) is a decay rate that must stay negative (a positive
# one grows the GDN state without bound), here -exp(N(1, 0.5)), mostly in [-7.4, -1].
_VECTOR_FILL = {"bias": (0.0, 0.02, 1), "attn_sinks": (0.0, 0.5, 1), "ssm_a": (1.0, 0.5, -1)}


def _fill(spec: TensorSpec) -> tuple[float, float, int]:
    name = spec.names[0]
    for key, fill in _VECTOR_FILL.items():
        if name.endswith(key) or f".{key}." in name:
            return fill
    return (1.0, 0.02, 1)


def _leaf(spec: TensorSpec, key: jax.Array, config: ModelConfig, kernels: KernelPolicy):
    if spec.per_unit:  # like the loader: one leaf per unit
        units = range(len(spec.names))
        return ops.UnitArrays(tuple(_leaf(spec.unit(u), jax.random.fold_in(key, u), config, kernels) for u in units))
    if spec.names == (ROPE,):
        rows = [
            rope_inv_freq(config.rope_local if (w and config.rope_local is not None) else config.rope)
            for w in config.layer_window
        ]
        return jnp.asarray(np.stack(rows).astype(np.float32))
    if is_fallback(spec):  # like the loader: the stored blocks, dequantized once
        return to_dense(_stored(packed_spec(spec), key), spec.dtype)
    if spec.dtype is None:  # like the loader: repacked for a kernel where one exists
        return prepared(spec, _stored(spec, key), kernels)
    item, batch, keys = _items(spec, key)
    if len(spec.shape) == 1 or (spec.names[0].endswith(".bias")):
        out = _vector(keys, item, batch, *_fill(spec))
        return out if spec.stacked else out.reshape(spec.shape)
    return _dense(keys, item, spec.dtype, batch)


def _items(spec: TensorSpec, key: jax.Array):
    """Items along the first axis: the layers of a stacked leaf, else rows (16 steps of rows at a time)."""
    n, item = (len(spec.names), spec.shape) if spec.stacked else (spec.shape[0], spec.shape[1:])
    return item, 1 if spec.stacked else max(1, n // 16), jax.random.split(key, n)


def _stored(spec: TensorSpec, key: jax.Array) -> QTensor:
    """Random valid packed blocks for a quantized spec, as a file would store them."""
    item, batch, keys = _items(spec, key)
    return QTensor(_packed(keys, spec.qtype, item, batch), None, spec.qtype, spec.qshape)


@functools.partial(jax.jit, static_argnames=("item", "batch", "offset", "spread", "sign"))
def _vector(keys, item, batch, offset, spread, sign):
    def one(k):
        v = offset + spread * jax.random.normal(k, item, jnp.float32)
        return v if sign > 0 else -jnp.exp(v)

    return jax.lax.map(one, keys, batch_size=batch)


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
    if qtype == _T.Q5_K:
        # as Q4_K with 5-bit q: dmin = 15.5 d zeroes the mean, rms ~527 d.
        d = std * jitter / 527.0
        return blocks.at[..., :2].set(_f16_bytes(d)).at[..., 2:4].set(_f16_bytes(15.5 * d))
    if qtype == _T.Q6_K:
        # d * sc * (q - 32) with int8 sc (rms ~73.9) and 6-bit q (q - 32 rms ~18.5): rms ~1367 d; d is last.
        return blocks.at[..., 208:210].set(_f16_bytes(std * jitter / 1367.0))
    raise UnsupportedModel(f"synthetic blocks for {qtype.name} are not implemented (use one of {', '.join(QUANTS)})")


def _f16_bytes(x: jax.Array) -> jax.Array:
    """f16 values [..., 1] as their two little-endian bytes [..., 2]."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint8).reshape(*x.shape[:-1], 2)
