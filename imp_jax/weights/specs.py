"""GGUF tensor table -> the params tree with ``TensorSpec`` leaves, validated against the config.

``param_specs`` builds the params tree once with ``TensorSpec`` leaves (names, stored qtype, logical shape,
target dtype). The same tree is turned into ShapeDtypeStructs for the memory planner (``loading.abstract_params``)
and into device arrays for the model (``loading.load_params``), so planning and loading cannot disagree.
Quantized tensors stay packed (QTensor leaves); float matrices take the compute dtype; norms, biases, routers, the
conv filter and rope factors stay f32.

The layer stack is cut into repeating units (models/decoder.py) and units with identical tensors (names aside)
into segments; every leaf of a segment is stacked over its units (the CPU's plan holds the matrices one leaf
per unit instead: ``tensor_spec.per_unit_matrices``).
"""

from __future__ import annotations

import dataclasses
import itertools

from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType

from imp_jax.errors import GGUFError, UnsupportedModel
from imp_jax.gguf.quant import SUPPORTED_QTYPES, is_quantized
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.attention import Attention
from imp_jax.models.config import ATTENTION, ModelConfig
from imp_jax.models.decoder import Decoder, Layer
from imp_jax.models.moe import MoE
from imp_jax.models.recurrent import Recurrent
from imp_jax.weights.fusion import fuse
from imp_jax.weights.sharding import with_axes
from imp_jax.weights.tensor_spec import ROPE, TensorSpec, tensor_name

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


MAX_PERIOD = 8  # base units per scan step at most: a longer repeating pattern is cheaper as several segments
_SEGMENT_COST = 0.5  # a segment's own cost (its while loop, its stacked leaves' programs) in layer bodies


def segment_plan(signatures: list) -> list[tuple[int, int, int]]:
    """Cut the base units into segments (start, stop, period): units [start, stop) repeat a pattern of ``period``
    units, so each segment is one ``lax.scan`` whose body runs ``period`` units. The plan minimises the layer
    bodies XLA compiles (each segment's period, plus a little per segment).

    A uniform stack is one segment of period 1. llama.cpp's K-quant medium mixes (Q4_K_M: Q6_K attn_v / ffn_down
    in the first and last eighth of the layers and every third between) would be 19 runs of equal neighbours for
    a 36-layer model, each compiled on its own; as periods they are 4 segments, the middle one repeating
    (Q4_K, Q4_K, Q6_K).
    """
    n = len(signatures)
    best: list[tuple[float, int, int]] = [(0.0, 0, 0)] + [(float("inf"), 0, 0)] * n  # cost, start, period
    for stop in range(1, n + 1):
        for start in range(stop):
            length = stop - start
            for period in range(1, min(MAX_PERIOD, length) + 1):
                if length % period or any(
                    signatures[i] != signatures[start + (i - start) % period] for i in range(start, stop)
                ):
                    continue
                cost = best[start][0] + period + _SEGMENT_COST
                if cost < best[stop][0]:
                    best[stop] = (cost, start, period)
                break  # the shortest period that fits is the cheapest for this span
    plan, stop = [], n
    while stop:
        _, start, period = best[stop]
        plan.append((start, stop, period))
        stop = start
    return plan[::-1]


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
    matrix = len(first.shape) >= 2 and not keep_f32
    return TensorSpec(tuple(names), first.qtype, first.shape, dtype, stacked, scale_names, matrix=matrix)


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
    return cls(**fuse(fields))


def param_specs(mf: ModelFile, cfg: ModelConfig, compute_dtype: str) -> Decoder:
    """The params tree with TensorSpec leaves, validating that every needed tensor is there with a sane shape."""
    layers = [_layer_tensors(mf, cfg, i) for i in range(cfg.n_layers)]
    _check_shapes(mf, cfg)
    p = unit_length(cfg)
    units = [layers[u : u + p] for u in range(0, cfg.n_layers, p)]
    signatures = [tuple(_signature(mf, layer) for layer in unit) for unit in units]
    segments = []
    for start, stop, period in segment_plan(signatures):
        members = [list(itertools.chain.from_iterable(units[u : u + period])) for u in range(start, stop, period)]
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
    tree = Decoder(
        embed=embed,
        segments=tuple(segments),
        output_norm=_spec(mf, [norm_name], compute_dtype, stacked=False),
        output=_spec(mf, [out_name], compute_dtype, stacked=False) if out_name in mf.tensors else None,
        inv_freq=TensorSpec(
            (ROPE,), int(GGMLQuantizationType.F32), (cfg.n_layers, max(cfg.rope.dim, 2) // 2), "float32", False
        ),
    )
    return with_axes(tree)


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
            # the parts the loader may fuse (weights.fusion.FUSED), whose split points come from these shapes
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
