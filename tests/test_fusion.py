"""q/k/v and gate/up stored alike load as one matrix each (one matmul launch instead of three and two); stored
differently they stay apart, and both layouts compute the same logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from imp_jax.debug import weight_tags
from imp_jax.errors import GGUFError
from imp_jax.gguf import open_gguf
from imp_jax.gguf.qtensor import QTensor
from imp_jax.models.config import config_from_gguf
from imp_jax.runtime import steps
from imp_jax.weights.quantize import quantize_file
from imp_jax.weights.specs import param_specs
from imp_jax.weights.synthetic import synthetic_file, synthetic_params, synthetic_specs

FIXTURES = Path(__file__).parent / "fixtures"


def _layers(path):
    """The config, and the spec of every position of every segment's unit."""
    mf = open_gguf(path)
    cfg = config_from_gguf(mf.metadata, set(mf.tensors))
    return cfg, [p for segment in param_specs(mf, cfg, "float32").segments for p in segment]


def _layer_specs(path):
    cfg, layers = _layers(path)
    return cfg, layers[0]


def test_alike_matrices_are_fused_in_order():
    cfg, layer = _layer_specs(FIXTURES / "qwen2" / "model-f32.gguf")
    qkv, kv = layer.mixer.wqkv, cfg.n_head_kv * cfg.head_dim
    assert layer.mixer.wq is layer.mixer.wk is layer.mixer.wv is None
    assert qkv.rows == (cfg.n_head * cfg.head_dim, kv, kv) and qkv.shape == (sum(qkv.rows), cfg.n_embd)
    assert qkv.labels[1] == "blk.1.attn_q.weight+blk.1.attn_k.weight+blk.1.attn_v.weight"
    assert layer.mixer.bq is not None  # biases stay apart: added after the split
    assert layer.w_gate_up.rows == (cfg.n_ff, cfg.n_ff) and layer.w_gate is layer.w_up is None


def test_gated_deltanet_projections_are_fused():
    cfg, layer = _layer_specs(FIXTURES / "qwen35" / "model-f32.gguf")
    g = cfg.gdn
    assert layer.mixer.w_qkvz.rows == (g.conv_channels, g.n_v_heads * g.head_v_dim)
    assert layer.mixer.w_alpha_beta.rows == (g.n_v_heads, g.n_v_heads)
    assert layer.mixer.w_qkv is layer.mixer.w_z is layer.mixer.w_alpha is layer.mixer.w_beta is None


def test_expert_stacks_and_the_shared_expert_are_fused():
    cfg, layers = _layers(FIXTURES / "qwen35moe" / "model-f32.gguf")
    layer = next(p for p in layers if p.moe is not None)
    m = cfg.moe
    assert layer.moe.gate_up_exps.shape == (m.n_experts, 2 * m.n_ff_exp, cfg.n_embd)
    assert layer.moe.gate_up_exps.rows == (m.n_ff_exp, m.n_ff_exp) and layer.moe.gate_exps is None
    assert layer.moe.shared_gate_up is not None and layer.moe.shared_gate is layer.moe.shared_up is None


def test_matrices_stored_differently_stay_apart(tmp_path):
    src = open_gguf(FIXTURES / "qwen2" / "model-f32.gguf")
    mixed = quantize_file(src, tmp_path / "m.gguf", lambda i: T.Q8_0 if ".attn_v." in i.name else T(i.qtype))
    _, layer = _layer_specs(mixed)
    assert layer.mixer.wqkv is None and layer.mixer.wv.qtype == T.Q8_0 and layer.mixer.wq.qtype == T.F32
    assert layer.w_gate_up is not None


@pytest.mark.parametrize(
    "tensor, shape",
    [
        ("blk.0.ssm_alpha.weight", (6, 256)),
        ("blk.0.attn_gate.weight", (192, 256)),
        ("blk.3.ffn_up_exps.weight", (8, 192, 256)),
        ("blk.0.ffn_up_shexp.weight", (192, 256)),
    ],
)
def test_a_misshapen_part_is_named_before_it_could_be_fused(tensor, shape):
    """The split points of a fused leaf come from the config, so every part's shape is checked against it."""
    mf = synthetic_file("tiny-moe", "q8_0")
    cfg = config_from_gguf(mf.metadata, set(mf.tensors))
    mf.tensors[tensor] = dataclasses.replace(mf.tensors[tensor], shape=shape)
    with pytest.raises(GGUFError, match=tensor.replace(".", r"\.")):
        param_specs(mf, cfg, "bfloat16")


def _split(w: QTensor, rows: tuple[int, ...]) -> list[QTensor]:
    bounds = np.cumsum(rows)[:-1].tolist()
    return [QTensor(d, None, w.qtype, (d.shape[-2], w.shape[1])) for d in jnp.split(w.data, bounds, axis=-2)]


def test_fused_and_split_layouts_compute_the_same_logits():
    cfg, specs = synthetic_specs("tiny", "q8_0")
    params = synthetic_params(specs, jax.random.key(1), config=cfg)
    spec, layer = specs.segments[0][0], params.segments[0][0]
    wq, wk, wv = _split(layer.mixer.wqkv, spec.mixer.wqkv.rows)
    w_gate, w_up = _split(layer.w_gate_up, spec.w_gate_up.rows)
    split = dataclasses.replace(
        layer,
        mixer=dataclasses.replace(layer.mixer, wqkv=None, wq=wq, wk=wk, wv=wv),
        w_gate_up=None,
        w_gate=w_gate,
        w_up=w_up,
    )
    ids = list(range(3, 20))

    def logits(p):
        out, _ = steps.run_prefill(p, cfg, ids, 32, jnp.float32, all_logits=True)
        return np.asarray(out[0, : len(ids)])

    fused = logits(params)
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(logits(dataclasses.replace(params, segments=((split,),))), fused, rtol=1e-5, atol=1e-5)


def test_nan_tracer_names_every_fused_part():
    cfg, specs = synthetic_specs("tiny", "q8_0")
    params = synthetic_params(specs, jax.random.key(0), config=cfg)
    ops = {t.op for t in weight_tags(params, specs)}
    assert {"attn_q+attn_k+attn_v", "ffn_gate+ffn_up"} <= ops
