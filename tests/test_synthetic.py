"""Synthetic models: the tensor table is the one llama.cpp's converter writes, and every family runs."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from imp_jax import ops
from imp_jax.errors import UnsupportedModel
from imp_jax.gguf.reader import open_gguf
from imp_jax.models.config import config_from_gguf
from imp_jax.runtime import steps
from imp_jax.runtime.cache import init_cache
from imp_jax.weights.loading import abstract_params
from imp_jax.weights.synthetic import SHAPES, synthetic_file, synthetic_params, synthetic_specs, synthetic_tensors

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen35", "qwen35moe", "qwen3next", "qwen3moe", "gpt-oss"])
def test_tensor_table_is_the_converters(family):
    """Names and shapes equal those of the tiny models converted by llama.cpp's own convert_hf_to_gguf.py."""
    mf = open_gguf(FIXTURES / family / "model-f32.gguf")
    cfg = config_from_gguf(mf.metadata, set(mf.tensors))
    table = synthetic_tensors(cfg, dict(mf.metadata))
    assert {n: shape for n, (shape, _) in table.items()} == {n: t.shape for n, t in mf.tensors.items()}


@pytest.mark.parametrize("shape", ["tiny", "tiny-hybrid", "tiny-moe", "tiny-gpt-oss"])
@pytest.mark.parametrize("quant", ["q8_0", "mxfp4"])
def test_every_family_builds_and_runs(shape, quant):
    config, specs = synthetic_specs(shape, quant)
    params = synthetic_params(specs, jax.random.key(0), config=config)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), abstract_params(specs), params)
    assert all(jax.tree.leaves(same))
    cache = init_cache(config, 1, 32, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, config.vocab_size, jnp.int32)
    logits, _ = steps.prefill_step(params, config, tokens, jnp.asarray([16], jnp.int32), cache)
    assert bool(jnp.isfinite(logits).all()) and 0.2 < float(logits.std()) < 5
    for layer in (layer for segment in params.segments for layer in segment):
        if hasattr(layer.mixer, "ssm_a"):  # a positive decay rate would grow the GDN state without bound
            assert float(layer.mixer.ssm_a.max()) < 0


def test_real_shapes_have_the_published_sizes():
    """Weight bytes of the big shapes in MXFP4 (4.25 bits per weight) match their parameter counts."""
    sizes = {name: sum(t.nbytes for t in synthetic_file(name, "mxfp4").tensors.values()) / 1e9 for name in SHAPES}
    params_b = {"qwen3-8b": 8.2, "qwen3.5-9b": 9.0, "qwen3.5-27b": 27.0, "qwen3-30b-a3b": 30.5, "gpt-oss-20b": 20.9}
    for name, billions in params_b.items():
        assert sizes[name] == pytest.approx(billions * 4.25 / 8, rel=0.12), name
    assert SHAPES["gpt-oss-20b"].config.layer_window[:2] == (128, 0)
    assert SHAPES["qwen3.5-27b"].config.n_recurrent_layers == 48


def test_bad_shape_or_quant_is_named():
    with pytest.raises(UnsupportedModel, match="unknown synthetic shape"):
        synthetic_specs("qwen9-1t", "mxfp4")
    with pytest.raises(UnsupportedModel, match="q4_k needs rows that are multiples of 256; gpt-oss-20b"):
        synthetic_specs("gpt-oss-20b", "q4_k")


def test_kernel_layout_is_planned_without_bytes():
    """As on a Hopper GPU: the plan's abstract tree repacks every matrix but the embedding, expert stacks
    included (traced, so the MXFP4 scale check that needs the bytes is left to the load)."""
    hopper = ops.KernelPolicy(matmul=True, attention=True)
    _, specs = synthetic_specs("tiny-gpt-oss", "mxfp4")
    tree = abstract_params(specs, hopper)
    moe = tree.segments[0][0].moe
    assert ops.matmul_path(moe.gate_up_exps) == ops.PALLAS and moe.gate_up_exps.stack_shape == (1, 4)
    assert ops.matmul_path(tree.output) == ops.PALLAS and ops.matmul_path(tree.embed) == ops.REFERENCE
