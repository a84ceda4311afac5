"""GGUF tensors -> params pytree, and its abstract twin for planning.

``param_specs`` builds the params tree once with ``TensorSpec`` leaves (names, stored qtype, logical shape,
target dtype). The same tree is turned into ShapeDtypeStructs for the memory planner (``abstract_params``) and
into device arrays for the model (``load_params``), so planning and loading cannot disagree. Quantized tensors
stay packed (QTensor leaves); float matrices take the compute dtype; norms, biases, routers, the conv filter and
rope factors stay f32.

The layer stack is cut into repeating units (models/decoder.py) and units with identical tensors (names aside)
into segments; every leaf of a segment is stacked over its units.
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

from imp_jax import ops
from imp_jax.config import ATTENTION, ModelConfig
from imp_jax.errors import GGUFError, UnsupportedModel
from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.quant import SUPPORTED_QTYPES, is_quantized
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.attention import Attention
from imp_jax.models.decoder import Decoder, Layer
from imp_jax.models.layers import rope_inv_freq
from imp_jax.models.moe import MoE
from imp_jax.models.recurrent import Recurrent

_FLOAT_NP = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
}
_M = MODEL_TENSOR

# field -> (tensor kind, suffix); suffix "" for the few tensors stored without one (ssm_a)
_ATTENTION = {
    "wq": (_M.ATTN_Q, "weight"),
    "wk": (_M.ATTN_K, "weight"),
    "wv": (_M.ATTN_V, "weight"),
    "wo": (_M.ATTN_OUT, "weight"),
    "bq": (_M.ATTN_Q, "bias"),
    "bk": (_M.ATTN_K, "bias"),
    "bv": (_M.ATTN_V, "bias"),
    "bo": (_M.ATTN_OUT, "bias"),
    "sinks": (_M.ATTN_SINKS, "weight"),
    "q_norm": (_M.ATTN_Q_NORM, "weight"),
    "k_norm": (_M.ATTN_K_NORM, "weight"),
}
_RECURRENT = {
    "conv": (_M.SSM_CONV1D, "weight"),
    "dt_bias": (_M.SSM_DT, "bias"),
    "ssm_a": (_M.SSM_A, ""),
    "norm": (_M.SSM_NORM, "weight"),
    "w_out": (_M.SSM_OUT, "weight"),
    "w_qkv": (_M.ATTN_QKV, "weight"),
    "w_z": (_M.ATTN_GATE, "weight"),
    "w_alpha": (_M.SSM_ALPHA, "weight"),
    "w_beta": (_M.SSM_BETA, "weight"),
    "w_ba": (_M.SSM_BETA_ALPHA, "weight"),
    "w_in": (_M.SSM_IN, "weight"),
}
_MOE = {
    "router": (_M.FFN_GATE_INP, "weight"),
    "router_bias": (_M.FFN_GATE_INP, "bias"),
    "down_exps": (_M.FFN_DOWN_EXP, "weight"),
    "gate_exps": (_M.FFN_GATE_EXP, "weight"),
    "up_exps": (_M.FFN_UP_EXP, "weight"),
    "gate_up_exps": (_M.FFN_GATE_UP_EXP, "weight"),
    "gate_bias": (_M.FFN_GATE_EXP, "bias"),
    "up_bias": (_M.FFN_UP_EXP, "bias"),
    "down_bias": (_M.FFN_DOWN_EXP, "bias"),
    "shared_gate": (_M.FFN_GATE_SHEXP, "weight"),
    "shared_up": (_M.FFN_UP_SHEXP, "weight"),
    "shared_down": (_M.FFN_DOWN_SHEXP, "weight"),
    "shared_router": (_M.FFN_GATE_INP_SHEXP, "weight"),
}
_LAYER = {
    "attn_norm": (_M.ATTN_NORM, "weight"),
    "w_gate": (_M.FFN_GATE, "weight"),
    "w_up": (_M.FFN_UP, "weight"),
    "w_down": (_M.FFN_DOWN, "weight"),
    "post_ffn_norm": (_M.FFN_POST_NORM, "weight"),
}
_REQUIRED = {
    "attention": ("wq", "wk", "wv", "wo"),
    "recurrent": ("conv", "dt_bias", "ssm_a", "norm", "w_out"),
    "moe": ("router", "down_exps"),
}
# Float tensors that feed f32 arithmetic and stay f32 whatever the compute dtype (biases too, even the [E, F]
# expert biases).
_KEEP_F32 = {_M.FFN_GATE_INP, _M.FFN_GATE_INP_SHEXP, _M.SSM_CONV1D}
# Matrices that read the same input, loaded as one where they are stored alike (field -> its parts, in order):
# one matmul launch instead of two or three, and small matrices (k/v, the GDN gates) no longer run alone. Measured in
# docs/BENCHMARKS.md (decode is launch-bound beside the weight reads).
_FUSED = {
    "wqkv": ("wq", "wk", "wv"),
    "w_gate_up": ("w_gate", "w_up"),
    "w_qkvz": ("w_qkv", "w_z"),
    "w_alpha_beta": ("w_alpha", "w_beta"),
    "gate_up_exps": ("gate_exps", "up_exps"),  # [E, 2F, D], gate rows first: the layout converters also write
    "shared_gate_up": ("shared_gate", "shared_up"),
}


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


def _present(mf: ModelFile, table: dict, layer: int) -> dict[str, str]:
    names = {field: tensor_name(kind, suffix, layer) for field, (kind, suffix) in table.items()}
    return {field: name for field, name in names.items() if name in mf.tensors}


def _require(mf: ModelFile, found: dict[str, str], table: dict, fields: tuple[str, ...], layer: int) -> None:
    for field in fields:
        if field not in found:
            kind, suffix = table[field]
            raise GGUFError(mf.path, "tensor missing: the model needs it", tensor=tensor_name(kind, suffix, layer))


def _layer_tensors(mf: ModelFile, cfg: ModelConfig, i: int) -> dict:
    """Field -> tensor name for layer i, nested like Layer: {'mixer': {...}, 'moe': {...} | None, ...}."""
    kind = cfg.kinds[i]
    mixer_table = _ATTENTION if kind == ATTENTION else _RECURRENT
    mixer = _present(mf, mixer_table, i)
    _require(mf, mixer, mixer_table, _REQUIRED[kind], i)
    if kind != ATTENTION and "w_in" not in mixer:
        _require(mf, mixer, mixer_table, ("w_qkv", "w_z"), i)
        if "w_ba" not in mixer:
            _require(mf, mixer, mixer_table, ("w_alpha", "w_beta"), i)
    layer: dict = _present(mf, _LAYER, i)
    _require(mf, layer, _LAYER, ("attn_norm",), i)
    ffn_norm, post_attn = tensor_name(_M.FFN_NORM, "weight", i), tensor_name(_M.ATTN_POST_NORM, "weight", i)
    if ffn_norm in mf.tensors:  # Gemma: post_attention_norm is a sandwich norm after the mixer
        layer["ffn_norm"] = ffn_norm
        if post_attn in mf.tensors:
            layer["post_mixer_norm"] = post_attn
    elif post_attn in mf.tensors:  # Qwen3.5, Qwen3-Next, gpt-oss: it is the feed-forward's input norm
        layer["ffn_norm"] = post_attn
    else:
        raise GGUFError(mf.path, "tensor missing: the model needs it", tensor=ffn_norm)
    moe = _present(mf, _MOE, i)
    if cfg.moe is not None:
        _require(mf, moe, _MOE, _REQUIRED["moe"], i)
        if "gate_up_exps" not in moe:
            _require(mf, moe, _MOE, ("gate_exps", "up_exps"), i)
    else:
        _require(mf, layer, _LAYER, ("w_gate", "w_up", "w_down"), i)
    layer["mixer"] = mixer
    layer["moe"] = moe if cfg.moe is not None else None
    return layer


def _signature(mf: ModelFile, tree) -> object:
    """The structure and storage of a layer's tensors, names aside: equal signatures can be stacked."""
    if isinstance(tree, dict):
        return tuple(sorted((k, _signature(mf, v)) for k, v in tree.items()))
    if tree is None:
        return None
    info = mf.tensors[tree]
    return (info.qtype, info.shape)


def unit_length(cfg: ModelConfig) -> int:
    """The shortest period of the layers' (kind, attention window) pattern: 1 for uniform stacks, 4 for the
    Qwen3.5 hybrids, 6 for Gemma-3, 2 for gpt-oss. A window is then static per position in the unit, which is
    what lets the attention kernels specialise on it. The last unit may be partial."""
    pattern = tuple(zip(cfg.kinds, cfg.layer_window, strict=True))
    return next(p for p in range(1, len(pattern) + 1) if all(pattern[i] == pattern[i % p] for i in range(len(pattern))))


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
    keep_f32 = first.name.endswith(".bias") or any(
        f".{TENSOR_NAMES[k].split('.')[-1]}." in f".{first.name}" for k in _KEEP_F32
    )
    if is_quantized(first.qtype):
        dtype = None
    elif len(first.shape) >= 2 and not keep_f32:
        dtype = compute_dtype
    else:
        dtype = "float32"
    return TensorSpec(tuple(names), first.qtype, first.shape, dtype, stacked, scale_names)


def _nvfp4_scale_name(mf: ModelFile, name: str) -> str:
    for candidate in (name.removesuffix(".weight") + ".scale", name + ".scale"):
        if candidate in mf.tensors:
            return candidate
    raise GGUFError(mf.path, "NVFP4 tensor has no per-tensor '.scale' tensor", tensor=name)


def _stack(mf: ModelFile, trees: list, cls, compute_dtype: str):
    """One dataclass whose leaves stack the same field of every unit."""
    if trees[0] is None:
        return None
    fields = {}
    for field, value in trees[0].items():
        if isinstance(value, dict) or value is None:
            sub = {"mixer": Attention if "wq" in (value or {}) else Recurrent, "moe": MoE}[field]
            fields[field] = _stack(mf, [t[field] for t in trees], sub, compute_dtype)
        else:
            fields[field] = _spec(mf, [t[field] for t in trees], compute_dtype, stacked=True)
    return cls(**_fuse(fields))


def _fuse(fields: dict) -> dict:
    """Fields with each ``_FUSED`` group whose matrices (or expert stacks) share qtype, storage, K and stack shape
    replaced by one spec, concatenated along N."""
    for name, group in _FUSED.items():
        specs = [fields.get(field) for field in group]
        if not all(isinstance(s, TensorSpec) and len(s.shape) >= 2 and not s.scale_names for s in specs):
            continue
        first = specs[0]
        key = (first.qtype, first.dtype, first.shape[:-2], first.shape[-1])
        if any((s.qtype, s.dtype, s.shape[:-2], s.shape[-1]) != key for s in specs):
            continue
        rows = tuple(s.shape[-2] for s in specs)
        fields = {k: v for k, v in fields.items() if k not in group}
        fields[name] = dataclasses.replace(
            first,
            shape=(*first.shape[:-2], sum(rows), first.shape[-1]),
            fused=tuple(s.names for s in specs[1:]),
            rows=rows,
        )
    return fields


def param_specs(mf: ModelFile, cfg: ModelConfig, compute_dtype: str) -> Decoder:
    """The params tree with TensorSpec leaves, validating that every needed tensor is there with a sane shape."""
    layers = [_layer_tensors(mf, cfg, i) for i in range(cfg.n_layers)]
    _check_shapes(mf, cfg)
    p = unit_length(cfg)
    units = [layers[u : u + p] for u in range(0, cfg.n_layers, p)]
    segments = []
    for _, group in groupby(units, key=lambda unit: tuple(_signature(mf, layer) for layer in unit)):
        members = list(group)
        width = len(members[0])
        segments.append(tuple(_stack(mf, [m[i] for m in members], Layer, compute_dtype) for i in range(width)))
    embed_name = tensor_name(_M.TOKEN_EMBD, "weight")
    norm_name = tensor_name(_M.OUTPUT_NORM, "weight")
    for name in (embed_name, norm_name):
        if name not in mf.tensors:
            raise GGUFError(mf.path, "tensor missing: the model needs it", tensor=name)
    embed = dataclasses.replace(_spec(mf, [embed_name], compute_dtype, stacked=False), gathered=True)
    if embed.shape != (cfg.vocab_size, cfg.n_embd):
        raise GGUFError(
            mf.path,
            f"shape {embed.shape} does not match vocab {cfg.vocab_size} x n_embd {cfg.n_embd}",
            tensor=embed_name,
        )
    out_name = tensor_name(_M.OUTPUT, "weight")
    return Decoder(
        embed=embed,
        segments=tuple(segments),
        output_norm=_spec(mf, [norm_name], compute_dtype, stacked=False),
        output=_spec(mf, [out_name], compute_dtype, stacked=False) if out_name in mf.tensors else None,
        inv_freq=TensorSpec(
            (ROPE,), int(GGMLQuantizationType.F32), (cfg.n_layers, max(cfg.rope.dim, 2) // 2), "float32", False
        ),
    )


def _check_shapes(mf: ModelFile, cfg: ModelConfig) -> None:
    """Catch a misshapen tensor here, with its name, instead of as a shape error deep inside jit."""
    q_out, kv_out = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    attention = {
        _M.ATTN_Q: (q_out * (2 if cfg.attn_gate else 1), cfg.n_embd),
        _M.ATTN_K: (kv_out, cfg.n_embd),
        _M.ATTN_V: (kv_out, cfg.n_embd),
        _M.ATTN_OUT: (cfg.n_embd, q_out),
    }
    common = {_M.ATTN_NORM: (cfg.n_embd,)}
    if cfg.moe is None:
        common.update(
            {
                _M.FFN_GATE: (cfg.n_ff, cfg.n_embd),
                _M.FFN_UP: (cfg.n_ff, cfg.n_embd),
                _M.FFN_DOWN: (cfg.n_embd, cfg.n_ff),
            }
        )
    else:
        m = cfg.moe
        common.update(
            {
                _M.FFN_GATE_INP: (m.n_experts, cfg.n_embd),
                _M.FFN_DOWN_EXP: (m.n_experts, cfg.n_embd, m.n_ff_exp),
                _M.FFN_GATE_EXP: (m.n_experts, m.n_ff_exp, cfg.n_embd),
                _M.FFN_UP_EXP: (m.n_experts, m.n_ff_exp, cfg.n_embd),
            }
        )
    recurrent = {}
    if cfg.gdn is not None:
        g = cfg.gdn
        recurrent = {
            _M.SSM_CONV1D: (g.conv_channels, g.conv_kernel),
            _M.SSM_OUT: (cfg.n_embd, g.n_v_heads * g.head_v_dim),
            # the parts the loader may fuse (params._FUSED), whose split points come from these shapes
            _M.ATTN_QKV: (g.conv_channels, cfg.n_embd),
            _M.ATTN_GATE: (g.n_v_heads * g.head_v_dim, cfg.n_embd),
            _M.SSM_ALPHA: (g.n_v_heads, cfg.n_embd),
            _M.SSM_BETA: (g.n_v_heads, cfg.n_embd),
        }
    for layer, kind in enumerate(cfg.kinds):
        expected = {**common, **(attention if kind == ATTENTION else recurrent)}
        for tensor, shape in expected.items():
            name = tensor_name(tensor, "weight", layer)
            if name in mf.tensors and mf.tensors[name].shape != shape:
                raise GGUFError(
                    mf.path, f"shape {mf.tensors[name].shape}, expected {shape} from the metadata", tensor=name
                )
        gate, up = (tensor_name(t, "weight", layer) for t in (_M.FFN_GATE_SHEXP, _M.FFN_UP_SHEXP))
        if gate in mf.tensors and up in mf.tensors and mf.tensors[gate].shape != mf.tensors[up].shape:
            raise GGUFError(
                mf.path, f"shape {mf.tensors[up].shape}, expected {gate}'s {mf.tensors[gate].shape}", tensor=up
            )


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
    if spec.dtype is not None and is_quantized(spec.qtype):  # the dequantized fallback (imp_jax.fallback)
        from imp_jax.fallback import packed_spec, to_dense

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


def is_spec(x) -> bool:
    return isinstance(x, TensorSpec)


def map_specs(fn: Callable[[TensorSpec], object], specs: Decoder) -> Decoder:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


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
